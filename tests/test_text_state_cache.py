"""A frozen text encoder's token states from the feature cache (``umaf.train_encoder=false``): without Ray,
the cache actor's fp16 states, decoded by the method's collate, give the model the logits its frozen
encoder gives from the token ids; and the cache key follows what the encoder reads."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from umaf.config import load_config
from umaf.train.config import TrainConfig


def _config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, "train", overrides=[
        "umaf.train_encoder=false", "umaf.dropout=0.0", "umaf.max_length=40", *overrides])


def test_cached_text_states_are_the_frozen_encoders_own():
    from umaf.models.encoders import resolve_encoder
    from umaf.train.feature_cache import TextStateActor
    from umaf.train.umaf_method import UmafMethod, _captions_of, _pair_encoder

    cfg = _config()
    u = cfg.umaf
    assert u.caches_text_states and not _config("umaf.text_feature_cache=off").umaf.caches_text_states
    assert not _config("umaf.train_encoder=true").umaf.caches_text_states
    rows = {"id": ["a", "b", "c"], "label": [0, 2, 1], "text": ["a good day at the beach", "bad", "fine, I guess"],
            "caption_ocr": ["sale", None, "x"], "caption_visual_scene": ["a beach", None, "a dog on a sofa"],
            "caption_textimage_relation": ["matches", None, "ok"]}
    tokens = _pair_encoder(u.encoder, u.encoder_cache, u.max_length, tuple(sorted(u.caption_field_shares.items()))
                           ).encode(rows["text"], _captions_of(rows))
    batch = {"id": np.array(rows["id"], dtype=object), "label": np.array(rows["label"]), **tokens}
    cached = TextStateActor(resolve_encoder(u.encoder, u.encoder_cache), u.encoder_cache)(batch)
    lengths = tokens["attention_mask"].sum(1)
    assert [tuple(s) for s in cached["text_states_shape"]] == [(int(n), 32) for n in lengths]  # real tokens only

    # What attach_text_tokens adds to the cached rows in training: the split's token arrays by id.
    from_cache = {**cached, **{k: tokens[k] for k in ("input_ids", "attention_mask", "token_type_ids", "token_source")}}
    method = UmafMethod()
    torch.manual_seed(0)
    model = method.build_model(cfg, 3).eval()
    via_cache = method.collate(from_cache, torch.device("cpu"))
    direct = method.collate(batch, torch.device("cpu"))
    assert "text_states" in via_cache and via_cache["text_states"].shape[1] == via_cache["attention_mask"].shape[1]
    with torch.no_grad():
        logits_cache = model(**method._inputs(via_cache)).logits
        logits_direct = model(**method._inputs(direct)).logits
    torch.testing.assert_close(logits_cache, logits_direct, atol=2e-3, rtol=2e-3)  # fp16 storage


def test_text_state_cache_key_follows_the_encoders_input():
    from umaf.train.feature_cache import token_rows_fingerprint

    def table(ids, tokens, labels=(0, 1)):
        tokens = np.array(tokens)
        mask = (tokens > 0).astype(np.int8)
        return pa.table({"id": ids, "label": list(labels), "input_ids": tokens.tolist(), "attention_mask": mask.tolist(),
                         "token_type_ids": np.zeros_like(tokens).tolist()})

    base = token_rows_fingerprint(table(["a", "b"], [[101, 7, 102, 0], [101, 8, 102, 0]]))
    assert base == token_rows_fingerprint(table(["b", "a"], [[101, 8, 102, 0], [101, 7, 102, 0]], (1, 0)))  # order
    assert base == token_rows_fingerprint(table(["a", "b"], [[101, 7, 102, 0, ], [101, 8, 102, 0]]))
    assert base != token_rows_fingerprint(table(["a", "b"], [[101, 7, 9, 102], [101, 8, 102, 0]]))  # a caption token more
    assert base != token_rows_fingerprint(table(["a", "b"], [[101, 7, 102, 0], [101, 8, 102, 0]], (0, 2)))
    with pytest.raises(KeyError):
        token_rows_fingerprint(pa.table({"id": ["a"], "label": [0]}))
