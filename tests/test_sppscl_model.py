"""SPP-SCL model (plain torch, no Ray): frozen encoders, padding mask, CMF, variants, two-step update."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from umaf.models.encoders import TINY_RANDOM_BERT, load_tokenizer
from umaf.models.image_encoder import TINY_RANDOM_RESNET, load_image_processor, pixel_values_from_bytes
from umaf.models.sppscl import HierarchicalTextHead, SppSclConfig, SppSclModel
from umaf.train.config import TrainConfig
from umaf.train.method import StepContext
from umaf.train.sppscl_method import two_step_update

TINY = {"image_encoder": TINY_RANDOM_RESNET, "text_encoder": TINY_RANDOM_BERT, "image_size": 64, "max_length": 24}


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def raw_batch() -> dict[str, torch.Tensor]:
    processor = load_image_processor(TINY_RANDOM_RESNET)
    pixels, ok = pixel_values_from_bytes(processor, [_jpeg((200, 30, 30)), _jpeg((30, 30, 200)), None, _jpeg((90, 200, 90))], 64)
    assert ok.tolist() == [True, True, False, True]  # a missing image is a flagged placeholder, not an error
    enc = load_tokenizer(TINY_RANDOM_BERT)(
        ["I love this!", "awful day", "so, the weekend", "a long text about a great concert last night"],
        padding="max_length", max_length=24, truncation=True, return_tensors="pt",
    )
    return {"pixel_values": pixels, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([2, 0, 1, 2])}


def _inputs(batch):
    return {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}


def test_forward_shapes_and_fusion_variants(raw_batch) -> None:
    torch.manual_seed(0)
    for fusion in ("cmf", "concat"):
        model = SppSclModel(SppSclConfig(**TINY, fusion=fusion), num_classes=3)
        out = model(**_inputs(raw_batch))
        assert out.logits.shape == (4, 3) and out.fused.shape == (4, 64)
        assert out.image_p.shape == (4, 32) and out.text_p.shape == (4, 32)
    assert model.head.cmf is None  # fusion=concat is the w/o-CMF ablation


def test_frozen_encoders_get_no_gradient_and_do_not_change(raw_batch) -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(model="sppscl", sppscl=SppSclConfig(**TINY, feature_cache="off"), grad_clip=None)
    model = SppSclModel(cfg.sppscl, num_classes=3)
    model.train()
    assert not model.image_encoder.training and not model.text_encoder.training  # eval mode: BN stats fixed
    encoders = {k: v.clone() for k, v in {**model.image_encoder.state_dict(), **model.text_encoder.state_dict()}.items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ctx = StepContext(optimizer=optimizer, device=torch.device("cpu"), config=cfg)
    terms = two_step_update(model, _inputs(raw_batch), raw_batch["labels"], cfg.sppscl, ctx)
    assert set(terms) >= {"ce", "l_cli", "l_clt", "l_clm", "loss", "step2"}
    for p in list(model.image_encoder.parameters()) + list(model.text_encoder.parameters()):
        assert not p.requires_grad and p.grad is None
    after = {**model.image_encoder.state_dict(), **model.text_encoder.state_dict()}
    assert all(torch.equal(encoders[k], after[k]) for k in encoders)  # incl. BatchNorm running stats
    changed = [k for k, v in model.head.state_dict().items() if not torch.equal(v, head_before[k])]
    assert changed  # the head did learn


def test_finetune_option_trains_only_the_last_text_layers() -> None:
    model = SppSclModel(SppSclConfig(**TINY, finetune_text=True, feature_cache="off"), num_classes=3)
    last = {id(p) for layer in model.text_encoder.last_layers() for p in layer.parameters()}
    for p in model.text_encoder.parameters():
        assert p.requires_grad == (id(p) in last)
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    with pytest.raises(ValueError, match="feature_cache=on"):
        SppSclConfig(**TINY, finetune_text=True, feature_cache="on")
    assert not SppSclConfig(**TINY, finetune_text=True).use_feature_cache  # auto → off


def test_padding_cannot_leak_into_the_text_feature() -> None:
    """Paper mode: overwriting padding positions (states and tokens) leaves the text feature unchanged;
    the official form averages padding, so there it changes."""
    torch.manual_seed(0)
    states = torch.randn(3, 4, 10, 16)
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [1] * 3 + [0] * 7])
    garbage = torch.where(mask[:, None, :, None].bool(), states, torch.full_like(states, 50.0))
    paper = HierarchicalTextHead(16, 4, 8, "paper").eval()
    assert torch.allclose(paper(states, mask), paper(garbage, mask), atol=1e-6)
    # Same text with more padding appended: same feature.
    longer = torch.cat([states, torch.randn(3, 4, 5, 16)], dim=2)
    longer_mask = torch.cat([mask, torch.zeros(3, 5, dtype=mask.dtype)], dim=1)
    assert torch.allclose(paper(states, mask), paper(longer, longer_mask), atol=1e-6)
    official = HierarchicalTextHead(16, 4, 8, "official").eval()
    official.load_state_dict(paper.state_dict())
    assert not torch.allclose(official(states, mask)[1:], official(garbage, mask)[1:], atol=1e-3)


def test_compat_official_leaves_encoders_in_train_mode() -> None:
    model = SppSclModel(SppSclConfig(**TINY, compat="official"), num_classes=3)
    model.train()
    assert model.image_encoder.training  # ResNet BN statistics update, as in the official code
    assert not SppSclConfig(**TINY, compat="official").use_feature_cache


def test_cmf_attends_across_the_batch(raw_batch) -> None:
    """CMF (Eq. 3) mixes samples: a sample's prediction depends on its batch-mates (why eval uses a
    fixed batch size and order), while fusion=concat does not."""
    torch.manual_seed(0)
    for fusion, depends in (("cmf", True), ("concat", False)):
        model = SppSclModel(SppSclConfig(**TINY, fusion=fusion, dropout=0.0), num_classes=3).eval()
        with torch.no_grad():
            full = model(**_inputs(raw_batch)).logits
            half = model(**{k: v[:2] for k, v in _inputs(raw_batch).items()}).logits
        assert torch.allclose(full[:2], half, atol=1e-5) != depends


@pytest.mark.parametrize("variant", ["two_step", "one_step", "no_inter", "no_intra"])
def test_variants_take_the_documented_steps(raw_batch, variant: str) -> None:
    torch.manual_seed(0)
    # alpha large: the step-2 test always asks for L_clm, so the two-step variants take 2 steps.
    cfg = TrainConfig(model="sppscl", sppscl=SppSclConfig(**TINY, variant=variant, alpha=100.0, feature_cache="off"))
    model = SppSclModel(cfg.sppscl, num_classes=3).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctx = StepContext(optimizer=optimizer, device=torch.device("cpu"), config=cfg)
    terms = two_step_update(model, _inputs(raw_batch), raw_batch["labels"], cfg.sppscl, ctx)
    expected_steps = {"two_step": 2, "one_step": 1, "no_inter": 1, "no_intra": 2}[variant]
    assert ctx.global_step == expected_steps
    assert (terms["l_cli"] == 0.0) == (variant == "no_intra")
    assert (terms["l_clm"] == 0.0) == (variant == "no_inter")


def test_checkpoint_holds_only_what_trains_and_moves_between_cached_and_uncached() -> None:
    torch.manual_seed(0)
    full = SppSclModel(SppSclConfig(**TINY), num_classes=3)
    state = full.state_dict()
    assert state and all(k.startswith("head.") for k in state)  # no frozen encoder weights saved
    head_only = SppSclModel(SppSclConfig(**TINY), num_classes=3, with_encoders=False)
    head_only.load_state_dict(state)  # strict: every head key matches
    assert all(torch.equal(v, head_only.state_dict()[k]) for k, v in state.items())
    with pytest.raises(RuntimeError, match="missing"):
        head_only.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.fc.")})
    tuned = SppSclModel(SppSclConfig(**TINY, finetune_text=True), num_classes=3)
    assert any(k.startswith("text_encoder.") for k in tuned.state_dict())  # fine-tuned layers are kept


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_text_layers_uses_only_the_last_layers(layers: int) -> None:
    """Table 6: the hierarchical attention fuses the last ``text_layers`` of the four cached layers;
    the earlier layers do not change the output."""
    from umaf.models.sppscl import SppSclHead

    torch.manual_seed(0)
    head = SppSclHead(SppSclConfig(text_layers=layers, dropout=0.0), 3, image_in_channels=6, text_hidden=8, text_layers=4).eval()
    assert head.text_head.layer_weights[0].in_features == layers
    image_map, states = torch.randn(4, 6, 2, 2), torch.randn(4, 4, 5, 8)
    mask = torch.ones(4, 5, dtype=torch.long)
    with torch.no_grad():
        out = head(image_map, states, mask).logits
        changed = states.clone()
        changed[:, : 4 - layers] = torch.randn_like(changed[:, : 4 - layers])
        assert torch.allclose(head(image_map, changed, mask).logits, out)
        if layers < 4:
            changed[:, -1] += 1.0  # the top layer always counts
            assert not torch.allclose(head(image_map, changed, mask).logits, out)
    with pytest.raises(ValueError):
        SppSclConfig(text_layers=5)
