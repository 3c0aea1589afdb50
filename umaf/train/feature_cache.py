"""Frozen-feature cache: SPP-SCL's frozen encoders' outputs, computed once and reused.

SPP-SCL freezes ResNet-50 and BERT (paper, "Overview"), so for a given dataset their outputs never
change: re-running them every epoch of every Tune trial is wasted compute (they dominate the step
time). One Ray Data job runs them once for every split still missing from the cache and writes
Parquet at

    <cache_dir>/<key>/<split>/<writer-id>/*.parquet   +   <cache_dir>/<key>/<split>/_SUCCESS.json

The job is a pipeline over the union of those splits, cut into enough blocks to keep every stage
busy: CPU tasks read and decode the images (PIL, the image processor) → a long-lived pool of
:class:`FeatureEncoderActor` (``ActorPoolStrategy``; one GPU each when the train job has GPUs) loads
the frozen encoders once per actor and encodes batches of every split → CPU tasks write each
split's rows under its own folder, files named by row position so the cache reads back in the
split's order. (Ray Data fuses a task map into the next actor map when their resources match: on a
CPU-only job decoding therefore runs inside the CPU actors, which is where that CPU time would go
anyway; with GPUs the decode tasks stay separate and feed the GPU actors.)

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
import math
import uuid
from typing import Any

import numpy as np
import torch

from umaf import storage

CACHE_FORMAT_VERSION = 1  # rows and columns unchanged by the actor-pool build: version-1 caches stay valid
SPLIT_COLUMN, POSITION_COLUMN = "_cache_split", "_cache_position"  # build-time only, never written
# Build-time only as well: where the encoder actor ran ("cuda (NVIDIA H200)", "cpu"), gathered into
# _SUCCESS.json's "encoded_on" (fp16 features computed on a GPU and on a CPU differ in rounding).
DEVICE_COLUMN = "_cache_encoded_on"
BUILD_COLUMNS = (SPLIT_COLUMN, POSITION_COLUMN, DEVICE_COLUMN)


def _model_pixels(batch: dict[str, np.ndarray], device: torch.device, processor) -> torch.Tensor:
    """The batch's ``pixel_values`` on ``device`` as the encoder's float32 input: ``uint8`` pixels
    (:func:`decode_images_batch` with ``as_uint8``) are copied from pinned memory and normalised
    there; float32 pixels (already normalised) are copied as they are."""
    from umaf.models.image_encoder import normalize_pixels

    pixels = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"]))
    if device.type == "cuda":
        pixels = pixels.pin_memory()  # a real asynchronous copy (pageable memory is staged by the driver)
    pixels = pixels.to(device, non_blocking=True)
    return normalize_pixels(pixels, processor) if pixels.dtype == torch.uint8 else pixels.float()


def _device_label(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


FEATURE_COLUMNS = ("id", "label", "image_ok", "image_map", "image_shape", "text_states", "text_shape")
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
    from umaf.models.image_encoder import is_torchvision_checkpoint, resolve_image_encoder

    if is_torchvision_checkpoint(image_encoder):  # keyed by the file's content (its converted folder's name)
        image_encoder = resolve_image_encoder(image_encoder).rstrip("/").rsplit("/", 1)[-1]
    spec = {
        "format": CACHE_FORMAT_VERSION,
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "image_size": image_size,
        "max_length": max_length,
        "rows": fingerprint,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def read_image_bytes(uri: str | bytes | None, storage_kw: dict[str, Any]) -> bytes | None:
    """The image file's bytes, or None when absent or unreadable (the row goes on without its image).
    Bytes given instead of a URI (a caller holding the file already) are the image itself."""
    if not uri:
        return None
    if isinstance(uri, (bytes, bytearray)):
        return bytes(uri)
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


def decode_images_batch(batch: dict[str, np.ndarray], image_encoder: str, image_size: int | None,
                        storage_kw: dict[str, Any], as_uint8: bool = False) -> dict[str, np.ndarray]:
    """Ray Data CPU task: read and decode a batch's images into the encoder's pixels (``pixel_values``
    float32 ``[B,3,S,S]``; ``image_size`` None: the processor's own size) and AND the decode status into
    ``image_ok``. Runs beside the encoder actors,
    so the actors (and their GPU) never wait on PIL.

    ``as_uint8``: resized and cropped ``uint8`` pixels, normalised later by the encoder actor on its
    device (:func:`_model_pixels`): a quarter of float32's bytes through the object store and the
    host-to-GPU copy, and no float arithmetic here (the GPU suite's profile of the cache build: the
    actor's largest host cost was copying float32 pixels to the GPU)."""
    from umaf.models.image_encoder import pixel_values_from_bytes

    processor = _image_processor(image_encoder)  # once per reused task worker process
    images = [read_image_bytes(uri, storage_kw) for uri in batch["image"].tolist()]
    pixels, image_ok = pixel_values_from_bytes(processor, images, image_size, normalize=not as_uint8)
    out = {k: v for k, v in batch.items() if k not in ("image", "image_ok")}
    out["image_ok"] = image_ok.numpy() & np.asarray(batch.get("image_ok", np.ones(len(images), bool)), dtype=bool)
    out["pixel_values"] = pixels.numpy()
    return out


@functools.lru_cache(maxsize=2)
def _image_processor(image_encoder: str):
    from umaf.models.image_encoder import load_image_processor

    return load_image_processor(image_encoder)


class FeatureEncoderActor:
    """The frozen encoders, loaded once per actor: decoded pixels + text → cached feature columns."""

    def __init__(self, image_encoder: str, text_encoder: str, max_length: int, use_gpu: bool = False):
        self.device, self.image, self.text, self.processor, self.tokenizer = _encoders(image_encoder, text_encoder, use_gpu)
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        pixels = _model_pixels(batch, self.device, self.processor)
        # Pad to the longest text of the batch only: the attention mask makes the states of real
        # tokens identical to padding to max_length, and only real tokens are stored.
        enc = self.tokenizer(batch["text"].tolist(), padding="longest", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        image_map = self.image(pixels).to(torch.float16).cpu().numpy()
        states = self.text(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        states = states.to(torch.float16).cpu().numpy()  # [B, L, N, H]
        lengths = enc["attention_mask"].sum(dim=1).numpy()
        return {
            **{k: batch[k] for k in (SPLIT_COLUMN, POSITION_COLUMN) if k in batch},
            DEVICE_COLUMN: np.array([_device_label(self.device)] * len(lengths), dtype=object),
            "id": batch["id"],
            "label": np.asarray(batch["label"], dtype=np.int64),
            "image_ok": np.asarray(batch["image_ok"], dtype=bool),
            "image_map": np.array([m.tobytes() for m in image_map], dtype=object),
            "image_shape": np.array([m.shape for m in image_map], dtype=np.int32),  # [C, h, w]
            "text_states": np.array([s[:, : int(n)].tobytes() for s, n in zip(states, lengths)], dtype=object),
            "text_shape": np.array([(s.shape[0], int(n), s.shape[2]) for s, n in zip(states, lengths)], dtype=np.int32),
        }


class FrozenFeatureEncoder:
    """Decode + encode in one call (a single process: tests, notebooks); the cache build splits the
    two between CPU tasks and :class:`FeatureEncoderActor`."""

    def __init__(self, image_encoder: str, text_encoder: str, image_size: int, max_length: int,
                 storage_kw: dict[str, Any], use_gpu: bool = False):
        self.encoder = FeatureEncoderActor(image_encoder, text_encoder, max_length, use_gpu)
        self.image_encoder, self.image_size, self.storage_kw = image_encoder, image_size, storage_kw

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.encoder(decode_images_batch(batch, self.image_encoder, self.image_size, self.storage_kw))


def write_cache_batch(batch: dict[str, np.ndarray], folders: dict[str, str], storage_kw: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data CPU task: write a batch's rows of each split to ``<folder of the split>/part-<first
    row position>.parquet`` (sorted names = the split's row order); returns rows written per split.
    Columns: ``id``, ``label``, ``image_ok``, fp16 feature bytes, and their ``*_shape`` columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    splits = np.asarray(batch[SPLIT_COLUMN]).astype(str)
    positions = np.asarray(batch[POSITION_COLUMN], dtype=np.int64)
    features = [c for c in batch if c not in ("id", "label", "image_ok", *BUILD_COLUMNS)]
    has_image_ok = "image_ok" in batch  # image features only (text states have no image)
    written_splits, written_rows, devices = [], [], []
    encoded_on = sorted(set(np.asarray(batch[DEVICE_COLUMN]).astype(str).tolist())) if DEVICE_COLUMN in batch else []
    for split in sorted(set(splits.tolist())):
        rows = np.flatnonzero(splits == split)
        rows = rows[np.argsort(positions[rows], kind="stable")]
        columns = {
            "id": pa.array(np.asarray(batch["id"])[rows].tolist(), pa.string()),
            "label": pa.array(np.asarray(batch["label"])[rows], pa.int64()),
        }
        if has_image_ok:
            columns["image_ok"] = pa.array(np.asarray(batch["image_ok"])[rows], pa.bool_())
        for name in features:
            if name.endswith("_shape"):  # as Ray's tensor column (what Dataset.write_parquet wrote in version 1)
                columns[name] = ArrowTensorArray.from_numpy(np.asarray(batch[name], dtype=np.int32)[rows])
            else:
                columns[name] = pa.array(np.asarray(batch[name], dtype=object)[rows].tolist(), pa.binary())
        table = pa.table(columns)
        fs, folder = storage.resolve(folders[split], **storage_kw)
        fs.create_dir(folder, recursive=True)
        name = f"part-{int(positions[rows[0]]):010d}-{uuid.uuid4().hex[:8]}.parquet"
        pq.write_table(table, f"{folder.rstrip('/')}/{name}", filesystem=fs)
        written_splits.append(split)
        written_rows.append(len(rows))
        devices.append(",".join(encoded_on))
    return {"split": np.array(written_splits, dtype=object), "rows": np.array(written_rows, dtype=np.int64),
            "encoded_on": np.array(devices, dtype=object)}


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
    """Decode and encode one batch in this process (kept for callers of the version-1 API)."""
    return FrozenFeatureEncoder(**kwargs)(batch)


def split_cache_uri(cache_dir: str, key: str, split: str) -> str:
    return storage.join(cache_dir, key, split)


def load_or_build(ds, *, cache_dir: str, split: str, image_encoder: str, text_encoder: str, image_size: int,
                  max_length: int, storage_kw: dict[str, Any], concurrency: int = 1, use_gpu: bool = False,
                  batch_size: int = 64, gpus_per_actor: float = 1.0):
    """One split's cached features as a Ray Dataset (see :func:`load_or_build_splits`)."""
    return load_or_build_splits(
        {split: ds}, cache_dir=cache_dir, image_encoder=image_encoder, text_encoder=text_encoder,
        image_size=image_size, max_length=max_length, storage_kw=storage_kw, concurrency=concurrency,
        use_gpu=use_gpu, batch_size=batch_size, gpus_per_actor=gpus_per_actor,
    )[split]


def _blocks_for(rows: int, batch_size: int, actors: int) -> int:
    """One block per batch (up to 256): decode tasks on every free CPU, every encoder actor fed, and
    no decode task holding thousands of decoded images (a 224-px image is 0.6 MB of pixels)."""
    return max(1, actors, min(math.ceil(rows / batch_size), 256))


def load_or_build_splits(datasets: dict[str, Any], *, cache_dir: str, image_encoder: str, text_encoder: str,
                         image_size: int, max_length: int, storage_kw: dict[str, Any], concurrency: int = 1,
                         use_gpu: bool = False, batch_size: int = 64,
                         gpus_per_actor: float = 1.0) -> dict[str, tuple[Any, dict[str, Any]]]:
    """SPP-SCL: every split's cached ResNet map + BERT states as a Ray Dataset (see :func:`build_splits`)."""
    def key(fingerprint: str) -> str:
        return cache_key(image_encoder=image_encoder, text_encoder=text_encoder, image_size=image_size,
                         max_length=max_length, fingerprint=fingerprint)

    return build_splits(
        datasets, cache_dir=cache_dir, key=key, storage_kw=storage_kw, concurrency=concurrency, use_gpu=use_gpu,
        batch_size=batch_size, columns=FEATURE_COLUMNS, gpus_per_actor=gpus_per_actor,
        decode_kwargs={"image_encoder": image_encoder, "image_size": image_size},
        actor=FeatureEncoderActor, actor_kwargs={"image_encoder": image_encoder, "text_encoder": text_encoder,
                                                 "max_length": max_length, "use_gpu": use_gpu},
        meta={"image_encoder": image_encoder, "text_encoder": text_encoder, "image_size": image_size,
              "max_length": max_length},
    )


IMAGE_INPUTS = ("id", "text", "image", "image_ok", "label")


def build_splits(datasets: dict[str, Any], *, cache_dir: str, key, storage_kw: dict[str, Any], concurrency: int,
                 use_gpu: bool, batch_size: int, columns: tuple[str, ...], decode_kwargs: dict[str, Any] | None,
                 actor: type, actor_kwargs: dict[str, Any], meta: dict[str, Any],
                 inputs: tuple[str, ...] = IMAGE_INPUTS, fingerprint=None,
                 gpus_per_actor: float = 1.0) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Every split's cached features as a Ray Dataset, building all missing splits in one job first.

    ``datasets`` maps split → rows with the ``inputs`` columns (images: ``id``, ``text``, ``image``,
    ``label`` and optionally ``image_ok``); ``fingerprint(table)`` hashes a split's rows (default: id,
    text, image path and label) and ``key(fingerprint)`` names their cache entry. The missing splits go
    through one pipeline (one encoder load per actor for all of them): decode tasks
    (:func:`decode_images_batch` with ``decode_kwargs``, uint8 pixels; none when it is None) →
    ``concurrency`` ``actor`` instances, each with ``gpus_per_actor`` of a GPU when ``use_gpu`` (below
    1, several actors share a GPU, so one's host work — tokenising, copying features out — overlaps
    another's kernels) → writers. Returns split → ``(dataset of columns, info)``; ``info`` says
    whether the cache was hit, its URI and row count.
    """
    import pyarrow as pa
    import ray.data
    from ray.data import ActorPoolStrategy

    plan: dict[str, dict[str, Any]] = {}
    for split, ds in datasets.items():
        present = [c for c in inputs if c in ds.columns()]
        table = pa.concat_tables(ray.get(ds.select_columns(present).to_arrow_refs()))
        if fingerprint is not None:
            digest = fingerprint(table)
        else:
            digest = rows_fingerprint(table["id"].to_pylist(), table["text"].to_pylist(),
                                      table["image"].to_pylist(), table["label"].to_pylist())
        entry = key(digest)
        base = split_cache_uri(cache_dir, entry, split)
        hit = storage.exists(storage.join(base, SUCCESS_FILE), **storage_kw)
        plan[split] = {"table": table, "key": entry, "base": base, "hit": hit, "writer": uuid.uuid4().hex[:12]}

    missing = [split for split, p in plan.items() if not p["hit"]]
    if missing:
        parts = []
        for split in missing:
            table = plan[split]["table"]
            if decode_kwargs is not None:
                if "image_ok" not in table.column_names:
                    table = table.append_column("image_ok", pa.array([True] * table.num_rows, pa.bool_()))
                table = table.select(list(IMAGE_INPUTS))
            table = table.append_column(SPLIT_COLUMN, pa.array([split] * table.num_rows, pa.string()))
            table = table.append_column(POSITION_COLUMN, pa.array(range(table.num_rows), pa.int64()))
            parts.append(table)
        rows = pa.concat_tables(parts).combine_chunks()
        # from_arrow of one table is one block: hand it slices instead (one block each, no
        # repartition job) so decode tasks, every actor and the writers work at once.
        blocks = _blocks_for(rows.num_rows, batch_size, concurrency)
        step = math.ceil(rows.num_rows / blocks)
        union = ray.data.from_arrow([rows.slice(start, step) for start in range(0, rows.num_rows, step)])
        folders = {split: storage.join(plan[split]["base"], plan[split]["writer"]) for split in missing}
        if decode_kwargs is not None:
            union = union.map_batches(decode_images_batch, batch_format="numpy", batch_size=batch_size,
                                      fn_kwargs={**decode_kwargs, "storage_kw": storage_kw, "as_uint8": True})
        written = (
            union.map_batches(actor, batch_format="numpy", batch_size=batch_size, fn_constructor_kwargs=actor_kwargs,
                              compute=ActorPoolStrategy(size=concurrency), num_gpus=gpus_per_actor if use_gpu else None)
            .map_batches(write_cache_batch, batch_format="numpy", batch_size=None,
                         fn_kwargs={"folders": folders, "storage_kw": storage_kw})
            .take_all()
        )
        counts = {split: 0 for split in missing}
        devices: dict[str, set[str]] = {split: set() for split in missing}
        for row in written:
            counts[row["split"]] += int(row["rows"])
            devices[row["split"]].update(d for d in str(row.get("encoded_on") or "").split(",") if d)
        for split in missing:
            expected = plan[split]["table"].num_rows
            if counts[split] != expected:  # pragma: no cover - a lost batch would leave a short cache
                raise RuntimeError(f"feature cache for {split}: wrote {counts[split]} of {expected} rows")
            storage.write_json_atomic(storage.join(plan[split]["base"], SUCCESS_FILE), {
                "folder": plan[split]["writer"], "rows": expected, "key": plan[split]["key"],
                "format": CACHE_FORMAT_VERSION, "encoded_on": sorted(devices[split]), **meta,
            }, **storage_kw)

    out = {}
    for split, p in plan.items():
        meta_written = storage.read_json(storage.join(p["base"], SUCCESS_FILE), **storage_kw)
        fs, path = storage.resolve(storage.join(p["base"], meta_written["folder"]), **storage_kw)
        cached = ray.data.read_parquet(path, filesystem=fs).select_columns(list(columns))
        # Files are named by row position: keep their order (SPP-SCL's CMF attends across an
        # evaluation batch, so dev/test must always be read in the same order).
        cached.context.execution_options.preserve_order = True
        out[split] = (cached, {"hit": p["hit"], "uri": p["base"], "rows": meta_written["rows"]})
    return out


# --------------------------------------------------------------------------------------------
# UMAF's image tokens (Table 3's image rows with a frozen image encoder): the same build, one encoder.

IMAGE_TOKEN_COLUMNS = ("id", "label", "image_ok", "image_tokens", "image_tokens_shape")


class ImageTokenActor:
    """The frozen image encoder (ResNet grid / ViT or CLIP patch tokens), loaded once per actor:
    decoded pixels → ``image_tokens`` (fp16 bytes of ``[n, d]``) and ``image_tokens_shape``."""

    def __init__(self, image_encoder: str, use_gpu: bool = False):
        self.device, self.encoder = _image_token_encoder(image_encoder, use_gpu)
        self.processor = _image_processor(image_encoder)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        tokens = self.encoder(_model_pixels(batch, self.device, self.processor)).to(torch.float16).cpu().numpy()
        return {
            **{k: batch[k] for k in (SPLIT_COLUMN, POSITION_COLUMN) if k in batch},
            DEVICE_COLUMN: np.array([_device_label(self.device)] * len(tokens), dtype=object),
            "id": batch["id"],
            "label": np.asarray(batch["label"], dtype=np.int64),
            "image_ok": np.asarray(batch["image_ok"], dtype=bool),
            "image_tokens": np.array([t.tobytes() for t in tokens], dtype=object),
            "image_tokens_shape": np.array([t.shape for t in tokens], dtype=np.int32),  # [n, d]
        }


@functools.lru_cache(maxsize=2)
def _image_token_encoder(image_encoder: str, use_gpu: bool):
    from umaf.models.image_encoder import ImageTokenEncoder

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    return device, ImageTokenEncoder(image_encoder).to(device).eval()


def load_or_build_image_tokens(datasets: dict[str, Any], *, cache_dir: str, image_encoder: str,
                               storage_kw: dict[str, Any], concurrency: int = 1, use_gpu: bool = False,
                               batch_size: int = 64, gpus_per_actor: float = 1.0) -> dict[str, tuple[Any, dict[str, Any]]]:
    """UMAF: every split's image tokens, computed once by the frozen image encoder (with its own image
    processor's preprocessing) and reused by every epoch, run and trial on the same rows."""
    def key(fingerprint: str) -> str:
        spec = {"format": CACHE_FORMAT_VERSION, "kind": "umaf-image-tokens", "image_encoder": image_encoder,
                "rows": fingerprint}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    return build_splits(
        datasets, cache_dir=cache_dir, key=key, storage_kw=storage_kw, concurrency=concurrency, use_gpu=use_gpu,
        batch_size=batch_size, columns=IMAGE_TOKEN_COLUMNS, gpus_per_actor=gpus_per_actor,
        decode_kwargs={"image_encoder": image_encoder, "image_size": None},
        actor=ImageTokenActor, actor_kwargs={"image_encoder": image_encoder, "use_gpu": use_gpu},
        meta={"kind": "umaf-image-tokens", "image_encoder": image_encoder},
    )


def decode_image_tokens(batch: dict[str, np.ndarray]) -> torch.Tensor:
    """Cached rows → ``image_tokens [B, n, d]`` float32 (one encoder: every row has the same shape)."""
    shapes = np.asarray(batch["image_tokens_shape"]).reshape(-1, 2)
    tokens = np.stack([np.frombuffer(b, dtype=FEATURE_DTYPE).reshape(shape)
                       for b, shape in zip(batch["image_tokens"], shapes)])
    return torch.from_numpy(tokens.astype(np.float32))


def cache_size_bytes(uri: str, storage_kw: dict[str, Any]) -> int:
    """Total bytes under a cache folder (for the bench)."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri, **storage_kw)
    return sum(info.size or 0 for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if info.is_file)


# --------------------------------------------------------------------------------------------
# UMAF's text states (a frozen text encoder, umaf.train_encoder=false): the same build, no images.

TEXT_STATE_COLUMNS = ("id", "label", "text_states", "text_states_shape")
TEXT_STATE_INPUTS = ("id", "label", "input_ids", "attention_mask", "token_type_ids")


class TextStateActor:
    """The frozen text encoder, loaded once per actor (eval mode: no dropout, as a frozen feature
    extractor runs): token arrays → ``text_states`` (fp16 bytes of the last hidden states ``[n, d]`` of
    the ``n`` real tokens; padding is not stored) and ``text_states_shape``."""

    def __init__(self, encoder: str, cache_dir: str | None = None, use_gpu: bool = False):
        self.device, self.encoder, self.token_types = _text_state_encoder(encoder, cache_dir, use_gpu)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        mask = np.asarray(batch["attention_mask"])
        lengths = mask.sum(1).astype(np.int64)
        longest = max(1, int(lengths.max()))  # the attention mask makes the real tokens' states the same
        # np.array(...) copies: Ray Data's batches are read-only views.
        inputs = {"input_ids": torch.from_numpy(np.array(batch["input_ids"][:, :longest], dtype=np.int64)),
                  "attention_mask": torch.from_numpy(np.array(mask[:, :longest], dtype=np.int64))}
        if self.token_types and "token_type_ids" in batch:
            inputs["token_type_ids"] = torch.from_numpy(np.array(batch["token_type_ids"][:, :longest], dtype=np.int64))
        states = self.encoder(**{k: v.to(self.device) for k, v in inputs.items()}).last_hidden_state
        states = states.to(torch.float16).cpu().numpy()
        return {
            **{k: batch[k] for k in (SPLIT_COLUMN, POSITION_COLUMN) if k in batch},
            DEVICE_COLUMN: np.array([_device_label(self.device)] * len(lengths), dtype=object),
            "id": batch["id"],
            "label": np.asarray(batch["label"], dtype=np.int64),
            "text_states": np.array([s[: int(n)].tobytes() for s, n in zip(states, lengths)], dtype=object),
            "text_states_shape": np.array([(int(n), s.shape[-1]) for s, n in zip(states, lengths)], dtype=np.int32),
        }


@functools.lru_cache(maxsize=2)
def _text_state_encoder(encoder: str, cache_dir: str | None, use_gpu: bool):
    import inspect

    from umaf.models.encoders import load_encoder

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model, _, _ = load_encoder(encoder, cache_dir)
    model = model.to(device).eval()
    return device, model, "token_type_ids" in inspect.signature(model.forward).parameters


def token_rows_fingerprint(table) -> str:
    """Order-independent hash of tokenised rows: id, label and the real tokens' ids and types, i.e.
    exactly what the encoder reads (text, captions, budget rule and tokenizer all show up in it)."""
    ids = table["id"].to_pylist()
    labels = table["label"].to_pylist()
    tokens = [np.asarray(table[c].to_pylist()) for c in ("input_ids", "attention_mask", "token_type_ids")]
    h = hashlib.sha256()
    for k in sorted(range(len(ids)), key=lambda k: ids[k]):
        n = int(tokens[1][k].sum())
        h.update(json.dumps([ids[k], int(labels[k]), tokens[0][k][:n].tolist(), tokens[2][k][:n].tolist()]).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_or_build_text_states(datasets: dict[str, Any], *, cache_dir: str, encoder: str, encoder_cache: str | None,
                              storage_kw: dict[str, Any], concurrency: int = 1, use_gpu: bool = False,
                              batch_size: int = 64) -> dict[str, tuple[Any, dict[str, Any]]]:
    """UMAF with a frozen text encoder: every split's token states, computed once by the encoder and
    reused by every epoch, run, trial and experiment cell on the same tokenised rows. ``datasets``
    hold :data:`TEXT_STATE_INPUTS` (the tokenised rows); ``encoder`` is the resolved model path/id."""
    def key(fingerprint: str) -> str:
        spec = {"format": CACHE_FORMAT_VERSION, "kind": "umaf-text-states", "encoder": encoder, "rows": fingerprint}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    return build_splits(
        datasets, cache_dir=cache_dir, key=key, storage_kw=storage_kw, concurrency=concurrency, use_gpu=use_gpu,
        batch_size=batch_size, columns=TEXT_STATE_COLUMNS, decode_kwargs=None, actor=TextStateActor,
        actor_kwargs={"encoder": encoder, "cache_dir": encoder_cache, "use_gpu": use_gpu},
        meta={"kind": "umaf-text-states", "encoder": encoder}, inputs=TEXT_STATE_INPUTS,
        fingerprint=token_rows_fingerprint,
    )


def decode_text_states(batch: dict[str, np.ndarray]) -> torch.Tensor:
    """Cached rows → ``text_states [B, L, d]`` float32, zero after each row's real tokens, ``L`` its
    longest row (the collate cuts the attention mask to the same length)."""
    shapes = np.asarray(batch["text_states_shape"]).reshape(-1, 2).astype(np.int64)
    longest, hidden = max(1, int(shapes[:, 0].max())), int(shapes[0, 1])
    states = np.zeros((len(shapes), longest, hidden), dtype=np.float32)
    for row, (data, (n, d)) in enumerate(zip(batch["text_states"], shapes)):
        states[row, :n] = np.frombuffer(data, dtype=FEATURE_DTYPE).reshape(n, d)
    return torch.from_numpy(states)
