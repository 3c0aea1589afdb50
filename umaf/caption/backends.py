"""VLM backends behind one interface, and the rows they produce.

* ``hf`` — :class:`HFBackend`: transformers ``AutoModelForImageTextToText`` + ``AutoProcessor``,
  batched ``generate``, the caption JSON schema enforced token by token by xgrammar's logits
  processor (the grammar engine vLLM uses too), so even a random-weight model answers in schema.
* ``vllm`` — not a class here: Ray's own ``ray.data.llm`` runs the engines. This module only builds
  what it needs, as pure functions that are unit-tested without vLLM: the
  ``vLLMEngineProcessorConfig`` (:func:`vllm_processor_config`), one request per row
  (:func:`vllm_request`: chat messages with the image, sampling parameters with
  ``structured_outputs={"json": schema}``) and the mapping of its output rows back to caption
  rows (:func:`vllm_output_to_caption`).

Both paths end in :func:`caption_row`, so the stored rows are identical whichever backend made them.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from umaf.caption.config import TINY_MODEL, CaptionConfig
from umaf.caption.fields import caption_json_schema
from umaf.caption.parse import parse_caption
from umaf.caption.prompt import PROMPT_VERSION, render_prompt
from umaf.caption.store import CAPTION_SCHEMA, STATUS_ERROR

log = logging.getLogger("umaf.caption")

CAPTION_ROW_KEYS = tuple(CAPTION_SCHEMA.names)


@dataclass(frozen=True)
class Generation:
    raw: str
    output_tokens: int
    truncated: bool  # stopped at max_tokens rather than at end-of-sequence


class CaptionBackend(Protocol):
    model_name: str

    def generate(self, texts: list[str], images: list[Any]) -> list[Generation]:
        """One generation per (text, PIL image) pair, in order."""
        ...


def caption_row(
    pair_id: str,
    *,
    model: str,
    sampling_json: str,
    image_sha256: str | None,
    generation: Generation | None = None,
    error: str | None = None,
    max_field_chars: int | None = None,
    captioned_at: datetime | None = None,
    request_key: str | None = None,
) -> dict[str, Any]:
    """One row of :data:`umaf.caption.store.CAPTION_SCHEMA`.

    ``error`` (image or inference failure) gives ``status="error"``; otherwise the generation is
    parsed and gives ``ok`` or ``invalid`` (with the raw text always kept).
    """
    row: dict[str, Any] = {
        "id": pair_id, "ocr": None, "visual_scene": None, "textimage_relation": None, "raw": None,
        "status": STATUS_ERROR, "error": error, "model": model, "prompt_version": PROMPT_VERSION,
        "sampling": sampling_json, "image_sha256": image_sha256, "output_tokens": None,
        "captioned_at": captioned_at or datetime.now(timezone.utc), "request_key": request_key,
        "reused_from": None,  # generated here (the driver sets it on rows copied from a twin request)
    }
    if error is not None or generation is None:
        row["error"] = error or "no generation"
        return row
    parsed = parse_caption(generation.raw, truncated=generation.truncated, max_field_chars=max_field_chars)
    row.update(
        raw=generation.raw, status=parsed.status, error=parsed.error, output_tokens=generation.output_tokens,
        ocr=parsed.ocr, visual_scene=parsed.visual_scene, textimage_relation=parsed.textimage_relation,
    )
    return row


def resolve_model_path(config: CaptionConfig) -> str:
    """``tiny`` → the locally built tiny VLM (built on first use); anything else is passed on as given."""
    if config.model == TINY_MODEL:
        from umaf.caption.tiny_vlm import ensure_tiny_vlm

        return str(ensure_tiny_vlm(config.model_cache_dir))
    return config.model


def model_label(config: CaptionConfig) -> str:
    """The ``model`` column: the name the user gave (a local path is reduced to its folder name)."""
    if config.model == TINY_MODEL:
        from umaf.caption.tiny_vlm import TINY_VLM_VERSION

        return f"umaf-tiny-llava-v{TINY_VLM_VERSION}"
    return Path(config.model).name if Path(config.model).exists() else config.model


def hub_revision(config: CaptionConfig) -> str | None:
    """The revision to load a hub model at (the caption job sets the resolved commit); None for a
    local or ``s3://`` model."""
    if config.model == TINY_MODEL or "://" in config.model or Path(config.model).exists():
        return None
    return config.model_revision


# ------------------------------------------------------------------------------------------------
# hf


class HFBackend:
    """transformers VLM with xgrammar-constrained JSON output. One instance per actor (holds the model)."""

    def __init__(self, config: CaptionConfig):
        import torch
        import xgrammar as xgr
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = config
        self.model_name = model_label(config)
        path = resolve_model_path(config)
        device = config.hf.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        on_gpu_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        dtype = {"auto": on_gpu_dtype if device.startswith("cuda") else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[config.hf.dtype]
        kwargs: dict[str, Any] = {"dtype": dtype}
        if config.hf.attn_implementation:
            kwargs["attn_implementation"] = config.hf.attn_implementation
        self.device = device
        revision = {"revision": rev} if (rev := hub_revision(config)) else {}
        self.model = AutoModelForImageTextToText.from_pretrained(path, **kwargs, **revision).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(path, **revision)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only batched generation: pad on the left
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The model's vocabulary can be larger than the tokenizer's (padded embeddings).
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=vocab_size)
        schema = json.dumps(caption_json_schema(config.max_field_chars))
        self.grammar = xgr.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False)
        self.eos_ids = set(_as_list(self.model.generation_config.eos_token_id) or [self.tokenizer.eos_token_id])

    def _prompt(self, text: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": render_prompt(text)}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(self, texts: list[str], images: list[Any]) -> list[Generation]:
        import torch
        import xgrammar as xgr

        if not texts:
            return []
        s = self.config.sampling
        inputs = self.processor(
            images=images, text=[self._prompt(t) for t in texts], return_tensors="pt", padding=True
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": s.max_tokens, "repetition_penalty": s.repetition_penalty}
        if s.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
            if s.seed is not None:
                torch.manual_seed(s.seed)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            # A fresh grammar processor per call: xgrammar's matchers are single-use.
            out = self.model.generate(
                **inputs, logits_processor=[xgr.contrib.hf.LogitsProcessor(self.grammar)],
                pad_token_id=self.tokenizer.pad_token_id, **gen_kwargs,
            )
        new_tokens = out[:, inputs["input_ids"].shape[1]:].tolist()
        results = []
        for tokens in new_tokens:
            n, ended = len(tokens), False
            for i, tok in enumerate(tokens):
                if tok in self.eos_ids:
                    n, ended = i + 1, True
                    break
            text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
            results.append(Generation(raw=text, output_tokens=n, truncated=not ended and n >= s.max_tokens))
        return results


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]


# ------------------------------------------------------------------------------------------------
# vllm (through ray.data.llm)


def vllm_engine_kwargs(config: CaptionConfig) -> dict[str, Any]:
    v = config.vllm
    mm_kwargs: dict[str, Any] = {"max_pixels": v.max_pixels}
    if v.min_pixels is not None:
        mm_kwargs["min_pixels"] = v.min_pixels
    kwargs: dict[str, Any] = {
        "max_model_len": v.max_model_len,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "tensor_parallel_size": v.tensor_parallel_size,
        "mm_processor_kwargs": mm_kwargs,
        # One image per prompt and no video: vLLM sizes its multimodal profiling run and encoder
        # cache from these limits, so an unused modality left at its default wastes GPU memory.
        "limit_mm_per_prompt": {"image": 1, "video": 0},
        "trust_remote_code": False,
        "dtype": "bfloat16" if config.precision == "bf16" else "float32",  # the job's precision setting
    }
    if v.max_num_seqs is not None:
        kwargs["max_num_seqs"] = v.max_num_seqs
    if revision := hub_revision(config):  # the commit the caption fingerprint names
        kwargs["revision"] = revision
    kwargs.update(v.engine_kwargs)
    return kwargs


def vllm_processor_config(config: CaptionConfig):
    """The ``ray.data.llm.vLLMEngineProcessorConfig`` for this job (constructible without vLLM installed).

    - Replicas: ``concurrency=(actors.min_actors, actors.max_actors)`` always as a pair. An int ``n``
      means an autoscaling pool ``(1, n)`` in ray's processor (``ProcessorConfig.get_concurrency``),
      which starts one engine and adds the others only under backpressure, minutes each; equal
      bounds give a fixed pool that starts every replica at once.
    - ``vllm.replica_resources`` (e.g. ``{caption_node: 1}``) go into each replica's bundle (one per
      GPU), so replicas only land on nodes that offer them.
    - ``should_continue_on_error``: a failing request comes back as a row with
      ``__inference_error__`` instead of failing the job (see :func:`vllm_error_to_caption`).
    - The CPU stages (multimodal prep, chat template, tokenize, detokenize) are actor pools of
      ``1..vllm.cpu_stage_actors`` (default ``actors.max_actors``) actors.
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    if config.model == TINY_MODEL:
        raise ValueError("backend=vllm needs a real model (model=Qwen/Qwen2.5-VL-7B-Instruct or a path); "
                         "'tiny' is the hf backend's test model")
    a, v = config.actors, config.vllm
    cpu_stage = {"enabled": True, "concurrency": (1, v.cpu_stage_actors or a.max_actors),
                 "num_cpus": v.cpu_stage_num_cpus}
    kwargs: dict[str, Any] = dict(
        model_source=config.model,
        engine_kwargs=vllm_engine_kwargs(config),
        batch_size=a.batch_size,
        concurrency=(a.min_actors, a.max_actors),
        max_concurrent_batches=v.max_concurrent_batches,
        should_continue_on_error=True,
        prepare_multimodal_stage=dict(cpu_stage),
        chat_template_stage=dict(cpu_stage),
        tokenize_stage=dict(cpu_stage),
        detokenize_stage=dict(cpu_stage),
    )
    if v.replica_resources:
        kwargs["placement_group_config"] = {
            "bundle_per_worker": {"CPU": 1, "GPU": 1, **v.replica_resources}, "strategy": "PACK"}
    if v.accelerator_type:
        kwargs["accelerator_type"] = v.accelerator_type
    if env := vllm_runtime_env(config):  # (a dict with env_vars, or {} when there is nothing to say)
        kwargs["runtime_env"] = env
    return vLLMEngineProcessorConfig(**kwargs)


def vllm_runtime_env(config: CaptionConfig) -> dict[str, Any]:
    """The runtime env of ray.data.llm's actors: where the object store is (``storage.endpoint_url``
    / ``region``, else the driver's AWS_ENDPOINT_URL/AWS_REGION), never credentials. With ``model``
    an ``s3://`` URI, each actor downloads the model from there (ray's ``download_model_files``, boto3:
    it reads AWS_ENDPOINT_URL for MinIO and other S3-compatible stores)."""
    from umaf import storage
    from umaf.raycluster import checked_runtime_env

    env = storage.forwarded_env()
    if config.storage.endpoint_url:  # boto3 prefers the _S3 one when both are set: set both
        env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"] = config.storage.endpoint_url
    if config.storage.region:
        env["AWS_REGION"] = config.storage.region
    return checked_runtime_env(env)


def vllm_sampling_params(config: CaptionConfig) -> dict[str, Any]:
    s = config.sampling
    params: dict[str, Any] = {
        "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
        "repetition_penalty": s.repetition_penalty,
        "structured_outputs": {"json": caption_json_schema(config.max_field_chars)},
    }
    if s.seed is not None:
        params["seed"] = s.seed
    return params


# Ray's error-row marker (ray/llm/_internal/batch/stages/base.py: every stage skips a row whose
# ``__inference_error__`` is not "", and ``wrap_postprocess`` returns it without calling ours).
INFERENCE_ERROR = "__inference_error__"


def vllm_request(row: dict[str, Any], config: CaptionConfig) -> dict[str, Any]:
    """``build_processor`` preprocess: one loaded-image row → chat messages + sampling parameters.

    The image goes in as a base64 JPEG data URL (already sized for the model by the CPU stage),
    which vLLM's chat parser accepts for every multimodal model; the pair's id and image hash ride
    along. A row whose image could not be loaded gets ray's error marker instead of a request:
    every stage of the processor passes it through untouched (no engine call), and it comes out
    as an error row like an engine failure, in the same single pass over the data.
    """
    if row.get("error") is not None or not row.get("image_jpeg"):
        return {INFERENCE_ERROR: f"image: {row.get('error') or 'no image'}", "id": row["id"],
                "image_sha256": row.get("image_sha256"), "request_key": row.get("request_key")}
    data_url = "data:image/jpeg;base64," + base64.b64encode(row["image_jpeg"]).decode("ascii")
    return {
        "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": render_prompt(row["text"])},
            ]},
        ],
        "sampling_params": vllm_sampling_params(config),
        "id": row["id"],
        "image_sha256": row["image_sha256"],
        "request_key": row.get("request_key"),
        # Set on every row so the column has one type ("" = no error); a row without it would read
        # back as None, which ray's stages take for an error.
        INFERENCE_ERROR: "",
        # ray keeps every input column in the row it hands from stage to stage (wrap_preprocess), so
        # the JPEG would ride through all five stages to the end; the request above holds it now.
        "image_jpeg": None,
    }


def vllm_output_to_caption(row: dict[str, Any], config: CaptionConfig) -> dict[str, Any]:
    """``build_processor`` postprocess: a successful vLLM output row → a caption row.

    Ray calls it only for rows without an error (error rows bypass it, see
    :func:`vllm_error_to_caption`). Ray's output row has no finish reason
    (``vLLMOutputData`` keeps text, tokens and counts), so a generation is taken as cut off when it
    used all of ``max_tokens``.
    """
    tokens = int(row.get("num_generated_tokens") or 0)
    generation = Generation(raw=row.get("generated_text") or "", output_tokens=tokens,
                            truncated=tokens >= config.sampling.max_tokens)
    return caption_row(row["id"], model=model_label(config), sampling_json=config.sampling.as_json(),
                       image_sha256=row.get("image_sha256"), generation=generation,
                       max_field_chars=config.max_field_chars, request_key=row.get("request_key"))


def vllm_error_to_caption(row: dict[str, Any], *, model: str, sampling_json: str) -> dict[str, Any]:
    """A processor output row → a caption row, whichever kind it is.

    ``wrap_postprocess`` hands back an error row as ray's whole internal row (our input columns,
    the request, ``__inference_error__``) without calling our postprocess; here it becomes a
    ``status=error`` caption row naming the reason: the image-stage error for a row that never
    reached the engine, else ``inference failed: <vLLM's error>``. Success rows (already caption
    rows) only lose the marker.
    """
    error = row.get(INFERENCE_ERROR) or ""
    if not error:
        return {name: row.get(name) for name in CAPTION_ROW_KEYS}
    reason = row.get("error") if error.startswith("image: ") and row.get("error") else f"inference failed: {error}"
    return caption_row(row["id"], model=model, sampling_json=sampling_json,
                       image_sha256=row.get("image_sha256"), error=reason, request_key=row.get("request_key"))


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
