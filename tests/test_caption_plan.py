"""``jobs/caption.py --plan`` on the real MSED files with a Qwen2.5-VL-shaped model folder, no GPU, no Ray.

The model folder holds what the plan reads of a model: a byte-level BPE tokenizer with Qwen's
special tokens and a chat template of Qwen's shape, and transformers' own Qwen2-VL image processor
(saved and loaded back with ``from_pretrained``). Expected vision tokens come from the test's own
copy of Qwen's resize rule (``qwen_smart_resize`` in test_caption_presets.py), not from transformers.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pytest

from conftest import job_main
from test_caption_pipeline import msed_dev_manifest
from test_caption_presets import qwen_smart_resize
from umaf.caption.config import CaptionConfig
from umaf.caption.plan import DEFAULT_THROUGHPUT, make_plan, output_estimate, pilot_sample, throughput_for
from umaf.caption.prompt import PROMPT_TEMPLATE, render_prompt
from umaf.caption.store import CAPTION_SCHEMA
from umaf.caption.writer import CaptionWriter

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = tmp_path_factory.mktemp("qwen-like")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([PROMPT_TEMPLATE] * 4, trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil().save_pretrained(folder)  # Qwen2.5-VL's defaults: 14-px patches, merge 2
    return str(folder)


def config(qwen_like: str, manifest: str, out: str, **overrides) -> CaptionConfig:
    base = dict(manifest=manifest, out=out, backend="vllm", model=qwen_like, plan={"device": "L4"},
                images={"max_area": 1003520, "multiple_of": 28, "min_side": 56, "max_aspect_ratio": 100,
                        "max_side": 4096}, sampling={"max_tokens": 500})
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(base.get(key), dict) else value
    return CaptionConfig(**base)


def expected_text_tokens(qwen_like: str, text: str) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_like)
    # QWEN_TEMPLATE rendered by hand for one user turn (image, then the UMAF prompt).
    rendered = (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{render_prompt(text)}<|im_end|>\n"
                "<|im_start|>assistant\n")
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) - 1  # the placeholder is the image


def test_plan_counts_errors_tokens_and_cost_from_headers(qwen_like, shared_data, tmp_path):
    manifest = str(tmp_path / "manifest")
    ids = msed_dev_manifest(shared_data, manifest, first=49, last=72)  # images 49..60 exist, 61..72 do not
    out = str(tmp_path / "captions")
    cfg = config(qwen_like, manifest, out, plan={"prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": 100.0,
                                                 "gpus": 4, "gpu_hour_price": 2.5})
    # One pair already captioned with this very fingerprint, one with another: only the first is done.
    from umaf.caption.pipeline import pin_fingerprint

    _, fingerprint = pin_fingerprint(cfg)
    done = {"id": ids[0], "status": "ok", "fingerprint": fingerprint.id, "captioned_at": datetime.now(timezone.utc)}
    other = {**done, "id": ids[1], "fingerprint": "someone-else"}
    with CaptionWriter(out, rows_per_file=10, flush_seconds=60, attempts=1, storage_kw={}) as writer:
        writer.add(pa.Table.from_pylist([done, other], schema=CAPTION_SCHEMA))

    plan = make_plan(cfg)
    assert plan["fingerprint"] == fingerprint.id
    assert plan["pairs"] == {"selected": 24, "already_captioned": 1, "to_caption": 23, "error_rows": 12,
                             "to_generate": 11}
    assert plan["error_reasons"] == [{"reason": "image not found: <path>", "rows": 12}]
    # MSED images are 612x408: the CPU stage pads them onto the 28-px grid (616x420); Qwen keeps that size.
    h, w = qwen_smart_resize(420, 616, max_pixels=1003520)
    per_image = (h // 28) * (w // 28)
    assert (h, w) == (420, 616) and plan["vision_tokens"] == {"total": 11 * per_image, "mean": per_image,
                                                                "p50": per_image, "p95": per_image, "max": per_image}
    import csv

    with open(shared_data / "msed" / "dev" / "dev.csv", newline="", encoding="utf-8") as fh:
        captions = [r["Caption"] for r in list(csv.DictReader(fh))[49:60]]  # rows 50..60: the 11 to generate
    prompt_total = sum(expected_text_tokens(qwen_like, t) + per_image for t in captions)
    assert plan["prompt_tokens"]["total"] == prompt_total
    assert plan["output_tokens"]["total"] == 11 * 500 and "max_tokens=500" in plan["output_tokens"]["source"]
    gpu_hours = (prompt_total / 1000 + 11 * 500 / 100) / 3600
    assert plan["gpu_hours"] == pytest.approx(gpu_hours, abs=1e-3)
    assert plan["wall_hours"] == pytest.approx(gpu_hours / 4, abs=1e-3)
    assert plan["cost"] == pytest.approx(gpu_hours * 2.5, abs=0.01)

    # vLLM's max_pixels is the model processor's budget: with less, Qwen shrinks the canvas itself.
    small = make_plan(config(qwen_like, manifest, out, vllm={"max_pixels": 28 * 28 * 100}))
    h, w = qwen_smart_resize(420, 616, max_pixels=28 * 28 * 100)
    assert small["vision_tokens"]["max"] == (h // 28) * (w // 28) < per_image


def test_the_job_prints_the_plan(qwen_like, shared_data, tmp_path, capsys):
    manifest = str(tmp_path / "manifest")
    msed_dev_manifest(shared_data, manifest, first=55, last=62)
    plan = job_main("caption")(["--plan", "--manifest", manifest, "--out", str(tmp_path / "c"), "--backend", "vllm",
                                "--model", qwen_like, "plan.device=L4", "plan.gpu_hour_price=1"])
    printed = capsys.readouterr().out
    assert plan["pairs"]["error_rows"] == 2 and "2 × image not found: <path>" in printed
    assert "no throughput known" in printed  # a local folder is not the model the defaults are for
    assert not (tmp_path / "c").exists(), "a plan writes nothing"


def test_throughput_order_given_then_bench_then_default():
    qwen = CaptionConfig(backend="vllm", model="Qwen/Qwen2.5-VL-7B-Instruct")
    default = throughput_for(qwen, qwen.model, "H100", figures=[])
    assert default == DEFAULT_THROUGHPUT[(qwen.model, "H100")] and default.source.startswith("roofline estimate")
    # The roofline model as documented: 40% of the H100's 989 dense BF16 TFLOPS over 2 x 8.3e9 FLOPs per token.
    assert default.prefill_tokens_per_s == pytest.approx(0.4 * 989e12 / (2 * 8.3e9), rel=1e-3)
    figure = {"model": qwen.model, "device": "H100", "prefill_tokens_per_s": 9000.0, "decode_tokens_per_s": 1500.0,
              "measured_at": "2026-12-01", "machine": "1x H100"}
    measured = throughput_for(qwen, qwen.model, "H100", figures=[figure])
    assert (measured.prefill_tokens_per_s, measured.decode_tokens_per_s) == (9000.0, 1500.0)
    assert "measured by bench/caption_throughput_bench.py" in measured.source
    given = CaptionConfig(backend="vllm", model=qwen.model, plan={"decode_tokens_per_s": 700.0})
    partly = throughput_for(given, qwen.model, "H100", figures=[figure])
    assert (partly.prefill_tokens_per_s, partly.decode_tokens_per_s) == (9000.0, 700.0)
    assert throughput_for(qwen, qwen.model, "T4", figures=[]) is None


def test_pilot_output_tokens_are_the_measured_mean(tmp_path):
    out = str(tmp_path / "captions")
    now = datetime.now(timezone.utc)
    rows = [{"id": i, "status": "ok", "fingerprint": "fp", "output_tokens": t, "captioned_at": now}
            for i, t in (("p1", 10), ("p2", 20), ("p3", 60), ("other", 1000))]
    rows.append({"id": "p4", "status": "ok", "fingerprint": "fp", "output_tokens": 999, "captioned_at": now,
                 "reused_from": "p1"})  # a copy: nothing was generated for it
    with CaptionWriter(out, rows_per_file=10, flush_seconds=60, attempts=1, storage_kw={}) as writer:
        writer.add(pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA))
    cfg = CaptionConfig(out=out, sampling={"max_tokens": 512})
    estimate = output_estimate(cfg, "fp", ["p1", "p2", "p3", "p4"], pairs=100)
    assert estimate["per_pair"] == 30.0 and estimate["total"] == 3000 and estimate["source"].startswith("pilot: 3")
    assert output_estimate(cfg, "fp", None, pairs=100)["total"] == 51200
    ids = pa.array([f"x{i}" for i in range(50)])
    sample = pilot_sample(ids, 5)
    assert len(set(sample)) == 5 and sample == pilot_sample(ids, 5) and sample != [f"x{i}" for i in range(5)]
    assert len(pilot_sample(ids, 500)) == 50
