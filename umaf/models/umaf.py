"""UMAF (Unified Multimodal Affective Framework), Section 3 of
``UMAF_explicit_representation_alignment``: plain torch, no Ray.

    H_base = Encoder([T; T_vlm])                    (Eq. 1)  pretrained text encoder (RoBERTa-base)
    Z      = Transformer_fusion(H_base)             (Eq. 2)  2 new layers, same hidden size, padding-masked
    s      = sigmoid(W_s Z + b_s)                   (Eq. 3)  one score per token
    h_top  = 1/K sum_{i in top-K(s)} Z_i            (Eq. 4)  → classifier → L_ce  (straight-through
                                                             gradient to W_s, b_s: see ``topk_select``)
    L_uni  = uniformity of masked-mean(Z) over the batch (Eq. 5, ``umaf.losses.uniformity_loss``)
    L      = L_ce + lambda * L_uni                  (Eq. 6)

Ablations (Tables 3, 4): any ``top_k``; ``nrf=False`` ("w/o NRF": no Top-K, no uniformity, the
masked-mean feature goes to the classifier); text-only (``use_captions=False``: ``T`` alone).

Table 3's feature-extractor rows (``backbone``): ``captions`` is the model above; ``text`` is ``T``
alone through the text encoder (BERT, RoBERTa or CLIP's text tower); ``image`` and ``text+image``
replace T_vlm by image tokens, a ResNet's grid or a ViT's / CLIP vision tower's patch tokens
(:class:`umaf.models.image_encoder.ImageTokenEncoder`), projected to the fusion width and appended to
the text tokens. The unified sequence then goes through the same fusion Transformer, Top-K and
uniformity loss, so the rows differ only in their encoders. Figure 3 (``return_attention``): the
mean attention each position of the unified sequence receives in the last fusion layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from umaf.config import ModelRef, PathOrUri, StrictModel
from umaf.losses import uniformity_loss


class UmafConfig(StrictModel):
    """The ``umaf:`` section of the train config. The paper gives the architecture but no training
    hyper-parameters (learning rates, lambda, tau, max length): the defaults here are ours."""

    encoder: ModelRef = Field(
        "roberta-base",
        description="Hugging Face encoder id or local path; 'tiny-random-bert' builds a tiny random BERT "
        "(tests, offline demo)",
    )
    tokenizer: ModelRef | None = Field(None, description="tokenizer id/path; None: the encoder's")
    encoder_cache: PathOrUri | None = Field(
        None, description="folder for built encoders (tiny-random-bert); None: ~/.cache/umaf/encoders"
    )
    train_encoder: bool = Field(True, description="fine-tune the pretrained encoder (False: frozen)")
    text_feature_cache: Literal["auto", "off"] = Field(
        "auto",
        description="auto: a frozen text encoder's (train_encoder=false) token states are computed once per split "
        "(eval mode) into <parent of out>/feature_cache and reused by every epoch, run and trial (rows over text, "
        "+ captions); off: the frozen encoder runs every step",
    )
    text_cache_dir: PathOrUri | None = Field(None, description="text-state cache folder; None: <parent of out>/feature_cache")
    max_length: int = Field(256, ge=8, description="tokens of [T; T_vlm] incl. special tokens; T_vlm is cut first")
    caption_field_shares: dict[str, float] = Field(
        default_factory=lambda: {"ocr": 1.0, "visual_scene": 1.0, "textimage_relation": 1.0},
        description="shares of the T_vlm token budget per caption field when T_vlm does not fit; a field needing "
        "less leaves the rest to the others (cuts are counted in data_report.json)",
    )
    use_captions: bool = Field(True, description="False: text-only ablation (T alone, no T_vlm)")
    backbone: Literal["captions", "text", "image", "text+image"] = Field(
        "captions",
        description="Table 3 rows: 'captions' = [T; T_vlm] through the text encoder (UMAF); 'text' = T alone; "
        "'image' = image tokens alone; 'text+image' = [T; image tokens] (image tokens projected to the fusion width)",
    )
    image_encoder: ModelRef | None = Field(
        None,
        description="image encoder for backbone image / text+image: a ResNet, ViT or CLIP id or local path "
        "(CLIP: its vision tower); 'tiny-random-resnet' / 'tiny-random-vit' / 'tiny-random-clip' build tiny ones",
    )
    train_image_encoder: bool = Field(
        False, description="fine-tune the image encoder (False: frozen, and its tokens can be cached)"
    )
    image_feature_cache: Literal["auto", "off"] = Field(
        "auto",
        description="auto: a frozen image encoder's tokens are computed once per split into <parent of out>/"
        "feature_cache and reused by every epoch and trial; off: the image encoder runs every step",
    )
    image_cache_dir: PathOrUri | None = Field(None, description="image-token cache folder; None: <parent of out>/feature_cache")
    attention_map: bool = Field(
        False,
        description="Figure 3: write <run>/attention/ (PNG + JSON) with the last fusion layer's mean attention per "
        "position of the unified sequence on the test split, by token source (text, caption field, image)",
    )
    fusion_layers: int = Field(2, ge=0, description="Transformer_fusion depth (Eq. 2; paper: 2)")
    fusion_heads: int | None = Field(None, ge=1, description="None: the encoder's attention heads")
    fusion_ffn_mult: int = Field(4, ge=1, description="feed-forward width = mult * hidden")
    dropout: float = Field(0.1, ge=0, lt=1)
    nrf: bool = Field(True, description="noise-robust features: Top-K + uniformity; False = 'w/o NRF'")
    top_k: int = Field(10, ge=1, description="K of Eq. 4 (paper best: 10)")
    topk_weighting: Literal["straight_through", "score", "literal"] = Field(
        "straight_through",
        description="'straight_through': Eq. 4's value exactly, with a straight-through gradient to W_s, b_s; "
        "'score': selected tokens weighted by their scores (changes Eq. 4's value); 'literal': Eq. 4 as "
        "written (W_s gets no gradient)",
    )
    uniformity_weight: float = Field(0.1, ge=0, description="lambda of Eq. 6")
    uniformity_tau: float = Field(0.1, gt=0, description="tau of Eq. 5")

    @model_validator(mode="after")
    def _check_backbone(self) -> UmafConfig:
        if self.uses_image and not self.image_encoder:
            raise ValueError(f"umaf.backbone={self.backbone!r} needs umaf.image_encoder (a ResNet, ViT or CLIP id or path)")
        return self

    @property
    def uses_text(self) -> bool:
        return self.backbone != "image"

    @property
    def uses_image(self) -> bool:
        return self.backbone in ("image", "text+image")

    @property
    def uses_captions(self) -> bool:
        """T_vlm in the sequence: the UMAF row (``captions``) unless the text-only ablation is asked."""
        return self.backbone == "captions" and self.use_captions

    @property
    def caches_text_states(self) -> bool:
        """The frozen text encoder's states come from the feature cache (not with image tokens: Table 3's
        multimodal rows cache the image side only)."""
        return self.uses_text and not self.uses_image and not self.train_encoder and self.text_feature_cache == "auto"

    @property
    def caches_image_tokens(self) -> bool:
        return self.uses_image and not self.train_image_encoder and self.image_feature_cache == "auto"

    @field_validator("caption_field_shares")
    @classmethod
    def _check_shares(cls, shares: dict[str, float]) -> dict[str, float]:
        fields = ("ocr", "visual_scene", "textimage_relation")  # umaf.caption.fields.CAPTION_FIELDS
        unknown = sorted(set(shares) - set(fields))
        if unknown:
            raise ValueError(f"unknown caption field(s) {unknown}: the fields are {', '.join(fields)}")
        if any(v <= 0 for v in shares.values()):
            raise ValueError(f"every share must be > 0, got {shares}")
        return {name: float(shares.get(name, 1.0)) for name in fields}


@dataclass
class UmafOutput:
    logits: torch.Tensor  # [B, C]
    pooled: torch.Tensor  # [B, d] masked mean of Z: the sequence feature of Eq. 5
    selected: torch.Tensor  # [B, d] h_top (Eq. 4), or ``pooled`` without NRF
    scores: torch.Tensor | None  # [B, L] token scores s (Eq. 3), 0 at padding; None without NRF
    attention: torch.Tensor | None = None  # [B, L] mean attention received in the last fusion layer (Figure 3)
    mask: torch.Tensor | None = None  # [B, L] real positions of the unified sequence [text; image]


def masked_mean(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``z [B, L, d]`` over positions where ``mask [B, L]`` is true."""
    weights = mask.to(z.dtype).unsqueeze(-1)
    return (z * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def topk_select(
    z: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, k: int, weighting: str = "straight_through"
) -> torch.Tensor:
    """Eq. 4: mean of the K highest-scoring real tokens; with fewer than K real tokens, all of them.

    As printed, Eq. 4 (``1/K sum Z_i``) depends on ``s`` only through the arg-top-K indices, which
    have no gradient, so ``W_s, b_s`` (Eq. 3) would never learn. ``weighting`` chooses what to do:

    - ``"straight_through"`` (default): each selected token enters as ``(1 + s_i - sg(s_i)) * Z_i``
      (``sg`` = stop-gradient). The weight is exactly 1 in the forward pass, so the value IS Eq. 4,
      bit for bit; the backward pass sees ``d h_top / d s_i = Z_i / K``, the gradient the score-weighted
      form has at s_i = 1, so the scorer learns to raise the scores of tokens that help the classifier.
    - ``"score"``: each selected token enters as ``s_i * Z_i``; the scorer learns, but the feature is
      Eq. 4 shrunk by the scores (s_i in (0, 1)), a different forward value.
    - ``"literal"``: Eq. 4 with no gradient to the scorer.
    """
    real = mask.bool()
    masked_scores = scores.masked_fill(~real, float("-inf"))
    k_eff = min(k, z.shape[1])
    top_scores, top_idx = masked_scores.topk(k_eff, dim=1)  # [B, k]
    picked_real = torch.isfinite(top_scores)  # False where a short sequence ran out of real tokens
    picked = z.gather(1, top_idx.unsqueeze(-1).expand(-1, -1, z.shape[-1]))  # [B, k, d]
    weights = picked_real.to(z.dtype)
    if weighting == "straight_through":
        s = scores.gather(1, top_idx).to(z.dtype)
        weights = weights * (1.0 + (s - s.detach()))  # == 1 in value (x - x is exactly 0), ds in gradient
    elif weighting == "score":
        weights = weights * scores.gather(1, top_idx).to(z.dtype)
    elif weighting != "literal":
        raise ValueError(f"topk weighting must be 'straight_through', 'score' or 'literal', not {weighting!r}")
    count = picked_real.sum(1, keepdim=True).clamp_min(1).to(z.dtype)  # K' = min(K, real tokens)
    return (picked * weights.unsqueeze(-1)).sum(1) / count


def default_heads(width: int) -> int:
    """Fusion heads when neither the config nor the encoder gives them (a CNN-only row): the most of
    12, 8, 4, 2 that divides the width (ResNet-50's 2048: 8). The paper is silent."""
    return next(h for h in (12, 8, 4, 2, 1) if width % h == 0)


class UmafModel(nn.Module):
    """(Text encoder ‖ image encoder → projection) → fusion Transformer → (Top-K | masked mean) → classifier.

    ``encoder`` is the text encoder (None for the image-only row); ``image_encoder`` an
    :class:`~umaf.models.image_encoder.ImageTokenEncoder` (or None: no image tokens, or tokens given
    precomputed from the feature cache, for which only ``image_hidden`` is needed).
    """

    def __init__(self, encoder: nn.Module | None, hidden_size: int, num_heads: int, num_classes: int, cfg: UmafConfig,
                 image_encoder: nn.Module | None = None, image_hidden: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        if encoder is not None and not cfg.train_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        self.image_encoder = image_encoder
        if image_encoder is not None and not cfg.train_image_encoder:
            for p in image_encoder.parameters():
                p.requires_grad_(False)
        # Image tokens → the fusion width (the text encoder's; the image encoder's own for the image-only
        # row). Table 3 does not say how features of two widths are fused: a learned linear map is ours.
        self.image_proj = nn.Linear(image_hidden, hidden_size) if image_hidden else None
        heads = cfg.fusion_heads or num_heads or default_heads(hidden_size)
        if hidden_size % heads:
            raise ValueError(f"fusion_heads={heads} does not divide the encoder hidden size {hidden_size}")
        # CLIP's text tower takes no token types.
        self._token_types = encoder is not None and "token_type_ids" in inspect.signature(encoder.forward).parameters
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
        return [m for m in (self.image_proj, self.fusion, self.scorer, self.classifier) if m is not None]

    def _fuse(self, h_base: torch.Tensor, real: torch.Tensor, return_attention: bool):
        """Eq. 2, layer by layer as ``nn.TransformerEncoder`` runs them; with ``return_attention`` the
        last layer's self-attention weights (head-averaged) come from its own attention module on the
        same input, so Figure 3 is read off the model being evaluated."""
        if not isinstance(self.fusion, nn.TransformerEncoder):
            return h_base, None
        z, attention, pad = h_base, None, ~real
        for i, layer in enumerate(self.fusion.layers):
            if return_attention and i == len(self.fusion.layers) - 1:
                _, weights = layer.self_attn(z, z, z, key_padding_mask=pad, need_weights=True,
                                             average_attn_weights=True)  # [B, L_query, L_key]
                queries = real.to(weights.dtype).unsqueeze(-1)
                attention = (weights * queries).sum(1) / queries.sum(1).clamp_min(1.0)  # received, mean over real queries
            z = layer(z, src_key_padding_mask=pad)
        return z, attention

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        return_attention: bool = False,
        text_states: torch.Tensor | None = None,
    ) -> UmafOutput:
        parts, masks = [], []
        if self.encoder is not None:
            if text_states is not None:  # Eq. 1 computed once by the frozen encoder (the feature cache)
                parts.append(text_states.to(self.classifier.weight.dtype))
            else:
                kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
                if token_type_ids is not None and self._token_types:
                    kwargs["token_type_ids"] = token_type_ids
                parts.append(self.encoder(**kwargs).last_hidden_state)  # Eq. 1 (T, or [T; T_vlm])
            masks.append(attention_mask.bool())
        if self.image_proj is not None:
            if image_tokens is None:
                image_tokens = self.image_encoder(pixel_values)
            tokens = self.image_proj(image_tokens.to(self.image_proj.weight.dtype))
            parts.append(tokens)  # Table 3's multimodal rows: [T; image tokens]
            masks.append(torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
        h_base = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        real = torch.cat(masks, 1) if len(masks) > 1 else masks[0]
        z, attention = self._fuse(h_base, real, return_attention)  # Eq. 2
        pooled = masked_mean(z, real)  # global sequence feature for Eq. 5
        if self.scorer is not None:
            scores = torch.sigmoid(self.scorer(z).squeeze(-1))  # Eq. 3
            selected = topk_select(z, scores, real, self.cfg.top_k, self.cfg.topk_weighting)  # Eq. 4
            scores = scores.masked_fill(~real, 0.0)
        else:
            scores, selected = None, pooled
        logits = self.classifier(self.dropout(selected))
        return UmafOutput(logits=logits, pooled=pooled, selected=selected, scores=scores, attention=attention, mask=real)


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
