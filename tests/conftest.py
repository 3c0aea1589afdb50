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
def ray_head_cluster():
    """One real Ray cluster for the whole session: ``ray start --head`` on free ports (4 CPUs, dashboard
    with the Jobs API), stopped by PID at the end.

    Shared by the tests that run jobs in this process (through :func:`ray_cluster`), the ones that run
    drivers as subprocesses (``ray.address=<gcs>``) and the ones that submit through the Jobs API: a
    Ray head costs tens of seconds to start on a loaded 2-core machine, and what these tests prove
    does not depend on having a cluster of their own (the fault-tolerance tests, which kill nodes, do
    start their own). Its nodes' environment holds the S3 test server's (fake) credentials, as an
    instance role would provide them; jobs are never given credentials.
    """
    from ray_head import start_head

    # The machine's GPUs join the cluster (the `gpu` tests need them; CPU machines have none).
    import torch

    gpus = int(os.environ.get("UMAF_TEST_RAY_GPUS", torch.cuda.device_count() if torch.cuda.is_available() else 0))
    cluster = start_head(num_cpus=int(os.environ.get("UMAF_TEST_RAY_CPUS", "4")), object_store_mb=400, num_gpus=gpus)
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(ray_head_cluster):
    """This process as a driver of the session's cluster (jobs called in-process join it)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address=ray_head_cluster.gcs_address, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


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


def worker_log_lines(cluster, needle: str) -> list[str]:
    """Lines containing ``needle`` in the worker logs of a test cluster (what ``ray job logs`` and the
    dashboard show of its actors and tasks)."""
    logs = [p for p in Path(cluster.temp_dir).rglob("worker-*") if p.is_file()]
    return [line for log in logs for line in log.read_text(errors="replace").splitlines() if needle in line]


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


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie or a reaped one is not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for_killed_driver_job(address: str, driver_pid: int, timeout: float = 300) -> None:
    """Wait until no process of a killed driver's Ray job is alive: its (non-detached) actors are DEAD
    and no actor or task of the job still has a live worker process (by PID).

    A SIGKILLed driver's actors and tasks (Ray Train's controller and workers, Ray Data's actors and
    write tasks) are killed by Ray once the GCS sees the driver gone; until then they can still write
    (a newer checkpoint, a caption file). Tests that read "what the killed run left" wait for this
    condition, not a sleep.
    """
    from ray.util.state import list_actors, list_jobs, list_tasks

    deadline = time.time() + timeout
    job_id, left = None, []
    while time.time() < deadline:
        if job_id is None:
            jobs = [j for j in list_jobs(address=address, raise_on_missing_output=False)
                    if j.driver_info is not None and str(j.driver_info.pid) == str(driver_pid)]
            if not jobs:
                raise AssertionError(f"no Ray job has driver pid {driver_pid}")
            job_id = jobs[-1].job_id
        actors = list_actors(address=address, filters=[("job_id", "=", job_id)], limit=10000, detail=True,
                             raise_on_missing_output=False)
        tasks = list_tasks(address=address, filters=[("job_id", "=", job_id)], limit=10000, detail=True,
                           raise_on_missing_output=False)
        # Detached actors (Ray Train's PlacementGroupCleaner) outlive their job by design; they write
        # nothing of the run, and waiting for them would wait forever.
        detached = {a.pid for a in actors if a.is_detached}
        left = [f"actor {a.class_name} {a.state} pid={a.pid}" for a in actors
                if not a.is_detached and (a.state != "DEAD" or (a.pid and pid_alive(a.pid)))]
        left += [f"task {t.name} pid={t.worker_pid}" for t in tasks
                 if t.worker_pid and t.worker_pid not in detached and pid_alive(t.worker_pid)]
        if not left:
            return
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} (driver pid {driver_pid}) still has live processes after {timeout:.0f}s: {left[:10]}")


# GPUs of the instance types cluster/aws.yaml names (AWS instance type pages): its worker node types
# get them from EC2 at launch; the fake cluster below states them.
AWS_INSTANCE_GPUS = {"g6.xlarge": 1, "g5.12xlarge": 4, "m6i.4xlarge": 0}
FAKE_GPUS = {"gpu_caption": 1, "gpu_train": 2}  # tiny: what the tests need, on one 2-core machine
FAKE_MAX_WORKERS = {"gpu_caption": 2, "gpu_train": 1}
FAKE_HEAD_CPUS = 8


def fake_aws_autoscaling_config(idle_timeout_minutes: float = 0.1) -> dict:
    """cluster/aws.yaml's worker node types for Ray's ``fake_multinode`` autoscaler: the same names and
    custom resources (scaled per GPU: caption_node and train_node are one per GPU there), the same
    CPU override where aws.yaml sets one, tiny sizes, a short idle timeout."""
    import yaml

    aws = yaml.safe_load((REPO_ROOT / "cluster" / "aws.yaml").read_text())
    node_types = {}
    for name, spec in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            continue
        real_gpus = AWS_INSTANCE_GPUS[spec["node_config"]["InstanceType"]]
        gpus = FAKE_GPUS[name]
        custom = {k: v * gpus / real_gpus for k, v in spec["resources"].items() if k != "CPU"}
        resources = {"CPU": spec["resources"].get("CPU", 2), "GPU": gpus, **custom,
                     "object_store_memory": 150 * 1024 * 1024}
        node_types[name] = {"resources": resources, "node_config": {}, "min_workers": 0,
                            "max_workers": FAKE_MAX_WORKERS[name]}
    node_types["ray.head.default"] = {"resources": {"CPU": FAKE_HEAD_CPUS}, "node_config": {}, "max_workers": 0}
    empty: dict = {key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                       "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                       "cluster_synced_files", "rsync_exclude", "rsync_filter")}
    return {
        "cluster_name": "umaf-fake", "max_workers": sum(FAKE_MAX_WORKERS.values()), "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes, "head_node_type": "ray.head.default",
        "available_node_types": node_types, "auth": {}, "docker": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **empty,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
    }


@pytest.fixture(scope="session")
def fake_aws_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head alone (8 CPUs, no GPU, like aws.yaml's head) whose autoscaler starts cluster/aws.yaml's
    worker node types (tiny, on this machine) when jobs ask for their resources, and ends them when idle.

    Shared by the vLLM caption tests and the placement tests. Every node imports ``tests/fake_vllm``
    as ``vllm`` (it fakes only the engine's body; ray.data.llm is real), which records each engine
    it starts in ``record_dir``.
    """
    from ray_head import start_head

    record = tmp_path_factory.mktemp("engines")
    fake_vllm = Path(__file__).resolve().parent / "fake_vllm"
    env = {"PYTHONPATH": os.pathsep.join([str(fake_vllm), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "FAKE_VLLM_RECORD_DIR": str(record), "FAKE_VLLM_SECONDS_PER_REQUEST": "1.0",
           "RAY_metrics_report_interval_ms": "500"}
    cluster = start_head(num_cpus=FAKE_HEAD_CPUS, num_gpus=0, object_store_mb=300, env=env,
                         autoscaling_config=fake_aws_autoscaling_config())
    cluster.record_dir = record
    try:
        yield cluster
    finally:
        cluster.shutdown()
