"""Batch-level losses (plain torch). Each takes the features of the batch it should see: under DDP,
pass features gathered across ranks with ``umaf.distributed.gather_with_grad`` so the loss is the
one of the global batch (see that module's docstring for why no rescaling is needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def uniformity_loss(z: torch.Tensor, tau: float) -> torch.Tensor:
    """UMAF Eq. 5: ``1/B * sum_i log sum_{j != i} exp(cos(z_i, z_j) / tau)`` for ``z [B, d]``.

    Minimising it pushes the sequence features of different samples apart. With ``B < 2`` the inner
    sum is empty (log 0); the loss is then 0 (and keeps ``z`` in the graph so DDP sees a gradient).
    """
    if z.dim() != 2:
        raise ValueError(f"uniformity_loss expects [B, d] features, got shape {tuple(z.shape)}")
    batch = z.shape[0]
    if batch < 2:
        return z.sum() * 0.0
    unit = F.normalize(z, dim=-1)
    sim = unit @ unit.T / tau  # cos(z_i, z_j) / tau
    self_pairs = torch.eye(batch, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_pairs, float("-inf"))  # j != i
    return torch.logsumexp(sim, dim=1).mean()
