"""GPU checks (issue 13): the train, caption and tune jobs on CUDA at tiny size.

Marked ``gpu`` and skipped (with the reason in the report) where torch sees no CUDA device. Run them
on every GPU machine: ``pytest -m gpu -rs``. Each job runs exactly as a user would run it, on the
session's local Ray cluster (which sees the machine's GPUs), with ``use_gpu`` / ``num_gpus`` set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import job_main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.ray,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason=f"needs a CUDA GPU (torch {torch.__version__} sees none): run on a GPU node with `pytest -m gpu`"),
]

TINY_TRAIN = ["epochs=2", "max_rows_per_split=64", "num_workers=1", "use_gpu=true", "ray.include_dashboard=false"]


def test_umaf_trains_on_the_gpu(ray_cluster, tmp_path: Path):
    out = tmp_path / "umaf"
    metrics = job_main("train")(["--out", str(out), *TINY_TRAIN])
    assert metrics["world_size"] == 1 and metrics["epochs"] == 2
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    assert all(h["train_samples_per_s"] > 0 and h["train_loss"] == h["train_loss"] for h in history)  # finite loss


def test_sppscl_builds_its_feature_cache_on_the_gpu_and_trains(ray_cluster, tmp_path: Path):
    out = tmp_path / "runs" / "sppscl"
    metrics = job_main("train")(["--model", "sppscl", "--out", str(out), *TINY_TRAIN, "sppscl.diagnostics=false"])
    assert metrics["model"] == "sppscl" and metrics["test"]["weighted_f1"] >= 0
    caches = list((tmp_path / "runs" / "feature_cache").glob("*/*/_SUCCESS.json"))
    assert sorted(p.parent.name for p in caches) == ["dev", "test", "train"]


def test_caption_hf_backend_on_the_gpu(ray_cluster, tmp_path: Path, tiny_vlm_cache: str):
    from umaf.caption.store import read_captions
    from umaf.data.demo import write_demo

    demo = write_demo(str(tmp_path / "demo"), n_train=8, n_dev=2, n_test=2)
    out = str(tmp_path / "captions")
    summary = job_main("caption")(["--manifest", demo["manifest"], "--out", out, "hf.device=cuda",
                                   "actors.num_gpus=1", f"model_cache_dir={tiny_vlm_cache}"])
    assert summary["this_run"]["error"] == 0 and summary["this_run"]["ok"] + summary["this_run"]["invalid"] == 12
    assert read_captions(out).num_rows == 12


def test_tune_trials_share_the_gpu(ray_cluster, tmp_path: Path):
    out = tmp_path / "sweeps"
    result = job_main("tune")(["--out", str(out), "train.epochs=1", "train.max_rows_per_split=64",
                               "resources.gpus_per_worker=0.5", "max_concurrent_trials=2", "scheduler.kind=fifo",
                               "search.space.lambda={grid: [0.0]}"])
    rows = result["rows"]
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
