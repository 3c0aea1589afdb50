"""A finished run's best model as a plain ``torch.nn.Module`` that predicts: no Ray, no run folder
knowledge needed by the caller.

    from umaf.models import load_run
    model = load_run("outputs/pipeline/runs/train")           # a local folder or s3://...
    model.predict(["What a day!"], captions=[{"ocr": "", "visual_scene": "a smiling face", "textimage_relation": "agree"}])

What it reads is the run's export, ``<run>/best/`` (:mod:`umaf.train.checkpoint`): the safetensors
weights, the model card ``model.json`` (method, label names, the run's whole train config) and the
method's files (tokenizer, encoder config). Preprocessing is the training's own code, not a copy:

- UMAF: ``[T; T_vlm]`` tokenised by :func:`umaf.train.umaf_method.tokenize_batch` with the run's
  tokenizer, ``max_length`` and caption field shares; the encoder is rebuilt from ``encoder/config.json``
  and the fine-tuned weights (nothing is downloaded).
- SPP-SCL: the frozen encoders load by the names in the card (as in training); a run trained on the
  frozen-feature cache gets its features through the cache builder's own encoder
  (:class:`umaf.train.feature_cache.FrozenFeatureEncoder`, fp16 as stored), one without it through
  :func:`umaf.train.sppscl_method.raw_inputs_batch`. CMF attends across the batch, so
  :meth:`RunModel.predict_proba` follows the run's evaluation protocol: ``train_context`` (the
  default) predicts each row with the run's training pairs as its only batch-mates; ``official_order``
  runs the rows in the order given, in consecutive batches of ``eval_batch_size``.

Then the method's own ``collate`` and ``predict`` (what the training loop's ``evaluate`` runs).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from umaf import storage
from umaf.errors import UserError
from umaf.train.checkpoint import CARD_FILE, LEGACY_WEIGHTS_FILE, STATE_FILE, WEIGHTS_FILE, read_weights
from umaf.train.config import TrainConfig
from umaf.train.method import get_method

log = logging.getLogger("umaf.predict")

CAPTION_FIELD_NAMES = ("ocr", "visual_scene", "textimage_relation")


def read_card(run_uri: str, **storage_kw) -> dict[str, Any]:
    """The run's model card (``best/model.json``); for a run written before the export, the same facts
    from ``config.yaml`` and ``metrics.json``. A :class:`UserError` when the run has no best model."""
    import yaml

    best = storage.join(run_uri, "best")
    storage.require(run_uri, "run folder", "train one with jobs/train.py, or fix --run", **storage_kw)
    card_uri = storage.join(best, CARD_FILE)
    if storage.exists(card_uri, **storage_kw):
        return storage.read_json(card_uri, **storage_kw)
    metrics_uri = storage.join(run_uri, "metrics.json")
    if not storage.exists(storage.join(best, LEGACY_WEIGHTS_FILE), **storage_kw) or not storage.exists(metrics_uri, **storage_kw):
        raise UserError(f"run {run_uri} has no finished best model ({card_uri} is missing): let its training "
                        "finish (rerun jobs/train.py with the same --out to resume), or fix --run")
    cfg = TrainConfig.model_validate(yaml.safe_load(storage.read_text(storage.join(run_uri, "config.yaml"), **storage_kw)))
    metrics = storage.read_json(metrics_uri, **storage_kw)
    return {"format": 0, "method": cfg.model, "task": metrics["task"], "dataset": metrics["dataset"],
            "labels": metrics["labels"], "weights": LEGACY_WEIGHTS_FILE, "eval_batch_size": cfg.eval_batch_size,
            "train_config": cfg.model_dump(mode="json")}


def local_best(run_uri: str, **storage_kw) -> Path:
    """A local folder with the run's ``best/`` files: the folder itself for a local run, a fresh copy
    for ``s3://``."""
    best = storage.join(run_uri, "best")
    fs, path = storage.resolve(best, **storage_kw)
    if not storage.is_s3(run_uri):
        return Path(path)
    import pyarrow.fs as pafs

    local = Path(tempfile.mkdtemp(prefix="umaf-run-"))
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


class RunModel(nn.Module):
    """A trained UMAF or SPP-SCL model with its preprocessing and label names.

    ``forward(**tensors)`` gives logits for model-ready tensors (the method's ``collate`` output);
    :meth:`predict_proba` / :meth:`predict` take texts (+ caption fields for UMAF, + images for SPP-SCL).
    """

    def __init__(self, card: dict[str, Any], model: nn.Module, folder: Path, device: torch.device,
                 checkpoint: str, storage_kw: dict[str, Any], precision: str | None = None):
        super().__init__()
        self.model = model
        self.card = card
        self.config = TrainConfig.model_validate(card["train_config"])
        self.method = get_method(card["method"])
        self.labels: list[str] = list(card["labels"])
        self.eval_batch_size: int = int(card.get("eval_batch_size") or self.config.eval_batch_size)
        self.folder, self.device, self.checkpoint, self.storage_kw = folder, device, checkpoint, storage_kw
        # GPU compute as the run trained (TrainConfig.precision) unless asked otherwise; CPUs run fp32.
        self.precision = precision or self.config.resolved_precision
        # SPP-SCL: the run's reported evaluation protocol. Under train_context every row is predicted with
        # the run's training pairs (raw rows in the card) as its only batch-mates, as the run evaluated.
        ev = card.get("eval") or {}
        self.context_rows: list[dict[str, Any]] = (list(ev.get("context_rows") or [])
                                                   if ev.get("protocol") == "train_context" else [])
        self._context_features: dict[str, np.ndarray] | None = None
        self.to(device).eval()

    @property
    def method_name(self) -> str:
        return self.card["method"]

    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        logits, _ = self.method.predict(self.model, tensors)
        return logits

    # ---- preprocessing: rows → the method's model-ready columns, by the training's code ----------------
    def features(self, rows: dict[str, Sequence[Any]]) -> dict[str, np.ndarray]:
        """``rows`` (columns ``id``, ``text``; UMAF ``caption_ocr``/``caption_visual_scene``/
        ``caption_textimage_relation``; SPP-SCL ``image`` as URI or bytes) → model-ready numpy columns
        and ``image_ok``."""
        n = len(rows["text"])
        base = {"id": np.array([str(i) for i in rows.get("id", range(n))], dtype=object),
                "text": np.array([t or "" for t in rows["text"]], dtype=object),
                "label": np.zeros(n, dtype=np.int64)}
        if self.method_name == "umaf":
            from umaf.train.umaf_method import FIELD_COLUMNS, tokenize_batch

            u = self.config.umaf
            fields = {c: np.array(list(rows.get(c) or [None] * n), dtype=object) for c in FIELD_COLUMNS}
            out = tokenize_batch({**base, **fields}, tokenizer=self._tokenizer(), cache_dir=u.encoder_cache,
                                 max_length=u.max_length, field_shares=u.caption_field_shares)
            return {**out, "image_ok": np.ones(n, dtype=bool)}
        s = self.config.sppscl
        images = np.array(list(rows["image"]), dtype=object)
        ok = np.array([bool(v) if v is not None else True for v in rows.get("image_ok") or [True] * n], dtype=bool)
        if s.use_feature_cache:
            from umaf.train.feature_cache import FrozenFeatureEncoder

            encoder = FrozenFeatureEncoder(s.image_encoder, s.text_encoder, s.image_size, s.resolved_max_length,
                                           self.storage_kw, use_gpu=self.device.type == "cuda")
            return encoder({**base, "image": images, "image_ok": ok})
        from umaf.train.sppscl_method import raw_inputs_batch

        out = raw_inputs_batch({**base, "image": images}, s.image_encoder, s.text_encoder, s.image_size,
                               s.resolved_max_length, self.storage_kw)
        out["image_ok"] = out["image_ok"] & ok
        return out

    def _tokenizer(self) -> str:
        saved = self.folder / "tokenizer"
        u = self.config.umaf
        return str(saved) if saved.is_dir() else (u.tokenizer or u.encoder)

    @torch.no_grad()
    def predict_rows(self, rows: dict[str, Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
        """One batch, as given: ``(probabilities [B, C] float32, image_ok [B] bool)``."""
        feats = self.features(rows)
        n = len(rows["text"])
        context = self._context() if self.context_rows else None
        feed = feats if context is None else {k: np.concatenate([np.asarray(feats[k]), np.asarray(context[k])])
                                              for k in feats}
        tensors = self.method.collate(feed, self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.precision == "bf16"):
            if context is None:
                logits = self(**tensors)
            else:
                logits, _ = self.method.predict_isolated(self.model, tensors, n)
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return probs, np.asarray(feats["image_ok"], dtype=bool)

    def _context(self) -> dict[str, np.ndarray]:
        """The run's train_context pairs, preprocessed once as any row (their images read from the run's manifest)."""
        if self._context_features is None:
            rows = self.context_rows
            self._context_features = self.features({
                "id": [r["id"] for r in rows], "text": [r["text"] for r in rows], "image": [r.get("image") for r in rows],
                "image_ok": [r.get("image_ok", True) for r in rows]})
        return self._context_features

    def predict_proba(self, texts: Sequence[str], captions: Sequence[dict | None] | None = None,
                      images: Sequence[str | bytes | None] | None = None, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities ``[N, C]`` (columns in :attr:`labels` order). UMAF: ``captions`` are dicts
        with the caption job's fields (``ocr``, ``visual_scene``, ``textimage_relation``) or None (T alone).
        SPP-SCL: ``images`` are paths/URIs or file bytes; rows run in order in batches of the run's
        ``eval_batch_size`` (CMF attends across the batch); a row whose image cannot be read gets NaN."""
        texts = list(texts)
        rows: dict[str, list] = {"text": texts}
        if self.method_name == "umaf":
            caps = list(captions) if captions is not None else [None] * len(texts)
            for name in CAPTION_FIELD_NAMES:
                rows[f"caption_{name}"] = [(c or {}).get(name) for c in caps]
        else:
            if images is None:
                raise ValueError("an SPP-SCL model needs images: predict_proba(texts, images=[path or bytes, ...])")
            rows["image"] = list(images)
        size = batch_size or self.eval_batch_size
        out = []
        for start in range(0, len(texts), size):
            probs, ok = self.predict_rows({k: v[start:start + size] for k, v in rows.items()})
            probs[~ok] = np.nan
            out.append(probs)
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def predict(self, texts: Sequence[str], captions: Sequence[dict | None] | None = None,
                images: Sequence[str | bytes | None] | None = None) -> list[str | None]:
        """Label names (None where the image could not be read); see :meth:`predict_proba`."""
        probs = self.predict_proba(texts, captions, images)
        return [None if np.isnan(p).any() else self.labels[int(p.argmax())] for p in probs]


def require_predictable(card: dict[str, Any], run_uri: str) -> None:
    """A :class:`UserError` for a run this module cannot rebuild: UMAF's Table 3 rows with image tokens
    (``umaf.backbone`` image or text+image; their encoders are not exported)."""
    backbone = (card["train_config"].get("umaf") or {}).get("backbone") or "captions"
    if card["method"] == "umaf" and backbone not in ("captions", "text"):
        raise UserError(
            f"run {run_uri} is a UMAF run with umaf.backbone={backbone} (a Table 3 row): load_run and the "
            "predict job take UMAF runs over text (+ captions) and SPP-SCL runs. Its weights are in "
            f"{run_uri.rstrip('/')}/best/{WEIGHTS_FILE} and its test figures in metrics.json.")


def load_run(run_uri: str, device: str | torch.device = "cpu", precision: str | None = None, **storage_kw) -> RunModel:
    """The run's best model, ready to predict (eval mode, on ``device``; ``"auto"``: CUDA if available;
    ``precision`` on GPUs: bf16 or fp32, None: the run's)."""
    card = read_card(run_uri, **storage_kw)
    folder = local_best(run_uri, **storage_kw)
    state = read_weights(str(folder))
    if state is None:
        raise UserError(f"run {run_uri} has no best model weights ({WEIGHTS_FILE}): let its training finish")
    cfg = TrainConfig.model_validate(card["train_config"])
    require_predictable(card, run_uri)
    method = get_method(card["method"])
    if card["method"] == "umaf" and (folder / "encoder" / "config.json").is_file():
        from umaf.models.encoders import encoder_from_config
        from umaf.models.umaf import UmafModel

        encoder, hidden, heads = encoder_from_config(folder / "encoder")
        model = UmafModel(encoder, hidden, heads, len(card["labels"]), cfg.umaf)
    else:
        model = method.build_model(cfg, len(card["labels"]))
    model.load_state_dict(state)
    weights = folder / card.get("weights", WEIGHTS_FILE)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.is_file() else "unknown"
    epoch = (storage.read_json(str(folder / STATE_FILE)) if (folder / STATE_FILE).is_file() else {}).get("epoch")
    checkpoint = f"{run_uri.rstrip('/')}/best@{digest}" + (f" (epoch {epoch + 1})" if isinstance(epoch, int) else "")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return RunModel(card, model, folder, torch.device(device), checkpoint, storage_kw, precision)


def export_untrained_run(cfg: TrainConfig, label_names: list[str], task: str, dataset: str, seed: int = 0) -> None:
    """Write ``<cfg.out>/best/`` for a freshly built (seeded, untrained) model, exactly as the training
    loop writes its best model: the predict path's tests and bench, without minutes of training."""
    from umaf.train.loop import _save_best

    method = get_method(cfg.model)
    torch.manual_seed(seed)
    model = method.build_model(cfg, len(label_names))
    loop_config = {"label_names": list(label_names), "task": task, "dataset": dataset, "run_uri": cfg.out}
    _save_best(cfg, method, model, loop_config, cfg.best_metric or "weighted_f1", cfg_storage_kw(cfg), False,
               {"epoch": 0})


def cfg_storage_kw(cfg: TrainConfig) -> dict[str, Any]:
    return {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}

