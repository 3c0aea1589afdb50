"""The caption fingerprint: what changes it and what does not; which weights a model name means."""

from __future__ import annotations

import json

import pytest

from umaf.caption.config import CaptionConfig
from umaf.caption.fingerprint import (
    caption_fingerprint,
    folder_sha256,
    request_key,
    resolve_hub_revision,
    s3_folder_digest,
)
from umaf.errors import UserError

MODEL = {"hub": "Org/VLM", "revision": "0" * 40}  # identity given, so nothing is resolved


def fp(_model: dict = MODEL, **overrides) -> str:
    return caption_fingerprint(CaptionConfig(**overrides), model=_model).id


@pytest.mark.parametrize("change", [
    {"backend": "vllm"},
    {"sampling": {"temperature": 0.7}},
    {"sampling": {"max_tokens": 100}},
    {"max_field_chars": 40},
    {"images": {"max_area": 50176}},
    {"images": {"multiple_of": 28}},
    {"images": {"min_side": 56}},
    {"images": {"max_aspect_ratio": 50}},
    {"images": {"max_side": 512}},
    {"hf": {"dtype": "bfloat16"}},
])
def test_what_decides_the_caption_changes_the_fingerprint(change):
    assert fp(**change) != fp()


@pytest.mark.parametrize("change", [
    {"actors": {"batch_size": 3, "max_actors": 4}},
    {"images": {"batch_size": 7, "max_bytes": 2048, "max_pixels": 4096}},
    {"output": {"rows_per_file": 9}},
    {"vllm": {"max_model_len": 4096}},  # decides which prompts fail, not what the model writes (hf run)
    {"sampling": {"seed": 7, "top_p": 0.5}},  # greedy: neither changes a token
    {"limit": 3, "retry_failed": True},
])
def test_what_only_decides_speed_or_which_pairs_does_not(change):
    assert fp(**change) == fp()


def test_vllm_image_budget_and_engine_dtype_are_in_the_fingerprint_the_model_identity_too():
    base = fp(backend="vllm")
    assert fp(backend="vllm", vllm={"max_pixels": 28 * 28 * 256}) != base
    assert fp(backend="vllm", vllm={"engine_kwargs": {"dtype": "float16"}}) != base
    assert fp(backend="vllm", vllm={"engine_kwargs": {"enforce_eager": True}}) == base
    assert fp(_model={"hub": "Org/VLM", "revision": "1" * 40}) != fp()
    spec = caption_fingerprint(CaptionConfig(backend="vllm"), model=MODEL).spec
    assert spec["model"] == MODEL and spec["image"]["pad"] and spec["engine"]["max_pixels"] == 1280 * 28 * 28


def test_request_key_is_equal_only_for_identical_requests():
    key = request_key("fp1", "sha-img", "a text")
    assert key == request_key("fp1", "sha-img", "a text") and len(key) == 32
    assert len({key, request_key("fp2", "sha-img", "a text"), request_key("fp1", "sha-other", "a text"),
                request_key("fp1", "sha-img", "a text!")}) == 4


def test_local_weights_are_named_by_their_content(tmp_path):
    model = tmp_path / "vlm"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    first = folder_sha256(model)
    assert folder_sha256(model) == first
    (model / "model.safetensors").write_bytes(b"weightz")
    assert folder_sha256(model) != first
    spec = caption_fingerprint(CaptionConfig(model=str(model))).spec
    assert spec["model"] == {"local": "vlm", "sha256": folder_sha256(model)}


def test_s3_weights_are_named_by_their_listing(s3_bucket, s3_endpoint):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    s3.put_object(Bucket=bucket, Key="models/vlm/config.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="models/vlm/model.safetensors", Body=b"weights")
    first = s3_folder_digest(f"{s3_bucket}/models/vlm", endpoint_url=s3_endpoint)
    assert s3_folder_digest(f"{s3_bucket}/models/vlm/", endpoint_url=s3_endpoint) == first
    s3.put_object(Bucket=bucket, Key="models/vlm/model.safetensors", Body=b"weightz")
    assert s3_folder_digest(f"{s3_bucket}/models/vlm", endpoint_url=s3_endpoint) != first
    with pytest.raises(UserError, match="holds no files"):
        s3_folder_digest(f"{s3_bucket}/models/none", endpoint_url=s3_endpoint)


def test_hub_revision_is_a_commit_from_the_config_or_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "a" * 40
    assert resolve_hub_revision("Org/VLM", commit) == commit
    with pytest.raises(UserError, match="model_revision=<40-hex commit>"):
        resolve_hub_revision("Org/VLM", None)
    refs = tmp_path / "models--Org--VLM" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("b" * 40)
    (refs / "v2").write_text("c" * 40 + "\n")
    assert resolve_hub_revision("Org/VLM", None) == "b" * 40
    assert resolve_hub_revision("Org/VLM", "v2") == "c" * 40
    spec = caption_fingerprint(CaptionConfig(model="Org/VLM", model_revision="v2")).spec
    assert json.dumps(spec["model"]) == json.dumps({"hub": "Org/VLM", "revision": "c" * 40})


def test_duplicate_rows_are_found_in_blocks_whose_error_column_is_all_null():
    """Ray Data types a block's all-null ``error`` column as null; the writer's duplicate split must read
    such a block (none marked) and a mixed one (the marked row's request key, the rest written now)."""
    import pyarrow as pa

    from umaf.caption.pipeline import DUPLICATE_REQUEST, split_duplicates

    clean = pa.table({"id": ["a", "b"], "status": ["ok", "ok"], "error": pa.nulls(2)})
    kept, pending = split_duplicates(clean)
    assert kept.num_rows == 2 and pending == []
    mixed = pa.table({"id": ["a", "b", "c"], "status": ["ok", "error", "error"],
                      "error": [None, f"{DUPLICATE_REQUEST}key-1", "timeout"]})
    kept, pending = split_duplicates(mixed)
    assert kept["id"].to_pylist() == ["a", "c"] and pending == [("b", "key-1")]


def test_a_generated_row_has_every_column_but_the_fingerprint_the_driver_stamps():
    """The vLLM path's rows travel as dicts through Ray Data: a key missing from caption_row is a
    column missing from the block, which the writer cannot select."""
    from umaf.caption.backends import caption_row
    from umaf.caption.store import CAPTION_SCHEMA

    row = caption_row("p1", model="m", sampling_json="{}", image_sha256=None, error="image unreadable")
    assert set(CAPTION_SCHEMA.names) - set(row) == {"fingerprint", "fingerprint_spec"}
