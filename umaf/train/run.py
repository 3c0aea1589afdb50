"""Driver side of a training run: data → Ray Data preprocessing → ``TorchTrainer`` → run folder.

The run folder (``cfg.out``, local or ``s3://``) is Ray Train's ``storage_path/name``, so Ray's
checkpoints and our files sit together::

    <out>/config.yaml                resolved config
    <out>/data_report.json           pairs per split, with/without caption, dropped
    <out>/checkpoint_*/              Ray Train checkpoints (latest + best kept)
    <out>/best/model.pt, state.json  best model by the dev metric
    <out>/metrics.json               dev + test metrics of the best model, majority baseline
    <out>/history.json               every epoch's reported metrics (loss terms, dev metrics, LRs, samples/s)
    <out>/predictions/{dev,test}.parquet
    <out>/tensorboard/               scalars (loss terms, metrics, learning rates)

Rerunning with the same ``out`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import Any

import pyarrow.compute as pc

from umaf import storage
from umaf.config import dump_yaml
from umaf.data.manifest import label_column, read_manifest
from umaf.train.config import TrainConfig
from umaf.train.method import get_method
from umaf.train.metrics import majority_baseline

logger = logging.getLogger(__name__)

# The driver's storage and hub settings follow the job to its Ray processes (Train controller and
# workers write checkpoints to s3://), as `ray job submit --runtime-env-json` would pass them.
# Credentials are not among them (see storage.FORWARDED_ENV_VARS).
PROPAGATED_ENV = (
    *storage.FORWARDED_ENV_VARS, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "UMAF_ENCODER_CACHE",
    "RAY_AUTH_MODE",
)


def job_env_vars() -> dict[str, str]:
    """The driver's settings for its Ray processes, less those a submitted job's runtime env already
    sets: under ``ray job submit`` those reach every process anyway, and ``ray.init`` refuses a
    runtime env that names the same environment variable as the job's ("Failed to merge")."""
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {} if job_config else {}
    return {k: os.environ[k] for k in PROPAGATED_ENV if os.environ.get(k) and k not in job_env}


def ensure_ray(cfg: TrainConfig) -> bool:
    """Join the cluster (``ray.address``, or ``RAY_ADDRESS`` under ``ray job submit``), else start a
    local one. Returns True when this call started Ray (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": job_env_vars()}, "log_to_driver": True}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Keep the dashboard on: Train V2 inside Tune needs it; harmless otherwise.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard, **kwargs)
    return True


def resolve_inputs(cfg: TrainConfig) -> TrainConfig:
    """No manifest given: write (once) and use the demo dataset and its reference captions."""
    if cfg.manifest:
        return cfg
    from umaf.data.demo import write_demo

    demo_dir = storage.join(cfg.out, "demo")
    manifest_uri, captions_uri = storage.join(demo_dir, "manifest"), storage.join(demo_dir, "reference_captions")
    kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    if not storage.exists(manifest_uri, **kw):
        write_demo(demo_dir, **kw)
    return cfg.model_copy(update={"manifest": manifest_uri, "captions": cfg.captions or captions_uri})


def _run_location(out: str, kw: dict[str, Any]):
    """(storage_filesystem, storage_path, name) for Ray Train's RunConfig from the run folder URI."""
    fs, path = storage.resolve(out, **kw)
    parent, name = posixpath.split(path.rstrip("/")) if storage.is_s3(out) else os.path.split(path.rstrip(os.sep))
    if not name or not parent:
        raise ValueError(f"out={out!r} must name a run folder inside a bucket/folder (e.g. s3://bucket/runs/r1)")
    return fs, parent, name


def prepare_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """Manifest (+ method-specific join) → per split Ray Datasets of model-ready columns, materialised once."""
    import ray.data

    kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    manifest = read_manifest(cfg.manifest, **kw)
    task = cfg.task or manifest.tasks[0]
    if task not in manifest.labels:
        raise ValueError(f"task {task!r} is not in manifest {cfg.manifest}: it has {', '.join(manifest.tasks)}")
    method = get_method(cfg.model)
    table = manifest.table
    table = table.append_column("label", table[label_column(task)])
    prepared = method.prepare_table(table, cfg, label_column(task))
    datasets, counts, labels = {}, {}, {}
    for split in ("train", "dev", "test"):
        part = prepared.table.filter(pc.equal(prepared.table["split"], split))
        if cfg.max_rows_per_split:
            part = part.slice(0, cfg.max_rows_per_split)
        if part.num_rows == 0:
            raise ValueError(f"manifest {cfg.manifest} has no '{split}' rows left for training (after the caption policy)")
        counts[split] = part.num_rows
        labels[split] = part["label"].to_numpy()
        ds = ray.data.from_arrow(part)
        # Materialise once: tokenisation / feature extraction must not rerun every epoch.
        datasets[split] = method.preprocess(ds, cfg, split).materialize()
    label_names = manifest.labels[task]
    return {
        "datasets": datasets,
        "task": task,
        "dataset": manifest.dataset,
        "label_names": label_names,
        "n_train": counts["train"],
        "report": {**prepared.report, "rows_used": counts},
        "majority_baseline": {
            split: {k: v for k, v in majority_baseline(labels["train"], labels[split], label_names).items()
                    if k in ("accuracy", "macro_f1", "weighted_f1")}
            for split in ("dev", "test")
        },
    }


def build_trainer(cfg: TrainConfig, data: dict[str, Any], callbacks: list | None = None):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from umaf.train.loop import train_loop_per_worker

    kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    fs, storage_path, name = _run_location(cfg.out, kw)
    best_metric = cfg.resolved_best_metric(data["dataset"])
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker or 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "label_names": data["label_names"],
            "task": data["task"],
            "dataset": data["dataset"],
            "n_train": data["n_train"],
            "run_uri": cfg.out,
            "best_metric": best_metric,
            "majority_baseline": data["majority_baseline"],
            "data_report": data["report"],
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=cfg.controller_failure_limit),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoints_to_keep,
                checkpoint_score_attribute=f"dev_{best_metric}",
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": job_env_vars()},
        ),
        datasets=data["datasets"],
        # Only train is sharded; rank 0 evaluates dev/test whole, in a fixed order.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def run_training(cfg: TrainConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run one training job end to end; returns the run's ``metrics.json`` content."""
    started = ensure_ray(cfg)
    try:
        return _run(cfg, callbacks)
    finally:
        if started:
            import ray

            ray.shutdown()


def _run(cfg: TrainConfig, callbacks: list | None) -> dict[str, Any]:
    cfg = resolve_inputs(cfg)
    kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    storage.makedirs(cfg.out, **kw)
    storage.write_text_atomic(storage.join(cfg.out, "config.yaml"), dump_yaml(cfg), **kw)
    data = prepare_datasets(cfg)
    storage.write_json_atomic(storage.join(cfg.out, "data_report.json"), data["report"], **kw)
    for split, counts in data["report"].get("splits", {}).items():
        if counts.get("without_caption"):
            logger.warning("%s: %d of %d pairs have no ok caption (policy missing_caption=%s)", split,
                           counts["without_caption"], counts["pairs"], cfg.missing_caption)
    trainer = build_trainer(cfg, data, callbacks)
    trainer.fit()
    return storage.read_json(storage.join(cfg.out, "metrics.json"), **kw)


def baseline_beaten(metrics: dict[str, Any], metric: str | None = None) -> bool:
    """Whether the test metric beats the majority-class baseline's."""
    metric = metric or metrics["best_metric"]
    return float(metrics["test"][metric]) > float(metrics["majority_baseline"]["test"][metric])


__all__ = ["run_training", "build_trainer", "prepare_datasets", "ensure_ray", "baseline_beaten"]
