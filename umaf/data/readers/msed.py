"""MSED, multimodal sentiment / emotion / desire (MSEDdataset/MSED).

``{train,dev,test}/{split}.csv`` with header ``Title,Caption,Sentiment,Emotion,Desire,Inference
Sequence``; data row k (1-based, counting every data row, multi-line quoted fields included) pairs with
``{split}/images/k.jpg`` under the image folder (default: the source folder). Pair ids are
``<split>-<k>``. Three tasks, one label column each: sentiment (3), emotion (6), desire (7, incl. ``none``).

Text: the Title and the Caption joined as ``"<Title>. <Caption>"`` — a full stop is added only when the
title does not already end in punctuation, and an empty part is left out — so a sentence encoder sees
two sentences, the short headline first.
"""

from __future__ import annotations

import csv
import io

from umaf.data.readers import ReaderOutput, label_index
from umaf.data.report import PrepareReport
from umaf.data.sources import SourceDir, image_uri

LABELS = {
    "sentiment": ["positive", "neutral", "negative"],
    "emotion": ["happiness", "neutral", "sad", "anger", "fear", "disgust"],
    "desire": ["none", "family", "romance", "curiosity", "social-contact", "vengeance", "tranquility"],
}
COLUMNS = {"sentiment": "Sentiment", "emotion": "Emotion", "desire": "Desire"}
REQUIRED = ("Title", "Caption", *COLUMNS.values())
SPLITS = ("train", "dev", "test")


def join_title_caption(title: str, caption: str) -> str:
    title, caption = " ".join(title.split()), " ".join(caption.split())
    if title and caption:
        return f"{title} {caption}" if title[-1] in ".!?…:;" else f"{title}. {caption}"
    return title or caption


def read_msed(source: SourceDir, images: str | None, report: PrepareReport, *,
              dataset: str | None = None) -> ReaderOutput:
    images = images if images is not None else source.uri
    rows: list[dict] = []
    for split in SPLITS:
        relative = f"{split}/{split}.csv"
        if not source.exists(relative):
            raise FileNotFoundError(f"{source.uri_of(relative)} not found: --source must be MSED's root folder "
                                    "holding train/train.csv, dev/dev.csv and test/test.csv")
        file = source.uri_of(relative)
        reader = csv.reader(io.StringIO(source.read_text(relative), newline=""))
        header = next(reader, None)
        missing = [c for c in REQUIRED if header is None or c not in header]
        if missing:
            raise ValueError(f"{file}:1: header {header} lacks the column(s) {missing}; expected {list(REQUIRED)}")
        position = {name: header.index(name) for name in REQUIRED}
        k = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                k += 1
                report.bad_record(file, reader.line_num, str(exc), f"data row {k}: unparseable CSV")
                continue
            if not values:
                continue
            k += 1
            if len(values) != len(header):
                report.bad_record(file, reader.line_num, values,
                                  f"data row {k} has {len(values)} fields, the header {len(header)}")
                continue
            row = {"id": f"{split}-{k}", "split": split,
                   "text": join_title_caption(values[position["Title"]], values[position["Caption"]]),
                   "image": image_uri(images, f"{split}/images/{k}.jpg"), "_where": f"{file}:{reader.line_num}"}
            for task, column in COLUMNS.items():
                index = label_index(LABELS[task], values[position[column]])
                if index is None:
                    report.bad_record(file, reader.line_num, values[position[column]],
                                      f"data row {k}: unknown {column}; allowed {LABELS[task]}")
                    break
                row[f"label_{task}"] = index
            else:
                rows.append(row)
    return ReaderOutput(rows=rows, labels=dict(LABELS), dataset=dataset or "msed")
