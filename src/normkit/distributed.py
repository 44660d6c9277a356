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
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from . import functional as F
from .axes import broadcast_shape


def is_active(process_group=None) -> bool:
    """True when a process group with more than one member is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


# Where normkit's and torch's frames are: a warning skips them to reach the user's line.
_LIBRARY_PREFIXES = (str(Path(torch.__file__).resolve().parent) + os.sep, str(Path(__file__).resolve().parent) + os.sep)


def _stacklevel_of_caller() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside normkit and torch (the user's line: a
    layer called through torch's Module.__call__, a Keras layer or a tool sits several frames deeper)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_PREFIXES):
        frame, level = frame.f_back, level + 1
    return level


def warn_local_once(layer, name=None) -> None:
    """Warn once per layer that synchronized=True computes local statistics (no process group); ``name`` is what
    the user built (the Keras layer around its normkit.BatchNorm), else the layer's class."""
    if not getattr(layer, "_warned_local", False):
        layer._warned_local = True
        group = getattr(layer, "process_group", None)
        if dist.is_available() and dist.is_initialized() and dist.get_rank(group) < 0:
            # (torch gives a non-member of a dist.new_group a world size of -1: told that no group was initialized,
            # the user of a group that is looked for the fault in the wrong place)
            reason = (f"on process {dist.get_rank()}, which is not a member of the layer's process_group (a "
                      "dist.new_group without this rank; torch.nn.SyncBatchNorm normalizes such a process's batch "
                      "alone too)")
        else:
            reason = "without an initialized torch.distributed process group of more than one process"
        warnings.warn(f"{name or type(layer).__name__}(synchronized=True) runs {reason}: statistics are this "
                      "process's only", RuntimeWarning, stacklevel=_stacklevel_of_caller())


@torch._dynamo.assume_constant_result
def warn_local_once_while_tracing(layer, name=None) -> bool:
    """``warn_local_once`` under torch.compile: Dynamo runs this eagerly while it traces, and the graph keeps its
    result, a constant, alone. A warning cannot be traced, and was skipped there: a compiled model synchronized
    without a group of processes trained on local statistics without a word. (A graph break around the warning
    would fail fullgraph=True; Dynamo's reorderable logging functions drop a call made below the traced frame.)"""
    warn_local_once(layer, name)
    return True


class _AllGather(torch.autograd.Function):
    """Stack every process's tensor; the gradient of each piece is summed over processes and sent home.

    (forward/setup_context apart, and a jvp: torch.func's transforms (grad, jacrev, ...) and forward-mode AD refuse a
    Function without them, and a synchronized layer failed there with torch's message about autograd.Function where
    the same layer unsynchronized works; the tangent of the gather is the gather of the tangents)
    """

    @staticmethod
    def forward(tensor, process_group):
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(pieces, tensor.contiguous(), group=process_group)
        return torch.stack(pieces)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.process_group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        # (through a Function of its own, so that a backward with create_graph=True, a gradient penalty, differentiates
        # the sum too: the bare in-place all_reduce was invisible to autograd, and second derivatives came out wrong
        # with no more than torch's warning that c10d::allreduce_ has no autograd kernel)
        return _AllReduceSum.apply(grad, ctx.process_group)[dist.get_rank(ctx.process_group)], None

    @staticmethod
    def jvp(ctx, tangent, _):
        return _AllGather.apply(tangent, ctx.process_group)

    @staticmethod
    def vmap(info, in_dims, tensor, process_group):
        return _unbatched_merge(_AllGather, in_dims, tensor, process_group)


class _AllReduceSum(torch.autograd.Function):
    """The sum of every process's tensor; its own adjoint (each process's gradient is the sum of theirs), and linear
    (its tangent is the sum of the tangents)."""

    @staticmethod
    def forward(tensor, process_group):
        total = tensor.clone(memory_format=torch.contiguous_format)  # (never the gradient autograd handed in)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
        return total

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.process_group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.process_group), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return _AllReduceSum.apply(tangent, ctx.process_group)

    @staticmethod
    def vmap(info, in_dims, tensor, process_group):
        return _unbatched_merge(_AllReduceSum, in_dims, tensor, process_group)


def _unbatched_merge(function, in_dims, tensor, process_group):
    """The vmap rule of the merge's Functions: an unbatched input passes through (a vmap over what the merge does not
    depend on, an ensemble's weights and buffers); a batched one is refused."""
    if in_dims[0] is None:
        return function.apply(tensor, process_group), None
    _refuse_vmap()


def _refuse_vmap():
    # Every process reaches this at the same collective, so all of them raise together (none is left waiting). A
    # batched merge would pair lane i of one process with lane i of another, which mean nothing to each other under
    # jacrev/jacfwd (each process's lanes are its own outputs' cotangents): silently wrong Jacobians.
    raise RuntimeError("synchronized BatchNorm cannot run under torch.func.vmap (nor jacrev or jacfwd, which vmap): "
                       "a batched merge would pair each process's vmap lanes with its peers', which do not "
                       "correspond. torch.func.grad, jvp, vjp and forward-mode AD work; for Jacobians, loop over vjp")


def _gather(tensor, process_group):
    return _AllGather.apply(tensor, process_group)


# Dtype codes for the agreement check (a dtype's name would hash differently in every process).
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
# The dtype code of a process that refused its input (``refuse_with_peers``): the minimum, read from the
# -signature half.
_REFUSED = -1


def settings_code(axis, virtual_batch_size, ghost_layout, renorm, unbiased_running_var, eps) -> int:
    """One integer for the settings that decide what a merge means and how its result is used: the feature axes,
    the ghost batches and their layout, renorm, the running variance rule and ``eps`` (a polynomial hash of Python
    ints, the same in every process; a traced ``eps`` counts as 0)."""
    # eps exactly, as the two ints of its ratio (struct.pack's bytes sent Dynamo's polyfill of it into a
    # RecursionError from the second synchronized layer compiled in a process on)
    eps_ratio = (float(eps).as_integer_ratio() if isinstance(eps, (int, float)) and not isinstance(eps, bool)
                 else (0, 0))
    code = 0
    for value in (*axis, -1, virtual_batch_size or 0, ghost_layout == "strided", bool(renorm),
                  bool(unbiased_running_var), *eps_ratio):
        code = (code * 1_000_003 + int(value) + 1) % (1 << 61)
    return code


def check_agreement(local, process_group=None, masked=False, settings=0) -> bool:
    """Refuse, on every process at once, statistics whose shape or dtype differ between the processes.

    all_gather of tensors of different sizes does not fail cleanly: gloo aborts the process whose
    buffer is too small (std::terminate, no Python error) and gives the others garbage that they
    use silently. One small all_reduce of each process's (shape, dtype) as its max and -min gives
    every process the same verdict, so all of them raise together and none is left waiting.

    Returns whether any process of the group merges masked statistics (``masked``), carried by the
    same all_reduce: rules that differ with a mask must be decided alike on every process. ``settings``
    (``settings_code``) is compared too: processes whose layers differ in feature axes (of the same statistics
    shape), ghost layout, renorm, running variance rule or eps merged silently before, each using the merge its
    own way.
    """
    shape = tuple(local.shape[1:])
    code = 0
    for size in shape:  # (a polynomial hash of the sizes: Python ints, the same in every process)
        code = (code * 1_000_003 + size + 1) % (1 << 61)
    signature = torch.tensor([_DTYPE_CODES.get(local.dtype, 0), len(shape), local.numel(), code, settings],
                             dtype=torch.int64, device=local.device)
    both = torch.cat([signature, -signature, torch.tensor([int(masked)], dtype=torch.int64, device=local.device)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=process_group)
    if not torch.equal(both[:4], -both[5:9]):
        if int(both[5]) == -_REFUSED:
            raise ValueError(
                "synchronized BatchNorm: another process of the group refused its input to this layer (its own error "
                "says why) instead of merging statistics with this one; every process must call the layer in training "
                "mode with an input it accepts")
        raise ValueError(
            f"synchronized BatchNorm: the processes of the group disagree on the statistics they merge (this "
            f"process: {local.dtype} statistics of shape {shape}). Every process must call the layer in training "
            "mode with inputs of the same number of features and dtype and, with virtual_batch_size, the same local "
            "batch size (the same number of ghost batches)")
    if not torch.equal(both[4:5], -both[9:10]):
        raise ValueError(
            "synchronized BatchNorm: the processes of the group disagree on the layer's settings (feature axes, "
            "virtual_batch_size or ghost_layout, renorm, the running variance rule or eps) for statistics of the "
            "same shape, which each would use its own way; every process must run the same layer")
    return bool(both[10])


def refuse_with_peers(process_group, device) -> None:
    """A process that refuses its input before the merge tells its peers, which wait in ``check_agreement``.

    It joins their all_reduce with a signature no statistics have (dtype code ``_REFUSED``), so each peer raises
    at once, and the caller then raises its own error. Without this the peers waited for the group's timeout
    (30 minutes for gloo by default), or their collective paired with this process's next one and merged
    statistics of another layer or step. Nothing happens without an active group; a failed collective (peers
    that are gone) leaves the caller's own error to be raised.
    """
    if not is_active(process_group):
        return
    if torch.compiler.is_compiling():
        # Dynamo raises the refusal while tracing and never runs the frame eagerly, so the peers are told from
        # outside the graph (a graph break on this error path only; with an active group the layer breaks the
        # graph anyway). Skipped, they waited for the timeout or merged with this process's next step.
        _tell_peers_outside_graph(process_group, device)
        return
    _tell_peers(process_group, device)


def _tell_peers(process_group, device) -> None:
    signature = torch.tensor([_REFUSED, 0, 0, 0, 0], dtype=torch.int64, device=device)
    try:  # (the layout of check_agreement's all_reduce: signature, -signature, masked)
        dist.all_reduce(torch.cat([signature, -signature, torch.zeros(1, dtype=torch.int64, device=device)]),
                        op=dist.ReduceOp.MAX, group=process_group)
    except RuntimeError:
        pass


_tell_peers_outside_graph = torch.compiler.disable(_tell_peers)


def sync_moments(x, reduce_axes, mask=None, shift=None, process_group=None, settings=0):
    """Global (count, mean, biased var, (group mean, group centre)) over ``reduce_axes`` of every process's ``x``;
    differentiable (the last pair, the mean about the group's common centre and that centre, is not, and is the
    same on every process: the running statistics and renorm's r and d are taken from it).

    ``x`` holds residuals about this process's centre ``shift`` (None: no centre), and the mean
    returned first is about it too. Each process's centre travels with its moments: the centres'
    differences are exact (Sterbenz: every centre is within an ulp of its data's mean), so the
    moments merged about the group's centre, and the mean about this process's, are as exact as the
    residuals. Merged about zero, the
    global mean of float32 data far from zero is known only to an ulp of the data, and every
    output carried that error (5e-2 at mean 1e4, std 1e-2, where one process recentered to 2e-7).
    Local moments are Welford's (``torch.var_mean``) or, with a mask, two-pass. An empty local
    batch adds nothing.
    """
    if mask is None:
        x = x.to(F.statistics_dtype(x))
        if x.numel():
            var, mean = torch.var_mean(x, dim=reduce_axes, correction=0, keepdim=True)
        else:  # (var_mean would warn of zero degrees of freedom: zeros, in the graph, and a count of 0 say it all)
            mean = x.sum(dim=reduce_axes, keepdim=True)
            var = mean.clone()
        local_count = x.numel() / max(mean.numel(), 1)
        count = torch.full_like(mean, local_count)
    else:
        count, mean, var = F.moments(x, reduce_axes, mask)
    empty = count == 0  # (var_mean of nothing is NaN; 0 * NaN would spoil the merge)
    mean, var = mean.masked_fill(empty, 0.0), var.masked_fill(empty, 0.0)
    centre = torch.zeros_like(mean) if shift is None else shift.to(mean.dtype).expand_as(mean)
    # (processes may disagree on recentering, each deciding from its own data: a centre of 0 is no centre)
    local = torch.stack([count, mean, var * count, centre.masked_fill(empty, 0.0)])
    any_masked = check_agreement(local, process_group, masked=mask is not None, settings=settings)
    gathered = _gather(local, process_group)
    counts, squares, centres = gathered[:, 0], gathered[:, 2], gathered[:, 3]
    # The merge is about one reference centre for the whole group: the first process's that holds values (an empty
    # or fully masked local batch has no centre). About zero, peers' means at 1e4 were known only to an ulp of the
    # data, and an empty process's running variance came out 2e-2 off (and unlike its peers'). Common to the group,
    # the merge is the same arithmetic on the same gathered numbers everywhere, so every process gets the same bits
    # (statistics, renorm's r and d, running buffers); merged about each process's own centre, float32 buffers
    # came out an ulp apart between the processes, as torch.nn.SyncBatchNorm's never do.
    with torch.no_grad():
        first = (counts > 0).to(torch.uint8).argmax(dim=0, keepdim=True)  # (all empty: process 0's centre, 0)
        reference = centres.gather(0, first).squeeze(0)
    means = (centres - reference) + gathered[:, 1]  # (every process's mean about the reference centre)
    total = counts.sum(dim=0)
    if not any_masked and local_count <= 1 and total.numel() and int(total.reshape(-1)[0]) == 1:
        # One value per feature over the whole group: its variance is 0, as one process's would be, and that
        # process refuses it (so does torch.nn.SyncBatchNorm). Every process holds at most one value here (any
        # other process's two would make the total larger), so all of them read the total and raise together;
        # the others skip the read. With a mask on any process the group's batch is a masked one, where one
        # valid value is accepted, as in one process: decided on this process's own mask, an unmasked process
        # (an empty one, say) raised while its masked peer went on and waited for it in the backward.
        raise ValueError(f"Expected more than 1 value per channel when training, got 1 over the "
                         f"{dist.get_world_size(process_group)} processes of the group (this process's input size "
                         f"{tuple(x.shape)}): the batch variance of a single value is 0; use eval(), larger local "
                         "batches, or GroupNorm/LayerNorm")
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    global_mean = (counts * means).sum(dim=0) / safe_total
    m2 = (squares + counts * (means - global_mean).square()).sum(dim=0)
    # (about this process's centre again, for its residuals: exact, as the centres' differences above)
    return (total, global_mean + (reference - centre), m2 / safe_total,
            (global_mean.detach(), reference))


def sync_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, *, axis, mask=None,
                    virtual_batch_size=None, ghost_layout="strided", unbiased_running_var=True, renorm_mean=None,
                    renorm_stddev=None, moving_stddev=None, renorm_clipping=(0.0, math.inf, math.inf),
                    renorm_momentum=0.01, adjustment=None, recenter=False, process_group=None):
    """Batch norm whose batch is the union of every process's batch (axis: canonical feature axes).

    The options are ``functional.batch_norm``'s, run by its composite pipeline on the merged
    statistics. Ghost batch j of the union is every process's ghost j (tf.keras' rule), so every
    process's local batch must be the same multiple of the virtual batch size (``check_agreement``
    refuses others). Each process's residuals are centred on its own batch mean, which
    ``sync_moments`` merges about; in float64 only where ``recenter`` asks (float32 data far from zero).
    """
    # Below float64 always: whether the group's batch sits far from zero is not this process's to judge. Its
    # check (BatchNorm._update_recenter) sees its own rows only, and passes over rows that do not vary (one
    # valid value per feature, say) or runs nowhere (CUDA); such a process merged and normalized about zero,
    # and its outputs at mean 1e4, std 1e-2 were 6e-2 off where one process on the whole batch recenters. The
    # cost is one pass over the local batch, next to the collectives of the merge.
    recenter = recenter or x.dtype != torch.float64
    if adjustment is not None:
        # Called here, before the merge (once, as the pipeline calls it: an adjustment may draw random numbers), and
        # its terms handed on. The pipeline calls it after the merge, where a process whose terms it refuses (they
        # do not fit this process's batch, or the callable raised) left its peers going on to the backward, whose
        # all_reduce then paired with the refusing process's next collective: no error, garbage gradients. Refused
        # here, the peers are told (refuse_with_peers) and raise with it.
        try:
            terms = F._adjustment_terms(adjustment, x, F.statistics_dtype(x))
        except Exception:
            refuse_with_peers(process_group, x.device)
            raise
        adjustment = lambda shape: terms  # noqa: E731 (the terms already fit the input)
    # (half-precision input is widened once inside, for both uses of x: its gradient is rounded once)
    return F._batch_norm_pipeline(
        x, axis, broadcast_shape(axis, x.shape), running_mean, running_var, weight, bias, training, momentum, eps,
        mask, virtual_batch_size, ghost_layout, unbiased_running_var, renorm_mean, renorm_stddev, moving_stddev,
        renorm_clipping, renorm_momentum, adjustment, recenter=recenter,
        moments_fn=functools.partial(sync_moments, process_group=process_group, settings=settings_code(
            axis, virtual_batch_size, ghost_layout, renorm_mean is not None, unbiased_running_var, eps)))
