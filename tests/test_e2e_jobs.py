"""End to end through the Ray Jobs API: prepare → caption → train → tune, then the pipeline job.

The session's Ray head (``ray start --head`` on free ports, dashboard on, private temp dir, stopped
by PID at the end; see ``ray_head_cluster`` in conftest.py) takes the jobs. Each stage is submitted with ``JobSubmissionClient`` exactly as a
user would (``runtime_env`` = the repository as ``working_dir``), on the ``tiny`` presets made smaller
by overrides; every job must reach ``SUCCEEDED`` and the dashboard's REST API must list them. The
stages write the layout ``jobs/pipeline.py`` uses, so a final pipeline job over the same folder finds
every stage done and skips it (the caption stage runs but captions nothing), except the predict
stage, which labels the test split with the trained run: its metrics must be the run's own.

Sizes are the smallest that still show each stage's work (72 pairs, 1 epoch, 1 trial): what is
proved is that every stage runs as a submitted job and finds the previous stage's output.
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

from ray_head import job_runtime_env_vars, submit_and_wait
from umaf import storage
from umaf.caption.store import read_captions
from umaf.data.manifest import read_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_TIMEOUT = 1800
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(TEST_TIMEOUT)]

# What the Jobs API uploads: the repository as the user has it, less what is never needed on a cluster.
WORKING_DIR_EXCLUDES = [".git", ".venv", "outputs", "runs", "bench", ".pytest_cache", "**/__pycache__"]


def submit(client, name: str, entrypoint: list[str], env: dict[str, str], deadline: float) -> dict:
    """Submit one job with the repository as working_dir; wait for a terminal status; return its info."""
    submission_id, status, logs = submit_and_wait(
        client, shlex.join(entrypoint),
        {"working_dir": str(REPO_ROOT), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env}, deadline - time.time(),
        submission_id=f"umaf-e2e-{name}-{int(time.time())}", metadata={"stage": name},
    )
    info = client.get_job_info(submission_id)
    seconds = ((info.end_time or time.time() * 1000) - (info.start_time or 0)) / 1000
    print(f"[e2e] job {name} ({submission_id}): {status} in {seconds:.1f}s")
    assert status == "SUCCEEDED", f"job {name} ended {status}: {info.message}\n--- logs (tail) ---\n{logs[-6000:]}"
    return {"id": submission_id, "logs": logs, "seconds": seconds}


def test_stages_submitted_with_the_jobs_api_all_succeed(ray_head_cluster, tmp_path, tiny_vlm_cache):
    from ray.job_submission import JobSubmissionClient

    # The jobs share the test's time: each may take what is left of it (less what the session's head
    # may have taken to start in this test's setup, and a margin for the logs), so a stuck job fails
    # with its logs before pytest's own timeout, and a slow one on a loaded box is not cut off early.
    deadline = time.time() + TEST_TIMEOUT - 300
    head = ray_head_cluster
    client = JobSubmissionClient(head.dashboard_url)
    out = tmp_path / "pipeline"
    env = {**job_runtime_env_vars(), "UMAF_ENCODER_CACHE": str(tmp_path / "encoders")}
    py = sys.executable  # the interpreter the cluster runs (the project's venv)
    manifest, captions = f"{out}/manifest", f"{out}/captions"
    caption_overrides = [f"model_cache_dir={tiny_vlm_cache}", "output.rows_per_file=32", "actors.batch_size=8"]
    train_overrides = ["epochs=1", "num_workers=2"]
    tune_overrides = ["train.epochs=1", "search.space.lambda.grid=[0.1]", "search.space.K.grid=[2]"]  # 1 trial

    jobs = {}
    jobs["prepare"] = submit(client, "prepare", [
        py, "jobs/prepare.py", "--format", "demo", "--out", manifest,
        "demo.n_train=48", "demo.n_dev=12", "demo.n_test=12"], env, deadline)
    ids = read_manifest(manifest).table["id"].to_pylist()
    assert len(ids) == 72

    jobs["caption"] = submit(client, "caption", [
        py, "jobs/caption.py", "--manifest", manifest, "--out", captions, *caption_overrides], env, deadline)
    rows = read_captions(captions)  # raw rows: a duplicate would show here (read_ok_captions hides them)
    assert sorted(rows["id"].to_pylist()) == sorted(ids), "every id captioned exactly once"
    assert set(rows["status"].to_pylist()) == {"ok"}
    assert "stage=summary" in jobs["caption"]["logs"], "the job's log names its stage"

    jobs["train"] = submit(client, "train", [
        py, "jobs/train.py", "--model", "umaf", "--manifest", manifest, "--captions", captions,
        "--out", f"{out}/runs/train", *train_overrides], env, deadline)
    metrics = storage.read_json(f"{out}/runs/train/metrics.json")
    assert metrics["world_size"] == 2 and metrics["epochs"] == 1
    assert metrics["data"]["rows_used"]["train"] == 48

    jobs["tune"] = submit(client, "tune", [
        py, "jobs/tune.py", "--model", "umaf", "--manifest", manifest, "--captions", captions,
        "--out", f"{out}/sweeps", *tune_overrides], env, deadline)
    results = pq.read_table(f"{out}/sweeps/tiny-umaf/results.parquet").to_pylist()
    assert len(results) == 1 and results[0]["K"] == 2

    # The dashboard's REST API lists every job with its final status.
    with urllib.request.urlopen(f"{head.dashboard_url}/api/jobs/", timeout=10) as resp:
        listed = {j["submission_id"]: j for j in json.loads(resp.read())}
    for stage, job in jobs.items():
        assert job["id"] in listed, f"{stage} job missing from GET /api/jobs/"
        assert listed[job["id"]]["status"] == "SUCCEEDED"
        assert shlex.split(listed[job["id"]]["entrypoint"])[1] == f"jobs/{stage}.py"

    # The orchestrated entry point over the same folder: every stage finds its work done.
    before = read_captions(captions).num_rows
    pipeline = submit(client, "pipeline", [
        py, "jobs/pipeline.py", "--out", str(out),
        f"caption.overrides={json.dumps(caption_overrides)}", f"train.overrides={json.dumps(train_overrides)}",
        f"tune.overrides={json.dumps(tune_overrides)}"], env, deadline)
    summary = storage.read_json(f"{out}/pipeline_summary.json")["stages"]
    print("[e2e] pipeline over finished outputs:", json.dumps(summary))
    assert summary["prepare"]["status"] == summary["train"]["status"] == summary["tune"]["status"] == "skipped"
    assert summary["caption"]["status"] == "ran" and summary["caption"]["captioned"] == 0
    assert summary["caption"]["skipped"] == len(ids)
    assert read_captions(captions).num_rows == before, "no caption written twice"
    assert "== stage 3/5 train: skipped (finished run:" in pipeline["logs"]
    # The pipeline's predict stage (the only one with work left): the run's best model on the test
    # split gives back the run's own test metrics, through the predict job's actors.
    assert summary["predict"]["status"] == "ran" and summary["predict"]["this_run"] == {"ok": 12, "error": 0}
    predicted = storage.read_json(f"{out}/predictions/train/_metrics.json")["splits"]["test"]
    assert predicted == metrics["test"], (predicted, metrics["test"])
