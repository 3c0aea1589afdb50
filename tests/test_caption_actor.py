"""The hf caption actor and the caption job's row selection, without a Ray cluster.

The actor is the real ``HFCaptioner`` with the real tiny VLM (built once per session); only its
backend's ``generate`` is swapped, for one batch, for one that raises as a real one does when the
device runs out of memory. Selection is the job's own ``select_ids`` on a real demo manifest.
"""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pytest
from PIL import Image

from umaf.caption.config import CaptionConfig
from umaf.caption.pipeline import LOADED_SCHEMA, HFCaptioner, select_ids
from umaf.caption.store import CAPTION_SCHEMA
from umaf.data.demo import write_demo
from umaf.data.manifest import read_manifest


def _loaded_batch() -> pa.Table:
    """What the image stage hands the actor: two loaded images and one row whose image failed."""
    jpegs = []
    for colour in ("red", "blue"):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    return pa.Table.from_pylist([
        {"id": "a", "text": "so happy", "image_jpeg": jpegs[0], "image_sha256": hashlib.sha256(jpegs[0]).hexdigest(),
         "error": None},
        {"id": "b", "text": "so sad", "image_jpeg": jpegs[1], "image_sha256": hashlib.sha256(jpegs[1]).hexdigest(),
         "error": None},
        {"id": "c", "text": "lost", "image_jpeg": None, "image_sha256": None, "error": "image not found: /x/c.jpg"},
    ], schema=LOADED_SCHEMA)


def test_a_failed_generate_becomes_error_rows_and_the_actor_goes_on(tiny_vlm_cache, monkeypatch):
    config = CaptionConfig(model="tiny", model_cache_dir=tiny_vlm_cache, max_field_chars=16,
                           sampling={"max_tokens": 96})
    actor = HFCaptioner(config.model_dump_json(), "demo")
    batch = _loaded_batch()

    def out_of_memory(texts, images):
        assert texts == ["so happy", "so sad"] and len(images) == 2  # the image-error row is not generated
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    real_generate = actor.backend.generate
    monkeypatch.setattr(actor.backend, "generate", out_of_memory)
    failed = actor(batch)
    assert failed.schema.equals(CAPTION_SCHEMA)
    rows = {r["id"]: r for r in failed.to_pylist()}
    assert [rows[i]["status"] for i in "abc"] == ["error"] * 3
    for i in "ab":
        assert rows[i]["error"] == "generation failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
        assert rows[i]["raw"] is None and rows[i]["output_tokens"] is None
        assert rows[i]["image_sha256"] == batch["image_sha256"]["ab".index(i)].as_py()
    assert rows["c"]["error"] == "image not found: /x/c.jpg"

    # The same actor captions the next batch: one bad batch cost its rows, not the actor.
    monkeypatch.setattr(actor.backend, "generate", real_generate)
    again = {r["id"]: r for r in actor(batch).to_pylist()}
    assert {again[i]["status"] for i in "ab"} <= {"ok", "invalid"} and all(again[i]["raw"] for i in "ab")
    assert again["c"]["status"] == "error" and again["c"]["error"] == "image not found: /x/c.jpg"


def test_splits_then_limit_select_ids_in_manifest_order(tmp_path):
    demo = write_demo(str(tmp_path / "demo"), n_train=5, n_dev=3, n_test=4)
    table = read_manifest(demo["manifest"]).table
    ids, splits = table["id"].to_pylist(), table["split"].to_pylist()

    def selected(**kw) -> list[str]:
        chosen, name = select_ids(demo["manifest"], CaptionConfig(**kw))
        assert name == "demo"
        return chosen.to_pylist()

    assert selected() == ids
    assert selected(splits=["dev", "test"]) == [i for i, s in zip(ids, splits) if s in ("dev", "test")]
    assert selected(splits=["test"], limit=2) == [i for i, s in zip(ids, splits) if s == "test"][:2]
    assert selected(limit=4) == ids[:4]
    assert selected(limit=100) == ids
    with pytest.raises(ValueError):
        CaptionConfig(limit=0)
    with pytest.raises(ValueError):
        CaptionConfig(splits=["validation"])
