"""GPU checks: the train, caption and tune jobs on CUDA at tiny size, each proving it ran there.

Marked ``gpu`` and skipped (with the reason in the report) where torch sees no CUDA device. Run them
on every GPU machine: ``pytest -m gpu -rs`` (``bash bench/gpu_suite.sh OUT --with-tests`` runs them
after the GPU figures). Each job runs exactly as a user would run it, on the session's local Ray
cluster (which gets the machine's GPUs), with ``use_gpu`` / ``num_gpus`` set. A job that quietly ran
on the CPU fails here: the assertions read what the runs themselves record (the device and its peak
CUDA memory in ``metrics.json`` and ``history.json``, the cache's ``encoded_on``, the caption actor's
load line), and the sweep's trials must have been training at the same instant.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import job_main, worker_log_lines

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.ray,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason=f"needs a CUDA GPU (torch {torch.__version__} sees none): run on a GPU node with `pytest -m gpu`"),
]

TINY_TRAIN = ["epochs=2", "max_rows_per_split=64", "num_workers=1", "use_gpu=true", "ray.include_dashboard=false"]


def assert_ran_on_cuda(record: dict) -> None:
    """A run's own record (metrics.json, or one history.json epoch) says CUDA and that it allocated memory there."""
    assert str(record.get("device", "cuda")).startswith("cuda"), record.get("device")
    assert record.get("cuda_peak_memory_mib", 0) > 0, f"no CUDA memory recorded: {record.get('cuda_peak_memory_mib')}"


def test_umaf_trains_on_the_gpu(ray_cluster, tmp_path: Path):
    out = tmp_path / "umaf"
    metrics = job_main("train")(["--out", str(out), *TINY_TRAIN])
    assert metrics["world_size"] == 1 and metrics["epochs"] == 2
    assert metrics["device"].startswith("cuda ("), metrics["device"]
    assert_ran_on_cuda(metrics)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    for epoch in history:
        assert_ran_on_cuda(epoch)
        assert epoch["train_samples_per_s"] > 0 and epoch["train_loss"] == epoch["train_loss"]  # finite loss


def test_sppscl_builds_its_feature_cache_on_the_gpu_and_trains(ray_cluster, tmp_path: Path):
    out = tmp_path / "runs" / "sppscl"
    metrics = job_main("train")(["--model", "sppscl", "--out", str(out), *TINY_TRAIN, "sppscl.diagnostics=false"])
    assert metrics["model"] == "sppscl"
    assert_ran_on_cuda(metrics)
    caches = list((tmp_path / "runs" / "feature_cache").glob("*/*/_SUCCESS.json"))
    assert sorted(p.parent.name for p in caches) == ["dev", "test", "train"]
    for success in caches:
        encoded_on = json.loads(success.read_text())["encoded_on"]
        assert encoded_on and all(d.startswith("cuda (") for d in encoded_on), (success, encoded_on)


def test_caption_hf_backend_on_the_gpu(ray_cluster, ray_head_cluster, tmp_path: Path, tiny_vlm_cache: str):
    from umaf.caption.store import read_captions
    from umaf.data.demo import write_demo

    demo = write_demo(str(tmp_path / "demo"), n_train=8, n_dev=2, n_test=2)
    out = str(tmp_path / "captions")
    summary = job_main("caption")(["--manifest", demo["manifest"], "--out", out, "hf.device=cuda",
                                   "actors.num_gpus=1", f"model_cache_dir={tiny_vlm_cache}"])
    assert summary["this_run"]["error"] == 0 and summary["this_run"]["ok"] + summary["this_run"]["invalid"] == 12
    assert read_captions(out).num_rows == 12
    # The caption actor's own load line names the device its model was moved to ("... on cuda in 1.2s");
    # only an actor on the GPU writes "on cuda" (the session's other caption tests run on the CPU, and
    # tests/test_caption_pipeline.py checks that the line reaches the worker log at all).
    loaded = worker_log_lines(ray_head_cluster, "[caption stage=vlm")
    assert any(line.split(" on ")[-1].startswith("cuda in ") for line in loaded), loaded[-3:]


def test_tune_trials_share_the_gpu_at_the_same_time(ray_cluster, tmp_path: Path):
    """4 trials at 1/4 GPU each: all four must be training at one instant (from their own timestamps),
    each on CUDA. Run one after the other, their windows would not intersect and this fails."""
    out = tmp_path / "sweeps"
    # 6 epochs: each trial trains for seconds, longer than the trials' start-up spread.
    result = job_main("tune")(["--out", str(out), "train.epochs=6", "train.max_rows_per_split=512",
                               "resources.gpus_per_worker=0.25", "max_concurrent_trials=4", "scheduler.kind=fifo",
                               "search.space.K={grid: [2, 10]}", "search.space.lambda={grid: [0.0, 0.5]}"])
    rows = result["rows"]
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows), rows
    histories = [json.loads((Path(r["run_uri"]) / "history.json").read_text()) for r in rows]
    for history in histories:
        for epoch in history:
            assert_ran_on_cuda(epoch)
    latest_start = max(h[0]["train_started_at"] for h in histories)
    earliest_end = min(h[-1]["train_ended_at"] for h in histories)
    assert latest_start < earliest_end, (
        f"the 4 trials were never all training at once: last start {latest_start:.2f}, first end {earliest_end:.2f}")
