"""The UMAF multimodal reasoning prompt (paper Section 3.1, Appendix A / Figure 4), versioned by content.

The template text is the paper's, word for word, with its one placeholder ``{{ content | trim }}``
(Jinja syntax, as printed in Figure 4) filled with the pair's text. ``PROMPT_VERSION`` is a short
hash of the template, stored with every caption: change one character of the prompt and every new
caption says so, and a training run can tell captions made with different prompts apart.

No Ray here (rule of the house): this module is imported by the backends and by tests alike.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import jinja2
import jinja2.sandbox

# Appendix A, "Multimodal Reasoning Prompt" (Figure 4). Line breaks added between the sections
# for the model's benefit; the words are the paper's.
PROMPT_TEMPLATE = """\
You are an expert multimodal reasoning model. You are given an image and a corresponding text. \
Your task is to jointly analyze the visual and textual information to infer emotional expression, \
implicit intention, potential irony or sarcasm, and the deeper meaning conveyed by their interaction.

Input Text: {{ content | trim }}

Reasoning Guidelines:
1. OCR Understanding. Identify and interpret meaningful textual content appearing in the image, \
focusing on its emotional and semantic implications.
2. Visual Scene Analysis. Examine visual cues such as emotional tone, atmosphere, attitude, social \
implications, and symbolic elements, taking into account exaggeration, contrast, metaphor, and \
contextual signals.
3. Cross-modal Integration. Jointly reason over the external text, OCR text, and visual content to \
determine whether they are consistent, complementary, conflicting, or intentionally ironic.
4. High-level Reasoning. Apply relevant background knowledge and commonsense reasoning to infer \
deeper communicative intent beyond surface-level interpretation.

Output Specification. The model should output three fields: ocr, describing the OCR content with \
emotional and semantic interpretation; visual_scene, examining visual cues such as emotional tone, \
atmosphere, attitude, social implications, symbolic elements, exaggeration, contrast, metaphor, and \
contextual signals; and textimage_relation, explaining the relationship between the textual and \
visual content."""


def prompt_version(template: str = PROMPT_TEMPLATE) -> str:
    """12 hex characters of the SHA-256 of the template text (stable across Python versions)."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]


PROMPT_VERSION = prompt_version()


@lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    # Sandboxed, autoescape off: the pair's text is data, never markup, and must reach the model verbatim.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(autoescape=False, undefined=jinja2.StrictUndefined)
    return env.from_string(template)


def render_prompt(text: str | None, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt for one pair: the template with ``content`` = the pair's text (trimmed by the template)."""
    return _compiled(template).render(content=text or "")
