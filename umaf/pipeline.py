"""The whole chain prepare → caption → train → tune as one job, each stage skipping what is done.

``jobs/pipeline.py`` is thin wiring around this module: here live the config (:class:`PipelineConfig`),
where each stage reads and writes (:func:`stage_uris`), the command line each stage's job gets
(:func:`stage_argv`), and whether a stage's output already holds its work (:func:`stage_done`). The
stages themselves are the ordinary jobs, called in-process through their ``main(argv)``, so one Ray
cluster serves all of them and every stage behaves exactly as when run alone.

Layout under ``out`` (a local folder or ``s3://bucket/prefix``)::

    <out>/manifest/                 prepare   (+ images/ and reference_captions/ for the demo set)
    <out>/captions/                 caption   (the caption job skips ids already captioned)
    <out>/runs/<train.name>/        train     (skipped once metrics.json exists)
    <out>/sweeps/<sweep name>/      tune      (skipped once results.parquet exists)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from umaf import storage
from umaf.config import ConfigError, RayConfig, StorageConfig, StrictModel

Stage = Literal["prepare", "caption", "train", "tune"]
STAGES: tuple[Stage, ...] = ("prepare", "caption", "train", "tune")


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
    """``jobs/pipeline.py``: run prepare → caption → train → tune on one dataset into one folder."""

    out: str = Field("./outputs/pipeline", description="root of every stage's output (local folder or s3://)")
    stages: list[Stage] = Field(
        default_factory=lambda: list(STAGES), description="stages to run, in pipeline order (e.g. --stages caption,train)"
    )
    model: Literal["umaf", "sppscl"] = Field("umaf", description="method trained and swept")
    task: str | None = Field(None, description="label task (column label_<task>); None: the manifest's first task")
    prepare: StageOptions = Field(default_factory=StageOptions)
    caption: StageOptions = Field(default_factory=StageOptions)
    train: TrainStageOptions = Field(default_factory=TrainStageOptions)
    tune: StageOptions = Field(default_factory=StageOptions)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("stages", mode="before")
    @classmethod
    def _split_stages(cls, value: Any) -> Any:
        """``--stages caption,train`` arrives as one string."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
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
    from umaf.train.config import TrainConfig
    from umaf.tune.config import TuneConfig

    models = {"prepare": PrepareConfig, "caption": CaptionConfig, "train": TrainConfig, "tune": TuneConfig}
    argv = [a for a in argv if a != "--resume"]  # jobs/tune.py takes --resume before parsing
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

    The caption stage is never skipped here: the caption job itself skips ids already captioned, so
    re-running it is cheap and also picks up rows added to the manifest since.
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


def stage_summary(stage: Stage, result: Any) -> dict[str, Any]:
    """A few JSON-able facts from a stage job's return value, for the pipeline's summary."""
    if not isinstance(result, dict):
        return {}
    if stage == "prepare":
        return {"dataset": result.get("dataset"), "manifest": result.get("manifest"),
                "rows": (result.get("counts") or {}).get("total")}
    if stage == "caption":
        return {k: result[k] for k in ("selected", "skipped", "captioned", "this_run", "dataset_status") if k in result}
    if stage == "train":
        test = result.get("test", {})
        return {"best_epoch": result.get("best_epoch"), "test_accuracy": test.get("accuracy"),
                "test_weighted_f1": test.get("weighted_f1"), "test_macro_f1": test.get("macro_f1")}
    return {k: v for k, v in result.items() if k not in ("rows", "summary") and isinstance(v, (str, int, float))}
