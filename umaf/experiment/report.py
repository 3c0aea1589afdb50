"""An experiment's outputs from its cells' run folders: results, summary, report.md/.tex and figures.

Everything here reads what the runs wrote (``predictions/test.parquet``, ``metrics.json``); nothing is
retrained. The statistics are :mod:`umaf.experiment.stats`; this module gathers their inputs, writes
the tables and draws the figures.
"""

from __future__ import annotations

import io
import logging
import math
import re
from typing import Any

import numpy as np
import pyarrow as pa

from umaf import storage
from umaf.experiment import stats
from umaf.experiment.config import ExperimentConfig
from umaf.experiment.published import figures_for

log = logging.getLogger("umaf.experiment")

COLUMNS = (("accuracy", "Acc"), ("weighted_f1", "Weighted F1"), ("macro_f1", "Macro F1"),
           ("f1_of_weighted_pr", "F1 (wP, wR)"))
RESULT_METRICS = (*stats.METRICS, *stats.MEAN_ONLY)
ATTENTION_SOURCES = {"text": ("text",), "caption": ("ocr", "visual_scene", "textimage_relation", "caption"),
                     "image": ("image",)}


def _kw(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}


# --------------------------------------------------------------------------------------------
# Cells → results


def collect(cfg: ExperimentConfig, errors: dict[str, str]) -> tuple[list[dict[str, Any]], list[stats.CellPredictions],
                                                                     dict[str, list[str]]]:
    """One results record per cell, the finished cells' predictions, and each dataset's label names."""
    import pyarrow.parquet as pq

    from umaf.experiment.run import METRICS_FILE, cell_uri
    from umaf.train.metrics import classification_metrics

    kw = _kw(cfg)
    records, predictions, labels = [], [], {}
    for cell in cfg.cells():
        row = cfg.rows[cell.row]
        uri = cell_uri(cfg, cell)
        record: dict[str, Any] = {"row": cell.row, "row_title": row.title or cell.row, "dataset": cell.dataset,
                                  "seed": cell.seed, "kind": row.perturb or "train", "run_uri": uri,
                                  "status": "failed", "error": None}
        metrics_uri, pred_uri = storage.join(uri, METRICS_FILE), storage.join(uri, "predictions", "test.parquet")
        if not (storage.exists(metrics_uri, **kw) and storage.exists(pred_uri, **kw)):
            source = f"{row.of}/{cell.dataset}/seed{cell.seed}" if row.of else cell.key
            record["error"] = errors.get(source) or ("its trained cell failed" if row.of and source in errors
                                                     else "did not finish (no metrics.json); --resume runs it")
            records.append(record)
            continue
        metrics = storage.read_json(metrics_uri, **kw)
        fs, path = storage.resolve(pred_uri, **kw)
        table = pq.read_table(path, filesystem=fs).to_pydict()
        names = list(metrics.get("labels") or (metrics.get("test") or {}).get("labels") or [])
        labels.setdefault(cell.dataset, names)
        y_true = np.asarray(table["label"], dtype=np.int64)
        y_pred = np.asarray(table["pred"], dtype=np.int64)
        ours = classification_metrics(y_true, y_pred, names)
        test = metrics.get("test") or {}
        record.update(status="completed", n_test=len(y_true), **{m: ours.get(m) for m in RESULT_METRICS})
        # The predictions are what the statistics use; say so if the run's own metrics.json disagrees.
        record["agrees_with_metrics_json"] = all(
            test.get(m) is None or math.isclose(test[m], ours[m], abs_tol=1e-9) for m in ("accuracy", "weighted_f1"))
        if not record["agrees_with_metrics_json"]:
            log.warning("cell %s: metrics.json test figures differ from its predictions/test.parquet", cell.key)
        record["per_class"] = [{"label": name, **{k: float(v) for k, v in ours["per_class"][name].items()}}
                               for name in names]
        record["best_epoch"] = metrics.get("best_epoch")
        record["identity_agreement"] = metrics.get("identity_agreement")
        by_source = (metrics.get("method") or {}).get("attention_by_source") or {}
        for name, sources in ATTENTION_SOURCES.items():
            shares = [by_source[s]["attention_share"] for s in sources if s in by_source]
            record[f"attention_{name}"] = float(sum(shares)) if shares else None
        records.append(record)
        predictions.append(stats.CellPredictions(cell.row, cell.dataset, cell.seed, list(table["id"]), y_true, y_pred))
    return records, predictions, labels


def summary_records(cfg: ExperimentConfig, predictions: list[stats.CellPredictions],
                    labels: dict[str, list[str]]) -> list[dict[str, Any]]:
    s = cfg.statistics
    records = stats.summarise(predictions, rows=list(cfg.rows), reference=cfg.reference, labels=labels,
                              resamples=s.bootstrap_resamples, permutation_resamples=s.permutation_resamples,
                              confidence=s.confidence, alpha=s.alpha, seed=s.seed, ci_method=s.ci_method)
    for record in records:
        row, data = cfg.rows[record["row"]], cfg.datasets[record["dataset"]]
        record["row_title"] = row.title or record["row"]
        published = figures_for(row.published, cfg.published, data.published_as or record["dataset"])
        for figure in published:
            ours = record.get(f"{figure['metric']}_mean")
            figure["ours"] = None if ours is None or math.isnan(ours) else round(100 * ours, 4)
            figure["diff"] = None if figure["ours"] is None else round(figure["ours"] - figure["value"], 4)
        record["published"] = published
    return records


# --------------------------------------------------------------------------------------------
# Tables


def _pct(value: Any, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def _cell(record: dict[str, Any], metric: str, mark: str = "†") -> str:
    text = f"{_pct(record.get(f'{metric}_mean'))} ± {_pct(record.get(f'{metric}_std'))}"
    if record.get(f"{metric}_ci_low") is not None:
        text += f" [{_pct(record[f'{metric}_ci_low'], 1)}, {_pct(record[f'{metric}_ci_high'], 1)}]"
    if record.get(f"{metric}_significant"):
        text += f" {mark}"
    return text


def _p(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"


def _published_text(record: dict[str, Any]) -> tuple[str, str]:
    figures = record.get("published") or []
    if not figures:
        return "—", "—"
    by_ref: dict[str, list[str]] = {}
    for f in figures:
        by_ref.setdefault(f["ref"], []).append(f"{f['column']} {f['value']:.2f}")
    shown = "; ".join(f"{', '.join(values)} ({ref})" for ref, values in by_ref.items())
    diffs = "; ".join(f"{f['column']} " + ("—" if f["diff"] is None else f"{f['diff']:+.2f}") for f in figures)
    return shown, diffs


def markdown_report(cfg: ExperimentConfig, results: list[dict[str, Any]], summary: list[dict[str, Any]],
                    figures: dict[str, list[str]]) -> str:
    done = sum(r["status"] == "completed" for r in results)
    s = cfg.statistics
    lines = [f"# Experiment `{cfg.name}`", ""]
    if cfg.description:
        lines += [cfg.description.strip(), ""]
    lines += [
        f"{len(results)} cells ({len(cfg.rows)} rows × {len(cfg.datasets)} datasets × seeds {cfg.seeds}): "
        f"{done} completed, {len(results) - done} failed. Reference row: **{cfg.rows[cfg.reference].title or cfg.reference}**.",
        "",
        f"Test metrics in %: mean ± sample std over the seeds, then [the {s.confidence:.0%} bootstrap interval of the "
        f"seed mean over the test items]. † = differs from the reference row on the same items (Holm-adjusted "
        f"p < {s.alpha}; accuracy: exact McNemar, F1s: approximate randomisation). F1 (wP, wR) is UMAF's F1, the "
        "harmonic mean of weighted precision and recall. Published: the paper's figure for the row on that "
        "dataset; Δ: ours − published, in points.", ""]
    for dataset, data in cfg.datasets.items():
        records = [r for r in summary if r["dataset"] == dataset]
        title = data.title or dataset
        if not records:
            lines += [f"## {title}", "", "(no finished cells)", ""]
            continue
        lines += [f"## {title}", "",
                  f"Task {data.task or '(the manifest’s first)'}; {records[0]['n_items']} test items.", "",
                  "| Row | Seeds | " + " | ".join(label for _, label in COLUMNS) + " | Published | Δ |",
                  "|---|---|" + "---|" * len(COLUMNS) + "---|---|"]
        for r in records:
            name = f"**{r['row_title']}** (reference)" if r["is_reference"] else r["row_title"]
            shown, diffs = _published_text(r)
            lines.append(f"| {name} | {r['n_seeds']} | " + " | ".join(_cell(r, m) for m, _ in COLUMNS)
                         + f" | {shown} | {diffs} |")
        tested = [r for r in records if not r["is_reference"]]
        if tested:
            lines += ["", "Paired tests against the reference (differences in points; p raw / Holm-adjusted):", "",
                      "| Row | ΔAcc | p McNemar | p Holm | ΔwF1 | p | p Holm | ΔmF1 | p | p Holm | ΔF1 (wP, wR) | p | p Holm |",
                      "|---|" + "---|" * 12]
            for r in tested:
                if r.get("test_note"):
                    lines.append(f"| {r['row_title']} | {r['test_note']} |" + " |" * 11)
                    continue
                cells = [f"{100 * r['accuracy_diff']:+.2f}", _p(r.get("accuracy_p")), _p(r.get("accuracy_p_holm"))]
                for metric in stats.F1_METRICS:
                    cells += [f"{100 * r[f'{metric}_diff']:+.2f}", _p(r.get(f"{metric}_p")), _p(r.get(f"{metric}_p_holm"))]
                lines.append(f"| {r['row_title']} | " + " | ".join(cells) + " |")
        names = [c["label"] for c in records[0]["per_class_f1"]]
        lines += ["", "Per-class F1 (%, mean ± std over seeds):", "",
                  "| Row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for r in records:
            lines.append(f"| {r['row_title']} | " + " | ".join(
                f"{_pct(c['mean'])} ± {_pct(c['std'])}" for c in r["per_class_f1"]) + " |")
        attention = [x for x in results if x["dataset"] == dataset
                     and any(x.get(f"attention_{k}") is not None for k in ATTENTION_SOURCES)]
        if attention:
            lines += ["", "Figure 3: share of the last fusion layer's attention received by each source (mean over seeds):",
                      "", "| Row | text | caption | image |", "|---|---|---|---|"]
            for row in cfg.rows:
                mine = [x for x in attention if x["row"] == row]
                if mine:
                    means = [np.mean([x[f"attention_{k}"] for x in mine if x.get(f"attention_{k}") is not None] or [np.nan])
                             for k in ("text", "caption", "image")]
                    lines.append(f"| {cfg.rows[row].title or row} | " + " | ".join(
                        "—" if math.isnan(v) else f"{v:.3f}" for v in means) + " |")
        if figures.get(dataset):
            lines += ["", "Figures: " + ", ".join(f"[{name}](figures/{name})" for name in figures[dataset])]
        lines.append("")
    lines += ["## How these numbers were computed", "",
              "- Every figure comes from the cells' `predictions/test.parquet` (`label`, `pred` per test item), with "
              "`umaf.train.metrics.classification_metrics` (scikit-learn) per seed. `results.parquet` has every cell's "
              "metrics; `summary.parquet` every statistic below with its inputs."]
    # The methods with their inputs (item counts, seeds) per dataset: they differ between datasets.
    names = list(dict.fromkeys(r["dataset"] for r in summary))
    for dataset in names:
        on = f" ({dataset})" if len(names) > 1 else ""
        example = next((r for r in summary if r["dataset"] == dataset and r.get("ci_method")), None)
        if example:
            lines.append(f"- Intervals{on}: {example['ci_method']}.")
        tested = next((r for r in summary if r["dataset"] == dataset and r.get("f1_test")), None)
        if tested:
            lines += [f"- Accuracy test{on}: {tested['accuracy_test']}.", f"- F1 tests{on}: {tested['f1_test']}.",
                      f"- Multiple comparisons{on}: Holm's step-down correction (statsmodels multipletests) over "
                      f"{tested['holm_family']}."]
    notes = {f["source"].split(", row")[0]: f["note"] for r in summary for f in (r.get("published") or []) if f.get("note")}
    if any(r.get("published") for r in summary):
        lines.append(f"- Published figures: `configs/experiment/published/{cfg.published or '<paper>'}.yaml` "
                     "(paper, table and column of each).")
        lines += [f"  - {source}: {note}" for source, note in notes.items()]
    failed = [r for r in results if r["status"] != "completed"]
    lines += ["", "## Cells", "", "| Row | Dataset | Seed | Status | Acc | Weighted F1 | Run folder |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['row_title']} | {r['dataset']} | {r['seed']} | {r['status']}"
                     f"{' (' + r['error'] + ')' if r.get('error') else ''} | {_pct(r.get('accuracy'))} | "
                     f"{_pct(r.get('weighted_f1'))} | `{r['run_uri']}` |")
    if failed:
        lines += ["", f"{len(failed)} cell(s) failed: rerun the same command with `--resume` to run only those."]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", str(text)).replace("~", r"\textasciitilde{}")


def latex_report(cfg: ExperimentConfig, summary: list[dict[str, Any]]) -> str:
    """One booktabs table per dataset: mean ± std, the CI, † for a significant difference from the reference."""
    s = cfg.statistics
    out = ["% Generated by jobs/experiment.py; needs \\usepackage{booktabs}.", ""]
    for dataset, data in cfg.datasets.items():
        records = [r for r in summary if r["dataset"] == dataset]
        if not records:
            continue
        out += [r"\begin{table}[t]", r"\centering", r"\small",
                r"\begin{tabular}{l" + "c" * (len(COLUMNS) + 1) + "}", r"\toprule",
                "Row & " + " & ".join(_tex(label) for _, label in COLUMNS) + r" & Published \\", r"\midrule"]
        for r in records:
            cells = []
            for metric, _ in COLUMNS:
                cell = f"{_pct(r.get(f'{metric}_mean'))} $\\pm$ {_pct(r.get(f'{metric}_std'))}"
                if r.get(f"{metric}_ci_low") is not None:
                    cell += f" {{\\scriptsize [{_pct(r[f'{metric}_ci_low'], 1)}, {_pct(r[f'{metric}_ci_high'], 1)}]}}"
                if r.get(f"{metric}_significant"):
                    cell += r"$^\dagger$"
                cells.append(cell.replace("—", "--"))
            published = "; ".join(f"{_tex(f['column'])} {f['value']:.2f} ({f['diff']:+.2f})" if f["diff"] is not None
                                  else f"{_tex(f['column'])} {f['value']:.2f}" for f in r.get("published") or []) or "--"
            name = _tex(r["row_title"]) + (" (ref.)" if r["is_reference"] else "")
            out.append(f"{name} & " + " & ".join(cells) + f" & {published} \\\\")
        out += [r"\bottomrule", r"\end{tabular}",
                rf"\caption{{{_tex(data.title or dataset)}: test metrics (\%), mean $\pm$ sample std over "
                rf"{len(records[0]['seeds'])} seeds, [{s.confidence:.0%} bootstrap CI of the seed mean]. "
                rf"$^\dagger$: differs from {_tex(cfg.rows[cfg.reference].title or cfg.reference)} (Holm-adjusted "
                rf"$p<{s.alpha}$; McNemar for accuracy, approximate randomisation for F1). Published: (ours $-$ paper).}}",
                rf"\label{{tab:{_tex(cfg.name)}-{_tex(dataset)}}}", r"\end{table}", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Figures


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def per_class_png(records: list[dict[str, Any]], title: str) -> bytes:
    """Grouped bars: per-class F1 of each row (mean over seeds, std as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c["label"] for c in records[0]["per_class_f1"]]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) * max(1, len(records)) / 2), 3.6))
    width = 0.8 / len(records)
    for k, r in enumerate(records):
        means = [100 * c["mean"] for c in r["per_class_f1"]]
        stds = [0 if math.isnan(c["std"]) else 100 * c["std"] for c in r["per_class_f1"]]
        ax.bar(np.arange(len(names)) + k * width - 0.4 + width / 2, means, width, yerr=stds, capsize=2,
               label=r["row_title"])
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("test F1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def confusion_png(matrix: np.ndarray, names: list[str], title: str) -> bytes:
    """A confusion matrix (rows: true, columns: predicted): counts, coloured by the share of the true class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 1.0 * len(names) + 1.6))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if shares[i, j] > 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def write_figures(cfg: ExperimentConfig, summary: list[dict[str, Any]], predictions: list[stats.CellPredictions],
                  labels: dict[str, list[str]]) -> dict[str, list[str]]:
    kw = _kw(cfg)
    folder = storage.join(cfg.out, cfg.name, "figures")
    written: dict[str, list[str]] = {}
    for dataset in cfg.datasets:
        records = [r for r in summary if r["dataset"] == dataset]
        if not records:
            continue
        names = labels[dataset]
        files = []
        name = f"per_class_f1_{dataset}.png"
        storage.write_bytes_atomic(storage.join(folder, name), per_class_png(
            records, f"{cfg.name} on {dataset}: test F1 per class (mean ± std over seeds)"), **kw)
        files.append(name)
        for row in cfg.rows:
            mine = [p for p in predictions if p.row == row and p.dataset == dataset]
            if not mine:
                continue
            matrix = stats.confusion_counts(np.stack([p.y_true for p in mine]), np.stack([p.y_pred for p in mine]),
                                            len(names)).sum(0)
            name = f"confusion_{dataset}_{row}.png"
            storage.write_bytes_atomic(storage.join(folder, name), confusion_png(
                matrix, names, f"{cfg.rows[row].title or row} on {dataset}: test confusion, summed over "
                f"seeds {sorted(p.seed for p in mine)}"), **kw)
            files.append(name)
        written[dataset] = files
    return written


# --------------------------------------------------------------------------------------------
# All outputs


def _parquet_bytes(records: list[dict[str, Any]]) -> bytes:
    import pyarrow.parquet as pq

    # Every key of every record (from_pylist would take the first record's keys alone: the reference
    # row has no test columns), NaN written as null.
    keys = list(dict.fromkeys(k for r in records for k in r))
    clean = [{k: (None if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k)) for k in keys} for r in records]
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(clean), buffer)
    return buffer.getvalue().to_pybytes()


def write_outputs(cfg: ExperimentConfig, errors: dict[str, str] | None = None) -> dict[str, Any]:
    """results.parquet, summary.parquet, report.md, report.tex and figures/ into ``<out>/<name>/``."""
    kw = _kw(cfg)
    root = storage.join(cfg.out, cfg.name)
    results, predictions, labels = collect(cfg, errors or {})
    summary = summary_records(cfg, predictions, labels) if predictions else []
    figures = write_figures(cfg, summary, predictions, labels)
    report = markdown_report(cfg, results, summary, figures)
    paths = {name: storage.join(root, name) for name in ("results.parquet", "summary.parquet", "report.md", "report.tex")}
    storage.write_bytes_atomic(paths["results.parquet"], _parquet_bytes(results), **kw)
    if summary:
        storage.write_bytes_atomic(paths["summary.parquet"], _parquet_bytes(summary), **kw)
    storage.write_text_atomic(paths["report.md"], report, **kw)
    storage.write_text_atomic(paths["report.tex"], latex_report(cfg, summary), **kw)
    failed = [f"{r['row']}/{r['dataset']}/seed{r['seed']}" for r in results if r["status"] != "completed"]
    return {"experiment": root, "results": paths["results.parquet"], "summary": paths["summary.parquet"],
            "report": paths["report.md"], "report_text": report, "cells": len(results), "failed": failed,
            "rows": results, "summary_rows": summary}
