"""The caption job submitted through the Jobs API to a head this test starts (`ray start --head --block`).

All ports are free ones (never Ray's defaults), the head has a private temp dir, and it is stopped
by killing the `ray start --block` process tree by PID — never `ray stop`, which would hit other
clusters on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from umaf.caption.store import read_captions
from umaf.data.demo import write_demo
from umaf.data.manifest import read_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
RAY_BIN = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(p) for p in fh.read().split()]
    except OSError:
        return out
    for child in children:
        out.append(child)
        out.extend(_descendants(child))
    return out


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head with the dashboard (Jobs API) on free ports; yields the dashboard URL."""
    dashboard_port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Unix socket paths are limited
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAY_agent_register_timeout_ms": os.environ.get("RAY_agent_register_timeout_ms", "120000")}
    env.pop("RAY_ADDRESS", None)
    cmd = [RAY_BIN, "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--port", str(_free_port()),
           "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
           "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
           "--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
           "--ray-client-server-port", str(_free_port()), "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(tmp_path / "head.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 240
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        pids = _descendants(head.pid)
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        for pid in pids:  # anything left of this head only, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_caption_job_through_jobs_api(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from umaf.caption.tiny_vlm import ensure_tiny_vlm

    cache = tmp_path / "models"
    ensure_tiny_vlm(cache)
    demo = write_demo(str(tmp_path / "demo"), n_train=6, n_dev=2, n_test=2)
    out = tmp_path / "captions"
    client = JobSubmissionClient(ray_head)
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} jobs/caption.py --manifest {demo['manifest']} --out {out} "
                   f"model_cache_dir={cache}",
        runtime_env={"working_dir": str(REPO_ROOT),
                     "excludes": [".venv/", ".git/", "outputs/", "runs/", "**/__pycache__/", "*.parquet"]},
    )
    deadline = time.time() + 480
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    ids = read_manifest(demo["manifest"]).table["id"].to_pylist()
    assert sorted(read_captions(str(out))["id"].to_pylist()) == sorted(ids)
    assert "[caption dataset=demo stage=summary]" in logs
