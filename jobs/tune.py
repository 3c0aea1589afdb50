"""Sweep UMAF's K, lambda, tau or SPP-SCL's lambda, tau, alpha (or any training key) with Ray Tune.

    python jobs/tune.py                                   # demo dataset, 4 UMAF trials, local Ray
    python jobs/tune.py --preset tiny-sppscl              # 4 SPP-SCL trials over alpha x tau
    python jobs/tune.py --model umaf --manifest URI --captions URI --task sentiment --out s3://b/sweeps \\
        --preset paper-msed-sentiment resources.gpus_per_worker=0.25
    python jobs/tune.py --out runs/tune --resume          # continue a sweep whose driver died

Each trial is a whole jobs/train.py run (Ray Train inside Tune); ASHA stops bad trials on the dev
metric. Results: <out>/<name>/results.{parquet,csv,md}, best_config.yaml, dev_metric_vs_params.png.
Exit status 3 when a trial failed (after its retries): the results of the others are written.
`--help` lists every config key.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from umaf.cli import Flag, parse_job_args, reported_errors, run_script, setup_logging  # noqa: E402
from umaf.tune.config import TuneConfig  # noqa: E402

FLAGS = [
    Flag("--model", "model", "method to sweep", choices=("umaf", "sppscl")),
    Flag("--manifest", "manifest", "manifest URI (default: the demo dataset)"),
    Flag("--captions", "captions", "captions URI (UMAF)"),
    Flag("--task", "task", "label task (column label_<task>)"),
    Flag("--out", "out", "sweeps folder: local path or s3://bucket/prefix"),
    Flag("--resume", "resume", "continue the sweep at <out>/<name> whose driver died", action="store_true"),
]
FAILED_TRIALS_STATUS = 3


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_job_args("tune", TuneConfig, argv, description=__doc__, flags=FLAGS)
    cfg = args.config
    with reported_errors("tune"):
        cfg.base_train_config()  # every train.* key and swept key checked before any work
    setup_logging()
    from umaf.tune.sweep import run_sweep

    with reported_errors("tune"):
        result = run_sweep(cfg)
    print(result["summary"])
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "summary")}, indent=2))
    failed = [r for r in result["rows"] if r["status"] == "failed"]
    if failed:
        # A sweep with a failed trial is not a finished sweep: scripts and `ray job submit` must see it.
        print(f"jobs/tune.py: error: {len(failed)} of {len(result['rows'])} trials failed (e.g. trial "
              f"{failed[0]['trial_id']}: {failed[0]['error']}); the results of the others are written. Rerun with "
              "--resume to retry them.", file=sys.stderr)
        raise SystemExit(FAILED_TRIALS_STATUS)
    return result


if __name__ == "__main__":
    run_script(main)
