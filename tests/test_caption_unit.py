"""Unit tests of the caption pieces that need no Ray: prompt, schema, parser, images, rows, vllm requests."""

from __future__ import annotations

import base64
import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from umaf.caption.backends import (
    Generation,
    caption_row,
    vllm_engine_kwargs,
    vllm_error_to_caption,
    vllm_output_to_caption,
    vllm_processor_config,
    vllm_request,
)
from umaf.caption.config import CaptionConfig
from umaf.caption.fields import CAPTION_FIELDS, caption_json_schema
from umaf.caption.images import load_image, resolve_image_uri
from umaf.caption.parse import parse_caption
from umaf.caption.pipeline import done_ids, latest_status_counts
from umaf.caption.prompt import PROMPT_TEMPLATE, PROMPT_VERSION, prompt_version, render_prompt
from umaf.caption.store import CAPTION_SCHEMA

# ------------------------------------------------------------------ prompt


def test_prompt_is_appendix_a_filled_with_trimmed_text():
    prompt = render_prompt("  I love Mondays. \n")
    assert "Input Text: I love Mondays.\n" in prompt
    assert "{{" not in prompt and "content" not in prompt.split("Input Text:")[1].split("\n")[0]
    # The paper's words, from the first sentence to the Output Specification's three fields.
    assert prompt.startswith("You are an expert multimodal reasoning model.")
    for phrase in ("1. OCR Understanding.", "2. Visual Scene Analysis.", "3. Cross-modal Integration.",
                   "4. High-level Reasoning.", "three fields: ocr,", "visual_scene,", "textimage_relation,"):
        assert phrase in prompt


def test_prompt_keeps_the_text_verbatim_no_markup_or_template_injection():
    text = "<b>{{ 7*7 }}</b> & {% if x %}"
    prompt = render_prompt(text)
    assert f"Input Text: {text}\n" in prompt  # not escaped, not evaluated
    assert "49" not in prompt
    assert "Input Text: \n" in render_prompt(None)


def test_prompt_version_is_a_stable_short_hash_of_the_template():
    assert PROMPT_VERSION == prompt_version(PROMPT_TEMPLATE)
    assert len(PROMPT_VERSION) == 12 and int(PROMPT_VERSION, 16) >= 0
    assert prompt_version(PROMPT_TEMPLATE + " ") != PROMPT_VERSION


# ------------------------------------------------------------------ schema


def test_schema_has_exactly_the_three_required_string_fields():
    schema = caption_json_schema()
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert sorted(schema["required"]) == sorted(CAPTION_FIELDS)
    assert {name: prop["type"] for name, prop in schema["properties"].items()} == dict.fromkeys(CAPTION_FIELDS, "string")
    bounded = caption_json_schema(max_field_chars=40)
    assert all(prop["maxLength"] == 40 for prop in bounded["properties"].values())
    assert "maxLength" not in json.dumps(caption_json_schema())


def test_schema_compiles_in_xgrammar_and_accepts_only_schema_json():
    """Compiled as the hf backend compiles it (``compile_json_schema``, ``any_whitespace=False``), the
    grammar accepts a complete answer with the three fields in order within ``maxLength`` and rejects
    every other document: a missing, extra, reordered, over-long or non-string field, or a truncation."""
    import xgrammar as xgr

    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo(["a", "b"])).compile_json_schema(
        json.dumps(caption_json_schema(8)), any_whitespace=False)

    def accepts(document: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled)
        return matcher.accept_string(document) and matcher.is_completed()

    good = {"ocr": "SALE", "visual_scene": "rain", "textimage_relation": "ironic"}
    assert accepts(json.dumps(good))
    assert accepts(json.dumps({**good, "ocr": "x" * 8}))  # exactly maxLength
    assert accepts(json.dumps({**good, "ocr": ""}))
    rejected = [
        json.dumps({**good, "ocr": "x" * 9}),  # over maxLength
        json.dumps({"ocr": "SALE", "visual_scene": "rain"}),  # a required field missing
        json.dumps({**good, "extra": "x"}),  # additionalProperties: false
        json.dumps({**good, "ocr": 1}),  # not a string
        json.dumps(dict(reversed(list(good.items())))),  # fields out of the schema's order
        json.dumps(good)[:-1],  # truncated: not a complete document
        "not json",
    ]
    for document in rejected:
        assert not accepts(document), document


# ------------------------------------------------------------------ parser


def test_parser_valid_json():
    raw = '{"ocr": "SALE", "visual_scene": "a bright shop", "textimage_relation": "ironic"}'
    parsed = parse_caption(raw)
    assert parsed.status == "ok" and parsed.error is None
    assert (parsed.ocr, parsed.visual_scene, parsed.textimage_relation) == ("SALE", "a bright shop", "ironic")
    # Raw control characters inside strings are accepted (json strict=False).
    assert parse_caption('{"ocr": "a\tb\nc", "visual_scene": "", "textimage_relation": ""}').ocr == "a\tb\nc"


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("sure! here is the caption", "not valid JSON"),
        ('["ocr", "scene", "rel"]', "expected a JSON object"),
        ('{"ocr": "x", "visual_scene": "y"}', "textimage_relation: Field required"),
        ('{"ocr": "x", "visual_scene": "y", "textimage_relation": "z", "mood": "sad"}', "mood"),
        ('{"ocr": 3, "visual_scene": "y", "textimage_relation": "z"}', "ocr"),
        ("", "empty output"),
    ],
)
def test_parser_invalid_json(raw, reason):
    parsed = parse_caption(raw)
    assert parsed.status == "invalid"
    assert reason in parsed.error
    assert parsed.ocr is None


def test_parser_truncated_json_says_so():
    parsed = parse_caption('{"ocr": "a sign reading SA', truncated=True)
    assert parsed.status == "invalid"
    assert parsed.error.startswith("truncated JSON (hit max_new_tokens)")


def test_parser_enforces_max_field_chars():
    raw = json.dumps({"ocr": "x" * 20, "visual_scene": "y", "textimage_relation": "z"})
    assert parse_caption(raw, max_field_chars=20).status == "ok"
    parsed = parse_caption(raw, max_field_chars=10)
    assert parsed.status == "invalid" and "ocr" in parsed.error


def test_caption_rows_fit_the_schema_and_keep_the_raw_text():
    gen_ok = Generation('{"ocr": "", "visual_scene": "sun", "textimage_relation": "agree"}', 17, False)
    gen_bad = Generation('{"ocr": "cut', 64, True)
    rows = [
        caption_row("a", model="m", sampling_json="{}", image_sha256="h1", generation=gen_ok),
        caption_row("b", model="m", sampling_json="{}", image_sha256="h2", generation=gen_bad),
        caption_row("c", model="m", sampling_json="{}", image_sha256=None, error="image not found: x.jpg"),
    ]
    table = pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)
    assert table["status"].to_pylist() == ["ok", "invalid", "error"]
    assert table["raw"].to_pylist()[1] == '{"ocr": "cut'
    assert table["output_tokens"].to_pylist() == [17, 64, None]
    assert table["error"].to_pylist()[2] == "image not found: x.jpg"
    assert set(table["prompt_version"].to_pylist()) == {PROMPT_VERSION}


# ------------------------------------------------------------------ images


def _jpeg(path, size, colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return str(path)


def test_load_image_downscales_and_hashes_the_original(tmp_path):
    import hashlib

    path = _jpeg(tmp_path / "big.jpg", (400, 200))
    loaded = load_image(path, max_side=64, max_bytes=10**7, max_pixels=10**7)
    assert loaded.error is None
    assert loaded.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert max(Image.open(io.BytesIO(loaded.jpeg)).size) == 64


def test_load_image_missing_corrupt_enormous_are_reasons_not_exceptions(tmp_path):
    kw = {"max_side": 64, "max_bytes": 10**7, "max_pixels": 100 * 100}
    assert "image not found" in load_image(str(tmp_path / "nope.jpg"), **kw).error
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    bad = load_image(str(corrupt), **kw)
    assert bad.jpeg is None and "corrupt or unreadable" in bad.error and bad.sha256
    huge = load_image(_jpeg(tmp_path / "huge.jpg", (300, 300)), **kw)
    assert "image too large: 300x300 pixels" in huge.error
    heavy = load_image(_jpeg(tmp_path / "heavy.jpg", (50, 50)), **{**kw, "max_bytes": 10})
    assert "bytes > images.max_bytes=10" in heavy.error
    assert load_image(None, **kw).error == "no image path in the manifest row"


def test_relative_image_paths_resolve_against_the_manifest_folder():
    assert resolve_image_uri("images/1.jpg", "s3://b/msed/manifest") == "s3://b/msed/images/1.jpg"
    assert resolve_image_uri("/abs/1.jpg", "s3://b/msed/manifest") == "/abs/1.jpg"
    assert resolve_image_uri("s3://o/1.jpg", "/data/manifest") == "s3://o/1.jpg"


# ------------------------------------------------------------------ resume planning


def test_done_ids_and_status_counts():
    statuses = pa.table({"id": ["a", "b", "c", "c", "d"], "status": ["ok", "error", "error", "ok", "invalid"]})
    assert sorted(done_ids(statuses, retry_failed=False).to_pylist()) == ["a", "b", "c", "d"]
    assert sorted(done_ids(statuses, retry_failed=True).to_pylist()) == ["a", "c"]
    assert latest_status_counts(statuses) == {"ok": 2, "invalid": 1, "error": 1}


# ------------------------------------------------------------------ vllm request construction


def _vllm_config(**kw) -> CaptionConfig:
    base = {"backend": "vllm", "model": "Qwen/Qwen2.5-VL-7B-Instruct", "max_field_chars": 300,
            "vllm": {"max_pixels": 802816, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.85},
            "actors": {"min_actors": 1, "max_actors": 4, "batch_size": 16},
            "sampling": {"temperature": 0.0, "max_tokens": 256, "seed": 7}}
    base.update(kw)
    return CaptionConfig.model_validate(base)


def test_vllm_request_has_image_prompt_and_structured_outputs():
    config = _vllm_config()
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    row = {"id": "p1", "text": " so happy ", "image_jpeg": jpeg.getvalue(), "image_sha256": "abc", "error": None}
    request = vllm_request(row, config)
    assert request["id"] == "p1" and request["image_sha256"] == "abc"
    (message,) = request["messages"]
    image_part, text_part = message["content"]
    assert image_part["type"] == "image_url"
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == row["image_jpeg"]
    assert text_part == {"type": "text", "text": render_prompt(" so happy ")}
    params = request["sampling_params"]
    assert params["structured_outputs"] == {"json": caption_json_schema(300)}
    assert (params["temperature"], params["max_tokens"], params["seed"]) == (0.0, 256, 7)
    assert "guided_json" not in json.dumps(request)  # the removed old name


def test_vllm_processor_config_uses_ray_data_llm():
    from ray.data.llm import vLLMEngineProcessorConfig

    config = _vllm_config()
    processor_config = vllm_processor_config(config)
    assert isinstance(processor_config, vLLMEngineProcessorConfig)
    assert processor_config.model_source == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert processor_config.should_continue_on_error is True
    assert processor_config.batch_size == 16
    assert processor_config.concurrency == (1, 4)
    assert processor_config.prepare_multimodal_stage["enabled"] is True
    engine = processor_config.engine_kwargs
    assert engine["tensor_parallel_size"] == 2
    assert engine["gpu_memory_utilization"] == 0.85
    assert engine["mm_processor_kwargs"] == {"max_pixels": 802816}
    assert engine == {**vllm_engine_kwargs(config), **engine}
    with pytest.raises(ValueError, match="needs a real model"):
        vllm_processor_config(_vllm_config(model="tiny"))


def test_vllm_outputs_become_caption_rows_errors_included():
    config = _vllm_config()
    good = {"id": "p1", "image_sha256": "h", "__inference_error__": "", "num_generated_tokens": 20,
            "generated_text": '{"ocr": "", "visual_scene": "rain", "textimage_relation": "sad"}'}
    failed = {"id": "p2", "image_sha256": "h", "__inference_error__": "prompt too long", "generated_text": ""}
    truncated = {"id": "p3", "image_sha256": "h", "__inference_error__": "", "num_generated_tokens": 256,
                 "generated_text": '{"ocr": "abc'}
    # Ray calls the postprocess only for rows without an error; error rows come out raw and are
    # turned into caption rows after the processor (tests/test_caption_vllm.py runs the real path).
    rows = [vllm_output_to_caption(good, config), vllm_error_to_caption(failed, model="m", sampling_json="{}"),
            vllm_output_to_caption(truncated, config)]
    assert [r["status"] for r in rows] == ["ok", "error", "invalid"]
    assert rows[1]["error"] == "inference failed: prompt too long"
    assert rows[2]["error"].startswith("truncated JSON") and rows[2]["raw"] == '{"ocr": "abc'
    assert json.loads(rows[0]["sampling"])["max_tokens"] == 256


def test_vllm_engine_runs_where_gpu_and_vllm_exist():
    pytest.importorskip("vllm", reason="vllm is not installed (GPU extra `umaf[vllm]`); the engine runs only on a GPU node")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the vLLM engine cannot start on CPU")
    # On a GPU node with vLLM the processor config is built by vLLM's own classes: it must hold what the
    # job's config says (the engine run itself is bench/caption_bench.py --backend vllm; the Ray Data
    # plan around a fake engine is tested where vLLM is absent).
    processor_config = vllm_processor_config(_vllm_config())
    assert processor_config.model_source == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert processor_config.engine_kwargs["tensor_parallel_size"] == 2
    assert processor_config.engine_kwargs["gpu_memory_utilization"] == 0.85
    assert processor_config.batch_size == 16 and processor_config.concurrency == (1, 4)
    assert processor_config.should_continue_on_error is True
