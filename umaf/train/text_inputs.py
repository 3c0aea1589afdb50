"""Tokenisation of ``[T; T_vlm]`` (UMAF Eq. 1) into fixed-length arrays, once per dataset (Ray Data).

Truncation rule: the original text ``T`` is kept whole; ``T_vlm`` gets what is left of
``max_length``. Only when ``T`` alone does not fit is ``T`` cut (and ``T_vlm`` dropped).

``T_vlm`` has three fields (``ocr``, ``visual_scene``, ``textimage_relation``, UMAF Appendix A). When
it does not fit, cutting the joined text from its end would lose ``textimage_relation`` first, the
field that aligns image and text. Instead each field gets a share of the ``T_vlm`` budget
(``UmafConfig.caption_field_shares``), and a field that needs less than its share leaves the rest to
the others (max-min fair, "water-filling"), so no field is dropped while another keeps more than its
share. Each field is cut from its own end. :class:`TruncationStats` counts what was cut, per field;
the train job writes the counts into ``data_report.json``.

The fields are tokenised separately as ``"OCR: ..."``, ``" Scene: ..."``, ``" Relation: ..."``
(``umaf.caption.fields.caption_text`` of one field, with the joining space) and concatenated: when
nothing is cut this gives exactly the tokens of the joined ``T_vlm``. The encoder's own special
tokens (``[CLS] T [SEP] T_vlm [SEP]`` for BERT, ``<s> T </s></s> T_vlm </s>`` for RoBERTa) come
from the tokenizer's post-processor, so any Hugging Face fast tokenizer works.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from umaf.caption.fields import CAPTION_FIELDS, caption_text

DEFAULT_FIELD_SHARES = {name: 1.0 for name in CAPTION_FIELDS}
TEXT = "text"
# Where each position of the unified sequence comes from (the ``token_source`` column; Figure 3 is
# split by it): the encoder's special tokens, T, each T_vlm field (or a joined T_vlm cut as one
# "caption"), and image tokens (appended by the model for Table 3's image rows). -1 marks padding.
TOKEN_SOURCES = ("special", TEXT, *CAPTION_FIELDS, "caption", "image")
SOURCE_CODE = {name: code for code, name in enumerate(TOKEN_SOURCES)}

Caption = str | Sequence[str | None] | Mapping[str, str | None] | None


def allocate(needs: Sequence[int], shares: Sequence[float], budget: int) -> list[int]:
    """Token counts per field: every field gets what it needs if all fit; otherwise a field that
    needs less than its share of what is left keeps all of it, and the rest is split by share among
    the fields that need more (repeated until no field is below its share). Every field that needs
    tokens gets at least one while the budget lasts, so no field vanishes merely for a small share."""
    if sum(needs) <= budget:
        return list(needs)
    keep = [0] * len(needs)
    active = [i for i, n in enumerate(needs) if n > 0]
    left = max(0, budget)
    while active:
        total_share = sum(shares[i] for i in active)
        fair = {i: left * shares[i] / total_share for i in active}
        satisfied = [i for i in active if needs[i] <= fair[i]]
        if not satisfied:
            break
        for i in satisfied:
            keep[i] = needs[i]
            left -= needs[i]
        active = [i for i in active if i not in satisfied]
    if active:
        total_share = sum(shares[i] for i in active)
        base = 1 if left >= len(active) else 0  # one token each first: no field vanishes for a small share
        rest = left - base * len(active)
        for i in active:
            keep[i] = min(needs[i], base + int(rest * shares[i] / total_share))
        spare = left - sum(keep[i] for i in active)
        # Tokens lost to rounding: one each, to fields with nothing first, then by share; among equals
        # the LAST field first, so a tie never drops textimage_relation (the field that aligns image
        # and text, CAPTION_FIELDS' last) before ocr or visual_scene.
        for i in sorted(active, key=lambda j: (keep[j] > 0, -shares[j], -j)):
            if spare <= 0:
                break
            if keep[i] < needs[i]:
                keep[i] += 1
                spare -= 1
    return keep


@dataclass
class TruncationStats:
    """What the truncation rule cut, per part (``text`` = T, then each T_vlm field)."""

    pairs: int = 0
    pairs_truncated: int = 0  # pairs with any part cut
    parts: dict[str, dict[str, int]] = field(default_factory=dict)

    def _part(self, name: str) -> dict[str, int]:
        return self.parts.setdefault(name, {"present": 0, "truncated": 0, "dropped": 0, "tokens": 0,
                                            "tokens_cut": 0, "max_tokens_cut": 0})

    def add(self, name: str, need: int, kept: int) -> bool:
        if need <= 0:
            return False
        part = self._part(name)
        part["present"] += 1
        part["tokens"] += need
        cut = need - kept
        if cut > 0:
            part["truncated"] += 1
            part["dropped"] += int(kept == 0)
            part["tokens_cut"] += cut
            part["max_tokens_cut"] = max(part["max_tokens_cut"], cut)
        return cut > 0

    def merge(self, other: TruncationStats) -> None:
        self.pairs += other.pairs
        self.pairs_truncated += other.pairs_truncated
        for name, counts in other.parts.items():
            part = self._part(name)
            for key, value in counts.items():
                part[key] = max(part[key], value) if key == "max_tokens_cut" else part[key] + value

    def report(self) -> dict[str, Any]:
        """For ``data_report.json``: per part, pairs where it is present / cut / cut to nothing, and
        tokens cut (total, mean over the pairs where it was cut, max, and the share of its tokens)."""
        parts = {}
        for name, c in self.parts.items():
            parts[name] = {
                "pairs_present": c["present"], "pairs_truncated": c["truncated"], "pairs_dropped": c["dropped"],
                "tokens_cut": c["tokens_cut"],
                "mean_tokens_cut_when_truncated": round(c["tokens_cut"] / c["truncated"], 2) if c["truncated"] else 0.0,
                "max_tokens_cut": c["max_tokens_cut"],
                "fraction_of_tokens_cut": round(c["tokens_cut"] / c["tokens"], 4) if c["tokens"] else 0.0,
            }
        return {"pairs": self.pairs, "pairs_truncated": self.pairs_truncated, "parts": parts}


def _field_values(caption: Caption) -> list[str | None] | None:
    if caption is None:
        return None
    if isinstance(caption, str):
        return [caption] if caption else None  # one already joined T_vlm: cut from its end
    if isinstance(caption, Mapping):
        values = [caption.get(name) for name in CAPTION_FIELDS]
    else:
        values = list(caption)
        if len(values) != len(CAPTION_FIELDS):
            raise ValueError(f"a caption must give the {len(CAPTION_FIELDS)} fields {CAPTION_FIELDS}, got {len(values)} values")
    return values if any(v and str(v).strip() for v in values) else None


class PairEncoder:
    """Encodes (text, caption) pairs to ``input_ids``, ``attention_mask``, ``token_type_ids``.

    A caption is None (T alone), the three field values (a sequence in ``CAPTION_FIELDS`` order or a
    mapping; each field gets its share of the budget), or one joined ``T_vlm`` string (cut from its
    end, as a single field).
    """

    def __init__(self, tokenizer, max_length: int, field_shares: Mapping[str, float] | None = None):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; UMAF needs one")
        # A private copy without the tokenizer file's own padding/truncation: we apply the rule above.
        self.backend = copy.deepcopy(backend)
        self.backend.no_padding()
        self.backend.no_truncation()
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.specials_single = tokenizer.num_special_tokens_to_add(pair=False)
        self.specials_pair = tokenizer.num_special_tokens_to_add(pair=True)
        if max_length <= self.specials_pair:
            raise ValueError(f"max_length={max_length} leaves no room for text after {self.specials_pair} special tokens")
        shares = {**DEFAULT_FIELD_SHARES, **(field_shares or {})}
        unknown = set(shares) - set(CAPTION_FIELDS)
        if unknown or any(v <= 0 for v in shares.values()):
            raise ValueError(f"field shares must be positive numbers for {CAPTION_FIELDS}, got {dict(shares)}")
        self.shares = [float(shares[name]) for name in CAPTION_FIELDS]

    def _segments(self, values: list[str | None]) -> list[tuple[str, str]]:
        """(part name, text) of each non-empty field, labelled and joined as ``caption_text`` joins them."""
        if len(values) == 1:
            return [("caption", values[0])]
        segments = []
        for name, value in zip(CAPTION_FIELDS, values):
            piece = caption_text(**{n: (value if n == name else None) for n in CAPTION_FIELDS})
            if piece:
                segments.append((name, (" " if segments else "") + piece))
        return segments

    def encode(self, texts: Sequence[str], captions: Sequence[Caption], stats: TruncationStats | None = None) -> dict[str, np.ndarray]:
        from tokenizers import Encoding

        n, length = len(texts), self.max_length
        ids = np.full((n, length), self.pad_id, dtype=np.int32)
        mask = np.zeros((n, length), dtype=np.int8)
        types = np.zeros((n, length), dtype=np.int8)
        sources = np.full((n, length), -1, dtype=np.int8)
        text_enc = self.backend.encode_batch([t or "" for t in texts], add_special_tokens=False)
        row_segments = {}
        for i, caption in enumerate(captions):
            values = _field_values(caption)
            if values is not None:
                row_segments[i] = self._segments(values)
        flat = [(i, name, text) for i, segs in row_segments.items() for name, text in segs]
        flat_enc = self.backend.encode_batch([text for _, _, text in flat], add_special_tokens=False) if flat else []
        seg_enc: dict[int, list[tuple[str, Any]]] = {}
        for (i, name, _), enc in zip(flat, flat_enc):
            seg_enc.setdefault(i, []).append((name, enc))
        for i, text in enumerate(text_enc):
            segments = seg_enc.get(i, [])
            needs = [len(enc.ids) for _, enc in segments]
            text_need = len(text.ids)
            budget = length - (self.specials_pair if segments else self.specials_single)
            if segments and text_need >= budget:
                budget = length - self.specials_single  # T fills everything: T_vlm dropped, T alone
                keeps = [0] * len(segments)
            else:
                shares = [self.shares[CAPTION_FIELDS.index(name)] if name in CAPTION_FIELDS else 1.0 for name, _ in segments]
                keeps = allocate(needs, shares, budget - text_need)
            if text_need > budget:
                text.truncate(budget)
            if stats is not None:
                cut = stats.add(TEXT, text_need, len(text.ids))
                for (name, _), need, keep in zip(segments, needs, keeps):
                    cut = stats.add(name, need, keep) or cut
                stats.pairs += 1
                stats.pairs_truncated += int(cut)
            kept, kept_sources = [], []
            for (name, enc), keep in zip(segments, keeps):
                if keep > 0:
                    enc.truncate(keep)
                    kept.append(enc)
                    kept_sources += [SOURCE_CODE[name]] * len(enc.ids)
            caption_enc = Encoding.merge(kept, growing_offsets=True) if kept else None
            merged = self.backend.post_process(text, caption_enc, add_special_tokens=True)
            k = len(merged.ids)
            ids[i, :k] = merged.ids
            mask[i, :k] = 1
            types[i, :k] = merged.type_ids
            # Non-special tokens come in order: T's, then the fields' as merged (sequence_ids are not
            # set on encodings made without special tokens, so the special-token mask tells them apart).
            row = np.full(k, SOURCE_CODE["special"], dtype=np.int8)
            words = np.flatnonzero(np.asarray(merged.special_tokens_mask) == 0)
            row[words[: len(text.ids)]] = SOURCE_CODE[TEXT]
            row[words[len(text.ids):]] = kept_sources
            sources[i, :k] = row
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "token_source": sources}
