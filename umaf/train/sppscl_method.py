"""SPP-SCL behind the shared train loop (:mod:`umaf.train.method`): preprocessing, model, two-step update.

The loop is UMAF's; what SPP-SCL changes is the step. :func:`two_step_update` is Algorithm 1 of the
paper: step 1 ``λ·CE + L_cli + L_clt`` and an optimizer step; re-forward; if
:func:`umaf.losses.needs_inter_alignment` says the modalities are not aligned, step 2 ``L_clm`` and a
second optimizer step. Ablation variants (``sppscl.variant``): ``one_step`` (all four losses in one
step, Table 4), ``no_inter`` (w/o L_clm) and ``no_intra`` (w/o L_cli, L_clt) (Table 5); ``fusion:
concat`` is w/o CMF (Table 7).

Preprocessing (Ray Data, once per run): with the frozen-feature cache (default where the encoders
are frozen and deterministic, see :mod:`umaf.train.feature_cache`) the rows become the encoders'
outputs, read from the cache or computed once; without it, token ids and image pixels, and the
encoders run in every step.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from umaf import distributed
from umaf.losses import needs_inter_alignment, supcon_cross_loss, supcon_loss
from umaf.models.sppscl import SppSclConfig, SppSclModel, SppSclOutput
from umaf.train.method import Method, StepContext

CACHED_COLUMNS = ("image_map", "image_shape", "text_states", "text_shape")
RAW_COLUMNS = ("pixel_values", "input_ids", "attention_mask")


def two_step_update(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                    config: SppSclConfig, ctx: StepContext) -> dict[str, torch.Tensor | float]:
    """One batch of SPP-SCL training (Algorithm 1); returns the loss terms (detached tensors, left on
    the device for the loop to read once per logging interval) and whether step 2 ran.

    ``step2`` is 1.0 when the second update (L_clm) ran on this batch, else 0.0 (a plain float):
    :class:`SppSclMethod` counts it, so ``train_step2_fire_rate`` in ``history.json``
    (``train/step2_fire_rate`` in TensorBoard, and the epoch line) is the fraction of the epoch's steps
    on which the configured check fired step 2.

    Contrastive losses see the global batch (``gather_with_grad``); CE stays per rank (DDP's mean of
    equal per-rank means is the global mean). The step-2 decision is reduced across ranks inside
    ``needs_inter_alignment``, so every rank takes the same number of backward passes.
    """
    tau, compat, variant, positives = config.tau, config.compat, config.variant, config.inter_positives
    official = compat == "official"
    # The released code (torch 1.8) zeroes gradients to 0, not None: its step-2 AdamW update still
    # moves CMF and the classifier (momentum, weight decay) although L_clm gives them no gradient.
    ctx.zero_grad_set_to_none = not official
    labels_all = distributed.gather_no_grad(labels)

    with ctx.autocast():
        out: SppSclOutput = model(**inputs)
    image_all = distributed.gather_with_grad(out.image_p).float()
    text_all = distributed.gather_with_grad(out.text_p).float()
    ce = F.cross_entropy(out.logits.float(), labels)
    zero = ce.new_zeros(())
    l_cli = supcon_loss(image_all, labels_all, tau, compat) if variant != "no_intra" else zero
    l_clt = supcon_loss(text_all, labels_all, tau, compat) if variant != "no_intra" else zero
    terms = {"ce": ce.detach(), "l_cli": l_cli.detach(), "l_clt": l_clt.detach()}

    if variant == "one_step":
        # Table 4's one-step baseline: every loss of Eq. 7 in one update, on the same features.
        l_clm = supcon_cross_loss(text_all, image_all, labels_all, tau, compat, positives)
        loss = config.ce_weight * ce + l_cli + l_clt + l_clm
        ctx.backward_step(loss)
        return {**terms, "l_clm": l_clm.detach(), "loss": loss.detach(), "step2": 1.0}

    # Step 1 (Algorithm 1 lines 3–5): intra-modal alignment with the classifier.
    loss1 = config.ce_weight * ce + l_cli + l_clt
    ctx.backward_step(loss1)
    if variant == "no_inter":
        return {**terms, "l_clm": 0.0, "loss": loss1.detach(), "step2": 0.0}

    # Line 7: I_p', T_p' from the updated model. Only the embeddings are needed; compat=official runs the
    # whole model as the released train.py does, so the classifier's BatchNorm statistics move again.
    with ctx.autocast():
        out2: SppSclOutput = model(**inputs, embeddings_only=not official)
    # Lines 8–12, one decision for all ranks.
    if needs_inter_alignment(out2.text_p, out2.image_p, labels, config.alpha, config.resolved_alignment_check):
        l_clm = supcon_cross_loss(distributed.gather_with_grad(out2.text_p).float(),
                                  distributed.gather_with_grad(out2.image_p).float(), labels_all, tau, compat, positives)
        step2_loss = l_clm
        if official and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # DDP marks the classifier used (the full forward reached its logits) and waits for its
            # gradients, which L_clm never produces: a zero-weighted logits term hands it zeros, the
            # gradient the released code's step 2 gives it anyway (zero_grad to 0, see above).
            step2_loss = l_clm + 0.0 * out2.logits.float().sum()
        ctx.backward_step(step2_loss)  # lines 13–14
        return {**terms, "l_clm": l_clm.detach(), "loss": loss1.detach() + l_clm.detach(), "step2": 1.0}
    return {**terms, "l_clm": 0.0, "loss": loss1.detach(), "step2": 0.0}


@functools.lru_cache(maxsize=2)
def _input_processors(image_encoder: str, text_encoder: str):
    from umaf.models.encoders import load_tokenizer
    from umaf.models.image_encoder import load_image_processor

    return load_image_processor(image_encoder), load_tokenizer(text_encoder)


def raw_inputs_batch(batch: dict[str, np.ndarray], image_encoder: str, text_encoder: str, image_size: int,
                     max_length: int, storage_kw: dict) -> dict[str, np.ndarray]:
    """Ray Data batch function (no cache): token ids padded to ``max_length`` and image pixels. Runs as
    tasks whose reused worker processes keep the processor and tokenizer loaded."""
    from umaf.models.image_encoder import pixel_values_from_bytes
    from umaf.train.feature_cache import read_image_bytes

    processor, tokenizer = _input_processors(image_encoder, text_encoder)
    images = [read_image_bytes(uri, storage_kw) for uri in batch["image"].tolist()]
    pixels, ok = pixel_values_from_bytes(processor, images, image_size)
    # Padded to max_length as the official data loader does (compat=official averages padding).
    enc = tokenizer(batch["text"].tolist(), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return {
        "id": batch["id"],
        "label": np.asarray(batch["label"], dtype=np.int64),
        "image_ok": ok.numpy(),
        "pixel_values": pixels.numpy().astype(np.float32),
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
    }


def default_cache_dir(out: str) -> str:
    """``<parent of out>/feature_cache``: beside the run, shared by the runs and trials of one folder."""
    text = out.rstrip("/")
    parent = text.rsplit("/", 1)[0] if "/" in text.split("://", 1)[-1] else (text.split("://", 1)[0] + "://" if "://" in text else ".")
    from umaf import storage

    return storage.join(parent, "feature_cache")


class SppSclMethod(Method):
    name = "sppscl"

    def __init__(self) -> None:
        self.cache_info: dict[str, Any] = {}
        self._steps = self._step2_steps = 0  # this epoch's steps, and those on which step 2 ran
        self._warned_rare_step2 = False

    @staticmethod
    def _storage_kw(cfg) -> dict[str, Any]:
        return {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}

    def preprocess(self, ds, cfg, split: str):
        from umaf.models.encoders import resolve_encoder
        from umaf.models.image_encoder import resolve_image_encoder

        s: SppSclConfig = cfg.sppscl
        # Build tiny encoders once here (driver), not in every actor.
        resolve_encoder(s.text_encoder)
        resolve_image_encoder(s.image_encoder)
        columns = [c for c in ("id", "text", "image", "image_ok", "label") if c in ds.columns()]
        ds = ds.select_columns(columns)
        if s.use_feature_cache:
            from umaf.train.feature_cache import load_or_build

            cached, info = load_or_build(
                ds, cache_dir=s.cache_dir or default_cache_dir(cfg.out), split=split,
                image_encoder=s.image_encoder, text_encoder=s.text_encoder, image_size=s.image_size,
                max_length=s.resolved_max_length, storage_kw=self._storage_kw(cfg), concurrency=cfg.preprocess_concurrency,
                use_gpu=cfg.use_gpu, gpus_per_actor=cfg.preprocess_gpus_per_actor,
            )
            self.cache_info[split] = info
            return cached
        return ds.map_batches(
            raw_inputs_batch,
            fn_kwargs={"image_encoder": s.image_encoder, "text_encoder": s.text_encoder,
                       "image_size": s.image_size, "max_length": s.resolved_max_length, "storage_kw": self._storage_kw(cfg)},
            batch_format="numpy",
            batch_size=64,
            concurrency=cfg.preprocess_concurrency,
        )

    def preprocess_splits(self, datasets, cfg):
        """With the feature cache: every missing split's features in one Ray Data job, so each encoder
        actor loads ResNet and BERT once for all splits."""
        if not cfg.sppscl.use_feature_cache:
            return super().preprocess_splits(datasets, cfg)
        from umaf.models.encoders import resolve_encoder
        from umaf.models.image_encoder import resolve_image_encoder
        from umaf.train.feature_cache import load_or_build_splits

        s: SppSclConfig = cfg.sppscl
        resolve_encoder(s.text_encoder)  # build tiny encoders once here (driver), not in every actor
        resolve_image_encoder(s.image_encoder)
        built = load_or_build_splits(
            datasets, cache_dir=s.cache_dir or default_cache_dir(cfg.out), image_encoder=s.image_encoder,
            text_encoder=s.text_encoder, image_size=s.image_size, max_length=s.resolved_max_length,
            storage_kw=self._storage_kw(cfg), concurrency=cfg.preprocess_concurrency, use_gpu=cfg.use_gpu,
            gpus_per_actor=cfg.preprocess_gpus_per_actor,
        )
        self.cache_info.update({split: info for split, (_, info) in built.items()})
        return {split: ds for split, (ds, _) in built.items()}

    def build_model(self, cfg, num_classes: int) -> torch.nn.Module:
        return SppSclModel(cfg.sppscl, num_classes, with_encoders=not cfg.sppscl.use_feature_cache)

    def param_groups(self, model: torch.nn.Module, cfg) -> list[dict[str, Any]]:
        groups = [{"name": "new_layers", "params": [p for p in model.head.parameters() if p.requires_grad], "lr": cfg.lr}]
        if model.text_encoder is not None:
            encoder = [p for p in model.text_encoder.parameters() if p.requires_grad]
            if encoder:  # finetune_text: BERT layers 9–12
                groups.insert(0, {"name": "encoder", "params": encoder, "lr": cfg.encoder_lr})
        return groups

    def collate(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        if "image_map" in batch:
            from umaf.train.feature_cache import decode_features

            out = decode_features(batch)
        else:
            # Full max_length rows; the model cuts them to the longest real text in paper mode.
            out = {"pixel_values": torch.as_tensor(np.asarray(batch["pixel_values"]), dtype=torch.float32),
                   "input_ids": torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long),
                   "attention_mask": torch.as_tensor(np.asarray(batch["attention_mask"]), dtype=torch.long)}
        out["labels"] = torch.as_tensor(np.asarray(batch["label"]), dtype=torch.long)
        return {name: value.to(device) for name, value in out.items()}

    @staticmethod
    def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in ("image_map", "text_states", "pixel_values", "input_ids", "attention_mask")}

    def train_step(self, model, batch, ctx: StepContext) -> dict[str, torch.Tensor | float]:
        if batch["labels"].shape[0] < 2:
            # BatchNorm cannot train on one sample and a contrastive loss has no pair. Train V2 splits
            # the train set evenly, so every rank skips the same last batch (no DDP mismatch).
            return {}
        terms = two_step_update(model, self._inputs(batch), batch["labels"], ctx.config.sppscl, ctx)
        # The decision is one for all ranks (needs_inter_alignment reduces it), so every rank counts alike.
        self._steps += 1
        self._step2_steps += int(terms.pop("step2") > 0)
        return terms

    def end_epoch(self, cfg, epoch: int) -> tuple[dict[str, float], list[str]]:
        """``step2_fire_rate``: the fraction of the epoch's steps on which step 2 (L_clm) ran; when it is
        under 1% in a variant that has a step 2, one warning for the run naming the knob."""
        s: SppSclConfig = cfg.sppscl
        steps, fired = self._steps, self._step2_steps
        self._steps = self._step2_steps = 0
        if not steps:
            return {}, []
        rate = fired / steps
        notes = []
        if s.variant in ("two_step", "no_intra") and rate < 0.01 and not self._warned_rare_step2:
            self._warned_rare_step2 = True
            check = s.resolved_alignment_check
            hint = ("alpha=2/3 was tuned with sppscl.alignment_check=official" if check == "paper"
                    else "raise sppscl.alpha to run it more often")
            notes.append(f"step 2 (L_clm) ran on {fired} of {steps} steps ({rate:.1%}) in epoch {epoch + 1}: the "
                         f"sppscl.alignment_check={check} test at sppscl.alpha={s.alpha:.4g} almost never fires, so "
                         f"this run trains the w/o L_clm ablation; {hint}")
        return {"step2_fire_rate": rate}, notes

    def predict(self, model, batch):
        # CMF attends across the batch: the loop evaluates with a fixed eval_batch_size in split order.
        out = model(**self._inputs(batch))
        return out.logits, out.fused

    def eval_depends_on_batch(self, cfg) -> bool:
        return cfg.sppscl.fusion == "cmf"  # w/o CMF (concat) each pair is classified on its own

    def predict_isolated(self, model, batch, n_query: int):
        out = model(**self._inputs(batch), isolate=n_query)
        return out.logits[:n_query], out.fused[:n_query]

    def finish(self, model, cfg, split_batches, label_names, device, run_uri, storage_kw) -> dict[str, Any]:
        """IID/TTD/ITD per class on dev and test, and a t-SNE PNG of the test fusion features."""
        if not cfg.sppscl.diagnostics:
            return {}
        import json

        from umaf import storage
        from umaf.train.diagnostics import same_label_distances, tsne_png

        was_training = model.training
        model.eval()
        summary: dict[str, Any] = {}
        try:
            for split in ("dev", "test"):
                feats = {"image_p": [], "text_p": [], "fused": [], "label": []}
                with torch.no_grad():
                    for batch in split_batches(split):
                        tensors = self.collate(batch, device)
                        out = model(**self._inputs(tensors))
                        for key in ("image_p", "text_p", "fused"):
                            feats[key].append(getattr(out, key).float().cpu().numpy())
                        feats["label"].append(np.asarray(batch["label"], dtype=np.int64))
                if not feats["label"]:
                    continue
                arrays = {k: np.concatenate(v) for k, v in feats.items()}
                names = list(label_names)
                summary[split] = same_label_distances(arrays["image_p"], arrays["text_p"], arrays["label"], names)
                if split == "test" and len(arrays["label"]) >= 3:
                    png = tsne_png(arrays["fused"], arrays["label"], names, f"SPP-SCL fusion features ({split})", seed=cfg.seed)
                    storage.write_bytes_atomic(storage.join(run_uri, "diagnostics", f"tsne_{split}.png"), png, **storage_kw)
            storage.write_text_atomic(storage.join(run_uri, "diagnostics", "distances.json"),
                                      json.dumps(summary, indent=2), **storage_kw)
        finally:
            model.train(was_training)
        return {"distances": summary, "tsne": storage.join(run_uri, "diagnostics", "tsne_test.png")}

    def export_files(self, model, cfg, folder) -> None:
        """The tokenizer, the image processor and both encoders' configs. The frozen encoders' weights
        are not copied: they load by name (``image_encoder``/``text_encoder`` in the card) as in training."""
        from transformers import AutoConfig

        from umaf.models.encoders import resolve_encoder
        from umaf.models.image_encoder import resolve_image_encoder

        s: SppSclConfig = cfg.sppscl
        processor, tokenizer = _input_processors(s.image_encoder, s.text_encoder)
        tokenizer.save_pretrained(str(folder / "tokenizer"))
        processor.save_pretrained(str(folder / "image_processor"))
        AutoConfig.from_pretrained(resolve_image_encoder(s.image_encoder)).save_pretrained(str(folder / "image_encoder"))
        AutoConfig.from_pretrained(resolve_encoder(s.text_encoder)).save_pretrained(str(folder / "text_encoder"))

    def find_unused_parameters(self, cfg) -> bool:
        # Step 2 (L_clm) and the embeddings-only re-forward leave CMF and the classifier without gradient.
        return cfg.sppscl.variant in ("two_step", "no_intra")

    def model_card(self, cfg) -> dict[str, Any]:
        s = cfg.sppscl
        return {"image_encoder": s.image_encoder, "text_encoder": s.text_encoder, "image_size": s.image_size,
                "max_length": s.resolved_max_length, "feature_cache": s.use_feature_cache, "compat": s.compat,
                "variant": s.variant, "fusion": s.fusion, "inter_positives": s.inter_positives,
                "alignment_check": s.resolved_alignment_check, "text_layers": s.text_layers}
