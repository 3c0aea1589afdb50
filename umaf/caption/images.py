"""Load, check and downscale one image for captioning; a bad image becomes a reason, never an exception.

This is the CPU stage of the pipeline: VLM actors get small, already-decoded-and-re-encoded JPEGs,
so GPUs only generate. ``image_sha256`` is the hash of the file's bytes as stored, so a caption can be
traced to the exact image it describes (and a changed image detected).

The rule for images a model's processor would reject or waste work on (:func:`target_geometry`):

- too big to decode safely: more than ``max_bytes`` in the file or ``max_pixels`` in the header →
  an ``error`` row (decompression bombs), never decoded;
- large: downscaled (never upscaled) so the longest side is at most ``max_side`` and the area at
  most ``max_area`` (the model's pixel budget, e.g. Qwen2.5-VL's ``max_pixels``);
- extreme aspect ratio or tiny: padded (black, bottom/right) so the short side is at least
  ``min_side`` and long/short at most ``max_aspect_ratio``. Qwen2-VL's ``smart_resize`` raises for a
  ratio above 200 (a 1344x5 banner would fail inside the engine); padding keeps every pixel;
- ``multiple_of`` > 1 (28 for Qwen2-VL/2.5-VL): the canvas is padded up to the model's grid, with
  the area within ``max_area``, so the model's processor (``smart_resize``) keeps the size as it is.

So the pixels are resampled at most once, here, and only to shrink (a JPEG decoded at reduced scale
first); images already within the budget are only padded by a few pixels, never resampled; then
one JPEG encode.
"""

from __future__ import annotations

import hashlib
import io
import math
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


def too_many_bytes(size: int | None, max_bytes: int, uri: str) -> str | None:
    """The reason a file of ``size`` bytes is not decoded (None: it may be)."""
    if size is not None and size > max_bytes:
        return f"image too large: {size} bytes > images.max_bytes={max_bytes} ({uri})"
    return None


def too_many_pixels(width: int, height: int, max_pixels: int, uri: str) -> str | None:
    """The reason an image of ``width`` x ``height`` (from its header) is not decoded (None: it may be)."""
    if width * height > max_pixels:
        return f"image too large: {width}x{height} pixels > images.max_pixels={max_pixels} ({uri})"
    return None


@dataclass(frozen=True)
class ImageHeader:
    width: int | None
    height: int | None
    error: str | None  # the error row the CPU stage would write, as far as the header shows


def read_image_header(uri: str | None, *, max_bytes: int, max_pixels: int, header_bytes: int = 262_144,
                      storage_kw: dict | None = None) -> ImageHeader:
    """The image's size from its first ``header_bytes`` (the whole file only when the header lies
    beyond), with the checks :func:`load_image` makes before decoding: missing, too many bytes, too
    many pixels, not an image. A body corrupt after a valid header is found only by decoding (the run)."""
    if not uri:
        return ImageHeader(None, None, "no image path in the manifest row")
    try:
        fs, path = storage.resolve(uri, **(storage_kw or {}))
        info = fs.get_file_info(path)
        if info.type.name == "NotFound":
            return ImageHeader(None, None, f"image not found: {uri}")
        if reason := too_many_bytes(info.size, max_bytes, uri):
            return ImageHeader(None, None, reason)
        with fs.open_input_file(path) as fh:
            head = fh.read(header_bytes)
            try:
                size = Image.open(io.BytesIO(head)).size
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                if len(head) < header_bytes:
                    raise
                fh.seek(0)
                size = Image.open(io.BytesIO(fh.read())).size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, FileNotFoundError):
            return ImageHeader(None, None, f"image not found: {uri}")
        return ImageHeader(None, None, f"corrupt or unreadable image {uri}: {type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - network, permissions, bad URI
        return ImageHeader(None, None, f"cannot read image {uri}: {type(exc).__name__}: {exc}")
    width, height = size
    return ImageHeader(width, height, too_many_pixels(width, height, max_pixels, uri))


def _ceil_to(value: int, factor: int) -> int:
    return -(-value // factor) * factor


def target_geometry(
    width: int, height: int, *, max_side: int, max_area: int | None = None, multiple_of: int = 1,
    min_side: int = 1, max_aspect_ratio: float = 200.0,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((content_w, content_h), (canvas_w, canvas_h))`` for an image of ``width`` x ``height``.

    The pixels are resized to the content size (only when that is smaller: never upscaled) and
    pasted at the top-left of a black canvas (the same size when no padding is needed). The canvas
    is the content padded up to ``min_side``, to ``max_aspect_ratio`` and to the next multiple of
    ``multiple_of``; if that padding pushes it over ``max_area`` the content shrinks a little more.
    """
    scale = min(1.0, max_side / max(width, height))
    if max_area:
        scale = min(scale, math.sqrt(max_area / (width * height)))
    for _ in range(16):
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        cw, ch = max(w, min_side), max(h, min_side)
        if cw >= ch:
            ch = max(ch, math.ceil(cw / max_aspect_ratio))
        else:
            cw = max(cw, math.ceil(ch / max_aspect_ratio))
        cw, ch = _ceil_to(cw, multiple_of), _ceil_to(ch, multiple_of)
        if not max_area or cw * ch <= max_area:
            break
        scale *= math.sqrt(max_area / (cw * ch)) * 0.995
    return (w, h), (cw, ch)


def load_image(
    uri: str | None,
    *,
    max_side: int,
    max_bytes: int,
    max_pixels: int,
    jpeg_quality: int = 90,
    storage_kw: dict | None = None,
    max_area: int | None = None,
    multiple_of: int = 1,
    min_side: int = 1,
    max_aspect_ratio: float = 200.0,
) -> LoadedImage:
    if not uri:
        return LoadedImage(None, None, "no image path in the manifest row")
    try:
        fs, path = storage.resolve(uri, **(storage_kw or {}))
        info = fs.get_file_info(path)
        if info.type.name == "NotFound":
            return LoadedImage(None, None, f"image not found: {uri}")
        if reason := too_many_bytes(info.size, max_bytes, uri):
            return LoadedImage(None, None, reason)
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
            if reason := too_many_pixels(width, height, max_pixels, uri):
                return LoadedImage(None, sha, reason)
            content, canvas = target_geometry(width, height, max_side=max_side, max_area=max_area,
                                              multiple_of=multiple_of, min_side=min_side,
                                              max_aspect_ratio=max_aspect_ratio)
            img.draft("RGB", content)  # JPEG: decode at a reduced scale (still >= the target size)
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        return LoadedImage(None, sha, f"corrupt or unreadable image {uri}: {type(exc).__name__}: {exc}")
    if img.size != content:
        img = img.resize(content, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if content != canvas:
        padded = Image.new("RGB", canvas)
        padded.paste(img, (0, 0))
        img = padded
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=jpeg_quality)
    return LoadedImage(out.getvalue(), sha, None)


def open_jpeg(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")
