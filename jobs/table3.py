"""Print UMAF's Table 3 beside a Table 3 sweep's results (and write it as <sweep>/table3.md).

    python jobs/tune.py --preset table3-msed-sentiment --manifest URI --captions URI --out runs/tune
    python jobs/table3.py runs/tune/table3-msed-sentiment

Reads the sweep's results.parquet and each trial's metrics.json (test accuracy, weighted F1 /
precision / recall, and Figure 3's attention shares by token source).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from umaf.cli import reported_errors, run_script  # noqa: E402


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep folder <out>/<name> (local path or s3://)")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, moto)")
    args = parser.parse_args(argv)
    with reported_errors("table3"):
        import pyarrow.parquet as pq

        from umaf import storage
        from umaf.config import absolute_path
        from umaf.errors import UserError
        from umaf.tune.table3 import table3_markdown, table3_rows

        sweep = absolute_path(args.sweep)
        kw = {"endpoint_url": args.endpoint_url}
        results = storage.join(sweep, "results.parquet")
        if not storage.exists(results, **kw):
            raise UserError(f"no results.parquet in {sweep}: run the sweep first (jobs/tune.py --preset table3-...)")
        fs, path = storage.resolve(results, **kw)
        rows = table3_rows(pq.read_table(path, filesystem=fs).to_pylist(), kw)
        text = table3_markdown(rows)
        storage.write_text_atomic(storage.join(sweep, "table3.md"), text, **kw)
    print(text)
    return text


if __name__ == "__main__":
    run_script(main)
