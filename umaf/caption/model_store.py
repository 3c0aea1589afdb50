"""Copy a model's files to object storage once, so caption nodes load it from there (no hub, no Ray).

A vLLM replica that loads ``Qwen/Qwen2.5-VL-7B-Instruct`` from the hub downloads ~16 GB on every node
start (each spot replacement, each scale-up) and needs the hub to be up. ``ray.data.llm`` also takes
``model_source="s3://bucket/models/NAME"``: each of its actors downloads the files from the bucket
(``download_model_files``: boto3, files cached per node under the HF cache as
``models--s3:----bucket--models--NAME``, keyed by the folder's ``hash`` file). This module makes
that folder: the model's files as the hub serves them, plus ``hash`` = the hub commit, so two
uploads of the same revision share a cache entry and a new revision gets a new one.

Rerunning skips files already there with the same size, so an interrupted upload resumes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from umaf import storage
from umaf.config import ModelRef, PathOrUri, StorageConfig, StrictModel

log = logging.getLogger("umaf.upload_model")

# What vLLM and transformers read: weights as safetensors (not the .bin/.pt/.h5 duplicates some
# repositories also carry), configs, tokenizer and processor files, chat templates.
DEFAULT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


class UploadModelConfig(StrictModel):
    """``jobs/upload_model.py``: copy a model (hub id, local folder or 'tiny') to ``out`` once."""

    model: ModelRef = Field("tiny", description="hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct), local model folder, "
                                                "or 'tiny' (the test VLM, built locally)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit); None: the default branch")
    out: PathOrUri = Field("./outputs/models/tiny", description="where the model folder goes (s3://bucket/models/NAME)")
    model_cache_dir: PathOrUri = Field("./outputs/cache/models", description="where the 'tiny' model is built")
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATTERNS),
                                description="file name patterns to copy (the rest of a hub repo is skipped)")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @property
    def storage_kw(self) -> dict[str, Any]:
        return {"endpoint_url": self.storage.endpoint_url, "region": self.storage.region}


def local_model(config: UploadModelConfig) -> tuple[Path, str]:
    """The model's local folder and its revision id (hub commit, or a hash of a local folder's config)."""
    if config.model == "tiny":
        from umaf.caption.tiny_vlm import ensure_tiny_vlm

        folder = ensure_tiny_vlm(config.model_cache_dir)
    elif Path(config.model).is_dir():
        folder = Path(config.model)
    else:
        # The one place that talks to the hub: run this where the hub is reachable (your laptop or
        # the head node), once per model revision.
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(config.model, revision=config.revision, allow_patterns=config.patterns))
        if folder.parent.name == "snapshots":  # the HF cache layout: snapshots/<commit>
            return folder, folder.name
    digest = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:40]
    return folder, digest


def files_to_copy(folder: Path, patterns: list[str]) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


def upload_model(config: UploadModelConfig) -> dict[str, Any]:
    """Copy the model's files to ``config.out`` (skipping those already there) and write ``hash``."""
    import pyarrow.fs as pafs

    folder, revision = local_model(config)
    files = files_to_copy(folder, config.patterns)
    if not any(f.name == "config.json" for f in files):
        from umaf.errors import UserError

        raise UserError(f"model {config.model} ({folder}) has no config.json: not a transformers/vLLM model folder")
    fs, root = storage.resolve(config.out, **config.storage_kw)
    fs.create_dir(root, recursive=True)
    copied = skipped = copied_bytes = 0
    for rel in files:
        src = folder / rel
        dest = f"{root.rstrip('/')}/{rel.as_posix()}" if storage.is_s3(config.out) else os.path.join(root, rel)
        size = src.stat().st_size
        info = fs.get_file_info(dest)
        if info.type == pafs.FileType.File and info.size == size:
            skipped += 1
            continue
        log.info("[upload_model] %s (%.1f MB) → %s", rel, size / 1e6, storage.join(config.out, rel.as_posix()))
        pafs.copy_files(str(src.resolve()), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        copied += 1
        copied_bytes += size
    # ray's download_model_files names the node's cache folder after this (snapshots/<hash>).
    storage.write_text_atomic(storage.join(config.out, "hash"), revision + "\n", **config.storage_kw)
    return {"model": config.model, "revision": revision, "out": config.out, "files": len(files), "copied": copied,
            "skipped": skipped, "copied_bytes": copied_bytes}
