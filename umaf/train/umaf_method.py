"""UMAF behind the :class:`umaf.train.method.Method` interface: caption join, tokenisation, Eq. 6 step.

Table 3's rows (``umaf.backbone``) change only the inputs: T (+ T_vlm) token ids for the text
encoder, and for the image rows the image encoder's pixels (its own image processor) or, when the
image encoder is frozen, its tokens read from the feature cache (computed once per split, like
SPP-SCL's). Figure 3 (``umaf.attention_map``) is recorded from the test evaluation's own forwards.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from umaf import distributed
from umaf.caption.fields import CAPTION_FIELDS, caption_text
from umaf.caption.store import select_captions
from umaf.data.manifest import SPLITS
from umaf.models.encoders import load_encoder, load_tokenizer, resolve_encoder
from umaf.models.umaf import UmafModel, umaf_loss
from umaf.train.method import Method, PreparedTable, StepContext
from umaf.train.text_inputs import PairEncoder, TruncationStats

logger = logging.getLogger(__name__)

CAPTION_COLUMN = "caption_text"  # the joined T_vlm (for reading; tokenisation uses the fields)
FIELD_COLUMNS = tuple(f"caption_{name}" for name in CAPTION_FIELDS)  # each field, budgeted separately
TEXT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
MODEL_INPUTS = (*TEXT_COLUMNS, "pixel_values", "image_tokens", "text_states")
IMAGE_COLUMNS = ("image", "image_ok")  # carried through tokenisation for the image rows


def join_captions(table: pa.Table, captions: pa.Table | None, missing: str) -> PreparedTable:
    """Add ``caption_text`` (T_vlm) and its fields (``caption_ocr``, ...) to manifest rows by id; count
    pairs without an ok caption per split.

    ``missing="text_only"`` keeps those pairs with an empty caption (the model sees T alone);
    ``"drop"`` removes them. ``captions=None`` is the text-only ablation: no caption for anyone.
    """
    ids = table["id"].to_pylist()
    fields: dict[str, list[str | None]] = {column: [None] * len(ids) for column in FIELD_COLUMNS}
    if captions is None:
        texts: list[str | None] = [None] * len(ids)
    else:
        rows = {row["id"]: row for row in captions.select(["id", *CAPTION_FIELDS]).to_pylist()}
        texts = []
        for k, i in enumerate(ids):
            row = rows.get(i)
            text = caption_text(*(row[name] for name in CAPTION_FIELDS)) if row else ""
            texts.append(text or None)
            if text:
                for column, name in zip(FIELD_COLUMNS, CAPTION_FIELDS):
                    fields[column][k] = row[name]
    has = pa.array([t is not None for t in texts])
    report: dict[str, Any] = {"captions_used": captions is not None, "missing_caption_policy": missing, "splits": {}}
    splits = table["split"].to_pylist()
    for split in SPLITS:
        in_split = [s == split for s in splits]
        total = sum(in_split)
        with_caption = sum(1 for keep, h in zip(in_split, has.to_pylist()) if keep and h)
        report["splits"][split] = {"pairs": total, "with_caption": with_caption, "without_caption": total - with_caption}
    table = table.append_column(CAPTION_COLUMN, pa.array(texts, type=pa.string()))
    for column in FIELD_COLUMNS:
        table = table.append_column(column, pa.array(fields[column], type=pa.string()))
    if captions is not None and missing == "drop":
        table = table.filter(has)
    report["pairs_kept"] = table.num_rows
    return PreparedTable(table=table, report=report)


@functools.lru_cache(maxsize=4)
def _pair_encoder(tokenizer: str, cache_dir: str | None, max_length: int, shares: tuple[tuple[str, float], ...] = ()) -> PairEncoder:
    return PairEncoder(load_tokenizer(tokenizer, cache_dir), max_length, dict(shares))


def _captions_of(batch: dict[str, Any]) -> list:
    """Per row: the three field values (each gets its share of the budget), or None (T alone)."""
    n = len(batch["id"])
    if all(column in batch for column in FIELD_COLUMNS):
        columns = [list(batch[column]) for column in FIELD_COLUMNS]
        return [[col[k] for col in columns] for k in range(n)]
    if CAPTION_COLUMN in batch:  # rows joined before the fields were kept: cut the joined T_vlm from its end
        return list(batch[CAPTION_COLUMN])
    return [None] * n


def tokenize_batch(batch: dict[str, np.ndarray], tokenizer: str, cache_dir: str | None, max_length: int,
                   field_shares: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Ray Data batch function: ``[T; T_vlm]`` token arrays. Runs as Ray tasks, whose worker processes
    are reused, so the tokenizer is loaded once per process (cached), not once per batch — and no
    dedicated actor process has to start and import transformers for each split."""
    encoder = _pair_encoder(tokenizer, cache_dir, max_length, tuple(sorted((field_shares or {}).items())))
    encoded = encoder.encode(batch["text"].tolist(), _captions_of(batch))
    images = {k: batch[k] for k in IMAGE_COLUMNS if k in batch}
    return {"id": batch["id"], "label": batch["label"].astype(np.int64), **images, **encoded}


_TOKENS: dict[str, dict[str, Any]] = {}


def attach_text_tokens(batch: dict[str, np.ndarray], tokens_ref) -> dict[str, np.ndarray]:
    """Ray Data batch function: cached image-token rows + their text token arrays, looked up by id in
    the split's tokens (one object in the object store, fetched once per worker process)."""
    import ray

    key = tokens_ref.hex()
    if key not in _TOKENS:
        _TOKENS.clear()  # one split's tokens at a time per process
        _TOKENS[key] = ray.get(tokens_ref)
    tokens = _TOKENS[key]
    rows = np.array([tokens["index"][i] for i in batch["id"]], dtype=np.int64)
    return {**batch, **{name: tokens[name][rows] for name in (*TEXT_COLUMNS, "token_source")}}


def truncation_report(table: pa.Table, encoder: PairEncoder, chunk: int = 2048) -> dict[str, Any]:
    """What the budget rule of :mod:`umaf.train.text_inputs` cuts, per split and per part (T and each
    T_vlm field): the same encoder the Ray Data tokenisation runs, on the driver, lengths only kept."""
    splits = table["split"].to_pylist()
    report: dict[str, Any] = {"max_length": encoder.max_length,
                              "field_shares": dict(zip(CAPTION_FIELDS, encoder.shares)), "splits": {}}
    for split in SPLITS:
        part = table.filter(pa.array([s == split for s in splits]))
        if part.num_rows == 0:
            continue
        stats = TruncationStats()
        for start in range(0, part.num_rows, chunk):
            rows = part.slice(start, chunk).select([c for c in ("id", "text", CAPTION_COLUMN, *FIELD_COLUMNS) if c in part.column_names])
            batch = rows.to_pydict()
            encoder.encode(batch["text"], _captions_of(batch), stats)
        report["splits"][split] = stats.report()
    return report


class UmafMethod(Method):
    name = "umaf"

    def prepare_table(self, table: pa.Table, cfg, label_column: str) -> PreparedTable:
        captions = None
        if cfg.umaf.uses_captions:
            if not cfg.captions:
                raise ValueError(
                    "UMAF needs captions: pass --captions URI (the caption job's output), or umaf.use_captions=false "
                    "for the text-only ablation"
                )
            chosen = select_captions(cfg.captions, cfg.caption_fingerprint, endpoint_url=cfg.storage.endpoint_url,
                                     region=cfg.storage.region)
            captions = chosen.table
        prepared = join_captions(table, captions, cfg.missing_caption)
        if captions is not None:
            prepared.report["captions"] = chosen.describe()  # data_report.json: the caption set trained on
        u = cfg.umaf
        if not u.uses_text:
            return prepared
        encoder = _pair_encoder(u.tokenizer or u.encoder, u.encoder_cache, u.max_length, tuple(sorted(u.caption_field_shares.items())))
        prepared.report["truncation"] = report = truncation_report(prepared.table, encoder)
        for split, counts in report["splits"].items():
            # Not silent: what the budget cut is in data_report.json, and said in the driver log.
            cut = {name: c["pairs_truncated"] for name, c in counts["parts"].items() if c["pairs_truncated"]}
            if cut:
                logger.warning("%s: %d of %d pairs cut to max_length=%d (pairs cut per part: %s; see data_report.json)",
                               split, counts["pairs_truncated"], counts["pairs"], u.max_length, cut)
        return prepared

    def preprocess(self, ds, cfg, split: str):
        return self.preprocess_splits({split: ds}, cfg)[split]

    def preprocess_splits(self, datasets, cfg):
        """Token ids (text rows), then image pixels or cached image tokens (image rows)."""
        u = cfg.umaf
        tokenizer = u.tokenizer or u.encoder
        if u.uses_text:
            resolve_encoder(tokenizer, u.encoder_cache)  # build a tiny encoder once here, not per actor
        if u.caches_image_tokens:
            return self._cached_image_splits(datasets, cfg)
        if u.caches_text_states:
            return self._cached_text_splits(datasets, cfg)
        out = {}
        for split, ds in datasets.items():
            present = ds.columns()
            keep = ["id", "text", "label"] + [c for c in (CAPTION_COLUMN, *FIELD_COLUMNS) if c in present]
            if u.uses_image:
                keep += [c for c in IMAGE_COLUMNS if c in present]
            ds = ds.select_columns(keep)
            if u.uses_text:
                ds = ds.map_batches(
                    tokenize_batch,
                    fn_kwargs={"tokenizer": tokenizer, "cache_dir": u.encoder_cache, "max_length": u.max_length,
                               "field_shares": u.caption_field_shares},
                    batch_format="numpy",
                    batch_size=512,
                )
            if u.uses_image:  # the image encoder runs in every step: decoded pixels, its processor's size
                from umaf.train.feature_cache import decode_images_batch

                ds = ds.map_batches(
                    decode_images_batch, batch_format="numpy", batch_size=64, concurrency=cfg.preprocess_concurrency,
                    fn_kwargs={"image_encoder": resolve_encoder(u.image_encoder, u.encoder_cache), "image_size": None,
                               "storage_kw": _storage_kw(cfg)},
                )
            out[split] = ds
        return out

    def _cached_image_splits(self, datasets, cfg):
        """Frozen image encoder: its tokens once per split into the feature cache (shared with later
        epochs, runs and Tune trials), then each split's text tokens attached by id."""
        import ray

        from umaf.train.feature_cache import load_or_build_image_tokens
        from umaf.train.sppscl_method import default_cache_dir

        u = cfg.umaf
        built = load_or_build_image_tokens(
            datasets, cache_dir=u.image_cache_dir or default_cache_dir(cfg.out),
            image_encoder=resolve_encoder(u.image_encoder, u.encoder_cache), storage_kw=_storage_kw(cfg),
            concurrency=cfg.preprocess_concurrency, use_gpu=cfg.use_gpu,
            gpus_per_actor=cfg.preprocess_gpus_per_actor,
        )
        self.cache_info = {split: info for split, (_, info) in built.items()}
        if not u.uses_text:
            return {split: ds for split, (ds, _) in built.items()}
        encoder = _pair_encoder(u.tokenizer or u.encoder, u.encoder_cache, u.max_length,
                                tuple(sorted(u.caption_field_shares.items())))
        out = {}
        for split, (cached, _) in built.items():
            rows = datasets[split].select_columns(
                [c for c in ("id", "text", CAPTION_COLUMN, *FIELD_COLUMNS) if c in datasets[split].columns()])
            table = pa.concat_tables(ray.get(rows.to_arrow_refs())).to_pydict()
            tokens = encoder.encode(table["text"], _captions_of(table))
            tokens["index"] = {i: k for k, i in enumerate(table["id"])}
            out[split] = cached.map_batches(attach_text_tokens, fn_kwargs={"tokens_ref": ray.put(tokens)},
                                            batch_format="numpy", batch_size=512)
        return out

    def _cached_text_splits(self, datasets, cfg):
        """Frozen text encoder: each split tokenised here (the same encoder as the Ray Data path), its
        token states computed once into the feature cache (shared with later epochs, runs, Tune trials
        and experiment cells), then the token arrays (mask, sources) attached by id."""
        import ray
        import ray.data
        from ray.data.extensions import ArrowTensorArray

        from umaf.train.feature_cache import load_or_build_text_states
        from umaf.train.sppscl_method import default_cache_dir

        u = cfg.umaf
        encoder = _pair_encoder(u.tokenizer or u.encoder, u.encoder_cache, u.max_length,
                                tuple(sorted(u.caption_field_shares.items())))
        tokenised, tokens_of = {}, {}
        for split, ds in datasets.items():
            rows = ds.select_columns([c for c in ("id", "text", "label", CAPTION_COLUMN, *FIELD_COLUMNS) if c in ds.columns()])
            table = pa.concat_tables(ray.get(rows.to_arrow_refs())).to_pydict()
            tokens = encoder.encode(table["text"], _captions_of(table))
            tokens["index"] = {i: k for k, i in enumerate(table["id"])}
            tokens_of[split] = tokens
            tokenised[split] = ray.data.from_arrow(pa.table({
                "id": pa.array(table["id"], pa.string()), "label": pa.array(table["label"], pa.int64()),
                **{name: ArrowTensorArray.from_numpy(tokens[name]) for name in TEXT_COLUMNS}}))
        built = load_or_build_text_states(
            tokenised, cache_dir=u.text_cache_dir or default_cache_dir(cfg.out),
            encoder=resolve_encoder(u.encoder, u.encoder_cache), encoder_cache=u.encoder_cache,
            storage_kw=_storage_kw(cfg), concurrency=cfg.preprocess_concurrency, use_gpu=cfg.use_gpu)
        self.cache_info = {split: info for split, (_, info) in built.items()}
        return {split: cached.map_batches(attach_text_tokens, fn_kwargs={"tokens_ref": ray.put(tokens_of[split])},
                                          batch_format="numpy", batch_size=512)
                for split, (cached, _) in built.items()}

    def build_model(self, cfg, num_classes: int) -> torch.nn.Module:
        from umaf.models.image_encoder import ImageTokenEncoder, image_token_width

        u = cfg.umaf
        encoder, hidden, heads = load_encoder(u.encoder, u.encoder_cache) if u.uses_text else (None, 0, 0)
        image_encoder, image_hidden = None, None
        if u.uses_image:
            if u.caches_image_tokens:  # tokens come from the cache: only their width is needed
                image_hidden, image_heads = image_token_width(u.image_encoder, u.encoder_cache)
            else:
                image_encoder = ImageTokenEncoder(u.image_encoder, u.encoder_cache)
                image_hidden, image_heads = image_encoder.hidden_size, image_encoder.num_heads
            if encoder is None:  # the image-only row fuses at the image encoder's width
                hidden, heads = image_hidden, image_heads
        return UmafModel(encoder, hidden, heads, num_classes, u, image_encoder=image_encoder, image_hidden=image_hidden)

    def param_groups(self, model: torch.nn.Module, cfg) -> list[dict[str, Any]]:
        pretrained = [m for m in (model.encoder, model.image_encoder) if m is not None]
        encoder = [p for m in pretrained for p in m.parameters() if p.requires_grad]
        new = [p for m in model.new_layers() for p in m.parameters() if p.requires_grad]
        groups = [{"name": "new_layers", "params": new, "lr": cfg.lr}]
        if encoder:
            groups.insert(0, {"name": "encoder", "params": encoder, "lr": cfg.encoder_lr})
        return groups

    def collate(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if "attention_mask" in batch:
            # Rows are padded to max_length; cut the batch to its longest real row (most batches are shorter).
            mask = np.asarray(batch["attention_mask"])
            length = max(1, int(mask.sum(1).max()))
            for name in (*TEXT_COLUMNS, "token_source"):
                if name in batch:
                    out[name] = torch.as_tensor(np.asarray(batch[name])[:, :length], dtype=torch.long)
        if "pixel_values" in batch:
            out["pixel_values"] = torch.as_tensor(np.asarray(batch["pixel_values"]), dtype=torch.float32)
        if "image_tokens" in batch:
            from umaf.train.feature_cache import decode_image_tokens

            out["image_tokens"] = decode_image_tokens(batch)
        if "text_states" in batch:  # cut like the mask above: both end at the batch's longest real row
            from umaf.train.feature_cache import decode_text_states

            out["text_states"] = decode_text_states(batch)
        out["labels"] = torch.as_tensor(np.asarray(batch["label"]), dtype=torch.long)
        return {name: value.to(device) for name, value in out.items()}

    @staticmethod
    def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: batch[name] for name in MODEL_INPUTS if name in batch}

    def train_step(self, model, batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        with ctx.autocast():
            out = model(**self._inputs(batch))
        # Eq. 5 on the global batch: features of every rank, gathered with their gradient path.
        losses = umaf_loss(out, batch["labels"], ctx.config.umaf, gather=distributed.gather_with_grad)
        ctx.backward_step(losses["loss"])
        return {name: value.detach() for name, value in losses.items()}  # read by the loop, not here

    def observe_eval(self, split: str | None) -> None:
        self.attention = None
        if split == "test":
            from umaf.train.attention_map import AttentionMap

            self.attention = AttentionMap()  # filled by predict when umaf.attention_map is on

    def predict(self, model, batch):
        record = getattr(self, "attention", None) is not None and model.cfg.attention_map
        out = model(**self._inputs(batch), return_attention=record)
        if record and out.attention is not None:
            self.attention.add(out.attention.float().cpu().numpy(), out.mask.cpu().numpy(),
                               token_sources(batch, out.mask.shape[1]).cpu().numpy())
            self.recorded = self.attention
        return out.logits, out.pooled

    def export_files(self, model, cfg, folder) -> None:
        """``tokenizer/`` (the run's, with its special tokens) and ``encoder/config.json``: with the
        weights, the whole model is rebuilt offline (``AutoModel.from_config``). Only the runs over
        text (+ captions) have them; an image-only row has no text encoder, and the image rows of
        Table 3 are not loadable by ``load_run`` (their weights are still in ``best/``)."""
        u = cfg.umaf
        if model.encoder is None:
            return
        load_tokenizer(u.tokenizer or u.encoder, u.encoder_cache).save_pretrained(str(folder / "tokenizer"))
        model.encoder.config.save_pretrained(str(folder / "encoder"))

    def finish(self, model, cfg, split_batches, label_names, device, run_uri, storage_kw) -> dict[str, Any]:
        """Figure 3: ``<run>/attention/attention_test.{json,png}`` from the test evaluation's forwards."""
        recorded = getattr(self, "recorded", None)
        if not cfg.umaf.attention_map or recorded is None:
            return {}
        from umaf import storage

        u = cfg.umaf
        encoders = {"captions": f"{u.encoder} + VLM captions", "text": u.encoder, "image": u.image_encoder,
                    "text+image": f"{u.encoder} + {u.image_encoder}"}[u.backbone]
        summary = {"split": "test", "backbone": u.backbone, "encoders": encoders, **recorded.summary()}
        folder = storage.join(run_uri, "attention")
        storage.write_json_atomic(storage.join(folder, "attention_test.json"), summary, **storage_kw)
        png = recorded.png(f"{u.backbone}: {encoders} (test, {summary['samples']} pairs)")
        storage.write_bytes_atomic(storage.join(folder, "attention_test.png"), png, **storage_kw)
        return {"attention_by_source": summary["by_source"], "attention_map": storage.join(folder, "attention_test.png")}

    def find_unused_parameters(self, cfg) -> bool:
        # Literal Eq. 4 gives the scorer no gradient (see umaf.models.umaf.topk_select).
        return cfg.umaf.nrf and cfg.umaf.topk_weighting == "literal"

    def model_card(self, cfg) -> dict[str, Any]:
        u = cfg.umaf
        return {"backbone": u.backbone, "encoder": u.encoder, "tokenizer": u.tokenizer or u.encoder,
                "image_encoder": u.image_encoder, "max_length": u.max_length}


def token_sources(batch: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """Source code of every position of the unified sequence ``[text; image]`` (Figure 3's split)."""
    from umaf.train.text_inputs import SOURCE_CODE

    text = batch.get("token_source")
    parts = [text] if text is not None else []
    image = length - (text.shape[1] if text is not None else 0)
    if image:
        labels = batch["labels"]
        parts.append(torch.full((labels.shape[0], image), SOURCE_CODE["image"], dtype=torch.long, device=labels.device))
    return torch.cat(parts, 1)


def _storage_kw(cfg) -> dict[str, Any]:
    return {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
