"""MMSD2.0 (JoeYing1019/MMSD2.0), the corrected HFM sarcasm set.

``--source`` is a folder of ``train.json``, ``valid.json``, ``test.json`` (``data/text_json_final/``,
or ``text_json_clean/``), each a JSON list of ``{"image_id": int, "text": str, "label": 0|1}``;
other keys are ignored. Images: ``<images>/<image_id>.jpg``. A split file that is absent is reported
(the shared sample holds only ``test.json``), but at least one must be there.
"""

from __future__ import annotations

from umaf.data.readers import ReaderOutput
from umaf.data.report import PrepareReport
from umaf.data.sources import SourceDir, image_uri, iter_json_array

LABELS = ["not_sarcastic", "sarcastic"]
SPLIT_FILES = {"train": "train.json", "dev": "valid.json", "test": "test.json"}


def read_mmsd2(source: SourceDir, images: str | None, report: PrepareReport, *,
               dataset: str | None = None) -> ReaderOutput:
    present = {split: f for split, f in SPLIT_FILES.items() if source.exists(f)}
    if not present:
        raise FileNotFoundError(f"{source.uri}: none of {list(SPLIT_FILES.values())} found; --source must be "
                                "MMSD2.0's data/text_json_final folder")
    for split, filename in SPLIT_FILES.items():
        if split not in present:
            report.notes.append(f"no {filename} in {source.uri}: the {split} split is empty")
    rows: list[dict] = []
    for split, filename in present.items():
        file = source.uri_of(filename)
        for index, line, record in iter_json_array(source.read_text(filename), file, report):
            if not isinstance(record, dict) or not {"image_id", "text", "label"} <= record.keys():
                report.bad_record(file, line, record, f"record {index} lacks image_id/text/label")
                continue
            label = record["label"]
            if label not in (0, 1) or isinstance(label, bool):
                report.bad_record(file, line, label, f"record {index} (image_id {record['image_id']}): unknown "
                                  "label; allowed 0 (not sarcastic) or 1 (sarcastic)")
                continue
            if not isinstance(record["text"], str):
                report.bad_record(file, line, record["text"], f"record {index}: text is not a string")
                continue
            pair_id = str(record["image_id"]).strip()
            rows.append({"id": pair_id, "split": split, "text": record["text"], "label_sarcasm": int(label),
                         "image": image_uri(images, f"{pair_id}.jpg"), "_where": f"{file}:{line} (record {index})"})
    return ReaderOutput(rows=rows, labels={"sarcasm": LABELS}, dataset=dataset or "mmsd2")
