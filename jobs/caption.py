"""Caption a manifest's image–text pairs with a VLM into a captions dataset (UMAF Section 3.1).

    python jobs/caption.py                                  # demo dataset, tiny model, ./outputs/demo/captions
    python jobs/caption.py --manifest s3://b/msed/manifest --out s3://b/msed/captions --preset paper-qwen
    ray job submit --working-dir . -- python jobs/caption.py --manifest URI --out URI [key=value ...]

    python jobs/caption.py --plan --preset paper-qwen --manifest URI plan.gpu_hour_price=0.8   # cost, no GPU
    python jobs/caption.py --pilot 50 --preset paper-qwen --manifest URI --out URI  # measure 50, then plan
    python jobs/caption.py --report URI                      # quality report of an existing captions set

Re-running on the same --out captions only what is not there yet with the same fingerprint (model,
prompt, sampling, image budget, backend); --retry-failed also redoes the 'invalid' and 'error' rows.
`--help` lists every config key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python jobs/caption.py` from anywhere

from umaf.caption.config import CaptionConfig  # noqa: E402
from umaf.cli import Flag, parse_job_args, reported_errors, run_ray_job, run_script, setup_logging  # noqa: E402

FLAGS = [
    Flag("--manifest", "manifest", "manifest URI (default: the demo dataset)"),
    Flag("--out", "out", "captions dataset URI (local folder or s3://)"),
    Flag("--retry-failed", "retry_failed", "also redo ids whose caption is invalid or error", action="store_true"),
    Flag("--backend", "backend", "hf or vllm", choices=("hf", "vllm")),
    Flag("--model", "model", "model path or hub id ('tiny' = tiny random-weight test model)"),
    Flag("--plan", "plan.enabled", "print the pre-flight plan (pairs, error rows, tokens, GPU-hours, cost) and exit; "
         "no GPU, no Ray", action="store_true"),
    Flag("--pilot", "plan.pilot", "caption N pairs first (a real run into --out), then plan with their measured "
         "output tokens"),
    Flag("--report", "report", "write the quality report of the captions at URI (every fingerprint) and exit"),
]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_job_args("caption", CaptionConfig, argv, description=__doc__, flags=FLAGS)
    setup_logging()
    config = args.config
    if config.report:
        return report(config)
    if config.plan.enabled or config.plan.pilot:
        return plan(config)
    from umaf.caption.pipeline import check_locations, run_caption

    summary = run_ray_job("caption", args.config.ray, lambda: check_locations(args.config),
                          lambda: run_caption(args.config))
    run, now = summary["this_run"], summary["dataset_status"]
    print(f"captioned {summary['captioned']} pairs in {summary['seconds']:.0f}s "
          f"(ok {run['ok']}, invalid {run['invalid']}, error {run['error']}) → {summary['out']}; "
          f"all ids now: ok {now['ok']}, invalid {now['invalid']}, error {now['error']} "
          f"(details: {summary['out']}/_summary.json)")
    if summary.get("reused"):
        print(f"{summary['reused']} of them copied from identical requests captioned before (nothing generated)")
    if summary.get("report"):
        print(f"quality report ({summary['fingerprint']}): {summary['report']}")
    return summary


def plan(config: CaptionConfig) -> dict:
    """--plan / --pilot N: the pre-flight plan; a pilot runs the real pipeline on N pairs first."""
    from umaf.caption.pipeline import check_locations
    from umaf.caption.plan import format_plan, make_plan, run_pilot

    pilot_ids = None
    if config.plan.pilot:
        pilot_ids = run_ray_job("caption", config.ray, lambda: check_locations(config), lambda: run_pilot(config))
    with reported_errors("caption"):
        result = make_plan(config, pilot_ids=pilot_ids)
    print(format_plan(result))
    return result


def report(config: CaptionConfig) -> list[dict]:
    """--report URI: a quality report per caption set at URI."""
    from umaf.caption.report import write_reports

    with reported_errors("caption"):
        reports = write_reports(config.report, **config.storage_kw)
    for r in reports:
        q = r["quality"]
        print(f"{r['fingerprint']}: {q['ids']} pairs, ok {q['status']['ok']}, invalid {q['status']['invalid']}, "
              f"error {q['status']['error']} → {r['report']} (+ quality.png, quality.json)")
    return reports


if __name__ == "__main__":
    run_script(main)
