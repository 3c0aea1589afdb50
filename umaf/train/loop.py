"""The Ray Train worker loop shared by every method (runs on each DDP rank).

Per epoch: train on this rank's part of every global batch of the epoch's permutation of the
training split (:mod:`umaf.train.order`; the rows come from the materialised split's blocks, read
zero-copy from the object store), evaluate on ``dev`` (rank 0, whole split, under the reported
evaluation protocol), save the best model by the dev metric, and ``ray.train.report`` metrics with a
checkpoint (model, optimizer, scheduler, epoch). A restarted run (same run folder, or a worker group
restarted by ``FailureConfig``) resumes from ``ray.train.get_checkpoint()``. At the end rank 0
evaluates the best model on dev and test under the reported protocol and, where a pair's prediction
depends on its batch-mates (SPP-SCL), under the other one too, and writes ``metrics.json`` (both, and
the gap), ``predictions/{dev,test}.parquet`` (the reported protocol's; the other's as
``predictions/{dev,test}.<protocol>.parquet``) and TensorBoard scalars into the run folder.

The story on the driver's console (rank 0, plain log lines that ``ray job logs`` shows too): a
step-progress line every ``log_every_s`` seconds of a long epoch (step i/n, loss terms, samples/s,
the epoch's ETA) and one line per epoch (loss terms, dev metric, samples/s, elapsed, the run's ETA).
The loss terms a step returns stay on the device, summed there; they are read (one host sync) only
at those lines and at the end of the epoch, so the GPU never waits for the logging.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from umaf import distributed, storage
from umaf.train.checkpoint import load_best, load_checkpoint_dir, model_card, save_best, save_checkpoint_dir
from umaf.train.config import TrainConfig
from umaf.train.method import Method, StepContext, get_method
from umaf.train.metrics import classification_metrics, scalar_metrics
from umaf.train.order import epoch_batches, source_order, steps_per_epoch

# Train V2 gives the worker's root logger a console handler at INFO: these lines reach the driver.
log = logging.getLogger("umaf.train")


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


def evaluate(method: Method, model: torch.nn.Module, batches, device: torch.device, autocast_ctx,
             context: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Predict every batch in order: ids, labels, predicted labels and class probabilities. With
    ``context`` (numpy rows: the train_context protocol's training pairs) each batch is run with the
    context appended and every row of it predicted with the context alone as batch-mates."""
    ids, labels, probs = [], [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            n = len(batch["id"])
            feed = batch if context is None else {k: np.concatenate([np.asarray(batch[k]), np.asarray(context[k])])
                                                   for k in batch}
            tensors = method.collate(feed, device)
            with autocast_ctx():
                if context is None:
                    logits, _ = method.predict(model, tensors)
                else:
                    logits, _ = method.predict_isolated(model, tensors, n)
            # Stays on the device: one copy at the end instead of a GPU sync per batch.
            probs.append(torch.softmax(logits.float(), dim=-1))
            labels.append(np.asarray(batch["label"], dtype=np.int64))
            ids.extend(str(i) for i in batch["id"])
    model.train(was_training)
    if not ids:
        return {"id": np.array([], dtype=object), "label": np.array([], dtype=np.int64),
                "pred": np.array([], dtype=np.int64), "probs": np.zeros((0, 0))}
    prob = torch.cat(probs).cpu().numpy()
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


class LossSums:
    """Sample-weighted sums of a step's loss terms, kept where they are computed.

    Tensor terms are added on the device (no host sync); plain numbers (a method's constant 0.0 or
    flags) on the host. :meth:`read` copies everything to the host once; :meth:`mean_over_ranks`
    all-reduces the sums and the sample count in one collective at the end of an epoch.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.on_device: dict[str, torch.Tensor] = {}
        self.on_host: dict[str, float] = {}
        self.count = 0

    def add(self, terms: dict[str, Any], n: int) -> None:
        for key, value in terms.items():
            if isinstance(value, torch.Tensor):
                weighted = value.detach().to(torch.float64) * n
                self.on_device[key] = self.on_device[key] + weighted if key in self.on_device else weighted
            else:
                self.on_host[key] = self.on_host.get(key, 0.0) + float(value) * n
        self.count += n

    def _packed(self) -> tuple[list[str], torch.Tensor]:
        keys = sorted(set(self.on_device) | set(self.on_host))
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        device_part = torch.stack([self.on_device.get(k, zero).to(self.device) for k in keys] + [zero])
        host_part = torch.tensor([self.on_host.get(k, 0.0) for k in keys] + [float(self.count)], dtype=torch.float64)
        return keys, device_part + host_part.to(self.device)

    def read(self) -> dict[str, float]:
        """This rank's sums so far, on the host (one sync)."""
        keys, packed = self._packed()
        return dict(zip(keys, packed[:-1].tolist()))

    def mean_over_ranks(self) -> tuple[dict[str, float], int]:
        """Sample-weighted means over all ranks and the total sample count (logging only)."""
        keys, packed = self._packed()
        distributed.all_reduce_sum(packed)
        values = packed.tolist()
        total = max(1.0, values[-1])
        return {k: v / total for k, v in zip(keys, values[:-1])}, int(values[-1])


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _f1s_text(metrics: dict[str, Any], prefix: str) -> str:
    """The F1s side by side: sklearn's weighted and macro F1, and the UMAF paper's (weighted P/R's harmonic mean)."""
    names = (("weighted_f1", "weighted F1"), ("macro_f1", "macro F1"), ("f1_of_weighted_pr", "F1 of weighted P/R"))
    return ", ".join(f"{label} {metrics[prefix + key]:.4f}" for key, label in names if prefix + key in metrics)


def _terms_text(terms: dict[str, float]) -> str:
    ordered = (["loss"] if "loss" in terms else []) + sorted(k for k in terms if k != "loss")
    return " ".join(f"{k} {terms[k]:.4g}" for k in ordered)


class StepProgress:
    """Rank 0's step-progress lines and TensorBoard step scalars, at most every ``every_s`` seconds."""

    def __init__(self, sums: LossSums, every_s: float, epoch: int, epochs: int, steps: int, world: int,
                 tb: TensorBoard | None):
        self.sums, self.every_s, self.tb = sums, every_s, tb
        self.epoch, self.epochs, self.steps, self.world = epoch, epochs, steps, world
        self.started = self.last = time.perf_counter()
        self.last_values: dict[str, float] = {}
        self.last_count = 0

    def step(self, step: int, global_step: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self._emit(step, global_step, now, line=True)

    def epoch_end(self, step: int, global_step: int) -> None:
        """The epoch's last interval into TensorBoard (short epochs get one point each)."""
        if self.sums.count > self.last_count:
            self._emit(step, global_step, time.perf_counter(), line=False)

    def _emit(self, step: int, global_step: int, now: float, line: bool) -> None:
        values = self.sums.read()  # the one host sync of the interval
        n = self.sums.count - self.last_count
        interval = {k: (v - self.last_values.get(k, 0.0)) / max(1, n) for k, v in values.items()}
        if self.tb is not None:
            self.tb.scalars({f"step/{k}": v for k, v in interval.items()}, global_step)
        if line:
            elapsed = now - self.started
            rate = self.sums.count * self.world / max(elapsed, 1e-9)  # equal shards: every rank runs alike
            eta = elapsed / max(step, 1) * max(0, self.steps - step)
            log.info("epoch %d/%d step %d/%d (%d%%) | %s | %.1f samples/s | epoch ETA %s", self.epoch + 1,
                     self.epochs, step, self.steps, 100 * step // max(1, self.steps), _terms_text(interval),
                     rate, _duration(eta))
        self.last, self.last_values, self.last_count = now, values, self.sums.count


def numpy_batch(table: pa.Table, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of a materialised split (by position) as the numpy batch Ray Data would give."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(table.take(pa.array(np.asarray(rows, dtype=np.int64)))).to_batch_format("numpy")


def split_table(refs: list) -> pa.Table:
    """A materialised split from its block references: on this node, zero-copy from the object store."""
    import ray

    tables = ray.get(list(refs))
    return pa.concat_tables(tables) if tables else pa.table({})


def train_batches(table: pa.Table, parts: list[np.ndarray], method: Method, device: torch.device, prefetch: int,
                  pin: bool):
    """This rank's batches of an epoch, collated (and pinned) ``prefetch`` batches ahead in a thread while
    the step runs, then copied to the device."""
    from concurrent.futures import ThreadPoolExecutor

    cpu = torch.device("cpu")

    def make(rows: np.ndarray) -> dict[str, torch.Tensor]:
        tensors = method.collate(numpy_batch(table, rows), cpu)
        return {k: v.pin_memory() for k, v in tensors.items()} if pin else tensors

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="umaf-batches") as pool:
        pending = [pool.submit(make, rows) for rows in parts[: prefetch + 1]]
        for index in range(len(parts)):
            tensors = pending.pop(0).result()
            if index + prefetch + 1 < len(parts):
                pending.append(pool.submit(make, parts[index + prefetch + 1]))
            yield {k: v.to(device, non_blocking=pin) for k, v in tensors.items()}


class EvalSplits:
    """Rank 0's dev/test evaluation under a protocol (:mod:`umaf.train.order`), from the materialised splits."""

    def __init__(self, method: Method, cfg: TrainConfig, loop_config: dict[str, Any], tables: dict[str, pa.Table]):
        self.method, self.cfg, self.tables = method, cfg, tables
        self.batch_dependent = method.eval_depends_on_batch(cfg)
        self.source_order = {}
        for split, positions in loop_config.get("source_positions", {}).items():
            ids = tables[split]["id"].to_pylist()
            self.source_order[split] = source_order([positions.get(i) for i in ids])
        self.context = None
        context_ids = (loop_config.get("context") or {}).get("ids")
        if self.batch_dependent and context_ids:
            where = {pair_id: row for row, pair_id in enumerate(tables["train"]["id"].to_pylist())}
            self.context = numpy_batch(tables["train"], np.array([where[i] for i in context_ids]))

    def batches(self, split: str, protocol: str):
        table, size = self.tables[split], self.cfg.eval_batch_size
        order = self.source_order.get(split) if protocol == "official_order" else None
        order = np.arange(table.num_rows) if order is None else order
        for start in range(0, len(order), size):
            yield numpy_batch(table, order[start:start + size])

    def evaluate(self, module: torch.nn.Module, split: str, protocol: str, device: torch.device, autocast_ctx):
        context = self.context if protocol == "train_context" and self.batch_dependent else None
        return evaluate(self.method, module, self.batches(split, protocol), device, autocast_ctx, context)


def device_name(device: torch.device) -> str:
    """``cuda (NVIDIA H200)`` or ``cpu``: what a run records it trained on."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def device_memory(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory this process allocated so far (MiB): proof the work ran on the GPU, and its size."""
    if device.type != "cuda":
        return {}
    return {"cuda_peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20}


def _read_history(run_uri: str, storage_kw: dict[str, Any]) -> list[dict[str, Any]]:
    """``<run>/history.json`` (every epoch's reported metrics), or [] before the first epoch."""
    uri = storage.join(run_uri, "history.json")
    return storage.read_json(uri, **storage_kw) if storage.exists(uri, **storage_kw) else []


def _append_history(run_uri: str, metrics: dict[str, Any], storage_kw: dict[str, Any]) -> list[dict[str, Any]]:
    """Add an epoch to ``<run>/history.json`` (a resumed run drops epochs it redoes)."""
    uri = storage.join(run_uri, "history.json")
    history = _read_history(run_uri, storage_kw)
    history = [h for h in history if h.get("epoch", -1) < metrics["epoch"]] + [metrics]
    storage.write_json_atomic(uri, history, **storage_kw)
    return history


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.data
    import ray.train
    import ray.train.torch

    # The story on the driver's console is ours: not Ray Data's per-iteration INFO lines (its
    # progress, logged at INFO in a worker, included), nor torch's warning about Ray's read-only
    # batch arrays (collate only reads them), nor Ray Train's INFO line for every report, which it
    # logs through a logger named after its module's file (RunConfig's LoggingConfig filters only
    # "ray.train.*" names).
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: only the per-report lines come back
        pass
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
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
    # Every epoch is a full permutation of the training split, cut into global batches; each rank runs
    # its part of every one (umaf.train.order), so all ranks take the same number of steps.
    train_table = split_table(loop_config["refs"]["train"])
    n_train = train_table.num_rows
    steps = max(1, steps_per_epoch(n_train, cfg.batch_size, world))
    scheduler = build_scheduler(optimizer, cfg, steps)

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
        autocast_dtype=torch.bfloat16 if on_gpu and cfg.resolved_precision == "bf16" else None, grad_clip=cfg.grad_clip,
        on_optimizer_step=(None if cfg.scheduler == "step" else scheduler.step),
    )
    tb = TensorBoard(run_uri, storage_kw) if rank == 0 else None
    eval_splits = None
    if rank == 0:
        tables = {"train": train_table, **{split: split_table(loop_config["refs"][split]) for split in ("dev", "test")}}
        eval_splits = EvalSplits(method, cfg, loop_config, tables)

    run_started, epochs_run = time.perf_counter(), 0
    exported = False  # the method's export files (tokenizer, configs) go into best/ once per process
    if rank == 0:
        log.info("training %s: %d epochs (from epoch %d), %d train rows, %d worker(s) on %s, global batch %d, "
                 "%d steps per epoch", cfg.model, cfg.epochs, start_epoch + 1, n_train, world,
                 device.type, cfg.batch_size, steps)
    for epoch in range(start_epoch, cfg.epochs):
        step_ctx.epoch = epoch
        torch.manual_seed(cfg.seed + 1000 * epoch + rank)  # dropout etc.: reproducible after a resume
        model.train()
        epoch_started, epoch_started_at = time.perf_counter(), time.time()
        sums = LossSums(device)
        progress = StepProgress(sums, cfg.log_every_s, epoch, cfg.epochs, steps, world, tb) if rank == 0 else None
        # This rank's part of each global batch of the epoch's permutation; a thread collates (the
        # method's numpy → tensors) and, on a GPU, pins the next batches while this thread runs the step.
        parts = epoch_batches(n_train, cfg.batch_size, world, rank, cfg.seed, epoch)
        batches = train_batches(train_table, parts, method, device, cfg.prefetch_batches, pin=on_gpu)
        step, data_wait = 0, 0.0
        batch_iter = iter(batches)
        while True:
            # Time blocked waiting for the next batch (the first includes the epoch's data start-up):
            # near 0 when the prefetch thread keeps ahead of the step; the share of the epoch it takes
            # is the input-bound part of the run.
            waited = time.perf_counter()
            tensors = next(batch_iter, None)
            data_wait += time.perf_counter() - waited
            if tensors is None:
                break
            step += 1
            terms = method.train_step(model, tensors, step_ctx)
            sums.add(terms, int(tensors["labels"].shape[0]))
            if progress is not None:
                progress.step(step, step_ctx.global_step)
        if progress is not None:
            progress.epoch_end(step, step_ctx.global_step)
        if cfg.scheduler == "step":
            scheduler.step()
        train_terms, samples = sums.mean_over_ranks()
        method_values, notes = method.end_epoch(cfg, epoch)  # SPP-SCL: step2_fire_rate
        train_terms.update(method_values)
        for note in notes if rank == 0 else []:
            log.warning(note)
        train_seconds = time.perf_counter() - epoch_started

        # Wall-clock bounds of the training iterations (not eval): benches read GPU busy samples
        # inside them, and concurrent Tune trials prove they overlapped from these alone.
        metrics: dict[str, Any] = {"epoch": epoch, "global_step": step_ctx.global_step,
                                   "train_samples_per_s": samples / max(train_seconds, 1e-9),
                                   "train_started_at": epoch_started_at, "train_ended_at": epoch_started_at + train_seconds,
                                   "train_data_wait_s": data_wait,
                                   **device_memory(device),
                                   **{f"train_{k}": v for k, v in train_terms.items()}}
        for group in optimizer.param_groups:
            metrics[f"lr_{group.get('name', 'group')}"] = group["lr"]
        with tempfile.TemporaryDirectory(prefix="umaf-ckpt-") as folder:
            ckpt = None
            if rank == 0:
                dev = eval_splits.evaluate(module, "dev", cfg.eval.protocol, device, step_ctx.autocast)
                dev_metrics = classification_metrics(dev["label"], dev["pred"], label_names)
                metrics.update(scalar_metrics(dev_metrics, "dev_"))
                value = metrics.get(f"dev_{best_metric}", -math.inf)
                if value > best_value:
                    best_value, best_epoch = value, epoch
                    _save_best(cfg, method, module, loop_config, best_metric, storage_kw, exported,
                               {"epoch": epoch, "metric": best_metric, "value": value, "dev": dev_metrics,
                                **method.model_card(cfg)})
                    exported = True
                state = {"next_epoch": epoch + 1, "global_step": step_ctx.global_step,
                         "best_value": best_value, "best_epoch": best_epoch}
                save_checkpoint_dir(folder, module, optimizer, scheduler, state)
                ckpt = ray.train.Checkpoint.from_directory(folder)
                metrics["best_epoch"] = best_epoch
                metrics[f"best_dev_{best_metric}"] = best_value
                tb.scalars({f"train/{k}": v for k, v in train_terms.items()}, epoch)
                tb.scalars({k.replace("dev_", "dev/", 1): v for k, v in metrics.items() if k.startswith("dev_")}, epoch)
                tb.scalars({f"lr/{k[3:]}": v for k, v in metrics.items() if k.startswith("lr_")}, epoch)
                tb.scalars({"train/samples_per_s": metrics["train_samples_per_s"],
                            "train/data_wait_s": metrics["train_data_wait_s"]}, epoch)
                tb.flush()
                _append_history(run_uri, metrics, storage_kw)
            ray.train.report(metrics, checkpoint=ckpt)
        epochs_run += 1
        if rank == 0:
            now = time.perf_counter()
            elapsed = now - run_started
            eta = elapsed / epochs_run * (cfg.epochs - epoch - 1)
            log.info("epoch %d/%d | train %s | dev %s %.4f (best %.4f, epoch %d; %s) | %.1f samples/s | "
                     "epoch %s (eval+checkpoint %s) | elapsed %s | ETA %s", epoch + 1, cfg.epochs,
                     _terms_text(train_terms), best_metric, metrics.get(f"dev_{best_metric}", float("nan")),
                     best_value, best_epoch + 1, _f1s_text(metrics, "dev_"), metrics["train_samples_per_s"],
                     _duration(now - epoch_started), _duration(now - epoch_started - train_seconds),
                     _duration(elapsed), _duration(eta))

    if epochs_run == 0 and resumed_from is not None:
        # Resumed from the last epoch's checkpoint (the driver died during the final test pass): no
        # epoch reports, so hand the last one on again. A Tune trial that reports nothing fails
        # Tune's metric check, and its sweep with it.
        history = _read_history(run_uri, storage_kw) if rank == 0 else []
        ray.train.report(history[-1] if history else {})

    if rank == 0:
        _finish(cfg, method, module, device, step_ctx, label_names, run_uri, best_metric, storage_kw,
                loop_config, resumed_from, tb, eval_splits)


def _save_best(cfg: TrainConfig, method: Method, module: torch.nn.Module, loop_config: dict[str, Any],
               best_metric: str, storage_kw: dict[str, Any], exported: bool, state: dict[str, Any]) -> None:
    """``<run>/best/``: the weights and state, the model card, and (first time) the method's files."""
    card = model_card(cfg, loop_config["label_names"], loop_config["task"], loop_config["dataset"], best_metric,
                      method.model_card(cfg))
    if method.eval_depends_on_batch(cfg):
        # How the predict job batches this model as the run evaluated it: under train_context, with these
        # training pairs (raw rows: the predict job computes their features as its own rows').
        card["eval"] = {"protocol": cfg.eval.protocol, "batch_size": cfg.eval_batch_size,
                        "context_rows": (loop_config.get("context") or {}).get("rows") or []}
    with tempfile.TemporaryDirectory(prefix="umaf-export-") as files:
        if not exported:
            method.export_files(module, cfg, Path(files))
        save_best(loop_config["run_uri"], module, state, card=card, files=None if exported else Path(files),
                  **storage_kw)


GAP_METRICS = ("accuracy", "weighted_f1", "macro_f1", "f1_of_weighted_pr", "weighted_precision", "weighted_recall")


def _finish(cfg, method, module, device, step_ctx, label_names, run_uri, best_metric, storage_kw,
            loop_config, resumed_from, tb, eval_splits: EvalSplits) -> None:
    """Rank 0: dev/test metrics of the best model under the reported protocol (and the other one, with
    the gap, where batch-mates matter), predictions, metrics.json."""
    import ray.train  # noqa: F401 - the loop runs inside Ray Train

    best_state = load_best(run_uri, module, **storage_kw) or {}
    default = cfg.eval.protocol
    other = "official_order" if default == "train_context" else "train_context"
    compare = eval_splits.batch_dependent and cfg.eval.compare
    results: dict[str, dict[str, Any]] = {default: {}, other: {}}
    for protocol in (default, other) if compare else (default,):
        for split in ("dev", "test"):
            if protocol == default:
                method.observe_eval(split)
            pred = eval_splits.evaluate(module, split, protocol, device, step_ctx.autocast)
            method.observe_eval(None)
            results[protocol][split] = classification_metrics(pred["label"], pred["pred"], label_names)
            # The reported protocol's predictions keep their names (experiments read them); the other's
            # go beside them as <split>.<protocol>.parquet.
            name = f"{split}.parquet" if protocol == default else f"{split}.{protocol}.parquet"
            buffer = pa.BufferOutputStream()
            pq.write_table(predictions_table(pred, split, label_names), buffer)
            storage.write_bytes_atomic(storage.join(run_uri, "predictions", name), buffer.getvalue().to_pybytes(),
                                       **storage_kw)
    method_outputs = method.finish(module, cfg, lambda split: eval_splits.batches(split, "official_order"), label_names,
                                   device, run_uri, storage_kw)
    eval_facts: dict[str, Any] = {
        "protocol": default, "eval_batch_size": cfg.eval_batch_size, "batch_dependent": eval_splits.batch_dependent,
        "official_order_from": loop_config.get("official_order_from"),
        "context": ({"training_pairs": len(eval_splits.context["id"]), "seed": cfg.seed}
                    if eval_splits.context is not None else None),
    }
    if compare:
        other_protocol = {"protocol": other, "dev": results[other]["dev"], "test": results[other]["test"],
                          "predictions": {split: f"predictions/{split}.{other}.parquet" for split in ("dev", "test")}}
        sign = 1 if other == "official_order" else -1  # the gap is always official_order minus train_context
        gap = {split: {k: sign * (results[other][split][k] - results[default][split][k]) for k in GAP_METRICS}
               for split in ("dev", "test")}
    else:
        why = ("predictions do not depend on batch-mates" if not eval_splits.batch_dependent
               else "eval.compare=false")
        other_protocol = {"protocol": other, "computed": False, "why": why,
                          "same_as_reported": not eval_splits.batch_dependent}
        gap = {split: ({k: 0.0 for k in GAP_METRICS} if not eval_splits.batch_dependent else None)
               for split in ("dev", "test")}
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
        "device": device_name(device),
        **device_memory(device),
        "eval": eval_facts,
        "dev": results[default]["dev"],
        "test": results[default]["test"],
        "other_protocol": other_protocol,
        "protocol_gap": {"definition": "official_order minus train_context", **gap},
        "majority_baseline": loop_config.get("majority_baseline"),
        "data": loop_config.get("data_report"),
        "method": method_outputs,
    }
    storage.write_json_atomic(storage.join(run_uri, "metrics.json"), summary, **storage_kw)
    tb.scalars({f"test/{k}": v for k, v in scalar_metrics(results[default]["test"], "").items()}, cfg.epochs)
    if compare:
        tb.scalars({f"test_{other}/{k}": v for k, v in scalar_metrics(results[other]["test"], "").items()}, cfg.epochs)
    tb.close()
