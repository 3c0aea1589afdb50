"""Label a manifest's pairs with a trained run's best model (UMAF or SPP-SCL) into a predictions dataset.

    python jobs/predict.py                                  # the quick start's run on the demo test split
    python jobs/predict.py --run s3://b/runs/msed-sentiment --manifest s3://b/new/manifest \
        --captions s3://b/new/captions --out s3://b/new/predictions
    ray job submit --working-dir . -- python jobs/predict.py --run URI --manifest URI --out URI [key=value ...]

Re-running on the same --out predicts only the ids not there yet; --retry-failed also redoes error
rows. When the manifest has labels for the run's task, <out>/_metrics.json holds training's metrics
per split. `--help` lists every config key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python jobs/predict.py` from anywhere

from umaf.cli import Flag, parse_job_args, run_ray_job, run_script, setup_logging  # noqa: E402
from umaf.predict.config import PredictConfig  # noqa: E402

FLAGS = [
    Flag("--run", "run", "the trained run folder (jobs/train.py's --out)"),
    Flag("--manifest", "manifest", "manifest URI of the pairs to label (default: the run's own)"),
    Flag("--captions", "captions", "captions URI for UMAF runs (default: the run's captions)"),
    Flag("--out", "out", "predictions dataset URI (local folder or s3://)"),
    Flag("--splits", "splits", "comma-separated splits to label (default: all)"),
    Flag("--retry-failed", "retry_failed", "also redo ids whose last row is an error row", action="store_true"),
]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_job_args("predict", PredictConfig, argv, description=__doc__, flags=FLAGS)
    setup_logging()
    from umaf.predict.pipeline import check_locations, run_predict

    # A wrong URI or a run without a finished best model is said before Ray starts.
    summary = run_ray_job("predict", args.config.ray, lambda: check_locations(args.config),
                          lambda: run_predict(args.config))
    run, now = summary["this_run"], summary["dataset_status"]
    metrics = "".join(f"; {split}: accuracy {m['accuracy']:.4f}, weighted F1 {m['weighted_f1']:.4f}, macro F1 "
                      f"{m['macro_f1']:.4f}, F1 of weighted P/R {m['f1_of_weighted_pr']:.4f}"
                      for split, m in (summary["metrics"] or {}).items() if m.get("n"))
    print(f"predicted {summary['predicted']} pairs in {summary['seconds']:.0f}s (ok {run['ok']}, error {run['error']}) "
          f"→ {summary['out']}; all ids now: ok {now['ok']}, error {now['error']}{metrics} "
          f"(details: {summary['out']}/_summary.json)")
    return summary


if __name__ == "__main__":
    run_script(main)
