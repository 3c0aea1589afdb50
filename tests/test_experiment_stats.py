"""umaf.experiment.stats: every statistic against a value computed here another way (scikit-learn, a
hand enumeration of the randomisation distribution, the binomial formula of McNemar's exact test,
Holm's step-down by hand, a normal-approximation interval), never by calling the code under test
twice. Pure: no Ray, a few seconds."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from umaf.experiment import stats
from umaf.train.metrics import f1_of_weighted_pr


def _noisy(y: np.ndarray, right: float, rng: np.random.Generator, classes: int = 3) -> np.ndarray:
    return np.where(rng.random(len(y)) < right, y, rng.integers(0, classes, len(y)))


def _f1s(y: np.ndarray, pred: np.ndarray, classes: int = 3) -> tuple[float, float]:
    """(macro F1, weighted F1) by their definitions, one class at a time (scikit-learn agrees: first
    test), fast enough to run thousands of times here."""
    f1, support = [], []
    for c in range(classes):
        tp = np.sum((pred == c) & (y == c))
        denominator = np.sum(pred == c) + np.sum(y == c)
        f1.append(2 * tp / denominator if denominator else 0.0)
        support.append(np.sum(y == c))
    return float(np.mean(f1)), float(np.dot(f1, support) / len(y))


def test_batched_metrics_equal_scikit_learn_per_resample():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, (5, 120))
    y[0, :] = np.where(y[0] == 3, 0, y[0])  # a class absent from the labels in one batch: zero_division=0
    pred = np.stack([_noisy(row, 0.6, rng, 4) for row in y])
    got = stats.metrics_from_confusion(stats.confusion_counts(y, pred, 4))
    for b in range(5):
        labels = list(range(4))
        for average in ("macro", "weighted"):
            p, r, f, _ = precision_recall_fscore_support(y[b], pred[b], labels=labels, average=average, zero_division=0)
            assert got[f"{average}_precision"][b] == pytest.approx(p)
            assert got[f"{average}_recall"][b] == pytest.approx(r)
            assert got[f"{average}_f1"][b] == pytest.approx(f)
        assert got["accuracy"][b] == pytest.approx(accuracy_score(y[b], pred[b]))
        assert got["f1_of_weighted_pr"][b] == pytest.approx(
            f1_of_weighted_pr(got["weighted_precision"][b], got["weighted_recall"][b]))
        per_class = f1_score(y[b], pred[b], labels=labels, average=None, zero_division=0)
        assert stats.per_class_scores(stats.confusion_counts(y[b], pred[b], 4))["f1"] == pytest.approx(per_class)


def test_mean_and_sample_std():
    assert stats.mean_std([0.7, 0.8, 0.75]) == pytest.approx((0.75, statistics.stdev([0.7, 0.8, 0.75])))
    mean, std = stats.mean_std([0.5])
    assert mean == 0.5 and math.isnan(std)


def test_bootstrap_interval_of_accuracy_matches_the_normal_approximation():
    """Accuracy over n items is a binomial proportion: the percentile bootstrap's 95% interval is close to
    p ± 1.96 sqrt(p(1-p)/n) (n = 2000 makes the two agree within a point)."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 2000)
    pred = _noisy(y, 0.7, rng)
    p = accuracy_score(y, pred)
    half = 1.959964 * math.sqrt(p * (1 - p) / len(y))
    interval = stats.bootstrap_interval(y, pred[None], "accuracy", 3, resamples=2000, seed=1)
    assert interval.point == pytest.approx(p)
    assert interval.low == pytest.approx(p - half, abs=0.006) and interval.high == pytest.approx(p + half, abs=0.006)


def test_bootstrap_pools_seeds_by_resampling_the_same_items_for_each():
    """The statistic is the seed mean of the metric with every seed resampled at the same items: a
    hand-written percentile bootstrap of that statistic (its own generator) gives the same interval
    within resampling noise, and pooling two seeds that disagree narrows nothing it should not."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 400)
    preds = np.stack([_noisy(y, 0.75, rng), _noisy(y, 0.65, rng)])
    interval = stats.bootstrap_interval(y, preds, "macro_f1", 3, resamples=3000, seed=2)
    own = np.random.default_rng(99)
    values = []
    for _ in range(2000):
        idx = own.integers(0, len(y), len(y))
        values.append(np.mean([_f1s(y[idx], p[idx])[0] for p in preds]))
    low, high = np.percentile(values, [2.5, 97.5])
    point = np.mean([f1_score(y, p, labels=[0, 1, 2], average="macro", zero_division=0) for p in preds])
    assert interval.point == pytest.approx(point)
    assert interval.low == pytest.approx(low, abs=0.01) and interval.high == pytest.approx(high, abs=0.01)


def test_randomisation_test_is_the_exact_swap_distribution_on_few_items():
    """With 2^n <= resamples, scipy enumerates every swap: the p-value must equal the one counted here
    over all 2^n ways to swap items between the rows (scipy's two-sided: twice the smaller tail)."""
    rng = np.random.default_rng(7)
    n, k = 9, 2
    y = rng.integers(0, 3, n)
    a = np.stack([_noisy(y, 0.8, rng) for _ in range(k)])
    b = np.stack([_noisy(y, 0.4, rng) for _ in range(k)])

    def seed_mean(p):
        return np.mean([_f1s(y, row)[1] for row in p])

    observed = seed_mean(a) - seed_mean(b)
    null = []
    for swap in itertools.product([False, True], repeat=n):
        s = np.array(swap)
        null.append(seed_mean(np.where(s, b, a)) - seed_mean(np.where(s, a, b)))
    null = np.array(null)
    eps = 1e-12
    expected = min(1.0, 2 * min(np.mean(null >= observed - eps), np.mean(null <= observed + eps)))
    diff, p = stats.paired_randomisation_test(y, a, b, "weighted_f1", 3, resamples=9999, seed=0)
    assert diff == pytest.approx(observed)
    assert p == pytest.approx(expected)


def test_mcnemar_exact_is_the_binomial_test_of_the_discordant_items():
    y = np.array([0] * 40)
    a = np.array([0] * 30 + [1] * 10)  # a right on the first 30
    b = np.array([0] * 18 + [1] * 12 + [0] * 4 + [1] * 6)  # b right on 18 of those and 4 others
    only_a, only_b = 12, 4
    m = only_a + only_b
    expected = min(1.0, 2 * sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2 ** m)
    got = stats.mcnemar_exact(y, a, b)
    assert (got["only_a"], got["only_b"]) == (only_a, only_b)
    assert got["pvalue"] == pytest.approx(expected)


def test_holm_by_hand():
    p = [0.01, 0.04, math.nan, 0.03, 0.2]
    present = [0.01, 0.04, 0.03, 0.2]
    order = sorted(range(4), key=lambda i: present[i])
    adjusted, running = [0.0] * 4, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (4 - rank) * present[i]))
        adjusted[i] = running
    got = stats.holm(p)
    assert math.isnan(got[2])
    assert [got[0], got[1], got[3], got[4]] == pytest.approx(adjusted)


def test_summary_pairs_seeds_and_names_its_methods():
    """A 2-row, 3-seed table: means/stds from scikit-learn, McNemar as the largest per-seed p, Holm over
    one tested row (unchanged), and a row missing a seed of the reference is paired on the common ones."""
    rng = np.random.default_rng(11)
    ids = [f"i{k}" for k in range(300)]
    y = rng.integers(0, 3, 300)
    cells = []
    for seed in (0, 1, 2):
        cells.append(stats.CellPredictions("ref", "d", seed, ids, y, _noisy(y, 0.8, rng)))
        if seed != 2:
            cells.append(stats.CellPredictions("low", "d", seed, ids, y, _noisy(y, 0.5, rng)))
    out = stats.summarise(cells, rows=["ref", "low"], reference="ref", labels={"d": ["neg", "neu", "pos"]},
                          resamples=1000, permutation_resamples=999)
    ref, low = out
    accs = [accuracy_score(y, c.y_pred) for c in cells if c.row == "ref"]
    assert ref["accuracy_mean"] == pytest.approx(statistics.mean(accs))
    assert ref["accuracy_std"] == pytest.approx(statistics.stdev(accs))
    assert ref["accuracy_ci_low"] < ref["accuracy_mean"] < ref["accuracy_ci_high"]
    assert low["paired_seeds"] == [0, 1] and low["seeds"] == [0, 1]
    low_cells = [c for c in cells if c.row == "low"]
    ref_cells = {c.seed: c for c in cells if c.row == "ref"}
    assert low["accuracy_p"] == pytest.approx(max(stats.mcnemar_exact(y, c.y_pred, ref_cells[c.seed].y_pred)["pvalue"]
                                                  for c in low_cells))
    assert low["accuracy_p_holm"] == pytest.approx(low["accuracy_p"])  # a family of one
    assert low["weighted_f1_significant"] is True and low["weighted_f1_diff"] < 0
    assert "approximate randomisation" in low["f1_test"] and "McNemar" in low["accuracy_test"]
    assert "1000 resamples" in ref["ci_method"] and "[0, 1, 2]" in ref["ci_method"]
    per_class = {c["label"]: c for c in ref["per_class_f1"]}
    expected = [f1_score(y, c.y_pred, labels=[0], average=None)[0] for c in cells if c.row == "ref"]
    assert per_class["neg"]["mean"] == pytest.approx(statistics.mean(expected))
