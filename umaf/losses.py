"""Batch-level losses (plain torch). Each takes the features of the batch it should see: under DDP,
pass features gathered across ranks with ``umaf.distributed.gather_with_grad`` so the loss is the
one of the global batch (see that module's docstring for why no rescaling is needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from umaf.distributed import all_reduce_sum, gather_no_grad
from umaf.distributed import rank as dist_rank


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


# --------------------------------------------------------------------------------------------
# SPP-SCL supervised contrastive losses (SPP-SCL paper Eq. 4–6, Algorithm 1 lines 8–12).
#
# Each takes ``compat``: ``"paper"`` (default) is the paper / standard supervised contrastive
# learning (Khosla et al. 2020); ``"official"`` reproduces the official code (TomorrowJW/SPP-SCL,
# loss.py and train.py) where it differs. As ``uniformity_loss``, the two losses take the batch they
# should see (under DDP: ``gather_with_grad`` first). ``needs_inter_alignment`` takes this rank's
# rows and reduces its counts across ranks itself, so that the decision is one for all ranks.

SPPSCL_COMPAT = ("paper", "official")
INTER_POSITIVES = ("paired", "printed")


def _check_compat(compat: str) -> None:
    if compat not in SPPSCL_COMPAT:
        raise ValueError(f"compat must be one of {SPPSCL_COMPAT}, got {compat!r}")


def _mean_log_prob_over_positives(
    log_prob: torch.Tensor, positives: torch.Tensor, *, count_anchors_without_positives: bool
) -> torch.Tensor:
    """``-mean_anchors( mean_{p in P(i)} log_prob[i, p] )``.

    The paper's Eq. 4–6 print ``1/B`` as the inner normaliser; the text cites Khosla et al., whose
    loss averages over the |P(i)| positives, as does the official code: we follow that. Anchors with
    no positive either drop out of the mean (standard SupCon) or count as zero (official code, which
    clamps |P(i)| to 1 and averages over all B anchors).
    """
    positives = positives.to(log_prob.dtype)
    num_pos = positives.sum(dim=1)
    # where() instead of multiplying: -inf * 0 (masked self terms) would be NaN.
    pos_log_prob = torch.where(positives > 0, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = pos_log_prob / num_pos.clamp(min=1)
    if count_anchors_without_positives:
        return -per_anchor.mean()
    has_pos = num_pos > 0
    if not bool(has_pos.any()):
        # No anchor has a positive: no signal, but keep the graph so DDP sees every parameter.
        return (log_prob.sum() * 0.0).nan_to_num()
    return -per_anchor[has_pos].mean()


def supcon_loss(z: torch.Tensor, y: torch.Tensor, tau: float = 0.07, compat: str = "paper") -> torch.Tensor:
    """Intra-modal supervised contrastive loss, L_cli / L_clt (SPP-SCL Eq. 4–5).

    ``z``: ``[B, D]`` features of one modality (L2-normalised here); ``y``: ``[B]`` integer labels.
    Positives of anchor i are the other samples with its label (the Intra-Mask ``1[y_i=y_j, i≠j]``);
    the denominator sums over every sample except the anchor (``k≠i``).

    ``compat="official"``: the official code zeroes the diagonal *logit* instead of removing it, so
    the anchor's own term stays in the denominator as ``exp(0)``, and anchors without positives
    count as zero in the mean over all B anchors.
    """
    _check_compat(compat)
    z = F.normalize(z, dim=-1)
    y = y.reshape(-1)
    logits = z @ z.T / tau
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positives = (y[:, None] == y[None, :]) & ~self_mask
    if compat == "official":
        denominator_logits = logits.masked_fill(self_mask, 0.0)  # exp(0) stays in the denominator
    else:
        denominator_logits = logits.masked_fill(self_mask, float("-inf"))  # sum over k ≠ i
    log_prob = logits - torch.logsumexp(denominator_logits, dim=1, keepdim=True)
    return _mean_log_prob_over_positives(log_prob, positives, count_anchors_without_positives=compat == "official")


def supcon_cross_loss(
    t: torch.Tensor, i: torch.Tensor, y: torch.Tensor, tau: float = 0.07, compat: str = "paper",
    inter_positives: str = "paired",
) -> torch.Tensor:
    """Inter-modal supervised contrastive loss L_clm (SPP-SCL Eq. 6): text anchors against images.

    Anchor m is text ``t[m]``; the denominator sums over all B images (``t=1..B``, its paired image
    included); its positives are the images ``i[n]`` with the same label:

    - ``inter_positives="paired"`` (default): the paired image ``i[m]`` is one of them. The paper's
      text says L_clm "pulls image-text pairs of the same sentiment class closer", and the official
      code's mask keeps the diagonal. Every anchor then has a positive.
    - ``"printed"``: Eq. 6's Inter-Mask as printed, ``1[y_m=y_n, m≠n]``. The paired image is then in
      the denominator only, so the gradient always LOWERS the paired similarity (the printed
      ``m≠n`` is almost surely the intra-modal mask's ``i≠j`` carried over). Anchors whose label no
      other sample shares have no positive and drop out of the mean.

    ``compat="official"``: anchors without positives count as zero in the mean over all B anchors
    (only possible with ``"printed"``); with the default ``"paired"`` it is the official loss.
    """
    _check_compat(compat)
    if inter_positives not in INTER_POSITIVES:
        raise ValueError(f"inter_positives must be one of {INTER_POSITIVES}, got {inter_positives!r}")
    t = F.normalize(t, dim=-1)
    i = F.normalize(i, dim=-1)
    y = y.reshape(-1)
    logits = t @ i.T / tau
    positives = y[:, None] == y[None, :]
    if inter_positives == "printed":
        positives = positives & ~torch.eye(len(t), dtype=torch.bool, device=t.device)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return _mean_log_prob_over_positives(log_prob, positives, count_anchors_without_positives=compat == "official")


def needs_inter_alignment(
    t: torch.Tensor, i: torch.Tensor, y: torch.Tensor, alpha: float = 2 / 3, compat: str = "paper"
) -> bool:
    """SPP-SCL Algorithm 1 lines 8–12: should step 2 (L_clm) run on this batch?

    ``t``, ``i``, ``y``: this rank's rows (not gathered; the whole batch in a single process).

    ``S = sim(T_p', I_p')`` over the global batch, ``d`` = mean of its diagonal (paired similarity),
    ``c`` = number of entries of S below d, ``c_mask`` = number of ones in the Inter-Mask; true when
    ``c < alpha * c_mask``: few pairs are less similar than the paired ones, i.e. the modalities are
    not yet aligned by label.

    ``compat`` picks the check (``SppSclConfig.alignment_check``), independently of Eq. 6's positives:
    paper form: cosine similarity (the features are "ℓ2-normalised"), ``c_mask`` counts the printed
    Inter-Mask (no diagonal). ``compat="official"``: ``sigmoid(T @ I^T)`` of the raw features, the
    mask's diagonal counted, and the threshold truncated to an integer (``count < int(mask * 2/3)``).
    The two fire at very different rates for the same alpha (on random batches the official one
    fired 14/300, the paper one 0/300); the paper's alpha = 2/3 (Table 2, Fig. 5) was tuned with the
    released code, i.e. the official check.

    Under DDP each rank counts its own rows of S against the gathered images, the counts and the
    diagonal sum are all-reduced, and every rank compares the same integers: the decision is one
    decision for all ranks (ranks that disagreed about a second optimizer step would deadlock DDP).
    """
    _check_compat(compat)
    with torch.no_grad():
        t = t.detach().float()
        i_local = i.detach().float()
        if compat == "official":
            local_sim = torch.sigmoid(t @ gather_no_grad(i_local).T)
        else:
            t = F.normalize(t, dim=-1)
            local_sim = t @ F.normalize(gather_no_grad(i_local), dim=-1).T
        y_local = y.reshape(-1)
        y_all = gather_no_grad(y_local)
        offset = _row_offset(len(t), t.device)
        rows = torch.arange(len(t), device=t.device)
        diag = local_sim[rows, rows + offset]
        diag_sum_and_rows = all_reduce_sum(torch.stack([diag.double().sum(), torch.tensor(len(t), dtype=torch.float64, device=t.device)]))
        d = (diag_sum_and_rows[0] / diag_sum_and_rows[1]).to(local_sim.dtype)
        same_label = y_local[:, None] == y_all[None, :]
        if compat != "official":
            same_label[rows, rows + offset] = False
        counts = all_reduce_sum(torch.stack([(local_sim < d).sum(), same_label.sum()]).long())
        c, c_mask = int(counts[0]), int(counts[1])
    if compat == "official":
        return c < official_step2_threshold(c_mask, alpha)
    return c < alpha * c_mask


def official_step2_threshold(c_mask: int, alpha: float) -> int:
    """The released train.py's bound ``int(mask.item() * (2/3))``: a float product truncated to an
    integer. With ``alpha = 2/3`` (give it as the fraction ``"2/3"``, not 0.6667) it equals the
    official one at every ``c_mask``."""
    return int(float(c_mask) * alpha)


def _row_offset(n_local: int, device: torch.device) -> int:
    """Index of this rank's first row in the gathered (rank-ordered) batch."""
    sizes = gather_no_grad(torch.tensor([n_local], device=device))
    return int(sizes[: dist_rank()].sum()) if len(sizes) > 1 else 0
