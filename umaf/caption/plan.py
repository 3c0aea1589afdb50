"""``jobs/caption.py --plan``: what a caption run will cost, before it starts, without a GPU.

From the manifest and the image *headers* (no decode), with the run's own config:

1. **pairs**: selected (``splits``/``limit``), already captioned with this fingerprint, to caption;
2. **error rows**: the images the CPU stage would turn into error rows, with their reasons (missing,
   too many bytes or pixels, not an image; a body corrupt past a valid header shows only in the run);
3. **vision tokens** per image: the CPU stage's geometry (:func:`umaf.caption.images.target_geometry`),
   then the model's own processor's count for that size (``_get_num_multimodal_tokens``, or the
   image processor's ``get_number_of_image_patches`` / merge²: for Qwen2.5-VL, ``smart_resize`` onto
   the 28-px grid within ``min_pixels``/``max_pixels``, the ``vllm.*`` values vLLM passes it);
4. **prompt tokens**: each pair's chat-templated prompt through the model's tokenizer, with the
   image placeholder counted as its vision tokens;
5. **output tokens**: ``sampling.max_tokens`` per pair (an upper bound), or the mean measured by
   ``--pilot N`` (N pairs captioned for real first);
6. **GPU-hours** = prompt tokens / prefill rate + output tokens / decode rate (per GPU); wall time
   on ``plan.gpus``; cost at ``plan.gpu_hour_price``. The rates are, in order: ``plan.*`` as given,
   a figure ``bench/caption_throughput_bench.py --record`` measured for this model and device
   (``bench/caption_throughput.json``), or :data:`DEFAULT_THROUGHPUT`, a roofline estimate whose
   derivation is below. The plan says which one it used.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from umaf import storage
from umaf.caption.config import CaptionConfig
from umaf.caption.images import read_image_header, resolve_image_uri, target_geometry
from umaf.caption.prompt import render_prompt
from umaf.caption.report import reason_kind
from umaf.errors import UserError

log = logging.getLogger("umaf.caption")

BENCH_FIGURES = Path(__file__).resolve().parents[2] / "bench" / "caption_throughput.json"


# ------------------------------------------------------------------------------------------------
# Throughput


@dataclass(frozen=True)
class Throughput:
    prefill_tokens_per_s: float  # prompt tokens (text + image) one GPU processes per second
    decode_tokens_per_s: float  # output tokens one GPU generates per second, at the batch it can hold
    source: str


@dataclass(frozen=True)
class GpuSpec:
    bf16_tflops: float  # dense (no sparsity), NVIDIA datasheet
    memory_gb: float
    bandwidth_gb_s: float


# NVIDIA datasheet peaks: H100 SXM 989 TFLOPS dense BF16, 80 GB HBM3 at 3.35 TB/s; A100 SXM 80GB
# 312 TFLOPS, 2.04 TB/s; L40S 362 TFLOPS, 48 GB at 864 GB/s; L4 121 TFLOPS, 24 GB at 300 GB/s.
GPUS = {
    "H100": GpuSpec(989, 80, 3350),
    "A100-80GB": GpuSpec(312, 80, 2039),
    "L40S": GpuSpec(362, 48, 864),
    "L4": GpuSpec(121, 24, 300),
}
# Qwen2.5-VL-7B-Instruct: 7.6 B language-model + 0.67 B vision parameters (bf16: 16.6 GB); 28
# layers, 4 KV heads of 128 (grouped-query attention): 2 x 28 x 4 x 128 x 2 B = 57,344 B of KV cache
# per token.
QWEN25_VL_7B = {"params": 8.3e9, "kv_bytes_per_token": 57_344}
MFU_PREFILL = 0.40  # fraction of peak FLOPs a prefill-bound vLLM batch reaches (assumed)
MBU_DECODE = 0.70  # fraction of peak bandwidth a decode step reaches (assumed)
CONTEXT_TOKENS = 2_000  # mean tokens in a running sequence's KV cache: ~1.6k prompt + half an answer
MAX_NUM_SEQS = 256  # vLLM's default cap on running sequences
RESERVED_GB = 2.0  # activations, CUDA graphs, the vision encoder's workspace


def roofline_throughput(gpu: GpuSpec, params: float, kv_bytes_per_token: int,
                        gpu_memory_utilization: float = 0.9) -> tuple[float, float]:
    """(prefill, decode) tokens/s of one GPU for a bf16 decoder by the roofline model.

    Prefill is compute-bound: 2 x params FLOPs per token at ``MFU_PREFILL`` of peak. Decode is
    bandwidth-bound: each step reads the weights once and every running sequence's KV cache; the
    batch is what the KV cache holds at ``CONTEXT_TOKENS`` per sequence (at most ``MAX_NUM_SEQS``).
    """
    prefill = MFU_PREFILL * gpu.bf16_tflops * 1e12 / (2 * params)
    weights = 2 * params
    kv_room = gpu.memory_gb * 1e9 * gpu_memory_utilization - weights - RESERVED_GB * 1e9
    per_seq = CONTEXT_TOKENS * kv_bytes_per_token
    batch = max(1, min(MAX_NUM_SEQS, int(kv_room // per_seq)))
    step_s = (weights + batch * per_seq) / (MBU_DECODE * gpu.bandwidth_gb_s * 1e9)
    return prefill, batch / step_s


ROOFLINE_SOURCE = (
    "roofline estimate, not a measurement (umaf.caption.plan.roofline_throughput): NVIDIA datasheet peaks, "
    f"{MFU_PREFILL:.0%} of peak FLOPs for prefill, {MBU_DECODE:.0%} of peak bandwidth for decode "
    f"with the batch the KV cache holds at {CONTEXT_TOKENS} tokens per sequence; replace it with a measured figure "
    "(bench/caption_throughput_bench.py --record, or plan.prefill_tokens_per_s / plan.decode_tokens_per_s)"
)
DEFAULT_THROUGHPUT: dict[tuple[str, str], Throughput] = {
    ("Qwen/Qwen2.5-VL-7B-Instruct", name): Throughput(
        *(round(x, -1) for x in roofline_throughput(gpu, **QWEN25_VL_7B)), source=ROOFLINE_SOURCE)
    for name, gpu in GPUS.items()
}


def bench_figures(path: Path = BENCH_FIGURES) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("figures", [])


def throughput_for(config: CaptionConfig, model: str, device: str | None,
                   figures: list[dict[str, Any]] | None = None) -> Throughput | None:
    """The per-GPU rates the plan uses (see the module docstring for the order)."""
    p = config.plan
    figures = bench_figures() if figures is None else figures
    measured = [f for f in figures if f.get("model") == model and f.get("device") == device]
    base: Throughput | None = None
    if measured:
        f = measured[-1]
        base = Throughput(f["prefill_tokens_per_s"], f["decode_tokens_per_s"],
                          f"measured by bench/caption_throughput_bench.py on {f.get('machine', device)} at "
                          f"{f.get('measured_at', '?')} (bench/caption_throughput.json)")
    elif (model, device) in DEFAULT_THROUGHPUT:
        base = DEFAULT_THROUGHPUT[(model, device)]
    if p.prefill_tokens_per_s and p.decode_tokens_per_s:
        return Throughput(p.prefill_tokens_per_s, p.decode_tokens_per_s, "given (plan.prefill_tokens_per_s, "
                          "plan.decode_tokens_per_s)")
    if base and (p.prefill_tokens_per_s or p.decode_tokens_per_s):
        return Throughput(p.prefill_tokens_per_s or base.prefill_tokens_per_s,
                          p.decode_tokens_per_s or base.decode_tokens_per_s, f"partly given; the rest {base.source}")
    return base


def plan_device(config: CaptionConfig) -> str | None:
    if config.plan.device:
        return config.plan.device
    if config.backend == "vllm":
        return config.vllm.accelerator_type
    return "cpu" if config.actors.num_gpus == 0 else None


def plan_gpus(config: CaptionConfig) -> int:
    if config.plan.gpus:
        return config.plan.gpus
    per_replica = config.vllm.tensor_parallel_size if config.backend == "vllm" else max(1, math.ceil(config.actors.num_gpus))
    return config.actors.max_actors * per_replica


# ------------------------------------------------------------------------------------------------
# Tokens


class TokenCounter:
    """The model's own tokenizer, chat template and image-token rule, loaded as the backends load them
    (processor first; tokenizer + image processor when the full processor cannot load here, e.g. a
    Qwen2.5-VL processor wants torchvision for its video half)."""

    def __init__(self, path: str, revision: str | None, images_kwargs: dict[str, Any]):
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        kw = {"revision": revision} if revision else {}
        self.images_kwargs = images_kwargs
        self.processor = None
        try:
            processor = AutoProcessor.from_pretrained(path, **kw)
            if hasattr(processor, "_get_num_multimodal_tokens") and hasattr(processor, "tokenizer"):
                self.processor = processor
        except Exception as exc:  # noqa: BLE001 - fall back to the parts
            log.info("[caption plan] full processor of %s not loadable here (%s: %s); using its tokenizer and "
                     "image processor", path, type(exc).__name__, str(exc).splitlines()[0][:200])
        if self.processor is not None:
            self.tokenizer = self.processor.tokenizer
            self.template_owner = self.processor
            self.image_processor = self.processor.image_processor
            image_token = getattr(self.processor, "image_token", None)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
            self.template_owner = self.tokenizer
            self.image_processor = AutoImageProcessor.from_pretrained(path, **kw)
            image_token = getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token) if image_token else None
        size = getattr(self.image_processor, "size", None)
        if "max_pixels" in images_kwargs and getattr(size, "longest_edge", None):
            # Qwen2-VL's processors now take the pixel budget as size={longest_edge, shortest_edge}
            # (max_pixels/min_pixels are deprecated spellings of the same numbers).
            self.images_kwargs = {"size": {"longest_edge": images_kwargs["max_pixels"],
                                           "shortest_edge": images_kwargs.get("min_pixels", size.shortest_edge)}}

    def vision_tokens(self, sizes: list[tuple[int, int]]) -> list[int]:
        """Image tokens per image of (height, width), by the model's processor."""
        if not sizes:
            return []
        if self.processor is not None:
            data = self.processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in sizes],
                                                             images_kwargs=self.images_kwargs)
            return [int(n) for n in data.num_image_tokens]
        merge = getattr(self.image_processor, "merge_size", 1) or 1
        return [int(self.image_processor.get_number_of_image_patches(h, w, dict(self.images_kwargs))) // merge ** 2
                for h, w in sizes]

    def text_tokens(self, texts: list[str | None]) -> list[int]:
        """Prompt tokens per pair, not counting the image placeholder (its size is vision_tokens)."""
        prompts = [self.template_owner.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": render_prompt(t)}]}],
            add_generation_prompt=True, tokenize=False) for t in texts]
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return [len(ids) - (ids.count(self.image_token_id) if self.image_token_id is not None else 0) for ids in encoded]


def token_counter(config: CaptionConfig) -> TokenCounter:
    from umaf.caption.backends import hub_revision, resolve_model_path

    images_kwargs: dict[str, Any] = {}
    if config.backend == "vllm":  # vLLM passes mm_processor_kwargs to the model's processor
        images_kwargs["max_pixels"] = config.vllm.max_pixels
        if config.vllm.min_pixels is not None:
            images_kwargs["min_pixels"] = config.vllm.min_pixels
    path = resolve_model_path(config)
    try:
        return TokenCounter(path, hub_revision(config), images_kwargs)
    except Exception as exc:  # noqa: BLE001 - one line saying what to do
        raise UserError(f"cannot load the tokenizer/processor of model {config.model!r} to count tokens "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): the plan needs the model's "
                        "tokenizer files (the hub, its cache, or a local folder), not its weights") from exc


# ------------------------------------------------------------------------------------------------
# The plan


def _summary(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"total": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    return {"total": int(values.sum()), "mean": round(float(values.mean()), 1),
            "p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)), "max": int(values.max())}


def todo_ids(config: CaptionConfig, manifest_uri: str, fingerprint: str):
    """(selected ids, ids to caption), as the run counts them."""
    from umaf.caption.pipeline import pending_ids, select_ids

    selected, _ = select_ids(manifest_uri, config)
    todo, _ = pending_ids(selected, config.out, retry_failed=config.retry_failed, fingerprint=fingerprint,
                          **config.storage_kw)
    return selected, todo


def make_plan(config: CaptionConfig, *, pilot_ids: list[str] | None = None) -> dict[str, Any]:
    """The pre-flight plan as a dict (:func:`format_plan` prints it)."""
    from umaf.caption.backends import model_label
    from umaf.caption.pipeline import ensure_manifest, pin_fingerprint

    kw = config.storage_kw
    manifest_uri = ensure_manifest(config)
    config, fingerprint = pin_fingerprint(config)
    counter = token_counter(config)  # first: a tokenizer that cannot load is said before any image is read
    selected, todo = todo_ids(config, manifest_uri, fingerprint.id)
    fs, path = storage.resolve(manifest_uri, **kw)
    manifest = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id", "text", "image"])
    rows = manifest.filter(pc.is_in(manifest["id"], value_set=todo))
    # One row per id, as the run captions it.
    _, first = np.unique(np.asarray(rows["id"].to_pylist(), dtype=object), return_index=True)
    rows = rows.take(np.sort(first))
    images, texts = rows["image"].to_pylist(), rows["text"].to_pylist()

    i, p = config.images, config.plan

    def header(image: str | None):
        uri = resolve_image_uri(image, manifest_uri) if image else None
        return read_image_header(uri, max_bytes=i.max_bytes, max_pixels=i.max_pixels, header_bytes=p.header_bytes,
                                 storage_kw=kw)

    with ThreadPoolExecutor(max_workers=p.threads) as pool:
        headers = list(pool.map(header, images))
    ok = [k for k, h in enumerate(headers) if h.error is None]
    errors = Counter(reason_kind(h.error) for h in headers if h.error is not None)
    sizes = []
    for k in ok:
        _, (cw, ch) = target_geometry(headers[k].width, headers[k].height, max_side=i.max_side, max_area=i.max_area,
                                      multiple_of=i.multiple_of, min_side=i.min_side,
                                      max_aspect_ratio=i.max_aspect_ratio)
        sizes.append((ch, cw))
    vision = np.asarray(counter.vision_tokens(sizes), dtype=np.int64)
    text = np.asarray(counter.text_tokens([texts[k] for k in ok]), dtype=np.int64)
    prompt = text + vision
    output = output_estimate(config, fingerprint.id, pilot_ids, len(ok))
    model, device, gpus = model_label(config), plan_device(config), plan_gpus(config)
    rate = throughput_for(config, model, device)
    plan: dict[str, Any] = {
        "manifest": manifest_uri, "out": config.out, "backend": config.backend, "model": model,
        "fingerprint": fingerprint.id,
        "pairs": {"selected": len(selected), "already_captioned": len(selected) - len(todo), "to_caption": len(todo),
                  "error_rows": len(todo) - len(ok), "to_generate": len(ok)},
        "error_reasons": [{"reason": r, "rows": n} for r, n in errors.most_common()],
        "vision_tokens": _summary(vision), "prompt_tokens": _summary(prompt), "output_tokens": output,
        "device": device, "gpus": gpus,
    }
    if rate is not None:
        gpu_seconds = prompt.sum() / rate.prefill_tokens_per_s + output["total"] / rate.decode_tokens_per_s
        gpu_hours = float(gpu_seconds) / 3600
        plan["throughput"] = {"prefill_tokens_per_s": rate.prefill_tokens_per_s,
                              "decode_tokens_per_s": rate.decode_tokens_per_s, "source": rate.source}
        plan["gpu_hours"] = round(gpu_hours, 3)
        plan["wall_hours"] = round(gpu_hours / gpus, 3)
        if p.gpu_hour_price is not None:
            plan["cost"] = round(gpu_hours * p.gpu_hour_price, 2)
            plan["gpu_hour_price"] = p.gpu_hour_price
    return plan


def output_estimate(config: CaptionConfig, fingerprint: str, pilot_ids: list[str] | None, pairs: int) -> dict[str, Any]:
    """Output tokens for ``pairs``: the cap, or the pilot's measured mean."""
    cap = config.sampling.max_tokens
    if pilot_ids:
        from umaf.caption.store import read_captions

        rows = read_captions(config.out, columns=["id", "output_tokens", "reused_from"], fingerprint=fingerprint,
                             **config.storage_kw)
        rows = rows.filter(pc.and_(pc.is_in(rows["id"], value_set=pa.array(pilot_ids, pa.string())),
                                   pc.is_valid(rows["output_tokens"])))
        measured = np.asarray([t for t, r in zip(rows["output_tokens"].to_pylist(), rows["reused_from"].to_pylist())
                               if r is None], dtype=np.int64)
        if len(measured):
            s = _summary(measured)
            return {"source": f"pilot: {len(measured)} pairs captioned, mean {s['mean']}, p95 {s['p95']}, "
                              f"max {s['max']} (cap {cap})",
                    "per_pair": s["mean"], "total": int(round(s["mean"] * pairs))}
    return {"source": f"the cap, sampling.max_tokens={cap} per pair (an upper bound; --pilot N measures it)",
            "per_pair": cap, "total": cap * pairs}


def pilot_sample(todo, n: int, seed: int = 0) -> list[str]:
    """N ids to pilot, drawn at random (seeded) from those to caption: manifests are often sorted by label."""
    ids = todo.to_pylist()
    return sorted(random.Random(seed).sample(ids, min(n, len(ids))))


def run_pilot(config: CaptionConfig) -> list[str]:
    """Caption ``plan.pilot`` pairs for real (into ``--out``: they count as done) and return their ids."""
    from umaf.caption.pipeline import ensure_manifest, pin_fingerprint, run_caption

    manifest_uri = ensure_manifest(config)
    pinned, fingerprint = pin_fingerprint(config)
    _, todo = todo_ids(pinned, manifest_uri, fingerprint.id)
    ids = pilot_sample(todo, config.plan.pilot or 0)
    if ids:
        run_caption(config, ids=pa.array(ids, pa.string()))
    return ids


def format_plan(plan: dict[str, Any]) -> str:
    pairs, v, pr, out = plan["pairs"], plan["vision_tokens"], plan["prompt_tokens"], plan["output_tokens"]
    lines = [
        f"caption plan: {plan['manifest']} → {plan['out']} ({plan['backend']}, {plan['model']}, fingerprint "
        f"{plan['fingerprint']})",
        f"  pairs: {pairs['selected']} selected, {pairs['already_captioned']} already captioned with this fingerprint, "
        f"{pairs['to_caption']} to caption: {pairs['to_generate']} to generate, {pairs['error_rows']} error rows",
    ]
    lines += [f"    {e['rows']} × {e['reason']}" for e in plan["error_reasons"][:10]]
    lines += [
        f"  vision tokens per image: mean {v['mean']}, p95 {v['p95']}, max {v['max']} (total {v['total']:,})",
        f"  prompt tokens per pair (text + image): mean {pr['mean']}, p95 {pr['p95']}, max {pr['max']} "
        f"(total {pr['total']:,})",
        f"  output tokens: {out['total']:,} ({out['source']})",
    ]
    if "gpu_hours" in plan:
        t = plan["throughput"]
        lines += [
            f"  throughput per {plan['device']} GPU: prefill {t['prefill_tokens_per_s']:,.0f} tok/s, decode "
            f"{t['decode_tokens_per_s']:,.0f} tok/s ({t['source']})",
            f"  GPU-hours: {plan['gpu_hours']:.2f}; wall time on {plan['gpus']} GPU(s): {plan['wall_hours']:.2f} h "
            "(plus engine start-up)"
            + (f"; cost at {plan['gpu_hour_price']}/GPU-hour: {plan['cost']:.2f}" if "cost" in plan else
               "; cost: give plan.gpu_hour_price=<price of one GPU-hour>"),
        ]
    else:
        lines.append(f"  GPU-hours: no throughput known for {plan['model']} on {plan['device']}: give "
                     "plan.prefill_tokens_per_s= and plan.decode_tokens_per_s= (per GPU), or plan.device= one of "
                     f"{', '.join(GPUS)} for a Qwen2.5-VL-7B estimate")
    return "\n".join(lines)
