"""Real Ray nodes for tests: `ray start --block` subprocesses on free ports, stopped by PID.

A test that needs a cluster of its own (the Jobs API test, the multi-node fault-tolerance tests)
starts a head and optionally worker nodes on this machine with :func:`start_head` and
:func:`start_worker`. Each node is one ``ray start ... --block`` process in its own session; the
node's Ray processes (GCS, raylet, dashboard, agents, workers) are its descendants, so
:meth:`RayNode.kill` SIGKILLs exactly that process tree — a node failure as the rest of the cluster
sees it — and never touches another cluster on the machine. Nothing here runs ``ray stop``.

Isolation from other clusters on the machine:
- every port is chosen free (GCS, dashboard, dashboard agent, metrics, runtime-env agent, object
  manager, node manager), so parallel test sessions don't collide;
- each cluster has a private short ``--temp-dir`` (Unix socket paths must stay under ~107 bytes),
  so its address file is not ``/tmp/ray/ray_current_cluster`` and a stale one there is never joined:
  drivers are always given the address explicitly (``RAY_ADDRESS`` / ``ray.address=``);
- each worker node has its own temp dir under the cluster's (as on its own machine), so nodes that
  start together never take the same socket names.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# The `ray` command beside this Python (a venv); else the same CLI through this interpreter (where Ray
# is unpacked onto PYTHONPATH, as on the GPU machine's bundle, there is no `ray` script).
_RAY_SCRIPT = Path(sys.executable).with_name("ray")
RAY_CMD = [str(_RAY_SCRIPT)] if _RAY_SCRIPT.exists() else [sys.executable, "-m", "ray.scripts.scripts"]

NODE_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Detect a dead node within seconds instead of Ray's default ~30 s (tests kill nodes).
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
    # A raylet waits for its dashboard agent's ports and aborts the node when they come late; on a
    # loaded 2-core machine the agent's imports alone can exceed the default wait.
    "RAY_agent_register_timeout_ms": "180000",
    # Train's controller polls its workers every 2 s by default, so each of the suite's ~30 short
    # Train runs waited ~1-2 s past its end; the workers' health-check timeout is unchanged.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc), parents first."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class RayNode:
    """One Ray node: the ``ray start --block`` process and the processes it started."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: int = 0

    def pids(self) -> list[int]:
        return [p for p in process_tree(self.proc.pid) if _alive(p)]

    def describe(self) -> list[str]:
        """``pid command`` of each live process of this node (what a kill would take down)."""
        return [f"{p} {_cmdline(p)[:120]}" for p in self.pids()]

    def freeze(self) -> list[int]:
        """SIGSTOP every process of the node: from this instant it does no more work (a test can then
        check the job has not finished yet, race-free, before the kill). Returns the PIDs stopped."""
        victims = self.pids()
        for pid in victims:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        return victims

    def kill(self) -> list[int]:
        """SIGKILL the whole node (raylet, agents, its workers) at once; returns the PIDs killed.

        The tree is collected before anything dies: once the raylet is gone its workers would be
        re-parented and no longer reachable through it.
        """
        victims = self.pids()
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in victims):
            time.sleep(0.2)
        return victims

    def stop(self) -> None:
        """Graceful-then-forced stop of this node's processes (fixture teardown)."""
        if self.proc.poll() is None:
            victims = self.pids()
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its children on SIGTERM
            try:
                self.proc.wait(timeout=5)  # then SIGKILL: a test cluster keeps nothing worth a longer wait
            except subprocess.TimeoutExpired:
                pass
            for pid in victims:
                if _alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        else:
            self.kill()


@dataclass
class RayCluster:
    """A head (with dashboard) plus any worker nodes, all on this machine."""

    head: RayNode
    gcs_address: str
    dashboard_url: str
    temp_dir: Path
    workers: list[RayNode] = field(default_factory=list)

    def get(self, path: str, timeout: float = 10):
        with urllib.request.urlopen(self.dashboard_url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> list[dict]:
        """Nodes the GCS reports ALIVE (dashboard state API)."""
        data = self.get("/api/v0/nodes?limit=1000&detail=false")
        return [n for n in data["data"]["result"]["result"] if n.get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 180) -> list[dict]:
        """Wait until ``count`` nodes are ALIVE; a worker whose ``ray start`` died while starting (on an
        overloaded machine the raylet gives up when its agent is slow to start) is started again."""
        deadline = time.time() + timeout
        last: Exception | None = None
        restarts = 0
        while time.time() < deadline:
            for i, node in enumerate(self.workers):
                if node.proc.poll() is not None and restarts < 2 * len(self.workers):
                    restarts += 1
                    node.kill()
                    self.workers[i] = start_worker(self, num_cpus=node.num_cpus, resources=node.resources, name=node.name)
            try:
                nodes = self.alive_nodes()
                if len(nodes) == count:
                    return nodes
            except Exception as exc:  # dashboard still starting
                last = exc
            time.sleep(1)
        raise TimeoutError(f"cluster did not reach {count} alive nodes in {timeout:.0f}s (last error: {last})")

    def add_worker(self, num_cpus: int, resources: dict[str, float] | None = None, name: str | None = None) -> RayNode:
        node = start_worker(self, num_cpus=num_cpus, resources=resources, name=name or f"worker{len(self.workers) + 1}")
        self.workers.append(node)
        return node

    def shutdown(self) -> None:
        for node in [*self.workers, self.head]:
            node.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _node_ports() -> list[str]:
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def _popen(args: list[str], log_path: Path, env: dict[str, str] | None) -> subprocess.Popen:
    full_env = {**os.environ, **NODE_ENV, **(env or {})}
    # A stale RAY_ADDRESS in the test's environment must not turn a head into a worker of another cluster.
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        args, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=full_env, start_new_session=True
    )


def start_head(
    num_cpus: int = 2,
    resources: dict[str, float] | None = None,
    *,
    object_store_mb: int = 200,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    attempts: int = 3,
    num_gpus: int = 0,
    autoscaling_config: dict | None = None,
) -> RayCluster:
    """``ray start --head --block`` on free ports with the dashboard; returns once the dashboard answers.

    On a heavily loaded machine a raylet can give up waiting for its (slow to import) dashboard
    agent and the head exits; it is then started again from scratch, up to ``attempts`` times.

    With ``autoscaling_config`` (a cluster launcher config whose provider is ``fake_multinode``) the
    head also runs Ray's autoscaler, which starts and ends worker nodes on this machine as it would
    EC2 instances (``FakeMultiNodeProvider``: each node a raylet of this cluster, a child of the
    head's autoscaler, so stopping the head stops them too).
    """
    for attempt in range(1, attempts + 1):
        try:
            return _start_head_once(num_cpus, resources, object_store_mb, env, timeout, num_gpus, autoscaling_config)
        except RuntimeError as exc:
            if attempt == attempts:
                raise
            print(f"[ray_head] head failed to start (attempt {attempt}/{attempts}), retrying: {str(exc)[-300:]}")
    raise AssertionError("unreachable")


def _start_head_once(num_cpus, resources, object_store_mb, env, timeout, num_gpus=0,
                     autoscaling_config=None) -> RayCluster:
    temp_dir = Path(tempfile.mkdtemp(prefix="umaf-ray-", dir="/tmp"))
    port, dash_port = free_port(), free_port()
    extra_args: list[str] = []
    if autoscaling_config is not None:
        # The fake provider joins its nodes to this GCS (by default it would assume port 6379).
        config = {**autoscaling_config, "provider": {**autoscaling_config["provider"], "gcs_address": f"127.0.0.1:{port}"}}
        path = temp_dir / "autoscaling.json"
        path.write_text(json.dumps(config))
        extra_args.append(f"--autoscaling-config={path}")
        # What ray.cluster_utils.AutoscalingCluster.start sets (it also runs `ray stop --force`, which
        # would stop every cluster on the machine: that is why the head is started here instead).
        env = {**(env or {}), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    args = [
        *RAY_CMD, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={free_port()}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
        f"--object-store-memory={object_store_mb * 1024 * 1024}", f"--temp-dir={temp_dir}",
        "--disable-usage-stats", *_node_ports(), *extra_args,
    ]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    log_path = temp_dir / "head.log"
    proc = _popen(args, log_path, env)
    node = RayNode("head", proc, log_path, resources or {}, num_cpus)
    cluster = RayCluster(head=node, gcs_address=f"127.0.0.1:{port}", dashboard_url=f"http://127.0.0.1:{dash_port}",
                         temp_dir=temp_dir)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            message = f"ray start --head exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            cluster.shutdown()
            raise RuntimeError(message)
        try:
            if len(cluster.alive_nodes()) == 1:
                return cluster
        except Exception:  # dashboard not answering yet
            pass
        time.sleep(1)
    cluster.shutdown()
    raise TimeoutError(f"Ray head did not come up in {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


def start_worker(
    cluster: RayCluster,
    num_cpus: int = 1,
    resources: dict[str, float] | None = None,
    *,
    name: str = "worker",
    object_store_mb: int = 150,
    env: dict[str, str] | None = None,
) -> RayNode:
    """``ray start --address=<head> --block`` as another node on this machine (not yet waited for).

    Each node has a temp dir of its own, as a node on its own machine has: nodes that share one
    pick their socket names (``sockets/raylet.N``, ``sockets/plasma_store.N``) by counting what is
    there, so two starting at once took the same names and one raylet died with "bind: Address
    already in use" (a worker restarted 30 s later, or a head left without its nodes). So each node
    also runs its own log monitor, which streams its workers' output to the drivers."""
    temp_dir = cluster.temp_dir / name  # (short: Unix socket paths under it must stay < ~107 bytes)
    temp_dir.mkdir(exist_ok=True)
    args = [
        *RAY_CMD, "start", "--block", f"--address={cluster.gcs_address}", "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={object_store_mb * 1024 * 1024}",
        "--disable-usage-stats", f"--temp-dir={temp_dir}", *_node_ports(),
    ]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    log_path = cluster.temp_dir / f"{name}.log"
    return RayNode(name, _popen(args, log_path, env), log_path, resources or {}, num_cpus)


def job_runtime_env_vars() -> dict[str, str]:
    """Environment a job driver on a test cluster is given: offline hubs, no auth, where the S3 store is.

    Never credentials: a runtime env is shown to anyone who opens the dashboard. The nodes have the S3
    test server's (fake) keys in their own environment, inherited when ``ray start`` ran, as a node
    with an instance role would; jobs find them through the standard AWS chain there."""
    from umaf import storage

    return {**{k: v for k, v in NODE_ENV.items() if not k.startswith("RAY_health")}, **storage.forwarded_env()}


def wait_for_driver(proc: subprocess.Popen, log_path: Path, timeout: float, what: str = "job") -> str:
    """Wait for a driver started as a subprocess (killed past ``timeout``), assert it exited 0 and
    return its log (the log's tail is the failure message otherwise)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log = log_path.read_text(errors="replace")
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{log[-8000:]}"
    return log


TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


def submit_and_wait(client, entrypoint: str, runtime_env: dict, timeout: float, **submit_kw) -> tuple[str, str, str]:
    """Submit a job and wait for a terminal state; returns ``(submission_id, status, logs)``.

    Past ``timeout`` the job is stopped and the test fails with the job's logs, so a slow job never
    runs into pytest's own timeout (which would show nothing of what the job was doing)."""
    import pytest

    submission_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, **submit_kw)
    deadline = time.time() + timeout
    status = str(client.get_job_status(submission_id).value)
    while status not in TERMINAL_JOB_STATES and time.time() < deadline:
        time.sleep(1)
        status = str(client.get_job_status(submission_id).value)
    logs = client.get_job_logs(submission_id)
    if status not in TERMINAL_JOB_STATES:
        client.stop_job(submission_id)
        pytest.fail(f"job {submission_id} still {status} after {timeout:.0f}s (stopped);\n"
                    f"entrypoint: {entrypoint}\n--- logs (tail) ---\n{logs[-6000:]}")
    return submission_id, status, logs
