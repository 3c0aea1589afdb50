"""Copy a model to object storage once, so caption nodes load it from there instead of the hub.

    python jobs/upload_model.py --model Qwen/Qwen2.5-VL-7B-Instruct --out s3://b/models/Qwen2.5-VL-7B-Instruct
    python jobs/upload_model.py                              # the tiny test VLM → ./outputs/models/tiny

Then caption with `model=s3://b/models/Qwen2.5-VL-7B-Instruct` (backend vllm). Run it where the hub is
reachable (laptop or head node); a rerun copies only what is missing. `--help` lists every key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python jobs/upload_model.py` from anywhere

from umaf.caption.model_store import UploadModelConfig, upload_model  # noqa: E402
from umaf.cli import Flag, parse_job_args, reported_errors, run_script, setup_logging  # noqa: E402

FLAGS = [
    Flag("--model", "model", "hub id, local model folder, or 'tiny'"),
    Flag("--revision", "revision", "hub revision (default branch if unset)"),
    Flag("--out", "out", "destination folder (s3://bucket/models/NAME or a local folder)"),
]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_job_args("upload_model", UploadModelConfig, argv, description=__doc__, flags=FLAGS)
    setup_logging()
    with reported_errors("upload_model"):
        summary = upload_model(args.config)
    print(f"model {summary['model']} (revision {summary['revision'][:12]}) → {summary['out']}: "
          f"{summary['copied']} files copied ({summary['copied_bytes'] / 1e9:.2f} GB), {summary['skipped']} already there")
    return summary


if __name__ == "__main__":
    run_script(main)
