"""The papers' published figures: one YAML file per paper under ``configs/experiment/published/``.

Each table records where its figures come from (the table's caption), its unit, and per column the
dataset and the metric it reports, in our metric names (``accuracy``, ``weighted_f1``, ``macro_f1``,
``f1_of_weighted_pr``, ``weighted_precision``, ``weighted_recall``). An experiment row points at a
table and a row (``published: {table: table4, row: "UMAF Full (K=10)"}``); the report shows the
figures of the columns on that cell's dataset beside ours, with the difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from umaf.config import ConfigError, StrictModel, config_dir, read_yaml

MetricName = Literal["accuracy", "weighted_f1", "macro_f1", "f1_of_weighted_pr", "weighted_precision",
                     "weighted_recall", "macro_precision", "macro_recall"]


class PublishedColumn(StrictModel):
    dataset: str = Field(..., description="dataset id (an experiment dataset's key or published_as)")
    metric: MetricName


class PublishedTable(StrictModel):
    title: str = Field(..., description="the table's caption as printed")
    unit: Literal["percent", "fraction"] = "percent"
    note: str = Field("", description="what the paper leaves unsaid about these figures")
    columns: dict[str, PublishedColumn]
    rows: dict[str, dict[str, float | None]]

    @model_validator(mode="after")
    def _known_columns(self) -> PublishedTable:
        for row, values in self.rows.items():
            unknown = sorted(set(values) - set(self.columns))
            if unknown:
                raise ValueError(f"row {row!r} has figures for unknown columns {unknown}")
        return self


class PublishedPaper(StrictModel):
    paper: str = Field(..., description="title of the paper")
    source: str = Field("", description="where the figures were read (file, version)")
    tables: dict[str, PublishedTable]


def published_dir() -> Path:
    return config_dir() / "experiment" / "published"


def load_paper(name: str) -> PublishedPaper:
    path = published_dir() / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in published_dir().glob("*.yaml"))
        raise ConfigError(f"no published figures {name!r}: no file {path} (available: {', '.join(available) or 'none'})")
    try:
        return PublishedPaper.model_validate(read_yaml(path))
    except ValueError as exc:
        raise ConfigError(f"published figures {path}: {exc}") from None


def figures_for(refs, default_paper: str | None, dataset: str) -> list[dict[str, Any]]:
    """The published figures of a row (``refs``: its :class:`~umaf.experiment.config.PublishedRef` list)
    on one dataset: ``[{source, column, metric, value (in %), note}]``; empty where no paper has any."""
    return [figure for ref in refs or [] for figure in _figures(ref, default_paper, dataset)]


def _figures(ref, default_paper: str | None, dataset: str) -> list[dict[str, Any]]:
    paper_name = ref.paper or default_paper
    if paper_name is None:
        raise ConfigError(f"row published ref {ref.table}/{ref.row} names no paper: set `published: <paper>`")
    paper = load_paper(paper_name)
    table = paper.tables.get(ref.table)
    if table is None:
        raise ConfigError(f"published figures {paper_name!r} have no table {ref.table!r} "
                          f"(tables: {', '.join(paper.tables)})")
    values = table.rows.get(ref.row)
    if values is None:
        raise ConfigError(f"published {paper_name} {ref.table} has no row {ref.row!r} (rows: {', '.join(table.rows)})")
    scale = 100.0 if table.unit == "fraction" else 1.0
    out = []
    for column, spec in table.columns.items():
        if spec.dataset != dataset or values.get(column) is None:
            continue
        out.append({"source": f"{paper_name} {table.title.split(':')[0]}, row {ref.row!r}, column {column!r}",
                    "ref": f"{paper_name} {table.title.split(':')[0]}, {ref.row}",
                    "column": column, "metric": spec.metric, "value": round(float(values[column]) * scale, 4),
                    "note": table.note})
    return out


def check_refs(cfg) -> None:
    """Every row's published ref resolves (an ExperimentConfig), before any work."""
    for name, row in cfg.rows.items():
        if row.published:
            try:
                for dataset in cfg.datasets:
                    figures_for(row.published, cfg.published, cfg.datasets[dataset].published_as or dataset)
            except ConfigError as exc:
                raise ConfigError(f"rows.{name}.published: {exc}") from None
