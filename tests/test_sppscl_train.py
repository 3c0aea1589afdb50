"""SPP-SCL end to end on a real local Ray cluster: `jobs/train.py --model sppscl` with the tiny preset
on the demo dataset, through the uncached path (encoders every step) and the frozen-feature cache,
resuming after the driver is killed, beating the majority-class baseline, writing diagnostics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, job_main, wait_for_killed_driver_job

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from umaf.data.demo import write_demo

    return write_demo(str(tmp_path_factory.mktemp("sppscl-demo")), n_train=160, n_dev=45, n_test=45)


def _latest_checkpoint_epoch(run: Path) -> int | None:
    """``next_epoch`` of the checkpoint Ray Train has registered (a checkpoint_* folder alone may be
    an upload in progress), or None."""
    snapshot_path = run / "checkpoint_manager_snapshot.json"
    if not snapshot_path.is_file():
        return None
    snapshot = json.loads(snapshot_path.read_text())
    if isinstance(snapshot, str):  # Ray stores the snapshot as a JSON string inside JSON
        snapshot = json.loads(snapshot)
    latest = snapshot.get("latest_checkpoint_result")
    if not latest:
        return None
    return json.loads((run / latest["checkpoint_dir_name"] / "state.json").read_text())["next_epoch"]


def _args(demo: dict[str, str], out: Path, *overrides: str) -> list[str]:
    return ["--model", "sppscl", "--manifest", demo["manifest"], "--out", str(out), "ray.include_dashboard=false",
            "eval_batch_size=45", *overrides]


def test_cached_run_killed_resumed_beats_baseline_with_diagnostics(ray_cluster, demo, tmp_path: Path) -> None:
    """The default path (frozen features cached): the driver is killed after the first checkpoint; the
    rerun with the same --out resumes from it, reuses the cache and finishes above the baseline."""
    from umaf.train.feature_cache import SUCCESS_FILE

    main = job_main("train")

    out = tmp_path / "runs" / "cached"
    args = _args(demo, out)
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = tmp_path / "killed.log"
    # A long run (cached epochs take seconds), killed once Ray Train has registered a checkpoint.
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "jobs" / "train.py"), *args, "epochs=50", f"ray.address={address}"],
                            cwd=REPO_ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.time() + 480  # generous: a loaded 2-core box starts processes slowly
    try:
        while time.time() < deadline and _latest_checkpoint_epoch(out) is None:
            assert proc.poll() is None, f"training exited before its first checkpoint: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        assert _latest_checkpoint_epoch(out) is not None, "no checkpoint reported within 480 s"
    finally:
        proc.kill()  # the driver dies mid-run (SIGKILL: no cleanup)
        proc.wait()
    # Its Train workers outlive the driver briefly and could still register a newer checkpoint.
    wait_for_killed_driver_job(address, proc.pid)
    killed_at = _latest_checkpoint_epoch(out)
    assert not (out / "metrics.json").exists()

    # The features of every split were computed once, next to the run folder, by the killed run.
    cache = tmp_path / "runs" / "feature_cache"
    first_writers = {p.parent.name: json.loads(p.read_text())["folder"] for p in cache.glob(f"*/*/{SUCCESS_FILE}")}
    assert sorted(first_writers) == ["dev", "test", "train"]

    assert killed_at is not None and killed_at < 50
    metrics = main([*args, f"epochs={max(3, killed_at + 1)}"])  # the same command, resumed
    assert metrics["model"] == "sppscl"
    assert metrics["resumed_from_epoch"] == killed_at >= 1
    for metric in ("accuracy", "weighted_f1", "macro_f1"):
        assert metrics["test"][metric] > metrics["majority_baseline"]["test"][metric], metric
    # The rerun read the cache instead of recomputing it.
    assert {p.parent.name: json.loads(p.read_text())["folder"] for p in cache.glob(f"*/*/{SUCCESS_FILE}")} == first_writers
    meta = json.loads(next(cache.glob(f"*/test/{SUCCESS_FILE}")).read_text())
    assert meta["rows"] == 45 and meta["image_encoder"] == "tiny-random-resnet"

    # Diagnostics (paper Fig. 1/4 and 3) in the run folder and in metrics.json.
    distances = json.loads((out / "diagnostics" / "distances.json").read_text())
    for split in ("dev", "test"):
        assert set(distances[split]) == {"negative", "neutral", "positive", "all"}
        assert all(distances[split]["all"][k] > 0 for k in ("IID", "TTD", "ITD"))
    assert (out / "diagnostics" / "tsne_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["method"]["distances"]["test"]["all"]["n"] == 45


def test_uncached_run_beats_baseline(ray_cluster, demo, tmp_path: Path) -> None:
    """feature_cache=off: the frozen encoders run inside every training step."""
    main = job_main("train")
    out = tmp_path / "runs" / "uncached"
    metrics = main(_args(demo, out, "sppscl.feature_cache=off", "sppscl.diagnostics=false", "epochs=3",
                         "num_workers=1"))  # (DDP: tests/test_sppscl_ddp.py)
    for metric in ("accuracy", "weighted_f1", "macro_f1"):
        assert metrics["test"][metric] > metrics["majority_baseline"]["test"][metric], metric
    assert not (tmp_path / "runs" / "feature_cache").exists()  # nothing cached
    assert metrics["method"] == {}
    # Both evaluation protocols (issue 20): the reported one's predictions under the usual names, the
    # official order's beside them, and the gap, each recomputed here from the per-pair predictions.
    import pandas as pd
    from sklearn.metrics import accuracy_score, f1_score

    assert metrics["eval"]["protocol"] == "train_context" and metrics["eval"]["context"]["training_pairs"] == metrics["eval"]["eval_batch_size"] - 1
    other = metrics["other_protocol"]
    assert other["protocol"] == "official_order"
    for name, reported in (("test.parquet", metrics["test"]), ("test.official_order.parquet", other["test"])):
        pred = pd.read_parquet(out / "predictions" / name)
        assert len(pred) == 45
        assert reported["accuracy"] == pytest.approx(accuracy_score(pred["label"], pred["pred"]))
        assert reported["weighted_f1"] == pytest.approx(f1_score(pred["label"], pred["pred"], average="weighted"))
    assert metrics["protocol_gap"]["test"]["accuracy"] == pytest.approx(other["test"]["accuracy"] - metrics["test"]["accuracy"])
    history = json.loads((out / "history.json").read_text())
    assert all(0.0 <= h["train_step2_fire_rate"] <= 1.0 for h in history) and len(history) == 3
    # The export predicts as the run evaluated: each pair among the run's training pairs only, so in any
    # grouping (here 7 at a time, in reverse) the probabilities are the run's.
    from umaf.models import load_run

    model = load_run(str(out))
    assert len(model.context_rows) == metrics["eval"]["context"]["training_pairs"]
    pred = pd.read_parquet(out / "predictions" / "test.parquet").iloc[::-1]
    manifest = pd.read_parquet(demo["manifest"]).set_index("id").loc[pred["id"]]
    probs = model.predict_proba(manifest["text"].tolist(), images=manifest["image"].tolist(), batch_size=7)
    assert np.allclose(probs, np.stack(pred["probs"].to_numpy()), atol=1e-5)
