"""The caption quality report on a hand-made caption set: figures counted here, independently."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
from PIL import Image

from umaf import storage
from umaf.caption.report import quality, reason_kind, write_report
from umaf.caption.store import CAPTION_SCHEMA
from umaf.caption.writer import CaptionWriter

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(pair_id, status="ok", *, ocr="", scene="s", rel="r", image="h1", error=None, at=T0, reused_from=None,
        tokens=10):
    return {"id": pair_id, "ocr": ocr, "visual_scene": scene, "textimage_relation": rel, "raw": "{}",
            "status": status, "error": error, "model": "m", "prompt_version": "p", "sampling": "{}",
            "image_sha256": image, "output_tokens": tokens if status != "error" else None, "captioned_at": at,
            "fingerprint": "fpA", "fingerprint_spec": json.dumps({"backend": "hf", "model": {"local": "m"},
                                                                  "prompt_version": "p"}),
            "request_key": None, "reused_from": reused_from}


ROWS = [
    row("a", ocr="SALE", scene="shop", image="h1"),
    row("b", ocr="SALE", scene="street", image="h2"),
    row("c", ocr="", scene="a dog in the rain", image="h3"),
    row("d", "error", error="image not found: /data/imgs/1.jpg", image=None),
    row("d", ocr="dd", scene="x" * 40, image="h4", at=T0 + timedelta(seconds=1)),  # retried: now ok
    row("e", "error", error="image not found: s3://bucket/imgs/2.jpg", image=None),
    row("f", "invalid", error="not valid JSON: Expecting value: line 1 column 1 (char 0)", image="h6"),
    row("g", ocr="SALE", scene="shop", image="h1", reused_from="a", tokens=10),  # a copy of a's request
]


def test_quality_figures():
    q = quality(pa.Table.from_pylist(ROWS, schema=CAPTION_SCHEMA))
    assert q["ids"] == 7 and q["rows"] == 8
    assert q["status"] == {"ok": 5, "invalid": 1, "error": 1}  # d counts as ok: its retry succeeded
    assert q["rates"]["error"] == round(1 / 7, 4)
    ocr = q["fields"]["ocr"]
    assert ocr["empty_rate"] == round(1 / 5, 4)  # c
    # "SALE" is a, b and g's OCR; a and g share an image, b has another: all three rows count.
    assert ocr["identical_for_different_images"]["rows"] == 3
    assert ocr["identical_for_different_images"]["top"][0] == {"value": "SALE", "rows": 3, "images": 2}
    # All three fields together: a and g ("SALE", "shop") share one image only: not identical across images.
    assert q["identical_captions_for_different_images"]["rows"] == 0
    scene = q["fields"]["visual_scene"]["chars"]
    assert scene["max"] == 40 and scene["min"] == 4 and scene["median"] == len("street")  # 4, 4, 6, 17, 40
    assert q["top_reasons"]["error"] == [{"reason": "image not found: <path>", "rows": 1}]
    assert q["top_reasons"]["invalid"][0]["reason"] == "not valid JSON: Expecting value: line N column N (char N)"
    assert q["reused_rows"] == 1
    # Tokens generated: the copy g generated nothing; d's error row has none.
    assert q["output_tokens"]["generated_rows"] == 5 and q["output_tokens"]["total"] == 50
    assert {s["status"] for s in q["samples"]} == {"ok", "invalid", "error"}


def test_reasons_mask_paths_and_numbers():
    assert reason_kind("image too large: 9000 bytes > images.max_bytes=1024 (s3://b/x/1.jpg)") == \
        "image too large: N bytes > images.max_bytes=N (<path>)"


def test_report_files_and_the_report_of_an_existing_set(tmp_path):
    uri = str(tmp_path / "captions")
    with CaptionWriter(uri, rows_per_file=100, flush_seconds=60, attempts=1, storage_kw={}) as writer:
        writer.add(pa.Table.from_pylist(ROWS, schema=CAPTION_SCHEMA))
    written = write_report(uri, "fpA")
    md = storage.read_text(written["report"])
    assert "7 pairs (8 rows written): ok 5 (71.4%)" in md and "1 × image not found: <path>" in md
    assert "| ocr | 20.0% |" in md
    assert Image.open(written["png"]).size[0] > 500
    on_disk = storage.read_json(storage.join(uri, "_reports", "fpA", "quality.json"))
    assert on_disk["status"] == {"ok": 5, "invalid": 1, "error": 1} and on_disk["spec"]["backend"] == "hf"
    # jobs/caption.py --report URI: the same, for every set in the folder, said on the console.
    from conftest import job_main

    reports = job_main("caption")(["--report", uri])
    assert [r["fingerprint"] for r in reports] == ["fpA"] and reports[0]["quality"]["status"]["ok"] == 5


def test_a_large_folder_is_reported_from_a_seeded_sample_of_files(tmp_path):
    from umaf.caption.report import render_markdown, sample_files

    uri = str(tmp_path / "captions")
    for k in range(4):
        with CaptionWriter(uri, rows_per_file=100, flush_seconds=60, attempts=1, storage_kw={}) as writer:
            writer.add(pa.Table.from_pylist([row(f"p{k}-{i}", image=f"h{k}-{i}") for i in range(20)], schema=CAPTION_SCHEMA))
    sizes = sorted(info.size for info in sample_files(uri, max_bytes=10**9)[0])
    files, sample = sample_files(uri, max_bytes=sizes[0] + sizes[1])  # room for two files, not three
    assert sample["files"] == 2 and sample["of_files"] == 4 and sample["bytes"] <= sizes[0] + sizes[1]
    assert [f.path for f in files] == sorted(f.path for f in files) == [f.path for f in sample_files(uri, sizes[0] + sizes[1])[0]]
    q = {**quality(pa.Table.from_pylist(ROWS, schema=CAPTION_SCHEMA)), "sample": sample}
    assert "Figures over a random sample: 2 of 4 files" in render_markdown(q, uri, "fpA", None)
