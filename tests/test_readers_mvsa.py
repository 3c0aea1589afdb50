"""Raw MVSA: a generated fixture (no raw MVSA files are public) exercising each cleaning rule case by case.

The fixture is written the way the raw release is laid out: ``labelResultAll.txt`` (tab-separated,
CRLF) and ``data/<id>.txt`` (UTF-8, GB18030 or broken bytes) + ``data/<id>.jpg``.
"""

from __future__ import annotations

import collections
import io
from pathlib import Path

import pytest
from PIL import Image

from umaf.data.images import check_images
from umaf.data.readers.mvsa_raw import LABELS, merge_text_image, majority, read_mvsa_raw, stratified_split
from umaf.data.report import DatasetFormatError, PrepareReport
from umaf.data.sources import SourceDir, decode_text

POS, NEU, NEG = (LABELS.index(n) for n in ("positive", "neutral", "negative"))


def jpeg_bytes(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_mvsa(root: Path, header: str, rows: list[str], texts: dict[str, bytes], images: set[str] | None = None,
               corrupt: set[str] = frozenset()) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "labelResultAll.txt").write_bytes(("\r\n".join([header, *rows]) + "\r\n").encode())
    for pair_id, data in texts.items():
        (root / "data" / f"{pair_id}.txt").write_bytes(data)
    for pair_id in images if images is not None else texts:
        (root / "data" / f"{pair_id}.jpg").write_bytes(b"not a jpeg at all" if pair_id in corrupt else jpeg_bytes())
    return root


# id → (label cell, expected outcome): a label name, or the cleaning rule that drops the pair.
SINGLE_CASES = {
    "1": ("positive,positive", "positive"),      # agree
    "2": ("neutral,negative", "negative"),       # text neutral → the image's label
    "3": ("positive,neutral", "positive"),       # image neutral → the text's label
    "4": ("positive,negative", "conflict"),      # opposite polarities → dropped
    "5": ("negative,positive", "conflict"),
    "6": ("neutral,neutral", "neutral"),
    "7": ("Negative , Negative", "negative"),    # case and spaces around labels are tolerated
}
MULTIPLE_CASES = {
    "11": (["positive,positive", "positive,positive", "positive,positive"], "positive"),
    "12": (["positive,neutral", "neutral,neutral", "positive,negative"], "positive"),   # 2/3 text pos, 2/3 img neu
    "13": (["positive,neutral", "neutral,neutral", "negative,neutral"], "no majority text"),
    "14": (["neutral,positive", "neutral,neutral", "neutral,negative"], "no majority image"),
    "15": (["positive,negative", "positive,negative", "neutral,neutral"], "conflict"),
    "16": (["neutral,negative", "neutral,negative", "positive,positive"], "negative"),
    "17": (["negative,neutral", "negative,positive", "neutral,neutral"], "negative"),   # 2/3 neg text, 2/3 neu img
}


@pytest.fixture
def mvsa_single(tmp_path: Path) -> Path:
    texts = {i: f"tweet {i} text".encode() for i in SINGLE_CASES}
    texts["2"] = "今天 天气 很好".encode("gb18030")          # not UTF-8: decoded as GB18030
    texts["3"] = b"broken \xff\xfe bytes"                    # neither: UTF-8 with bad bytes dropped
    texts["6"] = "caf\u00e9 \u2764".encode()                  # plain UTF-8 with non-ASCII
    rows = [f"{i}\t{cell}" for i, (cell, _) in SINGLE_CASES.items()]
    return write_mvsa(tmp_path / "MVSA_Single", "ID\ttext,image", rows, texts,
                      images=set(SINGLE_CASES) - {"6"}, corrupt={"7"})


@pytest.fixture
def mvsa_multiple(tmp_path: Path) -> Path:
    texts = {i: f"tweet {i}".encode() for i in MULTIPLE_CASES}
    rows = [f"{i}\t" + "\t".join(cells) for i, (cells, _) in MULTIPLE_CASES.items()]
    return write_mvsa(tmp_path / "MVSA_Multiple", "ID\ttext,image\ttext,image\ttext,image", rows, texts)


def test_majority_and_merge_rules():
    assert majority([POS]) == POS
    assert majority([POS, NEU, POS]) == POS
    assert majority([POS, NEU, NEG]) is None
    assert merge_text_image(NEG, NEG) == NEG
    assert merge_text_image(NEU, POS) == POS and merge_text_image(NEG, NEU) == NEG
    assert merge_text_image(POS, NEG) is None and merge_text_image(NEG, POS) is None


def test_decode_text_fallbacks():
    report = PrepareReport()
    assert decode_text("héllo".encode(), report) == "héllo"
    assert decode_text("你好".encode("gb18030"), report) == "你好"
    assert decode_text(b"a\xffb", report) == "ab"
    assert dict(report.text_decoding) == {"utf-8": 1, "gb18030": 1, "utf-8 (errors ignored)": 1}


def test_single_cleaning_case_by_case(mvsa_single: Path):
    report = PrepareReport()
    out = read_mvsa_raw(SourceDir(str(mvsa_single)), None, report, seed=0)
    assert out.dataset == "mvsa-single" and out.labels == {"sentiment": LABELS}
    got = {row["id"]: LABELS[row["label_sentiment"]] for row in out.rows}
    expected = {i: outcome for i, (_, outcome) in SINGLE_CASES.items() if outcome in LABELS}
    assert got == expected
    assert report.cleaning == {"text and image labels conflict (positive vs negative)": 2}
    texts = {row["id"]: row["text"] for row in out.rows}
    assert texts["2"] == "今天 天气 很好"
    assert texts["3"] == "broken  bytes"
    assert texts["6"] == "café ❤"
    assert report.text_decoding == {"utf-8": 3, "gb18030": 1, "utf-8 (errors ignored)": 1}
    # Images default to <source>/data/<id>.jpg; 6 was never written, 7 is not a JPEG.
    assert {row["id"]: row["image"] for row in out.rows}["1"] == str(mvsa_single / "data" / "1.jpg")
    check_images(out.rows, report, "open")
    assert [m["id"] for m in report.missing_images] == ["6"]
    assert [u["id"] for u in report.unreadable_images] == ["7"]
    assert {row["id"] for row in out.rows if row["image_ok"]} == {"1", "2", "3"}


def test_multiple_two_of_three_rule_case_by_case(mvsa_multiple: Path):
    report = PrepareReport()
    out = read_mvsa_raw(SourceDir(str(mvsa_multiple)), None, report)
    assert out.dataset == "mvsa-multiple" and report.split["variant"] == "multiple"
    got = {row["id"]: LABELS[row["label_sentiment"]] for row in out.rows}
    assert got == {i: outcome for i, (_, outcome) in MULTIPLE_CASES.items() if outcome in LABELS}
    assert report.cleaning == {
        "mvsa-multiple: fewer than 2 of 3 annotators agree on the text label": 1,
        "mvsa-multiple: fewer than 2 of 3 annotators agree on the image label": 1,
        "text and image labels conflict (positive vs negative)": 1,
    }


def test_seeded_split_is_8_1_1_stratified_and_recorded(tmp_path: Path):
    cells = ["positive,positive"] * 60 + ["neutral,neutral"] * 20 + ["negative,neutral"] * 40
    ids = [str(100 + k) for k in range(len(cells))]
    root = write_mvsa(tmp_path / "s", "ID\ttext,image", [f"{i}\t{c}" for i, c in zip(ids, cells)],
                      {i: b"t" for i in ids}, images=set())

    def splits(seed: int) -> tuple[dict[str, str], PrepareReport]:
        report = PrepareReport()
        rows = read_mvsa_raw(SourceDir(str(root)), None, report, seed=seed).rows
        return {r["id"]: r["split"] for r in rows}, report

    first, report = splits(7)
    assert report.split == {"method": "seeded shuffle stratified by label", "seed": 7, "ratios": [0.8, 0.1, 0.1],
                            "variant": "single"}
    assert collections.Counter(first.values()) == {"train": 96, "dev": 12, "test": 12}
    per_label = collections.Counter((c.split(",")[0] if c != "negative,neutral" else "negative", first[i])
                                    for i, c in zip(ids, cells))
    assert per_label[("positive", "dev")] == 6 and per_label[("neutral", "test")] == 2
    assert splits(7)[0] == first
    assert splits(8)[0] != first
    assert stratified_split({0: ["1", "2"]}, 0, (1.0, 0.0, 0.0)) == {"1": "train", "2": "train"}


def test_bad_label_line_names_file_line_and_value(tmp_path: Path):
    rows = ["1\tpositive,positive", "2\thappy,positive", "3\tpositive", "4\tneutral,neutral"]
    root = write_mvsa(tmp_path / "bad", "ID\ttext,image", rows, {i: b"t" for i in "1234"})
    with pytest.raises(DatasetFormatError) as err:
        read_mvsa_raw(SourceDir(str(root)), None, PrepareReport())
    message = str(err.value)
    assert "labelResultAll.txt:3" in message and "happy,positive" in message and "on-error skip" in message
    report = PrepareReport(on_error="skip")
    out = read_mvsa_raw(SourceDir(str(root)), None, report)
    assert sorted(r["id"] for r in out.rows) == ["1", "4"]
    assert [(s["line"], s["value"]) for s in report.skipped] == [(3, "'happy,positive'"), (4, "'positive'")]
    assert all("expected 'text,image'" in s["reason"] for s in report.skipped)


def test_missing_text_file_is_a_bad_record(tmp_path: Path):
    root = write_mvsa(tmp_path / "notext", "ID\ttext,image", ["1\tpositive,positive", "2\tneutral,neutral"],
                      {"1": b"only one"})
    with pytest.raises(DatasetFormatError, match=r"labelResultAll.txt:3.*no text file .*data/2.txt"):
        read_mvsa_raw(SourceDir(str(root)), None, PrepareReport())
    report = PrepareReport(on_error="skip")
    assert [r["id"] for r in read_mvsa_raw(SourceDir(str(root)), None, report).rows] == ["1"]
    assert len(report.skipped) == 1


def test_missing_label_file_says_what_source_must_be(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="MVSA_Single or MVSA_Multiple folder"):
        read_mvsa_raw(SourceDir(str(tmp_path)), None, PrepareReport())
