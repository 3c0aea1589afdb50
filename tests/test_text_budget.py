"""UMAF's [T; T_vlm] token budget (umaf.train.text_inputs): each caption field gets a share of what T
leaves, no field is cut away while another keeps more than its share, an unconstrained caption is
tokenised exactly as the joined T_vlm, and the cuts are counted for data_report.json."""

from __future__ import annotations

import pyarrow as pa
import pytest

from umaf.caption.fields import caption_text
from umaf.models.encoders import load_tokenizer
from umaf.models.umaf import UmafConfig
from umaf.train.text_inputs import PairEncoder, TruncationStats, allocate
from umaf.train.umaf_method import CAPTION_COLUMN, FIELD_COLUMNS, join_captions, truncation_report


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("encoders"))


@pytest.fixture(scope="module")
def tokenizer(encoder_cache):
    return load_tokenizer("tiny-random-bert", encoder_cache)


def test_allocate_is_max_min_fair_by_share():
    assert allocate([3, 4, 5], [1, 1, 1], 100) == [3, 4, 5]  # everything fits
    assert allocate([2, 50, 50], [1, 1, 1], 30) == [2, 14, 14]  # the short field keeps all; the rest split evenly
    assert allocate([40, 40, 40], [1, 1, 2], 40) == [10, 10, 20]  # by share
    assert allocate([40, 0, 40], [1, 1, 1], 10) == [5, 0, 5]  # an absent field takes nothing
    assert sum(allocate([9, 9, 9], [1, 1, 1], 10)) == 10  # rounding loses no token
    assert allocate([50, 50, 50], [100, 1, 1], 3) == [1, 1, 1]  # a tiny share still keeps a token while they last
    assert allocate([5, 5, 5], [1, 1, 1], 0) == [0, 0, 0]
    # Ties (equal shares, a budget too small for every field) never drop textimage_relation, the last field.
    assert allocate([5, 5, 5], [1, 1, 1], 2) == [0, 1, 1]
    assert allocate([5, 5, 5], [1, 1, 1], 1) == [0, 0, 1]
    assert allocate([9, 9, 9], [1, 1, 1], 10) == [3, 3, 4]  # the rounding token goes to the relation too


def _tokens(tokenizer, out, row):
    mask = out["attention_mask"][row] == 1
    return tokenizer.convert_ids_to_tokens(out["input_ids"][row][mask].tolist())


def test_fields_that_fit_give_the_joined_caption_tokens(tokenizer):
    fields = ["a sign saying open", "a dark room", "the text mocks the sign"]
    enc = PairEncoder(tokenizer, max_length=64)
    by_field = enc.encode(["so true"], [fields])
    joined = enc.encode(["so true"], [caption_text(*fields)])
    assert (by_field["input_ids"] == joined["input_ids"]).all()
    assert (by_field["token_type_ids"] == joined["token_type_ids"]).all()


def test_long_fields_share_the_budget_and_relation_is_kept(tokenizer):
    """The joined T_vlm cut from its end would lose textimage_relation first; with shares each field
    keeps a part."""
    long = " ".join(["red"] * 60)
    fields = [long, long, "the image contradicts the text " + long]
    enc = PairEncoder(tokenizer, max_length=40)
    stats = TruncationStats()
    out = enc.encode(["so true"], [fields], stats)
    tokens = _tokens(tokenizer, out, 0)
    assert len(tokens) == 40 and tokens[:4] == ["[CLS]", "so", "true", "[SEP]"]
    caption = tokens[4:-1]  # 40 - 2 (T) - 3 specials = 35 tokens for T_vlm: 12/12/11 or so
    assert "relation" in caption and caption.index("scene") > 0
    ocr, scene, relation = caption[: caption.index("scene")], caption[caption.index("scene"): caption.index("relation")], caption[caption.index("relation"):]
    assert ocr[:3] == ["o", "##cr", ":"] and relation[:4] == ["relation", ":", "the", "image"]
    assert max(len(ocr), len(scene), len(relation)) - min(len(ocr), len(scene), len(relation)) <= 1
    # the old rule (one joined string, cut from its end) loses the relation entirely
    old = _tokens(tokenizer, enc.encode(["so true"], [caption_text(*fields)]), 0)
    assert "relation" not in old
    report = stats.report()
    assert report["pairs"] == 1 and report["pairs_truncated"] == 1
    assert report["parts"]["text"]["pairs_truncated"] == 0
    for name in ("ocr", "visual_scene", "textimage_relation"):
        part = report["parts"][name]
        assert part["pairs_truncated"] == 1 and part["pairs_dropped"] == 0 and part["tokens_cut"] > 40


def test_shares_are_configurable_and_validated(tokenizer):
    long = " ".join(["red"] * 60)
    enc = PairEncoder(tokenizer, max_length=40, field_shares={"textimage_relation": 3.0})
    caption = _tokens(tokenizer, enc.encode(["so true"], [[long, long, long]]), 0)[4:-1]
    relation = caption[caption.index("relation"):]
    assert len(relation) == pytest.approx(35 * 3 / 5, abs=1)
    with pytest.raises(ValueError, match="unknown caption field"):
        UmafConfig(caption_field_shares={"relation": 2.0})
    with pytest.raises(ValueError, match="> 0"):
        UmafConfig(caption_field_shares={"ocr": 0})
    assert UmafConfig(caption_field_shares={"ocr": 2}).caption_field_shares == {"ocr": 2.0, "visual_scene": 1.0, "textimage_relation": 1.0}


def test_a_text_that_fills_the_budget_drops_the_caption_and_says_so(tokenizer):
    enc = PairEncoder(tokenizer, max_length=16)
    stats = TruncationStats()
    enc.encode(["word " * 40, "fine"], [["hello there", "a room", "it fits"], None], stats)
    report = stats.report()
    assert report["pairs"] == 2 and report["pairs_truncated"] == 1
    assert report["parts"]["text"]["pairs_truncated"] == 1 and report["parts"]["text"]["pairs_present"] == 2
    for name in ("ocr", "visual_scene", "textimage_relation"):
        assert report["parts"][name]["pairs_dropped"] == 1  # counted, not silent


def test_truncation_report_per_split_from_joined_rows(tokenizer):
    table = pa.table({"id": ["a", "b", "c"], "split": ["train", "train", "dev"], "text": ["x", "y", "z"], "label": [0, 1, 0]})
    long = " ".join(["red"] * 30)
    captions = pa.table({"id": ["a", "b", "c"], "ocr": ["", long, "hi"], "visual_scene": [long, long, "room"],
                         "textimage_relation": ["match", long, "ok"]})
    joined = join_captions(table, captions, "text_only").table
    assert joined["caption_ocr"].to_pylist() == ["", long, "hi"] and set(FIELD_COLUMNS) <= set(joined.column_names)
    assert joined[CAPTION_COLUMN].to_pylist()[0] == caption_text("", long, "match")
    report = truncation_report(joined, PairEncoder(tokenizer, max_length=32))
    assert report["max_length"] == 32 and set(report["splits"]) == {"train", "dev"}
    train = report["splits"]["train"]
    assert train["pairs"] == 2 and train["pairs_truncated"] == 2
    assert train["parts"]["ocr"]["pairs_present"] == 1  # row a has no OCR text
    assert train["parts"]["textimage_relation"]["pairs_truncated"] == 1  # row a's short relation is kept whole
    assert report["splits"]["dev"]["pairs_truncated"] == 0


def test_tokenize_batch_reads_the_field_columns(tokenizer, encoder_cache):
    """The Ray Data batch function on a numpy batch as Ray Data hands it over (object arrays, None for
    pairs without caption): same arrays as the encoder on the fields."""
    import numpy as np

    from umaf.train.umaf_method import tokenize_batch

    table = pa.table({"id": ["a", "b"], "split": ["train", "train"], "text": ["so true", "meh"], "label": [0, 1]})
    long = " ".join(["red"] * 30)
    captions = pa.table({"id": ["a"], "ocr": [long], "visual_scene": [long], "textimage_relation": ["it mocks " + long]})
    joined = join_captions(table, captions, "text_only").table
    batch = {c: np.array(joined[c].to_pylist(), dtype=object) for c in joined.column_names}
    batch["label"] = np.array([0, 1])
    out = tokenize_batch(batch, "tiny-random-bert", encoder_cache, 32, {"textimage_relation": 2.0})
    want = PairEncoder(tokenizer, 32, {"textimage_relation": 2.0}).encode(["so true", "meh"], [[long, long, "it mocks " + long], None])
    assert (out["input_ids"] == want["input_ids"]).all() and out["label"].tolist() == [0, 1]
    assert "relation" in tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())


def test_prepare_table_puts_the_truncation_counts_in_the_report(encoder_cache, caplog):
    """What jobs/train.py writes to data_report.json (text-only run: T alone, cut at max_length)."""
    from umaf.train.config import TrainConfig
    from umaf.train.umaf_method import UmafMethod

    table = pa.table({"id": ["a", "b", "c"], "split": ["train", "dev", "test"],
                      "text": ["word " * 30, "short", "also short"], "label": [0, 1, 0]})
    cfg = TrainConfig(umaf=UmafConfig(encoder="tiny-random-bert", encoder_cache=encoder_cache, use_captions=False, max_length=12))
    with caplog.at_level("WARNING"):
        prepared = UmafMethod().prepare_table(table, cfg, "label")
    report = prepared.report["truncation"]
    assert report["max_length"] == 12
    assert report["splits"]["train"]["pairs_truncated"] == 1
    assert report["splits"]["train"]["parts"]["text"]["tokens_cut"] == 30 - 10  # 2 specials, 10 tokens kept
    assert report["splits"]["dev"]["pairs_truncated"] == 0
    assert "train: 1 of 1 pairs cut to max_length=12" in caplog.text
