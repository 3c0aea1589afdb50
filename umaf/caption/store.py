"""The captions dataset: its schema, and the reader that gives exactly one ``ok`` caption per id.

The caption job appends; a re-run or a restarted run may therefore leave several rows for an id
(an ``error`` row then an ``ok`` row after ``--retry-failed``, or a duplicate ``ok`` row written by a
task that was retried after its output had already landed). Readers must never see that: training
goes through :func:`read_ok_captions`.
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


def read_captions(uri: str, *, columns: list[str] | None = None, **storage_kw) -> pa.Table:
    """All caption rows at ``uri`` (any status, possibly several per id)."""
    fs, path = storage.resolve(uri, **storage_kw)
    # The schema is given, not inferred: a folder whose only file is one torn by a killed writer
    # (excluded as invalid) still reads as an empty captions table rather than a schema-less one.
    dataset = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True, schema=CAPTION_SCHEMA)
    return dataset.to_table(columns=columns)


def read_ok_captions(uri: str, **storage_kw) -> pa.Table:
    """Exactly one ``status == "ok"`` row per id: the latest by ``captioned_at`` (ties: last written)."""
    table = read_captions(uri, **storage_kw)
    table = table.filter(pc.equal(table["status"], STATUS_OK))
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(
        table.append_column("_row", pa.array(range(table.num_rows))),
        sort_keys=[("id", "ascending"), ("captioned_at", "descending"), ("_row", "descending")],
    )
    table = table.take(order)
    ids = table["id"].to_numpy(zero_copy_only=False)
    keep = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    return table.take(pa.array(keep))
