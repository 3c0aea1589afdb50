"""uniformity_loss (UMAF Eq. 5) against the formula written out with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from umaf.losses import uniformity_loss


def direct_uniformity(z: torch.Tensor, tau: float) -> float:
    """Eq. 5 literally: 1/B sum_i log sum_{j != i} exp(cos(z_i, z_j) / tau)."""
    rows = z.tolist()
    total = 0.0
    for i, zi in enumerate(rows):
        inner = 0.0
        for j, zj in enumerate(rows):
            if j == i:
                continue
            dot = sum(a * b for a, b in zip(zi, zj))
            cos = dot / (math.sqrt(sum(a * a for a in zi)) * math.sqrt(sum(b * b for b in zj)))
            inner += math.exp(cos / tau)
        total += math.log(inner)
    return total / len(rows)


@pytest.mark.parametrize("batch,dim,tau", [(2, 3, 1.0), (5, 4, 0.1), (7, 16, 0.5)])
def test_matches_direct_formula(batch, dim, tau):
    torch.manual_seed(batch * 31 + dim)
    z = torch.randn(batch, dim, dtype=torch.float64)
    assert uniformity_loss(z, tau).item() == pytest.approx(direct_uniformity(z, tau), rel=1e-9)


def test_scale_invariant_and_minimised_by_spreading():
    torch.manual_seed(0)
    z = torch.randn(6, 8, dtype=torch.float64)
    # cosine similarity ignores each row's norm
    assert uniformity_loss(z * torch.rand(6, 1, dtype=torch.float64) * 10, 0.2).item() == pytest.approx(
        uniformity_loss(z, 0.2).item()
    )
    collapsed = torch.ones(6, 8, dtype=torch.float64) + 1e-3 * z
    spread = torch.eye(6, 8, dtype=torch.float64)  # orthogonal rows
    assert uniformity_loss(spread, 0.2) < uniformity_loss(collapsed, 0.2)
    # orthogonal rows: every cos is 0, so each inner sum is B-1 → loss = log(B-1)
    assert uniformity_loss(spread, 0.2).item() == pytest.approx(math.log(5))


def test_gradient_pushes_features_apart():
    z = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]], requires_grad=True)
    loss = uniformity_loss(z, 0.5)
    loss.backward()
    stepped = (z - 0.1 * z.grad).detach()
    assert uniformity_loss(stepped, 0.5) < loss


def test_single_sample_is_zero_with_grad_path_and_bad_shape_is_rejected():
    z = torch.randn(1, 4, requires_grad=True)
    loss = uniformity_loss(z, 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad is not None and torch.all(z.grad == 0)
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        uniformity_loss(torch.randn(2, 3, 4), 0.1)
