"""``TuneConfig``: every key of ``jobs/tune.py``.

A sweep is a base training config (a ``jobs/train.py`` preset plus ``train:`` overrides, validated as
a :class:`~umaf.train.config.TrainConfig`) and a search space over its keys. Each trial runs that
training job with the sampled values; the best trial's full config is written as a YAML that
``jobs/train.py --config`` accepts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from umaf.config import ConfigError, PathOrUri, RayConfig, StorageConfig, StrictModel, load_config
from umaf.tune.space import SearchConfig, resolve_space


# A swept key that is not a training key: each value names a whole train preset (all its keys at once).
PRESET_KEY = "train_preset"


class SchedulerConfig(StrictModel):
    kind: Literal["asha", "fifo"] = Field("asha", description="asha: stop bad trials early; fifo: run all to the end")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2, gt=1, description="ASHA: 1/rf of the trials go on at each rung")
    max_epochs: int | None = Field(None, ge=1, description="ASHA max_t; None: the training epochs")


class TrialResources(StrictModel):
    num_workers: int | None = Field(None, ge=1, description="Ray Train workers per trial; None: the train config's")
    cpus_per_worker: float | None = Field(None, gt=0, description="None: the train config's")
    gpus_per_worker: float | None = Field(
        None, ge=0, description="fractional GPUs let several small trials share one GPU (e.g. 0.25); None: the train config's"
    )


class TuneConfig(StrictModel):
    model: Literal["umaf", "sppscl"] = Field("umaf", description="which method to sweep")
    manifest: PathOrUri | None = Field(None, description="manifest URI; None: the demo dataset under out/demo")
    captions: PathOrUri | None = Field(None, description="captions URI (UMAF); None with no manifest: the demo's reference captions")
    task: str | None = Field(None, description="label task; None: the manifest's first task")
    out: PathOrUri = Field("runs/tune", description="the sweep folder (local or s3://); rerun with --resume to continue")
    name: str = Field("sweep", description="sweep name (a folder under out)")
    resume: bool = Field(False, description="restore the sweep at <out>/<name> (Tuner.restore) and finish it")

    train_preset: str = Field("tiny", description="jobs/train.py preset the trials start from")
    train: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the train preset, as nested keys (train.epochs=4)"
    )
    search: SearchConfig = Field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: TrialResources = Field(default_factory=TrialResources)
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the cluster's resources allow")
    trial_max_failures: int = Field(1, ge=0, description="retries of a failed trial before it is recorded as failed")
    worker_start_timeout_s: float = Field(
        300, gt=0, description="a trial whose Train workers cannot be placed fails after this (no endless wait)"
    )
    metric: str | None = Field(None, description="dev metric to maximise; None: the train config's best metric")
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _check_space(self) -> TuneConfig:
        try:
            resolve_space(self.model, self.search.space)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return self

    def swept_presets(self) -> list[str]:
        """The train presets a ``search.space.train_preset`` grid/choice sweeps (UMAF's Table 3: one
        preset per row); empty when the sweep varies keys of one preset."""
        dist = self.search.space.get(PRESET_KEY)
        return [str(p) for p in (dist.grid or dist.choice or [])] if dist is not None else []

    def base_train_config(self, preset: str | None = None):
        """The trials' common TrainConfig: preset → ``train:`` overrides → the sweep's data keys.

        ``preset``: one of :meth:`swept_presets` instead of ``train_preset``. Raises
        :class:`ConfigError` naming a bad ``train.*`` key or a swept key TrainConfig lacks.
        """
        from umaf.train.config import TrainConfig

        if preset is None:
            for other in self.swept_presets():  # every swept preset must load, before any work
                self.base_train_config(other)
        preset = preset or self.train_preset
        overrides = [f"{key}={_yaml_scalar(value)}" for key, value in _flatten(self.train).items()]
        extra = {"model": self.model, "manifest": self.manifest, "captions": self.captions, "task": self.task}
        try:
            config = load_config(TrainConfig, "train", preset=preset, overrides=overrides, extra=extra)
        except ConfigError as exc:
            raise ConfigError(f"in the sweep's train settings (train_preset={preset!r}, train.*): {exc}") from None
        if self.resources.num_workers is not None:
            config.num_workers = self.resources.num_workers
        if self.resources.cpus_per_worker is not None:
            config.cpus_per_worker = self.resources.cpus_per_worker
        if self.resources.gpus_per_worker is not None:
            config.gpus_per_worker = self.resources.gpus_per_worker or None
            config.use_gpu = bool(self.resources.gpus_per_worker)
        # Every swept key must be a real training key, or the sweep would silently sweep nothing.
        for key in resolve_space(self.model, self.search.space):
            if key == PRESET_KEY:
                continue
            node: Any = config
            for part in key.split("."):
                if not hasattr(node, part) or part not in type(node).model_fields:
                    raise ConfigError(f"search.space key {key!r} is not a training key (see jobs/train.py --help)")
                node = getattr(node, part)
        return config


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _yaml_scalar(value: Any) -> str:
    import json

    return json.dumps(value) if not isinstance(value, str) else value
