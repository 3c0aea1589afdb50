"""BatchNorm over the GLOBAL batch under DDP, on CPU (gloo) as on GPU: plain torch, no Ray.

Under DDP each rank sees ``B/N`` samples, so a plain ``BatchNorm`` normalises each rank's shard by
its own statistics: N workers would not train the objective one process trains on the whole batch
(and the running statistics of rank 0, which DDP broadcasts, would be those of one shard).
``torch.nn.SyncBatchNorm`` fixes that on GPUs only: its forward raises "SyncBatchNorm expected
input tensor to be on GPU" for CPU tensors, and our CPU workers (gloo) are the default. This module
does the same with two differentiable all-reduces per layer (``torch.distributed.nn.all_reduce``):
the per-channel sum and count, then the per-channel sum of squared deviations from the global mean.

Gradients: the backward of a SUM all-reduce is a SUM all-reduce of the incoming gradients, so each
rank's inputs receive the gradient of every rank's loss through the shared statistics; DDP's mean of
parameter gradients then equals the one-process gradient (the argument of ``umaf.distributed``).

Outside DDP training (one process, or eval mode) it is exactly ``BatchNorm``: the same state-dict
keys, the same values, so checkpoints move freely between 1 and N workers.
"""

from __future__ import annotations

import torch
import torch.distributed.nn.functional as dist_nn
from torch import nn

from umaf.distributed import is_distributed


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``BatchNorm1d``/``2d``/``3d`` (any input ``[B, C, *]``) with global-batch statistics under DDP."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input [B, C, ...] (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xf = x.float()
        count = xf.new_tensor([x.numel() // x.shape[1]])
        sums = dist_nn.all_reduce(torch.cat([xf.sum(dims), count]))
        n = sums[-1]  # >= 2: the methods skip batches of one sample (no host sync for a check here)
        mean = sums[:-1] / n
        centered = xf - mean.view(shape)
        var = dist_nn.all_reduce((centered * centered).sum(dims)) / n  # biased: what normalises
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (n / (n - 1))  # BatchNorm keeps the unbiased variance
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) in ``module`` by a
    :class:`GlobalBatchNorm` with the same settings, parameters and running statistics."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_global_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


__all__ = ["GlobalBatchNorm", "convert_global_batchnorm"]
