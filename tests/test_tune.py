"""jobs/tune.py: search-space validation (pure) and real sweeps on a local Ray cluster.

The integration tests run the `tiny` presets on the demo dataset: 4 UMAF trials over K x lambda
(a driver killed midway, then `--resume`) and 4 SPP-SCL trials over alpha x tau, with ASHA.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import job_main
from umaf.config import ConfigError, load_config
from umaf.tune.config import TuneConfig
from umaf.tune.space import Distribution, SearchConfig, resolve_space

REPO = Path(__file__).resolve().parent.parent

# Small and quick: 2 epochs (ASHA's only rung is after epoch 1), 1 worker per trial, 2 at a time.
QUICK = ["train.epochs=2", "train.max_rows_per_split=96", "max_concurrent_trials=2", "scheduler.reduction_factor=4"]


# ------------------------------------------------------------------------------------------
# Pure pieces


def test_distribution_needs_exactly_one_kind():
    assert Distribution(grid=[1, 2]).kind == "grid"
    with pytest.raises(ValueError, match="exactly one"):
        Distribution(grid=[1], choice=[2])
    with pytest.raises(ValueError, match="low < high"):
        Distribution(uniform=(0.5, 0.1))
    with pytest.raises(ValueError, match="low > 0"):
        Distribution(loguniform=(0.0, 1.0))


def test_paper_symbols_resolve_per_method():
    space = {"K": Distribution(grid=[5, 10]), "lambda": Distribution(choice=[0.1]), "tau": Distribution(grid=[0.1])}
    assert set(resolve_space("umaf", space)) == {"umaf.top_k", "umaf.uniformity_weight", "umaf.uniformity_tau"}
    sppscl = {"alpha": Distribution(grid=[1 / 3, 1.0]), "lambda": Distribution(grid=[5, 10])}
    assert set(resolve_space("sppscl", sppscl)) == {"sppscl.alpha", "sppscl.ce_weight"}
    with pytest.raises(ValueError, match="twice"):
        resolve_space("umaf", {"K": Distribution(grid=[1]), "umaf.top_k": Distribution(grid=[2])})


def test_optuna_rejects_grid_values():
    with pytest.raises(ValueError, match="choice instead of grid"):
        SearchConfig(algorithm="optuna", space={"lr": Distribution(grid=[1e-4])})


def test_bad_sweep_settings_fail_before_any_work():
    cfg = load_config(TuneConfig, "tune", overrides=["search.space.nonsense={grid: [1]}"])
    with pytest.raises(ConfigError, match="not a training key"):
        cfg.base_train_config()
    cfg = load_config(TuneConfig, "tune", overrides=["train.epochz=3"])
    with pytest.raises(ConfigError, match="epochz"):
        cfg.base_train_config()
    result = subprocess.run([sys.executable, "jobs/tune.py", "search.space.K.grid=[]"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "search.space.K" in result.stderr and "at least one value" in result.stderr


def test_trial_config_applies_swept_values_and_resources():
    cfg = load_config(TuneConfig, "tune", overrides=["resources.gpus_per_worker=0.25", "resources.num_workers=2"])
    base = cfg.base_train_config()
    assert base.use_gpu and base.gpus_per_worker == 0.25 and base.num_workers == 2
    from umaf.tune.sweep import trial_train_config

    trial = trial_train_config(base.model_dump(mode="json"), {"umaf.top_k": 3, "umaf.uniformity_weight": 0.7}, "/tmp/x")
    assert (trial.umaf.top_k, trial.umaf.uniformity_weight, trial.out) == (3, 0.7, "/tmp/x")
    assert trial.lr == base.lr  # everything else is the base config


def test_results_table_and_plot():
    from umaf.tune.sweep import markdown_table, plot_dev_metric

    rows = [
        {"K": 2, "lambda": 0.0, "trial_id": "a", "status": "completed", "epochs": 3, "best_dev_weighted_f1": 0.8,
         "error": None, "run_uri": "r/a", "checkpoint_uri": "r/a/best", "test_weighted_f1": 0.7},
        {"K": 10, "lambda": 0.5, "trial_id": "b", "status": "stopped_early", "epochs": 1, "best_dev_weighted_f1": 0.5,
         "error": None, "run_uri": "r/b", "checkpoint_uri": "r/b/best", "test_weighted_f1": 0.4},
    ]
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| K | lambda | trial_id | status")
    assert "| 10 | 0.5 | b | stopped_early | 1 | 0.5 |" in table
    png = plot_dev_metric(rows, ["K", "lambda"], "best_dev_weighted_f1")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# ------------------------------------------------------------------------------------------
# Real sweeps


def _finished_trials(runs: Path) -> set[str]:
    return {p.parent.name for p in runs.glob("*/metrics.json")}


@pytest.mark.slow
def test_umaf_sweep_survives_a_killed_driver_and_resumes(ray_cluster, tmp_path: Path):
    """4 UMAF trials over K x lambda: the driver is SIGKILLed once a trial has finished, `--resume`
    finishes the sweep without rerunning that trial, ASHA stops at least one trial early, and the
    best config trains with jobs/train.py."""
    out = tmp_path / "sweeps"
    args = ["--out", str(out), *QUICK]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "wb")
    # The first driver joins the test's cluster, as `ray job submit` drivers join theirs; SIGKILL
    # takes it (and so its Tune task, trials and Train runs) down as a crash or OOM kill would.
    address = ray_cluster.get_runtime_context().gcs_address
    first = subprocess.Popen([sys.executable, "jobs/tune.py", *args, f"ray.address={address}"], cwd=REPO, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    runs = out / "tiny-umaf" / "runs"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and not _finished_trials(runs) and first.poll() is None:
            time.sleep(2)
        assert first.poll() is None, "the sweep ended before it could be killed: " + (tmp_path / "first.log").read_text()[-3000:]
        assert _finished_trials(runs), "no trial finished within 10 minutes"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished_before = _finished_trials(runs)
    stamps = {t: (runs / t / "metrics.json").stat().st_mtime_ns for t in finished_before}
    print(f"killed the sweep driver (pid {first.pid}) after trials {sorted(finished_before)} finished")

    result = job_main("tune")([*args, "--resume"])
    rows = result["rows"]
    assert len(rows) == 4
    assert {(r["K"], r["lambda"]) for r in rows} == {(2, 0.0), (2, 0.5), (10, 0.0), (10, 0.5)}
    # Finished trials were not rerun: their results are untouched.
    for trial in finished_before:
        assert (runs / trial / "metrics.json").stat().st_mtime_ns == stamps[trial], f"trial {trial} ran again"
    statuses = [r["status"] for r in rows]
    assert "failed" not in statuses, rows
    assert statuses.count("stopped_early") >= 1, f"ASHA stopped no trial: {rows}"
    assert all(r["epochs"] == 2 for r in rows if r["status"] == "completed")
    assert all(r["test_weighted_f1"] is not None for r in rows)

    root = out / "tiny-umaf"
    table = pq.read_table(root / "results.parquet")
    for column in ("K", "lambda", "status", "epochs", "best_dev_weighted_f1", "test_weighted_f1", "checkpoint_uri"):
        assert column in table.column_names
    assert (root / "results.csv").read_text().startswith("K,lambda,")
    assert (root / "dev_metric_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    # Per-trial TensorBoard curves under the sweep folder.
    assert list(runs.glob("*/tensorboard/events.out.tfevents.*"))

    # The best config is a jobs/train.py config: train it (1 epoch, to keep the test short).
    best = yaml.safe_load((root / "best_config.yaml").read_text())
    assert best["umaf"]["top_k"] == rows[0]["K"] and best["umaf"]["uniformity_weight"] == rows[0]["lambda"]
    metrics = job_main("train")(["--config", str(root / "best_config.yaml"), "--out", str(tmp_path / "best-run"), "epochs=1"])
    assert metrics["test"]["weighted_f1"] > 0
    assert json.loads((tmp_path / "best-run" / "metrics.json").read_text())["epochs"] == 1


@pytest.mark.slow
def test_sppscl_sweep_over_alpha_and_tau(ray_cluster, tmp_path: Path):
    """4 SPP-SCL trials over alpha x tau; the frozen-feature cache is built once, before the trials."""
    out = tmp_path / "sweeps"
    # One epoch, no early stopping: ASHA is covered by the UMAF sweep; this one is about the trials
    # sharing one feature cache.
    result = job_main("tune")(["--preset", "tiny-sppscl", "--out", str(out), *QUICK, "train.epochs=1", "scheduler.kind=fifo"])
    rows = result["rows"]
    assert len(rows) == 4
    assert {(r["alpha"], r["tau"]) for r in rows} == {(0.3333, 0.07), (0.3333, 0.2), (1.0, 0.07), (1.0, 0.2)}
    assert all(r["status"] != "failed" for r in rows), rows
    root = out / "tiny-sppscl"
    caches = list((root / "feature_cache").rglob("_SUCCESS.json"))
    assert len(caches) == 3, f"expected one cache per split, got {caches}"
    # No trial rebuilt it: every cache marker was written before the first trial started (each
    # trial writes its config.yaml first thing).
    first_trial_start = min(p.stat().st_mtime_ns for p in (root / "runs").glob("*/config.yaml"))
    assert all(p.stat().st_mtime_ns < first_trial_start for p in caches)
    assert (root / "best_config.yaml").is_file()
