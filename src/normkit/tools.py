"""Recompute BN running statistics with the final weights ("precise BN"): training's running averages mix statistics of older weights.

``recalibrate_running_stats(model, batches)`` replaces the running mean and variance of every
batch-normalization layer by the plain average of the batch statistics the layer computes on
``batches`` with the model's current weights (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm", section 3: precise BN). No parameter changes. The running averages a BN layer keeps
during training weight the last ~1/momentum steps, each computed with the weights of its own
step; when the weights still move at the end of training (e.g. RMSprop, a short run) they lag
the final weights, and eval-mode accuracy suffers. See docs/results.md.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import BatchNorm

__all__ = ["recalibrate_running_stats"]

_BN_TYPES = (BatchNorm, _BatchNorm)


def _input_of(item, index: int) -> torch.Tensor:
    if isinstance(item, (tuple, list)):
        if not item:
            raise TypeError(f"recalibrate_running_stats: batch {index} is an empty {type(item).__name__}; "
                            "expected an input tensor or an (input, target) pair")
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"recalibrate_running_stats: batch {index} is a {type(item).__name__}; expected an input "
                        "tensor or an (input, target) pair whose first element is the input tensor")
    return item


def _check_num_batches(num_batches) -> None:
    if num_batches is None:
        return
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"recalibrate_running_stats: num_batches must be None (every batch) or a positive int, "
                         f"got {num_batches!r}")


@torch.no_grad()
def recalibrate_running_stats(model: nn.Module, batches: Iterable, *, num_batches: Optional[int] = None) -> nn.Module:
    """Replace every BN layer's running statistics by the average of its batch statistics over ``batches``.

    Args:
        model: any module holding batch-normalization layers: ``normkit.BatchNorm`` and its
            subclasses (renorm, ghost, Keras-style biased variance included) and torch.nn's
            ``BatchNorm1d/2d/3d``/``SyncBatchNorm`` (``torch.nn.modules.batchnorm._BatchNorm``).
        batches: an iterable of input tensors, or of ``(input, target, ...)`` tuples/lists
            (the first element is the input), e.g. a ``DataLoader``. Inputs are passed to
            ``model`` as they are (move them to the model's device yourself).
        num_batches: use at most this many batches (``None``: all of them).

    Returns ``model`` (changed in place).

    What happens, for each recalibrated layer (a BN layer that tracks running statistics and,
    for normkit layers, is not frozen):

    * its running mean/variance are reset to 0/1 and its ``momentum`` set to ``None``
      (cumulative average); the batches then run through the model without gradient, with the
      recalibrated layers in training mode and **every other module in eval mode** (dropout
      off, other layers' running statistics untouched): the statistics of the network as it
      runs at inference, except that BN layers upstream normalize with batch statistics, as in
      training. So ``running_mean`` is the mean of the K per-batch means and ``running_var``
      the mean of the K per-batch unbiased variances (biased ones for a layer with
      ``unbiased_running_var=False``), each per-batch statistic computed by the layer's own
      training path:
    * a ghost layer (``virtual_batch_size``) computes statistics per virtual batch, so its
      running statistics become the average over all ghost batches of the ghost means and of
      the ghost (unbiased) variances; every batch must then hold a multiple of
      ``virtual_batch_size`` rows, as in training;
    * a renorm layer runs as plain BN during recalibration (no r/d correction, which would
      average standard deviations rather than variances); afterwards ``moving_stddev =
      sqrt(running_var + eps)``, so its two views of the variance agree. Its ``renorm_mean``
      and ``renorm_stddev`` (the averages that set r and d in training) are left as they were;
    * afterwards ``momentum``, every module's ``training`` flag, and ``num_batches_tracked``
      are restored: ``num_batches_tracked`` counts training steps (a renorm clipping schedule
      reads it), and recalibration is not training. A layer with ``momentum=None`` that trains
      further continues its cumulative average, weighting the recalibrated statistics as the
      average of all the steps tracked before.

    Frozen normkit layers, layers with ``track_running_stats=False`` and non-BN modules are not
    changed. If anything fails (an empty iterable, a batch the model refuses), every layer's
    statistics and every setting are restored as they were before the call.

    Raises:
        ValueError: ``model`` holds no BN layer, none that can be recalibrated (all frozen or
            without running statistics), ``batches`` yields nothing, or ``num_batches`` is not
            None or a positive int.
        TypeError: a batch is neither a tensor nor a tuple/list starting with one.
    """
    _check_num_batches(num_batches)
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate_running_stats: model must be a torch.nn.Module, got {type(model).__name__}")
    norms = [m for m in model.modules() if isinstance(m, _BN_TYPES)]
    if not norms:
        raise ValueError(f"recalibrate_running_stats: {type(model).__name__} has no batch-normalization layer "
                         "(normkit.BatchNorm or torch.nn.BatchNorm1d/2d/3d): nothing to recalibrate")
    layers = [m for m in norms if m.track_running_stats and m.running_mean is not None
              and not getattr(m, "frozen", False)]
    if not layers:
        raise ValueError(f"recalibrate_running_stats: none of the {len(norms)} batch-normalization layers of "
                         f"{type(model).__name__} can be recalibrated: each is frozen or has no running statistics "
                         "(track_running_stats=False)")

    modes = [(module, module.training) for module in model.modules()]
    saved = []
    for layer in layers:
        buffers = {name: getattr(layer, name).clone() for name in ("running_mean", "running_var", "num_batches_tracked",
                                                                    "moving_stddev")
                   if isinstance(getattr(layer, name, None), torch.Tensor)}
        saved.append((layer, layer.momentum, getattr(layer, "renorm", None), buffers))

    count = 0
    succeeded = False
    try:
        model.eval()
        for layer in layers:
            layer.running_mean.zero_()
            layer.running_var.fill_(1.0)
            layer.num_batches_tracked.zero_()
            layer.momentum = None
            if getattr(layer, "renorm", False):
                layer.renorm = False
            layer.train()
        for item in batches:
            if num_batches is not None and count >= num_batches:
                break
            model(_input_of(item, count))
            count += 1
        if count == 0:
            raise ValueError("recalibrate_running_stats: batches yielded no batch; pass a non-empty iterable of "
                             "training inputs (a re-iterable such as a list or a DataLoader, not a spent generator)")
        succeeded = True
    finally:
        for layer, momentum, renorm, buffers in saved:
            layer.momentum = momentum
            if renorm is not None:
                layer.renorm = renorm
            layer.num_batches_tracked.copy_(buffers["num_batches_tracked"])
            if not succeeded:
                for name, value in buffers.items():
                    getattr(layer, name).copy_(value)
            elif "moving_stddev" in buffers and renorm:
                torch.add(layer.running_var, layer.eps, out=layer.moving_stddev).sqrt_()
        for module, training in modes:
            module.training = training
    return model

