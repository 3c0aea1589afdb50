"""``ExperimentConfig``: every key of ``jobs/experiment.py``: a paper's table as rows × datasets × seeds.

An experiment names

- ``rows``: named variants, each a train preset plus overrides (``train:``), or a test-time
  perturbation of another row's trained runs (``perturb:`` + ``of:``, the caption-reliance study);
- ``datasets``: named inputs (manifest + captions URIs, task), each optionally with its own train preset
  and overrides (SPP-SCL's per-dataset Table 2 settings);
- ``seeds``: every row × dataset is trained once per seed (``TrainConfig.seed``);
- ``reference``: the row every other row is tested against.

A cell's training config is: the row's ``train_preset`` (else the dataset's, else the experiment's)
→ the experiment's ``train:`` → the dataset's ``train:`` → the row's ``train:`` → the dataset's
manifest/captions/task and the seed. Its run folder is ``<out>/<name>/runs/<row>/<dataset>/seed<k>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from umaf.config import ConfigError, PathOrUri, RayConfig, StorageConfig, StrictModel, load_config
from umaf.tune.config import TrialResources, _flatten, _yaml_scalar

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Test-time perturbations of a trained UMAF's inputs (the caption-reliance experiment).
Perturbation = Literal["shuffle_captions", "drop_ocr", "drop_visual_scene", "drop_textimage_relation",
                       "caption_only", "text_only"]


class PublishedRef(StrictModel):
    """Where a row's published figures are: a table and row of ``configs/experiment/published/<paper>.yaml``."""

    paper: str | None = Field(None, description="published-figures file; None: the experiment's `published`")
    table: str = Field(..., description="table key in that file (e.g. table4)")
    row: str = Field(..., description="row label in that table, as the paper prints it")


class RowSpec(StrictModel):
    title: str | None = Field(None, description="name in the report; None: the row's key")
    train_preset: str | None = Field(None, description="jobs/train.py preset; None: the dataset's, else the experiment's")
    train: dict[str, Any] = Field(default_factory=dict, description="training overrides (nested keys)")
    perturb: Perturbation | None = Field(
        None, description="evaluate row `of`'s trained runs with this test-time perturbation instead of training")
    of: str | None = Field(None, description="the trained row a perturbation row evaluates")
    published: list[PublishedRef] = Field(
        default_factory=list, description="the papers' figures for this row (one ref or a list: one per paper/dataset)")

    @field_validator("published", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value or []

    @model_validator(mode="after")
    def _perturb_needs_of(self) -> RowSpec:
        if (self.perturb is None) != (self.of is None):
            raise ValueError("a perturbation row needs both `perturb` and `of` (the trained row it evaluates)")
        if self.perturb is not None and (self.train or self.train_preset):
            raise ValueError("a perturbation row trains nothing: drop its `train`/`train_preset`")
        return self


class DatasetSpec(StrictModel):
    title: str | None = Field(None, description="name in the report; None: the dataset's key")
    manifest: PathOrUri | None = Field(None, description="manifest URI; None: the demo dataset")
    captions: PathOrUri | None = Field(None, description="captions URI (UMAF with captions)")
    task: str | None = Field(None, description="label task; None: the manifest's first task")
    train_preset: str | None = Field(None, description="jobs/train.py preset for this dataset's cells")
    train: dict[str, Any] = Field(default_factory=dict, description="training overrides for this dataset")
    published_as: str | None = Field(None, description="the dataset's name in published-figures files; None: its key")


class StatisticsConfig(StrictModel):
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the bootstrap intervals")
    bootstrap_resamples: int = Field(1000, ge=1000, description="bootstrap resamples over test items (>= 1000)")
    ci_method: Literal["percentile", "basic", "BCa"] = Field("percentile", description="scipy.stats.bootstrap method")
    permutation_resamples: int = Field(9999, ge=999, description="approximate-randomisation resamples (paired F1 tests)")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level after Holm's correction")
    seed: int = Field(0, description="seed of the resampling (numpy.random.default_rng)")


class ExperimentConfig(StrictModel):
    name: str = Field("experiment", description="experiment name (a folder under out)")
    description: str = Field("", description="what the experiment is, for the report")
    out: PathOrUri = Field("runs/experiments", description="experiments folder (local or s3://)")
    resume: bool = Field(False, description="run only the missing or failed cells of <out>/<name>")
    model: Literal["umaf", "sppscl"] = Field("umaf", description="the method every row trains")
    train_preset: str = Field("tiny", description="jobs/train.py preset of rows and datasets that name none")
    train: dict[str, Any] = Field(default_factory=dict, description="training overrides for every cell")
    rows: dict[str, RowSpec] = Field(..., description="named variants, in the report's order")
    reference: str = Field(..., description="the row every other row is tested against")
    datasets: dict[str, DatasetSpec] = Field(..., description="named inputs")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="training seeds (TrainConfig.seed)")
    manifest: PathOrUri | None = Field(None, description="shorthand: the manifest of the only dataset")
    captions: PathOrUri | None = Field(None, description="shorthand: the captions of the only dataset")
    task: str | None = Field(None, description="shorthand: the task of the only dataset")
    published: str | None = Field(None, description="published-figures file: configs/experiment/published/<this>.yaml")
    statistics: StatisticsConfig = Field(default_factory=StatisticsConfig)
    resources: TrialResources = Field(default_factory=TrialResources)
    max_concurrent_cells: int | None = Field(None, ge=1, description="None: as many as the cluster's resources allow")
    cell_max_failures: int = Field(1, ge=0, description="retries of a failed cell (it resumes from its checkpoint)")
    worker_start_timeout_s: float = Field(300, gt=0, description="a cell whose workers cannot be placed fails after this")
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("rows", "datasets")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("needs at least one entry")
        bad = [k for k in value if not NAME.match(str(k))]
        if bad:
            raise ValueError(f"names {bad} must be folder names: letters, digits, and _ . + - (not first)")
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.reference not in self.rows:
            raise ValueError(f"reference {self.reference!r} is not a row: rows are {', '.join(self.rows)}")
        for name, row in self.rows.items():
            if row.of is not None:
                source = self.rows.get(row.of)
                if source is None or source.perturb is not None:
                    raise ValueError(f"rows.{name}.of={row.of!r} must name a trained row of this experiment")
                if self.model != "umaf":
                    raise ValueError(f"rows.{name}: test-time perturbations are for UMAF runs (model=umaf)")
        given = {k: getattr(self, k) for k in ("manifest", "captions", "task") if getattr(self, k) is not None}
        if given:
            if len(self.datasets) != 1:
                raise ValueError(f"{', '.join(given)} given, but the experiment has {len(self.datasets)} datasets: "
                                 f"set datasets.<name>.{next(iter(given))}=... for each")
            (key,) = self.datasets
            self.datasets[key] = self.datasets[key].model_copy(update=given)
        return self

    # ---- cells ------------------------------------------------------------------------------

    def trained_rows(self) -> list[str]:
        return [name for name, row in self.rows.items() if row.perturb is None]

    def cells(self) -> list[Cell]:
        """Every row × dataset × seed, trained rows first (a perturbation cell needs its trained cell)."""
        order = self.trained_rows() + [name for name in self.rows if name not in self.trained_rows()]
        return [Cell(row, dataset, seed) for row in order for dataset in self.datasets for seed in self.seeds]

    def cell_train_config(self, cell: Cell):
        """The TrainConfig of a trained cell (its run folder is set by the caller). Raises
        :class:`ConfigError` naming the row/dataset whose settings are wrong."""
        from umaf.train.config import TrainConfig

        row, data = self.rows[cell.row], self.datasets[cell.dataset]
        preset = row.train_preset or data.train_preset or self.train_preset
        overrides = [f"{key}={_yaml_scalar(value)}" for part in (self.train, data.train, row.train)
                     for key, value in _flatten(part).items()]
        overrides.append(f"seed={cell.seed}")
        extra = {"model": self.model, "manifest": data.manifest, "captions": data.captions, "task": data.task}
        try:
            config = load_config(TrainConfig, "train", preset=preset, overrides=overrides, extra=extra)
        except ConfigError as exc:
            raise ConfigError(f"in row {cell.row!r} on dataset {cell.dataset!r} (train preset {preset!r}): {exc}") from None
        res = self.resources
        if res.num_workers is not None:
            config.num_workers = res.num_workers
        if res.cpus_per_worker is not None:
            config.cpus_per_worker = res.cpus_per_worker
        if res.gpus_per_worker is not None:
            config.gpus_per_worker = res.gpus_per_worker or None
            config.use_gpu = bool(res.gpus_per_worker)
        return config

    def check_cells(self) -> None:
        """Every trained row × dataset config loads, before any work (one seed stands for all)."""
        for row in self.trained_rows():
            for dataset in self.datasets:
                self.cell_train_config(Cell(row, dataset, self.seeds[0]))
        for name, row in self.rows.items():
            if row.perturb is not None:
                for dataset in self.datasets:
                    source = self.cell_train_config(Cell(row.of, dataset, self.seeds[0]))
                    if not source.umaf.uses_captions:
                        raise ConfigError(f"rows.{name} perturbs the captions of row {row.of!r}, which trains without "
                                          f"them on {dataset!r} (umaf.backbone=captions and use_captions=true needed)")


@dataclass(frozen=True)
class Cell:
    row: str
    dataset: str
    seed: int

    @property
    def key(self) -> str:
        """``row/dataset/seedK``: the cell's id and its run folder under ``runs/``."""
        return f"{self.row}/{self.dataset}/seed{self.seed}"
