"""The captions dataset: its schema, its readers, and the choice of one caption set in it.

**Caption sets.** Every row carries the *fingerprint* of what made it (:mod:`umaf.caption.fingerprint`:
model and its revision or weights, prompt version, sampling, image budget, backend). One captions
URI can hold several fingerprints side by side (two models, a revised prompt); a row belongs to the
set of its fingerprint and everything downstream reads exactly one set: resume and
``--retry-failed`` key on (pair, fingerprint), and training, predict and experiments choose a
fingerprint through :func:`select_captions` (one present: that one; several: the caller must name
one, and the error lists them with row counts). Rows written before fingerprints existed read as the
set :data:`UNVERSIONED`.

**Several rows per id.** The caption job appends, and a second row for an id in one set comes only
from a later run: an ``error`` (or ``invalid``) row then an ``ok`` row after ``--retry-failed``, or
an ``ok`` row written by a run that was killed and whose processes were still writing when the next
run read what was done. Readers never depend on there being one: :func:`latest_ok` keeps exactly one
``ok`` row per id, the latest by ``captioned_at``; on a tie (same microsecond), the row read last
wins, and rows are read file by file in the order of the file names, each file's rows in order.
The writer names files ``part-<run start, UTC>-<run id>-<seq>.parquet``, so "read last" is the later
run's, then the later file's, then the later row: the last written.

**Torn files.** A file is written whole (one PUT, or a temp file renamed locally), but a foreign or
interrupted copy can leave a file that is not valid Parquet. Readers skip such a file with one
warning that names it (delete it, or rerun the caption job: its ids are captioned again), and read
every other file.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from umaf import storage
from umaf.errors import UserError

log = logging.getLogger("umaf.caption")

STATUS_OK, STATUS_INVALID, STATUS_ERROR = "ok", "invalid", "error"
# The set of rows written before rows carried a fingerprint (their ``fingerprint`` reads as null).
UNVERSIONED = "unversioned"

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
        # What made the row: 16 hex of the SHA-256 of ``fingerprint_spec`` (canonical JSON; see
        # umaf.caption.fingerprint). The spec rides in every row (Parquet stores a repeated value once
        # per row group), so a set explains itself without any side file.
        pa.field("fingerprint", pa.string()),
        pa.field("fingerprint_spec", pa.string()),
        # Hash of the request (fingerprint + image bytes + text): equal keys, equal captions.
        pa.field("request_key", pa.string()),
        # Set when the caption was not generated for this id but copied from the row of an identical
        # request (the id named here): nothing was paid for it.
        pa.field("reused_from", pa.string()),
    ]
)

READ_THREADS = 32  # files read at once: S3 reads are latency-bound, local ones release the GIL


# ------------------------------------------------------------------------------------------------
# Reading


def data_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The dataset's Parquet files under ``path``, sorted by path; ``_``/``.`` entries (summaries,
    reports, temp files) at any depth are not data, as in pyarrow's own discovery."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    base = path.rstrip("/")
    files = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        relative = info.path[len(base):].lstrip("/")
        if any(part.startswith(("_", ".")) for part in relative.split("/")):
            continue
        files.append(info)
    return sorted(files, key=lambda info: info.path)


def read_rows(uri: str, schema: pa.Schema, *, columns: list[str] | None = None,
              filter: pc.Expression | None = None, threads: int = READ_THREADS,
              files: list[pafs.FileInfo] | None = None, **storage_kw) -> pa.Table:
    """All rows of a dataset the driver's writer appends to (captions, predictions) at ``uri``.

    Files are read concurrently, and the result is in file-name order (each file's rows in order),
    which :func:`latest_ok` relies on for ties. The schema is given, not inferred: files written
    before a column existed read it as null, and a folder holding only a torn file reads as an empty
    table. ``filter`` is pushed down to each file (row groups whose statistics exclude it are not
    read). A missing folder reads as empty. ``files``: only these (of :func:`data_files`), e.g. a sample.
    """
    names = columns or schema.names
    tables = map_files(uri, schema, lambda table: table, columns=names, filter=filter, threads=threads, files=files,
                       **storage_kw)
    return pa.concat_tables(tables) if tables else schema.empty_table().select(names)


def map_files(uri: str, schema: pa.Schema, fn: Callable[[pa.Table], Any], *, columns: list[str] | None = None,
              filter: pc.Expression | None = None, threads: int = READ_THREADS,
              files: list[pafs.FileInfo] | None = None, **storage_kw) -> list[Any]:
    """``fn`` of each readable file's rows (as :func:`read_rows` reads them), in file-name order.

    For a summary of a large folder (10M rows in 2,000 files): only ``fn``'s results stay in memory,
    not every row of every column.
    """
    fs, path = storage.resolve(uri, **storage_kw)
    names = columns or schema.names
    files = data_files(fs, path) if files is None else files
    if not files:
        return []
    parquet = pads.ParquetFileFormat()
    # The size known from the listing spares each file a HEAD request on S3 (2,000 files: 2,000 round trips).
    fragments = [parquet.make_fragment(info.path, filesystem=fs, file_size=info.size) for info in files]
    skipped = object()

    def read(fragment: pads.Fragment) -> Any:
        try:
            table = fragment.to_table(schema=schema, columns=names, filter=filter, use_threads=False)
        except pa.ArrowInvalid as exc:  # not Parquet (torn, truncated, foreign): skip it, say which
            log.warning("[caption store] skipping %s: not a readable Parquet file (%s); delete it, or rerun the "
                        "job that wrote it", _display(uri, path, fragment.path), exc)
            return skipped
        return fn(table)

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(fragments)))) as pool:
        return [r for r in pool.map(read, fragments) if r is not skipped]


def _display(uri: str, path: str, file_path: str) -> str:
    """A file of the dataset as the user addressed it (``s3://b/captions/part-1.parquet``)."""
    return storage.join(uri, posixpath.relpath(file_path, path)) if file_path.startswith(path) else file_path


def read_captions(uri: str, *, columns: list[str] | None = None, fingerprint: str | None = None,
                  **storage_kw) -> pa.Table:
    """All caption rows at ``uri`` (any status, possibly several per id); only one set's rows when
    ``fingerprint`` is given (:data:`UNVERSIONED`: the rows without one)."""
    return read_rows(uri, CAPTION_SCHEMA, columns=columns, filter=fingerprint_filter(fingerprint), **storage_kw)


def fingerprint_filter(fingerprint: str | None) -> pc.Expression | None:
    if fingerprint is None:
        return None
    if fingerprint == UNVERSIONED:
        return pc.field("fingerprint").is_null()
    return pc.field("fingerprint") == fingerprint


def latest_ok(table: pa.Table, time_column: str) -> pa.Table:
    """Exactly one ``status == "ok"`` row per id: the latest by ``time_column``; on a tie the row
    that comes last in ``table`` (for :func:`read_rows` output: the last written, see the module
    docstring)."""
    return latest_per_id(table.filter(pc.equal(table["status"], STATUS_OK)), time_column)


def latest_per_id(table: pa.Table, time_column: str, *, ok_first: bool = False) -> pa.Table:
    """One row per id: the latest by ``time_column`` (ties: the row that comes last in ``table``);
    with ``ok_first``, an id's latest ``ok`` row if it has one (the state a retry has left it in)."""
    if table.num_rows == 0:
        return table
    keys = table.select(["id", time_column]).append_column("_row", pa.array(np.arange(table.num_rows)))
    sort_keys = [("id", "ascending"), (time_column, "descending"), ("_row", "descending")]
    if ok_first:
        not_ok = pc.fill_null(pc.not_equal(table["status"], STATUS_OK), True).cast(pa.int8())
        keys = keys.append_column("_not_ok", not_ok)
        sort_keys.insert(1, ("_not_ok", "ascending"))
    table = table.take(pc.sort_indices(keys, sort_keys=sort_keys))
    ids = table["id"].combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))  # row i+1 starts a new id
    keep = np.flatnonzero(np.r_[True, first.to_numpy(zero_copy_only=False)])
    return table.take(pa.array(keep))


# ------------------------------------------------------------------------------------------------
# Caption sets


@dataclass(frozen=True)
class CaptionSet:
    """One fingerprint's captions at a URI: exactly one ``ok`` row per id (:func:`latest_ok`)."""

    uri: str
    fingerprint: str
    table: pa.Table
    spec: dict[str, Any] | None  # what made it (None for the unversioned set)

    def describe(self) -> dict[str, Any]:
        """What a run records about the captions it used."""
        return {"uri": self.uri, "fingerprint": self.fingerprint, "ok_ids": self.table.num_rows, "spec": self.spec}


def describe_sets(counts: list[dict[str, Any]]) -> str:
    return "; ".join(f"{c['fingerprint']} ({c['ok_ids']} ok ids in {c['rows']} rows, model {c['model']}, "
                     f"prompt {c['prompt_version']})" for c in counts)


def choose_fingerprint(counts: list[dict[str, Any]], uri: str, fingerprint: str | None,
                       key: str = "caption_fingerprint") -> str:
    """The fingerprint to use among ``counts`` (:func:`caption_sets`): the given one if present;
    none given, the only one; otherwise a UserError that lists them (``key`` names the setting)."""
    present = {c["fingerprint"] for c in counts}
    if fingerprint is not None:
        if fingerprint not in present:
            raise UserError(f"captions {uri} hold no fingerprint {fingerprint!r}; they hold: "
                            f"{describe_sets(counts) or 'no captions'}. Set {key}= to one of them")
        return fingerprint
    if not counts:
        raise UserError(f"captions {uri} hold no caption rows: make them with jobs/caption.py, or fix the URI")
    if len(counts) > 1:
        raise UserError(f"captions {uri} hold {len(counts)} caption sets: choose one with {key}=<fingerprint>. "
                        f"They are: {describe_sets(counts)}")
    return counts[0]["fingerprint"]


def resolve_fingerprint(uri: str, fingerprint: str | None = None, *, key: str = "caption_fingerprint",
                        **storage_kw) -> str:
    """Which caption set at ``uri`` a job reads (:func:`choose_fingerprint`), from one listing read."""
    return choose_fingerprint(caption_sets(uri, **storage_kw), uri, fingerprint, key)


LISTING_COLUMNS = ["id", "status", "fingerprint", "model", "prompt_version"]


def caption_sets(uri: str, **storage_kw) -> list[dict[str, Any]]:
    """The caption sets at ``uri``: per fingerprint its rows, ok ids and what made it (``model`` and
    ``prompt_version`` of its first row), most ok ids first.

    Counted file by file in Arrow, for 10M rows (bench/caption_skipset_bench.py): what stays in memory
    is each set's ok ids, and the distinct count runs per partition of them by their last two
    characters (equal ids share them), so its hash tables hold a slice of the ids, not all of them.
    """

    def per_file(table: pa.Table) -> tuple[list[dict[str, Any]], list[tuple[str, str | None, pa.Array]]]:
        fp = pc.fill_null(table["fingerprint"], UNVERSIONED)
        ok = pc.fill_null(pc.equal(table["status"], STATUS_OK), False)
        counts = pa.table({"fp": fp, "model": table["model"], "prompt_version": table["prompt_version"]}).group_by(
            "fp", use_threads=False).aggregate([("fp", "count"), ("model", "first"), ("prompt_version", "first")])
        ids = table["id"].filter(ok)
        ok_ids = pa.table({"fp": fp.filter(ok), "part": pc.utf8_slice_codeunits(ids, start=-2), "id": ids}).group_by(
            ["fp", "part"], use_threads=False).aggregate([("id", "list")])
        lists = ok_ids["id_list"].combine_chunks()
        return counts.to_pylist(), [(f, part, lists[i].values) for i, (f, part) in
                                    enumerate(zip(ok_ids["fp"].to_pylist(), ok_ids["part"].to_pylist()))]

    sets: dict[str, dict[str, Any]] = {}
    ok_ids: dict[str, dict[str | None, list[pa.Array]]] = {}
    for counts, parts in map_files(uri, CAPTION_SCHEMA, per_file, columns=LISTING_COLUMNS, **storage_kw):
        for row in counts:  # in file order, so "model"/"prompt_version" are those of the set's first row
            known = sets.setdefault(row["fp"], {"fingerprint": row["fp"], "rows": 0, "ok_ids": 0,
                                                "model": row["model_first"], "prompt_version": row["prompt_version_first"]})
            known["rows"] += row["fp_count"]
        for name, part, ids in parts:
            ok_ids.setdefault(name, {}).setdefault(part, []).append(ids)
    for name, partitions in ok_ids.items():
        sets[name]["ok_ids"] = sum(pc.count_distinct(pa.chunked_array(arrays, pa.string())).as_py()
                                   for arrays in partitions.values())
    return sorted(sets.values(), key=lambda r: (-r["ok_ids"], r["fingerprint"]))


def select_captions(uri: str, fingerprint: str | None = None, *, key: str = "caption_fingerprint",
                    **storage_kw) -> CaptionSet:
    """The caption set a job reads at ``uri``: ``fingerprint`` if given, else the only one there
    (several: a UserError listing them with their row counts, asking for ``key``).

    The one function training, predict and experiments choose captions with.
    """
    chosen = resolve_fingerprint(uri, fingerprint, key=key, **storage_kw)
    table = latest_ok(read_captions(uri, fingerprint=chosen, **storage_kw), "captioned_at")
    spec = None
    if chosen != UNVERSIONED and table.num_rows:
        spec = json.loads(table["fingerprint_spec"][0].as_py() or "null")
    return CaptionSet(uri=uri, fingerprint=chosen, table=table, spec=spec)


def read_ok_captions(uri: str, fingerprint: str | None = None, **storage_kw) -> pa.Table:
    """Exactly one ``status == "ok"`` row per id of one caption set (see :func:`select_captions`)."""
    return select_captions(uri, fingerprint, **storage_kw).table
