"""BatchNorm over the rows of every process, on any backend (gloo on CPU too, where torch's SyncBatchNorm does not
run): data-parallel training then normalises with the statistics of the whole global batch, as one process would.

:func:`synchronized_batch_norm` patches the BatchNorm layers of a model for the length of a ``with`` block and
leaves their parameters, buffers and state_dict keys as they are.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["synchronized_batch_norm"]


class _SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over every process; its gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _synced_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor, group=None) -> Tensor:
    """x (B, C, ...) -> normalised with the mean and biased variance of every process's rows; the running statistics
    get the unbiased variance, as torch's BatchNorm updates them."""
    if not self.training:
        return type(self).forward(self, x)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    rows = x.new_full((1,), x.numel() // max(x.shape[1], 1))
    totals = _SumOverProcesses.apply(torch.cat([x.sum(dims), rows]), group)
    count = totals[-1]
    mean = totals[:-1] / count
    centered = x - mean.view(shape)
    # two passes (mean, then the centred squares) keep the variance as exact as a single process's
    var = _SumOverProcesses.apply((centered * centered).sum(dims), group) / count
    y = centered * torch.rsqrt(var + self.eps).view(shape)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            n = float(count)
            self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
            self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
    return y


@contextlib.contextmanager
def synchronized_batch_norm(model: nn.Module, group: Optional[object] = None) -> Iterator[nn.Module]:
    """Inside the block, every BatchNorm layer of ``model`` in training mode normalises over all processes' rows.

    Every process must run the same forward calls (as under DistributedDataParallel); a process may hold no row of
    a batch. Outside a process group the model is left alone. Evaluation mode uses the running statistics as usual.

    Args:
        model: any module; its BatchNorm1d/2d/3d layers are synchronised.
        group: the process group (default: the whole world).

    Example:
        >>> with rtl.sync_batch_norm.synchronized_batch_norm(model):
        ...     rtl.train.train_sequential(DistributedDataParallel(model), loaders, opt, loss_fn)
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield model
        return
    patched = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = types.MethodType(lambda self, x: _synced_forward(self, x, group), module)
            patched.append(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward
