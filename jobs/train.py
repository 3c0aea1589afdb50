"""Train UMAF or SPP-SCL with Ray Train (DDP) into one run folder: checkpoints, metrics, predictions, TensorBoard.

    python jobs/train.py                         # demo dataset + reference captions, tiny preset, local Ray
    python jobs/train.py --model umaf --manifest s3://b/msed/manifest --captions s3://b/msed/captions \\
        --task sentiment --out s3://b/runs/msed-sent --preset paper-msed-sentiment
    python jobs/train.py --out runs/r1 umaf.top_k=5 umaf.nrf=false epochs=3     # ablations as overrides
    ray job submit --working-dir . -- python jobs/train.py --manifest URI --captions URI --out URI ...

Rerunning with the same --out resumes from the latest checkpoint (model, optimizer, scheduler, epoch).
`--help` lists every config key.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python jobs/train.py` from anywhere

from umaf.cli import Flag, parse_job_args  # noqa: E402
from umaf.train.config import TrainConfig  # noqa: E402

FLAGS = [
    Flag("--model", "model", "method to train", choices=("umaf", "sppscl")),
    Flag("--manifest", "manifest", "manifest URI (default: the demo dataset, written under OUT/demo)"),
    Flag("--captions", "captions", "captions URI (UMAF; default with the demo: its reference captions)"),
    Flag("--task", "task", "label task, i.e. the manifest column label_<task> (default: its first task)"),
    Flag("--out", "out", "run folder: local path or s3://bucket/prefix/name"),
]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_job_args("train", TrainConfig, argv, description=__doc__, flags=FLAGS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from umaf.train.run import run_training

    try:
        metrics = run_training(args.config)
    except (ValueError, FileNotFoundError) as exc:  # bad input: say what and where, no traceback
        print(f"jobs/train.py: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    test = metrics["test"]
    print(json.dumps({
        "out": args.config.out,
        "best_epoch": metrics["best_epoch"],
        "test_accuracy": test.get("accuracy"),
        "test_macro_f1": test.get("macro_f1"),
        "test_weighted_f1": test.get("weighted_f1"),
        "majority_baseline_test": metrics["majority_baseline"]["test"],
    }, indent=2))
    return metrics


if __name__ == "__main__":
    main()
