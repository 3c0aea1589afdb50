"""Prepare a dataset: published files (or the synthetic demo set) → a manifest at --out, plus a report.

    python jobs/prepare.py --format FORMAT --source DIR [--images DIR] --out URI [key=value ...]
    python jobs/prepare.py                        # the demo set at ./outputs/demo/manifest (preset tiny)

Formats: mvsa-raw, clmlf, hfm-raw, msed, mmsd2, demo. The report (counts per split and label,
cleaning, skipped records, missing images) is written to <out>.report.json and summarised here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from umaf.cli import Flag, parse_job_args, reported_errors, run_script, setup_logging  # noqa: E402
from umaf.data.config import PrepareConfig  # noqa: E402
from umaf.data.prepare import prepare  # noqa: E402
from umaf.data.report import format_summary  # noqa: E402

FLAGS = [
    Flag("--format", "format", "input format", choices=["mvsa-raw", "clmlf", "hfm-raw", "msed", "mmsd2", "demo"]),
    Flag("--source", "source", "the dataset's folder (local or s3://)"),
    Flag("--images", "images", "image folder (local or s3://)"),
    Flag("--out", "out", "manifest URI (local folder or s3://)"),
    Flag("--dataset", "dataset", "dataset name stored in the manifest"),
    Flag("--on-error", "on_error", "bad records: stop (fail) or skip and count (skip)", choices=["fail", "skip"]),
    Flag("--missing-images", "missing_images", "rows with a missing image: keep or drop", choices=["keep", "drop"]),
    Flag("--check-images", "check_images", "open (decode-check) or stat each image", choices=["open", "stat"]),
]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_job_args("prepare", PrepareConfig, argv, description=__doc__, flags=FLAGS)
    setup_logging()
    with reported_errors("prepare"):
        report = prepare(args.config)
    print(format_summary(report))
    return report


if __name__ == "__main__":
    run_script(main)
