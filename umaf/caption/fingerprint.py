"""The fingerprint of a caption: a hash of everything that decides what the model writes for a pair.

A caption is a function of the pair (image bytes, text) and of the *request settings*. The spec
hashed here holds exactly those settings, so two runs with equal fingerprints would write the same
captions (greedy decoding) and a run never pays for a caption its fingerprint already has:

- ``model``: a hub id with its revision resolved to a commit (the engine is then pinned to that
  commit, so the fingerprint names the weights that ran), a local folder by the SHA-256 of its files
  (weights, config, tokenizer, chat template), an ``s3://`` folder by its objects' keys, sizes and
  ETags (no download);
- ``prompt_version`` (the template's hash) and ``output_schema`` (the JSON schema decoding is held
  to, with ``max_field_chars``);
- ``sampling``; with ``temperature == 0`` (greedy) ``top_p`` and ``seed`` change nothing and are
  left out;
- ``image``: the CPU stage's rule (``max_side``, ``max_area``, the grid ``multiple_of``, the padding
  rule ``min_side``/``max_aspect_ratio``/black bottom-right, JPEG quality);
- ``backend`` and what the engine does to the input: vLLM's ``max_pixels``/``min_pixels`` (its
  processor's resize) and dtype/quantization; the hf backend's dtype.

Not in it, because they decide only *whether* a pair gets a caption, or how fast: batch sizes, actor
counts, ``max_model_len``, ``images.max_bytes``/``max_pixels`` (too-large images become error rows),
memory settings.

The request key (:func:`request_key`) adds the pair: equal keys are identical requests, captioned
once (also across manifests: a re-prepared dataset, HFM and MMSD2.0 pairs whose text matches).

No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from umaf import storage
from umaf.caption.config import TINY_MODEL, CaptionConfig
from umaf.caption.fields import caption_json_schema
from umaf.caption.prompt import PROMPT_VERSION
from umaf.errors import UserError

FINGERPRINT_FORMAT = 1  # bump only if the spec's layout changes (every fingerprint changes with it)
PAD_RULE = "black, bottom/right"  # umaf.caption.images.load_image: padding never moves the content
# vLLM engine arguments that change the numbers the model computes (others change speed or memory).
VLLM_OUTPUT_KWARGS = ("dtype", "quantization", "kv_cache_dtype", "tokenizer", "tokenizer_revision",
                      "hf_overrides", "chat_template", "limit_mm_per_prompt")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Fingerprint:
    id: str  # 16 hex characters
    spec_json: str  # the canonical JSON that was hashed

    @property
    def spec(self) -> dict[str, Any]:
        return json.loads(self.spec_json)


def fingerprint_of(spec: dict[str, Any]) -> Fingerprint:
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return Fingerprint(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], text)


def request_key(fingerprint: str, image_sha256: str, text: str | None) -> str:
    """32 hex of the SHA-256 of (fingerprint, image bytes' hash, text): equal for identical requests."""
    payload = f"{fingerprint}\n{image_sha256}\n{text or ''}".encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:32]


def caption_fingerprint(config: CaptionConfig, *, model: dict[str, Any] | None = None) -> Fingerprint:
    """The fingerprint of the captions ``config`` makes (``model``: an already resolved identity)."""
    return fingerprint_of(caption_spec(config, model=model))


def caption_spec(config: CaptionConfig, *, model: dict[str, Any] | None = None) -> dict[str, Any]:
    s, i = config.sampling, config.images
    sampling: dict[str, Any] = {"temperature": s.temperature, "max_tokens": s.max_tokens,
                                "repetition_penalty": s.repetition_penalty}
    if s.temperature > 0:
        sampling.update(top_p=s.top_p, seed=s.seed)
    if config.backend == "vllm":
        v = config.vllm
        engine = {"max_pixels": v.max_pixels, "min_pixels": v.min_pixels,
                  **{k: v.engine_kwargs[k] for k in VLLM_OUTPUT_KWARGS if k in v.engine_kwargs}}
    else:
        engine = {"dtype": config.hf.dtype}
    schema = json.dumps(caption_json_schema(config.max_field_chars), sort_keys=True)
    return {
        "format": FINGERPRINT_FORMAT,
        "backend": config.backend,
        "model": model if model is not None else model_identity(config),
        "prompt_version": PROMPT_VERSION,
        "output_schema": hashlib.sha256(schema.encode("utf-8")).hexdigest()[:12],
        "sampling": sampling,
        "image": {"max_side": i.max_side, "max_area": i.max_area, "multiple_of": i.multiple_of,
                  "min_side": i.min_side, "max_aspect_ratio": i.max_aspect_ratio, "pad": PAD_RULE,
                  "jpeg_quality": i.jpeg_quality},
        "engine": engine,
    }


# ------------------------------------------------------------------------------------------------
# Which weights


def model_identity(config: CaptionConfig) -> dict[str, Any]:
    """What the model is, as precisely as can be said without loading it (see the module docstring)."""
    from umaf.caption.backends import model_label, resolve_model_path

    if config.model == TINY_MODEL:
        return {"local": model_label(config), "sha256": folder_sha256(resolve_model_path(config))}
    if storage.is_s3(config.model):
        return {"s3": config.model, "objects_sha256": s3_folder_digest(config.model, **config.storage_kw)}
    if Path(config.model).exists():
        return {"local": Path(config.model).name, "sha256": folder_sha256(config.model)}
    return {"hub": config.model, "revision": resolve_hub_revision(config.model, config.model_revision)}


def folder_sha256(folder: str | os.PathLike[str]) -> str:
    """SHA-256 over a local model folder's files (relative path + content), hidden files excluded."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _folder_sha256(str(root), key)


@lru_cache(maxsize=8)
def _folder_sha256(root: str, files: tuple) -> str:  # keyed on (path, size, mtime): hashed once per process
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(os.path.relpath(path, root).encode("utf-8") + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def s3_folder_digest(uri: str, **storage_kw) -> str:
    """SHA-256 of (key, size, ETag) of every object under an ``s3://`` model folder: changes when any
    file does, read from one listing."""
    import boto3

    bucket, _, prefix = uri.split("://", 1)[1].partition("/")
    prefix = prefix.rstrip("/") + "/"
    endpoint = storage_kw.get("endpoint_url") or storage._env_first(storage.ENDPOINT_ENV_VARS)
    client = boto3.client("s3", endpoint_url=endpoint, region_name=storage_kw.get("region"))
    digest, found = hashlib.sha256(), False
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in sorted(page.get("Contents", []), key=lambda o: o["Key"]):
            found = True
            digest.update(f"{obj['Key'][len(prefix):]}\0{obj['Size']}\0{obj['ETag']}\n".encode("utf-8"))
    if not found:
        raise UserError(f"model {uri} holds no files: upload the model folder there, or fix model=")
    return digest.hexdigest()


def resolve_hub_revision(repo: str, revision: str | None) -> str:
    """The commit a hub model id (at ``revision``: a branch, tag or commit; default ``main``) is at.

    A commit is taken as given. Otherwise the hub is asked (unless ``HF_HUB_OFFLINE``), then the local
    hub cache's ref is read; the caption job then pins the engine to that commit.
    """
    if revision and _COMMIT.fullmatch(revision):
        return revision
    ref = revision or "main"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    online_error = None
    if not offline:
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(repo, revision=ref).sha
            if sha:
                return sha
        except Exception as exc:  # noqa: BLE001 - no network, no such repo, gated: try the cache
            online_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    from huggingface_hub import constants

    cached = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / ref
    if cached.is_file():
        return cached.read_text().strip()
    raise UserError(
        f"cannot tell which commit of {repo!r} (revision {ref!r}) would run: "
        + (f"the hub answered {online_error}; " if online_error else "HF_HUB_OFFLINE is set; ")
        + "it is not in the local hub cache either. Pin it with model_revision=<40-hex commit> (the "
        "caption fingerprint names the exact weights), or make the hub reachable")
