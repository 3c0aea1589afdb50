"""The fake engine's body (see the package docstring for the ray source lines each piece answers to)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

_SAMPLING_KEYS = {"n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop",
                  "stop_token_ids", "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs",
                  "prompt_logprobs", "skip_special_tokens", "detokenize", "ignore_eos", "structured_outputs"}
# Qwen2-VL/2.5-VL image processor constants: 14 px patches merged 2x2 → one token per 28x28 pixels.
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 14 * 14 * 4 * 16384


def qwen_smart_resize(height: int, width: int, factor: int = QWEN_FACTOR, min_pixels: int = QWEN_MIN_PIXELS,
                      max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """The size Qwen2-VL's processor resizes an image to, and its one hard failure (aspect ratio > 200)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class StructuredOutputsParams:
    def __init__(self, json: Any = None, regex: str | None = None, choice: list | None = None,
                 grammar: str | None = None, json_object: bool | None = None, **kwargs: Any):
        self.json = json
        self.regex, self.choice, self.grammar, self.json_object = regex, choice, grammar, json_object


class SamplingParams:
    def __init__(self, **kwargs: Any):
        unknown = set(kwargs) - _SAMPLING_KEYS
        if unknown:  # vLLM's SamplingParams is a msgspec struct: unknown keywords are a TypeError
            raise TypeError(f"Unexpected keyword argument(s) {sorted(unknown)}")
        self.temperature = float(kwargs.get("temperature", 1.0))
        self.top_p = float(kwargs.get("top_p", 1.0))
        self.max_tokens = int(kwargs.get("max_tokens") or 16)
        self.seed = kwargs.get("seed")
        self.repetition_penalty = float(kwargs.get("repetition_penalty", 1.0))
        self.structured_outputs = kwargs.get("structured_outputs")

    def __repr__(self) -> str:
        return f"SamplingParams(temperature={self.temperature}, max_tokens={self.max_tokens})"


class PoolingParams:
    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: Any = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Any = None


class PoolingRequestOutput:  # only for isinstance checks in ray
    pass


class AsyncEngineArgs:
    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs
        self.model = kwargs["model"]
        self.max_model_len = int(kwargs.get("max_model_len") or 4096)
        self.max_num_seqs = int(kwargs.get("max_num_seqs") or 256)
        mm = kwargs.get("mm_processor_kwargs") or {}
        self.min_pixels = int(mm.get("min_pixels", QWEN_MIN_PIXELS))
        self.max_pixels = int(mm.get("max_pixels", QWEN_MAX_PIXELS))
        self.limit_mm_per_prompt = kwargs.get("limit_mm_per_prompt") or {}

    def create_engine_config(self):
        return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=self.max_num_seqs),
                               parallel_config=SimpleNamespace(pipeline_parallel_size=1))


@dataclass
class AsyncLLMEngine:
    args: AsyncEngineArgs
    tokenizer: Any = None
    requests: int = 0
    started: float = field(default_factory=time.time)

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, stat_loggers: Any = None, **_: Any) -> AsyncLLMEngine:
        from transformers import AutoTokenizer

        engine = cls(engine_args, AutoTokenizer.from_pretrained(engine_args.model))
        record = os.environ.get("FAKE_VLLM_RECORD_DIR")
        if record:
            os.makedirs(record, exist_ok=True)
            path = os.path.join(record, f"engine-{os.getpid()}-{id(engine)}.json")
            placement = {}
            try:  # where Ray put this replica and what it reserved for it (test hook, not vLLM's)
                import ray

                context = ray.get_runtime_context()
                placement = {"node_id": context.get_node_id(), "resources": context.get_assigned_resources()}
            except Exception:  # noqa: BLE001 - outside Ray
                pass
            with open(path, "w") as fh:
                json.dump({"pid": os.getpid(), "kwargs": engine_args.kwargs, **placement}, fh, default=str)
        return engine

    def _image_tokens(self, images: list[Any]) -> int:
        limit = self.args.limit_mm_per_prompt.get("image")
        if limit is not None and len(images) > limit:
            raise ValueError(f"At most {limit} image(s) may be provided in one prompt.")
        total = 0
        for image in images:
            width, height = image.size
            h_bar, w_bar = qwen_smart_resize(height, width, min_pixels=self.args.min_pixels,
                                             max_pixels=self.args.max_pixels)
            total += h_bar * w_bar // (QWEN_FACTOR * QWEN_FACTOR)
        return total

    def _answer(self, images: list[Any], params: SamplingParams) -> str:
        schema = getattr(params.structured_outputs, "json", None) or {}
        props = schema.get("properties", {}) if isinstance(schema, dict) else {}
        size = "x".join(str(v) for v in images[0].size) if images else "none"
        values = {"ocr": "no text", "visual_scene": f"a {size} picture", "textimage_relation": "consistent"}
        for name, prop in props.items():
            if name in values and prop.get("maxLength"):
                values[name] = values[name][: int(prop["maxLength"])]
        return json.dumps(values)

    async def generate(self, request_id: str, prompt: dict, sampling_params: SamplingParams, lora_request: Any = None,
                       **_: Any):
        self.requests += 1
        delay = float(os.environ.get("FAKE_VLLM_SECONDS_PER_REQUEST", "0") or 0)
        if delay:
            await asyncio.sleep(delay)
        mm = prompt.get("multi_modal_data") or {}
        images = mm.get("image") or []
        images = images if isinstance(images, list) else [images]
        ids = prompt.get("prompt_token_ids")
        if ids is None:
            ids = self.tokenizer(prompt["prompt"])["input_ids"]
        placeholders = len(images)  # one placeholder token per image in the tokenized prompt
        length = len(ids) - placeholders + self._image_tokens(images)
        if length > self.args.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {length}) is longer than the maximum model length of "
                f"{self.args.max_model_len}. Make sure that `max_model_len` is no smaller than the number of text "
                "tokens plus multimodal tokens. For image inputs, the number of image tokens depends on the number "
                "of images, and possibly their aspect ratios as well.")
        text = self._answer(images, sampling_params)
        tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        finish = "stop"
        if len(tokens) + 1 > sampling_params.max_tokens:
            tokens, finish = tokens[: sampling_params.max_tokens], "length"
        elif eos is not None:
            tokens = tokens + [eos]
        out = CompletionOutput(0, self.tokenizer.decode(tokens, skip_special_tokens=True), tokens,
                               finish_reason=finish)
        yield RequestOutput(request_id, None, list(ids), None, [out], finished=True)

    async def do_log_stats(self) -> None:
        return None

    def shutdown(self) -> None:
        return None


class ModelConfig:
    def __init__(self, model: str, **kwargs: Any):
        self.model = model
        self.kwargs = kwargs
        self.placeholder = "<image>"
        if model.startswith("s3://"):
            # vLLM's ModelConfig pulls an object-store model's config files first
            # (maybe_pull_model_tokenizer_for_runai, with runai-model-streamer); here, config.json via boto3.
            import boto3

            bucket, _, key = model.removeprefix("s3://").partition("/")
            body = boto3.client("s3").get_object(Bucket=bucket, Key=f"{key.rstrip('/')}/config.json")["Body"].read()
            model_type = json.loads(body).get("model_type", "")
        else:
            try:
                with open(os.path.join(model, "config.json")) as fh:
                    model_type = json.load(fh).get("model_type", "")
            except OSError:
                model_type = ""
        if model_type.startswith("qwen2"):
            self.placeholder = "<|vision_start|><|image_pad|><|vision_end|>"


def _load_image_url(url: str):
    from PIL import Image

    if not url.startswith("data:image/"):
        raise ValueError(f"the fake vLLM fetches data URLs only, got {url[:40]!r}")
    data = base64.b64decode(url.split(",", 1)[1])
    return Image.open(io.BytesIO(data)).convert("RGB")


async def parse_chat_messages_async(messages: list[dict], model_config: ModelConfig, content_format: str = "string",
                                    **_: Any):
    conversation, images = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            conversation.append({"role": message["role"], "content": content})
            continue
        texts, placeholders = [], []
        for part in (content if content is not None else []):  # ray hands lists over as numpy arrays
            kind = part.get("type")
            if kind == "image_url":
                images.append(_load_image_url(part["image_url"]["url"]))
                placeholders.append(model_config.placeholder)
            elif kind == "text":
                texts.append(part["text"])
            else:
                raise ValueError(f"Unknown part type: {kind}")
        if content_format == "string":
            conversation.append({"role": message["role"], "content": "\n".join(placeholders + texts)})
        else:
            parts = [{"type": "image"} for _ in placeholders] + [{"type": "text", "text": t} for t in texts]
            conversation.append({"role": message["role"], "content": parts})
    mm_data = {"image": images} if images else None
    mm_uuids = {"image": [None] * len(images)} if images else None
    return conversation, mm_data, mm_uuids


class EngineDeadError(Exception):
    pass


class RayPrometheusStatLogger:
    pass
