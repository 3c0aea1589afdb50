"""End to end through the Ray Jobs API: prepare → caption → train → tune, then the pipeline job.

A real head is started by this test (``ray start --head`` on free ports, dashboard on, private temp
dir) and stopped by PID at the end. Each stage is submitted with ``JobSubmissionClient`` exactly as a
user would (``runtime_env`` = the repository as ``working_dir``), on the ``tiny`` presets made smaller
by overrides; every job must reach ``SUCCEEDED`` and the dashboard's REST API must list them. The
stages write the layout ``jobs/pipeline.py`` uses, so a final pipeline job over the same folder finds
every stage done and skips it (the caption stage runs but captions nothing).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_head import job_runtime_env_vars, start_head
from umaf import storage
from umaf.caption.store import read_captions, read_ok_captions
from umaf.data.manifest import read_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]

# What the Jobs API uploads: the repository as the user has it, less what is never needed on a cluster.
WORKING_DIR_EXCLUDES = [".git", ".venv", "outputs", "runs", "bench", ".pytest_cache", "**/__pycache__"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def head():
    """A Ray head of our own (4 logical CPUs, dashboard on a free port), stopped by PID afterwards."""
    cluster = start_head(num_cpus=4)
    try:
        yield cluster
    finally:
        cluster.shutdown()
        assert not cluster.head.pids(), "head processes left after shutdown"


def submit_and_wait(client, name: str, entrypoint: list[str], env: dict[str, str], timeout: float = 420) -> dict:
    """Submit one job with the repository as working_dir; wait for a terminal status; return its info."""
    submission_id = client.submit_job(
        entrypoint=shlex.join(entrypoint),
        submission_id=f"umaf-e2e-{name}-{int(time.time())}",
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env},
        metadata={"stage": name},
    )
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL:
            break
        time.sleep(2)
    info = client.get_job_info(submission_id)
    logs = client.get_job_logs(submission_id)
    seconds = ((info.end_time or time.time() * 1000) - (info.start_time or 0)) / 1000
    print(f"[e2e] job {name} ({submission_id}): {status} in {seconds:.1f}s")
    assert status == "SUCCEEDED", f"job {name} ended {status}: {info.message}\n--- logs (tail) ---\n{logs[-6000:]}"
    return {"id": submission_id, "logs": logs, "seconds": seconds}


def test_stages_submitted_with_the_jobs_api_all_succeed(head, tmp_path, tiny_vlm_cache):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    out = tmp_path / "pipeline"
    env = {**job_runtime_env_vars(), "UMAF_ENCODER_CACHE": str(tmp_path / "encoders")}
    py = sys.executable  # the interpreter the cluster runs (the project's venv)
    manifest, captions = f"{out}/manifest", f"{out}/captions"
    caption_overrides = [f"model_cache_dir={tiny_vlm_cache}", "output.rows_per_file=32", "actors.batch_size=8"]
    train_overrides = ["epochs=2", "num_workers=2"]
    tune_overrides = ["train.epochs=2", "search.space.lambda.grid=[0.1]"]  # K in {2, 10}: 2 trials

    jobs = {}
    jobs["prepare"] = submit_and_wait(client, "prepare", [
        py, "jobs/prepare.py", "--format", "demo", "--out", manifest,
        "demo.n_train=64", "demo.n_dev=16", "demo.n_test=16"], env)
    ids = read_manifest(manifest).table["id"].to_pylist()
    assert len(ids) == 96

    jobs["caption"] = submit_and_wait(client, "caption", [
        py, "jobs/caption.py", "--manifest", manifest, "--out", captions, *caption_overrides], env)
    assert sorted(read_ok_captions(captions)["id"].to_pylist()) == sorted(ids), "every id captioned once, ok"
    assert "stage=summary" in jobs["caption"]["logs"], "the job's log names its stage"

    jobs["train"] = submit_and_wait(client, "train", [
        py, "jobs/train.py", "--model", "umaf", "--manifest", manifest, "--captions", captions,
        "--out", f"{out}/runs/train", *train_overrides], env)
    metrics = storage.read_json(f"{out}/runs/train/metrics.json")
    assert metrics["world_size"] == 2 and metrics["epochs"] == 2
    assert metrics["data"]["rows_used"]["train"] == 64

    jobs["tune"] = submit_and_wait(client, "tune", [
        py, "jobs/tune.py", "--model", "umaf", "--manifest", manifest, "--captions", captions,
        "--out", f"{out}/sweeps", *tune_overrides], env)
    results = pq.read_table(f"{out}/sweeps/tiny-umaf/results.parquet").to_pylist()
    assert len(results) == 2 and sorted(r["K"] for r in results) == [2, 10]

    # The dashboard's REST API lists every job with its final status.
    with urllib.request.urlopen(f"{head.dashboard_url}/api/jobs/", timeout=10) as resp:
        listed = {j["submission_id"]: j for j in json.loads(resp.read())}
    for stage, job in jobs.items():
        assert job["id"] in listed, f"{stage} job missing from GET /api/jobs/"
        assert listed[job["id"]]["status"] == "SUCCEEDED"
        assert shlex.split(listed[job["id"]]["entrypoint"])[1] == f"jobs/{stage}.py"

    # The orchestrated entry point over the same folder: every stage finds its work done.
    before = read_captions(captions).num_rows
    pipeline = submit_and_wait(client, "pipeline", [
        py, "jobs/pipeline.py", "--out", str(out),
        f"caption.overrides={json.dumps(caption_overrides)}", f"train.overrides={json.dumps(train_overrides)}",
        f"tune.overrides={json.dumps(tune_overrides)}"], env)
    summary = storage.read_json(f"{out}/pipeline_summary.json")["stages"]
    print("[e2e] pipeline over finished outputs:", json.dumps(summary))
    assert summary["prepare"]["status"] == summary["train"]["status"] == summary["tune"]["status"] == "skipped"
    assert summary["caption"]["status"] == "ran" and summary["caption"]["captioned"] == 0
    assert summary["caption"]["skipped"] == len(ids)
    assert read_captions(captions).num_rows == before, "no caption written twice"
    assert "[pipeline stage=train" in pipeline["logs"]
