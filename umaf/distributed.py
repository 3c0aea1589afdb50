"""Batch-level losses under DDP: gather features from every rank, keeping the gradient path.

A loss that couples the samples of a batch (uniformity, supervised contrastive) computed per rank
silently changes the method under DDP: each rank would only see B/N samples. As open_clip's
``gather_features(gather_with_grad=True)``, we all-gather features with autograd and every rank
computes the *same* loss over the global batch.

Why no rescaling is needed: ``torch.distributed.nn.all_gather``'s backward sums the incoming
gradients over ranks (reduce-scatter SUM). Every rank holds the identical global loss L, so rank r
receives N * dL/dz_r for its own samples; DDP then averages parameter gradients over the N ranks,
giving exactly dL/dθ — the gradient one process would get on the concatenated batch. Per-sample
losses (cross-entropy) stay local: DDP's mean of per-rank means is the global mean for equal shards.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _gathered_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad], dim=0)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 in rank order, differentiably.

    Ranks may hold different numbers of rows (the last batch of an epoch): rows are padded for the
    collective and the padding is cut off again, so the result has exactly the real rows.
    """
    if not is_distributed():
        return tensor
    sizes = _gathered_sizes(tensor.shape[0], tensor.device)
    padded = _pad_rows(tensor, max(sizes))
    with warnings.catch_warnings():
        # torch 2.13 deprecates it in favour of private functional collectives; it is still the
        # public differentiable all-gather, and the warning would repeat every step in every worker.
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        parts = dist_nn.all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (labels, masks: no gradient)."""
    if not is_distributed():
        return tensor
    sizes = _gathered_sizes(tensor.shape[0], tensor.device)
    padded = _pad_rows(tensor.detach(), max(sizes)).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a (count-like) tensor over ranks, in place and returned."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
