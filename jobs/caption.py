"""Caption a manifest's image–text pairs with a VLM into a captions dataset (UMAF Section 3.1).

    python jobs/caption.py                                  # demo dataset, tiny model, ./outputs/demo/captions
    python jobs/caption.py --manifest s3://b/msed/manifest --out s3://b/msed/captions --preset paper-qwen
    ray job submit --working-dir . -- python jobs/caption.py --manifest URI --out URI [key=value ...]

Re-running on the same --out captions only what is not there yet; --retry-failed also redoes the
'invalid' and 'error' rows. `--help` lists every config key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python jobs/caption.py` from anywhere

from umaf.caption.config import CaptionConfig  # noqa: E402
from umaf.cli import Flag, parse_job_args, run_ray_job, run_script, setup_logging  # noqa: E402

FLAGS = [
    Flag("--manifest", "manifest", "manifest URI (default: the demo dataset)"),
    Flag("--out", "out", "captions dataset URI (local folder or s3://)"),
    Flag("--retry-failed", "retry_failed", "also redo ids whose caption is invalid or error", action="store_true"),
    Flag("--backend", "backend", "hf or vllm", choices=("hf", "vllm")),
    Flag("--model", "model", "model path or hub id ('tiny' = tiny random-weight test model)"),
]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_job_args("caption", CaptionConfig, argv, description=__doc__, flags=FLAGS)
    setup_logging()
    from umaf.caption.pipeline import check_locations, run_caption

    summary = run_ray_job("caption", args.config.ray, lambda: check_locations(args.config),
                          lambda: run_caption(args.config))
    run, now = summary["this_run"], summary["dataset_status"]
    print(f"captioned {summary['captioned']} pairs in {summary['seconds']:.0f}s "
          f"(ok {run['ok']}, invalid {run['invalid']}, error {run['error']}) → {summary['out']}; "
          f"all ids now: ok {now['ok']}, invalid {now['invalid']}, error {now['error']} "
          f"(details: {summary['out']}/_summary.json)")
    return summary


if __name__ == "__main__":
    run_script(main)
