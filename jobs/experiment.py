"""A paper's table as one cluster job: rows (variants) × datasets × seeds, with confidence intervals and
paired significance tests against a reference row.

    python jobs/experiment.py                              # tiny: 2 rows × the demo set × 3 seeds, offline, local Ray
    python jobs/experiment.py --preset umaf-table4-msed-sentiment --manifest s3://b/msed/manifest \\
        --captions s3://b/msed/captions --out s3://b/experiments resources.gpus_per_worker=0.25
    python jobs/experiment.py --preset sppscl-table4 datasets.mvsa-single.manifest=URI ...   # several datasets
    python jobs/experiment.py --out runs/experiments --resume   # run only the missing or failed cells
    ray job submit --working-dir . -- python jobs/experiment.py --preset NAME ...

Every cell is a jobs/train.py run inside one Ray Tune run (one log line per finished cell, with an
ETA). Outputs in <out>/<name>/: results.parquet (one row per cell), summary.parquet (one row per
row × dataset: means, stds, CIs, p-values), report.md, report.tex, figures/, runs/<row>/<dataset>/seed<k>/.
Exit status 3 when a cell failed (everything else is written; --resume runs only what is missing).
`--help` lists every config key.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from umaf.cli import Flag, parse_job_args, reported_errors, run_script, setup_logging  # noqa: E402
from umaf.experiment.config import ExperimentConfig  # noqa: E402

FLAGS = [
    Flag("--manifest", "manifest", "manifest URI of the experiment's only dataset (else datasets.<name>.manifest=)"),
    Flag("--captions", "captions", "captions URI of the only dataset (UMAF)"),
    Flag("--task", "task", "label task of the only dataset"),
    Flag("--out", "out", "experiments folder: local path or s3://bucket/prefix"),
    Flag("--resume", "resume", "run only the missing or failed cells of <out>/<name>", action="store_true"),
]
FAILED_CELLS_STATUS = 3


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_job_args("experiment", ExperimentConfig, argv, description=__doc__, flags=FLAGS)
    cfg = args.config
    with reported_errors("experiment"):
        from umaf.experiment.published import check_refs

        cfg.check_cells()  # every row × dataset config loads, before any work
        check_refs(cfg)
    setup_logging()
    from umaf.experiment.run import run_experiment

    with reported_errors("experiment"):
        result = run_experiment(cfg)
    print(result["report_text"])
    print(json.dumps({k: result[k] for k in ("experiment", "results", "summary", "report", "cells", "failed")}, indent=2))
    if result["failed"]:
        print(f"jobs/experiment.py: error: {len(result['failed'])} of {result['cells']} cells failed "
              f"({', '.join(result['failed'][:5])}{' ...' if len(result['failed']) > 5 else ''}); the report covers "
              "the others. Rerun the same command with --resume to run only the missing ones.", file=sys.stderr)
        raise SystemExit(FAILED_CELLS_STATUS)
    return result


if __name__ == "__main__":
    run_script(main)
