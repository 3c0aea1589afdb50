"""SPP-SCL's contrastive losses and step-2 test against direct, loop-by-loop formulas (Eq. 4–6,
Algorithm 1), in the paper form and in the official code's form (``compat="official"``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from umaf.losses import needs_inter_alignment, supcon_cross_loss, supcon_loss


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def direct_supcon(z: torch.Tensor, y: list[int], tau: float, official: bool) -> float:
    """Eq. 4–5 written out: -mean over anchors of mean over positives of log(exp(s_ip/τ) / Σ exp(s_ik/τ))."""
    n = len(y)
    per_anchor = []
    for i in range(n):
        denom = sum(math.exp(_cos(z[i], z[k]) / tau) for k in range(n) if k != i)
        if official:
            denom += math.exp(0.0)  # the official code's zeroed diagonal logit
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        if not positives:
            if official:
                per_anchor.append(0.0)
            continue
        terms = [math.log(math.exp(_cos(z[i], z[p]) / tau) / denom) for p in positives]
        per_anchor.append(-sum(terms) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def direct_cross(t: torch.Tensor, im: torch.Tensor, y: list[int], tau: float, official: bool, paired: bool) -> float:
    """Eq. 6 written out: text anchor m, image positives n with y_n = y_m (n ≠ m for the printed
    mask), all images in the denominator; anchors without positives drop out (official: count 0)."""
    n = len(y)
    per_anchor = []
    for m in range(n):
        denom = sum(math.exp(_cos(t[m], im[k]) / tau) for k in range(n))
        positives = [p for p in range(n) if y[p] == y[m] and (paired or p != m)]
        if not positives:
            if official:
                per_anchor.append(0.0)
            continue
        terms = [math.log(math.exp(_cos(t[m], im[p]) / tau) / denom) for p in positives]
        per_anchor.append(-sum(terms) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def direct_decision(t: torch.Tensor, im: torch.Tensor, y: list[int], alpha: float, official: bool) -> bool:
    n = len(y)
    if official:
        s = [[1 / (1 + math.exp(-float(t[a] @ im[b]))) for b in range(n)] for a in range(n)]
    else:
        s = [[_cos(t[a], im[b]) for b in range(n)] for a in range(n)]
    d = sum(s[k][k] for k in range(n)) / n
    c = sum(1 for a in range(n) for b in range(n) if s[a][b] < d)
    c_mask = sum(1 for a in range(n) for b in range(n) if y[a] == y[b] and (official or a != b))
    return c < int(c_mask * alpha) if official else c < alpha * c_mask


LABELS = [0, 1, 0, 2, 1, 0, 3]  # label 3 has a single sample: an anchor without positives


@pytest.mark.parametrize("compat", ["paper", "official"])
def test_supcon_loss_matches_direct_formula(compat: str) -> None:
    torch.manual_seed(0)
    z = torch.randn(len(LABELS), 5, dtype=torch.float64)
    got = supcon_loss(z, torch.tensor(LABELS), tau=0.5, compat=compat)
    assert got.item() == pytest.approx(direct_supcon(z, LABELS, 0.5, compat == "official"), rel=1e-9)


def test_supcon_compat_forms_differ_where_the_code_differs() -> None:
    torch.manual_seed(1)
    z = torch.randn(len(LABELS), 5, dtype=torch.float64)
    y = torch.tensor(LABELS)
    paper, official = supcon_loss(z, y, 0.5), supcon_loss(z, y, 0.5, compat="official")
    # The official form counts the lone anchor as 0 and adds exp(0) to every denominator.
    assert paper.item() != pytest.approx(official.item(), rel=1e-6)


@pytest.mark.parametrize("positives", ["paired", "printed"])
@pytest.mark.parametrize("compat", ["paper", "official"])
def test_supcon_cross_loss_matches_direct_formula(compat: str, positives: str) -> None:
    torch.manual_seed(2)
    t = torch.randn(len(LABELS), 4, dtype=torch.float64)
    im = torch.randn(len(LABELS), 4, dtype=torch.float64)
    got = supcon_cross_loss(t, im, torch.tensor(LABELS), tau=0.3, compat=compat, inter_positives=positives)
    want = direct_cross(t, im, LABELS, 0.3, compat == "official", positives == "paired")
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_cross_loss_default_counts_the_paired_image_as_positive() -> None:
    """The default is the official code's Eq. 6 (the paired image a positive) in both compat modes;
    compat=official's cross loss is unchanged by the new setting."""
    torch.manual_seed(4)
    t, im = torch.randn(len(LABELS), 4, dtype=torch.float64), torch.randn(len(LABELS), 4, dtype=torch.float64)
    y = torch.tensor(LABELS)
    paired = direct_cross(t, im, LABELS, 0.3, official=False, paired=True)
    assert supcon_cross_loss(t, im, y, 0.3).item() == pytest.approx(paired, rel=1e-9)
    assert supcon_cross_loss(t, im, y, 0.3, compat="official").item() == pytest.approx(paired, rel=1e-9)
    assert supcon_cross_loss(t, im, y, 0.3, inter_positives="printed").item() != pytest.approx(paired, rel=1e-6)
    with pytest.raises(ValueError, match="inter_positives"):
        supcon_cross_loss(t, im, y, 0.3, inter_positives="diagonal")


def test_printed_mask_pushes_the_paired_image_away_and_paired_pulls_it() -> None:
    """Why the default changed: with the printed mask 1[y_m = y_n, m != n], a text's own image sits
    in the denominator only, so a gradient step lowers the paired similarity; with the paired image
    among the positives, the same step raises it (the paper's "pulls image-text pairs closer")."""
    torch.manual_seed(5)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    t0, im = torch.randn(6, 8), torch.randn(6, 8)

    def paired_similarity_after_a_step(positives: str) -> tuple[float, float]:
        t = t0.clone().requires_grad_(True)
        supcon_cross_loss(t, im, y, 0.1, inter_positives=positives).backward()
        before = F.cosine_similarity(t0, im).mean().item()
        after = F.cosine_similarity(t.detach() - 0.05 * t.grad, im).mean().item()
        return before, after

    before, after_printed = paired_similarity_after_a_step("printed")
    assert after_printed < before
    _, after_paired = paired_similarity_after_a_step("paired")
    assert after_paired > before


def test_losses_scale_invariant_and_differentiable() -> None:
    """Features are L2-normalised inside (Eq. 4: cosine similarity), and gradients are finite."""
    torch.manual_seed(3)
    z = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = supcon_loss(z, y, 0.07) + supcon_cross_loss(z, z.flip(0), y, 0.07)
    assert supcon_loss(z * 7.5, y, 0.07).item() == pytest.approx(supcon_loss(z, y, 0.07).item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_no_positive_anywhere_gives_zero_with_graph() -> None:
    z = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    loss = supcon_loss(z, y, 0.1)
    assert loss.item() == 0.0
    loss.backward()  # still in the graph, so a DDP step sees every parameter
    assert z.grad is not None


def test_supcon_pulls_same_label_together() -> None:
    """Lower loss when same-label samples coincide than when they are spread (the loss's purpose)."""
    y = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0], [1.0, 0.01], [0, 1.0], [0.01, 1.0]])
    mixed = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0.01], [0.01, 1.0]])
    assert supcon_loss(clustered, y, 0.1) < supcon_loss(mixed, y, 0.1)


# ---- Algorithm 1 lines 8–12 ----------------------------------------------------------------


def test_aligned_pairs_skip_step_two() -> None:
    """Each text equals its paired image, other pairs orthogonal: S = I, d = 1, all 12 off-diagonal
    entries are below d; c = 12 ≥ 2/3 * c_mask (4 same-label off-diagonal pairs): no L_clm step."""
    basis = torch.eye(4)
    y = torch.tensor([0, 0, 1, 1])
    assert needs_inter_alignment(basis, basis, y, alpha=2 / 3) is False


def test_mismatched_pairs_trigger_step_two() -> None:
    """Each text is orthogonal to its own image but equal to another pair's image: d = 0 and no entry
    of S is below it, c = 0 < 2/3 * 4: the modalities are not aligned, run L_clm."""
    basis = torch.eye(4)
    images = basis[[1, 0, 3, 2]]
    y = torch.tensor([0, 0, 1, 1])
    assert needs_inter_alignment(basis, images, y, alpha=2 / 3) is True


def test_threshold_compares_with_the_inter_mask_count() -> None:
    """Same S = I (c = 12): with alpha large enough that alpha * c_mask > 12 the step runs."""
    basis = torch.eye(4)
    y = torch.tensor([0, 0, 1, 1])
    assert needs_inter_alignment(basis, basis, y, alpha=3.0) is False  # 12 < 3*4 is false
    assert needs_inter_alignment(basis, basis, y, alpha=3.01) is True  # 12 < 12.04
    # official: c_mask counts the diagonal (8) and the threshold is truncated: 12 < int(8*1.6)=12 false
    assert needs_inter_alignment(basis, basis, y, alpha=1.6, compat="official") is False
    assert needs_inter_alignment(basis, basis, y, alpha=1.65, compat="official") is True  # 12 < int(13.2)


@pytest.mark.parametrize("compat", ["paper", "official"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_decision_matches_direct_computation(compat: str, seed: int) -> None:
    torch.manual_seed(seed)
    y = [int(v) for v in torch.randint(0, 3, (9,))]
    t, im = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    for alpha in (1 / 3, 2 / 3, 1.0, 2.0):
        got = needs_inter_alignment(t, im, torch.tensor(y), alpha=alpha, compat=compat)
        assert got == direct_decision(t, im, y, alpha, compat == "official"), alpha


def test_bad_compat_is_rejected() -> None:
    with pytest.raises(ValueError, match="compat"):
        supcon_loss(torch.randn(2, 2), torch.tensor([0, 0]), 0.1, compat="offical")
