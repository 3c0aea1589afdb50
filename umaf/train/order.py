"""Which rows a step or an evaluation batch holds: the training epoch's permutation and the evaluation
protocols (pure numpy, no Ray).

**Training order.** Each epoch draws a full permutation of the training split from ``(seed, epoch)``
alone, as the papers' ``DataLoader(shuffle=True)`` does, and cuts it into global batches of
``batch_size`` consecutive rows. Under DDP rank r takes the r-th part of every global batch, so one
process and N workers see the same global batches in the same order (the gradient of the global batch
is the same sum either way). The last global batch is kept unless it is too small to give every rank
``min_rows`` rows (BatchNorm and the contrastive losses need two), so every rank takes the same number
of steps.

**Evaluation protocols** (``TrainConfig.eval.protocol``). SPP-SCL's CMF attends across the batch, so
a pair's prediction depends on its batch-mates:

- ``official_order``: the official protocol. The split in its source file's order (the manifest's
  ``source_index``), consecutive batches of ``eval_batch_size``. The CLMLF files are sorted by label,
  so each pair is predicted among same-label batch-mates: the metric can lean on other test pairs'
  labels.
- ``train_context``: each pair is predicted in a batch of ``eval_batch_size`` whose other members are
  training pairs: one seeded draw of ``eval_batch_size - 1`` training pairs, the same for every pair.
  A prediction then depends on the pair itself and on labelled training data only, never on another
  test pair, and CMF still sees a batch of the size it was trained with. One draw keeps it a single
  deterministic pass (no average over shuffles of the test split, each of which would still mix test
  pairs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PROTOCOLS = ("train_context", "official_order")


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of the ``n`` training rows: a function of ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batches(n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int,
                  min_rows: int = 2) -> list[np.ndarray]:
    """Row positions of this rank's part of each global batch of the epoch, in order."""
    order = epoch_permutation(n, seed, epoch)
    parts = []
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        if len(rows) < world * min_rows:
            break  # a last batch too small to give every rank min_rows rows
        parts.append(np.array_split(rows, world)[rank])
    return parts


def steps_per_epoch(n: int, batch_size: int, world: int, min_rows: int = 2) -> int:
    full, last = divmod(n, batch_size)
    return full + int(last >= world * min_rows)


def source_order(positions: Sequence[int | None]) -> np.ndarray:
    """Row positions sorted by their source-file position (rows without one keep their place, last)."""
    keys = [(p is None, p if p is not None else 0, i) for i, p in enumerate(positions)]
    return np.array([k[2] for k in sorted(keys)], dtype=np.int64)


def context_draw(n_train: int, eval_batch_size: int, seed: int) -> np.ndarray:
    """The ``train_context`` protocol's training pairs (row positions of the training split)."""
    size = min(max(0, eval_batch_size - 1), n_train)
    return np.sort(np.random.default_rng([seed, 20]).choice(n_train, size=size, replace=False))


def eval_batches(n: int, batch_size: int) -> list[np.ndarray]:
    return [np.arange(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]


__all__ = ["PROTOCOLS", "epoch_permutation", "epoch_batches", "steps_per_epoch", "source_order", "context_draw",
           "eval_batches"]
