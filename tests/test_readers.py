"""Readers on the real published files (../shared/data) and on generated broken copies of each format."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from umaf.data.images import check_images
from umaf.data.readers.clmlf import read_clmlf
from umaf.data.readers.hfm_raw import has_keyword, read_hfm_raw
from umaf.data.readers.mmsd2 import read_mmsd2
from umaf.data.readers.msed import LABELS as MSED_LABELS
from umaf.data.readers.msed import join_title_caption, read_msed
from umaf.data.report import DatasetFormatError, PrepareReport
from umaf.data.sources import SourceDir, iter_json_array


def split_counts(rows: list[dict]) -> dict[str, int]:
    return dict(collections.Counter(row["split"] for row in rows))


# ---- the real published files -----------------------------------------------------------------


@pytest.mark.parametrize(
    "folder, dataset, task, counts",
    [
        ("clmlf/MVSA-single/10-flod-1", "mvsa-single", "sentiment", {"train": 3611, "dev": 450, "test": 450}),
        ("clmlf/MVSA-multiple/10-flod-1", "mvsa-multiple", "sentiment", {"train": 13624, "dev": 1700, "test": 1700}),
        ("clmlf/HFM", "hfm", "sarcasm", {"train": 19816, "dev": 2410, "test": 2409}),
    ],
)
def test_clmlf_published_splits(shared_data: Path, folder, dataset, task, counts):
    report = PrepareReport()
    out = read_clmlf(SourceDir(str(shared_data / folder)), "/images", report)
    assert out.dataset == dataset and list(out.labels) == [task]
    assert split_counts(out.rows) == counts
    assert not report.skipped
    assert len({row["id"] for row in out.rows}) == sum(counts.values())
    first = out.rows[0]
    assert first["image"] == f"/images/{first['id']}.jpg"
    if task == "sarcasm":
        sarcastic = sum(r["label_sarcasm"] for r in out.rows if r["split"] == "train")
        assert sarcastic == 8642


def test_clmlf_keeps_published_label_indices(shared_data: Path):
    out = read_clmlf(SourceDir(str(shared_data / "clmlf/MVSA-single/10-flod-1")), None, PrepareReport())
    assert out.labels == {"sentiment": ["positive", "neutral", "negative"]}
    records = json.loads((shared_data / "clmlf/MVSA-single/10-flod-1/dev.json").read_text())
    by_id = {r["id"]: r for r in out.rows}
    assert all(by_id[r["id"]]["label_sentiment"] == r["emotion_label"] for r in records)
    assert all(row["image"] is None for row in out.rows)  # no --images: the column is empty


def test_hfm_raw_official_cleaning(shared_data: Path):
    report = PrepareReport()
    out = read_hfm_raw(SourceDir(str(shared_data / "hfm")), None, report)
    assert split_counts(out.rows) == {"train": 19816, "dev": 2410, "test": 2409}
    assert sum(r["label_sarcasm"] for r in out.rows if r["split"] == "train") == 8642
    assert report.cleaning["hfm keyword filter (train)"] == 29040 - 19816
    assert not any(has_keyword(r["text"]) for r in out.rows)
    # valid/test carry [id, text, automatic label, human label]: the human (last) one is used.
    line = (shared_data / "hfm/text/valid2.txt").read_text(encoding="utf-8").split("\n")[0]
    import ast

    first = ast.literal_eval(line.strip())
    assert {r["id"]: r for r in out.rows}[first[0]]["label_sarcasm"] == first[-1]


def test_hfm_keywords_are_whole_tokens():
    assert has_keyword("what a joke <url>") and has_keyword("# sarcasm")
    assert not has_keyword("jokester sarcasms humorous")  # substrings do not count (the official rule)


def test_msed_counts_labels_text_and_missing_images(shared_data: Path):
    report = PrepareReport()
    out = read_msed(SourceDir(str(shared_data / "msed")), None, report)
    assert split_counts(out.rows) == {"train": 6127, "dev": 1021, "test": 2042}
    assert list(out.labels) == ["sentiment", "emotion", "desire"]
    assert len(out.labels["desire"]) == 7 and "none" in out.labels["desire"]
    assert {r["label_desire"] for r in out.rows} == set(range(7))
    first = {r["id"]: r for r in out.rows}["train-1"]
    assert first["text"] == ("Overweight man and woman jogging in the city. An overweight Hispanic woman and a young "
                             "mixed race Hispanic and Caucasian man exercising together outdoors in an urban setting, "
                             "running or jogging. They are smiling, looking at each other as they exercise.")
    assert MSED_LABELS["sentiment"][first["label_sentiment"]] == "neutral"
    assert first["image"] == str(shared_data / "msed/train/images/1.jpg")
    # Sentiment and emotion are tied in MSED: positive=happiness, neutral=neutral, negative=the rest.
    tie = {"happiness": "positive", "neutral": "neutral"}
    for row in out.rows:
        emotion = MSED_LABELS["emotion"][row["label_emotion"]]
        assert MSED_LABELS["sentiment"][row["label_sentiment"]] == tie.get(emotion, "negative")
    # Only images 1..240 / 1..60 / 1..60 are shared: the rest are missing, reported, not fatal.
    check_images(out.rows, report, "stat")
    assert sum(r["image_ok"] for r in out.rows) == 240 + 60 + 60
    assert len(report.missing_images) == 9190 - 360
    assert {"id": "train-241", "image": str(shared_data / "msed/train/images/241.jpg")} in report.missing_images


def test_msed_title_caption_join():
    assert join_title_caption("A title", "A caption.") == "A title. A caption."
    assert join_title_caption("Why?", "Because") == "Why? Because"
    assert join_title_caption("  ", "Only caption") == "Only caption"
    assert join_title_caption("Only\ntitle", "") == "Only title"


@pytest.mark.parametrize("variant", ["text_json_final", "text_json_clean"])
def test_mmsd2_sample(shared_data: Path, variant):
    report = PrepareReport()
    out = read_mmsd2(SourceDir(str(shared_data / "mmsd2/data" / variant)), "s3://bucket/mmsd2", report)
    assert split_counts(out.rows) == {"test": 15}
    assert out.rows[0]["id"] == "862902619928506372"
    assert out.rows[0]["image"] == "s3://bucket/mmsd2/862902619928506372.jpg"
    assert sum("no train.json" in n for n in report.notes) == 1


# ---- broken copies: every bad record names file, line and value -----------------------------


def test_clmlf_unknown_label_and_bad_json(tmp_path: Path):
    records = [{"id": "1", "text": "ok", "emotion_label": 0}, {"id": "2", "text": "bad", "emotion_label": 7}]
    for name in ("train", "dev", "test"):
        (tmp_path / f"{name}.json").write_text(json.dumps(records, indent=2))
    with pytest.raises(DatasetFormatError) as err:
        read_clmlf(SourceDir(str(tmp_path)), None, PrepareReport())
    assert err.value.file.endswith("train.json") and err.value.line == 7 and err.value.value == 7
    assert "unknown emotion_label" in str(err.value) and "train.json:7" in str(err.value)

    (tmp_path / "dev.json").write_text('[{"id": "3", "text": "x", "emotion_label": 1},\n {"id": "4", "text": }]')
    report = PrepareReport(on_error="skip")
    out = read_clmlf(SourceDir(str(tmp_path)), None, report)
    assert sorted((r["id"], r["split"]) for r in out.rows) == [("1", "test"), ("1", "train"), ("3", "dev")]
    reasons = [(Path(s["file"]).name, s["line"], s["reason"].split(" (")[0]) for s in report.skipped]
    assert ("dev.json", 2, "invalid JSON") in reasons
    assert sum(s["reason"].startswith("record 1 (id 2): unknown emotion_label") for s in report.skipped) == 2


def test_json_array_line_numbers():
    text = '[\n  {"a": 1},\n\n  {"a": 2}, {"a": 3}\n]'
    assert [(i, line, r["a"]) for i, line, r in iter_json_array(text, "f.json", PrepareReport())] == [
        (0, 2, 1), (1, 4, 2), (2, 4, 3)]
    with pytest.raises(DatasetFormatError, match="expected a JSON array"):
        list(iter_json_array('{"a": 1}', "f.json", PrepareReport()))


def write_hfm(root: Path, train_lines: list[str]) -> Path:
    (root / "text").mkdir(parents=True)
    (root / "text" / "train.txt").write_bytes("\r\n".join(train_lines).encode() + b"\r\n")
    (root / "text" / "valid2.txt").write_bytes(b"['10', 'valid tweet', 0, 1]\r\n")
    (root / "text" / "test2.txt").write_bytes(b"['11', 'test tweet', 1, 0]\r\n")
    return root


def test_hfm_raw_never_evaluates_code_and_names_bad_lines(tmp_path: Path):
    marker = tmp_path / "pwned"
    root = write_hfm(tmp_path / "hfm", [
        "['1', 'a fine tweet', 1]",
        f"__import__('pathlib').Path({str(marker)!r}).touch()",
        "['3', 'label out of range', 2]",
        "['4', 'what a joke', 0]",
    ])
    with pytest.raises(DatasetFormatError) as err:
        read_hfm_raw(SourceDir(str(root)), None, PrepareReport())
    assert err.value.line == 2 and "train.txt:2" in str(err.value) and "__import__" in str(err.value)
    assert not marker.exists()
    report = PrepareReport(on_error="skip")
    out = read_hfm_raw(SourceDir(str(root)), None, report)
    assert not marker.exists()
    assert {(r["id"], r["split"], r["label_sarcasm"]) for r in out.rows} == {("1", "train", 1), ("10", "dev", 1),
                                                                           ("11", "test", 0)}
    assert [(s["line"], s["value"]) for s in report.skipped] == [
        (2, repr(f"__import__('pathlib').Path({str(marker)!r}).touch()")), (3, "2")]
    assert report.cleaning["hfm keyword filter (train)"] == 1


def test_msed_bad_rows(tmp_path: Path):
    header = "Title,Caption,Sentiment,Emotion,Desire,Inference Sequence"
    for split in ("train", "dev", "test"):
        (tmp_path / split).mkdir()
        lines = [header, 'A,"two\nlines",positive,happiness,family,S-E-D', "B,c,neutral,neutral,greed,S-E-D",
                 "C,c,negative,sad", "D,d,negative,fear,none,S-E-D"]
        (tmp_path / split / f"{split}.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError) as err:
        read_msed(SourceDir(str(tmp_path)), None, PrepareReport())
    # The first data row spans lines 2-3, so row 2 ("greed") is on line 4.
    assert err.value.line == 4 and err.value.value == "greed" and "unknown Desire" in str(err.value)
    report = PrepareReport(on_error="skip")
    out = read_msed(SourceDir(str(tmp_path)), None, report)
    train = [r for r in out.rows if r["split"] == "train"]
    # Row k keeps its image k.jpg even when an earlier row was skipped.
    assert [(r["id"], r["image"].rsplit("/", 2)[-1]) for r in train] == [("train-1", "1.jpg"), ("train-4", "4.jpg")]
    assert train[0]["text"] == "A. two lines"
    assert [s["reason"].split(":")[0] for s in report.skipped[:2]] == ["data row 2", "data row 3 has 4 fields, the header 6"]


def test_mmsd2_unknown_label(tmp_path: Path):
    (tmp_path / "test.json").write_text(json.dumps([{"image_id": 1, "text": "t", "label": 3}]))
    with pytest.raises(DatasetFormatError, match=r"test.json:1: record 0 \(image_id 1\): unknown label"):
        read_mmsd2(SourceDir(str(tmp_path)), None, PrepareReport())


def test_source_must_exist(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        SourceDir(str(tmp_path / "nope"))
