"""Prepare: a published dataset (or the demo set) → the manifest at ``out`` + a JSON report beside it.

Steps, each a small piece of this package: a reader turns the source files into rows
(:mod:`umaf.data.readers`), ids are checked to be unique, images are checked
(:mod:`umaf.data.images`), each row's position in its source file is kept (``source_index``: the
official evaluation order), rows are shuffled within each split (published files are sorted by
label, and later stages' ``limit``/``max_rows_per_split`` take rows in manifest order), the manifest is
written (:func:`umaf.data.manifest.write_manifest`) and the report written atomically at
``<out>.report.json``. No Ray: this is file reading, and it takes seconds.
"""

from __future__ import annotations

import posixpath
import random
from collections.abc import Callable
from typing import Any

from umaf import storage
from umaf.data import demo
from umaf.data.config import PrepareConfig
from umaf.data.images import check_images
from umaf.data.manifest import SPLITS, build_table, read_manifest, write_manifest
from umaf.data.readers import ReaderOutput
from umaf.data.readers.clmlf import read_clmlf
from umaf.data.readers.hfm_raw import read_hfm_raw
from umaf.data.readers.mmsd2 import read_mmsd2
from umaf.data.readers.msed import read_msed
from umaf.data.readers.mvsa_raw import read_mvsa_raw
from umaf.data.report import PrepareReport, count_rows
from umaf.data.sources import SourceDir
from umaf.errors import UserError


def report_uri(out: str) -> str:
    """Where the report of the manifest at ``out`` lives: beside it, ``<out>.report.json``."""
    return out.rstrip("/") + ".report.json"


def _parent(uri: str) -> str:
    text = uri.rstrip("/")
    if storage.is_s3(text):
        scheme, rest = text.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest) or rest}"
    return posixpath.dirname(storage.resolve(text)[1])


def read_source(cfg: PrepareConfig, report: PrepareReport) -> ReaderOutput:
    """Run the reader of ``cfg.format`` over ``cfg.source``."""
    source = SourceDir(cfg.source, **cfg.storage_kw)  # type: ignore[arg-type]
    readers: dict[str, Callable[[], ReaderOutput]] = {
        "mvsa-raw": lambda: read_mvsa_raw(source, cfg.images, report, variant=cfg.mvsa_variant, seed=cfg.seed,
                                          ratios=cfg.split_ratios, dataset=cfg.dataset),
        "clmlf": lambda: read_clmlf(source, cfg.images, report, task=cfg.clmlf_task, dataset=cfg.dataset),
        "hfm-raw": lambda: read_hfm_raw(source, cfg.images, report, dataset=cfg.dataset),
        "msed": lambda: read_msed(source, cfg.images, report, dataset=cfg.dataset),
        "mmsd2": lambda: read_mmsd2(source, cfg.images, report, dataset=cfg.dataset),
    }
    return readers[cfg.format]()


def drop_duplicate_ids(rows: list[dict], report: PrepareReport) -> list[dict]:
    """Ids key the captions join: a second row with the same id is a bad record (fail, or skip and count)."""
    first: dict[str, str] = {}
    unique = []
    for row in rows:
        where = row.get("_where", "?")
        if row["id"] in first:
            report.bad_record(where, None, row["id"], f"duplicate id (first at {first[row['id']]})")
            continue
        first[row["id"]] = where
        unique.append(row)
    return unique


def number_within_splits(rows: list[dict]) -> None:
    """``source_index``: each row's position within its split in the reader's order, which is its source
    file's order (the official SPP-SCL code evaluates the CLMLF files unshuffled, in that order)."""
    seen: dict[str, int] = {}
    for row in rows:
        row["source_index"] = seen.get(row["split"], 0)
        seen[row["split"]] = row["source_index"] + 1


def shuffle_within_splits(rows: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    ordered = []
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        rng.shuffle(part)
        ordered.extend(part)
    return ordered


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Write the manifest and its report; return the report (a JSON-able dict)."""
    report = PrepareReport(on_error=cfg.on_error)
    if cfg.format == "demo":
        uris = demo.write_demo(_parent(cfg.out), cfg.demo.n_train, cfg.demo.n_dev, cfg.demo.n_test, seed=cfg.seed,
                               manifest_uri=cfg.out, **cfg.storage_kw)
        manifest = read_manifest(cfg.out, **cfg.storage_kw)
        rows, labels, dataset = manifest.table.to_pylist(), manifest.labels, manifest.dataset
        report.split = {"method": "generated", "seed": cfg.seed}
        report.notes.append(f"demo images at {uris['images']}, reference captions at {uris['reference_captions']}")
    else:
        output = read_source(cfg, report)
        labels, dataset = output.labels, output.dataset
        rows = drop_duplicate_ids(output.rows, report)
        if not rows:
            raise UserError(f"no pairs were read from {cfg.source} as format {cfg.format!r}: nothing to write "
                             f"({len(report.skipped)} records skipped; see the messages above)")
        if all(row["image"] is None for row in rows):
            if cfg.missing_images == "drop":
                raise UserError(f"missing_images=drop but no image folder is known for format {cfg.format!r}: "
                                 "give --images DIR")
            for row in rows:
                row["image_ok"] = False
            report.notes.append("no image folder given (--images): the image column is empty and image_ok false")
        else:
            check_images(rows, report, cfg.check_images, **cfg.storage_kw)
        if cfg.missing_images == "drop":
            kept = [row for row in rows if row["image_ok"]]
            report.dropped_for_image = len(rows) - len(kept)
            rows = kept
        number_within_splits(rows)  # before the shuffle: the source files' order survives as a column
        rows = shuffle_within_splits(rows, cfg.seed)
        write_manifest(build_table(rows, dataset, labels), cfg.out, **cfg.storage_kw)
    result = {
        "dataset": dataset,
        "format": cfg.format,
        "source": cfg.source,
        "images": cfg.images,
        "manifest": cfg.out,
        "report": report_uri(cfg.out),
        "labels": labels,
        "counts": count_rows(rows, labels),
        "row_order": (f"shuffled within each split (seed {cfg.seed}); source_index keeps each row's position in "
                      "its source file" if cfg.format != "demo" else "generated"),
        **report.to_dict(),
        "config": cfg.model_dump(mode="json"),
    }
    storage.write_json_atomic(report_uri(cfg.out), result, **cfg.storage_kw)
    return result
