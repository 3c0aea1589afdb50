"""Tokenisation of ``[T; T_vlm]`` (UMAF Eq. 1) into fixed-length arrays, once per dataset (Ray Data).

Truncation rule: the original text ``T`` is kept whole and the caption ``T_vlm`` is cut first; only
when ``T`` alone does not fit is ``T`` cut (and ``T_vlm`` dropped). The encoder's own special tokens
(``[CLS] T [SEP] T_vlm [SEP]`` for BERT, ``<s> T </s></s> T_vlm </s>`` for RoBERTa) come from the
tokenizer's post-processor, so any Hugging Face fast tokenizer works.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np


class PairEncoder:
    """Encodes (text, caption-or-None) pairs to ``input_ids``, ``attention_mask``, ``token_type_ids``."""

    def __init__(self, tokenizer, max_length: int):
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

    def encode(self, texts: Sequence[str], captions: Sequence[str | None]) -> dict[str, np.ndarray]:
        n, length = len(texts), self.max_length
        ids = np.full((n, length), self.pad_id, dtype=np.int32)
        mask = np.zeros((n, length), dtype=np.int8)
        types = np.zeros((n, length), dtype=np.int8)
        text_enc = self.backend.encode_batch([t or "" for t in texts], add_special_tokens=False)
        with_caption = [i for i, c in enumerate(captions) if c]
        cap_enc = dict(
            zip(with_caption, self.backend.encode_batch([captions[i] for i in with_caption], add_special_tokens=False))
        )
        for i, text in enumerate(text_enc):
            caption = cap_enc.get(i)
            budget = length - (self.specials_pair if caption is not None else self.specials_single)
            if caption is not None and len(text.ids) >= budget:
                caption = None  # T fills everything: drop T_vlm, T keeps the single-sequence budget
                budget = length - self.specials_single
            if len(text.ids) > budget:
                text.truncate(budget)
            if caption is not None:
                caption.truncate(budget - len(text.ids))
            merged = self.backend.post_process(text, caption, add_special_tokens=True)
            k = len(merged.ids)
            ids[i, :k] = merged.ids
            mask[i, :k] = 1
            types[i, :k] = merged.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
