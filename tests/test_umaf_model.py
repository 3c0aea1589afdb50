"""UMAF model pieces (Eq. 1-6): Top-K with padding and short sequences, the scorer's gradient, the
padding mask of the fusion layers, the ablations, [T; T_vlm] truncation and the caption join."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from umaf.losses import uniformity_loss
from umaf.models.encoders import load_encoder, load_tokenizer
from umaf.models.umaf import UmafConfig, UmafModel, masked_mean, topk_select, umaf_loss
from umaf.train.text_inputs import PairEncoder
from umaf.train.umaf_method import CAPTION_COLUMN, join_captions


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("encoders"))


def make_model(cache, **overrides) -> UmafModel:
    cfg = UmafConfig(encoder="tiny-random-bert", encoder_cache=cache, dropout=0.0, **overrides)
    torch.manual_seed(0)
    encoder, hidden, heads = load_encoder(cfg.encoder, cache)
    return UmafModel(encoder, hidden, heads, num_classes=3, cfg=cfg)


def test_topk_picks_highest_real_tokens_and_ignores_padding():
    z = torch.arange(6, dtype=torch.float32).view(1, 6, 1).repeat(1, 1, 2)  # token i has value i
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.99, 0.95]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])  # the two best-scored tokens are padding
    literal = topk_select(z, scores, mask, k=2, weighting="literal")
    assert literal.tolist() == [[2.0, 2.0]]  # mean of tokens 1 and 3
    weighted = topk_select(z, scores, mask, k=2, weighting="score")
    assert weighted[0].tolist() == pytest.approx([(0.9 * 1 + 0.8 * 3) / 2] * 2)


def test_topk_with_fewer_real_tokens_than_k_uses_those_it_has():
    z = torch.randn(2, 5, 3)
    scores = torch.rand(2, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    out = topk_select(z, scores, mask, k=4, weighting="literal")
    assert torch.allclose(out[0], z[0, :2].mean(0))  # K' = 2 real tokens, not divided by K=4
    top4 = scores[1].topk(4).indices
    assert torch.allclose(out[1], z[1, top4].mean(0))
    # K larger than the sequence itself
    assert torch.allclose(topk_select(z, scores, mask, k=50, weighting="literal")[1], z[1].mean(0))


def test_straight_through_topk_is_eq4_in_value_and_trains_the_scores():
    """The default Top-K: forward value exactly Eq. 4's (1/K) sum_{i in TopK} Z_i (as 'literal'), and a
    non-zero gradient for the scores (which 'literal' cannot give)."""
    torch.manual_seed(0)
    z = torch.randn(3, 7, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]])
    logits = torch.randn(3, 7, requires_grad=True)
    scores = torch.sigmoid(logits)
    st = topk_select(z, scores, mask, k=4, weighting="straight_through")
    literal = topk_select(z, scores, mask, k=4, weighting="literal")
    assert torch.equal(st, literal)  # bit for bit, not just close
    # Hand-computed Eq. 4 for row 0 (7 real tokens, K=4) and row 1 (3 real tokens: K' = 3).
    assert torch.allclose(st[0], z[0, scores[0].topk(4).indices].mean(0))
    assert torch.allclose(st[1], z[1, :3].mean(0))
    assert not torch.allclose(topk_select(z, scores, mask, k=4, weighting="score"), literal)
    (st * torch.randn_like(st)).sum().backward()
    grad = logits.grad
    assert grad.abs().sum() > 0
    # Only the selected real tokens get a gradient: padding and unselected tokens stay at zero.
    assert torch.all(grad[1, 3:] == 0)
    unselected = torch.ones(7, dtype=torch.bool)
    unselected[scores[0].topk(4).indices] = False
    assert torch.all(grad[0, unselected] == 0) and torch.all(grad[0, ~unselected] != 0)


def test_masked_mean_excludes_padding():
    z = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(z, torch.tensor([[1, 1, 0]])).item() == 2.0


def batch_of(model_tokenizer, texts, captions, max_length=24):
    encoded = PairEncoder(model_tokenizer, max_length).encode(texts, captions)
    # token_source says where each position came from (Figure 3's grouping); it is not a model input.
    return {k: torch.as_tensor(v, dtype=torch.long) for k, v in encoded.items() if k != "token_source"}


def test_gradient_reaches_scorer_by_default_but_not_with_literal_eq4(encoder_cache):
    tokenizer = load_tokenizer("tiny-random-bert", encoder_cache)
    inputs = batch_of(tokenizer, ["what a lovely day", "this is awful"], ["Scene: sun", None])
    labels = torch.tensor([2, 0])
    assert UmafConfig().topk_weighting == "straight_through"
    for weighting, expect_grad in (("straight_through", True), ("score", True), ("literal", False)):
        model = make_model(encoder_cache, top_k=3, topk_weighting=weighting)
        out = model(**inputs)
        umaf_loss(out, labels, model.cfg)["loss"].backward()
        grad = model.scorer.weight.grad
        has_grad = grad is not None and grad.abs().sum().item() > 0
        assert has_grad == expect_grad, weighting
        assert model.classifier.weight.grad.abs().sum() > 0


def test_padding_does_not_change_real_outputs(encoder_cache):
    """Eq. 2 respects the padding mask: whatever sits in padded positions, outputs are the same."""
    tokenizer = load_tokenizer("tiny-random-bert", encoder_cache)
    model = make_model(encoder_cache, top_k=4).eval()
    inputs = batch_of(tokenizer, ["short text"], ["Scene: a dark room"], max_length=32)
    noisy = {k: v.clone() for k, v in inputs.items()}
    pad = inputs["attention_mask"] == 0
    assert pad.any()
    noisy["input_ids"][pad] = 1037  # junk tokens where the mask says padding
    with torch.no_grad():
        a, b = model(**inputs), model(**noisy)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.pooled, b.pooled, atol=1e-5)
    assert torch.all(a.scores[pad] == 0)


def test_loss_is_ce_plus_lambda_uniformity_and_wo_nrf_is_plain_ce(encoder_cache):
    tokenizer = load_tokenizer("tiny-random-bert", encoder_cache)
    inputs = batch_of(tokenizer, ["good", "bad", "meh"], ["Scene: a", "Scene: b", None])
    labels = torch.tensor([2, 0, 1])
    model = make_model(encoder_cache, uniformity_weight=0.3, uniformity_tau=0.2)
    out = model(**inputs)
    terms = umaf_loss(out, labels, model.cfg)
    ce = F.cross_entropy(out.logits, labels)
    uni = uniformity_loss(out.pooled, 0.2)
    assert terms["loss"].item() == pytest.approx((ce + 0.3 * uni).item(), rel=1e-5)

    plain = make_model(encoder_cache, nrf=False)
    assert plain.scorer is None
    out = plain(**inputs)
    assert out.scores is None and torch.equal(out.selected, out.pooled)  # w/o NRF: pooled features + CE
    terms = umaf_loss(out, labels, plain.cfg)
    assert terms["loss"].item() == pytest.approx(F.cross_entropy(out.logits, labels).item())
    assert terms["uniformity"].item() == 0.0


def test_truncation_keeps_text_whole_and_cuts_caption_first(encoder_cache):
    tokenizer = load_tokenizer("tiny-random-bert", encoder_cache)
    text = "the quick brown fox jumps over"  # 6 word-piece tokens
    caption = "Scene: " + " ".join(["red"] * 40)
    enc = PairEncoder(tokenizer, max_length=16)
    out = enc.encode([text, text, "word " * 40], [caption, None, caption])
    tokens = [tokenizer.convert_ids_to_tokens(row[mask == 1].tolist()) for row, mask in zip(out["input_ids"], out["attention_mask"])]
    # pair: [CLS] T(6) [SEP] T_vlm(cut to 7) [SEP] = 16
    assert tokens[0][:8] == ["[CLS]", "the", "quick", "brown", "fox", "jumps", "over", "[SEP]"]
    assert len(tokens[0]) == 16 and tokens[0][-1] == "[SEP]" and tokens[0][8:10] == ["scene", ":"]
    assert out["token_type_ids"][0][8:16].tolist() == [1] * 8
    # text-only (no caption): [CLS] T [SEP], then padding
    assert tokens[1] == ["[CLS]", "the", "quick", "brown", "fox", "jumps", "over", "[SEP]"]
    assert out["attention_mask"][1].sum() == 8
    # T longer than max_length: T is cut, the caption dropped
    assert len(tokens[2]) == 16 and tokens[2].count("[SEP]") == 1 and "scene" not in tokens[2]


def test_caption_join_counts_missing_and_applies_policy():
    table = pa.table({"id": ["a", "b", "c", "d"], "split": ["train", "train", "dev", "test"],
                      "text": ["x"] * 4, "label": [0, 1, 0, 1]})
    captions = pa.table({"id": ["a", "c", "zzz"], "ocr": ["", "HELLO", "x"], "visual_scene": ["sunny", "dark", "y"],
                         "textimage_relation": ["match", None, "z"]})
    kept = join_captions(table, captions, "text_only")
    assert kept.table.num_rows == 4
    assert kept.table[CAPTION_COLUMN].to_pylist() == ["Scene: sunny Relation: match", None, "OCR: HELLO Scene: dark", None]
    assert kept.report["splits"]["train"] == {"pairs": 2, "with_caption": 1, "without_caption": 1}
    assert kept.report["splits"]["test"]["without_caption"] == 1
    dropped = join_captions(table, captions, "drop")
    assert dropped.table["id"].to_pylist() == ["a", "c"] and dropped.report["pairs_kept"] == 2
    text_only = join_captions(table, None, "drop")  # ablation: no captions at all, nothing dropped
    assert text_only.table.num_rows == 4 and text_only.table[CAPTION_COLUMN].null_count == 4
