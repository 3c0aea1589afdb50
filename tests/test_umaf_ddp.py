"""DDP equivalence of the UMAF step: 2 gloo workers on halves of a batch == 1 process on the whole,
for [T; T_vlm] and for Table 3's image-token path ([T; projected ViT tokens]).

The uniformity loss (Eq. 5) couples the samples of a batch; computed per rank it would silently be
a different loss. With features gathered across ranks (``umaf.distributed.gather_with_grad``) both
ranks must report the global loss, and after one optimizer step the parameters must equal those of
one process that saw the concatenated batch (SGD, so equal parameters mean equal gradients).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from umaf.models.encoders import build_tiny_random_bert, resolve_encoder
from umaf.models.umaf import UmafConfig
from umaf.train.config import TrainConfig
from umaf.train.method import StepContext
from umaf.train.umaf_method import UmafMethod

from conftest import free_port

BATCH = 8


def make_config(cache: str, backbone: str = "captions") -> TrainConfig:
    # text+image (Table 3's multimodal rows): [T; image tokens], the tiny ViT trained too, so its
    # gradients and the projection's are all-reduced along with the text encoder's.
    image = {"image_encoder": "tiny-random-vit", "train_image_encoder": True} if backbone != "captions" else {}
    return TrainConfig(
        num_workers=2, batch_size=BATCH, grad_clip=None,
        umaf=UmafConfig(encoder="tiny-random-bert", encoder_cache=cache, dropout=0.0, top_k=3,
                        uniformity_weight=0.5, uniformity_tau=0.2, max_length=20, backbone=backbone, **image),
    )


def make_batch(backbone: str = "captions") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 21, (BATCH,), generator=gen)
    ids = torch.randint(1000, 5000, (BATCH, 20), generator=gen)
    mask = (torch.arange(20)[None, :] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": torch.randint(0, 3, (BATCH,), generator=gen)}
    if backbone != "captions":
        batch["pixel_values"] = torch.randn(BATCH, 3, 32, 32, generator=gen)
    return batch


def one_step(model, batch, cfg) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    method = UmafMethod()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ctx = StepContext(optimizer=optimizer, device=torch.device("cpu"), config=cfg)
    terms = method.train_step(model, batch, ctx)
    module = model.module if hasattr(model, "module") else model
    return terms, {k: v.detach().clone() for k, v in module.state_dict().items()}


def _worker(rank: int, world: int, port: int, cache: str, out_dir: str, backbone: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = make_config(cache, backbone)
        torch.manual_seed(0)
        model = UmafMethod().build_model(cfg, 3)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = BATCH // world
        batch = {k: v[rank * half:(rank + 1) * half] for k, v in make_batch(backbone).items()}
        terms, state = one_step(ddp, batch, cfg)
        torch.save({"terms": terms, "state": state}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(480)
@pytest.mark.parametrize("backbone", ["captions", "text+image"])
def test_two_gloo_workers_equal_one_process_on_the_whole_batch(tmp_path, backbone):
    cache = str(tmp_path / "encoders")
    build_tiny_random_bert(cache)
    resolve_encoder("tiny-random-vit", cache)  # built once here, not by both ranks
    mp.spawn(_worker, args=(2, free_port(), cache, str(tmp_path), backbone), nprocs=2, join=True)

    cfg = make_config(cache, backbone)
    torch.manual_seed(0)
    model = UmafMethod().build_model(cfg, 3)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    single_terms, single_state = one_step(model, make_batch(backbone), cfg)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        # every rank computed the uniformity loss of the GLOBAL batch
        assert float(r["terms"]["uniformity"]) == pytest.approx(float(single_terms["uniformity"]), rel=1e-5)
    # the CE of the global batch is the mean of the two halves' CE (equal halves)
    # float(): train_step's terms are 0-d tensors (the loop reads them once per logging interval)
    assert float(ranks[0]["terms"]["ce"] + ranks[1]["terms"]["ce"]) / 2 == pytest.approx(float(single_terms["ce"]), rel=1e-5)
    moved = 0
    for name, value in single_state.items():
        for r in ranks:
            torch.testing.assert_close(r["state"][name], value, rtol=1e-4, atol=1e-6, msg=f"parameter {name}")
        moved += int(not torch.equal(value, before[name]))
    assert moved > 10  # the step really changed the encoder, fusion, scorer and classifier
    assert not torch.equal(single_state["scorer.weight"], before["scorer.weight"])
    if backbone != "captions":  # the image path learned: projection and ViT weights moved, equally on both ranks
        assert not torch.equal(single_state["image_proj.weight"], before["image_proj.weight"])
        assert any(not torch.equal(v, before[k]) for k, v in single_state.items() if k.startswith("image_encoder."))
