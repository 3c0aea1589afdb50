"""CLMLF's JSON splits (Link-Li/CLMLF ``dataset/data/``), the splits CLMLF, SPP-SCL and most later papers use.

``{train,dev,test}.json`` for MVSA-Single/-Multiple (``10-flod-1/``), ``{train,valid,test}.json`` for HFM;
each a JSON array of ``{"id": str, "text": str, "emotion_label": int}``. Label indices are kept as
published: MVSA 0=positive 1=neutral 2=negative; HFM 0=not sarcastic 1=sarcastic. Images are a
separate download: ``<images>/<id>.jpg``.
"""

from __future__ import annotations

from typing import Literal

from umaf.data.readers import ReaderOutput
from umaf.data.report import PrepareReport
from umaf.data.sources import SourceDir, image_uri, iter_json_array

MVSA_LABELS = ["positive", "neutral", "negative"]
SARCASM_LABELS = ["not_sarcastic", "sarcastic"]
SPLIT_FILES = {"train": ("train.json",), "dev": ("dev.json", "valid.json"), "test": ("test.json",)}

ClmlfTask = Literal["auto", "sentiment", "sarcasm"]


def detect_task(source: SourceDir) -> str:
    """HFM ships ``valid.json``, MVSA ``dev.json``."""
    return "sarcasm" if source.exists("valid.json") and not source.exists("dev.json") else "sentiment"


def default_name(source: SourceDir) -> str:
    """``.../MVSA-single/10-flod-1`` → ``mvsa-single``; ``.../HFM`` → ``hfm``."""
    parts = source.uri.rstrip("/").split("/")
    name = parts[-2] if parts[-1].startswith("10-flod") and len(parts) > 1 else parts[-1]
    return name.lower()


def read_clmlf(source: SourceDir, images: str | None, report: PrepareReport, *, task: ClmlfTask = "auto",
               dataset: str | None = None) -> ReaderOutput:
    task = detect_task(source) if task == "auto" else task
    names = MVSA_LABELS if task == "sentiment" else SARCASM_LABELS
    rows: list[dict] = []
    for split, candidates in SPLIT_FILES.items():
        found = [f for f in candidates if source.exists(f)]
        if not found:
            raise FileNotFoundError(f"{source.uri}: no {' or '.join(candidates)} for the {split} split "
                                    "(expected CLMLF's {train,dev,test}.json, or {train,valid,test}.json for HFM)")
        filename = found[0]
        file = source.uri_of(filename)
        for index, line, record in iter_json_array(source.read_text(filename), file, report):
            if not isinstance(record, dict) or not {"id", "text", "emotion_label"} <= record.keys():
                report.bad_record(file, line, record, f"record {index} lacks id/text/emotion_label")
                continue
            label = record["emotion_label"]
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(names):
                report.bad_record(file, line, label, f"record {index} (id {record['id']}): unknown emotion_label; "
                                  f"allowed {list(range(len(names)))} = {names}")
                continue
            if not isinstance(record["text"], str):
                report.bad_record(file, line, record["text"], f"record {index}: text is not a string")
                continue
            pair_id = str(record["id"]).strip()
            rows.append({
                "id": pair_id, "split": split, "text": record["text"],
                "image": image_uri(images, f"{pair_id}.jpg"), f"label_{task}": label,
                "_where": f"{file}:{line}",
            })
    return ReaderOutput(rows=rows, labels={task: names}, dataset=dataset or default_name(source))
