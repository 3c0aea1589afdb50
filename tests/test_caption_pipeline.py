"""Integration: the caption job on a real local Ray cluster, a real S3 server and the real MSED files.

The tiny random-weight LLaVA (built once per session, loaded back with ``from_pretrained``) captions
through the same Ray Data pipeline as production; grammar-bounded fields keep every answer
schema-valid within a few dozen tokens.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from conftest import worker_log_lines, wait_for_killed_driver_job
from umaf import storage
from umaf.caption.prompt import PROMPT_VERSION
from umaf.caption.store import read_captions, read_ok_captions
from umaf.data.demo import write_demo
from umaf.data.manifest import build_table, read_manifest, write_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]  # generous: a loaded 2-core box starts actors slowly


def load_caption_job():
    spec = importlib.util.spec_from_file_location("jobs_caption", REPO_ROOT / "jobs" / "caption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def caption(argv: list[str], tiny_vlm_cache: str) -> dict:
    return load_caption_job().main([*argv, f"model_cache_dir={tiny_vlm_cache}"])


def msed_dev_manifest(shared_data: Path, uri: str, first: int, last: int) -> list[str]:
    """MSED dev rows ``first..last`` (1-based) as a manifest: row k pairs with images/k.jpg, only 1..60 exist here."""
    folder = shared_data / "msed" / "dev"
    with open(folder / "dev.csv", newline="", encoding="utf-8") as fh:
        records = list(csv.DictReader(fh))[first - 1:last]
    labels = {"sentiment": ["negative", "neutral", "positive"]}
    rows = [
        {"id": f"msed-dev-{k}", "split": "dev", "text": rec["Caption"], "image": str(folder / "images" / f"{k}.jpg"),
         "image_ok": (folder / "images" / f"{k}.jpg").is_file(),
         "label_sentiment": labels["sentiment"].index(rec["Sentiment"])}
        for k, rec in enumerate(records, start=first)
    ]
    write_manifest(build_table(rows, "msed", labels), uri)
    return [r["id"] for r in rows]


def parquet_files(uri: str) -> list[str]:
    fs, path = storage.resolve(uri)
    from pyarrow.fs import FileSelector

    return sorted(i.path for i in fs.get_file_info(FileSelector(path, allow_not_found=True))
                  if i.path.endswith(".parquet"))


def assert_each_id_once(out: str, expected_ids: list[str]) -> None:
    table = read_captions(out)
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(expected_ids), "every input id exactly once"


def test_demo_set_local_folder_then_second_run_does_no_work(ray_cluster, ray_head_cluster, tmp_path, tiny_vlm_cache):
    demo = write_demo(str(tmp_path / "demo"), n_train=10, n_dev=4, n_test=4)
    ids = read_manifest(demo["manifest"]).table["id"].to_pylist()
    out = str(tmp_path / "captions")

    # A pilot: 3 pairs drawn from the selection (splits, then limit: the first 5 dev/test pairs in
    # manifest order) captioned for real, then the plan with their measured output tokens.
    splits = read_manifest(demo["manifest"]).table["split"].to_pylist()
    first = [i for i, s in zip(ids, splits) if s != "train"][:5]
    plan = caption(["--pilot", "3", "--manifest", demo["manifest"], "--out", out, "splits=[dev,test]", "limit=5"],
                   tiny_vlm_cache)
    piloted = read_captions(out)
    assert len(piloted) == 3 and set(piloted["id"].to_pylist()) <= set(first)
    assert plan["pairs"]["already_captioned"] == 3 and plan["pairs"]["to_caption"] == 2
    tokens = piloted["output_tokens"].to_pylist()
    assert plan["output_tokens"]["per_pair"] == round(sum(tokens) / 3, 1) and plan["output_tokens"]["source"].startswith("pilot")

    # The full run, on the dataset re-prepared: every pair, plus the 3 piloted pairs again under new
    # ids (their requests, same image bytes, text and fingerprint, were captioned by the pilot) and the
    # first pair twice in this run. Neither kind is generated: each copies its twin's row.
    manifest = read_manifest(demo["manifest"])
    rows = manifest.table.to_pylist()
    by_id = {r["id"]: r for r in rows}
    piloted_ids = piloted["id"].to_pylist()
    rows += [{**by_id[i], "id": f"re-{i}"} for i in piloted_ids] + [{**rows[0], "id": "twin"}]
    manifest2 = str(tmp_path / "manifest2")
    write_manifest(build_table(rows, manifest.dataset, manifest.labels), manifest2)
    ids2 = [r["id"] for r in rows]
    summary = caption(["--manifest", manifest2, "--out", out], tiny_vlm_cache)
    assert summary["skipped"] == 3 and summary["this_run"] == {"ok": len(ids2) - 3, "invalid": 0, "error": 0}
    assert summary["reused"] == 4
    assert_each_id_once(out, ids2)
    table = read_captions(out)
    assert set(table["status"].to_pylist()) == {"ok"}
    assert set(table["prompt_version"].to_pylist()) == {PROMPT_VERSION}
    assert all(n and n > 0 for n in table["output_tokens"].to_pylist())
    assert all(len(h) == 64 for h in table["image_sha256"].to_pylist())
    assert storage.read_json(storage.join(out, "_summary.json"))["dataset_status"]["ok"] == len(ids2)
    rows_by_id = {r["id"]: r for r in table.to_pylist()}
    for i in piloted_ids:
        assert rows_by_id[f"re-{i}"]["reused_from"] == i and rows_by_id[f"re-{i}"]["raw"] == rows_by_id[i]["raw"]
    copy, original = ("twin", ids[0]) if rows_by_id["twin"]["reused_from"] else (ids[0], "twin")
    assert rows_by_id[copy]["reused_from"] == original and rows_by_id[original]["reused_from"] is None
    assert rows_by_id[copy]["raw"] == rows_by_id[original]["raw"]
    report = storage.read_text(storage.join(out, "_reports", summary["fingerprint"], "report.md"))
    assert f"{len(ids2)} pairs" in report and "4 ok rows copied" in report
    # The VLM actor's load line (model, device, seconds) reaches its worker log: tests/test_gpu.py
    # reads the same line to prove a GPU run's actor was on CUDA.
    loaded = worker_log_lines(ray_head_cluster, "[caption stage=vlm")
    assert any("actor loaded umaf-tiny-llava" in line and line.split(" on ")[-1].startswith("cpu in ")
               for line in loaded), loaded[-3:]

    files = parquet_files(out)
    again = caption(["--manifest", manifest2, "--out", out], tiny_vlm_cache)
    assert again["skipped"] == len(ids2) and again["captioned"] == 0
    assert parquet_files(out) == files, "a second run must write nothing"


def test_msed_rows_with_missing_images_to_s3_and_retry_failed(ray_cluster, s3_bucket, shared_data, tiny_vlm_cache):
    manifest = f"{s3_bucket}/msed/manifest"
    ids = msed_dev_manifest(shared_data, manifest, first=49, last=72)  # images 49..60 exist, 61..72 do not
    out = f"{s3_bucket}/msed/captions"

    summary = caption(["--manifest", manifest, "--out", out, "actors.batch_size=12"], tiny_vlm_cache)
    assert summary["dataset"] == "msed"
    assert summary["this_run"]["error"] == 12 and summary["this_run"]["ok"] + summary["this_run"]["invalid"] == 12
    assert_each_id_once(out, ids)
    table = read_captions(out)
    errors = table.filter(pc.equal(table["status"], "error"))
    assert sorted(errors["id"].to_pylist()) == sorted(f"msed-dev-{k}" for k in range(61, 73))
    assert all(e.startswith("image not found:") and e.endswith(".jpg") for e in errors["error"].to_pylist())
    assert len(read_ok_captions(out)) == summary["this_run"]["ok"]

    # --retry-failed redoes only the failed ids (still missing: still errors); ok rows are left alone.
    retry = caption(["--manifest", manifest, "--out", out, "--retry-failed"], tiny_vlm_cache)
    assert retry["selected"] - retry["skipped"] == 12 and retry["this_run"] == {"ok": 0, "invalid": 0, "error": 12}
    assert retry["dataset_status"]["error"] == 12
    assert len(read_ok_captions(out)) == summary["this_run"]["ok"]


@pytest.mark.slow
def test_killed_run_restarts_without_losing_or_duplicating(ray_cluster, tmp_path, tiny_vlm_cache):
    """The driver is SIGKILLed once the first caption file has landed; the same command then captions
    only what is missing. Every id ends with exactly one row (raw rows counted, not the de-duplicating
    reader): the rerun starts only once every process of the killed job is gone, so no late write of
    the killed run can land after the rerun has read what is done."""
    demo = write_demo(str(tmp_path / "demo"), n_train=32, n_dev=0, n_test=0)
    ids = read_manifest(demo["manifest"]).table["id"].to_pylist()
    out = str(tmp_path / "captions")
    # Small files and long answers: files land one by one while the rest is still being generated.
    argv = ["--manifest", demo["manifest"], "--out", out, "output.rows_per_file=2", "actors.batch_size=2",
            "images.batch_size=2", "max_field_chars=120", "sampling.max_tokens=400"]
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address}
    driver = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / "caption.py"), *argv, f"model_cache_dir={tiny_vlm_cache}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            if parquet_files(out) and read_captions(out).num_rows:  # a complete file has landed
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the driver finished before it could be killed: make the run longer"
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    wait_for_killed_driver_job(address, driver.pid)
    partial = read_captions(out)["id"].to_pylist()
    assert 0 < len(partial) < len(ids)
    assert len(partial) == len(set(partial)), "the killed run wrote no id twice"

    summary = caption(argv, tiny_vlm_cache)
    assert summary["skipped"] == len(partial), "finished captions from the killed run are kept, not redone"
    assert summary["captioned"] == len(ids) - len(partial)
    assert_each_id_once(out, ids)  # raw rows: one per id, none lost, none duplicated
    assert sorted(read_ok_captions(out)["id"].to_pylist()) == sorted(
        i for i, s in zip(read_captions(out)["id"].to_pylist(), read_captions(out)["status"].to_pylist()) if s == "ok")
