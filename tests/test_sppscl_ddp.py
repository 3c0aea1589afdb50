"""SPP-SCL under DDP: 2 gloo workers give the same losses, the same step-2 decision and the same
parameters after a two-step update as 1 process on the concatenated batch.

The model is the real SPP-SCL head (hierarchical attention, BiLSTM, projections, CMF gathering keys
across ranks, classifier) on encoder-output tensors, with dropout 0 and BatchNorm replaced by
Identity: per-rank BatchNorm statistics are the one thing DDP legitimately changes (SyncBatchNorm
has no CPU kernel), and they are not what this test is about.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from umaf.models.sppscl import SppSclConfig, SppSclHead
from umaf.train.config import TrainConfig
from umaf.train.method import StepContext
from umaf.train.sppscl_method import two_step_update

from conftest import free_port

BATCH, CLASSES = 8, 3
# alpha=50: step 2 always runs; alpha=1e-6: it never does (c < ~0 is false unless c == 0).
ALPHAS = (50.0, 1e-6, 2 / 3)


class _HeadModel(nn.Module):
    """The head taking cached-feature inputs, as SppSclModel(with_encoders=False) does."""

    def __init__(self, config: SppSclConfig):
        super().__init__()
        torch.manual_seed(0)
        self.head = SppSclHead(config, CLASSES, image_in_channels=6, text_hidden=8, text_layers=4)
        for name, module in list(self.head.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    setattr(module, child_name, nn.Identity())

    def forward(self, image_map, text_states, attention_mask, embeddings_only=False):
        return self.head(image_map, text_states, attention_mask, embeddings_only=embeddings_only)


def _data():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([9, 4, 7, 2, 9, 5, 3, 8])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
    return {
        "image_map": torch.randn(BATCH, 6, 2, 2, generator=g),
        "text_states": torch.randn(BATCH, 4, 9, 8, generator=g),
        "attention_mask": mask,
    }, torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])


def _run(alpha: float, compat: str, rows: slice) -> tuple[dict, dict[str, torch.Tensor]]:
    scfg = SppSclConfig(dropout=0.0, alpha=alpha, compat=compat, embed_dim=8, image_channels=6, lstm_hidden=4)
    cfg = TrainConfig(model="sppscl", sppscl=scfg, grad_clip=None)
    model = _HeadModel(scfg)
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    # SGD: parameters after a step are a direct read of the gradients (Adam would amplify float
    # noise in near-zero gradients to a full lr-sized step).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ctx = StepContext(optimizer=optimizer, device=torch.device("cpu"), config=cfg)
    inputs, labels = _data()
    inputs = {k: v[rows] for k, v in inputs.items()}
    terms = {}
    for step in range(2):  # two batches: the second runs after a step-2 decision either way
        terms[step] = two_step_update(model, inputs, labels[rows], scfg, ctx)
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return terms, {k: v.detach().clone() for k, v in module.state_dict().items()}


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        half = BATCH // 2
        rows = slice(rank * half, (rank + 1) * half)
        results[rank] = {(alpha, compat): _run(alpha, compat, rows) for alpha in ALPHAS for compat in ("paper", "official")}
    finally:
        dist.destroy_process_group()


def test_two_workers_equal_one_process() -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=2, join=True)
    torch.set_num_threads(1)
    for alpha in ALPHAS:
        for compat in ("paper", "official"):
            single_terms, single_params = _run(alpha, compat, slice(None))
            for rank in (0, 1):
                terms, params = results[rank][(alpha, compat)]
                for step in single_terms:
                    for name in ("l_cli", "l_clt", "l_clm", "step2"):
                        assert terms[step][name] == pytest.approx(single_terms[step][name], rel=1e-4, abs=1e-6), (alpha, compat, step, name)
                for name, value in single_params.items():
                    assert torch.allclose(params[name], value, rtol=1e-4, atol=1e-5), (alpha, compat, name)
            # The step-2 decision is one decision: both ranks agree, and the 1-process run agrees.
            assert [results[r][(alpha, compat)][0][0]["step2"] for r in (0, 1)] == [single_terms[0]["step2"]] * 2
    # The alphas were chosen to exercise both branches.
    assert _run(50.0, "paper", slice(None))[0][0]["step2"] == 1.0
    assert _run(1e-6, "paper", slice(None))[0][0]["step2"] == 0.0
