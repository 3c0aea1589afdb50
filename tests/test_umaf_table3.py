"""UMAF's Table 3 rows and Figure 3: tiny random-weight encoders of every family built offline and
loaded with ``from_pretrained``; every row trained a step in-process with its Figure 3 attention; the
cached image tokens equal to the frozen encoder's; the presets and the Table 3 experiment; the
RoBERTa+ViT row (cached image tokens) trained one epoch on the demo set through the train job and Ray
Train (on the session's Ray head), and with ``UMAF_TABLE3_ALL_ROWS=1`` every row."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from umaf.config import load_config
from umaf.errors import UserError
from umaf.train.config import TrainConfig

ROWS = ["table3-bert", "table3-bert-resnet", "table3-roberta", "table3-roberta-vit", "table3-clip-text",
        "table3-clip", "table3-resnet", "table3-vit", "table3-clip-image", "table3-vlm"]
# The paper's checkpoints → tiny random models of the same families (same transformers classes).
TINY = {"bert-base-uncased": "tiny-random-bert", "roberta-base": "tiny-random-roberta",
        "openai/clip-vit-base-patch32": "tiny-random-clip", "microsoft/resnet-50": "tiny-random-resnet",
        "google/vit-base-patch16-224": "tiny-random-vit"}


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("encoders"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from umaf.data.demo import write_demo

    return write_demo(str(tmp_path_factory.mktemp("demo")))


def tiny_row(preset: str, cache: str, *overrides: str) -> TrainConfig:
    """A Table 3 preset with its encoders swapped for tiny ones of the same family, sized for CPU."""
    paper = load_config(TrainConfig, "train", preset=preset)
    swaps = [f"umaf.encoder={TINY[paper.umaf.encoder]}"]
    if paper.umaf.image_encoder:
        swaps.append(f"umaf.image_encoder={TINY[paper.umaf.image_encoder]}")
    return load_config(TrainConfig, "train", preset=preset, overrides=[
        *swaps, f"umaf.encoder_cache={cache}", "umaf.fusion_heads=2", "umaf.max_length=48", "umaf.top_k=4",
        "use_gpu=false", "num_workers=1", "cpus_per_worker=1", "preprocess_concurrency=1", "epochs=1",
        "batch_size=16", "eval_batch_size=32", *overrides])


def test_tiny_encoder_families_load_through_from_pretrained(encoder_cache):
    from umaf.models.encoders import load_encoder
    from umaf.models.image_encoder import ImageTokenEncoder, load_image_processor, resolve_image_encoder

    for name, cls in [("tiny-random-bert", "BertModel"), ("tiny-random-roberta", "RobertaModel"),
                      ("tiny-random-clip", "CLIPTextModel")]:
        encoder, hidden, heads = load_encoder(name, encoder_cache)
        assert type(encoder).__name__ == cls and (hidden, heads) == (32, 2)
    for name, cls, tokens in [("tiny-random-resnet", "ResNetModel", 4), ("tiny-random-vit", "ViTModel", 17),
                              ("tiny-random-clip", "CLIPVisionModel", 17)]:
        encoder = ImageTokenEncoder(name, encoder_cache)
        processor = load_image_processor(resolve_image_encoder(name, encoder_cache))
        from PIL import Image

        pixels = processor(images=[Image.new("RGB", (50, 30))], return_tensors="pt")["pixel_values"]
        assert type(encoder.net).__name__ == cls
        assert encoder(pixels).shape == (1, tokens, 32)  # ResNet: 2x2 grid; ViT/CLIP: [CLS] + 16 patches


def test_presets_mark_every_row_and_the_experiment_runs_them_all():
    from umaf.experiment.config import ExperimentConfig
    from umaf.experiment.published import check_refs

    rows = {preset: load_config(TrainConfig, "train", preset=preset).umaf for preset in ROWS}
    assert {p: u.backbone for p, u in rows.items()} == {
        "table3-bert": "text", "table3-bert-resnet": "text+image", "table3-roberta": "text",
        "table3-roberta-vit": "text+image", "table3-clip-text": "text", "table3-clip": "text+image",
        "table3-resnet": "image", "table3-vit": "image", "table3-clip-image": "image", "table3-vlm": "captions"}
    assert all(u.attention_map for u in rows.values())
    assert rows["table3-vlm"] == load_config(TrainConfig, "train", preset="paper-msed-sentiment").umaf.model_copy(
        update={"attention_map": True})
    experiment = load_config(ExperimentConfig, "experiment", preset="umaf-table3-msed-sentiment")
    assert [row.train_preset for row in experiment.rows.values()] == ROWS and experiment.reference == "vlm"
    experiment.check_cells()  # every row's preset loads with the experiment's settings
    check_refs(experiment)  # and its published figures (Table 3; Table 1 for the VLM row) resolve


def _demo_batch(cfg: TrainConfig, image: str) -> dict[str, np.ndarray]:
    from umaf.models.encoders import resolve_encoder
    from umaf.train.feature_cache import decode_images_batch
    from umaf.train.umaf_method import tokenize_batch

    u = cfg.umaf
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "label": np.array([0, 2, 1]),
             "text": np.array(["a good day", "bad", "fine"], dtype=object),
             "image": np.array([image, None, image], dtype=object), "image_ok": np.array([True, True, True])}
    if u.uses_captions:
        batch.update(caption_ocr=np.array(["sale", None, "x"], dtype=object),
                     caption_visual_scene=np.array(["a beach", None, "a dog"], dtype=object),
                     caption_textimage_relation=np.array(["matches", None, "ok"], dtype=object))
    if u.uses_text:
        batch = tokenize_batch(batch, u.encoder, u.encoder_cache, u.max_length, None)
    if u.uses_image:
        batch = decode_images_batch(batch, resolve_encoder(u.image_encoder, u.encoder_cache), None, {})
    return batch


@pytest.mark.parametrize("preset", ROWS)
def test_each_backbone_trains_and_records_figure3_from_the_eval_forward(preset, encoder_cache, tmp_path):
    from PIL import Image

    from umaf.train.method import StepContext
    from umaf.train.umaf_method import UmafMethod

    image = str(tmp_path / "x.png")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    cfg = tiny_row(preset, encoder_cache, "umaf.image_feature_cache=off", "umaf.dropout=0.0")
    method = UmafMethod()
    torch.manual_seed(0)
    model = method.build_model(cfg, 3)
    batch = method.collate(_demo_batch(cfg, image), torch.device("cpu"))
    optimizer = torch.optim.SGD([p for g in method.param_groups(model, cfg) for p in g["params"]], lr=0.1)
    before = model.classifier.weight.detach().clone()
    terms = method.train_step(model, batch, StepContext(optimizer=optimizer, device=torch.device("cpu"), config=cfg))
    assert torch.isfinite(terms["loss"]) and not torch.equal(before, model.classifier.weight)
    model.eval()
    method.observe_eval("test")
    with torch.no_grad():
        logits, _ = method.predict(model, batch)
        plain = model(**method._inputs(batch)).logits
    torch.testing.assert_close(logits, plain)  # recording Figure 3 does not change the evaluation
    summary = method.recorded.summary()
    shares = {k: v["attention_share"] for k, v in summary["by_source"].items()}
    assert summary["samples"] == 3 and sum(shares.values()) == pytest.approx(1.0, abs=1e-4)
    u = cfg.umaf
    assert ("image" in shares) == u.uses_image and ("text" in shares) == u.uses_text
    assert ("visual_scene" in shares) == u.uses_captions
    png = method.recorded.png(preset)
    assert png[:4] == b"\x89PNG"


def test_image_rows_export_their_weights_and_load_run_says_it_cannot_rebuild_them(encoder_cache, demo, tmp_path):
    """The image-only row has no text encoder: its best/ export must not fail the run (it did, at the
    end of the first epoch), and load_run / the predict job say plainly what they take instead."""
    from umaf.models import load_run
    from umaf.predict.model import export_untrained_run
    from umaf.train.checkpoint import WEIGHTS_FILE

    cfg = tiny_row("table3-vit", encoder_cache, f"manifest={demo['manifest']}", f"out={tmp_path / 'vit'}")
    export_untrained_run(cfg, ["negative", "neutral", "positive"], "sentiment", "demo")
    assert (tmp_path / "vit" / "best" / WEIGHTS_FILE).is_file()
    with pytest.raises(UserError, match=r"umaf.backbone=image \(a Table 3 row\)"):
        load_run(str(tmp_path / "vit"))


def test_attention_map_numbers_by_position_and_source():
    from umaf.train.attention_map import AttentionMap
    from umaf.train.text_inputs import SOURCE_CODE

    text, image = SOURCE_CODE["text"], SOURCE_CODE["image"]
    amap = AttentionMap()
    amap.add(np.array([[0.1, 0.1, 0.8], [0.5, 0.5, 0.0]]), np.array([[1, 1, 1], [1, 1, 0]], bool),
             np.array([[text, text, image], [text, image, -1]]))
    s = amap.summary()
    assert s["positions"]["mean_attention"] == pytest.approx([0.3, 0.3, 0.8])
    assert s["positions"]["samples_with_token"] == [2, 2, 1]
    assert s["positions"]["main_source"][:1] == ["text"] and s["positions"]["main_source"][2] == "image"
    assert s["by_source"]["image"]["attention_share"] == pytest.approx((0.8 + 0.5) / 2)
    assert s["by_source"]["image"]["token_share"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_cached_image_tokens_are_the_frozen_encoders_own(encoder_cache, tmp_path):
    """The feature cache's path without Ray: the cache actor's fp16 tokens, decoded by collate, give
    the model the logits its frozen image encoder gives from the pixels (the image-only row, whose
    cached rows carry no text columns at all)."""
    from PIL import Image

    from umaf.train.feature_cache import BUILD_COLUMNS, DEVICE_COLUMN, ImageTokenActor
    from umaf.train.umaf_method import UmafMethod

    image = str(tmp_path / "x.png")
    Image.new("RGB", (40, 30), (20, 130, 30)).save(image)
    cfg = tiny_row("table3-clip-image", encoder_cache, "umaf.image_feature_cache=off", "umaf.dropout=0.0")
    method = UmafMethod()
    torch.manual_seed(0)
    model = method.build_model(cfg, 3).eval()
    rows = _demo_batch(cfg, image)
    from umaf.models.encoders import resolve_encoder

    cached = ImageTokenActor(resolve_encoder(cfg.umaf.image_encoder, encoder_cache))(rows)
    # The actor's rows carry where they were encoded (gathered into _SUCCESS.json, never written as a column).
    assert set(cached) - set(BUILD_COLUMNS) == {"id", "label", "image_ok", "image_tokens", "image_tokens_shape"}
    assert set(cached[DEVICE_COLUMN]) == {"cpu"}
    cached = {k: v for k, v in cached.items() if k not in BUILD_COLUMNS}
    from_cache = method.collate(cached, torch.device("cpu"))
    assert set(from_cache) == {"image_tokens", "labels"} and from_cache["image_tokens"].shape == (3, 17, 32)
    with torch.no_grad():
        direct = model(**method._inputs(method.collate(rows, torch.device("cpu")))).logits
        via_cache = model(**method._inputs(from_cache)).logits
    torch.testing.assert_close(via_cache, direct, atol=2e-3, rtol=2e-3)  # fp16 storage


def _train_job_args(preset: str, demo: dict, cache: str, out) -> list[str]:
    """``jobs/train.py`` arguments for a Table 3 row with tiny encoders (what :func:`tiny_row` sets)."""
    paper = load_config(TrainConfig, "train", preset=preset).umaf
    swaps = [f"umaf.encoder={TINY[paper.encoder]}"]
    if paper.image_encoder:
        swaps.append(f"umaf.image_encoder={TINY[paper.image_encoder]}")
    return ["--preset", preset, "--manifest", demo["manifest"], "--captions", demo["reference_captions"],
            "--task", "sentiment", "--out", str(out), *swaps, f"umaf.encoder_cache={cache}", "umaf.fusion_heads=2",
            "umaf.max_length=48", "umaf.top_k=4", "use_gpu=false", "num_workers=1", "cpus_per_worker=1",
            "preprocess_concurrency=1", "epochs=1", "batch_size=16", "eval_batch_size=32", "max_rows_per_split=32",
            "shuffle_buffer=0"]


def _check_row_run(preset: str, metrics: dict, run) -> dict:
    u = load_config(TrainConfig, "train", preset=preset).umaf
    assert metrics["test"]["n"] == 32 and metrics["epochs"] == 1, preset
    figure = json.loads((run / "attention" / "attention_test.json").read_text())
    assert figure["samples"] == 32 and figure["backbone"] == u.backbone, preset
    assert ("image" in figure["by_source"]) == u.uses_image and ("text" in figure["by_source"]) == u.uses_text, preset
    assert sum(v["attention_share"] for v in figure["by_source"].values()) == pytest.approx(1.0, abs=1e-3)
    assert metrics["method"]["attention_by_source"] == figure["by_source"]
    assert (run / "attention" / "attention_test.png").stat().st_size > 1000
    return figure


# One Ray Train run (25-90 s on 2 busy cores) in the suite: the row whose data path no other test runs
# through Ray Train and the train job ([T; T_vlm] is tests/test_train_umaf.py): the frozen ViT's tokens
# built into the feature cache by Ray Data, then each split's text tokens attached by id. Every row's
# model and step run in-process above. UMAF_TABLE3_ALL_ROWS=1 adds all ten rows through Ray Train
# (2026-11-23, 2 CPU cores, load 1-3: 10 passed in 268 s, 15-35 s a row; the one run above: 38 s).


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_roberta_vit_row_trains_through_the_train_job_with_cached_image_tokens(ray_cluster, demo, encoder_cache, tmp_path):
    """``jobs/train.py --preset table3-roberta-vit`` (tiny RoBERTa + tiny ViT): test metrics and
    Figure 3's numbers and PNG in the run folder; the frozen ViT's tokens went into the shared cache
    once per split (train, dev, test)."""
    from conftest import job_main

    run = tmp_path / "runs" / "roberta-vit"
    args = _train_job_args("table3-roberta-vit", demo, encoder_cache, run)
    metrics = job_main("train")(args)
    figure = _check_row_run("table3-roberta-vit", metrics, run)
    assert figure["by_source"]["image"]["token_share"] > 0.1  # 17 ViT tokens beside <= 48 text tokens
    assert len(list((tmp_path / "runs" / "feature_cache").glob("*/*/_SUCCESS.json"))) == 3  # train, dev, test


@pytest.mark.ray
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("UMAF_TABLE3_ALL_ROWS") != "1", reason="opt-in: UMAF_TABLE3_ALL_ROWS=1 (ten Ray Train runs)")
@pytest.mark.parametrize("preset", ROWS)
def test_every_table3_row_trains_an_epoch_through_ray_train(preset, ray_cluster, demo, encoder_cache, tmp_path_factory):
    """Each row preset (tiny encoders of its families) for one epoch on the demo set through the train
    job; the image rows' frozen encoders share one feature cache (one entry per encoder and split)."""
    from conftest import job_main

    run = tmp_path_factory.getbasetemp() / "table3-all-rows" / "runs" / preset
    _check_row_run(preset, job_main("train")(_train_job_args(preset, demo, encoder_cache, run)), run)
