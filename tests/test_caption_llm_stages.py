"""The row guard on ray.data.llm's CPU stages, on ray's own stage UDFs (no cluster, no vLLM).

ray's ``TokenizeUDF`` and ``DetokenizeUDF`` run here as Ray Data would call them
(``StatefulStageUDF.__call__`` on a batch), with the tiny VLM's real tokenizer. A row that makes the
stage raise fails the whole batch in ray's class; the guarded class returns the others and marks
that row with ray's error marker, which later stages pass through. The end-to-end case (a chat
template that refuses a row, on a cluster, through the caption job) is in tests/test_caption_vllm.py.
"""

from __future__ import annotations

import asyncio

import pytest

from umaf.caption.llm_stages import INFERENCE_ERROR, guarded


def call(udf, rows):
    async def run():
        return [out async for out in udf({"__data": [dict(r) for r in rows]})]

    (out,) = asyncio.run(run())
    return out["__data"]


@pytest.fixture(scope="module")
def model_path(tiny_vlm_cache):
    from umaf.caption.tiny_vlm import ensure_tiny_vlm

    return str(ensure_tiny_vlm(tiny_vlm_cache))


def test_a_row_that_breaks_ray_tokenize_stage_becomes_an_error_row(model_path):
    from ray.llm._internal.batch.stages.tokenize_stage import TokenizeUDF

    rows = [{"prompt": "a good day"}, {"prompt": 123}, {"prompt": "a bad day"},
            {"prompt": "skipped", INFERENCE_ERROR: "image: not found"}]
    with pytest.raises(Exception):  # ray's own class: one bad row fails the batch (and so the job)
        call(TokenizeUDF("__data", ["prompt"], model=model_path), rows)
    out = call(guarded(TokenizeUDF, "Tokenize")("__data", ["prompt"], model=model_path), rows)
    assert [bool(r.get("tokenized_prompt")) for r in out] == [True, False, True, False]
    assert out[1][INFERENCE_ERROR].startswith("Tokenize: ")
    assert out[3][INFERENCE_ERROR] == "image: not found", "an earlier error passes through untouched"
    plain = call(TokenizeUDF("__data", ["prompt"], model=model_path), [rows[0], rows[2]])
    assert [r["tokenized_prompt"] for r in plain] == [out[0]["tokenized_prompt"], out[2]["tokenized_prompt"]]


def test_guard_leaves_good_batches_to_ray_and_covers_detokenize(model_path):
    from ray.llm._internal.batch.stages.tokenize_stage import DetokenizeUDF

    udf = guarded(DetokenizeUDF, "Detokenize")("__data", ["generated_tokens"], model=model_path)
    out = call(udf, [{"generated_tokens": [5, 6, 7]}, {"generated_tokens": [-1]}])
    assert isinstance(out[0]["generated_text"], str) and INFERENCE_ERROR not in out[0]
    assert out[1][INFERENCE_ERROR].startswith("Detokenize: ")


def test_the_request_drops_the_jpeg_that_ray_would_carry_through_every_stage():
    """ray's wrap_preprocess keeps every input column in the row it passes from stage to stage; the
    request holds the image (as a data URL), so the JPEG column is emptied there."""
    from functools import partial

    from ray.llm._internal.batch.stages.base import wrap_preprocess

    from umaf.caption.backends import vllm_request
    from umaf.caption.config import CaptionConfig

    config = CaptionConfig(backend="vllm", model="Qwen/Qwen2.5-VL-7B-Instruct")
    jpeg = b"\xff\xd8\xff" + bytes(30_000)
    row = {"id": "a", "text": "hi", "image_jpeg": jpeg, "image_sha256": "h", "error": None}
    data = wrap_preprocess(partial(vllm_request, config=config), "__data")(dict(row))["__data"]
    assert data["image_jpeg"] is None
    assert data["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,/9j/")
    assert data["id"] == "a" and data[INFERENCE_ERROR] == ""


def test_guard_cpu_stages_wraps_the_cpu_stages_of_a_processor_and_not_the_engine():
    from ray.llm._internal.batch.processor.base import Processor
    from ray.llm._internal.batch.stages import ChatTemplateStage, DetokenizeStage, TokenizeStage

    from umaf.caption.backends import vllm_processor_config
    from umaf.caption.config import CaptionConfig
    from umaf.caption.llm_stages import RowGuard, guard_cpu_stages

    config = vllm_processor_config(CaptionConfig(backend="vllm", model="Qwen/Qwen2.5-VL-7B-Instruct"))
    stages = [cls(fn_constructor_kwargs={"model": "m"}, map_batches_kwargs={"concurrency": 1})
              for cls in (ChatTemplateStage, TokenizeStage, DetokenizeStage)]
    processor = guard_cpu_stages(Processor(config, stages))
    assert processor.list_stage_names() == ["ChatTemplateStage", "TokenizeStage", "DetokenizeStage"]
    for name, base in zip(processor.list_stage_names(), stages):
        fn = processor.get_stage_by_name(name).fn
        assert issubclass(fn, RowGuard) and issubclass(fn, base.fn)
