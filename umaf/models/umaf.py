"""UMAF (Unified Multimodal Affective Framework), Section 3 of
``UMAF_explicit_representation_alignment``: plain torch, no Ray.

    H_base = Encoder([T; T_vlm])                    (Eq. 1)  pretrained text encoder (RoBERTa-base)
    Z      = Transformer_fusion(H_base)             (Eq. 2)  2 new layers, same hidden size, padding-masked
    s      = sigmoid(W_s Z + b_s)                   (Eq. 3)  one score per token
    h_top  = 1/K sum_{i in top-K(s)} Z_i            (Eq. 4)  → classifier → L_ce
    L_uni  = uniformity of masked-mean(Z) over the batch (Eq. 5, ``umaf.losses.uniformity_loss``)
    L      = L_ce + lambda * L_uni                  (Eq. 6)

Ablations (Tables 3, 4): any ``top_k``; ``nrf=False`` ("w/o NRF": no Top-K, no uniformity, the
masked-mean feature goes to the classifier); text-only (``use_captions=False``: ``T`` alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from umaf.config import StrictModel
from umaf.losses import uniformity_loss


class UmafConfig(StrictModel):
    """The ``umaf:`` section of the train config. The paper gives the architecture but no training
    hyper-parameters (learning rates, lambda, tau, max length): the defaults here are ours."""

    encoder: str = Field(
        "roberta-base",
        description="Hugging Face encoder id or local path; 'tiny-random-bert' builds a tiny random BERT "
        "(tests, offline demo)",
    )
    tokenizer: str | None = Field(None, description="tokenizer id/path; None: the encoder's")
    encoder_cache: str | None = Field(
        None, description="folder for built encoders (tiny-random-bert); None: ~/.cache/umaf/encoders"
    )
    train_encoder: bool = Field(True, description="fine-tune the pretrained encoder (False: frozen)")
    max_length: int = Field(256, ge=8, description="tokens of [T; T_vlm] incl. special tokens; T_vlm is cut first")
    use_captions: bool = Field(True, description="False: text-only ablation (T alone, no T_vlm)")
    fusion_layers: int = Field(2, ge=0, description="Transformer_fusion depth (Eq. 2; paper: 2)")
    fusion_heads: int | None = Field(None, ge=1, description="None: the encoder's attention heads")
    fusion_ffn_mult: int = Field(4, ge=1, description="feed-forward width = mult * hidden")
    dropout: float = Field(0.1, ge=0, lt=1)
    nrf: bool = Field(True, description="noise-robust features: Top-K + uniformity; False = 'w/o NRF'")
    top_k: int = Field(10, ge=1, description="K of Eq. 4 (paper best: 10)")
    topk_weighting: Literal["score", "literal"] = Field(
        "score",
        description="'score': selected tokens weighted by their scores so W_s learns; 'literal': Eq. 4 as "
        "written (W_s gets no gradient)",
    )
    uniformity_weight: float = Field(0.1, ge=0, description="lambda of Eq. 6")
    uniformity_tau: float = Field(0.1, gt=0, description="tau of Eq. 5")


@dataclass
class UmafOutput:
    logits: torch.Tensor  # [B, C]
    pooled: torch.Tensor  # [B, d] masked mean of Z: the sequence feature of Eq. 5
    selected: torch.Tensor  # [B, d] h_top (Eq. 4), or ``pooled`` without NRF
    scores: torch.Tensor | None  # [B, L] token scores s (Eq. 3), 0 at padding; None without NRF


def masked_mean(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``z [B, L, d]`` over positions where ``mask [B, L]`` is true."""
    weights = mask.to(z.dtype).unsqueeze(-1)
    return (z * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def topk_select(
    z: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, k: int, weighting: str = "score"
) -> torch.Tensor:
    """Eq. 4: mean of the K highest-scoring real tokens; with fewer than K real tokens, all of them.

    As printed, Eq. 4 (``1/K sum Z_i``) depends on ``s`` only through the arg-top-K indices, which
    have no gradient, so ``W_s, b_s`` (Eq. 3) would never learn. With ``weighting="score"`` (default)
    each selected token enters as ``s_i * Z_i``, so the classification loss trains the scorer; it
    equals Eq. 4 scaled by the scores. ``"literal"`` is Eq. 4 exactly.
    """
    real = mask.bool()
    masked_scores = scores.masked_fill(~real, float("-inf"))
    k_eff = min(k, z.shape[1])
    top_scores, top_idx = masked_scores.topk(k_eff, dim=1)  # [B, k]
    picked_real = torch.isfinite(top_scores)  # False where a short sequence ran out of real tokens
    picked = z.gather(1, top_idx.unsqueeze(-1).expand(-1, -1, z.shape[-1]))  # [B, k, d]
    weights = picked_real.to(z.dtype)
    if weighting == "score":
        weights = weights * scores.gather(1, top_idx).to(z.dtype)
    elif weighting != "literal":
        raise ValueError(f"topk weighting must be 'score' or 'literal', not {weighting!r}")
    count = picked_real.sum(1, keepdim=True).clamp_min(1).to(z.dtype)  # K' = min(K, real tokens)
    return (picked * weights.unsqueeze(-1)).sum(1) / count


class UmafModel(nn.Module):
    """Encoder → fusion Transformer → (Top-K | masked mean) → classifier."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_heads: int, num_classes: int, cfg: UmafConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        if not cfg.train_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        heads = cfg.fusion_heads or num_heads
        if hidden_size % heads:
            raise ValueError(f"fusion_heads={heads} does not divide the encoder hidden size {hidden_size}")
        layer = nn.TransformerEncoderLayer(
            d_model=hidden_size,
            nhead=heads,
            dim_feedforward=cfg.fusion_ffn_mult * hidden_size,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=False,
        )
        # enable_nested_tensor=False: keep dense [B, L, d] outputs (nested tensors zero the padding and
        # change shapes in eval); padding is excluded by the key padding mask and our masked pooling.
        self.fusion = (
            nn.TransformerEncoder(layer, num_layers=cfg.fusion_layers, enable_nested_tensor=False)
            if cfg.fusion_layers
            else nn.Identity()
        )
        self.scorer = nn.Linear(hidden_size, 1) if cfg.nrf else None  # W_s, b_s of Eq. 3
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def new_layers(self) -> list[nn.Module]:
        return [m for m in (self.fusion, self.scorer, self.classifier) if m is not None]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> UmafOutput:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        h_base = self.encoder(**kwargs).last_hidden_state  # Eq. 1
        real = attention_mask.bool()
        if isinstance(self.fusion, nn.TransformerEncoder):
            z = self.fusion(h_base, src_key_padding_mask=~real)  # Eq. 2
        else:
            z = h_base
        pooled = masked_mean(z, real)  # global sequence feature for Eq. 5
        if self.scorer is not None:
            scores = torch.sigmoid(self.scorer(z).squeeze(-1))  # Eq. 3
            selected = topk_select(z, scores, real, self.cfg.top_k, self.cfg.topk_weighting)  # Eq. 4
            scores = scores.masked_fill(~real, 0.0)
        else:
            scores, selected = None, pooled
        logits = self.classifier(self.dropout(selected))
        return UmafOutput(logits=logits, pooled=pooled, selected=selected, scores=scores)


def umaf_loss(
    out: UmafOutput,
    labels: torch.Tensor,
    cfg: UmafConfig,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> dict[str, torch.Tensor]:
    """Eq. 6: ``L_ce + lambda * L_uni``; ``L_uni`` on ``gather(pooled)`` — pass
    ``umaf.distributed.gather_with_grad`` under DDP so every rank scores the GLOBAL batch (Eq. 5 is
    a batch-level loss: per-rank batches would change the method)."""
    ce = F.cross_entropy(out.logits.float(), labels)
    if cfg.nrf and cfg.uniformity_weight > 0:
        uni = uniformity_loss(gather(out.pooled.float()), cfg.uniformity_tau)
    else:
        uni = torch.zeros((), device=ce.device)
    total = ce + cfg.uniformity_weight * uni if cfg.nrf else ce
    return {"loss": total, "ce": ce, "uniformity": uni}
