"""The predict job's pipeline: manifest (+ captions) → skip done ids → actors holding the run's best
model → Parquet, then ``_metrics.json`` where the manifest has the run's labels.

Inputs are prepared on the driver as training prepares them: the manifest rows (``splits``,
``limit``), and for UMAF the captions joined by id through the training's own
:func:`umaf.train.umaf_method.join_captions` with the run's ``missing_caption`` policy (``text_only``:
T alone; ``drop``: such a pair becomes an error row here, since dropping it would label nothing).
Tokenisation, the token budget and the encoders are the run's (:mod:`umaf.predict.model`).

**Batches and order.** The rows are cut into batches on the driver: within each split, in manifest
order, consecutive runs of ``actors.batch_size`` rows (UMAF) or of the run's ``eval_batch_size``
(SPP-SCL, whose CMF attends across the batch: a pair's prediction depends on its batch-mates). SPP-SCL
follows the run's reported evaluation protocol (``eval`` in its model card): ``train_context``, each
pair predicted with the run's training pairs as its only batch-mates (:meth:`RunModel.predict_rows`);
``official_order``, the split in its source files' order (``source_index``). So on a run's own test
split the predictions, and ``_metrics.json``, are the run's. Each Ray Data block holds whole batches and
each actor call runs them one by one (``batch`` column), so Ray never regroups them.

**Resume.** The output dataset is the checkpoint, as in the caption job: ids with an ``ok`` row
(and, unless ``retry_failed``, an ``error`` row) are not predicted again. UMAF runs only the missing
ids. SPP-SCL reruns every batch that has a missing id whole (its batch-mates unchanged) and writes
only the missing ids, so a killed and resumed run writes what an uninterrupted one would. ``limit``
works the same way: it selects the first N rows to write, and SPP-SCL still runs them in their
batches of the whole split.

**Bad rows.** Empty text, a missing or unreadable image (SPP-SCL), a pair without caption under
``missing_caption=drop``, or a batch whose forward pass raised, become ``status=error`` rows with
the reason, and the job goes on; ``--retry-failed`` redoes them.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter as TallyCounter
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umaf import storage
from umaf.caption.pipeline import latest_status_counts, read_done, read_statuses, status_tally
from umaf.caption.store import (
    STATUS_ERROR,
    STATUS_OK,
    choose_fingerprint,
    caption_sets,
    latest_ok,
    read_ok_captions,
    read_rows,
)
from umaf.caption.writer import CaptionWriter
from umaf.data.manifest import SOURCE_INDEX, label_column, read_manifest
from umaf.errors import UserError
from umaf.predict.config import PredictConfig
from umaf.progress import ProgressLine, quiet_ray_data_logs

log = logging.getLogger("umaf.predict")

PREDICTION_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string()),
    pa.field("label", pa.string()),  # the predicted label's name
    pa.field("label_index", pa.int64()),
    pa.field("probabilities", pa.list_(pa.float32())),  # one per class, in the run's label order
    pa.field("status", pa.string(), nullable=False),  # ok | error
    pa.field("error", pa.string()),
    pa.field("model", pa.string()),  # <run>/best@<sha256 of the weights, 12 hex> (epoch N)
    pa.field("predicted_at", pa.timestamp("us", tz="UTC")),
])
STATUSES = (STATUS_OK, STATUS_ERROR)
SUMMARY_FILE, METRICS_FILE = "_summary.json", "_metrics.json"  # "_": dataset readers skip them
BATCH, EMIT = "batch", "emit"
SELECTED = "_selected"  # within splits/limit (a row outside the limit may still be a batch-mate)
ROW_COLUMNS = ("id", "split", "text", "image", "image_ok", "error")


def predict_runtime_env() -> dict[str, Any]:
    """The predict actors' runtime env: the driver's storage settings (never credentials)."""
    from umaf.raycluster import checked_runtime_env

    return checked_runtime_env(storage.forwarded_env())


def check_locations(config: PredictConfig) -> dict[str, Any]:
    """The run has a best model, the inputs exist, the output folder is writable (else a UserError
    naming which); returns the run's model card."""
    from umaf.predict.model import read_card, require_predictable

    kw = config.storage_kw
    card = read_card(config.run, **kw)
    require_predictable(card, config.run)
    manifest = config.manifest or card["train_config"].get("manifest")
    if not manifest:
        raise UserError(f"run {config.run} names no manifest: pass --manifest URI")
    storage.require(manifest, "manifest", "make one with jobs/prepare.py, or fix --manifest", **kw)
    captions = captions_uri(config, card)
    if captions:
        storage.require(captions, "captions", "make them with jobs/caption.py, or fix --captions", **kw)
    storage.require_folder(config.out, "predictions folder", **kw)
    return card


def captions_uri(config: PredictConfig, card: dict[str, Any]) -> str | None:
    """UMAF runs trained with captions: ``--captions``, else the run's own; None otherwise."""
    train = card["train_config"]
    if card["method"] != "umaf" or not train["umaf"]["use_captions"]:
        return None
    uri = config.captions or train.get("captions")
    if not uri:
        raise UserError(f"run {config.run} was trained with captions: pass --captions URI (jobs/caption.py's output "
                        "for this manifest)")
    return uri


def caption_fingerprint(config: PredictConfig, card: dict[str, Any], uri: str) -> str:
    """The caption set to join: ``caption_fingerprint`` if given, else the one the run was trained on
    when ``uri`` holds it, else the only one there. A set other than the training's gets a warning:
    the model reads captions unlike those it learnt from."""
    kw = config.storage_kw
    trained = card["train_config"].get("caption_fingerprint")
    counts = caption_sets(uri, **kw)
    wanted = config.caption_fingerprint
    if wanted is None and trained in {c["fingerprint"] for c in counts}:
        wanted = trained
    chosen = choose_fingerprint(counts, uri, wanted)
    if trained is not None and chosen != trained:
        log.warning("[predict stage=plan] captions %s: set %s differs from the set the run was trained on (%s): "
                    "the model reads captions made otherwise (model, prompt, sampling or image budget) than those "
                    "it learnt from; caption the pairs with the training's settings, or set caption_fingerprint=%s if "
                    "%s holds them", uri, chosen, trained, trained, uri)
    elif trained is None:
        log.info("[predict stage=plan] run %s records no caption set (trained before fingerprints); using %s",
                 config.run, chosen)
    return chosen


# ------------------------------------------------------------------------------------------------
# Driver side, plain pyarrow: rows to predict and their batches


def input_rows(config: PredictConfig, card: dict[str, Any]) -> tuple[pa.Table, Any]:
    """The manifest rows of the selected splits with ``error`` (empty text; UMAF: no caption under
    ``drop``), ``_selected`` (within ``limit``) and, for UMAF, the caption fields joined by id.
    Returns ``(rows, manifest)``."""
    kw = config.storage_kw
    manifest = read_manifest(config.manifest or card["train_config"]["manifest"], **kw)
    table = manifest.table
    if config.splits:
        table = table.filter(pc.is_in(table["split"], pa.array(list(config.splits))))
    selected = [config.limit is None or i < config.limit for i in range(table.num_rows)]
    missing = [c for c in ("id", "split", "text") if c not in table.column_names]
    if missing:
        raise UserError(f"manifest {config.manifest} lacks column(s) {missing}: make it with jobs/prepare.py")
    if card["method"] == "sppscl" and "image" not in table.column_names:
        raise UserError(f"manifest {config.manifest} has no 'image' column: SPP-SCL predicts from text + image")
    texts = table["text"].to_pylist()
    errors: list[str | None] = [None if (t or "").strip() else "empty text" for t in texts]
    for column, default in (("image", None), ("image_ok", True)):
        if column not in table.column_names:
            table = table.append_column(column, pa.array([default] * table.num_rows))
    if card["method"] == "umaf":
        from umaf.train.umaf_method import CAPTION_COLUMN, join_captions

        uri = captions_uri(config, card)
        fingerprint = config.caption_fingerprint or (caption_fingerprint(config, card, uri) if uri else None)
        captions = read_ok_captions(uri, fingerprint, **kw) if uri else None
        table = join_captions(table, captions, "text_only").table
        policy = card["train_config"]["missing_caption"]
        if captions is not None:
            has = [c is not None for c in table[CAPTION_COLUMN].to_pylist()]
            without = has.count(False)
            if without:
                log.warning("[predict stage=plan] %d of %d pairs have no ok caption in %s (the run's policy "
                            "missing_caption=%s)", without, len(has), uri, policy)
            if policy == "drop":
                errors = [e or (None if h else f"no ok caption for this id in {uri} (the run drops such pairs: "
                                "missing_caption=drop)") for e, h in zip(errors, has)]
    table = table.append_column("error", pa.array(errors, pa.string()))
    table = table.append_column(SELECTED, pa.array(selected, pa.bool_()))
    if (card.get("eval") or {}).get("protocol") == "official_order" and SOURCE_INDEX in table.column_names:
        # The run's reported protocol is the official one: each split in its source files' order.
        table = table.sort_by([("split", "ascending"), (SOURCE_INDEX, "ascending")])
    return table, manifest


def plan_batches(table: pa.Table, done: pa.Array, batch_size: int, whole_batches: bool) -> pa.Table:
    """The rows to run, with ``batch`` (index) and ``emit`` (to be written) columns.

    Batches are consecutive rows of one split, in table order. ``whole_batches`` (SPP-SCL): batches
    are cut over every row, and a batch with any selected id (``_selected``, when the table has it) not
    in ``done`` runs whole; otherwise only those ids are batched.
    """
    todo = pc.invert(pc.is_in(table["id"], value_set=done)) if len(done) else pa.array([True] * table.num_rows)
    if SELECTED in table.column_names:
        todo = pc.and_(todo, table[SELECTED])
    if not whole_batches:
        table = table.filter(todo)
        todo = pa.array([True] * table.num_rows)
    table = table.append_column(EMIT, todo)
    splits = table["split"].to_pylist()
    batches, current, count, previous = [], -1, 0, object()
    for split in splits:
        if split != previous or count == batch_size:
            current, count, previous = current + 1, 0, split
        batches.append(current)
        count += 1
    table = table.append_column(BATCH, pa.array(batches, pa.int64()))
    if whole_batches and table.num_rows:
        wanted = pc.unique(table.filter(table[EMIT])[BATCH])
        table = table.filter(pc.is_in(table[BATCH], value_set=wanted))
    return table


def batch_blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Slices of whole batches, about ``rows_per_block`` rows each (Ray Data's input blocks)."""
    if table.num_rows == 0:
        return []
    batches = np.asarray(table[BATCH])
    starts = np.flatnonzero(np.r_[True, batches[1:] != batches[:-1]]).tolist() + [table.num_rows]
    blocks, begin = [], 0
    for end in starts[1:]:
        if end - begin >= rows_per_block or end == table.num_rows:
            blocks.append(table.slice(begin, end - begin))
            begin = end
    return blocks


# ------------------------------------------------------------------------------------------------
# The actors


def prediction_rows(rows: dict[str, list], probs: np.ndarray | None, image_ok: np.ndarray | None,
                    labels: list[str], model: str, now: datetime) -> list[dict[str, Any]]:
    """Output rows of one batch (only rows marked ``emit``): a label where the row is fine, else an
    error row with the reason (given before, or an image that did not load)."""
    out = []
    for i, pair_id in enumerate(rows["id"]):
        if not rows.get(EMIT, [True] * len(rows["id"]))[i]:
            continue
        error = rows["error"][i]
        if error is None and probs is None:
            error = "prediction failed"
        if error is None and image_ok is not None and not image_ok[i]:
            error = f"image missing or unreadable: {rows['image'][i]}"
        row = {"id": pair_id, "split": rows["split"][i], "status": STATUS_ERROR if error else STATUS_OK,
               "error": error, "model": model, "predicted_at": now, "label": None, "label_index": None,
               "probabilities": None}
        if not error:
            index = int(np.argmax(probs[i]))
            row.update(label=labels[index], label_index=index, probabilities=[float(p) for p in probs[i]])
        out.append(row)
    return out


class Predictor:
    """Ray Data actor: the run's best model, loaded once; each call runs its whole batches in order."""

    def __init__(self, run_uri: str, storage_kw: dict[str, Any], device: str, precision: str | None = None):
        from umaf.predict.model import load_run
        from umaf.progress import actor_logging

        actor_logging(log)
        started = time.perf_counter()
        self.model = load_run(run_uri, device=device, precision=precision, **storage_kw)
        log.info("[predict stage=model] actor loaded %s (%s) on %s in %.1fs", self.model.checkpoint,
                 self.model.method_name, self.model.device, time.perf_counter() - started)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: list[dict[str, Any]] = []
        for index in pc.unique(batch[BATCH]).to_pylist():
            rows = batch.filter(pc.equal(batch[BATCH], index)).to_pydict()
            probs = image_ok = None
            try:
                probs, image_ok = self.model.predict_rows(rows)
            except Exception as exc:  # one bad batch must not kill the job: its rows become error rows
                log.exception("[predict stage=model] batch of %d rows failed", len(rows["id"]))
                rows["error"] = [e or f"prediction failed: {type(exc).__name__}: {exc}" for e in rows["error"]]
            out.extend(prediction_rows(rows, probs, image_ok, self.model.labels, self.model.checkpoint,
                                       datetime.now(timezone.utc)))
        return pa.Table.from_pylist(out, schema=PREDICTION_SCHEMA)


# ------------------------------------------------------------------------------------------------
# Metrics


def prediction_metrics(predictions: pa.Table, manifest, card: dict[str, Any]) -> dict[str, Any] | None:
    """Training's metrics (:func:`umaf.train.metrics.classification_metrics`) of the ok predictions
    whose ids have a label for the run's task, per split and over all; None without such labels."""
    from umaf.train.metrics import classification_metrics

    task, names = card["task"], list(card["labels"])
    column = label_column(task)
    if column not in manifest.table.column_names:
        return None
    if manifest.labels.get(task) != names:
        log.warning("[predict stage=metrics] the manifest's %s labels %s are not the run's %s: no metrics",
                    task, manifest.labels.get(task), names)
        return None
    truth = {i: (s, y) for i, s, y in zip(manifest.table["id"].to_pylist(), manifest.table["split"].to_pylist(),
                                          manifest.table[column].to_pylist()) if y is not None and y >= 0}
    by_split: dict[str, tuple[list[int], list[int]]] = {}
    for pair_id, pred in zip(predictions["id"].to_pylist(), predictions["label_index"].to_pylist()):
        if pair_id in truth:
            split, label = truth[pair_id]
            y, p = by_split.setdefault(split, ([], []))
            y.append(label)
            p.append(pred)
    if not by_split:
        return None
    every = ([y for ys, _ in by_split.values() for y in ys], [p for _, ps in by_split.values() for p in ps])
    return {"task": task, "labels": names,
            "splits": {split: classification_metrics(np.array(y), np.array(p), names) for split, (y, p) in sorted(by_split.items())},
            "all": classification_metrics(np.array(every[0]), np.array(every[1]), names)}


# ------------------------------------------------------------------------------------------------
# The job


def run_predict(config: PredictConfig) -> dict[str, Any]:
    """Predict what is not yet done; returns the summary (also ``<out>/_summary.json``)."""
    import ray
    from ray.data import ActorPoolStrategy

    started = time.time()
    kw = config.storage_kw
    card = check_locations(config)
    if uri := captions_uri(config, card):  # the caption set, chosen (and warned about) once
        config = config.model_copy(update={"caption_fingerprint": caption_fingerprint(config, card, uri)})
    rows, manifest = input_rows(config, card)
    tag = f"[predict dataset={manifest.dataset}"
    done, before = read_done(config.out, PREDICTION_SCHEMA, retry_failed=config.retry_failed, **kw)
    sppscl = card["method"] == "sppscl"
    batch_size = int(card.get("eval_batch_size") or card["train_config"]["eval_batch_size"]) if sppscl else config.actors.batch_size
    plan = plan_batches(rows, done, batch_size, whole_batches=sppscl)
    todo = int(pc.sum(plan[EMIT]).as_py() or 0) if plan.num_rows else 0
    n_selected = int(pc.sum(rows[SELECTED]).as_py() or 0)
    log.info("%s stage=plan] run %s (%s, task %s): %d selected, %d already done at %s, %d to predict in batches "
             "of %d", tag, config.run, card["method"], card["task"], n_selected, n_selected - todo, config.out,
             todo, batch_size)

    if todo:
        keep = [c for c in (*ROW_COLUMNS, *_caption_columns(plan), BATCH, EMIT) if c in plan.column_names]
        plan = plan.select(keep)
        blocks = batch_blocks(plan, batch_size if sppscl else 4 * batch_size)
        a = config.actors
        device = config.device if config.device != "auto" else ("cuda" if a.num_gpus > 0 else "cpu")
        io_args = {"runtime_env": env} if (env := predict_runtime_env()) else {}
        ds = ray.data.from_arrow(blocks)
        predictions = ds.map_batches(
            Predictor, fn_constructor_kwargs={"run_uri": config.run, "storage_kw": kw, "device": device,
                                              "precision": config.precision},
            compute=ActorPoolStrategy(min_size=a.min_actors, max_size=a.max_actors), batch_size=None,
            batch_format="pyarrow", num_gpus=a.num_gpus or None, num_cpus=a.num_cpus, **io_args,
        )
        o = config.output
        progress = ProgressLine(log, f"{tag} stage=predict] predicted", todo, unit="pairs", every_s=o.progress_every_s)
        statuses: TallyCounter = TallyCounter()
        with quiet_ray_data_logs(), CaptionWriter(
                config.out, rows_per_file=o.rows_per_file, flush_seconds=o.flush_seconds, attempts=o.write_attempts,
                storage_kw=kw, schema=PREDICTION_SCHEMA, noun="predictions", tag="[predict stage=write]",
                logger=log) as writer:
            for batch in predictions.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                writer.add(batch)
                statuses.update(batch["status"].to_pylist())
                progress.update(batch.num_rows, _status_text(statuses))
        progress.finish(_status_text(statuses))

    after = read_statuses(config.out, PREDICTION_SCHEMA, **kw)
    this_run = status_tally(after["status"]) - before
    metrics = prediction_metrics(latest_ok(read_rows(config.out, PREDICTION_SCHEMA, **kw), "predicted_at"), manifest, card)
    metrics_uri = storage.join(config.out, METRICS_FILE)
    if metrics is not None:
        storage.write_json_atomic(metrics_uri, {"run": config.run, **metrics}, **kw)
    summary = {
        "run": config.run, "method": card["method"], "task": card["task"], "dataset": manifest.dataset,
        "manifest": config.manifest or card["train_config"]["manifest"], "out": config.out,
        "captions": uri, "caption_fingerprint": config.caption_fingerprint,
        "trained_caption_fingerprint": card["train_config"].get("caption_fingerprint"),
        "selected": n_selected, "skipped": n_selected - todo, "predicted": after.num_rows - before.total(),
        "this_run": {s: this_run.get(s, 0) for s in STATUSES},
        "dataset_status": {s: n for s, n in latest_status_counts(after).items() if s in STATUSES},
        "metrics": None if metrics is None else {
            split: {k: m.get(k) for k in ("n", "accuracy", "weighted_f1", "macro_f1", "f1_of_weighted_pr")}
            for split, m in metrics["splits"].items()},
        "metrics_file": metrics_uri if metrics is not None else None,
        "seconds": round(time.time() - started, 2), "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    storage.write_json_atomic(storage.join(config.out, SUMMARY_FILE), summary, **kw)
    log.info("%s stage=summary] %s", tag, json.dumps(summary))
    return summary


def _caption_columns(table: pa.Table) -> list[str]:
    return [c for c in table.column_names if c.startswith("caption_")]


def _status_text(statuses: TallyCounter) -> str:
    return ", ".join(f"{status} {statuses.get(status, 0)}" for status in STATUSES)


__all__ = ["run_predict", "PREDICTION_SCHEMA", "plan_batches", "prediction_rows", "prediction_metrics", "Predictor"]
