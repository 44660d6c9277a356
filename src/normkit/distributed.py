"""Batch statistics across processes with torch.distributed (any backend, gloo on CPU included).

Each process computes (count, mean, M2) over its own positions; an all_gather that
autograd can differentiate collects them, and Chan's parallel formula merges them:

    N = sum n_i,   mean = sum n_i mean_i / N,   M2 = sum (M2_i + n_i (mean_i - mean)^2)

so uneven or empty local batches weigh exactly by their counts, and no process ever
forms E[x^2] - E[x]^2. The gradient flows back through the gather to every process.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.distributed as dist

from . import functional as F
from .axes import broadcast_shape


def is_active(process_group=None) -> bool:
    """True when a process group with more than one member is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def warn_local_once(layer) -> None:
    """Warn once per layer that synchronized=True computes local statistics (no process group)."""
    if not getattr(layer, "_warned_local", False):
        layer._warned_local = True
        warnings.warn(f"{type(layer).__name__}(synchronized=True) runs without an initialized torch.distributed "
                      "process group of more than one process: statistics are this process's only",
                      RuntimeWarning, stacklevel=3)


class _AllGather(torch.autograd.Function):
    """Stack every process's tensor; the gradient of each piece is summed over processes and sent home."""

    @staticmethod
    def forward(ctx, tensor, process_group):
        ctx.process_group = process_group
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(pieces, tensor.contiguous(), group=process_group)
        return torch.stack(pieces)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.process_group)
        return grad[dist.get_rank(ctx.process_group)], None


def _gather(tensor, process_group):
    return _AllGather.apply(tensor, process_group)


def sync_moments(x, reduce_axes, mask=None, process_group=None):
    """Global (count, mean, biased var) over ``reduce_axes`` of every process's ``x``; differentiable.

    Local moments are Welford's (``torch.var_mean``) or, with a mask, two-pass: exact for data far
    from zero, so synchronized layers need no recentering. An empty local batch adds nothing.
    """
    if mask is None:
        x = x.to(F.statistics_dtype(x))
        var, mean = torch.var_mean(x, dim=reduce_axes, correction=0, keepdim=True)
        count = torch.full_like(mean, x.numel() / max(mean.numel(), 1))
    else:
        count, mean, var = F.moments(x, reduce_axes, mask)
    empty = count == 0  # (var_mean of nothing is NaN; 0 * NaN would spoil the merge)
    mean, var = mean.masked_fill(empty, 0.0), var.masked_fill(empty, 0.0)
    local = torch.stack([count, mean, var * count])
    gathered = _gather(local, process_group)
    counts, means, squares = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    total = counts.sum(dim=0)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    global_mean = (counts * means).sum(dim=0) / safe_total
    m2 = (squares + counts * (means - global_mean).square()).sum(dim=0)
    return total, global_mean, m2 / safe_total


def sync_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, *, axis, mask=None,
                    virtual_batch_size=None, ghost_layout="strided", unbiased_running_var=True, renorm_mean=None,
                    renorm_stddev=None, moving_stddev=None, renorm_clipping=(0.0, math.inf, math.inf),
                    renorm_momentum=0.01, adjustment=None, recenter=False, process_group=None):
    """Batch norm whose batch is the union of every process's batch (axis: canonical feature axes).

    The options are ``functional.batch_norm``'s, run by its composite pipeline on the merged
    statistics. Ghost batch j of the union is every process's ghost j (tf.keras' rule), so each
    local batch must divide into virtual batches. ``recenter`` is accepted and not needed
    (``sync_moments`` is exact far from zero).
    """
    return F._batch_norm_pipeline(
        x, axis, broadcast_shape(axis, x.shape), running_mean, running_var, weight, bias, training, momentum, eps,
        mask, virtual_batch_size, ghost_layout, unbiased_running_var, renorm_mean, renorm_stddev, moving_stddev,
        renorm_clipping, renorm_momentum, adjustment,
        moments_fn=functools.partial(sync_moments, process_group=process_group))
