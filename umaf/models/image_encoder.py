"""Frozen image and text backbones for SPP-SCL: a ResNet's layer-4 map and BERT's last hidden states.

Any Hugging Face id or local path works (default ``microsoft/resnet-50`` / ``bert-base-uncased``).
Tests and the ``tiny`` preset name ``tiny-random-resnet`` (here) and ``tiny-random-bert``
(:mod:`umaf.models.encoders`): random-weight models built from small configs, saved with
``save_pretrained`` and loaded back with ``from_pretrained``, the production path. No Ray here.

Images are preprocessed with transformers' PIL image processor that the checkpoint names
(``microsoft/resnet-50`` ships a ConvNext processor config: resize to 224 / crop / ImageNet
normalisation, as the official SPP-SCL data loader does with torchvision).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from umaf.models.encoders import TINY_MODELS, build_tiny_model, resolve_encoder

DEFAULT_IMAGE_ENCODER = "microsoft/resnet-50"
DEFAULT_TEXT_ENCODER = "bert-base-uncased"
# SPP-SCL uses BERT layers 9–12 (the paper's "last four layers"); shorter encoders use their last 4.
NUM_TEXT_LAYERS = 4


class FrozenResNet(nn.Module):
    """``pixel_values [B,3,H,W]`` → layer-4 feature map ``[B, C, h, w]`` (ResNet-50: 2048×7×7)."""

    def __init__(self, name_or_path: str):
        super().__init__()
        from transformers import ResNetModel

        self.net = ResNetModel.from_pretrained(resolve_image_encoder(name_or_path))
        self.name_or_path = name_or_path

    @property
    def out_channels(self) -> int:
        return int(self.net.config.hidden_sizes[-1])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # last_hidden_state is the output of the last stage (layer 4) before the global pooling.
        return self.net(pixel_values=pixel_values).last_hidden_state


class FrozenBert(nn.Module):
    """Token ids → the hidden states of the encoder's last four layers, ``[B, 4, N, H]``.

    ``[:, :, 0]`` holds the four ``[CLS]`` vectors the hierarchical attention weighs the layers with.
    """

    def __init__(self, name_or_path: str):
        super().__init__()
        from transformers import AutoModel

        from umaf.models.encoders import resolve_encoder

        path = resolve_encoder(name_or_path)
        try:  # the pooler is unused: leave it out rather than load it (or report it missing)
            self.net = AutoModel.from_pretrained(path, add_pooling_layer=False)
        except TypeError:
            self.net = AutoModel.from_pretrained(path)
        self.name_or_path = name_or_path
        num_layers = int(self.net.config.num_hidden_layers)
        if num_layers < 1:
            raise ValueError(f"text encoder {name_or_path!r} has no hidden layers")
        self.num_layers_used = min(NUM_TEXT_LAYERS, num_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.net.config.hidden_size)

    def last_layers(self) -> list[nn.Module]:
        """The Transformer layers whose outputs are used (BERT-base: 9–12), for the fine-tune option."""
        return list(self.net.encoder.layer[-self.num_layers_used :])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.net(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        # hidden_states[0] is the embedding output; [-4:] are layers 9..12 of BERT-base.
        return torch.stack(out.hidden_states[-self.num_layers_used :], dim=1)


def load_image_processor(name_or_path: str):
    """The PIL image processor saved with the checkpoint (ResNet-50 names ConvNextImageProcessor)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(resolve_image_encoder(name_or_path), backend="pil")


def pixel_values_from_bytes(processor, images: list[bytes | None], image_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and preprocess images; a missing or unreadable image becomes zeros, flagged in the mask.
    ``image_size`` None: the processor's own size and crop (the checkpoint's preprocessing, UMAF Table 3).

    Returns ``(pixel_values [B,3,S,S] float32, ok [B] bool)``: one bad image never fails the batch.
    """
    from PIL import Image

    decoded, ok = [], []
    for data in images:
        try:
            if data is None:
                raise ValueError("no image")
            decoded.append(Image.open(io.BytesIO(data)).convert("RGB"))
            ok.append(True)
        except Exception:  # noqa: BLE001 - any decoding error: a grey placeholder, reported via ok
            decoded.append(Image.new("RGB", (image_size or 224, image_size or 224), (127, 127, 127)))
            ok.append(False)
    # ConvNext-style processors (ResNet-50's) resize the short side to image_size / crop_pct and
    # centre-crop image_size, as the official loader's Resize + CenterCrop; others resize to a square.
    if image_size is None:
        return processor(images=decoded, return_tensors="pt")["pixel_values"].float(), torch.tensor(ok, dtype=torch.bool)
    shortest = getattr(processor.size, "shortest_edge", None) if not isinstance(processor.size, dict) else processor.size.get("shortest_edge")
    size = {"shortest_edge": image_size} if shortest else {"height": image_size, "width": image_size}
    pixels = processor(images=decoded, return_tensors="pt", size=size)["pixel_values"]
    return pixels.float(), torch.tensor(ok, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# A tiny random-weight ResNet for tests and the `tiny` preset, named like the tiny text encoder of
# umaf.models.encoders (``tiny-random-bert``): built once from a config with a fixed seed, written
# with save_pretrained into the encoder cache and loaded back through from_pretrained exactly like a
# hub checkpoint.

TINY_RANDOM_RESNET = "tiny-random-resnet"
TINY_RANDOM_VIT = "tiny-random-vit"
_TINY_RESNET_VERSION = 1


def _save_tiny_resnet(folder: Path, image_size: int = 64) -> None:
    """A 4-stage ResNet with 8–32 channels plus its PIL image processor."""
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetModel

    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic"
    )
    ResNetModel(config).save_pretrained(folder)
    ConvNextImageProcessorPil(size={"shortest_edge": image_size}, crop_pct=1.0).save_pretrained(folder)


def _save_tiny_vit(folder: Path) -> None:
    """A 2-layer, 32-wide ViT on 32-px images in 8-px patches ([CLS] + 16 patch tokens)."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)


TINY_MODELS[TINY_RANDOM_RESNET] = (_TINY_RESNET_VERSION, _save_tiny_resnet, ("config.json", "preprocessor_config.json"))
TINY_MODELS[TINY_RANDOM_VIT] = (1, _save_tiny_vit, ("config.json", "preprocessor_config.json"))


def build_tiny_random_resnet(cache_dir: str | Path | None = None) -> Path:
    """The tiny ResNet's folder (built once)."""
    return build_tiny_model(TINY_RANDOM_RESNET, cache_dir)


def resolve_image_encoder(name: str, cache_dir: str | Path | None = None) -> str:
    """A name for ``from_pretrained``: a tiny model name is built locally, anything else is returned."""
    return resolve_encoder(name, cache_dir)


# --------------------------------------------------------------------------------------------
# Image tokens for UMAF's Table 3 rows: a frozen-or-trained image encoder's patch / grid features.


class ImageTokenEncoder(nn.Module):
    """``pixel_values [B,3,H,W]`` → image tokens ``[B, n, d]``, for any of Table 3's image families:

    - ResNet (``ResNetModel``): the last stage's grid ``[B, C, h, w]`` flattened to ``h*w`` tokens
      (ResNet-50 at 224 px: 49 tokens of 2048);
    - ViT (``ViTModel``): the last layer's ``[CLS]`` + patch tokens (ViT-B/16 at 224 px: 197 of 768);
    - CLIP (``CLIPVisionModel``, the vision tower of a CLIP checkpoint): its ``[CLS]`` + patch tokens.
    """

    def __init__(self, name_or_path: str, cache_dir: str | Path | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel, CLIPVisionModel

        path = resolve_image_encoder(name_or_path, cache_dir)
        config = AutoConfig.from_pretrained(path)
        if config.model_type in ("clip", "clip_vision_model"):
            self.net = CLIPVisionModel.from_pretrained(path)
        else:
            try:  # UMAF pools itself: no pooler (DDP would wait for its gradients)
                self.net = AutoModel.from_pretrained(path, add_pooling_layer=False)
            except TypeError:
                self.net = AutoModel.from_pretrained(path)
        self.name_or_path = name_or_path
        self.hidden_size, self.num_heads = _token_width(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.net(pixel_values=pixel_values).last_hidden_state
        if hidden.dim() == 4:  # a CNN's grid [B, C, h, w] → h*w tokens [B, h*w, C]
            hidden = hidden.flatten(2).transpose(1, 2)
        return hidden


def image_token_width(name_or_path: str, cache_dir: str | Path | None = None) -> tuple[int, int]:
    """``(hidden size, attention heads)`` of an image encoder's tokens from its config alone (no weights):
    what the model needs when the tokens come from the feature cache."""
    from transformers import AutoConfig

    return _token_width(AutoConfig.from_pretrained(resolve_image_encoder(name_or_path, cache_dir)))


def _token_width(config) -> tuple[int, int]:
    config = getattr(config, "vision_config", None) or config  # CLIP: the vision tower's
    sizes = getattr(config, "hidden_sizes", None)  # ResNet: channels per stage
    # heads 0: a CNN has none (the fusion layers then pick their own, umaf.models.umaf.default_heads)
    return int(sizes[-1] if sizes else config.hidden_size), int(getattr(config, "num_attention_heads", 0) or 0)
