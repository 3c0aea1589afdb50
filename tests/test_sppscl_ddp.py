"""SPP-SCL under DDP: 2 gloo workers give the same losses, the same step-2 decision, the same
parameters AND the same BatchNorm running statistics after a two-step update as 1 process on the
concatenated batch.

The model is the real SPP-SCL head (hierarchical attention, BiLSTM, projections with BatchNorm, CMF
gathering keys across ranks, classifier with BatchNorm) on encoder-output tensors, with dropout 0.
Its BatchNorm layers are ``GlobalBatchNorm`` (global-batch statistics under DDP, on CPU/gloo where
``torch.nn.SyncBatchNorm`` cannot run); the same head with plain per-rank ``BatchNorm`` is run too,
to show that the comparison would catch per-shard statistics.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from umaf.models.global_batchnorm import GlobalBatchNorm
from umaf.models.sppscl import SppSclConfig, SppSclHead
from umaf.train.config import TrainConfig
from umaf.train.method import StepContext
from umaf.train.sppscl_method import two_step_update

from conftest import free_port

BATCH, CLASSES = 8, 3
# alpha=50: step 2 always runs; alpha=1e-6: it never does (c < ~0 is false unless c == 0).
ALPHAS = (50.0, 1e-6, 2 / 3)
# float32 sums in another order (per-rank partial sums, then all-reduce) differ in the last bits;
# BatchNorm divides by the std of 8-32 values and SGD at lr 0.5 takes 2-4 steps, which lifts those
# bits to ~1e-4 of a parameter. Per-rank BatchNorm differs by far more (checked below).
TOL = {"rtol": 1e-3, "atol": 1e-4}


class _PlainBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's BatchNorm (1d or 2d input alike): per-rank statistics under DDP."""

    def _check_input_dim(self, input):
        pass


class _HeadModel(nn.Module):
    """The head taking cached-feature inputs, as SppSclModel(with_encoders=False) does."""

    def __init__(self, config: SppSclConfig, per_rank_batchnorm: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.head = SppSclHead(config, CLASSES, image_in_channels=6, text_hidden=8, text_layers=4)
        if per_rank_batchnorm:  # the plain BatchNorm of before: each rank normalises its own shard
            for module in list(self.head.modules()):
                for child_name, child in list(module.named_children()):
                    if isinstance(child, GlobalBatchNorm):
                        setattr(module, child_name, _PlainBatchNorm(child.num_features))

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


def _run(alpha: float, compat: str, rows: slice, per_rank_batchnorm: bool = False, positives: str = "paired") -> tuple[dict, dict[str, torch.Tensor]]:
    scfg = SppSclConfig(dropout=0.0, alpha=alpha, compat=compat, embed_dim=8, image_channels=6, lstm_hidden=4,
                        inter_positives=positives)
    cfg = TrainConfig(model="sppscl", sppscl=scfg, grad_clip=None)
    model = _HeadModel(scfg, per_rank_batchnorm)
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
        results[(rank, "printed")] = _run(50.0, "paper", rows, positives="printed")
        results[(rank, "per_rank_bn")] = _run(50.0, "paper", rows, per_rank_batchnorm=True)
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
                        # float(): train_step's terms are 0-d tensors (the loop reads them once per interval)
                        assert float(terms[step][name]) == pytest.approx(float(single_terms[step][name]), rel=1e-4, abs=1e-6), (alpha, compat, step, name)
                # state_dict: every parameter and every BatchNorm buffer (running mean/var, batch count).
                for name, value in single_params.items():
                    assert torch.allclose(params[name], value, **TOL), (alpha, compat, name)
            # The update really moved the model (else equal parameters would prove nothing): most
            # tensors changed, the classifier among them, and the two ranks moved them alike.
            initial = _HeadModel(SppSclConfig(dropout=0.0, alpha=alpha, compat=compat, embed_dim=8, image_channels=6,
                                              lstm_hidden=4)).state_dict()
            moved = [name for name, value in single_params.items()
                     if value.is_floating_point() and not torch.equal(value, initial[name])]
            floating = [name for name, value in initial.items() if value.is_floating_point()]
            assert len(moved) > len(floating) // 2, (alpha, compat, sorted(set(floating) - set(moved)))
            assert any("classifier" in name for name in moved), (alpha, compat, moved)
            # The step-2 decision is one decision: both ranks agree, and the 1-process run agrees.
            assert [results[r][(alpha, compat)][0][0]["step2"] for r in (0, 1)] == [single_terms[0]["step2"]] * 2
    # Eq. 6 with the printed mask is just as equivalent.
    single_terms, single_params = _run(50.0, "paper", slice(None), positives="printed")
    for rank in (0, 1):
        terms, params = results[(rank, "printed")]
        assert float(terms[1]["l_clm"]) == pytest.approx(float(single_terms[1]["l_clm"]), rel=1e-4)
        for name, value in single_params.items():
            assert torch.allclose(params[name], value, **TOL), ("printed", name)
    # BatchNorm is really exercised: running statistics moved, and plain per-rank BatchNorm would
    # have failed the comparison above (its running means are those of one shard).
    _, single_params = _run(50.0, "paper", slice(None))
    running = [k for k in single_params if k.endswith("running_mean")]
    assert len(running) == 8  # image conv, 2 + 2 in the projections, 1 + 1 alignment layers, classifier
    assert all(not torch.all(single_params[k] == 0) for k in running)
    _, per_rank = results[(0, "per_rank_bn")]
    _, per_rank_single = _run(50.0, "paper", slice(None), per_rank_batchnorm=True)
    assert any(not torch.allclose(per_rank[k], per_rank_single[k], **TOL) for k in running)
    # The alphas were chosen to exercise both branches.
    assert _run(50.0, "paper", slice(None))[0][0]["step2"] == 1.0
    assert _run(1e-6, "paper", slice(None))[0][0]["step2"] == 0.0
