"""SPP-SCL (Wu & Li, "Semi-Push-Pull Supervised Contrastive Learning"): the model, plain torch.

Reads like the paper's Methodology section:

- image: frozen ResNet layer-4 map → 1×1 conv (128) → BN → ReLU → dropout → adaptive average pool
  (Eq. 1's ``c`` and ``P``) → projection ``M`` to D → alignment layer → ``I_p``;
- text: frozen BERT layers 9–12 → hierarchical attention (Eq. 2: the four [CLS] vectors are pooled
  to one scalar per layer, an MLP + sigmoid weighs the layers, the weighted token states are summed
  over layers) → BiLSTM (64 per direction) → mean over tokens → ``M`` → alignment layer → ``T_p``;
- cross-modal fusion CMF (Eq. 3): self-attention *across the samples of the batch* whose query and
  key are modulated by the other modality, ``M_p = [I_m, T_m, I_p, T_p]`` → classifier.

``I_p`` and ``T_p`` feed every contrastive loss (``umaf.losses.supcon_loss`` etc.); the classifier's
hidden layer is the "fusion feature" the paper plots with t-SNE (Fig. 3).

``compat: official`` reproduces the official code (github TomorrowJW/SPP-SCL) where it differs from
the paper: frozen encoders left in train mode (ResNet BatchNorm statistics keep updating, BERT
dropout active), text tokens ``[1:-1]`` (drops [CLS] and the last *position*, which is padding for
short texts, not [SEP]) averaged *including padding*, no sequence packing in the BiLSTM, and the
intra/inter losses and the step-2 test in their official forms (see ``umaf.losses``).

Eq. 6's positives (``inter_positives``): by default a text's own paired image is one of its
positives, as in the official code and as the paper's text says ``L_clm`` "pulls image-text pairs of
the same sentiment class closer"; the printed Inter-Mask ``1[y_m = y_n, m != n]`` (the intra-modal
mask's ``i != j`` carried over, almost surely) leaves the paired image in the denominator only, so
the loss always pushes each text away from its own image: ``inter_positives: printed`` runs it so.

BatchNorm: every BatchNorm of the head is :class:`umaf.models.global_batchnorm.GlobalBatchNorm`,
which normalises by the statistics of the GLOBAL batch under DDP (on CPU/gloo too, where
``torch.nn.SyncBatchNorm`` cannot run) and is plain BatchNorm otherwise.

Because CMF attends across the batch, a sample's prediction depends on its batch-mates: evaluation
follows a protocol (``TrainConfig.eval``, :mod:`umaf.train.order`): the official one (source order,
batches of ``eval_batch_size``) or ``train_context`` (each pair among training pairs only, ``isolate``). Under
DDP training the keys/values of CMF are gathered from every rank (with gradient), so N workers
attend over the same global batch one process would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BeforeValidator, Field, model_validator
from torch import nn

from umaf.config import ModelRef, PathOrUri, StrictModel
from umaf.distributed import gather_with_grad, is_distributed
from umaf.models.global_batchnorm import GlobalBatchNorm, convert_global_batchnorm
from umaf.models.image_encoder import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER, NUM_TEXT_LAYERS

Compat = Literal["paper", "official"]
Variant = Literal["two_step", "one_step", "no_inter", "no_intra"]
PAPER_MAX_LENGTH, OFFICIAL_MAX_LENGTH = 200, 202  # the paper's N; the released config.py's max_length


def exact_fraction(value: Any) -> Any:
    """``"2/3"`` → ``2 / 3`` as Python computes it: the very float the official code multiplies by
    (``int(mask * (2/3))``), so the step-2 threshold equals the official one at every batch size
    (0.6667 does not: ``int(10000 * 0.6667) = 6667`` where the official code has 6666)."""
    if isinstance(value, str) and "/" in value:
        numerator, _, denominator = value.partition("/")
        try:
            return float(numerator) / float(denominator)
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"{value!r} is not a fraction like 2/3") from exc
    return value


# A ratio given as a number or an exact fraction ("2/3").
Ratio = Annotated[float, BeforeValidator(exact_fraction)]


class SppSclConfig(StrictModel):
    """The ``sppscl:`` section of the train config (paper Table 2 values are in the presets)."""

    image_encoder: ModelRef = Field(
        DEFAULT_IMAGE_ENCODER, description="HF id or local folder of the frozen ResNet, or a torchvision ResNet "
        "state_dict file (*.pth, e.g. the official code's resnet50-19c8e357.pth), converted once")
    text_encoder: ModelRef = Field(DEFAULT_TEXT_ENCODER, description="HF id or local path of the BERT encoder")
    image_size: int = Field(224, ge=8, description="image side after resize/crop")
    max_length: int | None = Field(
        None, ge=4, description="text length in tokens; None: the paper's N=200, or 202 under compat=official "
        "(the released config.py)")
    embed_dim: int = Field(32, ge=2, description="D, the shared embedding size of I_p and T_p")
    image_channels: int = Field(128, ge=1, description="channels of the 1x1 conv on the layer-4 map")
    lstm_hidden: int = Field(64, ge=1, description="BiLSTM hidden size per direction (output 2x)")
    dropout: float = Field(0.2, ge=0, lt=1)
    ce_weight: float = Field(5.0, ge=0, description="lambda of Eq. 7 (5 for MVSA, 10 for HFM)")
    tau: float = Field(0.07, gt=0, description="temperature of the contrastive losses")
    alpha: Ratio = Field(
        2 / 3, gt=0, description="threshold of the step-2 test (Algorithm 1 line 12); a number or an exact "
        "fraction such as 2/3")
    alignment_check: Compat | None = Field(
        "official",
        description="the step-2 test: official (sigmoid of raw dot products, diagonal counted: the released code, "
        "with which alpha=2/3 was tuned and the published numbers made) or paper (cosine, Inter-Mask without the "
        "diagonal, as printed; at alpha=2/3 it almost never fires); None: as compat",
    )
    inter_positives: Literal["paired", "printed"] = Field(
        "paired",
        description="Eq. 6 positives of text m: paired = same-label images including its own (official code, "
        "the paper's text); printed = the printed mask 1[y_m=y_n, m!=n], which pushes the paired image away",
    )
    text_layers: int = Field(
        NUM_TEXT_LAYERS, ge=1, le=NUM_TEXT_LAYERS,
        description="BERT layers fused by the hierarchical attention: the last 1-4 (Table 6; paper: 4)",
    )
    variant: Variant = Field(
        "two_step",
        description="two_step (Algorithm 1); one_step: CE+L_cli+L_clt+L_clm at once (Table 4); "
        "no_inter: w/o L_clm; no_intra: w/o L_cli/L_clt (Table 5)",
    )
    fusion: Literal["cmf", "concat"] = Field("cmf", description="cmf (Eq. 3) or concat: [I_p, T_p] (w/o CMF, Table 7)")
    compat: Compat = Field("paper", description="paper (default) or official: the official code's behaviour")
    finetune_text: bool = Field(
        False, description="fine-tune the encoder's last 4 layers (the paper's text) instead of freezing BERT"
    )
    feature_cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="compute frozen encoder outputs once (Ray Data) and reuse them every epoch/trial; "
        "auto: on when the encoders are frozen and deterministic (not finetune_text, not compat=official)",
    )
    cache_dir: PathOrUri | None = Field(
        None, description="where feature caches live (URI); None: <out>/../feature_cache beside the run"
    )
    diagnostics: bool = Field(True, description="write IID/TTD/ITD distances and a t-SNE PNG to the run folder")

    @model_validator(mode="after")
    def _check(self) -> SppSclConfig:
        if self.feature_cache == "on" and not self.frozen_features_deterministic:
            raise ValueError(
                "feature_cache=on needs frozen, deterministic encoders: it cannot be combined with "
                "finetune_text=true or compat=official (whose encoders run in train mode); use feature_cache=auto or off"
            )
        return self

    @property
    def resolved_alignment_check(self) -> Compat:
        return self.alignment_check or self.compat

    @property
    def resolved_max_length(self) -> int:
        if self.max_length is not None:
            return self.max_length
        return OFFICIAL_MAX_LENGTH if self.compat == "official" else PAPER_MAX_LENGTH

    @property
    def frozen_features_deterministic(self) -> bool:
        return not self.finetune_text and self.compat == "paper"

    @property
    def use_feature_cache(self) -> bool:
        return self.feature_cache == "on" or (self.feature_cache == "auto" and self.frozen_features_deterministic)


@dataclass
class SppSclOutput:
    image_p: torch.Tensor  # I_p [B, D]
    text_p: torch.Tensor  # T_p [B, D]
    logits: torch.Tensor | None = None  # [B, C]; None for an embeddings-only forward
    fused: torch.Tensor | None = None  # [B, 2D] classifier hidden layer: the "fusion feature" of Fig. 3


def _projection(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    """``M`` of Eq. 1–2: two linear layers with BatchNorm, as the official EncodingPart_I/T."""
    return nn.Sequential(
        nn.Linear(in_dim, dim), GlobalBatchNorm(dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim), GlobalBatchNorm(dim)
    )


def _alignment(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), GlobalBatchNorm(dim), nn.ReLU(), nn.Dropout(dropout))


class HierarchicalTextHead(nn.Module):
    """Eq. 2: layer weights from the [CLS] vectors, weighted sum of token states, BiLSTM, token mean."""

    def __init__(self, hidden_size: int, num_layers: int, lstm_hidden: int, compat: Compat):
        super().__init__()
        self.compat = compat
        # P_g (global average pool of each [CLS] vector to a scalar) → FC → ReLU → FC → sigmoid (S).
        self.layer_weights = nn.Sequential(
            nn.Linear(num_layers, num_layers, bias=False), nn.ReLU(), nn.Linear(num_layers, num_layers, bias=False), nn.Sigmoid()
        )
        self.lstm = nn.LSTM(hidden_size, lstm_hidden, batch_first=True, bidirectional=True, bias=False)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``states [B, L, N, H]`` (L layers, position 0 = [CLS]), ``attention_mask [B, N]`` → ``[B, 2h]``."""
        weights = self.layer_weights(states[:, :, 0, :].mean(dim=-1))  # [B, L]
        if self.compat == "official":
            tokens, mask = states[:, :, 1:-1, :], torch.ones_like(attention_mask[:, 1:-1])
        else:  # every real token after [CLS] ([CLS] itself served for the layer weights), [SEP] included
            tokens, mask = states[:, :, 1:, :], attention_mask[:, 1:]
        fused = (weights[:, :, None, None] * tokens).sum(dim=1)  # U(·): sum over layers → [B, N', H]
        if self.compat == "official":
            out, _ = self.lstm(fused)
            return out.mean(dim=1)  # padding positions averaged too
        # Pack so the backward direction starts at each text's last real token, not at padding.
        lengths = mask.sum(dim=1).clamp(min=1)
        packed = nn.utils.rnn.pack_padded_sequence(fused, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=fused.shape[1])
        valid = mask[:, :, None].to(out.dtype)
        return (out * valid).sum(dim=1) / lengths[:, None].to(out.dtype)


class CrossModalFusion(nn.Module):
    """Eq. 3: ``I_m = softmax((Q_I ⊙ T_p)(K_I ⊙ T_p)^T / sqrt(D)) V_I`` and symmetrically ``T_m``.

    Attention runs across the samples of the batch (the official code's reading of Eq. 3). In DDP
    training, queries are this rank's rows and keys/values the gathered global batch.
    """

    def __init__(self, dim: int, dropout: float):
        super().__init__()

        def proj() -> nn.Sequential:
            return nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

        self.q_i, self.k_i, self.v_i = proj(), proj(), proj()
        self.q_t, self.k_t, self.v_t = proj(), proj(), proj()
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, image_p: torch.Tensor, text_p: torch.Tensor,
                isolate: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``isolate=n`` (evaluation): each of the first ``n`` rows attends only to itself and to the rows
        after them (the context), never to another of the first ``n``: as if each were alone in a batch
        with the context (the ``train_context`` evaluation protocol, :mod:`umaf.train.order`)."""
        if self.training and is_distributed():
            image_all, text_all = gather_with_grad(image_p), gather_with_grad(text_p)
        else:
            image_all, text_all = image_p, text_p
        blocked = None
        if isolate is not None:
            rows = torch.arange(len(image_p), device=image_p.device)
            blocked = (rows[None, :] < isolate) & (rows[:, None] != rows[None, :])
        scores_i = (self.q_i(image_p) * text_p) @ (self.k_i(image_all) * text_all).T * self.scale
        scores_t = (self.q_t(text_p) * image_p) @ (self.k_t(text_all) * image_all).T * self.scale
        if blocked is not None:
            scores_i, scores_t = scores_i.masked_fill(blocked, float("-inf")), scores_t.masked_fill(blocked, float("-inf"))
        image_m = torch.softmax(scores_i, dim=-1) @ self.v_i(image_all)
        text_m = torch.softmax(scores_t, dim=-1) @ self.v_t(text_all)
        return image_m, text_m


class SppSclHead(nn.Module):
    """Everything after the frozen encoders: what trains, and all that runs on cached features."""

    def __init__(self, config: SppSclConfig, num_classes: int, image_in_channels: int, text_hidden: int, text_layers: int):
        super().__init__()
        d, p = config.embed_dim, config.dropout
        self.fusion = config.fusion
        self.image_conv = nn.Sequential(
            nn.Conv2d(image_in_channels, config.image_channels, 1),
            GlobalBatchNorm(config.image_channels),
            nn.ReLU(),
            nn.Dropout(p),
            nn.AdaptiveAvgPool2d(1),
        )
        # Table 6: fuse only the last ``text_layers`` of the (up to 4) layers the encoder/cache provides.
        self.text_layers = min(config.text_layers, text_layers)
        self.text_head = HierarchicalTextHead(text_hidden, self.text_layers, config.lstm_hidden, config.compat)
        self.image_proj = _projection(config.image_channels, d, p)
        self.text_proj = _projection(2 * config.lstm_hidden, d, p)
        self.image_align = _alignment(d, p)
        self.text_align = _alignment(d, p)
        self.cmf = CrossModalFusion(d, p) if config.fusion == "cmf" else None
        fused_in = 4 * d if config.fusion == "cmf" else 2 * d
        self.classifier = nn.Sequential(nn.Linear(fused_in, 2 * d), GlobalBatchNorm(2 * d), nn.ReLU(), nn.Dropout(p))
        self.fc = nn.Linear(2 * d, num_classes)

    def forward(
        self, image_map: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor, embeddings_only: bool = False,
        isolate: int | None = None,
    ) -> SppSclOutput:
        image_l = self.image_conv(image_map.float()).flatten(1)  # Eq. 1: P(c(ResNet(I)))
        text_states = text_states[:, -self.text_layers :]  # the last layers; [:, -1] is the top one
        text_l = self.text_head(text_states.float(), attention_mask)  # Eq. 2
        image_p = self.image_align(self.image_proj(image_l))
        text_p = self.text_align(self.text_proj(text_l))
        if embeddings_only:
            # Algorithm 1 line 7 needs only I_p', T_p': CMF and the classifier stay out of the graph,
            # so DDP (find_unused_parameters) does not wait for their gradients in step 2.
            return SppSclOutput(image_p=image_p, text_p=text_p)
        if self.cmf is not None:
            image_m, text_m = self.cmf(image_p, text_p, isolate)
            fused_in = torch.cat([image_m, text_m, image_p, text_p], dim=1)  # M_p of Eq. 3
        else:
            fused_in = torch.cat([image_p, text_p], dim=1)
        fused = self.classifier(fused_in)
        return SppSclOutput(image_p=image_p, text_p=text_p, logits=self.fc(fused), fused=fused)


class SppSclModel(nn.Module):
    """Frozen encoders + :class:`SppSclHead`. With ``with_encoders=False`` only the head is built and
    ``forward`` takes cached encoder outputs (``image_map``, ``text_states``)."""

    def __init__(self, config: SppSclConfig, num_classes: int, *, with_encoders: bool = True):
        super().__init__()
        from transformers import AutoConfig

        self.config = config
        self.image_encoder = self.text_encoder = None
        if with_encoders:
            from umaf.models.image_encoder import FrozenBert, FrozenResNet

            self.image_encoder = FrozenResNet(config.image_encoder)
            self.text_encoder = FrozenBert(config.text_encoder)
            image_channels, text_hidden = self.image_encoder.out_channels, self.text_encoder.hidden_size
            text_layers = self.text_encoder.num_layers_used
            if config.compat == "official":
                # The official code runs the frozen ResNet in train mode, so its BatchNorm layers
                # normalise by batch statistics: those of the global batch under DDP, as one process.
                convert_global_batchnorm(self.image_encoder)
            self._freeze()
        else:
            from umaf.models.encoders import resolve_encoder
            from umaf.models.image_encoder import resolve_image_encoder

            image_cfg = AutoConfig.from_pretrained(resolve_image_encoder(config.image_encoder))
            text_cfg = AutoConfig.from_pretrained(resolve_encoder(config.text_encoder))
            image_channels, text_hidden = int(image_cfg.hidden_sizes[-1]), int(text_cfg.hidden_size)
            text_layers = min(NUM_TEXT_LAYERS, int(text_cfg.num_hidden_layers))
        self.head = SppSclHead(config, num_classes, image_channels, text_hidden, text_layers)

    def _freeze(self) -> None:
        for param in self.image_encoder.parameters():
            param.requires_grad_(False)
        for param in self.text_encoder.parameters():
            param.requires_grad_(False)
        if self.config.finetune_text:
            # The paper's text: "fine-tuning only the last four transformer layers (layers 9–12)".
            for layer in self.text_encoder.last_layers():
                for param in layer.parameters():
                    param.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> SppSclModel:
        super().train(mode)
        if self.image_encoder is not None and self.config.compat == "paper":
            # Frozen encoders are feature extractors: eval mode keeps BatchNorm statistics and
            # dropout fixed (the official code leaves them in train mode: compat=official).
            self.image_encoder.eval()
            self.text_encoder.eval()
            if self.config.finetune_text and mode:
                for layer in self.text_encoder.last_layers():
                    layer.train()
        return self

    def encode(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoders' outputs: ``(image_map [B,C,h,w], text_states [B,L,N,H])``."""
        if self.image_encoder is None:
            raise RuntimeError("this SppSclModel was built without encoders (cached features); pass image_map/text_states")
        with torch.no_grad():
            image_map = self.image_encoder(pixel_values)
        with torch.set_grad_enabled(self.config.finetune_text and torch.is_grad_enabled()):
            text_states = self.text_encoder(input_ids, attention_mask)
        return image_map, text_states

    def forward(
        self,
        *,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        image_map: torch.Tensor | None = None,
        text_states: torch.Tensor | None = None,
        embeddings_only: bool = False,
        isolate: int | None = None,
    ) -> SppSclOutput:
        if image_map is None or text_states is None:
            if pixel_values is None or input_ids is None:
                raise ValueError("give either pixel_values + input_ids or cached image_map + text_states")
            if self.config.compat == "paper":
                # Padding carries nothing in paper mode (masked BERT, packed BiLSTM, masked mean): cut
                # the batch to its longest real text. compat=official averages over all max_length
                # positions, so its rows keep their padding.
                length = max(2, int(attention_mask.sum(dim=1).max()))
                input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
            image_map, text_states = self.encode(pixel_values, input_ids, attention_mask)
        return self.head(image_map, text_states, attention_mask, embeddings_only=embeddings_only, isolate=isolate)

    # Checkpoints hold what trains. Frozen encoders are reloaded from their names, so saving them
    # every epoch (BERT-base + ResNet-50: ~135M parameters, ~540 MB) would only cost time and
    # storage; it also makes a checkpoint load into a head-only model (cached features) and back.
    def _frozen_prefixes(self, prefix: str = "") -> tuple[str, ...]:
        prefixes = [prefix + "image_encoder."]
        if not self.config.finetune_text:
            prefixes.append(prefix + "text_encoder.")
        return tuple(prefixes)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        frozen = self._frozen_prefixes(kwargs.get("prefix", ""))
        for key in [k for k in state if k.startswith(frozen)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        frozen = self._frozen_prefixes()
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(frozen)}
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(frozen)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"SppSclModel checkpoint does not match: missing {missing}, unexpected {result.unexpected_keys}")
        return result

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


__all__ = ["SppSclConfig", "SppSclModel", "SppSclHead", "SppSclOutput", "HierarchicalTextHead", "CrossModalFusion"]
