"""jobs/pipeline.py without Ray: stage order, each stage's command line, up-front validation, skip rules.

The stages running for real (through the Jobs API, and skipping over finished outputs) are in
tests/test_e2e_jobs.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from umaf import storage
from umaf.config import load_config
from umaf.pipeline import PipelineConfig, stage_argv, stage_config, stage_done, stage_uris

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_pipeline_job():
    spec = importlib.util.spec_from_file_location("umaf_job_pipeline_test", REPO_ROOT / "jobs" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pipeline_config(*overrides: str) -> PipelineConfig:
    return load_config(PipelineConfig, "pipeline", overrides=list(overrides))


def test_stages_run_in_pipeline_order_whatever_order_they_are_named():
    assert pipeline_config("stages=tune,caption").stages == ["caption", "tune"]
    assert pipeline_config().stages == ["prepare", "caption", "train", "predict", "tune"]


def test_unknown_stage_and_bad_stage_keys_stop_before_any_work(tmp_path, capsys):
    job = load_pipeline_job()
    with pytest.raises(SystemExit) as exc:
        job.main(["--out", str(tmp_path), "--stages", "prepare,captions"])
    assert exc.value.code == 2
    assert "unknown stage(s) ['captions']" in capsys.readouterr().err
    # A bad key in a later stage is reported before the first stage runs (no manifest written).
    with pytest.raises(SystemExit) as exc:
        job.main(["--out", str(tmp_path), "train.overrides=[epochs=zero]"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "jobs/train.py" in err and "epochs" in err
    assert not (tmp_path / "manifest").exists()


def test_each_stage_reads_what_the_previous_one_wrote(tmp_path):
    cfg = pipeline_config(f"out={tmp_path}", "task=sentiment", "train.name=r1", "train.overrides=[epochs=3]")
    uris = stage_uris(cfg)
    flags = {stage: load_job_flags(stage) for stage in cfg.stages}
    prepare = stage_config("prepare", stage_argv(cfg, "prepare"), flags["prepare"])
    caption = stage_config("caption", stage_argv(cfg, "caption"), flags["caption"])
    train = stage_config("train", stage_argv(cfg, "train"), flags["train"])
    predict = stage_config("predict", stage_argv(cfg, "predict"), flags["predict"])
    tune = stage_config("tune", stage_argv(cfg, "tune"), flags["tune"])
    assert prepare.out == caption.manifest == train.manifest == predict.manifest == tune.manifest == uris["manifest"]
    assert caption.out == train.captions == predict.captions == tune.captions == uris["captions"]
    assert predict.run == train.out and predict.out == str(tmp_path / "predictions" / "r1")
    assert predict.splits == ["test"]  # the tiny preset: the demo's test split
    assert train.out == str(tmp_path / "runs" / "r1") and train.epochs == 3 and train.task == "sentiment"
    assert tune.out == str(tmp_path / "sweeps") and tune.task == "sentiment"


def load_job_flags(stage: str):
    spec = importlib.util.spec_from_file_location(f"umaf_job_{stage}_flags", REPO_ROOT / "jobs" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FLAGS


def test_finished_outputs_are_skipped_and_unfinished_ones_are_not(tmp_path):
    cfg = pipeline_config(f"out={tmp_path}")
    flags = {stage: load_job_flags(stage) for stage in cfg.stages}
    configs = {stage: stage_config(stage, stage_argv(cfg, stage), flags[stage]) for stage in cfg.stages}
    assert all(stage_done(cfg, stage, configs[stage]) is None for stage in cfg.stages)

    (tmp_path / "manifest").mkdir()
    pq.write_table(pa.table({"id": ["a"]}), str(tmp_path / "manifest" / "part-0.parquet"))
    run = Path(configs["train"].out)
    run.mkdir(parents=True)
    (run / "checkpoint_000000").mkdir()  # a run with checkpoints but no metrics.json is unfinished
    assert stage_done(cfg, "train", configs["train"]) is None
    storage.write_json_atomic(str(run / "metrics.json"), {"test": {}})
    sweep = Path(configs["tune"].out) / configs["tune"].name
    sweep.mkdir(parents=True)
    pq.write_table(pa.table({"trial": ["t0"]}), str(sweep / "results.parquet"))

    assert "manifest exists" in stage_done(cfg, "prepare", configs["prepare"])
    assert "metrics.json" in stage_done(cfg, "train", configs["train"])
    assert "results.parquet" in stage_done(cfg, "tune", configs["tune"])
    assert stage_done(cfg, "caption", configs["caption"]) is None  # the caption job skips done ids itself
    assert stage_done(cfg, "predict", configs["predict"]) is None  # so does the predict job
