"""UMAF behind the :class:`umaf.train.method.Method` interface: caption join, tokenisation, Eq. 6 step."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from umaf import distributed
from umaf.caption.fields import caption_text
from umaf.caption.store import read_ok_captions
from umaf.data.manifest import SPLITS
from umaf.models.encoders import load_encoder, load_tokenizer, resolve_encoder
from umaf.models.umaf import UmafModel, umaf_loss
from umaf.train.method import Method, PreparedTable, StepContext
from umaf.train.text_inputs import PairEncoder

CAPTION_COLUMN = "caption_text"
TEXT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def join_captions(table: pa.Table, captions: pa.Table | None, missing: str) -> PreparedTable:
    """Add ``caption_text`` (T_vlm) to manifest rows by id; count pairs without an ok caption per split.

    ``missing="text_only"`` keeps those pairs with an empty caption (the model sees T alone);
    ``"drop"`` removes them. ``captions=None`` is the text-only ablation: no caption for anyone.
    """
    ids = table["id"].to_pylist()
    if captions is None:
        texts: list[str | None] = [None] * len(ids)
    else:
        by_id = {
            row["id"]: caption_text(row["ocr"], row["visual_scene"], row["textimage_relation"])
            for row in captions.select(["id", "ocr", "visual_scene", "textimage_relation"]).to_pylist()
        }
        texts = [by_id.get(i) or None for i in ids]
    has = pa.array([t is not None for t in texts])
    report: dict[str, Any] = {"captions_used": captions is not None, "missing_caption_policy": missing, "splits": {}}
    splits = table["split"].to_pylist()
    for split in SPLITS:
        in_split = [s == split for s in splits]
        total = sum(in_split)
        with_caption = sum(1 for keep, h in zip(in_split, has.to_pylist()) if keep and h)
        report["splits"][split] = {"pairs": total, "with_caption": with_caption, "without_caption": total - with_caption}
    table = table.append_column(CAPTION_COLUMN, pa.array(texts, type=pa.string()))
    if captions is not None and missing == "drop":
        table = table.filter(has)
    report["pairs_kept"] = table.num_rows
    return PreparedTable(table=table, report=report)


@functools.lru_cache(maxsize=4)
def _pair_encoder(tokenizer: str, cache_dir: str | None, max_length: int) -> PairEncoder:
    return PairEncoder(load_tokenizer(tokenizer, cache_dir), max_length)


def tokenize_batch(batch: dict[str, np.ndarray], tokenizer: str, cache_dir: str | None, max_length: int) -> dict[str, np.ndarray]:
    """Ray Data batch function: ``[T; T_vlm]`` token arrays. Runs as Ray tasks, whose worker processes
    are reused, so the tokenizer is loaded once per process (cached), not once per batch — and no
    dedicated actor process has to start and import transformers for each split."""
    encoder = _pair_encoder(tokenizer, cache_dir, max_length)
    captions = batch[CAPTION_COLUMN].tolist() if CAPTION_COLUMN in batch else [None] * len(batch["id"])
    encoded = encoder.encode(batch["text"].tolist(), captions)
    return {"id": batch["id"], "label": batch["label"].astype(np.int64), **encoded}


class UmafMethod(Method):
    name = "umaf"

    def prepare_table(self, table: pa.Table, cfg, label_column: str) -> PreparedTable:
        captions = None
        if cfg.umaf.use_captions:
            if not cfg.captions:
                raise ValueError(
                    "UMAF needs captions: pass --captions URI (the caption job's output), or umaf.use_captions=false "
                    "for the text-only ablation"
                )
            captions = read_ok_captions(cfg.captions, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
        prepared = join_captions(table, captions, cfg.missing_caption)
        return prepared

    def preprocess(self, ds, cfg, split: str):
        tokenizer = cfg.umaf.tokenizer or cfg.umaf.encoder
        resolve_encoder(tokenizer, cfg.umaf.encoder_cache)  # build a tiny encoder once here, not per actor
        columns = ["id", "text", "label"] + ([CAPTION_COLUMN] if CAPTION_COLUMN in ds.columns() else [])
        return ds.select_columns(columns).map_batches(
            tokenize_batch,
            fn_kwargs={"tokenizer": tokenizer, "cache_dir": cfg.umaf.encoder_cache, "max_length": cfg.umaf.max_length},
            batch_format="numpy",
            batch_size=512,
        )

    def build_model(self, cfg, num_classes: int) -> torch.nn.Module:
        encoder, hidden, heads = load_encoder(cfg.umaf.encoder, cfg.umaf.encoder_cache)
        return UmafModel(encoder, hidden, heads, num_classes, cfg.umaf)

    def param_groups(self, model: torch.nn.Module, cfg) -> list[dict[str, Any]]:
        encoder = [p for p in model.encoder.parameters() if p.requires_grad]
        new = [p for m in model.new_layers() for p in m.parameters() if p.requires_grad]
        groups = [{"name": "new_layers", "params": new, "lr": cfg.lr}]
        if encoder:
            groups.insert(0, {"name": "encoder", "params": encoder, "lr": cfg.encoder_lr})
        return groups

    def collate(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        # Rows are padded to max_length; cut the batch to its longest real row (most batches are shorter).
        mask = np.asarray(batch["attention_mask"])
        length = max(1, int(mask.sum(1).max()))
        out = {name: torch.as_tensor(np.asarray(batch[name])[:, :length], dtype=torch.long).to(device) for name in TEXT_COLUMNS}
        out["labels"] = torch.as_tensor(np.asarray(batch["label"]), dtype=torch.long).to(device)
        return out

    @staticmethod
    def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: batch[name] for name in TEXT_COLUMNS}

    def train_step(self, model, batch, ctx: StepContext) -> dict[str, float]:
        with ctx.autocast():
            out = model(**self._inputs(batch))
        # Eq. 5 on the global batch: features of every rank, gathered with their gradient path.
        losses = umaf_loss(out, batch["labels"], ctx.config.umaf, gather=distributed.gather_with_grad)
        ctx.backward_step(losses["loss"])
        return {name: float(value.detach()) for name, value in losses.items()}

    def predict(self, model, batch):
        out = model(**self._inputs(batch))
        return out.logits, out.pooled

    def find_unused_parameters(self, cfg) -> bool:
        # Literal Eq. 4 gives the scorer no gradient (see umaf.models.umaf.topk_select).
        return cfg.umaf.nrf and cfg.umaf.topk_weighting == "literal"

    def model_card(self, cfg) -> dict[str, Any]:
        return {"encoder": cfg.umaf.encoder, "tokenizer": cfg.umaf.tokenizer or cfg.umaf.encoder,
                "max_length": cfg.umaf.max_length}
