"""The caption job's Ray Data pipeline: manifest → skip done ids → load images (CPU) → VLM actors → Parquet.

Streaming end to end: rows flow through the stages and the driver writes finished captions to
Parquet files at the output URI every ``output.rows_per_file`` rows or ``output.flush_seconds``,
whichever comes first (:mod:`umaf.caption.writer`), while later rows are still being generated, so
a crash loses at most one file's worth of rows plus the rows in flight. Each image is read and
resized once, in one plan (no branches that would re-run the read).

Resume and idempotence. The output dataset itself is the checkpoint: before starting, the driver
reads the ``id`` and ``status`` columns of the rows already at the output *with this run's
fingerprint* (:mod:`umaf.caption.fingerprint`; other fingerprints' rows are other caption sets) and
removes those ids from the work (``ok`` ids always; ``invalid``/``error`` ids too unless
``retry_failed``). We do not use Ray Data's
``CheckpointConfig``: it skips every id it has written whatever its status, so it cannot offer
``--retry-failed``, and it keeps a second copy of the ids beside the data; the status-aware skip is
a few lines over the data we write anyway. A run killed midway leaves complete Parquet files (and at
worst one torn file, which readers ignore); a re-run skips what those files hold. Rows an id may
gain across runs (``error`` then ``ok`` after a retry) are resolved by the readers in
:mod:`umaf.caption.store`.

Identical requests are captioned once. The image stage hashes each image anyway; with the text and
the fingerprint that gives the request key (:func:`umaf.caption.fingerprint.request_key`). A small
actor (:class:`RequestLedger`) holds the keys already captioned ``ok`` (at the output and at
``reuse_from``) and, for this run, the first pair that claimed each key. A pair whose request is
already captioned, or claimed by another pair of this run, skips the VLM (it rides through as an
error row with a marker, the path every backend already passes untouched); the driver sets it aside
and, once the run's captions are written, writes it as a copy of its twin's row (``reused_from``
names the twin). Across manifests this is what makes a re-prepared dataset, or HFM and MMSD2.0 pairs
with the same image and text, cost nothing the second time.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter as TallyCounter
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from umaf import storage
import numpy as np

from umaf.caption.backends import caption_row, model_label
from umaf.caption.config import CaptionConfig
from umaf.caption.fingerprint import Fingerprint, request_key
from umaf.caption.images import load_image, open_jpeg, resolve_image_uri
from umaf.caption.store import (
    CAPTION_SCHEMA,
    STATUS_ERROR,
    STATUS_INVALID,
    STATUS_OK,
    UNVERSIONED,
    fingerprint_filter,
    read_rows,
)
from umaf.caption.writer import CaptionMetrics, CaptionWriter
from umaf.data.manifest import schema_labels
from umaf.errors import UserError
from umaf.progress import ProgressLine, quiet_ray_data_logs

log = logging.getLogger("umaf.caption")

LOADED_SCHEMA = pa.schema([
    pa.field("id", pa.string()), pa.field("text", pa.string()), pa.field("image_jpeg", pa.binary()),
    pa.field("image_sha256", pa.string()), pa.field("error", pa.string()), pa.field("request_key", pa.string()),
])
# The error text of a pair whose identical request is captioned by another pair (see the docstring).
DUPLICATE_REQUEST = "duplicate request "
STATUSES = (STATUS_OK, STATUS_INVALID, STATUS_ERROR)

def storage_runtime_env() -> dict[str, Any] | None:
    """The driver's storage settings (endpoint, region; never credentials) for the data tasks."""
    from umaf.raycluster import checked_runtime_env

    return checked_runtime_env(storage.forwarded_env()) or None


def check_locations(config: CaptionConfig) -> None:
    """The given manifest exists and the captions folder is writable, or a UserError saying which."""
    if config.manifest:
        storage.require(config.manifest, "manifest", "make one with jobs/prepare.py, or fix --manifest",
                        **config.storage_kw)
    storage.require_folder(config.out, "captions folder", **config.storage_kw)
    check_model_uri(config)


def check_model_uri(config: CaptionConfig) -> None:
    """A model given as an object-store URI exists there, and only the vllm backend is asked to load it."""
    if "://" not in config.model:
        return
    if config.backend != "vllm":
        raise UserError(f"model={config.model}: the hf backend loads a hub id or a local folder; a model in object "
                        "storage is for backend=vllm (ray.data.llm downloads it on each node)")
    storage.require(storage.join(config.model, "config.json"), "model",
                    "copy the model there once with jobs/upload_model.py, or fix --model", **config.storage_kw)


def ensure_manifest(config: CaptionConfig) -> str:
    """The manifest URI to caption: the given one, or the demo dataset (written on first use)."""
    if config.manifest:
        return config.manifest
    from umaf.data.demo import write_demo

    manifest = storage.join(config.demo_dir, "manifest")
    if not storage.exists(manifest, **config.storage_kw):
        log.info("[caption stage=prepare dataset=demo] writing the demo dataset to %s", config.demo_dir)
        return write_demo(config.demo_dir, **config.storage_kw)["manifest"]
    return manifest


# ------------------------------------------------------------------------------------------------
# Pure planning: which ids to caption


def read_statuses(out_uri: str, schema: pa.Schema = CAPTION_SCHEMA, *, fingerprint: str | None = None,
                  **storage_kw) -> pa.Table:
    """``id``/``status`` of every row already at ``out_uri`` (empty table if there is none): captions,
    or any dataset with those columns that a job appends to (``schema``, e.g. predictions); only the
    rows of one caption set when ``fingerprint`` is given."""
    return read_rows(out_uri, schema, columns=["id", "status"], filter=fingerprint_filter(fingerprint), **storage_kw)


def done_ids(statuses: pa.Table, *, retry_failed: bool) -> pa.Array:
    """Ids not to caption again: those with an ``ok`` row; with any row unless ``retry_failed``."""
    if retry_failed:
        statuses = statuses.filter(pc.equal(statuses["status"], STATUS_OK))
    return pc.unique(statuses["id"]).cast(pa.string())


def _done_per_file(out_uri: str, schema: pa.Schema, *, retry_failed: bool, fingerprint: str | None,
                   **storage_kw) -> tuple[list[pa.Array], TallyCounter]:
    """Each file's :func:`done_ids` as soon as it is read (never every row's id and status at once),
    and the rows per status."""
    from umaf.caption.store import map_files

    def per_file(table: pa.Table) -> tuple[pa.Array, TallyCounter]:
        return done_ids(table, retry_failed=retry_failed), status_tally(table["status"])

    parts = map_files(out_uri, schema, per_file, columns=["id", "status"], filter=fingerprint_filter(fingerprint),
                      **storage_kw)
    return [ids for ids, _ in parts], sum((tally for _, tally in parts), TallyCounter())


def read_done(out_uri: str, schema: pa.Schema = CAPTION_SCHEMA, *, retry_failed: bool,
              fingerprint: str | None = None, **storage_kw) -> tuple[pa.Array, TallyCounter]:
    """(:func:`done_ids`, rows per status) of what is already at ``out_uri``, read file by file."""
    parts, tally = _done_per_file(out_uri, schema, retry_failed=retry_failed, fingerprint=fingerprint, **storage_kw)
    return (pc.unique(pa.chunked_array(parts, pa.string())) if parts else pa.array([], pa.string())), tally


# Selected ids per lookup slice in pending_ids: the largest hash table the skip set builds.
PENDING_SLICE = 1 << 20


def pending_ids(selected: pa.Array, out_uri: str, *, retry_failed: bool, fingerprint: str | None = None,
                **storage_kw) -> tuple[pa.Array, TallyCounter]:
    """The skip set applied: the ``selected`` ids not done at ``out_uri`` (each once, in selection
    order), and the rows per status there.

    Memory, for 10M finished rows (bench/caption_skipset_bench.py): the done ids are kept as read, and
    the selection is looked up a slice of ``PENDING_SLICE`` ids at a time (which done ids fall in this
    slice, then which of the slice's ids are among those), so no hash table holds more than one slice:
    one table of the 9M done ids (``is_in(selected, value_set=done)``) peaked ~0.3 GB higher.
    """
    parts, tally = _done_per_file(out_uri, CAPTION_SCHEMA, retry_failed=retry_failed, fingerprint=fingerprint,
                                  **storage_kw)
    done = pa.chunked_array([part for part in parts if len(part)], pa.string())
    if len(done):
        keep = np.ones(len(selected), dtype=bool)
        for start in range(0, len(selected), PENDING_SLICE):
            part = selected.slice(start, PENDING_SLICE)
            found = pc.filter(done, pc.is_in(done, value_set=part))
            if len(found):
                keep[start:start + len(part)] = ~pc.is_in(part, value_set=found).to_numpy(zero_copy_only=False)
        selected = pc.filter(selected, pa.array(keep))
    return pc.unique(selected), tally


def status_tally(status: pa.Array | pa.ChunkedArray) -> TallyCounter:
    """Rows per status value, counted in Arrow (no Python string per row)."""
    counts = pc.value_counts(status)
    return TallyCounter(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))


def latest_status_counts(statuses: pa.Table) -> dict[str, int]:
    """Per id, the best status it has (ok beats invalid beats error), counted: the dataset's state."""
    rank = {STATUS_OK: 0, STATUS_INVALID: 1, STATUS_ERROR: 2}
    if statuses.num_rows == 0:
        return dict.fromkeys(rank, 0)
    ranks = pc.coalesce(pc.index_in(statuses["status"], value_set=pa.array(list(rank))), 2)
    best = pa.table({"id": statuses["id"], "r": ranks}).group_by("id").aggregate([("r", "min")])
    tally = TallyCounter(best["r_min"].to_pylist())
    return {status: tally.get(r, 0) for status, r in rank.items()}


def select_ids(manifest_uri: str, config: CaptionConfig) -> tuple[pa.Array, str]:
    """The manifest ids this run is about (splits, then the first ``limit``), and the dataset name."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(manifest_uri, **config.storage_kw)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    name, _ = schema_labels(dataset.schema)
    table = dataset.to_table(columns=["id", "split"])
    if config.splits:
        table = table.filter(pc.is_in(table["split"], pa.array(list(config.splits))))
    ids = table["id"].combine_chunks()
    if config.limit is not None:
        ids = ids.slice(0, config.limit)
    return ids, name or "unknown"


# ------------------------------------------------------------------------------------------------
# Ray Data stages (module-level so Ray pickles them by reference)


_IDS_CACHE: dict[Any, pa.Array] = {}


def keep_ids(batch: pa.Table, *, ids_ref_box: list) -> pa.Table:
    """Filter stage: keep only rows whose id is to be captioned.

    The id array lives once in the object store; ``ids_ref_box`` wraps its ref in a list so Ray
    does not inline the array into every task, and each worker process fetches it once.
    """
    import ray

    ref = ids_ref_box[0]
    ids = _IDS_CACHE.get(ref)
    if ids is None:
        _IDS_CACHE.clear()
        ids = _IDS_CACHE[ref] = ray.get(ref)
    return batch.filter(pc.is_in(batch["id"], value_set=ids))


def load_images_batch(batch: pa.Table, *, manifest_uri: str, images: dict, storage_kw: dict,
                      fingerprint: str | None = None, ledger: Any = None) -> pa.Table:
    """CPU stage: read, check and downscale each row's image; a bad image becomes an ``error`` value.

    With a ``fingerprint``, each loaded row gets its request key; with a ``ledger``
    (:class:`RequestLedger`), a row whose request another pair captions skips the VLM
    (:func:`mark_duplicates`)."""
    jpegs, shas, errors = [], [], []
    for image in batch["image"].to_pylist():
        uri = resolve_image_uri(image, manifest_uri) if image else None
        loaded = load_image(uri, max_side=images["max_side"], max_bytes=images["max_bytes"],
                            max_pixels=images["max_pixels"], jpeg_quality=images["jpeg_quality"],
                            storage_kw=storage_kw, max_area=images["max_area"], multiple_of=images["multiple_of"],
                            min_side=images["min_side"], max_aspect_ratio=images["max_aspect_ratio"])
        jpegs.append(loaded.jpeg)
        shas.append(loaded.sha256)
        errors.append(loaded.error)
    texts = batch["text"].cast(pa.string()).to_pylist()
    keys = [request_key(fingerprint, sha, text) if fingerprint and sha and err is None else None
            for sha, text, err in zip(shas, texts, errors)]
    if ledger is not None:
        jpegs, errors = mark_duplicates(batch["id"].to_pylist(), keys, jpegs, errors, ledger)
    return pa.Table.from_arrays(
        [batch["id"].cast(pa.string()), batch["text"].cast(pa.string()), pa.array(jpegs, pa.binary()),
         pa.array(shas, pa.string()), pa.array(errors, pa.string()), pa.array(keys, pa.string())],
        schema=LOADED_SCHEMA,
    )


def mark_duplicates(ids: list[str], keys: list[str | None], jpegs: list, errors: list,
                    ledger: Any) -> tuple[list, list]:
    """Ask the ledger who captions each request; a row that is not its request's captioner drops its
    image and carries ``DUPLICATE_REQUEST <key>`` as its error, so the VLM stage passes it through."""
    import ray

    owners = ray.get(ledger.claim.remote(keys, ids))
    jpegs, errors = list(jpegs), list(errors)
    for i, owner in enumerate(owners):
        if owner is not None:
            jpegs[i], errors[i] = None, f"{DUPLICATE_REQUEST}{keys[i]}"
    return jpegs, errors


class RequestLedger:
    """Ray actor: who captions each distinct request (see the module docstring).

    ``done``: the request keys already captioned ``ok``, as :func:`key_words` pairs sorted by the
    high word (10M keys: 160 MB, looked up with ``searchsorted``, no Python object per key). Claims of
    this run: the first pair to claim a key captions it; a claim by the same pair again (a retried
    task) gets the same answer.
    """

    def __init__(self, done: tuple[np.ndarray, np.ndarray]):
        self.hi, self.lo = done
        self.owner: dict[str, str] = {}

    def claim(self, keys: list[str | None], ids: list[str]) -> list[str | None]:
        """Per row: None (caption it), else the twin it copies ("" for a request captioned before this run)."""
        out: list[str | None] = []
        for key, pair_id in zip(keys, ids):
            if key is None:
                out.append(None)
            elif self._done(key):
                out.append("")
            else:
                owner = self.owner.setdefault(key, pair_id)
                out.append(None if owner == pair_id else owner)
        return out

    def _done(self, key: str) -> bool:
        hi, lo = np.uint64(int(key[:16], 16)), np.uint64(int(key[16:], 16))
        start, stop = np.searchsorted(self.hi, hi, "left"), np.searchsorted(self.hi, hi, "right")
        return bool((self.lo[start:stop] == lo).any())


def key_words(keys: pa.Array | pa.ChunkedArray, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """32-hex request keys → their 128 bits as (high, low) uint64 words, parsed from Arrow's buffer a
    million keys at a time (``bytes.fromhex``; no Python string per key)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    fixed = pc.cast(keys, pa.binary(32))
    buffer = memoryview(fixed.buffers()[1])[fixed.offset * 32:(fixed.offset + len(fixed)) * 32]
    words = np.empty((len(fixed), 2), dtype=np.uint64)
    for start in range(0, len(fixed), chunk):
        part = bytes.fromhex(buffer[start * 32:(start + chunk) * 32].tobytes().decode("ascii"))
        words[start:start + chunk] = np.frombuffer(part, dtype=">u8").reshape(-1, 2)
    return words[:, 0].copy(), words[:, 1].copy()


def done_request_keys(uris: list[str], fingerprint: str, **storage_kw) -> tuple[np.ndarray, np.ndarray]:
    """The request keys of the ``ok`` rows of ``fingerprint`` at ``uris``, as :func:`key_words` pairs
    sorted by the high word (duplicates are harmless)."""
    from umaf.caption.store import map_files

    his, los = [], []
    for uri in uris:
        # File by file: the keys as two uint64 words each (16 bytes) as soon as they are read, never
        # 10M 32-character strings at once.
        for hi, lo in map_files(uri, CAPTION_SCHEMA, lambda table: key_words(table["request_key"]),
                                columns=["request_key"], filter=fingerprint_filter(fingerprint)
                                & (pc.field("status") == STATUS_OK) & pc.field("request_key").is_valid(), **storage_kw):
            his.append(hi)
            los.append(lo)
    hi = np.concatenate(his) if his else np.array([], np.uint64)
    lo = np.concatenate(los) if los else np.array([], np.uint64)
    order = np.argsort(hi, kind="stable")
    return hi[order], lo[order]


def split_duplicates(batch: pa.Table) -> tuple[pa.Table, list[tuple[str, str]]]:
    """A batch of caption rows → (rows to write now, ``(id, request key)`` of rows to copy later)."""
    # A block whose rows all have no error arrives with a null-typed column (Ray Data infers it from
    # the values): as strings, the test reads it the same way for every block.
    errors = batch["error"].cast(pa.string())
    marked = pc.fill_null(pc.and_(pc.equal(batch["status"].cast(pa.string()), STATUS_ERROR),
                                  pc.starts_with(errors, DUPLICATE_REQUEST)), False)
    if not pc.any(marked).as_py():
        return batch, []
    dupes = batch.filter(marked).set_column(batch.schema.get_field_index("error"), "error",
                                            errors.filter(marked))
    pending = [(pair_id, error[len(DUPLICATE_REQUEST):])
               for pair_id, error in zip(dupes["id"].to_pylist(), dupes["error"].to_pylist())]
    return batch.filter(pc.invert(marked)), pending


def copy_rows(pending: list[tuple[str, str]], uris: list[str], fingerprint: Fingerprint,
              **storage_kw) -> tuple[pa.Table, list[str]]:
    """The rows for ``pending`` ``(id, key)`` pairs: each a copy of the best row of its request at
    ``uris`` (ok, then invalid, then error; the latest), with its own id and ``reused_from`` naming the
    twin. Returns ``(rows, ids whose twin was not found)``."""
    keys = sorted({key for _, key in pending})
    rank = {STATUS_OK: 0, STATUS_INVALID: 1, STATUS_ERROR: 2}
    best: dict[str, dict] = {}
    for uri in uris:
        rows = read_rows(uri, CAPTION_SCHEMA, filter=fingerprint_filter(fingerprint.id)
                         & pc.field("request_key").isin(pa.array(keys, pa.string())), **storage_kw)
        for row in rows.to_pylist():
            current = best.get(row["request_key"])
            if current is None or _twin_score(row, rank) > _twin_score(current, rank):
                best[row["request_key"]] = row
    now = datetime.now(timezone.utc)
    out, missing = [], []
    for pair_id, key in pending:
        twin = best.get(key)
        if twin is None:
            missing.append(pair_id)
            continue
        out.append({**twin, "id": pair_id, "reused_from": twin["reused_from"] or twin["id"], "captioned_at": now})
    return pa.Table.from_pylist(out, schema=CAPTION_SCHEMA), missing


def _twin_score(row: dict, rank: dict) -> tuple:
    """Best status, then a generated row over a copy, then the latest."""
    return -rank.get(row["status"], 2), row["reused_from"] is None, row["captioned_at"]


def stamp_fingerprint(batch: pa.Table, fingerprint: Fingerprint) -> pa.Table:
    """Caption rows of this run → with their fingerprint columns set."""
    n = batch.num_rows
    for name, value in (("fingerprint", fingerprint.id), ("fingerprint_spec", fingerprint.spec_json)):
        column = pa.array([value] * n, pa.string())
        batch = (batch.set_column(batch.schema.get_field_index(name), name, column) if name in batch.column_names
                 else batch.append_column(name, column))
    return batch


class HFCaptioner:
    """VLM actor (hf backend): one model per actor; error rows from the image stage pass straight through."""

    def __init__(self, config_json: str, dataset: str):
        from umaf.caption.backends import HFBackend
        from umaf.progress import actor_logging

        actor_logging(log)
        self.config = CaptionConfig.model_validate_json(config_json)
        start = time.perf_counter()
        self.backend = HFBackend(self.config)
        self.sampling_json = self.config.sampling.as_json()
        self.dataset = dataset
        log.info("[caption stage=vlm dataset=%s] actor loaded %s on %s in %.1fs", dataset,
                 self.backend.model_name, self.backend.device, time.perf_counter() - start)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch["id"].to_pylist()
        errors = batch["error"].to_pylist()
        shas = batch["image_sha256"].to_pylist()
        keys = batch["request_key"].to_pylist()
        todo = [i for i, err in enumerate(errors) if err is None]
        generations: dict[int, Any] = {}
        if todo:
            texts = batch["text"].to_pylist()
            jpegs = batch["image_jpeg"].to_pylist()
            try:
                outs = self.backend.generate([texts[i] for i in todo], [open_jpeg(jpegs[i]) for i in todo])
                generations = dict(zip(todo, outs))
            except Exception as exc:  # one bad batch must not kill the job: its rows become error rows
                log.exception("[caption stage=vlm dataset=%s] generate failed for %d rows", self.dataset, len(todo))
                for i in todo:
                    errors[i] = f"generation failed: {type(exc).__name__}: {exc}"
        now = datetime.now(timezone.utc)
        rows = [
            caption_row(ids[i], model=self.backend.model_name, sampling_json=self.sampling_json,
                        image_sha256=shas[i], generation=generations.get(i), error=errors[i],
                        max_field_chars=self.config.max_field_chars, captioned_at=now, request_key=keys[i])
            for i in range(len(ids))
        ]
        return pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)


def _vllm_stage(loaded, config: CaptionConfig):
    """The ``ray.data.llm`` processor over the loaded rows, then every output row as a caption row.

    One pass: rows whose image failed to load go through the processor too, marked as errors by
    the preprocess, so no stage touches them and the plan has no filter/union branches (two
    branches would each re-run the read and image-load chain: every image loaded twice).
    """
    from functools import partial

    from ray.data.llm import build_processor

    from umaf.caption.backends import vllm_error_to_caption, vllm_output_to_caption, vllm_processor_config, vllm_request

    from umaf.caption.llm_stages import guard_cpu_stages

    processor_config = vllm_processor_config(config)
    # build_processor downloads an s3:// model's tokenizer here, in the driver, through boto3, which
    # reads the store's address from the environment only: give the driver the same env_vars as the
    # actors, or storage.endpoint_url=MinIO would send that download to AWS.
    with storage.scoped_env((processor_config.runtime_env or {}).get("env_vars", {})):
        processor = build_processor(
            processor_config,
            preprocess=partial(vllm_request, config=config),
            postprocess=partial(vllm_output_to_caption, config=config),
        )
    guard_cpu_stages(processor)  # a row that breaks a CPU stage becomes an error row, not a failed job
    return processor(loaded).map(
        vllm_error_to_caption, fn_kwargs={"model": model_label(config), "sampling_json": config.sampling.as_json()})


# ------------------------------------------------------------------------------------------------
# The job


def run_caption(config: CaptionConfig, *, ids: pa.Array | None = None) -> dict[str, Any]:
    """Caption what is not yet done; return the summary (also written to ``<out>/_summary.json``).

    ``ids``: caption only these manifest ids (a pilot), instead of ``splits``/``limit``."""
    import ray
    from ray.data import ActorPoolStrategy

    started = time.time()
    manifest_uri = ensure_manifest(config)
    check_locations(config)
    selected, dataset = select_ids(manifest_uri, config)
    if ids is not None:
        selected = pc.filter(selected, pc.is_in(selected, value_set=ids))
    tag = f"[caption dataset={dataset}"
    config, fingerprint = pin_fingerprint(config)
    todo, before = pending_ids(selected, config.out, retry_failed=config.retry_failed, fingerprint=fingerprint.id,
                               **config.storage_kw)
    log.info("%s stage=plan] %d selected, %d already done at %s with fingerprint %s, %d to caption (backend=%s "
             "model=%s)", tag, len(selected), len(selected) - len(todo), config.out, fingerprint.id, len(todo),
             config.backend, config.model)
    warn_other_sets(config, fingerprint)
    sources = [config.out, *config.reuse_from]
    reused, uncopied = 0, []

    if len(todo):
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = True
        io_args = {"runtime_env": env} if (env := storage_runtime_env()) else {}
        mfs, mpath = storage.resolve(manifest_uri, **config.storage_kw)
        ds = ray.data.read_parquet(mpath, filesystem=mfs, ray_remote_args=io_args).select_columns(["id", "text", "image"])
        ds = ds.map_batches(keep_ids, fn_kwargs={"ids_ref_box": [ray.put(todo)]}, batch_format="pyarrow")
        # Streaming repartition into small blocks: a manifest file is one big block, and an actor
        # emits its output only when it has finished a block. Small blocks keep captions flowing to
        # storage (and to a resumed run) instead of arriving all at once at the end.
        ds = ds.repartition(target_num_rows_per_block=max(config.actors.batch_size, config.images.batch_size))
        # The image stage asks for a different CPU share than the VLM actors on purpose: Ray Data
        # then keeps it a separate stage of plain tasks instead of fusing it into the actors, so
        # decoding and resizing run on spare CPUs while the (GPU) actors only generate.
        ledger = start_ledger(sources, fingerprint, config.storage_kw)
        loaded = ds.map_batches(
            load_images_batch, batch_format="pyarrow", batch_size=config.images.batch_size, num_cpus=0.5, **io_args,
            fn_kwargs={"manifest_uri": manifest_uri, "images": config.images.model_dump(),
                       "storage_kw": config.storage_kw, "fingerprint": fingerprint.id, "ledger": ledger},
        )
        a = config.actors
        if config.backend == "hf":
            captions = loaded.map_batches(
                HFCaptioner, fn_constructor_kwargs={"config_json": config.model_dump_json(), "dataset": dataset},
                compute=ActorPoolStrategy(min_size=a.min_actors, max_size=a.max_actors),
                batch_size=a.batch_size, batch_format="pyarrow", num_gpus=a.num_gpus, num_cpus=a.num_cpus,
            )
        else:
            captions = _vllm_stage(loaded, config)
        ofs, opath = storage.resolve(config.out, **config.storage_kw)
        ofs.create_dir(opath, recursive=True)
        o = config.output
        log.info("%s stage=write] writing captions to %s (a file every %d rows or %.0fs)", tag, config.out,
                 o.rows_per_file, o.flush_seconds)
        metrics = CaptionMetrics(dataset, model_label(config))
        progress = ProgressLine(log, f"{tag} stage=generate] captioned", len(todo), unit="pairs",
                                every_s=config.output.progress_every_s)
        statuses: TallyCounter = TallyCounter()
        pending: list[tuple[str, str]] = []  # (id, request key) of pairs whose twin is captioned
        # Ray Data's own progress on the driver is a block of lines per operator every 10 s when the
        # console is not a terminal (CI, `ray job logs`): one line with the rate and ETA says more.
        # On a terminal its bars still draw.
        with quiet_ray_data_logs(), CaptionWriter(
                config.out, rows_per_file=o.rows_per_file, flush_seconds=o.flush_seconds, attempts=o.write_attempts,
                storage_kw=config.storage_kw, metrics=metrics) as writer:
            for batch in captions.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                batch, twins = split_duplicates(stamp_fingerprint(batch, fingerprint))
                pending += twins
                writer.add(batch)
                statuses.update(batch["status"].to_pylist())
                progress.update(batch.num_rows + len(twins), _status_text(statuses))
        progress.finish(_status_text(statuses))
        reused, uncopied = write_copies(pending, sources, fingerprint, config, tag, metrics)

    after = read_statuses(config.out, fingerprint=fingerprint.id, **config.storage_kw)
    new_rows = after.num_rows - before.total()
    this_run = status_tally(after["status"]) - before
    summary = {
        "dataset": dataset, "manifest": manifest_uri, "out": config.out, "backend": config.backend,
        "model": config.model, "fingerprint": fingerprint.id, "fingerprint_spec": fingerprint.spec,
        "selected": len(selected), "skipped": len(selected) - len(todo),
        "captioned": new_rows, "this_run": {s: this_run.get(s, 0) for s in STATUSES},
        "reused": reused, "not_copied": len(uncopied),
        "dataset_status": latest_status_counts(after), "seconds": round(time.time() - started, 2),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    summary.update(quality_report(config, fingerprint, tag))
    storage.write_json_atomic(storage.join(config.out, "_summary.json"), summary, **config.storage_kw)
    log.info("%s stage=summary] %s", tag, json.dumps({k: v for k, v in summary.items()
                                                      if k not in ("quality", "fingerprint_spec")}))
    return summary


def _status_text(statuses: TallyCounter) -> str:
    return ", ".join(f"{status} {statuses.get(status, 0)}" for status in STATUSES)


# ------------------------------------------------------------------------------------------------
# Fingerprints, twins and the quality report around the run


def pin_fingerprint(config: CaptionConfig) -> tuple[CaptionConfig, Fingerprint]:
    """This run's fingerprint, and the config with a hub model pinned to the commit it names."""
    from umaf.caption.fingerprint import caption_fingerprint, model_identity

    model = model_identity(config)
    if "hub" in model:
        config = config.model_copy(update={"model_revision": model["revision"]})
    return config, caption_fingerprint(config, model=model)


def warn_other_sets(config: CaptionConfig, fingerprint: Fingerprint) -> None:
    """Say when --out already holds other caption sets (they stay; this run adds its own beside them)."""
    from umaf.caption.store import caption_sets, describe_sets

    others = [c for c in caption_sets(config.out, **config.storage_kw) if c["fingerprint"] != fingerprint.id]
    if others:
        log.info("[caption stage=plan] %s also holds %d other caption set(s), kept beside this one: %s%s", config.out,
                 len(others), describe_sets(others),
                 "; 'unversioned' rows were written before fingerprints and are never taken as done"
                 if any(c["fingerprint"] == UNVERSIONED for c in others) else "")


def start_ledger(sources: list[str], fingerprint: Fingerprint, storage_kw: dict):
    """The :class:`RequestLedger` actor of this run, on the driver's node (it lives as long as the driver)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    done = done_request_keys(sources, fingerprint.id, **storage_kw)
    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(RequestLedger).options(
        num_cpus=0, max_restarts=3, max_task_retries=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
    )
    log.info("[caption stage=plan] %d requests already captioned ok with fingerprint %s at %s", len(done[0]),
             fingerprint.id, ", ".join(sources))
    return actor.remote(done)


def write_copies(pending: list[tuple[str, str]], sources: list[str], fingerprint: Fingerprint,
                 config: CaptionConfig, tag: str, metrics: CaptionMetrics | None = None) -> tuple[int, list[str]]:
    """Write the pairs whose identical request another pair captioned as copies of its row."""
    if not pending:
        return 0, []
    rows, missing = copy_rows(pending, sources, fingerprint, **config.storage_kw)
    o = config.output
    with CaptionWriter(config.out, rows_per_file=o.rows_per_file, flush_seconds=o.flush_seconds,
                       attempts=o.write_attempts, storage_kw=config.storage_kw, metrics=metrics) as writer:
        writer.add(rows)
    log.info("%s stage=reuse] %d pairs had an identical request already captioned: copied, not generated%s", tag,
             rows.num_rows, f"; {len(missing)} twins not found (captioned again next run)" if missing else "")
    return rows.num_rows, missing


def quality_report(config: CaptionConfig, fingerprint: Fingerprint, tag: str) -> dict[str, Any]:
    """The quality report of this run's caption set (its summary goes into ``_summary.json``)."""
    from umaf.caption.report import write_report

    try:
        report = write_report(config.out, fingerprint.id, **config.storage_kw)
    except Exception:  # noqa: BLE001 - the captions are written; a report failure must not fail the run
        log.exception("%s stage=report] could not write the quality report", tag)
        return {}
    log.info("%s stage=report] quality report: %s", tag, report["report"])
    return {"quality": report["quality"], "report": report["report"]}
