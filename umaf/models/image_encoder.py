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


def pixel_values_from_bytes(processor, images: list[bytes | None], image_size: int | None,
                            normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and preprocess images; a missing or unreadable image becomes zeros, flagged in the mask.
    ``image_size`` None: the processor's own size and crop (the checkpoint's preprocessing, UMAF Table 3).

    Returns ``(pixel_values [B,3,S,S] float32, ok [B] bool)``: one bad image never fails the batch.
    ``normalize=False``: resized and cropped only, as ``uint8`` (a quarter of the bytes to move);
    :func:`normalize_pixels` then applies the processor's rescale and normalisation where the model runs.
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
    kwargs = {} if normalize else {"do_rescale": False, "do_normalize": False}
    if image_size is not None:
        shortest = getattr(processor.size, "shortest_edge", None) if not isinstance(processor.size, dict) else processor.size.get("shortest_edge")
        kwargs["size"] = {"shortest_edge": image_size} if shortest else {"height": image_size, "width": image_size}
    pixels = processor(images=decoded, return_tensors="pt", **kwargs)["pixel_values"]
    # Without rescaling the values are PIL's resampled bytes (whole numbers 0..255): exact as uint8.
    pixels = pixels.float() if normalize else pixels.round().clamp(0, 255).to(torch.uint8)
    return pixels, torch.tensor(ok, dtype=torch.bool)


def normalize_pixels(pixels: torch.Tensor, processor) -> torch.Tensor:
    """``uint8`` pixels from ``pixel_values_from_bytes(..., normalize=False)`` → the processor's float32
    input: ``x * rescale_factor``, then ``(x - mean) / std`` per channel, the processor's own order."""
    x = pixels.float()
    if getattr(processor, "do_rescale", True):
        x = x * float(processor.rescale_factor)
    if getattr(processor, "do_normalize", True):
        mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


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
    """A name for ``from_pretrained``: a tiny model name is built locally, a torchvision ResNet checkpoint
    file (``*.pth``/``*.pt``) is converted once into a transformers folder, anything else is returned."""
    if is_torchvision_checkpoint(name):
        return str(convert_torchvision_resnet(name, cache_dir))
    return resolve_encoder(name, cache_dir)


# --------------------------------------------------------------------------------------------
# torchvision ResNet checkpoints (the official SPP-SCL code loads ``resnet50-19c8e357.pth``, torchvision's
# ImageNet ResNet-50, not ``microsoft/resnet-50``): a ``state_dict`` file becomes a transformers
# ``ResNetModel`` folder, so every path that loads an image encoder by name (the frozen encoder, the
# feature cache, predict) loads it unchanged.

TORCHVISION_SUFFIXES = (".pth", ".pt")


def is_torchvision_checkpoint(name: str) -> bool:
    return name.endswith(TORCHVISION_SUFFIXES) and "://" not in name


def torchvision_resnet_config(state: dict[str, torch.Tensor]):
    """The ``ResNetConfig`` of a torchvision ResNet ``state_dict`` (ResNet-18/34/50/101/152), read from its
    keys and shapes: stem width, blocks per stage, basic or bottleneck blocks, stage widths. torchvision's
    ResNet is "v1.5" (the 3x3 convolution strides; stage 1 does not downsample), as transformers' defaults."""
    from transformers import ResNetConfig

    depths = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        if not blocks:
            raise ValueError(f"not a torchvision ResNet state_dict: no layer{stage}.* keys")
        depths.append(max(blocks) + 1)
    bottleneck = "layer1.0.conv3.weight" in state
    last = "conv3" if bottleneck else "conv2"
    return ResNetConfig(
        num_channels=int(state["conv1.weight"].shape[1]), embedding_size=int(state["conv1.weight"].shape[0]),
        hidden_sizes=[int(state[f"layer{s}.0.{last}.weight"].shape[0]) for s in range(1, 5)], depths=depths,
        layer_type="bottleneck" if bottleneck else "basic", hidden_act="relu",
        downsample_in_first_stage=False, downsample_in_bottleneck=False,
    )


def torchvision_resnet_key(key: str) -> str | None:
    """A torchvision ResNet key → the transformers ``ResNetModel`` key (None: the ImageNet classifier ``fc``).

    ``conv1``/``bn1`` → ``embedder.embedder.convolution``/``normalization``;
    ``layer{s}.{b}.conv{k}``/``bn{k}`` → ``encoder.stages.{s-1}.layers.{b}.layer.{k-1}.convolution``/``normalization``;
    ``layer{s}.{b}.downsample.0``/``.1`` → ``...layers.{b}.shortcut.convolution``/``normalization``."""
    parts = key.split(".")
    if parts[0] == "fc":
        return None
    if parts[0] in ("conv1", "bn1"):
        kind = "convolution" if parts[0] == "conv1" else "normalization"
        return ".".join(["embedder.embedder", kind, *parts[1:]])
    if parts[0].startswith("layer") and len(parts) >= 4:
        stage, block = int(parts[0][len("layer"):]) - 1, int(parts[1])
        prefix = f"encoder.stages.{stage}.layers.{block}"
        if parts[2] == "downsample":
            kind = "convolution" if parts[3] == "0" else "normalization"
            return ".".join([prefix, "shortcut", kind, *parts[4:]])
        for name, kind in (("conv", "convolution"), ("bn", "normalization")):
            if parts[2].startswith(name) and parts[2][len(name):].isdigit():
                return ".".join([prefix, "layer", str(int(parts[2][len(name):]) - 1), kind, *parts[3:]])
    raise ValueError(f"unexpected key {key!r} in a torchvision ResNet state_dict")


def load_torchvision_resnet(path: str | Path):
    """A ``ResNetModel`` holding the weights of a torchvision ResNet ``state_dict`` file, read with
    ``torch.load(weights_only=True)`` (tensors only: a checkpoint cannot run code). Strict: every key of the
    file but ``fc`` must land, and every weight of the model must come from it (BatchNorm's
    ``num_batches_tracked``, absent from torchvision's older files, excepted)."""
    from transformers import ResNetModel

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = ResNetModel(torchvision_resnet_config(state))
    mapped = {new: v for k, v in state.items() if (new := torchvision_resnet_key(k)) is not None}
    result = model.load_state_dict(mapped, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: torchvision ResNet weights do not fit: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return model


def convert_torchvision_resnet(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """``<encoder cache>/torchvision-<file stem>-<sha256[:12]>/``: the checkpoint as a transformers folder
    (config, weights, and the official loader's preprocessing: resize the short side to 256, centre-crop
    224, bilinear, ImageNet mean/std). Built once per file content; concurrent builders race safely."""
    import hashlib
    import os
    import shutil

    from transformers import ConvNextImageProcessorPil

    from umaf.models.encoders import default_cache_dir

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image encoder checkpoint {path} does not exist (a torchvision ResNet state_dict)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    folder = Path(cache_dir or default_cache_dir()) / f"torchvision-{path.stem}-{digest}"
    if (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    load_torchvision_resnet(path).save_pretrained(tmp)
    # 224/256 = 0.875: the short side goes to 256 and a 224 centre crop is taken (torchvision Resize +
    # CenterCrop as in the official Dataloader.py); resample 2 = bilinear, torchvision's default.
    ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875, resample=2,
                              image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


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
