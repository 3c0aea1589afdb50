"""Readers of the published dataset formats. Each is a pure function (no Ray) from a source folder to
manifest rows + label names, recording what it cleaned or skipped in a :class:`PrepareReport`.

A row is a dict with the manifest columns ``id``, ``split``, ``text``, ``image`` (URI or None) and
``label_<task>`` (int), plus ``_where`` (``"file:line"``) for error messages; keys starting with ``_``
never reach the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReaderOutput:
    rows: list[dict]
    labels: dict[str, list[str]]  # task → label names in index order
    dataset: str  # the dataset name written to the manifest metadata


def label_index(names: list[str], value: str) -> int | None:
    """Index of a label name (case and surrounding space ignored), or None if unknown."""
    value = value.strip().lower()
    return names.index(value) if value in names else None
