"""``CaptionConfig``: every knob of ``jobs/caption.py`` (presets in ``configs/caption/*.yaml``)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from umaf.config import ModelRef, PathOrUri, RayConfig, StorageConfig, StrictModel

TINY_MODEL = "tiny"  # model name that means: the tiny random-weight LLaVA built by umaf.caption.tiny_vlm


class SamplingConfig(StrictModel):
    """Generation parameters, identical for both backends and stored with every caption."""

    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (reproducible captions)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (when temperature > 0)")
    max_tokens: int = Field(512, ge=1, description="max new tokens per caption; a caption cut here is 'invalid'")
    seed: int | None = Field(0, description="sampling seed (when temperature > 0)")
    repetition_penalty: float = Field(1.0, gt=0.0, description="1.0 = off")

    def as_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


class HFConfig(StrictModel):
    """The transformers backend (CPU or GPU)."""

    device: str = Field("auto", description="'auto' (cuda if the actor has a GPU, else cpu), 'cpu', 'cuda'")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto': the job's precision on GPU (bf16 by default), float32 on CPU"
    )
    attn_implementation: str | None = Field(None, description="e.g. 'sdpa', 'flash_attention_2'")


class VLLMConfig(StrictModel):
    """The vLLM backend via ``ray.data.llm`` (GPU). One engine replica per ``tensor_parallel_size`` GPUs."""

    max_model_len: int = Field(8192, ge=256, description="context length of the engine")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica")
    max_pixels: int = Field(
        1280 * 28 * 28, ge=28 * 28, description="mm_processor_kwargs.max_pixels (Qwen2.5-VL image budget)"
    )
    min_pixels: int | None = Field(None, description="mm_processor_kwargs.min_pixels")
    max_num_seqs: int | None = Field(None, description="engine max_num_seqs (None: vLLM default)")
    accelerator_type: str | None = Field(None, description="e.g. 'A10G', 'H100' to pin replicas to a GPU type")
    replica_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each replica asks for per GPU, e.g. {caption_node: 1} to keep replicas "
        "on the caption node type (cluster/aws.yaml, KubeRay gpu-caption group)",
    )
    max_concurrent_batches: int = Field(
        8, ge=1, description="batches in flight per replica (ray.data.llm): keeps the engine's queue full"
    )
    cpu_stage_actors: int | None = Field(
        None, ge=1,
        description="max actors of each ray.data.llm CPU stage (multimodal prep, chat template, tokenize, "
        "detokenize); None = actors.max_actors",
    )
    cpu_stage_num_cpus: float = Field(
        1.0, gt=0, description="CPUs each actor of those CPU stages reserves (with cpu_stage_actors: the CPU "
        "stages' share of the cluster, which should fit on the CPU nodes so they never start GPU nodes)",
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra vLLM engine arguments")


class ImageConfig(StrictModel):
    """The CPU stage that loads images before the VLM actors see them."""

    max_side: int = Field(768, ge=16, description="downscale so the longest side is at most this (pixels)")
    max_area: int | None = Field(
        None, ge=28 * 28, description="downscale so width x height is at most this (the model's pixel budget)"
    )
    multiple_of: int = Field(
        1, ge=1, description="round both sides to a multiple of this (28: Qwen2-VL's grid, so vLLM resizes nothing)"
    )
    min_side: int = Field(1, ge=1, description="pad (black) so the short side is at least this")
    max_aspect_ratio: float = Field(
        100.0, ge=1.0, le=200.0,
        description="pad so long/short is at most this (Qwen2-VL's processor rejects ratios above 200)",
    )
    max_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="larger image files are 'error' rows")
    max_pixels: int = Field(
        64_000_000, ge=1024, description="decoded width×height above this is 'error' (decompression bombs)"
    )
    jpeg_quality: int = Field(90, ge=30, le=100, description="re-encoding quality after downscaling")
    batch_size: int = Field(32, ge=1, description="rows per image-loading task")


class ActorsConfig(StrictModel):
    """The VLM actor pool."""

    min_actors: int = Field(1, ge=1, description="actors started at once")
    max_actors: int = Field(1, ge=1, description="pool grows up to this many (one per GPU for GPU runs)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per actor (hf backend; vllm uses tensor_parallel_size)")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per actor")
    batch_size: int = Field(8, ge=1, description="pairs per generate() call")

    @model_validator(mode="after")
    def _pool_bounds(self) -> ActorsConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"actors.min_actors={self.min_actors} is above actors.max_actors={self.max_actors}")
        return self


class OutputConfig(StrictModel):
    """How captions reach storage: the driver writes a Parquet file every ``rows_per_file`` rows or
    every ``flush_seconds``, whichever comes first, so a killed run loses at most one file's worth
    plus the rows in flight."""

    rows_per_file: int = Field(
        500, ge=1, le=5000, description="rows per Parquet file at most (a file is written as soon as it is full)"
    )
    flush_seconds: float = Field(
        30.0, gt=0.0, le=600.0, description="write buffered rows at least this often, even if fewer than rows_per_file"
    )
    write_attempts: int = Field(
        5, ge=1, le=20, description="tries per file before the job fails with the storage error (backoff 1, 2, 4... s)"
    )
    progress_every_s: float = Field(
        10.0, gt=0.0, description="seconds between the driver's progress lines (pairs captioned, rate, ETA)"
    )


class PlanConfig(StrictModel):
    """``--plan``: what a run would cost, before it starts (no GPU; see umaf.caption.plan)."""

    enabled: bool = Field(False, description="print the pre-flight plan and exit (--plan)")
    pilot: int | None = Field(
        None, ge=1, description="caption this many pairs first (a real run into --out) and plan with their measured "
        "output tokens instead of the sampling.max_tokens cap (--pilot N)",
    )
    device: str | None = Field(
        None, description="GPU type the throughput is for (L4, A100-80GB, H100, or cpu); None: vllm.accelerator_type, "
        "else cpu for an hf run without GPUs",
    )
    gpus: int | None = Field(None, ge=1, description="GPUs for the wall-time estimate; None: the run's replicas")
    gpu_hour_price: float | None = Field(None, ge=0, description="price of one GPU-hour, for the cost line")
    prefill_tokens_per_s: float | None = Field(
        None, gt=0, description="prompt tokens one GPU processes per second; None: a bench/ figure, else the default"
    )
    decode_tokens_per_s: float | None = Field(
        None, gt=0, description="output tokens one GPU generates per second (full batch); None: as prefill"
    )
    header_bytes: int = Field(
        262_144, ge=1024, description="bytes read from each image for its header (more only if the header is later)"
    )
    threads: int = Field(16, ge=1, le=256, description="image headers read at once")


class CaptionConfig(StrictModel):
    """``jobs/caption.py``: caption a manifest's pairs with a VLM into a captions dataset."""

    manifest: PathOrUri | None = Field(
        None, description="manifest URI; None = the demo dataset, generated under demo_dir on first use"
    )
    out: PathOrUri = Field("./outputs/demo/captions", description="captions dataset URI (local folder or s3://)")
    demo_dir: PathOrUri = Field("./outputs/demo", description="where the demo dataset is written when manifest is None")
    splits: list[Literal["train", "dev", "test"]] | None = Field(None, description="caption only these splits")
    limit: int | None = Field(None, ge=1, description="caption only the first N selected rows (manifest order)")
    retry_failed: bool = Field(False, description="also redo ids whose caption is 'invalid' or 'error'")
    reuse_from: list[PathOrUri] = Field(
        default_factory=list,
        description="other captions URIs whose captions of identical requests (same image bytes, text and "
        "fingerprint) are copied instead of generated; --out is always searched",
    )
    backend: Literal["hf", "vllm"] = "hf"
    model: ModelRef = Field(TINY_MODEL, description="model path or hub id; 'tiny' = a tiny random-weight LLaVA built locally")
    model_revision: str | None = Field(
        None, description="hub model: branch, tag or commit (None: main), resolved to a commit that the engine is "
        "pinned to and the caption fingerprint names",
    )
    model_cache_dir: PathOrUri = Field("./outputs/cache/models", description="where the 'tiny' model is built")
    max_field_chars: int | None = Field(
        None, ge=1, description="maxLength of each JSON field, enforced while decoding (bounds cost and truncation)"
    )
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="the VLM's compute dtype on GPUs (hf.dtype=auto, and vLLM's dtype); CPUs use fp32"
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    hf: HFConfig = Field(default_factory=HFConfig)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    images: ImageConfig = Field(default_factory=ImageConfig)
    actors: ActorsConfig = Field(default_factory=ActorsConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    report: PathOrUri | None = Field(
        None, description="write the quality report of the captions at this URI (every fingerprint) and exit"
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @property
    def storage_kw(self) -> dict[str, Any]:
        return {"endpoint_url": self.storage.endpoint_url, "region": self.storage.region}
