"""GlobalBatchNorm: plain BatchNorm in one process (values, gradients, running statistics, state-dict
keys), and the conversion keeps parameters and statistics. Its DDP equivalence (2 gloo workers vs 1
process) is tested with the SPP-SCL head in tests/test_sppscl_ddp.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from umaf.models.global_batchnorm import GlobalBatchNorm, convert_global_batchnorm


@pytest.mark.parametrize("shape, plain_cls", [((6, 4), nn.BatchNorm1d), ((5, 3, 2, 2), nn.BatchNorm2d)])
def test_single_process_is_plain_batchnorm(shape, plain_cls) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1
    plain, ours = plain_cls(shape[1]), GlobalBatchNorm(shape[1])
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.bias.uniform_(-1, 1)
    ours.load_state_dict(plain.state_dict())  # same keys
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    for _ in range(2):
        ya, yb = plain(xa), ours(xb)
        assert torch.allclose(ya, yb, atol=1e-6)
    (ya * torch.arange(ya.numel()).view_as(ya)).sum().backward()
    (yb * torch.arange(yb.numel()).view_as(yb)).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    for key, value in plain.state_dict().items():
        assert torch.allclose(ours.state_dict()[key].float(), value.float()), key
    plain.eval(), ours.eval()
    assert torch.allclose(plain(x), ours(x), atol=1e-6)


def test_convert_keeps_parameters_and_statistics() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    model[1](model[0](torch.randn(5, 3)))  # move the running statistics away from their initial values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_global_batchnorm(model)
    assert isinstance(model[1], GlobalBatchNorm) and isinstance(model[2][1], GlobalBatchNorm)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
