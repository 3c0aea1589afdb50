"""The three structured fields the VLM must return (UMAF Appendix A) and the ``T_vlm`` text built from them.

One pydantic model is the single source of truth: the JSON schema enforced at generation time (vLLM
structured outputs, xgrammar in the ``hf`` backend) is derived from it, and parsing validates against it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

CAPTION_FIELDS = ("ocr", "visual_scene", "textimage_relation")


class CaptionFields(BaseModel):
    """The VLM's answer. Field descriptions are the prompt's Output Specification (Appendix A)."""

    model_config = ConfigDict(extra="forbid")

    ocr: str = Field(description="the OCR content with emotional and semantic interpretation")
    visual_scene: str = Field(
        description="visual cues: emotional tone, atmosphere, attitude, social implications, symbolic "
        "elements, exaggeration, contrast, metaphor and contextual signals"
    )
    textimage_relation: str = Field(description="the relationship between the textual and visual content")


def caption_json_schema(max_field_chars: int | None = None) -> dict:
    """JSON schema of :class:`CaptionFields`: an object with exactly the three required string fields.

    ``max_field_chars`` adds ``maxLength`` to each field. Grammar-constrained decoding (xgrammar,
    vLLM structured outputs) then bounds every answer, so a rambling model cannot run into
    ``max_new_tokens`` and leave truncated JSON; the parser checks the same bound.
    """
    schema = CaptionFields.model_json_schema()
    schema["additionalProperties"] = False
    if max_field_chars is not None:
        for name in CAPTION_FIELDS:
            schema["properties"][name]["maxLength"] = int(max_field_chars)
    return schema


# Labels put before each field in T_vlm. They give the text encoder the field boundaries in plain
# words (a RoBERTa tokenizer has no special tokens for them) and never change, so cached
# tokenizations and trained checkpoints stay valid: change them only with a new TVLM_FORMAT_VERSION.
TVLM_FORMAT_VERSION = 1
_TVLM_LABELS = {"ocr": "OCR:", "visual_scene": "Scene:", "textimage_relation": "Relation:"}


def caption_text(ocr: str | None, visual_scene: str | None, textimage_relation: str | None) -> str:
    """``T_vlm`` (UMAF Eq. 1): ``"OCR: <ocr> Scene: <visual_scene> Relation: <relation>"``.

    Whitespace inside each field is collapsed to single spaces; an empty or missing field is left
    out with its label, so a caption with no OCR text reads ``"Scene: ... Relation: ..."``.
    """
    values = {"ocr": ocr, "visual_scene": visual_scene, "textimage_relation": textimage_relation}
    parts = []
    for name in CAPTION_FIELDS:
        value = " ".join(str(values[name] or "").split())
        if value:
            parts.append(f"{_TVLM_LABELS[name]} {value}")
    return " ".join(parts)
