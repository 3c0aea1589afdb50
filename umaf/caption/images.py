"""Load, check and downscale one image for captioning; a bad image becomes a reason, never an exception.

This is the CPU stage of the pipeline: VLM actors get small, already-decoded-and-re-encoded JPEGs,
so GPUs only generate. ``image_sha256`` is the hash of the file's bytes as stored, so a caption can be
traced to the exact image it describes (and a changed image detected).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from umaf import storage


@dataclass(frozen=True)
class LoadedImage:
    jpeg: bytes | None  # downscaled RGB JPEG, None when the image could not be used
    sha256: str | None  # of the original file bytes, None when the file could not be read
    error: str | None  # why the image could not be used


def resolve_image_uri(image: str, manifest_uri: str) -> str:
    """Absolute paths and URIs are used as given; a relative path is relative to the manifest's parent folder."""
    if "://" in image or os.path.isabs(image):
        return image
    parent = manifest_uri.rstrip("/").rsplit("/", 1)[0] if "/" in manifest_uri.rstrip("/") else "."
    return storage.join(parent, image)


def load_image(
    uri: str | None,
    *,
    max_side: int,
    max_bytes: int,
    max_pixels: int,
    jpeg_quality: int = 90,
    storage_kw: dict | None = None,
) -> LoadedImage:
    if not uri:
        return LoadedImage(None, None, "no image path in the manifest row")
    try:
        fs, path = storage.resolve(uri, **(storage_kw or {}))
        info = fs.get_file_info(path)
        if info.type.name == "NotFound":
            return LoadedImage(None, None, f"image not found: {uri}")
        if info.size is not None and info.size > max_bytes:
            return LoadedImage(None, None, f"image too large: {info.size} bytes > images.max_bytes={max_bytes} ({uri})")
        with fs.open_input_stream(path) as fh:
            data = fh.read()
    except Exception as exc:  # network, permissions, bad URI: this row fails, the job goes on
        return LoadedImage(None, None, f"cannot read image {uri}: {type(exc).__name__}: {exc}")
    sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # header only: checked before decoding the pixels
            if width * height > max_pixels:
                return LoadedImage(
                    None, sha, f"image too large: {width}x{height} pixels > images.max_pixels={max_pixels} ({uri})"
                )
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced scale directly
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        return LoadedImage(None, sha, f"corrupt or unreadable image {uri}: {type(exc).__name__}: {exc}")
    img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=jpeg_quality)
    return LoadedImage(out.getvalue(), sha, None)


def open_jpeg(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")
