"""Caption a manifest's image–text pairs with a VLM into a captions dataset (UMAF Section 3.1).

    python jobs/caption.py                                  # demo dataset, tiny model, ./outputs/demo/captions
    python jobs/caption.py --manifest s3://b/msed/manifest --out s3://b/msed/captions --preset paper-qwen
    ray job submit --working-dir . -- python jobs/caption.py --manifest URI --out URI [key=value ...]

Re-running on the same --out captions only what is not there yet; --retry-failed also redoes the
'invalid' and 'error' rows. `--help` lists every config key.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python jobs/caption.py` from anywhere

from umaf.caption.config import CaptionConfig  # noqa: E402
from umaf.cli import Flag, parse_job_args  # noqa: E402

FLAGS = [
    Flag("--manifest", "manifest", "manifest URI (default: the demo dataset)"),
    Flag("--out", "out", "captions dataset URI (local folder or s3://)"),
    Flag("--retry-failed", "retry_failed", "also redo ids whose caption is invalid or error", action="store_true"),
    Flag("--backend", "backend", "hf or vllm", choices=("hf", "vllm")),
    Flag("--model", "model", "model path or hub id ('tiny' = tiny random-weight test model)"),
]


def connect_ray(config: CaptionConfig) -> bool:
    """Join the cluster (given address, or RAY_ADDRESS under `ray job submit`), else start a local one.

    Returns True when this call started Ray (and the caller should shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=config.ray.include_dashboard)
    return True


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_job_args("caption", CaptionConfig, argv, description=__doc__, flags=FLAGS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import ray

    from umaf.caption.pipeline import run_caption

    started = connect_ray(args.config)
    try:
        summary = run_caption(args.config)
    finally:
        if started:
            ray.shutdown()
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
