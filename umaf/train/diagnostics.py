"""SPP-SCL diagnostics written to the run folder: same-label distances (paper Fig. 1/4) and a t-SNE plot (Fig. 3).

- IID / TTD / ITD: average Euclidean distance between the *same-label* sentiment embeddings,
  image–image (``I_p``), text–text (``T_p``) and image–text, per class and over all classes. The
  embeddings are L2-normalised first, the space the contrastive losses shape (Eq. 4–6); the paper's
  claim is that SPP-SCL makes the three nearly equal (IID ≈ TTD ≈ ITD). Image–image and text–text
  pairs exclude a sample with itself; image–text pairs include a sample's own pair.
- t-SNE (sklearn) of the fusion features before the classifier, coloured by label, as a PNG.

Plain numpy/sklearn/matplotlib, no Ray: the method's ``finish`` hook feeds it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _mean_pairwise(a: np.ndarray, b: np.ndarray, exclude_self: bool) -> float | None:
    dist = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    if exclude_self:
        n = len(a)
        if n < 2:
            return None
        return float((dist.sum() - np.trace(dist)) / (n * (n - 1)))
    return float(dist.mean()) if dist.size else None


def same_label_distances(image_p: np.ndarray, text_p: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """``{class_name: {"IID", "TTD", "ITD", "n"}, ..., "all": {...}}`` (the "all" entry averages the
    classes that have at least two samples, weighting each class equally)."""
    image_p, text_p, labels = _normalise(np.asarray(image_p, float)), _normalise(np.asarray(text_p, float)), np.asarray(labels)
    out: dict[str, Any] = {}
    for index, name in enumerate(label_names):
        rows = labels == index
        if not rows.any():
            continue
        i, t = image_p[rows], text_p[rows]
        out[name] = {
            "n": int(rows.sum()),
            "IID": _mean_pairwise(i, i, exclude_self=True),
            "TTD": _mean_pairwise(t, t, exclude_self=True),
            "ITD": _mean_pairwise(i, t, exclude_self=False),
        }
    complete = [v for v in out.values() if v["IID"] is not None]
    out["all"] = {key: (float(np.mean([v[key] for v in complete])) if complete else None) for key in ("IID", "TTD", "ITD")}
    out["all"]["n"] = int(len(labels))
    return out


def tsne_png(features: np.ndarray, labels: np.ndarray, label_names: list[str], title: str, seed: int = 0) -> bytes:
    """A 2-D t-SNE scatter of ``features`` coloured by label, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(features)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 samples, got {n}")
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for index, name in enumerate(label_names):
        rows = labels == index
        if rows.any():
            ax.scatter(points[rows, 0], points[rows, 1], s=8, label=name)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
