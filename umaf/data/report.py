"""What a prepare run saw: counts, cleaning decisions, skipped records, missing images.

Bad input is never a crash or a silent loss (issue 2 item 6): every record a reader did not turn
into a row is either an error that stops the run (``on_error="fail"``, the default) naming the file,
line and value, or — with ``on_error="skip"`` — a counted entry in this report. The report is written
as JSON next to the manifest and summarised on stdout.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Literal

from umaf.errors import UserError

OnError = Literal["fail", "skip"]

# How many entries of each list the printed summary shows (the JSON report has them all).
SUMMARY_LIST_LIMIT = 10


class DatasetFormatError(UserError):
    """A record that cannot be read: names the file, the line and the offending value."""

    def __init__(self, file: str, line: int | None, value: Any, reason: str):
        self.file, self.line, self.value, self.reason = file, line, value, reason
        where = f"{file}:{line}" if line is not None else file
        super().__init__(
            f"{where}: {reason} (value: {_short(value)}). Fix the record, or pass --on-error skip "
            "(on_error=skip) to skip such records and count them in the report."
        )


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


@dataclass
class PrepareReport:
    """Filled in by a reader and by the image check; serialised with :meth:`to_dict`."""

    on_error: OnError = "fail"
    # (file, line, value, reason) of every record skipped with on_error="skip".
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # Cleaning rule → pairs it removed (e.g. "hfm keyword filter (train)", "mvsa text/image conflict").
    cleaning: collections.Counter = field(default_factory=collections.Counter)
    # How text files were decoded (MVSA raw: utf-8, gb18030, utf-8 ignoring errors).
    text_decoding: collections.Counter = field(default_factory=collections.Counter)
    missing_images: list[dict[str, str]] = field(default_factory=list)
    unreadable_images: list[dict[str, str]] = field(default_factory=list)
    dropped_for_image: int = 0
    split: dict[str, Any] = field(default_factory=lambda: {"method": "published"})
    notes: list[str] = field(default_factory=list)

    def bad_record(self, file: str, line: int | None, value: Any, reason: str) -> None:
        """Raise :class:`DatasetFormatError`, or record and continue when ``on_error == "skip"``."""
        if self.on_error == "fail":
            raise DatasetFormatError(file, line, value, reason)
        self.skipped.append({"file": file, "line": line, "value": _short(value), "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        return {
            "skipped_records": len(self.skipped),
            "skipped": self.skipped,
            "cleaning": dict(self.cleaning),
            "text_decoding": dict(self.text_decoding),
            "missing_images": len(self.missing_images),
            "unreadable_images": len(self.unreadable_images),
            "rows_dropped_for_image": self.dropped_for_image,
            "missing_image_list": self.missing_images,
            "unreadable_image_list": self.unreadable_images,
            "split": self.split,
            "notes": self.notes,
        }


def count_rows(rows: list[dict], labels: dict[str, list[str]]) -> dict[str, Any]:
    """``{split: {"rows": n, task: {label name: n}}}`` plus ``"total"``."""
    out: dict[str, Any] = {}
    for row in rows:
        entry = out.setdefault(row["split"], {"rows": 0, **{t: collections.Counter() for t in labels}})
        entry["rows"] += 1
        for task, names in labels.items():
            entry[task][names[row[f"label_{task}"]]] += 1
    ordered = {s: out[s] for s in ("train", "dev", "test") if s in out}
    result: dict[str, Any] = {
        split: {"rows": e["rows"], **{t: {n: e[t].get(n, 0) for n in labels[t]} for t in labels}}
        for split, e in ordered.items()
    }
    result["total"] = len(rows)
    return result


def format_summary(report: dict[str, Any]) -> str:
    """The human summary printed at the end of a prepare run (from the JSON report)."""
    lines = [f"prepared {report['dataset']!r} ({report['format']}): {report['counts']['total']} pairs → {report['manifest']}"]
    for split, entry in report["counts"].items():
        if split == "total":
            continue
        per_task = "; ".join(
            f"{task}: " + ", ".join(f"{name} {n}" for name, n in entry[task].items())
            for task in report["labels"]
        )
        lines.append(f"  {split:5s} {entry['rows']:6d}  {per_task}")
    if report["split"].get("method") != "published":
        lines.append(f"  split: {report['split']}")
    for rule, n in report["cleaning"].items():
        if n:
            lines.append(f"  cleaning: {rule}: {n} dropped")
    if report["text_decoding"]:
        lines.append("  text decoding: " + ", ".join(f"{k} {v}" for k, v in report["text_decoding"].items()))
    lines.append(f"  skipped records: {report['skipped_records']}")
    for entry in report["skipped"][:SUMMARY_LIST_LIMIT]:
        lines.append(f"    {entry['file']}:{entry['line']}: {entry['reason']} ({entry['value']})")
    lines.append(
        f"  missing images: {report['missing_images']}, unreadable images: {report['unreadable_images']}, "
        f"rows dropped for their image: {report['rows_dropped_for_image']}"
    )
    for entry in (report["missing_image_list"] + report["unreadable_image_list"])[:SUMMARY_LIST_LIMIT]:
        lines.append(f"    {entry['id']}: {entry['image']}" + (f" ({entry['error']})" if "error" in entry else ""))
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    lines.append(f"  report: {report['report']}")
    return "\n".join(lines)
