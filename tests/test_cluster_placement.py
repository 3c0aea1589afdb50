"""Placement and autoscaling on cluster/aws.yaml's node types, on one machine.

The cluster is ``conftest.fake_aws_cluster``: a head without GPUs whose Ray autoscaler
(``fake_multinode`` provider, as ``ray.cluster_utils.AutoscalingCluster`` runs it) starts and ends
the node types of cluster/aws.yaml, with their custom resources and tiny sizes. The caption side
(replicas start caption nodes and run only there) is checked in tests/test_caption_vllm.py, on the
same cluster; here a training job's workers must start a training node, run only there (never on
the head, which has CPUs to spare, nor on a caption node), and the node must go away once idle.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_head import job_runtime_env_vars, wait_for_driver
from test_caption_vllm import node_kinds, wait_for_nodes_of

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_train_workers_start_and_use_only_training_nodes_which_then_go_away(fake_aws_cluster, tmp_path):
    cluster = fake_aws_cluster
    wait_for_nodes_of(cluster, "train_node", 0)  # from the head alone (and no training node yet)
    log_path = tmp_path / "train.log"
    env = {**os.environ, **job_runtime_env_vars()}
    env.pop("RAY_ADDRESS", None)
    # The tiny preset on CPU, with the paper presets' request: each worker asks for train_node.
    args = ["--out", str(tmp_path / "run"), "epochs=1", "max_rows_per_split=16", "batch_size=8",
            "num_workers=2", "node_resource=train_node", f"ray.address={cluster.gcs_address}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), *args], env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=str(tmp_path))
    wait_for_driver(proc, log_path, 420, "train job")

    actors = cluster.get("/api/v0/actors?limit=10000&detail=true")["data"]["result"]["result"]
    workers = [a for a in actors if "RayTrainWorker" in (a.get("class_name") or "")]
    assert len(workers) >= 2, [a.get("class_name") for a in actors]
    kinds = node_kinds(cluster)
    assert {kinds[a["node_id"]] for a in workers} == {"train_node"}, (
        "Train workers ran outside the training node type: " + str([(a["node_id"], kinds.get(a["node_id"])) for a in workers]))

    # Idle nodes go away: the training node is ended once idle (idle_timeout_minutes of the fake config).
    started = time.time()
    wait_for_nodes_of(cluster, "train_node", 0, timeout=120)
    print(f"[placement] idle training node ended {time.time() - started:.0f}s after the job")
