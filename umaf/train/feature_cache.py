"""Frozen-feature cache: SPP-SCL's frozen encoders' outputs, computed once and reused.

SPP-SCL freezes ResNet-50 and BERT (paper, "Overview"), so for a given dataset their outputs never
change: re-running them every epoch of every Tune trial is wasted compute (they dominate the step
time). A Ray Data job runs them once per split — actors hold the encoders, GPUs when the train job
has them — and writes Parquet at

    <cache_dir>/<key>/<split>/<writer-id>/*.parquet   +   <cache_dir>/<key>/<split>/_SUCCESS.json

``key`` hashes everything the features depend on: both encoder names, image size, text length,
the layer count, the cache format version, and a fingerprint of the split's rows (id, text, image
path, label). A second run or trial with the same key reads the Parquet instead of running the
encoders. ``_SUCCESS.json`` is written last and names the folder that completed, so a killed job
or two trials racing to build the same cache never leave a half-written cache that looks whole.

Per row: ``image_map`` (the layer-4 map, fp16 bytes, shape in ``_SUCCESS.json``), ``text_states``
(hidden states of the last 4 layers for the *real* tokens only, fp16 bytes) and the arrays'
shapes ``image_shape`` ``[C, h, w]`` and ``text_shape`` ``[L, n, H]``: storing only real tokens keeps a 30-token tweet at 4·30·768·2 B instead of
the padded 200 tokens. fp16 halves the size again; the head casts back to fp32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from typing import Any

import numpy as np
import torch

from umaf import storage

CACHE_FORMAT_VERSION = 1
SUCCESS_FILE = "_SUCCESS.json"
FEATURE_DTYPE = np.float16


def rows_fingerprint(ids: list[str], texts: list[str], images: list[str | None], labels: list[int]) -> str:
    """Order-independent hash of the rows whose features are cached."""
    h = hashlib.sha256()
    for row in sorted(zip(ids, texts, images, labels), key=lambda r: r[0]):
        h.update(json.dumps([row[0], row[1], row[2], int(row[3])], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(*, image_encoder: str, text_encoder: str, image_size: int, max_length: int, fingerprint: str) -> str:
    spec = {
        "format": CACHE_FORMAT_VERSION,
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "image_size": image_size,
        "max_length": max_length,
        "rows": fingerprint,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def read_image_bytes(uri: str | None, storage_kw: dict[str, Any]) -> bytes | None:
    """The image file's bytes, or None when absent or unreadable (the row goes on without its image)."""
    if not uri:
        return None
    try:
        fs, path = storage.resolve(uri, **storage_kw)
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except Exception:  # noqa: BLE001 - a missing/unreadable image never fails the batch
        return None


@functools.lru_cache(maxsize=2)
def _encoders(image_encoder: str, text_encoder: str, use_gpu: bool):
    """Loaded once per worker process: Ray reuses task workers, so later batches find them here."""
    from umaf.models.encoders import load_tokenizer
    from umaf.models.image_encoder import FrozenBert, FrozenResNet, load_image_processor

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    return (device, FrozenResNet(image_encoder).to(device).eval(), FrozenBert(text_encoder).to(device).eval(),
            load_image_processor(image_encoder), load_tokenizer(text_encoder))


class FrozenFeatureEncoder:
    """Encodes a batch of rows with the frozen encoders (Ray Data batch function via :func:`encode_batch`)."""

    def __init__(self, image_encoder: str, text_encoder: str, image_size: int, max_length: int,
                 storage_kw: dict[str, Any], use_gpu: bool = False):
        self.device, self.image, self.text, self.processor, self.tokenizer = _encoders(image_encoder, text_encoder, use_gpu)
        self.image_size, self.max_length, self.storage_kw = image_size, max_length, storage_kw

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from umaf.models.image_encoder import pixel_values_from_bytes

        images = [read_image_bytes(uri, self.storage_kw) for uri in batch["image"].tolist()]
        pixels, image_ok = pixel_values_from_bytes(self.processor, images, self.image_size)
        # Pad to the longest text of the batch only: the attention mask makes the states of real
        # tokens identical to padding to max_length, and only real tokens are stored.
        enc = self.tokenizer(batch["text"].tolist(), padding="longest", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        image_map = self.image(pixels.to(self.device)).to(torch.float16).cpu().numpy()
        states = self.text(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        states = states.to(torch.float16).cpu().numpy()  # [B, L, N, H]
        lengths = enc["attention_mask"].sum(dim=1).numpy()
        return {
            "id": batch["id"],
            "label": np.asarray(batch["label"], dtype=np.int64),
            "image_ok": image_ok.numpy() & np.asarray(batch.get("image_ok", np.ones(len(images), bool)), dtype=bool),
            "image_map": np.array([m.tobytes() for m in image_map], dtype=object),
            "image_shape": np.array([m.shape for m in image_map], dtype=np.int32),  # [C, h, w]
            "text_states": np.array([s[:, : int(n)].tobytes() for s, n in zip(states, lengths)], dtype=object),
            "text_shape": np.array([(s.shape[0], int(n), s.shape[2]) for s, n in zip(states, lengths)], dtype=np.int32),
        }


def decode_features(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Cached rows → ``image_map [B,C,h,w]``, ``text_states [B,L,N,H]`` (zero-padded), ``attention_mask [B,N]``."""
    image_shapes = np.asarray(batch["image_shape"]).reshape(-1, 3)
    image_map = np.stack([np.frombuffer(b, dtype=FEATURE_DTYPE).reshape(shape) for b, shape in zip(batch["image_map"], image_shapes)])
    text_shapes = np.asarray(batch["text_shape"]).reshape(-1, 3).astype(np.int64)
    lengths = text_shapes[:, 1]
    layers, hidden = int(text_shapes[0, 0]), int(text_shapes[0, 2])
    longest = max(1, int(lengths.max()))
    states = np.zeros((len(lengths), layers, longest, hidden), dtype=FEATURE_DTYPE)
    for row, (data, n) in enumerate(zip(batch["text_states"], lengths)):
        states[row, :, :n] = np.frombuffer(data, dtype=FEATURE_DTYPE).reshape(layers, int(n), hidden)
    mask = (np.arange(longest)[None, :] < lengths[:, None]).astype(np.int64)
    return {
        "image_map": torch.from_numpy(image_map.copy()),
        "text_states": torch.from_numpy(states),
        "attention_mask": torch.from_numpy(mask),
    }


def encode_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, Any]:
    """Ray Data batch function. Tasks (not a dedicated actor per split): their worker processes are
    reused, so the encoders load once per process and no actor has to start for each split."""
    return FrozenFeatureEncoder(**kwargs)(batch)


def split_cache_uri(cache_dir: str, key: str, split: str) -> str:
    return storage.join(cache_dir, key, split)


def load_or_build(ds, *, cache_dir: str, split: str, image_encoder: str, text_encoder: str, image_size: int,
                  max_length: int, storage_kw: dict[str, Any], concurrency: int = 1, use_gpu: bool = False,
                  batch_size: int = 64):
    """The split's cached features as a Ray Dataset, computing and writing them first if absent.

    ``ds`` has ``id``, ``text``, ``image``, ``label`` (and optionally ``image_ok``). Returns
    ``(dataset, info)`` where ``info`` says whether the cache was hit, its URI and row count.
    """
    import ray.data

    columns = [c for c in ("id", "text", "image", "image_ok", "label") if c in ds.columns()]
    ds = ds.select_columns(columns)
    rows = ds.select_columns(["id", "text", "image", "label"]).to_pandas()
    fingerprint = rows_fingerprint(rows["id"].tolist(), rows["text"].tolist(), rows["image"].tolist(), rows["label"].tolist())
    key = cache_key(image_encoder=image_encoder, text_encoder=text_encoder, image_size=image_size,
                    max_length=max_length, fingerprint=fingerprint)
    base = split_cache_uri(cache_dir, key, split)
    success = storage.join(base, SUCCESS_FILE)
    hit = storage.exists(success, **storage_kw)
    if not hit:
        writer = uuid.uuid4().hex[:12]
        encoded = ds.map_batches(
            encode_batch,
            fn_kwargs={"image_encoder": image_encoder, "text_encoder": text_encoder,
                       "image_size": image_size, "max_length": max_length,
                       "storage_kw": storage_kw, "use_gpu": use_gpu},
            batch_format="numpy",
            batch_size=batch_size,
            num_gpus=1 if use_gpu else None,
            concurrency=concurrency,
        )
        fs, path = storage.resolve(storage.join(base, writer), **storage_kw)
        encoded.write_parquet(path, filesystem=fs)
        storage.write_json_atomic(success, {
            "folder": writer, "rows": len(rows), "key": key, "format": CACHE_FORMAT_VERSION,
            "image_encoder": image_encoder, "text_encoder": text_encoder, "image_size": image_size,
            "max_length": max_length,
        }, **storage_kw)
    meta = storage.read_json(success, **storage_kw)
    fs, path = storage.resolve(storage.join(base, meta["folder"]), **storage_kw)
    cached = ray.data.read_parquet(path, filesystem=fs)
    return cached, {"hit": hit, "uri": base, "rows": meta["rows"]}


def cache_size_bytes(uri: str, storage_kw: dict[str, Any]) -> int:
    """Total bytes under a cache folder (for the bench)."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri, **storage_kw)
    return sum(info.size or 0 for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if info.is_file)
