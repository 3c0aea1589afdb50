"""Fault tolerance on a multi-node Ray cluster on one machine: a worker node dies mid-job.

The cluster (``ray start`` nodes, stopped by PID): a head with no CPUs — it hosts the drivers and
the GCS but no task or actor needing a CPU, so all the work runs on worker nodes — and worker nodes
with 2 CPUs each, every one tagged with a custom resource ``node_<name>`` so the test can tell which
of its processes hosts a given actor. A node is killed by SIGKILL of its whole process tree (raylet,
agents, workers), which the GCS sees as a node failure within seconds (short health checks).

(a) Captioning: the node running the VLM actor is killed after the first caption files appear; Ray
    Data restarts the actor elsewhere and retries lost work; the job ends with every manifest id
    captioned exactly once. Exactly once, not "at least once", holds within one run: Ray Data names a
    write task's files by (write id, task index), so a write task retried after its file landed
    rewrites that same file instead of adding a second one (see ``umaf/caption/store.py``).
Each victim node is frozen (SIGSTOP) the moment the test has seen what it waits for, then checked
not to have finished, then killed: the job cannot finish between the check and the kill.

(b) Training: the node running a Ray Train worker is killed after the first checkpoint; Train's
    ``FailureConfig(max_failures=1)`` restarts the worker group from the last checkpoint on the
    nodes left, and the run reaches its last epoch.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import pid_alive
from ray_head import RayCluster, RayNode, job_runtime_env_vars, start_head, wait_for_driver
from umaf import storage
from umaf.caption.store import read_captions, read_ok_captions
from umaf.data.demo import write_demo
from umaf.data.manifest import read_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs) + two worker nodes (2 CPUs each); more nodes are added by the tests as needed."""
    head = start_head(num_cpus=0)
    try:
        for _ in range(2):
            add_worker(head)
        head.wait_for_nodes(3)
        yield head
    finally:
        head.shutdown()


_WORKER_NUMBERS = itertools.count(1)


def add_worker(cluster: RayCluster) -> RayNode:
    name = f"w{next(_WORKER_NUMBERS)}"
    return cluster.add_worker(num_cpus=2, resources={f"node_{name}": 1}, name=name)


def node_of_actor(cluster: RayCluster, class_marker: str) -> RayNode | None:
    """The worker node (ours) hosting a live actor whose class name contains ``class_marker``."""
    actors = cluster.get("/api/v0/actors?limit=10000&detail=true")["data"]["result"]["result"]
    node_ids = {a["node_id"] for a in actors if class_marker in (a.get("class_name") or "")
                and a["state"] in ("ALIVE", "PENDING_CREATION") and a.get("node_id")}
    for node in cluster.alive_nodes():
        if node["node_id"] in node_ids:
            tags = [k for k in node["resources_total"] if k.startswith("node_w")]
            for worker in cluster.workers:
                if tags and tags[0] == f"node_{worker.name}":
                    return worker
    return None


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before {what}: make the run longer")
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def run_driver(job: str, args: list[str], cluster: RayCluster, log_path: Path, extra_env: dict[str, str]) -> subprocess.Popen:
    """``python jobs/<job>.py ... ray.address=<cluster>``: a driver on the head, as ``ray job submit`` would run it."""
    env = {**os.environ, **job_runtime_env_vars(), **extra_env}
    env.pop("RAY_ADDRESS", None)
    # The job's workers see extra_env too only when asked: a driver forwards no cache settings by itself.
    forward = [f"ray.forward_env=[{','.join(extra_env)}]"] if extra_env else []
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / f"{job}.py"), *args, *forward, f"ray.address={cluster.gcs_address}"],
        env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=str(log_path.parent),
    )


def kill_node(cluster: RayCluster, node: RayNode, what: str) -> None:
    print(f"[fault] killing node {node.name} ({what}); its processes:\n  " + "\n  ".join(node.describe()))
    killed = node.kill()
    # (pid_alive reads /proc once and treats a zombie or an already reaped PID as dead)
    assert not any(pid_alive(p) for p in killed), "node processes survived SIGKILL"
    cluster.workers.remove(node)
    wait_for(lambda: len(cluster.alive_nodes()) == 1 + len(cluster.workers), 60, "the GCS to mark the node dead")
    survivors = [w.name for w in cluster.workers]
    print(f"[fault] node {node.name} dead ({len(killed)} processes killed); alive: head + {survivors}")


def test_caption_job_survives_losing_the_vlm_actors_node(cluster, tmp_path, tiny_vlm_cache):
    demo = write_demo(str(tmp_path / "demo"), n_train=96, n_dev=0, n_test=0)
    ids = read_manifest(demo["manifest"]).table["id"].to_pylist()
    out = str(tmp_path / "captions")
    # Small files and longer answers: files land early while most rows are still being generated.
    args = ["--manifest", demo["manifest"], "--out", out, f"model_cache_dir={tiny_vlm_cache}", "output.rows_per_file=4",
            "actors.batch_size=4", "images.batch_size=4", "max_field_chars=48", "sampling.max_tokens=160"]
    log_path = tmp_path / "caption.log"
    driver = run_driver("caption", args, cluster, log_path, {})

    def caption_files():
        fs, path = storage.resolve(out)
        from pyarrow.fs import FileSelector

        return [i.path for i in fs.get_file_info(FileSelector(path, allow_not_found=True)) if i.path.endswith(".parquet")]

    # Find the VLM actor's node while it loads, then kill that node the moment the first files land
    # (the state API is slow on a loaded machine; the kill itself must not wait for it).
    found: dict[str, RayNode] = {}

    def actor_placed_and_files_written():
        if "victim" not in found:
            node = node_of_actor(cluster, "MapWorker")
            if node is None:
                return False
            found["victim"] = node
        return bool(caption_files())

    wait_for(actor_placed_and_files_written, 480, "the VLM actor and the first caption files", driver)
    victim = found["victim"]
    # Freeze the node first: from here its actor generates nothing, so what is counted below is what
    # the kill interrupts (the job cannot finish between this check and the kill).
    victim.freeze()
    done_before = len(read_captions(out))
    assert driver.poll() is None and done_before < len(ids), "the job finished before the node was frozen"
    kill_node(cluster, victim, f"hosts the VLM actor; {done_before}/{len(ids)} captions written")
    log = wait_for_driver(driver, log_path, 400, "the caption job, after the node kill,")

    table = read_captions(out)
    assert sorted(table["id"].to_pylist()) == sorted(ids), "every id has exactly one caption row (none lost, none duplicated)"
    statuses = table["status"].to_pylist()
    # The kill costs no row an error: rows are ok, or 'invalid' where the random-weight model ran into
    # max_tokens (its answer kept raw), exactly as without a kill.
    assert set(statuses) <= {"ok", "invalid"}, f"rows failed because of the kill: {set(statuses)}"
    ok_ids = [i for i, s in zip(table["id"].to_pylist(), statuses) if s == "ok"]
    assert sorted(read_ok_captions(out)["id"].to_pylist()) == sorted(ok_ids) and len(ok_ids) >= 0.9 * len(ids)
    moved = node_of_actor(cluster, "MapWorker")
    print(f"[fault] caption job finished: {len(ids)} ids captioned once each; "
          f"{done_before} before the kill, {len(ids) - done_before} after (VLM actor restarted on "
          f"{moved.name if moved else 'a surviving node'})")
    assert "stage=summary" in log
    add_worker(cluster)  # the cluster gets its replacement node, as an autoscaler would


def test_training_resumes_from_checkpoint_after_losing_a_workers_node(cluster, tmp_path):
    while len(cluster.workers) < 3:
        add_worker(cluster)
    cluster.wait_for_nodes(1 + len(cluster.workers))
    run = tmp_path / "run"
    epochs = 4  # enough that the first registered checkpoint is seen before the last epoch
    # 2 DDP workers of 2 CPUs each: one per worker node, and a spare node to restart on after the kill.
    args = ["--out", str(run), f"epochs={epochs}", "num_workers=2", "cpus_per_worker=2", "max_failures=1",
            "max_rows_per_split=96", "batch_size=16", "checkpoints_to_keep=2"]
    log_path = tmp_path / "train.log"
    driver = run_driver("train", args, cluster, log_path, {"UMAF_ENCODER_CACHE": str(tmp_path / "encoders")})

    def first_epochs_reported():
        # Kill only once Train has registered a checkpoint (rank 0 writes history.json just before
        # ray.train.report, so history alone could precede the checkpoint the restart resumes from).
        uri = storage.join(str(run), "history.json")
        registered = (run / "checkpoint_manager_snapshot.json").exists() and any(run.glob("checkpoint_*"))
        return registered and storage.exists(uri) and storage.read_json(uri)

    found: dict[str, RayNode] = {}

    def worker_placed_and_epoch_checkpointed():
        if "victim" not in found:
            node = node_of_actor(cluster, "RayTrainWorker")
            if node is None:
                return False
            found["victim"] = node
        return first_epochs_reported()

    wait_for(worker_placed_and_epoch_checkpointed, 480, "a Train worker and the first checkpointed epoch", driver)
    victim = found["victim"]
    # Freeze the node first: a DDP step needs both ranks, so from here no epoch completes and the run
    # cannot end between this check and the kill.
    victim.freeze()
    history = first_epochs_reported()
    assert not (run / "metrics.json").exists() and driver.poll() is None, "training ended before the node was frozen"
    assert history[-1]["epoch"] < epochs - 1, f"the last epoch was reported before the freeze: {history}"
    kill_node(cluster, victim, f"hosts a Train worker; epochs reported so far: {[h['epoch'] for h in history]}")
    wait_for_driver(driver, log_path, 450, "training, after the node kill,")

    metrics = storage.read_json(str(run / "metrics.json"))
    history = storage.read_json(str(run / "history.json"))
    print(f"[fault] training finished: resumed_from_epoch={metrics['resumed_from_epoch']}, "
          f"epochs in history={[h['epoch'] for h in history]}, best_epoch={metrics['best_epoch']}")
    assert metrics["resumed_from_epoch"] is not None and metrics["resumed_from_epoch"] >= 1, \
        "the restarted worker group loaded the last checkpoint instead of starting over"
    assert [h["epoch"] for h in history] == list(range(epochs)), "every epoch reported, in order"
    assert metrics["world_size"] == 2 and metrics["test"]["accuracy"] is not None
