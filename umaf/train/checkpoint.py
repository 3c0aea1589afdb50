"""What a checkpoint holds (model, optimizer, scheduler, loop state) and the run folder's other files.

A checkpoint folder: ``model.pt`` (the unwrapped model's ``state_dict``), ``optimizer.pt``,
``scheduler.pt``, ``state.json`` (next epoch, optimizer steps, best dev metric so far).
The best model by the dev metric is also written to ``<run>/best/model.pt`` with ``best/state.json``,
so the test evaluation (and later inference) finds it without knowing Ray's checkpoint names.
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


def save_best(run_uri: str, model: torch.nn.Module, state: dict[str, Any], **storage_kw) -> None:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    storage.write_bytes_atomic(storage.join(run_uri, "best", "model.pt"), buffer.getvalue(), **storage_kw)
    storage.write_json_atomic(storage.join(run_uri, "best", STATE_FILE), state, **storage_kw)


def load_best(run_uri: str, model: torch.nn.Module, **storage_kw) -> dict[str, Any] | None:
    """Load ``<run>/best/model.pt`` into ``model``; None if the run has no best model yet."""
    uri = storage.join(run_uri, "best", "model.pt")
    if not storage.exists(uri, **storage_kw):
        return None
    data = storage.read_bytes(uri, **storage_kw)
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return storage.read_json(storage.join(run_uri, "best", STATE_FILE), **storage_kw)
