"""The caption job's Ray Data pipeline: manifest → skip done ids → load images (CPU) → VLM actors → Parquet.

Streaming end to end: rows flow through the stages and the driver writes finished captions to
Parquet files at the output URI every ``output.rows_per_file`` rows or ``output.flush_seconds``,
whichever comes first (:mod:`umaf.caption.writer`), while later rows are still being generated, so
a crash loses at most one file's worth of rows plus the rows in flight. Each image is read and
resized once, in one plan (no branches that would re-run the read).

Resume and idempotence. The output dataset itself is the checkpoint: before starting, the driver
reads the ``id`` and ``status`` columns already at the output and removes those ids from the work
(``ok`` ids always; ``invalid``/``error`` ids too unless ``retry_failed``). We do not use Ray Data's
``CheckpointConfig``: it skips every id it has written whatever its status, so it cannot offer
``--retry-failed``, and it keeps a second copy of the ids beside the data; the status-aware skip is
a few lines over the data we write anyway. A run killed midway leaves complete Parquet files (and at
worst one torn file, which readers ignore); a re-run skips what those files hold. Rows an id may
gain across runs (``error`` then ``ok`` after a retry) are resolved by the readers in
:mod:`umaf.caption.store`.
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
from umaf.caption.backends import caption_row, model_label
from umaf.caption.config import CaptionConfig
from umaf.caption.images import load_image, open_jpeg, resolve_image_uri
from umaf.caption.store import CAPTION_SCHEMA, STATUS_ERROR, STATUS_INVALID, STATUS_OK, read_rows
from umaf.caption.writer import CaptionMetrics, CaptionWriter
from umaf.data.manifest import schema_labels
from umaf.progress import ProgressLine, quiet_ray_data_logs

log = logging.getLogger("umaf.caption")

LOADED_SCHEMA = pa.schema([
    pa.field("id", pa.string()), pa.field("text", pa.string()), pa.field("image_jpeg", pa.binary()),
    pa.field("image_sha256", pa.string()), pa.field("error", pa.string()),
])
STATUSES = (STATUS_OK, STATUS_INVALID, STATUS_ERROR)

def storage_runtime_env() -> dict[str, Any] | None:
    """The driver's storage settings (endpoint, region; never credentials) for the data tasks."""
    env = storage.forwarded_env()
    return {"env_vars": env} if env else None


def check_locations(config: CaptionConfig) -> None:
    """The given manifest exists and the captions folder is writable, or a UserError saying which."""
    if config.manifest:
        storage.require(config.manifest, "manifest", "make one with jobs/prepare.py, or fix --manifest",
                        **config.storage_kw)
    storage.require_folder(config.out, "captions folder", **config.storage_kw)


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


def read_statuses(out_uri: str, schema: pa.Schema = CAPTION_SCHEMA, **storage_kw) -> pa.Table:
    """``id``/``status`` of every row already at ``out_uri`` (empty table if there is none): captions,
    or any dataset with those columns that a job appends to (``schema``, e.g. predictions)."""
    empty = pa.table({"id": pa.array([], pa.string()), "status": pa.array([], pa.string())})
    if not storage.exists(out_uri, **storage_kw):
        return empty
    try:
        return read_rows(out_uri, schema, columns=["id", "status"], **storage_kw)
    except (FileNotFoundError, pa.ArrowInvalid) as exc:
        if "no files" in str(exc).lower() or isinstance(exc, FileNotFoundError):
            return empty
        raise


def done_ids(statuses: pa.Table, *, retry_failed: bool) -> pa.Array:
    """Ids not to caption again: those with an ``ok`` row; with any row unless ``retry_failed``."""
    if retry_failed:
        statuses = statuses.filter(pc.equal(statuses["status"], STATUS_OK))
    return pc.unique(statuses["id"]).cast(pa.string())


def latest_status_counts(statuses: pa.Table) -> dict[str, int]:
    """Per id, the best status it has (ok beats invalid beats error), counted: the dataset's state."""
    rank = {STATUS_OK: 0, STATUS_INVALID: 1, STATUS_ERROR: 2}
    best: dict[str, int] = {}
    for pair_id, status in zip(statuses["id"].to_pylist(), statuses["status"].to_pylist()):
        r = rank.get(status, 2)
        if r < best.get(pair_id, 3):
            best[pair_id] = r
    tally = TallyCounter(best.values())
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


def load_images_batch(batch: pa.Table, *, manifest_uri: str, images: dict, storage_kw: dict) -> pa.Table:
    """CPU stage: read, check and downscale each row's image; a bad image becomes an ``error`` value."""
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
    return pa.Table.from_arrays(
        [batch["id"].cast(pa.string()), batch["text"].cast(pa.string()), pa.array(jpegs, pa.binary()),
         pa.array(shas, pa.string()), pa.array(errors, pa.string())],
        schema=LOADED_SCHEMA,
    )


class HFCaptioner:
    """VLM actor (hf backend): one model per actor; error rows from the image stage pass straight through."""

    def __init__(self, config_json: str, dataset: str):
        from umaf.caption.backends import HFBackend

        self.config = CaptionConfig.model_validate_json(config_json)
        start = time.perf_counter()
        self.backend = HFBackend(self.config)
        self.sampling_json = self.config.sampling.as_json()
        self.dataset = dataset
        log.info("[caption stage=vlm dataset=%s] actor loaded %s on %s in %.1fs", dataset,
                 self.backend.model_name, self.backend.device, time.perf_counter() - start)

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        ids = batch["id"].to_pylist()
        errors = batch["error"].to_pylist()
        shas = batch["image_sha256"].to_pylist()
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
                        max_field_chars=self.config.max_field_chars, captioned_at=now)
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

    processor = build_processor(
        vllm_processor_config(config),
        preprocess=partial(vllm_request, config=config),
        postprocess=partial(vllm_output_to_caption, config=config),
    )
    return processor(loaded).map(
        vllm_error_to_caption, fn_kwargs={"model": model_label(config), "sampling_json": config.sampling.as_json()})


# ------------------------------------------------------------------------------------------------
# The job


def run_caption(config: CaptionConfig) -> dict[str, Any]:
    """Caption what is not yet done; return the summary (also written to ``<out>/_summary.json``)."""
    import ray
    from ray.data import ActorPoolStrategy

    started = time.time()
    manifest_uri = ensure_manifest(config)
    check_locations(config)
    selected, dataset = select_ids(manifest_uri, config)
    tag = f"[caption dataset={dataset}"
    before = read_statuses(config.out, **config.storage_kw)
    done = done_ids(before, retry_failed=config.retry_failed)
    todo = pc.filter(selected, pc.invert(pc.is_in(selected, value_set=done))) if len(done) else selected
    todo = pc.unique(todo)
    log.info("%s stage=plan] %d selected, %d already done at %s, %d to caption (backend=%s model=%s)",
             tag, len(selected), len(selected) - len(todo), config.out, len(todo), config.backend, config.model)

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
        loaded = ds.map_batches(
            load_images_batch, batch_format="pyarrow", batch_size=config.images.batch_size, num_cpus=0.5, **io_args,
            fn_kwargs={"manifest_uri": manifest_uri, "images": config.images.model_dump(),
                       "storage_kw": config.storage_kw},
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
        # Ray Data's own progress on the driver is a block of lines per operator every 10 s when the
        # console is not a terminal (CI, `ray job logs`): one line with the rate and ETA says more.
        # On a terminal its bars still draw.
        with quiet_ray_data_logs(), CaptionWriter(
                config.out, rows_per_file=o.rows_per_file, flush_seconds=o.flush_seconds, attempts=o.write_attempts,
                storage_kw=config.storage_kw, metrics=metrics) as writer:
            for batch in captions.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                writer.add(batch)
                statuses.update(batch["status"].to_pylist())
                progress.update(batch.num_rows, _status_text(statuses))
        progress.finish(_status_text(statuses))

    after = read_statuses(config.out, **config.storage_kw)
    new_rows = after.num_rows - before.num_rows
    this_run = _count(after["status"]) - _count(before["status"])
    summary = {
        "dataset": dataset, "manifest": manifest_uri, "out": config.out, "backend": config.backend,
        "model": config.model, "selected": len(selected), "skipped": len(selected) - len(todo),
        "captioned": new_rows, "this_run": {s: this_run.get(s, 0) for s in STATUSES},
        "dataset_status": latest_status_counts(after), "seconds": round(time.time() - started, 2),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    storage.write_json_atomic(storage.join(config.out, "_summary.json"), summary, **config.storage_kw)
    log.info("%s stage=summary] %s", tag, json.dumps(summary))
    return summary


def _status_text(statuses: TallyCounter) -> str:
    return ", ".join(f"{status} {statuses.get(status, 0)}" for status in STATUSES)


def _count(status: pa.ChunkedArray) -> TallyCounter:
    return TallyCounter(status.to_pylist())
