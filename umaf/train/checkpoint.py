"""What a checkpoint holds (model, optimizer, scheduler, loop state) and the run folder's other files.

A checkpoint folder: ``model.pt`` (the unwrapped model's ``state_dict``), ``optimizer.pt``,
``scheduler.pt``, ``state.json`` (next epoch, optimizer steps, best dev metric so far).
The best model by the dev metric is also written to ``<run>/best/``, so the test evaluation, the
predict job and users outside Ray find it without knowing Ray's checkpoint names. ``best/`` is the
run's export:

- ``model.safetensors``: the weights (what trains: SPP-SCL's frozen encoders are named, not saved);
- ``model.json``: the model card: method, task, label names, the run's whole train config (so the
  preprocessing, the caption policy and the evaluation batch size are the run's), file list;
- ``state.json``: epoch and dev metrics of this model;
- the method's files (:meth:`umaf.train.method.Method.export_files`): tokenizer, encoder/processor
  configs.

``umaf.models.load_run(run_uri)`` loads it into a plain ``torch.nn.Module`` that predicts. Runs
written before the export have ``best/model.pt`` (a torch ``state_dict``); it still loads.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from umaf import storage

STATE_FILE = "state.json"


def save_checkpoint_dir(folder: str | Path, model: torch.nn.Module, optimizer, scheduler, state: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_checkpoint_dir(folder: str | Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    folder = Path(folder)
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    return json.loads((folder / STATE_FILE).read_text())


WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "model.pt"
CARD_FILE = "model.json"
CARD_FORMAT = 1


def weights_bytes(model: torch.nn.Module) -> bytes:
    """The model's ``state_dict`` as safetensors bytes (tensors copied: safetensors refuses shared storage)."""
    from safetensors.torch import save

    return save({name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()})


def model_card(cfg, label_names: list[str], task: str, dataset: str, best_metric: str, facts: dict[str, Any]) -> dict[str, Any]:
    """``best/model.json``: what a user (or the predict job) needs to rebuild and feed the model."""
    return {
        "format": CARD_FORMAT,
        "method": cfg.model,
        "task": task,
        "dataset": dataset,
        "labels": list(label_names),
        "best_metric": best_metric,
        "weights": WEIGHTS_FILE,
        "eval_batch_size": cfg.eval_batch_size,
        "method_facts": facts,
        "train_config": cfg.model_dump(mode="json"),
    }


def save_best(run_uri: str, model: torch.nn.Module, state: dict[str, Any], card: dict[str, Any] | None = None,
              files: Path | None = None, **storage_kw) -> None:
    """Write ``<run>/best/``: weights, state, and (when given) the model card and a local folder of
    the method's export files (tokenizer, configs), uploaded as they are."""
    best = storage.join(run_uri, "best")
    if files is not None:
        storage.upload_dir(files, best, **storage_kw)
    storage.write_bytes_atomic(storage.join(best, WEIGHTS_FILE), weights_bytes(model), **storage_kw)
    storage.write_json_atomic(storage.join(best, STATE_FILE), state, **storage_kw)
    if card is not None:
        storage.write_json_atomic(storage.join(best, CARD_FILE), card, **storage_kw)


def read_weights(best_uri: str, **storage_kw) -> dict[str, torch.Tensor] | None:
    """The ``state_dict`` in a ``best/`` folder (safetensors, or an older run's ``model.pt``); None if absent."""
    uri = storage.join(best_uri, WEIGHTS_FILE)
    if storage.exists(uri, **storage_kw):
        from safetensors.torch import load

        return load(storage.read_bytes(uri, **storage_kw))
    uri = storage.join(best_uri, LEGACY_WEIGHTS_FILE)
    if storage.exists(uri, **storage_kw):
        return torch.load(io.BytesIO(storage.read_bytes(uri, **storage_kw)), map_location="cpu", weights_only=True)
    return None


def has_best(run_uri: str, **storage_kw) -> bool:
    best = storage.join(run_uri, "best")
    return any(storage.exists(storage.join(best, name), **storage_kw) for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE))


def load_best(run_uri: str, model: torch.nn.Module, **storage_kw) -> dict[str, Any] | None:
    """Load ``<run>/best``'s weights into ``model``; None if the run has no best model yet."""
    state = read_weights(storage.join(run_uri, "best"), **storage_kw)
    if state is None:
        return None
    model.load_state_dict(state)
    return storage.read_json(storage.join(run_uri, "best", STATE_FILE), **storage_kw)
