"""Run prepare → caption → train → predict → tune on one dataset into one folder, skipping what is already done.

    python jobs/pipeline.py                                  # demo dataset, tiny presets, ./outputs/pipeline
    python jobs/pipeline.py --stages caption,train           # only these stages (in pipeline order)
    python jobs/pipeline.py --out s3://b/msed --task sentiment \\
        --prepare-preset msed --caption-preset paper-qwen --train-preset paper-msed-sentiment \\
        --tune-preset tiny train.overrides='[epochs=3]' tune.overrides='[search.space.K.grid=[4,8]]'
    ray job submit --working-dir . -- python jobs/pipeline.py --out s3://b/demo

Each stage is the ordinary job (jobs/<stage>.py), called in-process with its own preset and overrides,
so one Ray cluster serves all of them. Skips: prepare when the manifest exists; caption skips ids it
has already captioned (the caption job's own resume); train when <out>/runs/<name>/metrics.json
exists; predict (the trained run on the preset's splits, the demo's test split) skips ids it has
already predicted; tune when the sweep's results.parquet exists. Every stage's config is validated before the
first one runs. `--help` lists every key.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from umaf import storage  # noqa: E402
from umaf.cli import Flag, parse_job_args, run_script, setup_logging  # noqa: E402
from umaf.pipeline import (  # noqa: E402
    PipelineConfig, stage_argv, stage_config, stage_done, stage_output, stage_summary, summary_table,
)

JOBS_DIR = Path(__file__).resolve().parent
log = logging.getLogger("umaf.pipeline")

FLAGS = [
    Flag("--out", "out", "root folder of every stage's output (local or s3://)"),
    Flag("--stages", "stages", "comma-separated stages to run: prepare,caption,train,predict,tune"),
    Flag("--model", "model", "method to train and sweep", choices=("umaf", "sppscl")),
    Flag("--task", "task", "label task (column label_<task>)"),
    Flag("--prepare-preset", "prepare.preset", "preset of jobs/prepare.py"),
    Flag("--caption-preset", "caption.preset", "preset of jobs/caption.py"),
    Flag("--train-preset", "train.preset", "preset of jobs/train.py"),
    Flag("--predict-preset", "predict.preset", "preset of jobs/predict.py"),
    Flag("--tune-preset", "tune.preset", "preset of jobs/tune.py"),
]


def load_job(stage: str):
    """``jobs/<stage>.py`` as a module (jobs/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"umaf_job_{stage}", JOBS_DIR / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_job_args("pipeline", PipelineConfig, argv, description=__doc__, flags=FLAGS)
    cfg = args.config
    setup_logging()
    jobs = {stage: load_job(stage) for stage in cfg.stages}
    plans = {}
    for stage in cfg.stages:  # every stage's settings checked before any work
        stage_args = stage_argv(cfg, stage)
        plans[stage] = (stage_args, stage_config(stage, stage_args, jobs[stage].FLAGS))

    from umaf.raycluster import ray_connection

    extra_env = {}
    if "tune" in plans:  # what jobs/tune.py would set: Train controllers inside trials read it
        from umaf.tune.sweep import WORKER_START_TIMEOUT_ENV

        extra_env[WORKER_START_TIMEOUT_ENV] = str(int(plans["tune"][1].worker_start_timeout_s))
    summary: dict = {"out": cfg.out, "stages": {}}
    with ray_connection(cfg.ray, extra_env, dashboard="tune" in plans or None):
        for number, stage in enumerate(cfg.stages, 1):
            stage_args, stage_cfg = plans[stage]
            output = stage_output(stage, stage_cfg)
            tag = f"stage {number}/{len(cfg.stages)} {stage}"
            reason = stage_done(cfg, stage, stage_cfg)
            if reason:
                log.info("== %s: skipped (%s)", tag, reason)
                summary["stages"][stage] = {"status": "skipped", "reason": reason, "output": output}
                continue
            log.info("== %s: jobs/%s.py --preset %s → %s", tag, stage, getattr(cfg, stage).preset, output)
            t0 = time.time()
            result = jobs[stage].main(stage_args)
            summary["stages"][stage] = {"status": "ran", "seconds": round(time.time() - t0, 1), "output": output,
                                        **stage_summary(stage, result)}
            log.info("== %s: done in %.0fs", tag, time.time() - t0)
    summary_uri = storage.join(cfg.out, "pipeline_summary.json")
    storage.write_json_atomic(summary_uri, summary, **cfg.storage_kw)
    print(f"\npipeline finished: {cfg.out}\n{summary_table(summary)}\n(details: {summary_uri})")
    return summary


if __name__ == "__main__":
    run_script(main)
