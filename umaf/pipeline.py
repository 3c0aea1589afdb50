"""The whole chain prepare → caption → train → predict → tune as one job, each stage skipping what is done.

``jobs/pipeline.py`` is thin wiring around this module: here live the config (:class:`PipelineConfig`),
where each stage reads and writes (:func:`stage_uris`), the command line each stage's job gets
(:func:`stage_argv`), and whether a stage's output already holds its work (:func:`stage_done`). The
stages themselves are the ordinary jobs, called in-process through their ``main(argv)``, so one Ray
cluster serves all of them and every stage behaves exactly as when run alone.

Layout under ``out`` (a local folder or ``s3://bucket/prefix``)::

    <out>/manifest/                 prepare   (+ images/ and reference_captions/ for the demo set)
    <out>/captions/                 caption   (the caption job skips ids already captioned)
    <out>/runs/<train.name>/        train     (skipped once metrics.json exists)
    <out>/predictions/<train.name>/ predict   (the run on the manifest's test split; the predict job
                                               skips ids already predicted)
    <out>/sweeps/<sweep name>/      tune      (skipped once results.parquet exists)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from umaf import storage
from umaf.config import ConfigError, PathOrUri, RayConfig, StorageConfig, StrictModel, comma_separated

Stage = Literal["prepare", "caption", "train", "predict", "tune"]
STAGES: tuple[Stage, ...] = ("prepare", "caption", "train", "predict", "tune")


class StageOptions(StrictModel):
    """How one stage's job is configured: its own preset plus extra arguments."""

    preset: str = Field("tiny", description="the stage job's preset (configs/<job>/<preset>.yaml)")
    overrides: list[str] = Field(
        default_factory=list,
        description="extra arguments for the stage job: key=value overrides and its named flags "
        "(e.g. prepare.overrides='[--format=msed, --source=/data/msed]')",
    )


class TrainStageOptions(StageOptions):
    name: str = Field("train", description="run folder name under <out>/runs/")


class PipelineConfig(StrictModel):
    """``jobs/pipeline.py``: run prepare → caption → train → predict → tune on one dataset into one folder."""

    out: PathOrUri = Field("./outputs/pipeline", description="root of every stage's output (local folder or s3://)")
    stages: list[Stage] = Field(
        default_factory=lambda: list(STAGES), description="stages to run, in pipeline order (e.g. --stages caption,train)"
    )
    model: Literal["umaf", "sppscl"] = Field("umaf", description="method trained and swept")
    task: str | None = Field(None, description="label task (column label_<task>); None: the manifest's first task")
    prepare: StageOptions = Field(default_factory=StageOptions)
    caption: StageOptions = Field(default_factory=StageOptions)
    train: TrainStageOptions = Field(default_factory=TrainStageOptions)
    predict: StageOptions = Field(default_factory=StageOptions)
    tune: StageOptions = Field(default_factory=StageOptions)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("stages", mode="before")
    @classmethod
    def _split_stages(cls, value: Any) -> Any:
        value = comma_separated(value)  # --stages caption,train
        if isinstance(value, list):
            unknown = [s for s in value if s not in STAGES]
            if unknown:
                raise ValueError(f"unknown stage(s) {unknown}: choose from {', '.join(STAGES)}")
            # Always run in pipeline order, whatever order they were named in.
            value = [s for s in STAGES if s in value]
        return value

    @property
    def storage_kw(self) -> dict[str, Any]:
        return {"endpoint_url": self.storage.endpoint_url, "region": self.storage.region}


def stage_uris(cfg: PipelineConfig) -> dict[str, str]:
    """Where each stage reads and writes under ``cfg.out``."""
    out = cfg.out
    return {
        "manifest": storage.join(out, "manifest"),
        "captions": storage.join(out, "captions"),
        "train": storage.join(out, "runs", cfg.train.name),
        "predictions": storage.join(out, "predictions", cfg.train.name),
        "sweeps": storage.join(out, "sweeps"),
    }


def _common(cfg: PipelineConfig) -> list[str]:
    args = []
    if cfg.storage.endpoint_url:
        args.append(f"storage.endpoint_url={cfg.storage.endpoint_url}")
    if cfg.storage.region:
        args.append(f"storage.region={cfg.storage.region}")
    return args


def stage_argv(cfg: PipelineConfig, stage: Stage) -> list[str]:
    """The command line the stage's ``jobs/<stage>.py`` gets: its preset, the pipeline's paths, then the
    stage's own overrides (last, so they win)."""
    uris = stage_uris(cfg)
    options: StageOptions = getattr(cfg, stage)
    argv = ["--preset", options.preset]
    if stage == "prepare":
        argv += ["--out", uris["manifest"]]
    elif stage == "caption":
        argv += ["--manifest", uris["manifest"], "--out", uris["captions"]]
    elif stage == "predict":
        # The run's own captions policy and tokenisation come from the run; captions for UMAF runs
        # (a text-only or SPP-SCL run ignores them).
        argv += ["--run", uris["train"], "--manifest", uris["manifest"], "--captions", uris["captions"],
                 "--out", uris["predictions"]]
    else:
        argv += ["--model", cfg.model, "--manifest", uris["manifest"], "--captions", uris["captions"]]
        if cfg.task:
            argv += ["--task", cfg.task]
        argv += ["--out", uris["train"] if stage == "train" else uris["sweeps"]]
    return argv + _common(cfg) + list(options.overrides)


def stage_config(stage: Stage, argv: list[str], flags: list) -> Any:
    """The stage job's validated config for ``argv``, parsed exactly as its ``main(argv)`` parses it
    (``flags``: the job's named flags, ``jobs/<stage>.py``'s ``FLAGS``).

    Used to check every stage's settings before the first stage runs, and to find a stage's outputs
    (e.g. the sweep name). A bad key exits with status 2 and a message naming the job and the field,
    as the job itself would.
    """
    import sys

    from umaf.caption.config import CaptionConfig
    from umaf.cli import parse_job_args
    from umaf.data.config import PrepareConfig
    from umaf.predict.config import PredictConfig
    from umaf.train.config import TrainConfig
    from umaf.tune.config import TuneConfig

    models = {"prepare": PrepareConfig, "caption": CaptionConfig, "train": TrainConfig, "predict": PredictConfig,
              "tune": TuneConfig}
    config = parse_job_args(stage, models[stage], argv, flags=flags).config
    if stage == "tune":
        try:
            config.base_train_config()
        except ConfigError as exc:
            print(f"jobs/tune.py: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return config


def stage_done(cfg: PipelineConfig, stage: Stage, stage_cfg: Any) -> str | None:
    """Why ``stage`` has nothing left to do (its output already holds the work), or None to run it.

    The caption and predict stages are never skipped here: their jobs skip ids already done, so
    re-running them is cheap and also picks up rows added to the manifest since.
    """
    kw = cfg.storage_kw
    if stage == "prepare":
        uri = stage_cfg.out
        return f"manifest exists at {uri}" if storage.exists(uri, **kw) else None
    if stage == "train":
        uri = storage.join(stage_cfg.out, "metrics.json")
        return f"finished run: {uri} exists" if storage.exists(uri, **kw) else None
    if stage == "tune":
        uri = storage.join(stage_cfg.out, stage_cfg.name, "results.parquet")
        return f"finished sweep: {uri} exists" if storage.exists(uri, **kw) else None
    return None


def stage_output(stage: Stage, stage_cfg: Any) -> str:
    """Where the stage's job writes (the folder a user opens afterwards)."""
    if stage == "tune":
        return storage.join(stage_cfg.out, stage_cfg.name)
    return stage_cfg.out


def stage_summary(stage: Stage, result: Any) -> dict[str, Any]:
    """A few JSON-able facts from a stage job's return value, for the pipeline's summary; ``rows`` is
    how much the stage handled (pairs prepared / captioned / trained on, trials run)."""
    if not isinstance(result, dict):
        return {}
    if stage == "prepare":
        return {"dataset": result.get("dataset"), "manifest": result.get("manifest"),
                "rows": (result.get("counts") or {}).get("total")}
    if stage == "caption":
        return {"rows": result.get("captioned"),
                **{k: result[k] for k in ("selected", "skipped", "captioned", "this_run", "dataset_status") if k in result}}
    if stage == "predict":
        return {"rows": result.get("predicted"),
                **{k: result[k] for k in ("selected", "skipped", "this_run", "metrics") if k in result}}
    if stage == "train":
        test = result.get("test", {})
        used = ((result.get("data") or {}).get("rows_used") or {})
        return {"rows": sum(used.values()) if used else None, "best_epoch": result.get("best_epoch"),
                "test_accuracy": test.get("accuracy"), "test_weighted_f1": test.get("weighted_f1"),
                "test_macro_f1": test.get("macro_f1"), "test_f1_of_weighted_pr": test.get("f1_of_weighted_pr")}
    facts = {k: v for k, v in result.items() if k not in ("rows", "summary") and isinstance(v, (str, int, float))}
    return {"rows": len(result.get("rows") or []), **facts}


def _outcome(stage: str, facts: dict[str, Any]) -> str:
    if facts.get("status") == "skipped":
        return facts.get("reason", "")
    if stage == "caption" and facts.get("this_run"):
        return ", ".join(f"{status} {n}" for status, n in facts["this_run"].items())
    if stage == "train" and facts.get("test_weighted_f1") is not None:
        best = facts.get("best_epoch")
        return (f"best epoch {best + 1 if isinstance(best, int) else '?'}: test acc {facts['test_accuracy']:.3f}, "
                f"weighted F1 {facts['test_weighted_f1']:.3f}, macro F1 {_num(facts.get('test_macro_f1'))}, "
                f"F1 of weighted P/R {_num(facts.get('test_f1_of_weighted_pr'))}")
    if stage == "predict" and facts.get("metrics"):
        return "; ".join(f"{split}: acc {m['accuracy']:.3f}, weighted F1 {m['weighted_f1']:.3f}, macro F1 "
                         f"{_num(m.get('macro_f1'))}, F1 of weighted P/R {_num(m.get('f1_of_weighted_pr'))}"
                         for split, m in facts["metrics"].items() if m.get("n"))
    if stage == "tune" and facts.get("best_config"):
        return f"best config: {facts['best_config']}"
    return ""


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "?"


def summary_table(summary: dict[str, Any]) -> str:
    """The closing table of a pipeline run: stage, status, rows, seconds, output, outcome."""
    header = ("stage", "status", "rows", "seconds", "output", "outcome")
    lines = [header]
    for stage, facts in summary["stages"].items():
        rows = facts.get("rows")
        lines.append((stage, facts.get("status", ""), "" if rows is None else str(rows),
                      f"{facts['seconds']:.0f}" if "seconds" in facts else "", facts.get("output", ""),
                      _outcome(stage, facts)))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in lines)
