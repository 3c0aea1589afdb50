"""Classification metrics for every method (pure numpy/scikit-learn)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Accuracy; macro and weighted precision/recall/F1; per-class report; confusion matrix
    (rows: true label, columns: predicted, in ``label_names`` order)."""
    labels = list(range(len(label_names)))
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    out: dict[str, Any] = {"n": int(len(y_true))}
    if len(y_true) == 0:
        return out
    out["accuracy"] = float(accuracy_score(y_true, y_pred))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        out[f"{average}_precision"], out[f"{average}_recall"], out[f"{average}_f1"] = float(p), float(r), float(f)
    out["f1_of_weighted_pr"] = f1_of_weighted_pr(out["weighted_precision"], out["weighted_recall"])
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=label_names, output_dict=True, zero_division=0
    )
    out["per_class"] = {name: {k: float(v) for k, v in report[name].items()} for name in label_names}
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    out["labels"] = list(label_names)
    return out


def f1_of_weighted_pr(weighted_precision: float, weighted_recall: float) -> float:
    """The UMAF paper's F1 (Tables 1 and 4): the harmonic mean of weighted precision and weighted recall,
    e.g. P 89.57, R 89.34 -> F1 89.46 (MSED sentiment). It is not sklearn's weighted F1 (the support-
    weighted mean of per-class F1), which is never above it and can be several points lower."""
    total = weighted_precision + weighted_recall
    return 0.0 if total == 0 else 2 * weighted_precision * weighted_recall / total


def scalar_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The flat numeric entries of ``classification_metrics`` with a prefix (for reports, TensorBoard)."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "n"}


def majority_baseline(y_train: np.ndarray, y_eval: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Metrics of always predicting the most frequent training label: the floor any model must beat."""
    majority = int(np.bincount(np.asarray(y_train, dtype=np.int64), minlength=len(label_names)).argmax())
    return classification_metrics(y_eval, np.full(len(y_eval), majority), label_names)
