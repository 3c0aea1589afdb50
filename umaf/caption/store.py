"""The captions dataset: its schema, and the reader that gives exactly one ``ok`` caption per id.

The caption job appends, and a second row for an id comes only from a later run: an ``error`` (or
``invalid``) row then an ``ok`` row after ``--retry-failed``, or an ``ok`` row written by a run that
was killed and whose processes were still writing when the next run read what was done. Within one
run, node failures included, each id gets exactly one row: Ray Data names a write task's files by
(write id, task index), so a write task retried after its file landed rewrites that same file rather
than adding a second. Readers must never depend on that: training goes through
:func:`read_ok_captions`, which keeps one ``ok`` row per id whatever the history.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from umaf import storage

STATUS_OK, STATUS_INVALID, STATUS_ERROR = "ok", "invalid", "error"

CAPTION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("ocr", pa.string()),
        pa.field("visual_scene", pa.string()),
        pa.field("textimage_relation", pa.string()),
        pa.field("raw", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("model", pa.string()),
        pa.field("prompt_version", pa.string()),
        pa.field("sampling", pa.string()),
        pa.field("image_sha256", pa.string()),
        pa.field("output_tokens", pa.int64()),
        # When the row was produced (UTC, microseconds): among several ok rows for an id the latest wins.
        pa.field("captioned_at", pa.timestamp("us", tz="UTC")),
    ]
)


def read_rows(uri: str, schema: pa.Schema, *, columns: list[str] | None = None, **storage_kw) -> pa.Table:
    """All rows of a dataset the driver's writer appends to (captions, predictions) at ``uri``.

    The schema is given, not inferred: a folder whose only file is one torn by a killed writer
    (excluded as invalid) still reads as an empty table rather than a schema-less one.
    """
    fs, path = storage.resolve(uri, **storage_kw)
    dataset = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True, schema=schema)
    return dataset.to_table(columns=columns)


def read_captions(uri: str, *, columns: list[str] | None = None, **storage_kw) -> pa.Table:
    """All caption rows at ``uri`` (any status, possibly several per id)."""
    return read_rows(uri, CAPTION_SCHEMA, columns=columns, **storage_kw)


def read_ok_captions(uri: str, **storage_kw) -> pa.Table:
    """Exactly one ``status == "ok"`` row per id: the latest by ``captioned_at`` (ties: last written)."""
    return latest_ok(read_captions(uri, **storage_kw), "captioned_at")


def latest_ok(table: pa.Table, time_column: str) -> pa.Table:
    """Exactly one ``status == "ok"`` row per id: the latest by ``time_column`` (ties: last written)."""
    table = table.filter(pc.equal(table["status"], STATUS_OK))
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(
        table.append_column("_row", pa.array(range(table.num_rows))),
        sort_keys=[("id", "ascending"), (time_column, "descending"), ("_row", "descending")],
    )
    table = table.take(order)
    ids = table["id"].to_numpy(zero_copy_only=False)
    keep = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    return table.take(pa.array(keep))
