"""The models (plain ``torch.nn``, no Ray) and :func:`load_run`, a finished run as a model that predicts."""

from __future__ import annotations

from typing import Any


def load_run(run_uri: str, device: str = "cpu", **storage_kw: Any):
    """A trained run's best model (``<run>/best/``) as a plain ``torch.nn.Module`` that predicts:
    ``load_run(uri).predict(texts, captions=...)`` (UMAF) or ``.predict(texts, images=...)`` (SPP-SCL).
    See :mod:`umaf.predict.model`."""
    from umaf.predict.model import load_run as _load_run

    return _load_run(run_uri, device=device, **storage_kw)


__all__ = ["load_run"]
