"""The manifest: one row per image–text pair, the contract every later stage (caption, train, tune) reads.

Columns: ``id`` (string), ``split`` (``train``|``dev``|``test``), ``text`` (string), ``image`` (path
or URI of the image), ``image_ok`` (bool: the image existed and opened when the manifest was made),
``source_index`` (int64: the row's position in its split's source file, in the order the reader read
it; the official evaluation order) and one int64 column ``label_<task>`` per task. The schema metadata holds ``umaf.labels`` (JSON
``{task: [label names in index order]}``) and ``umaf.dataset`` (the dataset name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads

from umaf import storage
from umaf.errors import UserError

SPLITS = ("train", "dev", "test")
LABELS_KEY = b"umaf.labels"
DATASET_KEY = b"umaf.dataset"
# The row's position within its split's source file (0-based), kept through prepare's shuffle: the
# official evaluation protocol runs a split in that order (umaf.train.order). Null in older manifests.
SOURCE_INDEX = "source_index"
BASE_COLUMNS = ("id", "split", "text", "image", "image_ok", SOURCE_INDEX)


def label_column(task: str) -> str:
    return f"label_{task}"


@dataclass
class Manifest:
    table: pa.Table
    dataset: str
    labels: dict[str, list[str]]  # task → label names in index order

    @property
    def tasks(self) -> list[str]:
        return list(self.labels)

    def num_classes(self, task: str) -> int:
        return len(self.labels[task])

    def split(self, name: str) -> pa.Table:
        import pyarrow.compute as pc

        return self.table.filter(pc.equal(self.table["split"], name))


def manifest_schema(tasks: list[str], dataset: str, labels: dict[str, list[str]]) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("image", pa.string()),
        pa.field("image_ok", pa.bool_()),
        pa.field(SOURCE_INDEX, pa.int64()),
    ] + [pa.field(label_column(t), pa.int64(), nullable=False) for t in tasks]
    return pa.schema(
        fields, metadata={LABELS_KEY: json.dumps(labels).encode(), DATASET_KEY: dataset.encode()}
    )


def build_table(rows: list[dict], dataset: str, labels: dict[str, list[str]]) -> pa.Table:
    schema = manifest_schema(list(labels), dataset, labels)
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def write_manifest(table: pa.Table, uri: str, *, rows_per_file: int = 500_000, **storage_kw) -> None:
    """Write the manifest as a Parquet dataset at ``uri`` (replacing what was there)."""
    fs, path = storage.resolve(uri, **storage_kw)
    pads.write_dataset(
        table,
        path,
        filesystem=fs,
        format="parquet",
        basename_template="part-{i}.parquet",
        existing_data_behavior="delete_matching",
        max_rows_per_file=rows_per_file,
        max_rows_per_group=min(rows_per_file, 64_000),
    )


def schema_labels(schema: pa.Schema) -> tuple[str, dict[str, list[str]]]:
    meta = schema.metadata or {}
    if LABELS_KEY not in meta:
        raise UserError("not a umaf manifest: the Parquet schema has no 'umaf.labels' metadata; make it with jobs/prepare.py")
    return meta.get(DATASET_KEY, b"").decode(), json.loads(meta[LABELS_KEY])


def read_manifest(uri: str, *, splits: tuple[str, ...] | None = None, **storage_kw) -> Manifest:
    fs, path = storage.resolve(uri, **storage_kw)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    name, labels = schema_labels(dataset.schema)
    table = dataset.to_table()
    if splits:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table["split"], pa.array(list(splits))))
    return Manifest(table=table, dataset=name, labels=labels)
