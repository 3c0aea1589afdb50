"""The plug-in interface between a method (UMAF, SPP-SCL) and the shared Ray Train loop.

The loop (:mod:`umaf.train.loop`) owns everything methods have in common: reading the manifest,
Ray Train workers and DDP, the optimizer and LR schedule, checkpoints and resume, dev/test evaluation,
metrics, predictions and TensorBoard. A method supplies only what differs, through :class:`Method`:

=====================  =========================================================================
``prepare_table``      driver side, plain pyarrow: add/join what the method needs to the manifest
                       rows (UMAF: the caption text by id) and return counts for the run report
``preprocess``         Ray Data: rows → model-ready columns (token ids, image tensors or cached
                       frozen features). Runs once per run, before training; must keep ``id`` and
                       ``label`` columns
``build_model``        plain ``torch.nn.Module`` (no Ray) for ``num_classes`` classes
``param_groups``       optimizer parameter groups, each ``{"name", "params", "lr"}`` (e.g. pretrained
                       encoder vs new layers); frozen parameters left out
``collate``            a numpy batch from Ray Data → tensors on the device
``train_step``         one batch: forward, loss(es), and *its own* backward + optimizer step(s) through
                       ``ctx.backward_step(loss)`` — SPP-SCL calls it twice per batch (Algorithm 1);
                       returns its loss terms for logging as detached 0-d tensors (the loop sums
                       them on the device and reads them once per logging interval: no
                       ``float()``/``.item()`` here, which would make the host wait for the GPU)
``predict``            eval-mode forward → ``(logits [B, C], features [B, d])``
``export_files``       tokenizer and configs copied into ``<run>/best/`` beside the weights, for
                       ``umaf.models.load_run`` and the predict job
=====================  =========================================================================

Under DDP ``model`` given to ``train_step`` is the DDP wrapper: call ``model(**inputs)`` (so
gradients are all-reduced) and use :mod:`umaf.distributed` to gather batch-level loss inputs across
ranks. Any decision that changes the number of backward passes (SPP-SCL's second step) must be
taken from globally reduced values so that every rank takes the same branch (else DDP deadlocks).

Register a method in :data:`METHODS` as ``"name": "module:Class"``; it is imported lazily so that a
method's heavy or unfinished dependencies never break the other.
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from umaf.train.config import TrainConfig

METHODS: dict[str, str] = {
    "umaf": "umaf.train.umaf_method:UmafMethod",
    "sppscl": "umaf.train.sppscl_method:SppSclMethod",
}


def get_method(name: str) -> Method:
    """Instantiate the registered method ``name`` (imports its module on first use)."""
    if name not in METHODS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(METHODS)}")
    module_name, _, class_name = METHODS[name].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)()


@dataclass
class StepContext:
    """What a ``train_step`` needs from the loop: device, precision, and the optimizer step itself."""

    optimizer: torch.optim.Optimizer
    device: torch.device
    config: TrainConfig
    epoch: int = 0
    global_step: int = 0  # optimizer steps taken so far (counts both SPP-SCL steps)
    autocast_dtype: torch.dtype | None = None  # bf16 on GPU; None = full precision
    grad_clip: float | None = None
    on_optimizer_step: Callable[[], None] | None = None  # the loop's per-step LR schedule
    last_grad_norm: torch.Tensor | float = field(default=float("nan"))  # a tensor: reading it syncs the device
    # After each optimizer step: None (PyTorch >= 2's default: parameters without a gradient in the next
    # backward are skipped by the optimizer) or zero tensors (PyTorch 1.x's default: AdamW still moves them
    # by momentum and weight decay). SPP-SCL's compat=official sets zeros, as the released code ran.
    zero_grad_set_to_none: bool = True

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for the forward pass (bf16 needs no loss scaling)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def backward_step(self, loss: torch.Tensor, params: list[torch.nn.Parameter] | None = None) -> None:
        """``loss.backward()``, clip the global grad norm, ``optimizer.step()``, zero grads, LR schedule."""
        loss.backward()
        if self.grad_clip:
            if params is None:
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.last_grad_norm = norm.detach()  # not float(norm): that would sync the GPU every step
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.zero_grad_set_to_none)
        self.global_step += 1
        if self.on_optimizer_step is not None:
            self.on_optimizer_step()


@dataclass
class PreparedTable:
    """``prepare_table``'s result: rows for every split, plus counts for the run's data report."""

    table: pa.Table
    report: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    name: str = ""

    def prepare_table(self, table: pa.Table, cfg: TrainConfig, label_column: str) -> PreparedTable:
        """Manifest rows (all splits) → the rows this method trains on. Default: unchanged."""
        return PreparedTable(table)

    @abstractmethod
    def preprocess(self, ds: ray.data.Dataset, cfg: TrainConfig, split: str) -> ray.data.Dataset:
        """Rows with ``id``, ``label`` and the prepared columns → model-ready columns (+ ``id``, ``label``)."""

    def preprocess_splits(self, datasets: dict[str, ray.data.Dataset], cfg: TrainConfig) -> dict[str, ray.data.Dataset]:
        """Every split at once (the driver calls this): a method whose preprocessing loads models can
        load them once for all splits. Default: :meth:`preprocess` per split."""
        return {split: self.preprocess(ds, cfg, split) for split, ds in datasets.items()}

    @abstractmethod
    def build_model(self, cfg: TrainConfig, num_classes: int) -> torch.nn.Module: ...

    def param_groups(self, model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
        """Default: one group of all trainable parameters at ``cfg.lr``."""
        return [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]

    @abstractmethod
    def collate(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        """Numpy batch → tensors on ``device``; must include ``labels`` (int64)."""

    @abstractmethod
    def train_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor | float]:
        """Forward, loss, ``ctx.backward_step(loss)`` (once or more); returns loss terms for logging
        (detached tensors, left on the device; plain floats only for host-side constants)."""

    @abstractmethod
    def predict(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval forward (the loop sets eval mode and no_grad): ``(logits, features)``."""

    def end_epoch(self, cfg: TrainConfig, epoch: int) -> tuple[dict[str, float], list[str]]:
        """Every rank, after an epoch's last step: ``(values, notes)``. The values join the epoch's train
        terms (``history.json`` as ``train_<name>``, TensorBoard ``train/<name>``, the epoch line); each
        note is logged once as a warning by rank 0 (SPP-SCL: the step-2 fire rate and its warning)."""
        return {}, []

    def eval_depends_on_batch(self, cfg: TrainConfig) -> bool:
        """Whether a pair's eval prediction depends on its batch-mates (SPP-SCL's CMF attends across the
        batch): then the evaluation protocols differ, and both are reported (:mod:`umaf.train.order`)."""
        return False

    def predict_isolated(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                         n_query: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n_query`` rows' ``(logits, features)``, each row predicted as if its only batch-mates
        were the rows after ``n_query`` (the train_context protocol's training pairs). Default: a method
        whose rows do not see each other needs nothing more than :meth:`predict`."""
        logits, features = self.predict(model, batch)
        return logits[:n_query], features[:n_query]

    def observe_eval(self, split: str | None) -> None:
        """Rank 0's final evaluation says which split its next ``predict`` calls belong to (None: done), so
        a method can record something from the same forward passes (UMAF: Figure 3's attention on test)."""

    def find_unused_parameters(self, cfg: TrainConfig) -> bool:
        """Whether DDP must tolerate parameters without gradient in a step."""
        return False

    def model_card(self, cfg: TrainConfig) -> dict[str, Any]:
        """Method-specific facts written next to the checkpoint (e.g. tokenizer path)."""
        return {}

    def export_files(self, model: torch.nn.Module, cfg: TrainConfig, folder: Path) -> None:
        """Write into ``folder`` what, besides the weights and the model card, a user needs to run the
        model outside Ray (tokenizer, encoder and processor configs); it is copied into ``<run>/best/``
        with the first best model of a training process. Default: nothing."""

    def finish(self, model: torch.nn.Module, cfg: TrainConfig, split_batches: Callable[[str], Any],
               label_names: list[str], device: torch.device, run_uri: str, storage_kw: dict[str, Any]) -> dict[str, Any]:
        """Rank 0, after the test evaluation of the best model: write method-specific outputs into the
        run folder (SPP-SCL: distance diagnostics, t-SNE). ``split_batches(split)`` iterates a split's
        numpy batches in evaluation order. The returned dict goes into ``metrics.json`` under ``method``."""
        return {}


def iter_device_batches(batches: Iterator[dict[str, np.ndarray]], method: Method, device: torch.device) -> Iterator[tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]]:
    for batch in batches:
        yield batch, method.collate(batch, device)
