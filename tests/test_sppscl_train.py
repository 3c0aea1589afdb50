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

import pytest

from conftest import REPO_ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from umaf.data.demo import write_demo

    return write_demo(str(tmp_path_factory.mktemp("sppscl-demo")), n_train=160, n_dev=45, n_test=45)


def _args(demo: dict[str, str], out: Path, *overrides: str) -> list[str]:
    return ["--model", "sppscl", "--manifest", demo["manifest"], "--out", str(out), "ray.include_dashboard=false",
            "eval_batch_size=45", *overrides]


def test_uncached_run_killed_then_resumed_beats_baseline(ray_cluster, demo, tmp_path: Path) -> None:
    """The uncached path (frozen encoders run in every step): the driver is killed after the first
    checkpoint, the rerun with the same --out resumes from it and finishes above the baseline."""
    from jobs.train import main

    out = tmp_path / "runs" / "uncached"
    args = _args(demo, out, "sppscl.feature_cache=off", "epochs=5")
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "jobs" / "train.py"), *args, f"ray.address={address}"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and not list(out.glob("checkpoint_*")):
            assert proc.poll() is None, f"training exited before its first checkpoint: {proc.stderr.read().decode()[-3000:]}"
            time.sleep(0.5)
        assert list(out.glob("checkpoint_*")), "no checkpoint within 400 s"
    finally:
        proc.kill()  # the driver dies mid-run (SIGKILL: no cleanup)
        proc.wait()
    assert not (out / "metrics.json").exists()

    metrics = main(args)
    assert metrics["model"] == "sppscl"
    assert metrics["resumed_from_epoch"] is not None and metrics["resumed_from_epoch"] >= 1
    for metric in ("accuracy", "weighted_f1", "macro_f1"):
        assert metrics["test"][metric] > metrics["majority_baseline"]["test"][metric], metric
    assert not (tmp_path / "runs" / "feature_cache").exists()  # uncached: no features stored


def test_cached_run_beats_baseline_and_writes_diagnostics(ray_cluster, demo, tmp_path: Path) -> None:
    from jobs.train import main
    from umaf.train.feature_cache import SUCCESS_FILE, load_or_build

    out = tmp_path / "runs" / "cached"
    metrics = main(_args(demo, out, "epochs=4"))
    for metric in ("accuracy", "weighted_f1", "macro_f1"):
        assert metrics["test"][metric] > metrics["majority_baseline"]["test"][metric], metric

    # The features of every split were computed once, next to the run folder.
    cache = tmp_path / "runs" / "feature_cache"
    done = sorted(p.parent.name for p in cache.glob(f"*/*/{SUCCESS_FILE}"))
    assert done == ["dev", "test", "train"]
    meta = json.loads(next(cache.glob(f"*/test/{SUCCESS_FILE}")).read_text())
    assert meta["rows"] == 45 and meta["image_encoder"] == "tiny-random-resnet"

    # A second run/trial on the same rows and encoders reads them back instead of recomputing.
    import ray.data

    from umaf.data.manifest import read_manifest

    test_rows = read_manifest(demo["manifest"]).split("test")
    ds = ray.data.from_arrow(test_rows.append_column("label", test_rows["label_sentiment"]))
    cached, info = load_or_build(ds, cache_dir=str(cache), split="test", image_encoder="tiny-random-resnet",
                                 text_encoder="tiny-random-bert", image_size=64, max_length=32, storage_kw={})
    assert info["hit"] and cached.count() == 45

    # Diagnostics (paper Fig. 1/4 and 3) in the run folder and in metrics.json.
    distances = json.loads((out / "diagnostics" / "distances.json").read_text())
    for split in ("dev", "test"):
        assert set(distances[split]) == {"negative", "neutral", "positive", "all"}
        assert all(distances[split]["all"][k] > 0 for k in ("IID", "TTD", "ITD"))
    assert (out / "diagnostics" / "tsne_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["method"]["distances"]["test"]["all"]["n"] == 45
