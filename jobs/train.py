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

import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python jobs/train.py` from anywhere

from umaf.cli import Flag, parse_job_args, reported_errors, run_script, setup_logging  # noqa: E402
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
    setup_logging()
    from umaf.train.run import run_training

    with reported_errors("train"):
        metrics = run_training(args.config)
    print(last_line(metrics, args.config.out))
    return metrics


def last_line(metrics: dict, out: str) -> str:
    """The run's closing line: the reported protocol's test figures (the three F1s side by side), the
    other protocol's and the gap where batch-mates matter, the baseline and the best epoch."""
    test, baseline = metrics["test"], metrics["majority_baseline"]["test"]
    ev = metrics.get("eval") or {}
    protocol = f" ({ev['protocol']})" if ev.get("batch_dependent") else ""
    line = (f"test{protocol}: accuracy {test['accuracy']:.3f}, weighted F1 {test['weighted_f1']:.3f}, macro F1 "
            f"{test['macro_f1']:.3f}, F1 of weighted P/R {test['f1_of_weighted_pr']:.3f}")
    other = metrics.get("other_protocol") or {}
    gap = (metrics.get("protocol_gap") or {}).get("test")
    if other.get("test"):
        line += (f" | {other['protocol']}: accuracy {other['test']['accuracy']:.3f}, weighted F1 "
                 f"{other['test']['weighted_f1']:.3f}; gap official_order − train_context: accuracy "
                 f"{gap['accuracy']:+.3f}, weighted F1 {gap['weighted_f1']:+.3f}")
    elif other.get("same_as_reported"):
        line += " (any evaluation order: predictions do not depend on batch-mates)"
    elif other:
        line += f" | {other['protocol']}: not evaluated ({other.get('why')})"
    # Epochs are counted from 1 on the console, as the epoch lines count them (metrics.json: from 0).
    return (f"{line} (majority baseline weighted F1 {baseline['weighted_f1']:.3f}); best dev epoch "
            f"{metrics['best_epoch'] + 1} of {metrics['epochs']} → {out} (metrics.json)")


if __name__ == "__main__":
    run_script(main)
