"""Run prepare → caption → train → tune on one dataset into one folder, skipping what is already done.

    python jobs/pipeline.py                                  # demo dataset, tiny presets, ./outputs/pipeline
    python jobs/pipeline.py --stages caption,train           # only these stages (in pipeline order)
    python jobs/pipeline.py --out s3://b/msed --task sentiment \\
        --prepare-preset msed --caption-preset paper-qwen --train-preset paper-msed-sentiment \\
        --tune-preset tiny train.overrides='[epochs=3]' tune.overrides='[search.space.K.grid=[4,8]]'
    ray job submit --working-dir . -- python jobs/pipeline.py --out s3://b/demo

Each stage is the ordinary job (jobs/<stage>.py), called in-process with its own preset and overrides,
so one Ray cluster serves all of them. Skips: prepare when the manifest exists; caption skips ids it
has already captioned (the caption job's own resume); train when <out>/runs/<name>/metrics.json
exists; tune when the sweep's results.parquet exists. Every stage's config is validated before the
first one runs. `--help` lists every key.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from umaf import storage  # noqa: E402
from umaf.cli import Flag, parse_job_args  # noqa: E402
from umaf.pipeline import PipelineConfig, stage_argv, stage_config, stage_done, stage_summary  # noqa: E402

JOBS_DIR = Path(__file__).resolve().parent
log = logging.getLogger("umaf.pipeline")

FLAGS = [
    Flag("--out", "out", "root folder of every stage's output (local or s3://)"),
    Flag("--stages", "stages", "comma-separated stages to run: prepare,caption,train,tune"),
    Flag("--model", "model", "method to train and sweep", choices=("umaf", "sppscl")),
    Flag("--task", "task", "label task (column label_<task>)"),
    Flag("--prepare-preset", "prepare.preset", "preset of jobs/prepare.py"),
    Flag("--caption-preset", "caption.preset", "preset of jobs/caption.py"),
    Flag("--train-preset", "train.preset", "preset of jobs/train.py"),
    Flag("--tune-preset", "tune.preset", "preset of jobs/tune.py"),
]


def load_job(stage: str):
    """``jobs/<stage>.py`` as a module (jobs/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"umaf_job_{stage}", JOBS_DIR / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def connect_ray(cfg: PipelineConfig, tune_cfg=None) -> bool:
    """One Ray connection for every stage (the jobs reuse an initialised Ray). True if started here."""
    import ray

    from umaf.train.run import job_env_vars

    if ray.is_initialized():
        return False
    # AWS / offline settings follow the stages to their Ray workers, as each job would pass them.
    env = job_env_vars()
    if tune_cfg is not None:
        # What jobs/tune.py would set at its own ray.init: Train controllers inside trials read it.
        from umaf.tune.sweep import WORKER_START_TIMEOUT_ENV

        env[WORKER_START_TIMEOUT_ENV] = os.environ.setdefault(
            WORKER_START_TIMEOUT_ENV, str(int(tune_cfg.worker_start_timeout_s)))
    kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard, **kwargs)
    return True


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_job_args("pipeline", PipelineConfig, argv, description=__doc__, flags=FLAGS)
    cfg = args.config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    jobs = {stage: load_job(stage) for stage in cfg.stages}
    plans = {}
    for stage in cfg.stages:  # every stage's settings checked before any work
        stage_args = stage_argv(cfg, stage)
        plans[stage] = (stage_args, stage_config(stage, stage_args, jobs[stage].FLAGS))

    import ray

    started = connect_ray(cfg, plans["tune"][1] if "tune" in plans else None)
    summary: dict = {"out": cfg.out, "stages": {}}
    try:
        for stage in cfg.stages:
            stage_args, stage_cfg = plans[stage]
            tag = f"[pipeline stage={stage} out={cfg.out}]"
            reason = stage_done(cfg, stage, stage_cfg)
            if reason:
                log.info("%s skipped: %s", tag, reason)
                summary["stages"][stage] = {"status": "skipped", "reason": reason}
                continue
            log.info("%s running jobs/%s.py %s", tag, stage, " ".join(stage_args))
            t0 = time.time()
            result = jobs[stage].main(stage_args)
            summary["stages"][stage] = {"status": "ran", "seconds": round(time.time() - t0, 1),
                                        **stage_summary(stage, result)}
            log.info("%s done in %.1fs", tag, time.time() - t0)
    finally:
        if started:
            ray.shutdown()
    storage.write_json_atomic(storage.join(cfg.out, "pipeline_summary.json"), summary, **cfg.storage_kw)
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
