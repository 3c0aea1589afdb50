"""Turn a model's raw output into the three caption fields, or say exactly why not.

Never raises on model output: a caption that is not valid JSON for :class:`CaptionFields`
(malformed, cut off by ``max_new_tokens``, missing a field, a number where a string belongs...)
comes back as ``status="invalid"`` with the reason, and the caller keeps the raw text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import ValidationError

from umaf.caption.fields import CAPTION_FIELDS, CaptionFields
from umaf.caption.store import STATUS_INVALID, STATUS_OK


@dataclass(frozen=True)
class ParsedCaption:
    status: str  # "ok" | "invalid"
    ocr: str | None = None
    visual_scene: str | None = None
    textimage_relation: str | None = None
    error: str | None = None


def parse_caption(raw: str | None, *, truncated: bool = False, max_field_chars: int | None = None) -> ParsedCaption:
    """Parse one generation. ``truncated``: generation stopped at the token limit, not at EOS."""
    text = (raw or "").strip()
    if not text:
        return ParsedCaption(STATUS_INVALID, error="empty output" + (" (hit max_new_tokens)" if truncated else ""))
    try:
        # strict=False: models put raw newlines/tabs inside strings; that is harmless for us.
        obj = json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        why = "truncated JSON (hit max_new_tokens)" if truncated else "not valid JSON"
        return ParsedCaption(STATUS_INVALID, error=f"{why}: {exc.msg} at char {exc.pos}")
    if not isinstance(obj, dict):
        return ParsedCaption(STATUS_INVALID, error=f"expected a JSON object, got {type(obj).__name__}")
    try:
        fields = CaptionFields.model_validate(obj, strict=True)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
        return ParsedCaption(STATUS_INVALID, error=f"JSON does not match the caption schema: {problems}")
    values = {name: getattr(fields, name) for name in CAPTION_FIELDS}
    if max_field_chars is not None:
        long = [name for name, value in values.items() if len(value) > max_field_chars]
        if long:
            return ParsedCaption(
                STATUS_INVALID, error=f"field(s) {', '.join(long)} longer than max_field_chars={max_field_chars}"
            )
    return ParsedCaption(STATUS_OK, **values)
