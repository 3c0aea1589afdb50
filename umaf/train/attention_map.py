"""Figure 3 of the UMAF paper: how the last fusion layer's attention spreads over the unified sequence.

The paper shows, per token position of ``[T; T_vlm]`` (or ``[T; image tokens]``), the attention that
position receives, and reads modality bias off it: with unaligned encoders (BERT+ResNet, RoBERTa+ViT,
CLIP) the attention piles onto the image tokens; with the VLM captions it spreads over text and
caption tokens. :class:`AttentionMap` accumulates exactly that during the test evaluation (the model
returns the head-averaged attention each key position receives, averaged over the real queries:
:meth:`umaf.models.umaf.UmafModel.forward` with ``return_attention``) and writes it as numbers and a
PNG. The paper does not say how it aggregates over samples or heads: we average both.

Plain numpy + matplotlib, no Ray.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from umaf.train.text_inputs import TOKEN_SOURCES


class AttentionMap:
    """Running sums over evaluated samples: per position of the unified sequence and per token source."""

    def __init__(self) -> None:
        self.samples = 0
        self.position_sum = np.zeros(0)
        self.position_count = np.zeros(0, dtype=np.int64)
        self.position_sources = np.zeros((0, len(TOKEN_SOURCES)), dtype=np.int64)
        self.source_attention = np.zeros(len(TOKEN_SOURCES))  # summed per-sample attention share
        self.source_tokens = np.zeros(len(TOKEN_SOURCES))  # summed per-sample token share

    def _grow(self, length: int) -> None:
        extra = length - len(self.position_sum)
        if extra > 0:
            self.position_sum = np.concatenate([self.position_sum, np.zeros(extra)])
            self.position_count = np.concatenate([self.position_count, np.zeros(extra, dtype=np.int64)])
            self.position_sources = np.concatenate(
                [self.position_sources, np.zeros((extra, len(TOKEN_SOURCES)), dtype=np.int64)])

    def add(self, attention: np.ndarray, mask: np.ndarray, sources: np.ndarray) -> None:
        """``attention [B, L]`` received per position, ``mask [B, L]`` real positions, ``sources [B, L]``
        codes of :data:`umaf.train.text_inputs.TOKEN_SOURCES`."""
        attention = np.where(mask, attention, 0.0).astype(np.float64)
        self._grow(attention.shape[1])
        length = attention.shape[1]
        self.position_sum[:length] += attention.sum(0)
        self.position_count[:length] += mask.sum(0)
        real_tokens = np.maximum(mask.sum(1, keepdims=True), 1)
        for code in range(len(TOKEN_SOURCES)):
            is_source = mask & (sources == code)
            self.position_sources[:length, code] += is_source.sum(0)
            self.source_attention[code] += (attention * is_source).sum()
            self.source_tokens[code] += (is_source / real_tokens).sum()
        self.samples += attention.shape[0]

    def summary(self) -> dict[str, Any]:
        n = max(self.samples, 1)
        present = [c for c in range(len(TOKEN_SOURCES)) if self.source_tokens[c] > 0]
        by_source = {}
        for code in present:
            share, tokens = self.source_attention[code] / n, self.source_tokens[code] / n
            by_source[TOKEN_SOURCES[code]] = {
                "attention_share": round(float(share), 6),  # of all attention received, mean over samples
                "token_share": round(float(tokens), 6),  # of the real tokens, mean over samples
                "attention_per_token_vs_uniform": round(float(share / tokens), 4) if tokens else None,
            }
        mean = np.divide(self.position_sum, np.maximum(self.position_count, 1))
        return {
            "samples": self.samples,
            "by_source": by_source,
            "positions": {
                "mean_attention": [round(float(v), 6) for v in mean],
                "samples_with_token": self.position_count.tolist(),
                "main_source": [TOKEN_SOURCES[int(i)] if c else None
                                for i, c in zip(self.position_sources.argmax(1), self.position_count)],
            },
        }

    def png(self, title: str) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        summary = self.summary()
        mean = np.asarray(summary["positions"]["mean_attention"])
        main = summary["positions"]["main_source"]
        palette = plt.get_cmap("tab10")
        codes = np.array([[TOKEN_SOURCES.index(s) if s else -1 for s in main]], dtype=float)
        codes[codes < 0] = np.nan
        fig, axes = plt.subplots(3, 1, figsize=(10, 4.6), gridspec_kw={"height_ratios": [1.2, 0.35, 2]})
        # As the paper's Figure 3: one column per position of the unified sequence, colour = attention.
        axes[0].imshow(mean[None, :], aspect="auto", cmap="viridis")
        axes[0].set_yticks([])
        axes[0].set_title(title, fontsize=10)
        axes[0].set_xlabel("position in the unified sequence (mean attention received, last fusion layer)", fontsize=8)
        axes[1].imshow(codes, aspect="auto", cmap=ListedColormap([palette(i) for i in range(len(TOKEN_SOURCES))]),
                       vmin=0, vmax=len(TOKEN_SOURCES) - 1, interpolation="nearest")
        axes[1].set_yticks([])
        axes[1].set_xticks([])
        axes[1].set_ylabel("source", fontsize=7, rotation=0, ha="right", va="center")
        names = list(summary["by_source"])
        x = np.arange(len(names))
        attention = [summary["by_source"][s]["attention_share"] for s in names]
        tokens = [summary["by_source"][s]["token_share"] for s in names]
        axes[2].bar(x - 0.2, attention, 0.4, label="attention share",
                    color=[palette(TOKEN_SOURCES.index(s)) for s in names])
        axes[2].bar(x + 0.2, tokens, 0.4, label="token share", color="lightgrey", edgecolor="grey")
        axes[2].set_xticks(x, names, fontsize=8)
        axes[2].legend(fontsize=8)
        axes[2].grid(axis="y", alpha=0.3)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        return buffer.getvalue()
