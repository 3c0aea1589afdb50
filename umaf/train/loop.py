"""The Ray Train worker loop shared by every method (runs on each DDP rank).

Per epoch: train on this rank's shard (``get_dataset_shard("train")``), evaluate on ``dev`` (rank 0,
whole split, fixed order and batch size), save the best model by the dev metric, and
``ray.train.report`` metrics with a checkpoint (model, optimizer, scheduler, epoch). A restarted run
(same run folder, or a worker group restarted by ``FailureConfig``) resumes from
``ray.train.get_checkpoint()``. At the end rank 0 evaluates the best model on ``test`` and writes
``metrics.json``, ``predictions/{dev,test}.parquet`` and TensorBoard scalars into the run folder.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from umaf import distributed, storage
from umaf.train.checkpoint import load_best, load_checkpoint_dir, save_best, save_checkpoint_dir
from umaf.train.config import TrainConfig
from umaf.train.method import Method, StepContext, get_method
from umaf.train.metrics import classification_metrics, scalar_metrics


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step warm-up then linear/cosine decay or constant, or StepLR (stepped once per epoch)."""
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(method: Method, model: torch.nn.Module, batches, device: torch.device, autocast_ctx) -> dict[str, np.ndarray]:
    """Predict every batch in order: ids, labels, predicted labels and class probabilities."""
    ids, labels, probs = [], [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            tensors = method.collate(batch, device)
            with autocast_ctx():
                logits, _ = method.predict(model, tensors)
            probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
            labels.append(np.asarray(batch["label"], dtype=np.int64))
            ids.extend(str(i) for i in batch["id"])
    model.train(was_training)
    if not ids:
        return {"id": np.array([], dtype=object), "label": np.array([], dtype=np.int64),
                "pred": np.array([], dtype=np.int64), "probs": np.zeros((0, 0))}
    prob = np.concatenate(probs)
    return {"id": np.array(ids, dtype=object), "label": np.concatenate(labels), "pred": prob.argmax(1), "probs": prob}


def predictions_table(pred: dict[str, np.ndarray], split: str, label_names: list[str]) -> pa.Table:
    return pa.table({
        "id": pa.array(pred["id"].tolist(), pa.string()),
        "split": pa.array([split] * len(pred["id"]), pa.string()),
        "label": pa.array(pred["label"], pa.int64()),
        "pred": pa.array(pred["pred"], pa.int64()),
        "label_name": pa.array([label_names[i] for i in pred["label"]], pa.string()),
        "pred_name": pa.array([label_names[i] for i in pred["pred"]], pa.string()),
        "probs": pa.array([row.tolist() for row in pred["probs"]], pa.list_(pa.float32())),
    })


class TensorBoard:
    """Rank 0's TensorBoard writer. Writes into the run folder when it is local; otherwise into a local
    folder that is uploaded to ``<run>/tensorboard`` after every epoch (Train V2 has no Tune logger)."""

    def __init__(self, run_uri: str, storage_kw: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.is_s3(run_uri)
        self.run_uri, self.storage_kw = run_uri, storage_kw
        self.local = Path(tempfile.mkdtemp(prefix="umaf-tb-")) if self.remote else Path(storage.resolve(storage.join(run_uri, "tensorboard"))[1])
        self.writer = SummaryWriter(log_dir=str(self.local))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            storage.upload_dir(self.local, storage.join(self.run_uri, "tensorboard"), **self.storage_kw)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def _mean_over_ranks(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """Sample-weighted means of per-batch loss terms over all ranks (logging only)."""
    keys = sorted(sums)
    packed = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64, device=device)
    distributed.all_reduce_sum(packed)
    total = max(1.0, float(packed[-1]))
    return {k: float(v) / total for k, v in zip(keys, packed[:-1].tolist())}


def _append_history(run_uri: str, metrics: dict[str, Any], storage_kw: dict[str, Any]) -> list[dict[str, Any]]:
    """``<run>/history.json``: every epoch's reported metrics (a resumed run drops epochs it redoes)."""
    uri = storage.join(run_uri, "history.json")
    history = storage.read_json(uri, **storage_kw) if storage.exists(uri, **storage_kw) else []
    history = [h for h in history if h.get("epoch", -1) < metrics["epoch"]] + [metrics]
    storage.write_json_atomic(uri, history, **storage_kw)
    return history


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.data
    import ray.train
    import ray.train.torch

    # Per-epoch dev iteration would print a progress bar per epoch into the driver log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = TrainConfig.model_validate(loop_config["train"])
    label_names: list[str] = loop_config["label_names"]
    run_uri: str = loop_config["run_uri"]
    best_metric: str = loop_config["best_metric"]
    storage_kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    method = get_method(cfg.model)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    np.random.seed(cfg.seed)
    model = method.build_model(cfg, len(label_names))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    ddp_kwargs = {"find_unused_parameters": True} if method.find_unused_parameters(cfg) else {}
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs or None)
    module = model.module if hasattr(model, "module") else model

    optimizer = torch.optim.AdamW(method.param_groups(module, cfg), weight_decay=cfg.weight_decay)
    per_worker = cfg.per_worker_batch_size()
    # Train V2 splits the train set evenly (equal=True), so every rank runs the same number of steps.
    steps_per_epoch = max(1, math.ceil(loop_config["n_train"] / world / per_worker))
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)

    start_epoch, global_step, best_value, best_epoch = 0, 0, -math.inf, -1
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint_dir(folder, module, optimizer, scheduler)
        start_epoch, global_step = state["next_epoch"], state["global_step"]
        best_value, best_epoch = state["best_value"], state["best_epoch"]
        resumed_from = start_epoch

    step_ctx = StepContext(
        optimizer=optimizer, device=device, config=cfg, global_step=global_step,
        autocast_dtype=torch.bfloat16 if on_gpu else None, grad_clip=cfg.grad_clip,
        on_optimizer_step=(None if cfg.scheduler == "step" else scheduler.step),
    )
    tb = TensorBoard(run_uri, storage_kw) if rank == 0 else None
    train_shard = ray.train.get_dataset_shard("train")

    for epoch in range(start_epoch, cfg.epochs):
        step_ctx.epoch = epoch
        torch.manual_seed(cfg.seed + 1000 * epoch + rank)  # dropout etc.: reproducible after a resume
        model.train()
        started, sums, count = time.perf_counter(), {}, 0
        batches = train_shard.iter_batches(
            batch_size=per_worker, batch_format="numpy",
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed + epoch) if cfg.shuffle_buffer else None,
        )
        for batch in batches:
            tensors = method.collate(batch, device)
            terms = method.train_step(model, tensors, step_ctx)
            n = len(batch["label"])
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value * n
            count += n
            if tb is not None:
                tb.scalars({f"step/{k}": v for k, v in terms.items()}, step_ctx.global_step)
        if cfg.scheduler == "step":
            scheduler.step()
        train_terms = _mean_over_ranks(sums, count, device)
        epoch_seconds = time.perf_counter() - started
        samples = int(distributed.all_reduce_sum(torch.tensor([count], device=device)).item())

        metrics: dict[str, Any] = {"epoch": epoch, "global_step": step_ctx.global_step,
                                   "train_samples_per_s": samples / max(epoch_seconds, 1e-9),
                                   **{f"train_{k}": v for k, v in train_terms.items()}}
        for group in optimizer.param_groups:
            metrics[f"lr_{group.get('name', 'group')}"] = group["lr"]
        with tempfile.TemporaryDirectory(prefix="umaf-ckpt-") as folder:
            ckpt = None
            if rank == 0:
                dev = evaluate(method, module, ray.train.get_dataset_shard("dev").iter_batches(
                    batch_size=cfg.eval_batch_size, batch_format="numpy"), device, step_ctx.autocast)
                dev_metrics = classification_metrics(dev["label"], dev["pred"], label_names)
                metrics.update(scalar_metrics(dev_metrics, "dev_"))
                value = metrics.get(f"dev_{best_metric}", -math.inf)
                if value > best_value:
                    best_value, best_epoch = value, epoch
                    save_best(run_uri, module, {"epoch": epoch, "metric": best_metric, "value": value,
                                                "dev": dev_metrics, **method.model_card(cfg)}, **storage_kw)
                state = {"next_epoch": epoch + 1, "global_step": step_ctx.global_step,
                         "best_value": best_value, "best_epoch": best_epoch}
                save_checkpoint_dir(folder, module, optimizer, scheduler, state)
                ckpt = ray.train.Checkpoint.from_directory(folder)
                metrics["best_epoch"] = best_epoch
                metrics[f"best_dev_{best_metric}"] = best_value
                tb.scalars({f"train/{k}": v for k, v in train_terms.items()}, epoch)
                tb.scalars({k.replace("dev_", "dev/", 1): v for k, v in metrics.items() if k.startswith("dev_")}, epoch)
                tb.scalars({f"lr/{k[3:]}": v for k, v in metrics.items() if k.startswith("lr_")}, epoch)
                tb.scalars({"train/samples_per_s": metrics["train_samples_per_s"]}, epoch)
                tb.flush()
                _append_history(run_uri, metrics, storage_kw)
            ray.train.report(metrics, checkpoint=ckpt)

    if rank == 0:
        _finish(cfg, method, module, device, step_ctx, label_names, run_uri, best_metric, storage_kw,
                loop_config, resumed_from, tb)


def _finish(cfg, method, module, device, step_ctx, label_names, run_uri, best_metric, storage_kw,
            loop_config, resumed_from, tb) -> None:
    """Rank 0: test metrics of the best model, predictions, metrics.json."""
    import ray.train

    best_state = load_best(run_uri, module, **storage_kw) or {}
    results: dict[str, Any] = {}
    for split in ("dev", "test"):
        pred = evaluate(method, module, ray.train.get_dataset_shard(split).iter_batches(
            batch_size=cfg.eval_batch_size, batch_format="numpy"), device, step_ctx.autocast)
        results[split] = classification_metrics(pred["label"], pred["pred"], label_names)
        buffer = pa.BufferOutputStream()
        pq.write_table(predictions_table(pred, split, label_names), buffer)
        storage.write_bytes_atomic(storage.join(run_uri, "predictions", f"{split}.parquet"),
                                   buffer.getvalue().to_pybytes(), **storage_kw)
    method_outputs = method.finish(
        module, cfg, lambda split: ray.train.get_dataset_shard(split).iter_batches(
            batch_size=cfg.eval_batch_size, batch_format="numpy"), label_names, device, run_uri, storage_kw)
    summary = {
        "model": cfg.model,
        "dataset": loop_config["dataset"],
        "task": loop_config["task"],
        "labels": label_names,
        "best_metric": best_metric,
        "best_epoch": best_state.get("epoch"),
        "epochs": cfg.epochs,
        "resumed_from_epoch": resumed_from,
        "world_size": distributed.world_size(),
        "dev": results["dev"],
        "test": results["test"],
        "majority_baseline": loop_config.get("majority_baseline"),
        "data": loop_config.get("data_report"),
        "method": method_outputs,
    }
    storage.write_json_atomic(storage.join(run_uri, "metrics.json"), summary, **storage_kw)
    tb.scalars({f"test/{k}": v for k, v in scalar_metrics(results["test"], "").items()}, cfg.epochs)
    tb.close()
