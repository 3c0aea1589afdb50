"""Reading the files of a published dataset: a source folder (local or ``s3://``), text decoding, JSON
arrays with line numbers, and image URIs. Shared by every reader; no Ray."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import pyarrow.fs as pafs

from umaf import storage
from umaf.data.report import PrepareReport

# MVSA tweets are not reliably UTF-8 (README of the data): this order, the last never fails.
TEXT_ENCODINGS = ("utf-8", "gb18030")


class SourceDir:
    """A dataset's folder at a URI: read files by their path relative to it."""

    def __init__(self, uri: str, **storage_kw: Any):
        self.uri = uri if storage.is_s3(uri) else storage.resolve(uri)[1]
        self.fs, self.path = storage.resolve(uri, **storage_kw)
        try:
            info = self.fs.get_file_info(self.path)
        except OSError as exc:
            raise storage.StorageError(storage.explain(uri, exc, "source folder")) from exc
        if info.type != pafs.FileType.Directory:
            raise FileNotFoundError(f"source folder {uri} does not exist or is not a folder")

    def uri_of(self, relative: str) -> str:
        return storage.join(self.uri, relative)

    def _path(self, relative: str) -> str:
        return self.path.rstrip("/") + "/" + relative

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self._path(relative)).type == pafs.FileType.File

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self._path(relative)) as fh:
            return fh.read()

    def read_text(self, relative: str) -> str:
        """A UTF-8 file (a BOM is dropped). Undecodable bytes are an error naming the file."""
        data = self.read_bytes(relative)
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.uri_of(relative)} is not UTF-8 (byte {exc.start}): {exc.reason}") from None


def decode_text(data: bytes, report: PrepareReport | None = None) -> str:
    """Decode a tweet: UTF-8, else GB18030, else UTF-8 dropping undecodable bytes; counted in the report."""
    for encoding in TEXT_ENCODINGS:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if report is not None:
            report.text_decoding[encoding] += 1
        return text
    if report is not None:
        report.text_decoding["utf-8 (errors ignored)"] += 1
    return data.decode("utf-8", errors="ignore")


def iter_json_array(text: str, file: str, report: PrepareReport) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(record index, line number, record)`` for each element of a top-level JSON array.

    Decoding element by element (``raw_decode``) keeps the line number of each record for error
    messages. A syntax error ends the file: with ``on_error="fail"`` it is raised; with ``"skip"`` the
    rest of the file is counted as one skipped entry (JSON cannot be resynchronised reliably).
    """
    decoder = json.JSONDecoder()
    pos, line, counted_to = 0, 1, 0
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, i)
        counted_to = i
        return line

    pos = skip_ws(pos)
    if pos >= n or text[pos] != "[":
        report.bad_record(file, line_at(pos), text[pos:pos + 40], "expected a JSON array of records ('[' ...)")
        return
    pos = skip_ws(pos + 1)
    index = 0
    if pos < n and text[pos] == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            report.bad_record(file, line_at(exc.pos), text[exc.pos:exc.pos + 40],
                              f"invalid JSON ({exc.msg}); the rest of the file is not read")
            return
        yield index, line_at(pos), record
        index += 1
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            return
        report.bad_record(file, line_at(pos), text[pos:pos + 40],
                          "expected ',' or ']' after a record; the rest of the file is not read")
        return


@lru_cache(maxsize=64)
def _image_root(images: str) -> str:
    # Cached: resolving a local path costs syscalls, and readers call image_uri once per row.
    return images if storage.is_s3(images) else storage.resolve(images)[1]


def image_uri(images: str | None, relative: str) -> str | None:
    """The URI of an image under an image folder (local paths made absolute; ``s3://`` kept)."""
    if images is None:
        return None
    return storage.join(_image_root(images), relative)
