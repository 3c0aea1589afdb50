"""Checking the images a manifest points at: present (one listing per folder) and, optionally, decodable.

A missing or unreadable image never stops a prepare run: the row gets ``image_ok = False`` and is
listed in the report (kept or dropped as ``missing_images`` says). The caption job skips rows whose
image is not ok instead of failing on them.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import pyarrow.fs as pafs
from PIL import Image

from umaf import storage
from umaf.data.report import PrepareReport

CheckImages = Literal["open", "stat"]
OPEN_THREADS = 8  # image checks wait on disk or S3, not on the CPU


def _split_uri(uri: str) -> tuple[str, str]:
    """``.../folder/name.jpg`` → (``.../folder``, ``name.jpg``) for local paths and URIs alike."""
    return posixpath.dirname(uri), posixpath.basename(uri)


def _listing(folder: str, **storage_kw: Any) -> tuple[pafs.FileSystem, str, dict[str, int]]:
    """The files directly in ``folder`` with their sizes (empty when the folder does not exist)."""
    fs, path = storage.resolve(folder, **storage_kw)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return fs, path, {posixpath.basename(i.path): i.size or 0 for i in infos if i.type == pafs.FileType.File}


def _decode_error(fs: pafs.FileSystem, path: str) -> str | None:
    try:
        with fs.open_input_file(path) as fh, Image.open(fh) as img:
            img.verify()  # reads the whole file and checks its structure without decoding pixels
    except Exception as exc:  # noqa: BLE001 - any failure means "this image cannot be used"
        return f"{type(exc).__name__}: {exc}"
    return None


def check_images(rows: list[dict], report: PrepareReport, mode: CheckImages = "open", **storage_kw: Any) -> None:
    """Set ``row["image_ok"]`` for every row and list missing/unreadable images in ``report``."""
    by_folder: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("image") is None:
            row["image_ok"] = False
        else:
            by_folder[_split_uri(row["image"])[0]].append(row)
    to_open: list[tuple[dict, pafs.FileSystem, str]] = []
    for folder, folder_rows in by_folder.items():
        fs, path, files = _listing(folder, **storage_kw)
        for row in folder_rows:
            name = _split_uri(row["image"])[1]
            if name not in files:
                row["image_ok"] = False
                report.missing_images.append({"id": row["id"], "image": row["image"]})
            elif files[name] == 0:
                row["image_ok"] = False
                report.unreadable_images.append({"id": row["id"], "image": row["image"], "error": "empty file"})
            else:
                row["image_ok"] = True
                if mode == "open":
                    to_open.append((row, fs, path.rstrip("/") + "/" + name))
    if not to_open:
        return
    with ThreadPoolExecutor(OPEN_THREADS) as pool:
        errors = list(pool.map(lambda item: _decode_error(item[1], item[2]), to_open))
    for (row, _, _), error in zip(to_open, errors):
        if error is not None:
            row["image_ok"] = False
            report.unreadable_images.append({"id": row["id"], "image": row["image"], "error": error})
