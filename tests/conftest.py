"""Shared test fixtures: the real data in ../shared/data, a real S3 server, a real local Ray cluster.

Nothing here mocks a client: S3 is moto's HTTP server on 127.0.0.1 reached through boto3 and
pyarrow's S3FileSystem exactly as a MinIO user would; Ray is a real local cluster on non-default
ports, started once per test session and stopped by this process (never `ray stop`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("UMAF_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Local Ray clusters in tests must not pick up a stale ~/.ray/auth_token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Keep the test process quiet and fast: no usage stats, no accelerator probing.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Jobs forward where the object store is, never credentials: like a node with an instance role,
# every Ray process of the test clusters finds these (fake, moto accepts any) keys in its own
# environment, inherited from this process before any cluster starts.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real published dataset files; tests that need them skip with a reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real dataset files not found at {SHARED_DATA} (set UMAF_SHARED_DATA or put shared/ beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 protocol server (moto) on 127.0.0.1; yields its endpoint URL.

    Fake credentials go into the environment the way a user would export them; boto3 and pyarrow
    find them through the standard AWS chain.
    """
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {log.read_text()}")
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start in 30 s")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint
    )
    try:
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the test S3 server; yields ``s3://<bucket>``."""
    import boto3

    name = "umaf-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    name = f"{name}-{os.getpid()}-{free_port()}"[:63]
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session (2 CPUs, non-default ports)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ctx = ray.init(
        address="local",
        num_cpus=int(os.environ.get("UMAF_TEST_RAY_CPUS", "4")),
        include_dashboard=True,
        dashboard_port=free_port(),
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        del ctx


@pytest.fixture(scope="session")
def tiny_vlm_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ``model_cache_dir`` holding the tiny random-weight VLM, built once per test session.

    Jobs build it on first use, but under load that takes minutes inside an actor's constructor;
    tests that submit caption jobs pass ``model_cache_dir=<this>`` so every job loads it ready-made.
    """
    from umaf.caption.tiny_vlm import ensure_tiny_vlm

    cache = tmp_path_factory.mktemp("tiny-vlm")
    ensure_tiny_vlm(cache)
    return str(cache)


def job_main(name: str):
    """``main`` of ``jobs/<name>.py``, loaded by path (jobs/ is a folder of scripts, not a package)."""
    import importlib.util

    module_name = f"umaf_job_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "jobs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name].main
