"""An experiment's statistics from per-item test predictions: pure numpy, scipy and statsmodels, no Ray.

For every row × dataset (``k`` seeds, each seed's run predicting the same ``n`` test items):

- **mean ± sample std over seeds** (``ddof=1``) of accuracy, weighted F1, macro F1, UMAF's F1 (the
  harmonic mean of weighted P and R, :func:`umaf.train.metrics.f1_of_weighted_pr`), weighted P/R and
  per-class F1;
- **a confidence interval** from ``scipy.stats.bootstrap`` over the test items (``paired=True``: one
  resample draws the same items for every seed), of the statistic "mean over the seeds of the
  metric". Seeds are pooled that way, so the interval is the test-set sampling uncertainty of the
  seed-averaged score; the seed spread is the std beside it;
- **each row against the reference row on the same items**, seed s paired with seed s:
  approximate randomisation for the F1 metrics (``scipy.stats.permutation_test``,
  ``permutation_type="samples"``: each item's predictions of the two rows are swapped, for all seeds
  at once, with probability 1/2; statistic: difference of the seed-mean metric), and the exact McNemar
  test for accuracy (``statsmodels``' ``mcnemar(exact=True)``) for every seed pair, the row's
  p-value being the largest of them (significant only where every seed pair is: an
  intersection-union test, since seed pairs share the items and cannot be combined as independent);
- **Holm's correction** (``statsmodels``' ``multipletests(method="holm")``) across the non-reference
  rows of a dataset, per metric.

The metrics of a resample come from its confusion matrix, with the definitions of scikit-learn's
``precision_recall_fscore_support(labels=range(C), zero_division=0)`` (the tests check they agree):
scikit-learn has no batched form, and a bootstrap needs thousands of them per cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Metrics with a CI and a paired test; MEAN_ONLY metrics get mean ± std (published P and R).
METRICS = ("accuracy", "weighted_f1", "macro_f1", "f1_of_weighted_pr")
MEAN_ONLY = ("weighted_precision", "weighted_recall", "macro_precision", "macro_recall")
F1_METRICS = ("weighted_f1", "macro_f1", "f1_of_weighted_pr")


# --------------------------------------------------------------------------------------------
# Metrics of (many) confusion matrices


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``y_true``, ``y_pred`` of shape ``(..., n)`` → confusion matrices ``(..., C, C)`` (rows: true label,
    columns: predicted), one per leading index: every bootstrap resample at once."""
    y_true, y_pred = np.broadcast_arrays(np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64))
    lead = y_true.shape[:-1]
    batch = int(np.prod(lead)) if lead else 1
    cells = (y_true * num_classes + y_pred).reshape(batch, -1)
    offsets = (np.arange(batch, dtype=np.int64) * num_classes * num_classes)[:, None]
    counts = np.bincount((cells + offsets).ravel(), minlength=batch * num_classes * num_classes)
    return counts.reshape(*lead, num_classes, num_classes)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.broadcast_shapes(num.shape, den.shape)), where=den > 0)


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support ``(..., C)`` (0 where undefined, as zero_division=0)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    true = cm.sum(-1)
    pred = cm.sum(-2)
    return {"precision": _safe_divide(tp, pred), "recall": _safe_divide(tp, true),
            "f1": _safe_divide(2 * tp, true + pred), "support": true}


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro/weighted P/R/F1 and UMAF's F1 of confusion matrices ``(..., C, C)``."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum((-2, -1))
    scores = per_class_scores(cm)
    weights = _safe_divide(scores["support"], total[..., None])
    out = {"accuracy": _safe_divide(np.trace(cm, axis1=-2, axis2=-1), total)}
    for name in ("precision", "recall", "f1"):
        out[f"macro_{name}"] = scores[name].mean(-1)
        out[f"weighted_{name}"] = (scores[name] * weights).sum(-1)
    p, r = out["weighted_precision"], out["weighted_recall"]
    out["f1_of_weighted_pr"] = _safe_divide(2 * p * r, p + r)  # == f1_of_weighted_pr(p, r), vectorised
    return out


def seed_mean_metric(y_true: np.ndarray, preds: np.ndarray, metric: str, num_classes: int) -> np.ndarray:
    """The metric of each seed's predictions ``preds (..., k, n)`` against ``y_true (..., n)``, averaged
    over the ``k`` seeds: the statistic every interval and paired test here is about."""
    y = np.asarray(y_true)[..., None, :]
    return metrics_from_confusion(confusion_counts(y, preds, num_classes))[metric].mean(-1)


# --------------------------------------------------------------------------------------------
# Seeds, intervals, tests


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; NaN for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else math.nan


@dataclass
class Interval:
    point: float
    low: float
    high: float


def bootstrap_interval(y_true: np.ndarray, preds: np.ndarray, metric: str, num_classes: int, *,
                       resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                       method: str = "percentile") -> Interval:
    """``scipy.stats.bootstrap`` over the test items of the seed-mean ``metric``; ``preds`` is ``(k, n)``.

    ``paired=True`` resamples item indices once for all arrays, so a resample keeps each item's label
    with every seed's prediction of it. ``rng=numpy.random.default_rng(seed)``.
    """
    from scipy import stats

    preds = np.atleast_2d(np.asarray(preds, dtype=np.int64))
    y_true = np.asarray(y_true, dtype=np.int64)

    def statistic(y, *seed_preds, axis=-1):
        return seed_mean_metric(y, np.stack(seed_preds, axis=-2), metric, num_classes)

    point = float(statistic(y_true, *preds))
    result = stats.bootstrap((y_true, *preds), statistic, n_resamples=resamples, paired=True, vectorized=True,
                             axis=-1, confidence_level=confidence, method=method, batch=200,
                             rng=np.random.default_rng(seed))
    return Interval(point, float(result.confidence_interval.low), float(result.confidence_interval.high))


def paired_randomisation_test(y_true: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray, metric: str,
                              num_classes: int, *, resamples: int = 9999, seed: int = 0) -> tuple[float, float]:
    """Approximate randomisation (``scipy.stats.permutation_test``, ``permutation_type="samples"``) of
    ``seed_mean(metric, a) - seed_mean(metric, b)``; ``preds_a``/``preds_b`` are ``(k, n)``, seed s of a
    paired with seed s of b, on the same items. Under the null the two rows are exchangeable item by
    item: each item's predictions (all seeds together) are swapped between a and b with probability 1/2.
    Returns ``(observed difference, two-sided p-value)``; with 2^n <= ``resamples`` the test is exact."""
    from scipy import stats

    preds_a = np.atleast_2d(np.asarray(preds_a, dtype=np.int64))
    preds_b = np.atleast_2d(np.asarray(preds_b, dtype=np.int64))
    if preds_a.shape != preds_b.shape:
        raise ValueError(f"paired predictions differ in shape: {preds_a.shape} vs {preds_b.shape}")
    y_true = np.asarray(y_true, dtype=np.int64)
    n = y_true.shape[0]
    both = np.concatenate([preds_a, preds_b], axis=1)  # (k, 2n): item i of a at i, of b at n + i

    def statistic(index_a, index_b, axis=-1):
        # permutation_test swaps index_a[i] <-> index_b[i]; gather the predictions the indices name.
        a = np.moveaxis(both[:, index_a], 0, -2)  # (..., k, n)
        b = np.moveaxis(both[:, index_b], 0, -2)
        return seed_mean_metric(y_true, a, metric, num_classes) - seed_mean_metric(y_true, b, metric, num_classes)

    index = np.arange(n)
    result = stats.permutation_test((index, index + n), statistic, permutation_type="samples", vectorized=True,
                                    n_resamples=resamples, alternative="two-sided", axis=-1, batch=200,
                                    rng=np.random.default_rng(seed))
    return float(result.statistic), float(result.pvalue)


def mcnemar_exact(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict[str, float]:
    """Exact McNemar test (``statsmodels``) of two classifiers' accuracy on the same items: ``b`` items
    only a gets right, ``c`` only b; p-value of the two-sided binomial test of b against b + c."""
    from statsmodels.stats.contingency_tables import mcnemar

    y_true = np.asarray(y_true)
    right_a, right_b = np.asarray(pred_a) == y_true, np.asarray(pred_b) == y_true
    table = [[int(np.sum(right_a & right_b)), int(np.sum(right_a & ~right_b))],
             [int(np.sum(~right_a & right_b)), int(np.sum(~right_a & ~right_b))]]
    return {"only_a": table[0][1], "only_b": table[1][0], "pvalue": float(mcnemar(table, exact=True).pvalue)}


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> list[float]:
    """Holm-adjusted p-values (``statsmodels``' ``multipletests``); NaN entries stay NaN and are not
    counted in the family."""
    from statsmodels.stats.multitest import multipletests

    values = np.asarray(pvalues, dtype=np.float64)
    out = np.full(values.shape, np.nan)
    present = ~np.isnan(values)
    if present.any():
        out[present] = multipletests(values[present], alpha=alpha, method="holm")[1]
    return out.tolist()


# --------------------------------------------------------------------------------------------
# A whole experiment


@dataclass
class CellPredictions:
    """One finished cell's test predictions, in the dataset's item order."""

    row: str
    dataset: str
    seed: int
    ids: list[str]
    y_true: np.ndarray
    y_pred: np.ndarray


def summarise(cells: list[CellPredictions], *, rows: Sequence[str], reference: str, labels: dict[str, list[str]],
              resamples: int = 1000, permutation_resamples: int = 9999, confidence: float = 0.95,
              alpha: float = 0.05, seed: int = 0, ci_method: str = "percentile") -> list[dict[str, Any]]:
    """One summary record per row × dataset with finished cells: mean/std of every metric, the seed-mean
    CI, and the paired tests against ``reference`` (Holm-adjusted across the rows of a dataset), each
    with a sentence naming its method and inputs."""
    from umaf.train.metrics import classification_metrics

    by_key: dict[tuple[str, str], list[CellPredictions]] = {}
    for cell in cells:
        by_key.setdefault((cell.row, cell.dataset), []).append(cell)
    out: list[dict[str, Any]] = []
    datasets = list(dict.fromkeys(cell.dataset for cell in cells))
    for dataset in datasets:
        names = labels[dataset]
        num_classes = len(names)
        ref_cells = {c.seed: c for c in by_key.get((reference, dataset), [])}
        records = []
        for row in rows:
            group = sorted(by_key.get((row, dataset), []), key=lambda c: c.seed)
            if not group:
                continue
            ids = group[0].ids
            same_items = all(c.ids == ids for c in group)
            record: dict[str, Any] = {"row": row, "dataset": dataset, "is_reference": row == reference,
                                      "seeds": [c.seed for c in group], "n_seeds": len(group), "n_items": len(ids)}
            per_seed = [classification_metrics(c.y_true, c.y_pred, names) for c in group]
            for metric in (*METRICS, *MEAN_ONLY):
                record[f"{metric}_mean"], record[f"{metric}_std"] = mean_std([m[metric] for m in per_seed])
            record["per_class_f1"] = [
                {"label": name, **dict(zip(("mean", "std"), mean_std([m["per_class"][name]["f1-score"] for m in per_seed])))}
                for name in names]
            if not same_items:
                record["ci_method"] = "no interval: the row's seeds predicted different test items"
            else:
                y_true, preds = group[0].y_true, np.stack([c.y_pred for c in group])
                for metric in METRICS:
                    interval = bootstrap_interval(y_true, preds, metric, num_classes, resamples=resamples,
                                                  confidence=confidence, seed=seed, method=ci_method)
                    record[f"{metric}_ci_low"], record[f"{metric}_ci_high"] = interval.low, interval.high
                record["ci_method"] = (
                    f"scipy.stats.bootstrap (method={ci_method!r}, paired=True) over the {len(ids)} test items, "
                    f"{resamples} resamples, rng numpy.random.default_rng({seed}); statistic: the mean over seeds "
                    f"{record['seeds']} of the metric, every seed's predictions resampled at the same items; "
                    f"{confidence:.0%} level")
            if row != reference:
                _paired_tests(record, group, ref_cells, num_classes, permutation_resamples, seed)
            records.append(record)
        # Holm across this dataset's non-reference rows, per test.
        tested = [r for r in records if not r["is_reference"]]
        for key in ("accuracy", *F1_METRICS):
            adjusted = holm([r.get(f"{key}_p", math.nan) for r in tested], alpha)
            for r, p in zip(tested, adjusted):
                r[f"{key}_p_holm"] = p
                r[f"{key}_significant"] = bool(p < alpha) if not math.isnan(p) else None
        for r in tested:
            r["holm_family"] = (f"the {len(tested)} non-reference row(s) on {dataset}, per metric, alpha {alpha}")
        out.extend(records)
    return out


def _paired_tests(record: dict[str, Any], group: list[CellPredictions], ref_cells: dict[int, CellPredictions],
                  num_classes: int, resamples: int, seed: int) -> None:
    """McNemar (accuracy) and approximate randomisation (F1s) of a row against the reference row."""
    pairs = [(c, ref_cells[c.seed]) for c in group if c.seed in ref_cells]
    record["paired_seeds"] = [c.seed for c, _ in pairs]
    if not pairs:
        record["test_note"] = "not tested: the reference row has none of this row's seeds"
        return
    if any(c.ids != ref.ids for c, ref in pairs):
        record["test_note"] = "not tested: the row and the reference row predicted different test items"
        return
    y_true = pairs[0][1].y_true
    per_seed = [mcnemar_exact(y_true, c.y_pred, ref.y_pred) for c, ref in pairs]
    record["accuracy_diff"] = float(np.mean([np.mean(c.y_pred == y_true) - np.mean(ref.y_pred == y_true)
                                             for c, ref in pairs]))
    record["accuracy_p_per_seed"] = [m["pvalue"] for m in per_seed]
    record["accuracy_discordant_per_seed"] = [[m["only_a"], m["only_b"]] for m in per_seed]
    record["accuracy_p"] = max(m["pvalue"] for m in per_seed)
    record["accuracy_test"] = (
        f"exact McNemar (statsmodels mcnemar, exact=True) of seed s against the reference's seed s, seeds "
        f"{record['paired_seeds']}, on the {len(y_true)} test items; discordant counts [row only right, reference "
        f"only right] per seed in accuracy_discordant_per_seed; p = the largest per-seed p (intersection-union)")
    a = np.stack([c.y_pred for c, _ in pairs])
    b = np.stack([ref.y_pred for _, ref in pairs])
    for metric in F1_METRICS:
        diff, p = paired_randomisation_test(y_true, a, b, metric, num_classes, resamples=resamples, seed=seed)
        record[f"{metric}_diff"], record[f"{metric}_p"] = diff, p
    record["f1_test"] = (
        f"approximate randomisation (scipy.stats.permutation_test, permutation_type='samples', two-sided, "
        f"{resamples} resamples, rng numpy.random.default_rng({seed})) of mean-over-seeds(metric, row) - "
        f"mean-over-seeds(metric, reference), seeds {record['paired_seeds']} paired, each item's predictions "
        f"swapped between the rows for all seeds at once")


__all__ = ["METRICS", "MEAN_ONLY", "F1_METRICS", "confusion_counts", "metrics_from_confusion", "per_class_scores",
           "seed_mean_metric", "mean_std", "bootstrap_interval", "paired_randomisation_test", "mcnemar_exact", "holm",
           "CellPredictions", "summarise"]
