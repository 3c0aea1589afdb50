"""Raw MVSA (Niu et al. 2016): ``labelResultAll.txt`` + ``data/<id>.txt`` and ``data/<id>.jpg``.

Label file: a header ``ID<TAB>text,image`` then ``<id><TAB><text label>,<image label>`` per pair —
one ``text,image`` column for MVSA-Single (one annotator), three for MVSA-Multiple (three annotators).
Labels are positive/neutral/negative.

The standard cleaning (MultiSentiNet, reused by CLMLF and later papers), one pair at a time:

1. MVSA-Multiple only: a modality's label is the one at least 2 of the 3 annotators gave; if all three
   differ the pair is dropped.
2. Text and image labels agree → that label; one is neutral → the other one; one positive and the
   other negative → the pair is dropped (the sentiment is contradictory).

Tweets are not reliably UTF-8: utf-8, then gb18030, then utf-8 ignoring bad bytes (counted in the
report). There is no published split of the raw files, so the kept pairs are split 8:1:1 by a seeded
shuffle stratified by label; the method, seed and ratios are recorded in the report and the split of
each pair in the manifest's ``split`` column. Label indices follow CLMLF's (0=positive 1=neutral
2=negative) so raw and CLMLF manifests agree.
"""

from __future__ import annotations

import collections
import random
from typing import Literal

from umaf.data.readers import ReaderOutput, label_index
from umaf.data.report import PrepareReport
from umaf.data.sources import SourceDir, decode_text, image_uri

LABELS = ["positive", "neutral", "negative"]
POSITIVE, NEUTRAL, NEGATIVE = range(3)
LABEL_FILE = "labelResultAll.txt"
MvsaVariant = Literal["auto", "single", "multiple"]
ANNOTATORS = {"single": 1, "multiple": 3}

RULE_NO_MAJORITY = "mvsa-multiple: fewer than 2 of 3 annotators agree on the {} label"
RULE_CONFLICT = "text and image labels conflict (positive vs negative)"


def majority(labels: list[int]) -> int | None:
    """The label given by at least 2 of 3 annotators (or the single annotator's), else None."""
    if len(labels) == 1:
        return labels[0]
    label, count = collections.Counter(labels).most_common(1)[0]
    return label if count >= 2 else None


def merge_text_image(text_label: int, image_label: int) -> int | None:
    """Step 2 of the cleaning: agree → it; one neutral → the other; positive vs negative → None (drop)."""
    if text_label == image_label:
        return text_label
    if text_label == NEUTRAL:
        return image_label
    if image_label == NEUTRAL:
        return text_label
    return None


def stratified_split(ids_by_label: dict[int, list[str]], seed: int,
                     ratios: tuple[float, float, float]) -> dict[str, str]:
    """id → split: within each label, ids (sorted for determinism) are shuffled and cut by ``ratios``."""
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for label in sorted(ids_by_label):
        ids = sorted(ids_by_label[label], key=lambda i: (len(i), i))
        rng.shuffle(ids)
        n_train, n_dev = round(len(ids) * ratios[0]), round(len(ids) * ratios[1])
        for position, pair_id in enumerate(ids):
            assignment[pair_id] = "train" if position < n_train else "dev" if position < n_train + n_dev else "test"
    return assignment


def read_mvsa_raw(source: SourceDir, images: str | None, report: PrepareReport, *, variant: MvsaVariant = "auto",
                  seed: int = 0, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  dataset: str | None = None) -> ReaderOutput:
    if not source.exists(LABEL_FILE):
        raise FileNotFoundError(f"{source.uri_of(LABEL_FILE)} not found: --source must be the MVSA_Single or "
                                "MVSA_Multiple folder holding labelResultAll.txt and data/")
    images = images if images is not None else source.uri_of("data")
    file = source.uri_of(LABEL_FILE)
    kept: dict[str, tuple[int, int]] = {}  # id → (label, line number)
    annotators = ANNOTATORS.get(variant)
    for number, line in enumerate(source.read_text(LABEL_FILE).split("\n"), start=1):
        fields = [f.strip() for f in line.rstrip("\r").split("\t") if f.strip()]
        if not fields:
            continue
        if number == 1 and fields[0].lower() == "id":
            continue  # header
        pair_id, columns = fields[0], fields[1:]
        if annotators is None:  # auto: the first data row says how many annotators there are
            if len(columns) not in (1, 3):
                report.bad_record(file, number, line, "expected 1 (Single) or 3 (Multiple) text,image columns")
                continue
            annotators = len(columns)
            variant = "single" if annotators == 1 else "multiple"
        if len(columns) != annotators or not pair_id.isdigit():
            report.bad_record(file, number, line,
                              f"expected '<numeric id><TAB>text,image' with {annotators} text,image column(s)")
            continue
        text_votes, image_votes, ok = [], [], True
        for column in columns:
            parts = column.split(",")
            labels = [label_index(LABELS, p) for p in parts] if len(parts) == 2 else [None]
            if None in labels:
                report.bad_record(file, number, column, f"unknown label pair; expected 'text,image' with labels {LABELS}")
                ok = False
                break
            text_votes.append(labels[0])
            image_votes.append(labels[1])
        if not ok:
            continue
        text_label, image_label = majority(text_votes), majority(image_votes)
        if text_label is None or image_label is None:
            report.cleaning[RULE_NO_MAJORITY.format("text" if text_label is None else "image")] += 1
            continue
        label = merge_text_image(text_label, image_label)
        if label is None:
            report.cleaning[RULE_CONFLICT] += 1
            continue
        if pair_id in kept:
            report.bad_record(file, number, pair_id, f"id listed twice (first on line {kept[pair_id][1]})")
            continue
        kept[pair_id] = (label, number)

    ids_by_label: dict[int, list[str]] = collections.defaultdict(list)
    rows: list[dict] = []
    for pair_id, (label, number) in kept.items():
        text_file = f"data/{pair_id}.txt"
        if not source.exists(text_file):
            report.bad_record(file, number, pair_id, f"no text file {source.uri_of(text_file)} for this id")
            continue
        text = decode_text(source.read_bytes(text_file), report).strip()
        rows.append({"id": pair_id, "text": text, "label_sentiment": label,
                     "image": image_uri(images, f"{pair_id}.jpg"), "_where": f"{file}:{number}"})
        ids_by_label[label].append(pair_id)
    assignment = stratified_split(ids_by_label, seed, ratios)
    for row in rows:
        row["split"] = assignment[row["id"]]
    report.split = {"method": "seeded shuffle stratified by label", "seed": seed, "ratios": list(ratios),
                    "variant": variant}
    name = dataset or ("mvsa-single" if variant == "single" else "mvsa-multiple")
    return ReaderOutput(rows=rows, labels={"sentiment": LABELS}, dataset=name)
