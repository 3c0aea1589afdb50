"""Caption reliance: a trained UMAF run evaluated on its own test items with its inputs perturbed.

How much does a trained model lean on each part of the VLM's description? Its best model (loaded as
``umaf.models.load_run`` does, with the training's own preprocessing) predicts the run's test items
again with

- ``shuffle_captions``: every pair gets another pair's caption (a seeded derangement over the pairs
  that have one): the caption is present and well-formed, but about another image;
- ``drop_ocr`` / ``drop_visual_scene`` / ``drop_textimage_relation``: that field removed everywhere;
- ``caption_only``: the text T removed (empty), the caption kept;
- ``text_only``: no caption at all (T alone, as ``missing_caption=text_only`` feeds a pair without one).

The unperturbed inputs are predicted too, and must give the run's own test predictions (the share
that agrees is recorded as ``identity_agreement``): the perturbation is then the only change.
Outputs per perturbation: ``predictions/test.parquet`` (the run's columns) and ``metrics.json``
(``test`` as the training writes it, plus what was perturbed and from which run).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from umaf import storage
from umaf.caption.fields import CAPTION_FIELDS

log = logging.getLogger("umaf.experiment")


def perturb_inputs(texts: list[str], fields: dict[str, list[str | None]], kind: str, seed: int
                   ) -> tuple[list[str], dict[str, list[str | None]]]:
    """The test inputs with one perturbation applied (``fields``: caption field name → per-pair value)."""
    texts = list(texts)
    fields = {name: list(values) for name, values in fields.items()}
    n = len(texts)
    if kind == "shuffle_captions":
        has = [k for k in range(n) if any(fields[name][k] for name in CAPTION_FIELDS)]
        if len(has) > 1:
            # A cyclic shift over a random order: a derangement, so no pair keeps its own caption.
            order = np.random.default_rng(seed).permutation(has)
            source = dict(zip(order.tolist(), np.roll(order, -1).tolist()))
            fields = {name: [values[source[k]] if k in source else values[k] for k in range(n)]
                      for name, values in fields.items()}
    elif kind.startswith("drop_"):
        name = kind.removeprefix("drop_")
        if name not in fields:
            raise ValueError(f"unknown caption field {name!r}: the fields are {', '.join(CAPTION_FIELDS)}")
        fields[name] = [None] * n
    elif kind == "caption_only":
        texts = [""] * n
    elif kind == "text_only":
        fields = {name: [None] * n for name in fields}
    else:
        raise ValueError(f"unknown perturbation {kind!r}")
    return texts, fields


def test_inputs(config, ids: list[str], storage_kw: dict[str, Any]) -> tuple[list[str], dict[str, list]]:
    """Texts and caption fields of ``ids`` (in that order), joined as the training joined them."""
    import pyarrow.compute as pc

    from umaf.caption.store import read_ok_captions
    from umaf.data.manifest import read_manifest
    from umaf.train.umaf_method import FIELD_COLUMNS, join_captions

    table = read_manifest(config.manifest, splits=("test",), **storage_kw).table
    table = table.filter(pc.is_in(table["id"], pa.array(ids)))
    captions = read_ok_captions(config.captions, **storage_kw) if config.umaf.uses_captions else None
    joined = join_captions(table, captions, "text_only").table.to_pydict()
    position = {i: k for k, i in enumerate(joined["id"])}
    missing = [i for i in ids if i not in position]
    if missing:
        raise ValueError(f"{len(missing)} test ids of the run are not in manifest {config.manifest} (e.g. {missing[0]})")
    order = [position[i] for i in ids]
    texts = [joined["text"][k] for k in order]
    fields = {name: [joined[column][k] for k in order] for name, column in zip(CAPTION_FIELDS, FIELD_COLUMNS)}
    return texts, fields


def predict_labels(model, ids: list[str], texts: list[str], fields: dict[str, list]) -> np.ndarray:
    """Class probabilities of every item, in batches of the run's ``eval_batch_size``, in order."""
    size = model.eval_batch_size
    out = []
    for start in range(0, len(ids), size):
        rows = {"id": ids[start:start + size], "text": texts[start:start + size],
                **{f"caption_{name}": values[start:start + size] for name, values in fields.items()}}
        probs, _ = model.predict_rows(rows)
        out.append(probs)
    return np.concatenate(out) if out else np.zeros((0, len(model.labels)), dtype=np.float32)


def evaluate_perturbations(run_uri: str, todo: list[dict[str, Any]], storage_kw: dict[str, Any]) -> list[str]:
    """Evaluate the trained run at ``run_uri`` under each ``{"kind", "out", "seed"}`` in ``todo`` whose
    ``out`` has no ``metrics.json`` yet; returns the folders written. Runs as a Ray task with the cell's
    CPU/GPU (see :func:`umaf.experiment.run.run_cell`), or anywhere (no Ray needed)."""
    import pyarrow.parquet as pq

    from umaf.models import load_run
    from umaf.train.loop import predictions_table
    from umaf.train.metrics import classification_metrics

    todo = [t for t in todo if not storage.exists(storage.join(t["out"], "metrics.json"), **storage_kw)]
    if not todo:
        return []
    model = load_run(run_uri, device="auto", **storage_kw)
    fs, path = storage.resolve(storage.join(run_uri, "predictions", "test.parquet"), **storage_kw)
    own = pq.read_table(path, filesystem=fs).to_pydict()
    ids, labels = list(own["id"]), np.asarray(own["label"], dtype=np.int64)
    texts, fields = test_inputs(model.config, ids, storage_kw)
    again = predict_labels(model, ids, texts, fields).argmax(1)
    agreement = float(np.mean(again == np.asarray(own["pred"]))) if ids else 1.0
    if agreement < 1.0:
        log.warning("%s: the reloaded model reproduces %.2f%% of the run's own test predictions (not all): "
                    "the perturbation results carry that difference too", run_uri, 100 * agreement)
    written = []
    for item in todo:
        p_texts, p_fields = perturb_inputs(texts, fields, item["kind"], item["seed"])
        probs = predict_labels(model, ids, p_texts, p_fields)
        pred = {"id": np.array(ids, dtype=object), "label": labels, "pred": probs.argmax(1), "probs": probs}
        buffer = pa.BufferOutputStream()
        pq.write_table(predictions_table(pred, "test", model.labels), buffer)
        storage.write_bytes_atomic(storage.join(item["out"], "predictions", "test.parquet"),
                                   buffer.getvalue().to_pybytes(), **storage_kw)
        storage.write_json_atomic(storage.join(item["out"], "metrics.json"), {
            "model": "umaf", "perturbation": item["kind"], "perturbation_seed": item["seed"], "source_run": run_uri,
            "identity_agreement": agreement, "labels": model.labels,
            "test": classification_metrics(labels, pred["pred"], model.labels)}, **storage_kw)
        written.append(item["out"])
    return written
