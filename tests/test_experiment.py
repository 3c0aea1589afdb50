"""jobs/experiment.py end to end on the session's Ray cluster, and the experiment config's checks.

The end-to-end test runs a tiny experiment, 2 rows × the demo set × 3 seeds: UMAF trained per seed
(tiny random BERT, one epoch on 48 rows a split) and the caption-reliance row "text only" evaluating
each trained run again without its captions. Its statistics are checked against values computed here
from the cells' prediction files with scikit-learn and the binomial formula, not with the code under
test. Then a cell is made to fail on ``--resume``: only that cell runs, the job exits 3 and the others
stay in the report. (The statistics themselves are unit-tested in test_experiment_stats.py.)
"""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from conftest import job_main
from umaf.config import ConfigError, load_config
from umaf.experiment.config import Cell, ExperimentConfig

TINY = ["train.epochs=1", "train.max_rows_per_split=48", "train.batch_size=16", "train.umaf.max_length=48",
        "train.umaf.fusion_layers=1", "train.cpus_per_worker=0.5", "max_concurrent_cells=3",
        "statistics.permutation_resamples=999",
        "rows={full: {title: UMAF}, text-only: {title: text only, perturb: text_only, of: full}}", "reference=full"]


# ------------------------------------------------------------------------------------------
# Config (pure)


def test_cells_compose_preset_dataset_and_row_settings():
    cfg = load_config(ExperimentConfig, "experiment", preset="sppscl-table4")
    cells = cfg.cells()
    assert len(cells) == 2 * 3 * 3 and cells[0] == Cell("two-step", "mvsa-single", 0)
    hfm = cfg.cell_train_config(Cell("one-step", "hfm", 2))
    assert (hfm.sppscl.variant, hfm.seed, hfm.batch_size, hfm.gpus_per_worker) == ("one_step", 2, 256, 0.25)
    assert cfg.cell_train_config(Cell("two-step", "mvsa-single", 0)).batch_size == 64  # the dataset's own preset
    with pytest.raises(ValueError, match="reference 'nope' is not a row"):
        load_config(ExperimentConfig, "experiment", overrides=["reference=nope"])
    with pytest.raises(ConfigError, match="row 'full' on dataset 'demo'"):
        load_config(ExperimentConfig, "experiment", overrides=["train.epochz=1"]).check_cells()
    with pytest.raises(ValueError, match="2 datasets"):
        load_config(ExperimentConfig, "experiment", preset="minilm-text", overrides=["manifest=/tmp/x"])


def test_text_only_perturbation_needs_a_caption_row():
    cfg = load_config(ExperimentConfig, "experiment", overrides=[
        "rows={full: {train: {umaf: {use_captions: false}}}, t: {perturb: text_only, of: full}}", "reference=full"])
    with pytest.raises(ConfigError, match="trains without them"):
        cfg.check_cells()


# ------------------------------------------------------------------------------------------
# End to end


def _independent(folder: Path) -> dict[str, float]:
    """Test metrics of one cell's predictions, by scikit-learn (and UMAF's F1 by its formula)."""
    pred = pd.read_parquet(folder / "predictions" / "test.parquet")
    y, p = pred["label"].to_numpy(), pred["pred"].to_numpy()
    labels = [0, 1, 2]
    wp = precision_score(y, p, labels=labels, average="weighted", zero_division=0)
    wr = recall_score(y, p, labels=labels, average="weighted", zero_division=0)
    return {"accuracy": accuracy_score(y, p), "weighted_f1": f1_score(y, p, labels=labels, average="weighted"),
            "macro_f1": f1_score(y, p, labels=labels, average="macro", zero_division=0),
            "f1_of_weighted_pr": 2 * wp * wr / (wp + wr), "y": y, "p": p, "ids": pred["id"].tolist()}


def _mcnemar_by_hand(y, a, b) -> float:
    only_a, only_b = int(np.sum((a == y) & (b != y))), int(np.sum((a != y) & (b == y)))
    m = only_a + only_b
    return 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2 ** m)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_tiny_experiment_end_to_end_with_independent_statistics_and_a_failed_cell(ray_cluster, tmp_path):
    out = tmp_path / "experiments"
    result = job_main("experiment")(["--out", str(out), *TINY])
    root = out / "tiny"
    assert result["failed"] == [] and result["cells"] == 6

    # One run folder per cell, named by row/dataset/seed; the trained ones are whole train runs.
    folders = {(row, seed): root / "runs" / row / "demo" / f"seed{seed}" for row in ("full", "text-only") for seed in (0, 1, 2)}
    assert all((f / "metrics.json").is_file() and (f / "predictions" / "test.parquet").is_file() for f in folders.values())
    assert all((folders["full", s] / "best" / "model.safetensors").is_file() for s in (0, 1, 2))
    results = pd.read_parquet(root / "results.parquet")
    assert len(results) == 6 and set(results["status"]) == {"completed"}
    assert {"row", "dataset", "seed", "run_uri", "accuracy", "weighted_f1", "macro_f1", "f1_of_weighted_pr"} <= set(results)

    ours = {key: _independent(f) for key, f in folders.items()}
    # The perturbation cells predicted the trained runs' own test items, and the reloaded model gives
    # the run's own predictions when nothing is perturbed.
    assert all(ours["text-only", s]["ids"] == ours["full", s]["ids"] for s in (0, 1, 2))
    import json

    meta = json.loads((folders["text-only", 0] / "metrics.json").read_text())
    assert meta["perturbation"] == "text_only" and meta["identity_agreement"] == 1.0
    for _, r in results.iterrows():
        assert r["accuracy"] == pytest.approx(ours[r["row"], r["seed"]]["accuracy"])

    summary = pd.read_parquet(root / "summary.parquet").set_index("row")
    for row in ("full", "text-only"):
        for metric in ("accuracy", "weighted_f1", "macro_f1", "f1_of_weighted_pr"):
            values = [ours[row, s][metric] for s in (0, 1, 2)]
            assert summary.loc[row, f"{metric}_mean"] == pytest.approx(statistics.mean(values))
            assert summary.loc[row, f"{metric}_std"] == pytest.approx(statistics.stdev(values))
            assert summary.loc[row, f"{metric}_ci_low"] <= statistics.mean(values) + 1e-9
            assert summary.loc[row, f"{metric}_ci_high"] >= statistics.mean(values) - 1e-9
    tested = summary.loc["text-only"]
    per_seed = [_mcnemar_by_hand(ours["full", s]["y"], ours["text-only", s]["p"], ours["full", s]["p"]) for s in (0, 1, 2)]
    assert list(tested["accuracy_p_per_seed"]) == pytest.approx(per_seed)
    assert tested["accuracy_p"] == pytest.approx(max(per_seed)) and tested["accuracy_p_holm"] == pytest.approx(max(per_seed))
    assert tested["weighted_f1_diff"] == pytest.approx(
        statistics.mean(ours["text-only", s]["weighted_f1"] - ours["full", s]["weighted_f1"] for s in (0, 1, 2)))
    assert 0 < tested["weighted_f1_p"] <= 1 and "McNemar" in tested["accuracy_test"] and "1000 resamples" in tested["ci_method"]

    report = (root / "report.md").read_text()
    assert "| **UMAF** (reference) | 3 |" in report and "| text only | 3 |" in report
    assert f"{100 * statistics.mean(ours['full', s]['accuracy'] for s in (0, 1, 2)):.2f} ±" in report
    assert "\\toprule" in (root / "report.tex").read_text()
    for name in ("per_class_f1_demo.png", "confusion_demo_full.png", "confusion_demo_text-only.png"):
        assert (root / "figures" / name).read_bytes()[:4] == b"\x89PNG"

    # A cell that fails on --resume: only it runs (the trained runs are not touched), the job exits 3,
    # and the report keeps the five others.
    before = {key: (f / "metrics.json").stat().st_mtime_ns for key, f in folders.items() if key != ("text-only", 2)}
    shutil.rmtree(folders["text-only", 2])
    shutil.move(folders["full", 2] / "best", tmp_path / "best-aside")  # its model cannot be loaded now
    with pytest.raises(SystemExit) as stop:
        job_main("experiment")(["--out", str(out), *TINY, "cell_max_failures=0", "--resume"])
    assert stop.value.code == 3
    assert {key: (f / "metrics.json").stat().st_mtime_ns for key, f in folders.items() if key != ("text-only", 2)} == before
    results = pd.read_parquet(root / "results.parquet").set_index(["row", "seed"])
    assert results.loc[("text-only", 2), "status"] == "failed" and (results["status"] == "completed").sum() == 5
    assert "1 cell(s) failed" in (root / "report.md").read_text()


def test_report_puts_the_published_figures_and_the_difference_beside_ours():
    """Table 3's CLIP row on MSED: the paper's Acc and F1 (UMAF's F1: harmonic mean of weighted P/R) with
    ours − paper, from made-up predictions whose metrics are computed here by scikit-learn."""
    from umaf.experiment import stats
    from umaf.experiment.report import latex_report, markdown_report, summary_records

    cfg = load_config(ExperimentConfig, "experiment", preset="umaf-table3-msed-sentiment",
                      overrides=["seeds=[0, 1]", "statistics.permutation_resamples=999"])
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    ids = [str(i) for i in range(200)]
    preds = {(row, s): np.where(rng.random(200) < q, y, rng.integers(0, 3, 200))
             for row, q in (("clip", 0.8), ("vlm", 0.7)) for s in (0, 1)}
    cells = [stats.CellPredictions(row, "msed-sentiment", s, ids, y, p) for (row, s), p in preds.items()]
    summary = summary_records(cfg, cells, {"msed-sentiment": ["positive", "neutral", "negative"]})
    clip = next(r for r in summary if r["row"] == "clip")
    acc = statistics.mean(accuracy_score(y, preds["clip", s]) for s in (0, 1))
    wp = [precision_score(y, preds["clip", s], average="weighted") for s in (0, 1)]
    wr = [recall_score(y, preds["clip", s], average="weighted") for s in (0, 1)]
    f1 = statistics.mean(2 * p * r / (p + r) for p, r in zip(wp, wr))
    figures = {f["column"]: f for f in clip["published"]}
    assert figures["Acc"]["value"] == 85.79 and figures["Acc"]["diff"] == pytest.approx(100 * acc - 85.79, abs=1e-3)
    assert figures["F1"]["metric"] == "f1_of_weighted_pr" and figures["F1"]["diff"] == pytest.approx(100 * f1 - 85.77, abs=1e-3)
    results = [{"row": c.row, "row_title": cfg.rows[c.row].title, "dataset": c.dataset, "seed": c.seed, "status": "completed",
                "run_uri": "x", "accuracy": 0.5, "weighted_f1": 0.5} for c in cells]
    report = markdown_report(cfg, results, summary, {})
    line = next(line for line in report.splitlines() if line.startswith("| CLIP (Text+Image) |"))
    assert "Acc 85.79, F1 85.77, Prec 85.70, Rec 85.84 (umaf Table 3, CLIP (Text+Image))" in line
    assert f"Acc {100 * acc - 85.79:+.2f}" in line
    assert "does not say which dataset" in report  # the table's note travels with its figures
    assert "CLIP (Text+Image) &" in latex_report(cfg, summary)


def test_perturbations_change_only_what_they_name():
    from umaf.experiment.perturb import perturb_inputs

    texts = ["t0", "t1", "t2", "t3", "t4"]
    fields = {"ocr": ["o0", None, "o2", "o3", "o4"], "visual_scene": ["v0", None, "v2", "v3", "v4"],
              "textimage_relation": ["r0", None, "r2", "r3", "r4"]}
    t, f = perturb_inputs(texts, fields, "shuffle_captions", seed=3)
    assert t == texts and f["ocr"][1] is None  # the pair without a caption keeps none
    moved = [k for k in (0, 2, 3, 4)]
    assert all(f["ocr"][k] != fields["ocr"][k] for k in moved)  # a derangement: nobody keeps its own caption
    assert sorted(f["ocr"][k] for k in moved) == ["o0", "o2", "o3", "o4"]
    assert all(f["visual_scene"][k][1:] == f["ocr"][k][1:] == f["textimage_relation"][k][1:] for k in moved)  # whole captions
    assert perturb_inputs(texts, fields, "shuffle_captions", seed=3) == (t, f)  # seeded
    t, f = perturb_inputs(texts, fields, "drop_visual_scene", seed=0)
    assert f["visual_scene"] == [None] * 5 and f["ocr"] == fields["ocr"] and t == texts
    t, f = perturb_inputs(texts, fields, "caption_only", seed=0)
    assert t == [""] * 5 and f == fields
    t, f = perturb_inputs(texts, fields, "text_only", seed=0)
    assert t == texts and all(v == [None] * 5 for v in f.values())


def test_a_resumed_cell_may_run_elsewhere_but_not_with_other_training_settings(tmp_path):
    """--resume compares each finished cell's config.yaml with what the experiment now gives: where it
    runs (node_resource, which a one-machine Ray drops, workers, storage) may differ; what it trains may not."""
    import yaml

    from umaf.errors import UserError
    from umaf.experiment.run import _check_resumed_cells

    cell = tmp_path / "runs" / "full" / "demo" / "seed0"
    cell.mkdir(parents=True)
    ran = {"out": str(cell), "lr": 2e-4, "node_resource": None, "num_workers": 1, "umaf": {"top_k": 10}}
    (cell / "config.yaml").write_text(yaml.safe_dump(ran))
    now = {**ran, "node_resource": "train_node", "num_workers": 2}
    _check_resumed_cells({"full/demo/seed0": now}, {})
    with pytest.raises(UserError, match=r"umaf.top_k: ran 10, now 5"):
        _check_resumed_cells({"full/demo/seed0": {**now, "umaf": {"top_k": 5}}}, {})
