"""Driver side of a training run: data → Ray Data preprocessing → ``TorchTrainer`` → run folder.

The run folder (``cfg.out``, local or ``s3://``) is Ray Train's ``storage_path/name``, so Ray's
checkpoints and our files sit together::

    <out>/config.yaml                resolved config
    <out>/data_report.json           pairs per split, with/without caption, dropped
    <out>/checkpoint_*/              Ray Train checkpoints (latest + best kept)
    <out>/best/model.safetensors, model.json, state.json, tokenizer/...  best model (the run's export)
    <out>/metrics.json               dev + test metrics of the best model (reported protocol), the other
                                     protocol's and the gap, majority baseline
    <out>/history.json               every epoch's reported metrics (loss terms, dev metrics, LRs, samples/s)
    <out>/predictions/{dev,test}.parquet    the reported evaluation protocol's (eval.protocol); SPP-SCL also
    <out>/predictions/{dev,test}.<other protocol>.parquet, e.g. test.official_order.parquet
    <out>/tensorboard/               scalars (loss terms, metrics, learning rates)

Rerunning with the same ``out`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from umaf import storage
from umaf.config import dump_yaml
from umaf.errors import UserError
from umaf.raycluster import driver_runtime_env, ray_connection
from umaf.data.manifest import SOURCE_INDEX, label_column, read_manifest
from umaf.train.config import TrainConfig
from umaf.train.method import get_method
from umaf.train.metrics import majority_baseline
from umaf.train.order import context_draw

logger = logging.getLogger(__name__)

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
        raise UserError(f"out={out!r} must name a run folder inside a bucket/folder (e.g. s3://bucket/runs/r1)")
    return fs, parent, name


def prepare_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """Manifest (+ method-specific join) → per split Ray Datasets of model-ready columns, materialised once."""
    import ray.data

    # The splits are iterated every epoch inside Ray workers: by the split coordinator (with the
    # dataset's own DataContext, fixed when it is made here) and by the Train workers (with the
    # DataContext Ray Train captures when the trainer is made). Without tqdm_ray they log their
    # progress at INFO, which QUIET_ENV keeps out, instead of redrawing bars in the driver's console.
    # The setting only matters inside Ray workers, so it is set for this process for good.
    ray.data.DataContext.get_current().use_ray_tqdm = False
    kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    manifest = read_manifest(cfg.manifest, **kw)
    task = cfg.task or manifest.tasks[0]
    if task not in manifest.labels:
        raise UserError(f"task {task!r} is not in manifest {cfg.manifest}: it has {', '.join(manifest.tasks)}; "
                        "pick one with --task")
    method = get_method(cfg.model)
    table = manifest.table
    table = table.append_column("label", table[label_column(task)])
    prepared = method.prepare_table(table, cfg, label_column(task))
    # The official evaluation order: each row's position in its source file (None: an older manifest).
    has_source_index = SOURCE_INDEX in table.column_names and table[SOURCE_INDEX].null_count < table.num_rows
    source_index = dict(zip(table["id"].to_pylist(), table[SOURCE_INDEX].to_pylist())) if has_source_index else {}
    raw, counts, labels, source_positions = {}, {}, {}, {}
    context: dict[str, Any] = {}
    for split in ("train", "dev", "test"):
        part = prepared.table.filter(pc.equal(prepared.table["split"], split))
        if cfg.max_rows_per_split:
            part = part.slice(0, cfg.max_rows_per_split)
        if part.num_rows == 0:
            raise UserError(f"manifest {cfg.manifest} has no '{split}' rows left for training (after the caption "
                            f"policy missing_caption={cfg.missing_caption}); check the manifest's splits and captions")
        counts[split] = part.num_rows
        labels[split] = part["label"].to_numpy()
        raw[split] = ray.data.from_arrow(part)
        if split != "train":
            source_positions[split] = {i: source_index.get(i) for i in part["id"].to_pylist()}
        elif method.eval_depends_on_batch(cfg):
            # The train_context protocol's training pairs: drawn once, from the seed; their raw rows go
            # into the model card, so the predict job completes its batches with the same pairs.
            rows = part.take(pa.array(context_draw(part.num_rows, cfg.eval_batch_size, cfg.seed)))
            keep = [c for c in ("id", "text", "image", "image_ok", "label") if c in rows.column_names]
            context = {"ids": rows["id"].to_pylist(), "rows": rows.select(keep).to_pylist(), "seed": cfg.seed}
    if not has_source_index:
        logger.warning("manifest %s has no source_index column (made before it existed): the official_order "
                       "evaluation protocol runs the splits in manifest order; rerun jobs/prepare.py to keep the "
                       "source files' order", cfg.manifest)
    started = time.time()
    with quiet_datasets():
        # All splits at once (SPP-SCL loads its frozen encoders once for all of them). Materialise
        # once: tokenisation / feature extraction must not rerun every epoch.
        datasets = {split: ds.materialize() for split, ds in method.preprocess_splits(raw, cfg).items()}
    # Train workers read the materialised blocks themselves (zero-copy from the object store): rank r
    # takes its part of each global batch of the epoch's permutation by row (umaf.train.order).
    refs = {split: ds.to_arrow_refs() for split, ds in datasets.items()}
    logger.info("prepared %s: %d train, %d dev, %d test pairs in %.1fs", cfg.model, counts["train"], counts["dev"],
                counts["test"], time.time() - started)
    label_names = manifest.labels[task]
    return {
        "datasets": datasets,
        "refs": refs,
        "source_positions": source_positions,
        "official_order_from": "source_index" if has_source_index else "manifest order (the manifest has no source_index)",
        "context": context,
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


@contextlib.contextmanager
def quiet_datasets():
    """Preparing the splits takes seconds and gets one line of its own: Ray Data's start, plan,
    progress and finish lines stay out of this process's log meanwhile."""
    from ray.data import DataContext

    from umaf.progress import quiet_ray_data_logs

    ctx = DataContext.get_current()
    saved = ctx.print_on_execution_start
    ctx.print_on_execution_start = False
    try:
        with quiet_ray_data_logs():
            yield
    finally:
        ctx.print_on_execution_start = saved


def build_trainer(cfg: TrainConfig, data: dict[str, Any], callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from umaf.train.loop import train_loop_per_worker

    kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    fs, storage_path, name = _run_location(cfg.out, kw)
    best_metric = cfg.resolved_best_metric(data["dataset"])
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker or 1
    if cfg.node_resource:  # e.g. train_node: workers only on the training node type (one unit per GPU)
        resources[cfg.node_resource] = resources.get("GPU", 1)
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
            "refs": data["refs"],
            "source_positions": data["source_positions"],
            "official_order_from": data["official_order_from"],
            "context": data["context"],
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
            worker_runtime_env=driver_runtime_env(cfg.ray),
            # Ray Train's INFO lines (every report, every checkpoint, per worker) would drown the
            # run's own per-epoch lines; warnings and errors still show, and the files keep all.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        # No Ray Data iterators in the workers: they read the materialised blocks (loop_config["refs"]).
    )


def run_training(cfg: TrainConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run one training job end to end; returns the run's ``metrics.json`` content."""
    cfg = resolve_inputs(cfg)
    check_locations(cfg)  # before Ray starts: a wrong URI is said in a second, not after a minute
    with ray_connection(cfg.ray):
        return _run(placeable(cfg), callbacks)


def placeable(cfg: TrainConfig) -> TrainConfig:
    """``node_resource`` (the paper presets' ``train_node``) names a node type of a real cluster. On a
    Ray this job started on one machine, no node offers it and no autoscaler will add one, so the
    workers would wait forever: there it is dropped, saying so. A joined cluster keeps it (its
    autoscaler starts such nodes); a line says the workers wait for one."""
    if not cfg.node_resource:
        return cfg
    import ray

    from umaf.raycluster import one_machine_ray

    if ray.cluster_resources().get(cfg.node_resource):
        return cfg
    if one_machine_ray(cfg.ray):
        logger.info("node_resource=%s: no node of this one-machine Ray offers it, so the workers run on any node",
                    cfg.node_resource)
        return cfg.model_copy(update={"node_resource": None})
    logger.info("node_resource=%s: no node offers it yet; the workers wait for the autoscaler to start one "
                "(node_resource=null runs them on any node)", cfg.node_resource)
    return cfg


def check_locations(cfg: TrainConfig) -> None:
    """Inputs exist and the run folder can be written, or a :class:`UserError` that says which and
    what to do, before Ray Train starts (not a traceback from a worker minutes later)."""
    kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    storage.require(cfg.manifest, "manifest", "make one with jobs/prepare.py, or fix --manifest", **kw)
    if cfg.model == "umaf" and cfg.umaf.use_captions and cfg.captions:
        storage.require(cfg.captions, "captions", "make them with jobs/caption.py, or train text-only with "
                        "umaf.use_captions=false", **kw)
    storage.require_folder(cfg.out, "run folder", **kw)


def pin_caption_fingerprint(cfg: TrainConfig) -> TrainConfig:
    """The run's caption set, chosen once (given, or the only one at ``captions``) and written into its
    config: config.yaml, the checkpoints' model card and a resumed run all name the same set, even
    after another set is captioned into the same folder."""
    if not cfg.reads_captions:
        return cfg
    from umaf.caption.store import resolve_fingerprint

    chosen = resolve_fingerprint(cfg.captions, cfg.caption_fingerprint, endpoint_url=cfg.storage.endpoint_url,
                                 region=cfg.storage.region)
    return cfg.model_copy(update={"caption_fingerprint": chosen})


def _run(cfg: TrainConfig, callbacks: list | None) -> dict[str, Any]:
    kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    cfg = pin_caption_fingerprint(cfg)
    logger.info("train %s: manifest %s%s → run folder %s", cfg.model, cfg.manifest,
                f" + captions {cfg.captions} (set {cfg.caption_fingerprint})"
                if cfg.reads_captions else "",
                cfg.out)
    storage.write_text_atomic(storage.join(cfg.out, "config.yaml"), dump_yaml(cfg), **kw)
    data = prepare_datasets(cfg)
    storage.write_json_atomic(storage.join(cfg.out, "data_report.json"), data["report"], **kw)
    # Rows without T_vlm by design (text-only ablation, Table 3's text / image rows) are not worth a warning.
    captions_used = data["report"].get("captions_used", True)
    for split, counts in data["report"].get("splits", {}).items():
        if captions_used and counts.get("without_caption"):
            logger.warning("%s: %d of %d pairs have no ok caption (policy missing_caption=%s)", split,
                           counts["without_caption"], counts["pairs"], cfg.missing_caption)
    trainer = build_trainer(cfg, data, callbacks)
    counts = data["report"]["rows_used"]
    logger.info("training %s on %s/%s: %d train, %d dev, %d test pairs; %d epochs, %d %s worker(s), global batch %d",
                cfg.model, data["dataset"], data["task"], counts["train"], counts["dev"], counts["test"], cfg.epochs,
                cfg.num_workers, "GPU" if cfg.use_gpu else "CPU", cfg.batch_size)
    trainer.fit()
    return storage.read_json(storage.join(cfg.out, "metrics.json"), **kw)


def baseline_beaten(metrics: dict[str, Any], metric: str | None = None) -> bool:
    """Whether the test metric beats the majority-class baseline's."""
    metric = metric or metrics["best_metric"]
    return float(metrics["test"][metric]) > float(metrics["majority_baseline"]["test"][metric])


__all__ = ["run_training", "build_trainer", "prepare_datasets", "baseline_beaten"]
