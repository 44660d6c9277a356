"""PyTorch twins of reference.py: same names, arguments and order of steps, differentiable by autograd.

Calls that an ATen kernel computes exactly (torch.batch_norm, torch.layer_norm,
torch.group_norm, torch.instance_norm) go to that kernel. Options stay on ATen's kernels
where they can: renorm's r and d and the ghost groups fold into batch norm's per-channel
scale and offset, padding masks gather the valid rows for ATen's statistics, and two small
autograd Functions reuse ATen's backward kernel. Masks that vary along the features and the
adjustment are composite code that reads like reference.py. (docs/decisions.md, "How a call
executes", lists which execution serves which call.)

Precision rule: statistics are computed in float32 or wider whatever the input dtype;
float16/bfloat16 inputs come back in their own dtype. Buffers are updated in place and
never receive gradient.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers

import torch

from . import kernels
from .axes import broadcast_shape, canonicalize_axes, complement
from .stats import (bessel_factor, check_adjustment, check_affine_size, check_eps,  # noqa: F401 (F.check_eps)
                    check_ghost_batch, check_ghost_layout, check_momentum_given, check_normalized_shape,
                    check_num_groups, check_per_feature_sizes, check_renorm_clipping_bounds, check_renorm_state,
                    check_virtual_batch_size, integer_size)

LOW_PRECISION = (torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------- checks


def check_floating(x, *, name="input"):
    """Refuse what is not a floating-point tensor, saying how to convert it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        if x.is_complex():
            # (.float() on complex data drops the imaginary part, torch only warning: no fix to name)
            raise TypeError(
                f"{name} has dtype {x.dtype}; normalization needs a real floating-point tensor, and casting drops "
                f"the imaginary part: normalize the real and imaginary parts as values of their own "
                f"(torch.view_as_real({name}), a trailing axis of 2) or take {name}.abs() or {name}.real explicitly"
            )
        raise TypeError(
            f"{name} has dtype {x.dtype}; normalization needs a floating-point tensor: convert it with "
            f"{name}.float() (or .to(torch.float32))"
        )


def check_enough_values(count_per_group, shape, *, hint=None, virtual_batch_size=None, training=True):
    """Refuse batch statistics over a single value per feature (the variance would be 0).

    With ghost batches smaller than the batch (``virtual_batch_size``) the single value is per ghost batch,
    and the message says so: the input itself may hold many values per feature. Out of training (``training``
    False: batch statistics because there are no running statistics) the message says that, and does not advise
    eval(), where the call already is.
    """
    if count_per_group != 1:
        return
    if virtual_batch_size is not None and len(shape) > 0 and shape[0] > virtual_batch_size:
        raise ValueError(
            f"Expected more than 1 value per channel "
            f"{'when training' if training else 'when normalizing with the batch statistics'}, got input size "
            f"{tuple(shape)} in ghost batches of virtual_batch_size={virtual_batch_size}: each ghost batch holds a "
            "single value per channel, and the variance of a single value is 0; use a larger virtual_batch_size, or "
            + ("eval()" if training else "running statistics (the layers' track_running_stats=True; the functional "
                                          "twin's running_mean and running_var)"))
    if not training:
        raise ValueError(
            f"Expected more than 1 value per channel when normalizing with the batch's statistics, got input size "
            f"{tuple(shape)}: there are no running statistics to normalize by out of training, and the batch variance "
            f"of a single value is 0; "
            + (hint or "pass running_mean and running_var, a larger batch, or use GroupNorm/LayerNorm"))
    raise ValueError(
        f"Expected more than 1 value per channel when training, got input size {tuple(shape)}: "
        f"the batch variance of a single value is 0; {hint or 'use eval(), a larger batch, or GroupNorm/LayerNorm'}"
    )


def _functions_refused():
    """Whether torch.func's transforms or forward-mode AD are running eagerly: they refuse a Python autograd.Function
    without ``setup_context``/``jvp`` (the masked paths', ``_FoldedBatchNorm``), so the composite serves there.
    (Compiled graphs trace the Functions themselves, as before.)"""
    return not torch.compiler.is_compiling() and kernels.transforms_active()


# torch.jit.trace (and the legacy ONNX exporter, torch.onnx.export(..., dynamo=False), which traces with it) records
# sizes: each entry of ``input.shape`` is a 0-dim tensor there, and a Python comparison of one emits a TracerWarning
# ("Converting a tensor to a Python boolean might cause the trace to be incorrect"). The Python-side checks of sizes,
# here and in modules.py, are skipped while tracing, as torch's own are (torch.distributions): they check, they
# compute nothing, and ATen still checks the example's sizes against the weights and buffers. (The bound C function
# costs ~40 ns a call, torch.jit.is_tracing ~170; Dynamo folds it to None.)
_tracing_state = torch._C._get_tracing_state


def without_data(x):
    """A meta or fake tensor (shape inference, FakeTensorMode's memory and FLOP estimates): torch.nn's layers run on
    them, so no path may read their values on the host or size a result by them."""
    return x.is_meta or kernels.is_fake(x)


def eager_data(x):
    """Whether ``x`` is data in an eager call: not traced or compiled, not under torch.func's transforms, not
    without data. Only there may a step depend on values (a branch, a hook)."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not kernels.transforms_active()
            and not without_data(x))


def host_checks(x):
    """Whether a data-dependent branch on ``x`` (a host read of a per-channel statistic) is cheap and allowed: eager
    CPU data. GPUs (where the read waits for the device), traced or compiled graphs, torch.func's transforms and
    tensors without data take a branch-free formulation instead."""
    return x.is_cpu and eager_data(x)


def statistics_dtype(x):
    """float32 for half-precision inputs, else the input's own floating dtype."""
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


# A Python number beside a float32 tensor in an ATen op (``torch.add(var, eps)``, ``buffer.mul_(1 - m)``) is wrapped
# in a float64 0-dim tensor and cast to float32 first: four dispatches (to, _to_copy, empty_strided, copy_), about
# 3 us on the hosts measured, three times the op itself on a vector of 120 values. A 0-dim tensor of the operand's
# own dtype holds the value as that cast rounds it, so the op computes the same bits without the cast. The small
# ops of the option paths' statistics and buffer updates (a dozen of them a step) take such tensors eagerly on
# the CPU; traces, compiled graphs, torch.func's transforms and tensors without data (or of other kinds) keep the
# numbers.
@functools.lru_cache(maxsize=512)
def _cached_number(value, dtype):
    with torch.inference_mode(False):  # (a normal tensor even when first asked for in inference mode)
        return torch.tensor(value, dtype=dtype)


def number_for(value, like):
    """``value`` as the operand of an op with ``like``: the same number as a cached 0-dim tensor of like's dtype where
    ``like`` is a plain float32/float64 CPU tensor of an eager call (see ``_cached_number``), else ``value``."""
    if (type(like) is torch.Tensor and like.is_cpu and like.dtype in (torch.float32, torch.float64)
            and isinstance(value, (int, float)) and _tracing_state() is None and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()):
        return _cached_number(float(value), like.dtype)
    return value


# ----------------------------------------------------------------------------- statistics core


# On the CPU, ATen's statistics kernel reads an (N, K, S) tensor one (n, k) plane of S values at a time:
# about 1.2 ns a value on the hosts measured, whatever the shape. Its 2-D kernel, vectorized across the
# columns of the free (N, K*S) view, takes 0.4-0.7 ns once there are 32 rows or more; the second call
# that combines each feature's S columns costs a fixed ~16 µs, repaid from about 2^15 values
# (docs/benchmarks.md, "Renorm's statistics by position").
WIDE_MOMENTS_MIN_NUMEL = 1 << 15


def _channel_moments(channels):
    """Per-feature mean and biased variance of an (N, K, *) tensor: ATen's one-pass statistics kernel
    (on the CPU, for large contiguous inputs of 32 rows or more, by position: ``_moments_by_position``),
    or ``torch.var_mean`` where torch.compile traces (that kernel has no fake-tensor rule) and under torch.func's
    transforms (nor a batching rule: vmap ran it one sample at a time, with a performance warning)."""
    if (torch.compiler.is_compiling() or channels.is_meta  # (nor a meta kernel: shape inference on "meta")
            or torch._C._are_functorch_transforms_active()):
        var, mean = torch.var_mean(channels, dim=[0, *range(2, channels.dim())], correction=0)
        return mean, var
    if (channels.dim() > 2 and channels.shape[0] >= 32 and channels.numel() >= WIDE_MOMENTS_MIN_NUMEL
            and channels.device.type == "cpu" and channels.is_contiguous()
            and channels.numel() > channels.shape[0] * channels.shape[1]):
        return _moments_by_position(channels)
    return torch.batch_norm_update_stats(channels, None, None, 0.0)


def _moments_by_position(channels, features_last=False):
    """``_channel_moments`` of a contiguous (N, K, *) CPU tensor from per-position statistics; with
    ``features_last``, of a contiguous (V, G, *, K) tensor whose features are its (G, K) pairs, in that
    order (``_ghost_positions``: Keras' strided ghost groups of features-last data, a free view).

    Mean and biased variance of every (feature, position) column over the N rows, then, per feature,
    over its S positions (equal counts): mean = mean of the column means, variance = mean of the column
    variances + variance of the column means (the law of total variance; no E[x^2] - E[x]^2).
    """
    rows = channels.shape[0]
    features = channels.shape[1] * (channels.shape[-1] if features_last else 1)
    positions = channels.numel() // (rows * features)
    mean, var = torch.batch_norm_update_stats(channels.view(rows, features * positions), None, None, 0.0)
    # The second pass: per feature over its positions, mean and var of the column means and mean of their variances.
    if features_last:
        # The positions lie between a feature's group and channel: the column statistics (2/N of the input's
        # size) as S rows of 2 * G * K columns, a small copy.
        groups = channels.shape[1]
        columns = torch.stack((mean, var)).view(2, groups, positions, features // groups).permute(2, 0, 1, 3)
        columns = columns.reshape(positions, 2 * features)
    else:
        columns = torch.stack((mean, var)).view(1, 2 * features, positions)
    outer_mean, outer_var = torch.batch_norm_update_stats(columns, None, None, 0.0)
    return outer_mean[:features], outer_mean[features:] + outer_var[:features]


def moments(x, reduce_axes, mask=None):
    """Count, mean and biased variance of ``x`` over ``reduce_axes`` (kept as size-1 dims).

    Twin of ``reference.moments``. Computed in float32 or wider, two-pass or Welford (never
    E[x^2] - E[x]^2). A group with no valid position gets mean 0 and variance 0. Callers
    with data far from zero recenter it first (see ``_aten_batch_norm``). ``reduce_axes`` is an
    axis or a tuple of them, negative ones counting from the end, as NumPy takes them.
    """
    # (an int failed with "'int' object is not iterable", and a negative axis was taken for a kept one by the
    # statistics kernel's view: the moments of another grouping, silently)
    reduce_axes = (reduce_axes,) if isinstance(reduce_axes, numbers.Integral) else tuple(reduce_axes)
    reduce_axes = tuple(a + x.dim() if a < 0 else a for a in reduce_axes)
    return _moments(x, reduce_axes, mask)[:3]


def _moments(x, reduce_axes, mask=None):
    """``moments``, and whether every value of ``x`` is known to be finite: True when the masked statistics'
    product with the mask came out finite (0 * NaN and 0 * inf are NaN, so no value can be non-finite), False
    when it did not, None when not checked (no mask, or no host check: see ``host_checks``)."""
    x = x.to(statistics_dtype(x))
    if mask is None and x.numel() == 0:
        # No value: every group (if there is any) has none, so mean 0 and variance 0, not ATen's "input tensor must
        # have at least one element" (reference.moments gives the same)
        shape = [1 if axis in reduce_axes else size for axis, size in enumerate(x.shape)]
        count = x.new_full(shape, float(math.prod([x.shape[axis] for axis in reduce_axes])))
        return count, x.new_zeros(shape), x.new_zeros(shape), None
    if mask is None:
        kept = complement(reduce_axes, x.dim())
        if kept and not (torch.is_grad_enabled() and x.requires_grad):
            # No gradient needed: ATen's batch-norm statistics kernel is several times faster.
            channels, _ = _channels_view(x, kept)
            mean, var = _channel_moments(channels)
            shape = [size if axis in kept else 1 for axis, size in enumerate(x.shape)]
            mean, var = mean.reshape(shape), var.reshape(shape)
        else:
            var, mean = torch.var_mean(x, dim=reduce_axes, correction=0, keepdim=True)
        count = torch.full_like(mean, x.numel() / max(mean.numel(), 1))
        return count, mean, var, None
    weights = (mask if mask.dtype == torch.bool else mask != 0).to(x.dtype).expand(x.shape)  # (valid: nonzero)
    count = weights.sum(dim=reduce_axes, keepdim=True)
    safe_count = torch.where(count > 0, count, torch.ones_like(count))
    checked = host_checks(x)
    if checked:
        # The product first: ATen's CPU where is 4-5x a product. A masked position may hold NaN or inf (padding),
        # and 0 * NaN is NaN, so a statistic that comes out non-finite is taken again below, where padding
        # cannot reach it. (GPUs, traced or compiled graphs, torch.func's transforms and tensors without data,
        # where a data-dependent branch is dear or impossible, take that way at once.)
        mean = (weights * x).sum(dim=reduce_axes, keepdim=True) / safe_count
        var = (weights * (x - mean).square()).sum(dim=reduce_axes, keepdim=True) / safe_count
        if bool(torch.isfinite(var).all()):  # (a non-finite mean makes the variance non-finite too)
            return count, mean, var, True
    valid = weights != 0
    mean = (weights * torch.where(valid, x, 0.0)).sum(dim=reduce_axes, keepdim=True) / safe_count
    var = (weights * torch.where(valid, x - mean, 0.0).square()).sum(dim=reduce_axes, keepdim=True) / safe_count
    return count, mean, var, False if checked else None


def affine(x_hat, scale=None, offset=None):
    """``x_hat * scale + offset``; a missing scale is 1 and a missing offset 0."""
    y = x_hat if scale is None else x_hat * scale
    return y if offset is None else y + offset


def normalize(x, mean, var, eps, scale=None, offset=None):
    """``(x - mean) / sqrt(var + eps) * scale + offset`` (scale/offset broadcast-shaped or None)."""
    return affine((x - mean) * torch.rsqrt(var + eps), scale, offset)


# ----------------------------------------------------------------------------- batch norm


def ghost_view(x, virtual_batch_size, layout="strided"):
    """Twin of ``reference.ghost_view``: (view, member_axis, ghost_axis)."""
    batch = x.shape[0]
    # Checked as the reference checks (0 failed with "integer division or modulo by zero", a size that does not
    # divide the batch with reshape's "shape '[3, 1, 3, 5]' is invalid", and any layout but "strided" was taken as
    # "contiguous").
    size = check_virtual_batch_size(virtual_batch_size)
    check_ghost_layout(layout)
    check_ghost_batch(batch, size)
    if layout == "strided":
        return x.reshape((size, batch // size) + tuple(x.shape[1:])), 0, 1
    return x.reshape((batch // size, size) + tuple(x.shape[1:])), 1, 0


def batch_statistics_view(x, feature_axes, mask=None, virtual_batch_size=None, ghost_layout="strided"):
    """Twin of ``reference.batch_statistics_view``: (view, mask view, reduce axes, ghost axis)."""
    ndim = x.dim()
    if virtual_batch_size is None:
        return x, mask, complement(feature_axes, ndim), None
    view, member_axis, ghost_axis = ghost_view(x, virtual_batch_size, ghost_layout)
    mask_view = None
    if mask is not None:
        mask_view = ghost_view(mask.expand((x.shape[0],) + tuple(mask.shape[1:])), virtual_batch_size, ghost_layout)[0]
    shifted = tuple(a + 1 for a in feature_axes)
    reduce_axes = tuple(i for i in range(ndim + 1) if i not in shifted and i != ghost_axis)
    return view, mask_view, reduce_axes, ghost_axis


def combine_ghost_statistics(count, mean, var, ghost_axis, equal_counts=False):
    """Twin of ``reference.combine_ghost_statistics``; ``equal_counts`` (no mask) takes plain means."""
    if ghost_axis is None:
        return count, mean, var
    if equal_counts:
        return count.sum(dim=ghost_axis, keepdim=True), mean.mean(dim=ghost_axis, keepdim=True), var.mean(
            dim=ghost_axis, keepdim=True)
    total = count.sum(dim=ghost_axis, keepdim=True)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    combined_mean = (count * mean).sum(dim=ghost_axis, keepdim=True) / safe_total
    combined_var = (count * var).sum(dim=ghost_axis, keepdim=True) / safe_total
    return total, combined_mean, combined_var


def renorm_correction(mean, var, eps, renorm_mean, renorm_stddev, clipping):
    """Twin of ``reference.renorm_correction`` (called without gradient: r and d are constants)."""
    return _renorm_factors(mean, torch.sqrt(var + eps), eps, renorm_mean, renorm_stddev, clipping)


def sample_per_feature(x, feature_axes):
    """One input value per feature (the first along every other axis), detached: a cheap centre."""
    sample = x.detach()
    for axis in complement(feature_axes, x.dim()):
        sample = sample.narrow(axis, 0, 1)
    return sample


# Features-last tensors of rank 4 and 5 seen as channels_last NCHW / NCDHW, which ATen has kernels for.
_FEATURES_FIRST = {4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}
_FEATURES_LAST = {4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def canonical_channels_last(x):
    """``x``, or, for a channels_last input one of whose size-1 dims has another stride than channels_last's own
    (say ``(N, L, C)`` data permuted and unsqueezed to ``(N, C, L, 1)``: strides ``(L*C, 1, C, 1)``), the same
    values as a free view with channels_last's strides. On such an input torch 2.13's CPU batch-norm backward,
    training and eval alike (torch.nn's layers too), returns a wrong input and weight gradient: it reads the
    input in one memory format and the gradient in another. The values are the same; only the strides of
    size-1 dims, which address nothing, change."""
    if (x.dim() not in _CHANNELS_LAST or 1 not in x.shape or x.is_contiguous()
            or not x.is_contiguous(memory_format=_CHANNELS_LAST[x.dim()])):
        return x
    last = x.permute(_FEATURES_LAST[x.dim()])  # (dense in this order: the flat view is free)
    return last.reshape(-1).view(last.shape).permute(_FEATURES_FIRST[x.dim()])


def is_channels_last(x) -> bool:
    """Whether ``x`` is a rank-4/5 channels_last (not also contiguous) tensor. False under vmap, which has no memory
    formats (asked there, ``is_contiguous(memory_format=...)`` raises "NYI"); not asked under torch.compile, which
    cannot trace functorch's checks (a graph break, with a warning)."""
    return (x.dim() in _CHANNELS_LAST and not x.is_contiguous()
            and (torch.compiler.is_compiling() or not _under_vmap(x))
            and x.is_contiguous(memory_format=_CHANNELS_LAST[x.dim()]))


def keep_channels_last(x, y):
    """``y``, computed from ``x`` (rank 4 or 5; a channels_last one, else ``y`` as it is) through a contiguous copy,
    in ``x``'s memory format, as torch.nn's BatchNorm2d/3d return it (the next conv's channels_last kernels expect it; one copy, and a
    differentiable one). Not under vmap (no memory formats there) or a trace (sizes are tensors)."""
    if _tracing_state() is not None or not is_channels_last(x):
        return y
    fmt = _CHANNELS_LAST[x.dim()]
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


def _under_vmap(tensor) -> bool:
    """Whether a torch.func.vmap is batching ``tensor``, at any depth of functorch's wrappers
    (``vmap(grad(f))`` hands f a gradient-tracking wrapper around the batched tensor)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def eager_cpu_layouts_matter(x, size_one=True) -> bool:
    """Whether ``x`` (rank 4 or 5, with a size-1 dim unless ``size_one=False``) meets torch 2.13's CPU batch-norm
    backward eagerly, where the strides of its size-1 dims can mislead that kernel (``canonical_channels_last``):
    not under torch.compile (whose backward is its own, and right), a trace (which records no hooks) or vmap (no
    memory formats)."""
    return (x.dim() in _CHANNELS_LAST and _tracing_state() is None  # (traced sizes are tensors: checked first)
            and (not size_one or 1 in x.shape) and not torch.compiler.is_compiling() and not _under_vmap(x))


def canonical_input_wanted(x) -> bool:
    """Whether ``x``, an input of ATen's batch norm, goes through ``canonical_channels_last`` first: a
    non-contiguous input of rank 4 or 5 with a size-1 dim (only those can carry the odd strides), eagerly or under
    torch.export (an exported program's backward is ATen's: without the repair there, the program returned the
    wrong input gradient), not under torch.compile (its backward is its own, and the repair's flat view became a
    ``view`` of the gradient in AOTAutograd's backward that fails on the strides the gradient has at run time), a
    trace (which would record the example's shape in the views' sizes) or vmap (no memory formats)."""
    return (x.dim() in _CHANNELS_LAST and not x.is_contiguous() and _tracing_state() is None and 1 in x.shape
            and ((not torch.compiler.is_compiling() and not _under_vmap(x)) or torch.compiler.is_exporting()))


def guard_gradient_layout(x, y):
    """``y``, ATen's batch norm of ``x``, handing its gradient to ATen's backward with channels_last's own strides
    where it arrives channels_last with odd ones on its size-1 dims (``canonical_channels_last``): a contiguous
    input with such a gradient (the loss reached ``y`` through ``(N, L, C)`` data permuted and unsqueezed) gets a
    wrong input and weight gradient from torch 2.13's CPU kernel, training and eval alike (torch.nn's layers too).
    A pre-hook on ``y``'s node, registered only for a CPU input of rank 4 or 5 with a size-1 dim when a gradient is
    recorded (about 1 µs); any other gradient goes through untouched."""
    if y.requires_grad and x.is_cpu and eager_cpu_layouts_matter(x):
        y.grad_fn.register_prehook(_canonical_first_gradient)
    return y


# Hooks on the node that made the output (``grad_fn.register_prehook``: half the cost of ``Tensor.register_hook``,
# which builds a dict of hooks on the tensor first): they see the node's incoming gradients, the output's first.
def _canonical_first_gradient(grads):
    changed = grads[0] if grads[0] is None else canonical_channels_last(grads[0])
    return None if changed is grads[0] else (changed,) + tuple(grads[1:])


def _contiguous_first_gradient(grads):
    grad = grads[0]
    return None if grad is None or grad.is_contiguous() else (grad.contiguous(),) + tuple(grads[1:])


def guard_instance_gradient(x, y):
    """``y``, ATen's instance norm of ``x`` (rank 4 or 5), handing its gradient to ATen's backward contiguous. ATen's
    instance_norm runs batch_norm on the contiguous ``(1, N*C, *S)`` view of the input and reshapes the loss gradient
    to that shape: wherever the gradient's N and C dims merge, that reshape is a view which keeps the gradient's
    strides, and one whose N and C are innermost becomes channels_last with an odd stride on its size-1 dim 0
    (``canonical_channels_last``), on which torch 2.13's CPU batch-norm backward returns a wrong input and weight
    gradient (torch.nn's InstanceNorm2d/3d too). Such gradients are common: ``y.flatten(2).permute(2, 0, 1)``, the
    (H*W, N, C) sequence a DETR-style transformer takes, hands one back; so do a channels_last gradient of one
    sample (N = 1 or unbatched) and gradients with size-1 dims. The gradient's layout is known only in the backward,
    so the pre-hook is registered for every CPU input of rank 4 or 5 when a gradient is recorded (about 1 µs; eager
    only, as ``eager_cpu_layouts_matter`` says); a contiguous gradient goes through untouched."""
    if y.requires_grad and x.is_cpu and eager_cpu_layouts_matter(x, size_one=False):
        y.grad_fn.register_prehook(_contiguous_first_gradient)
    return y


def _channels_view(x, feature_axes):
    """``x`` as an (N, K, *) tensor with every feature at dim 1, and a function that undoes it (or None).

    Dim 1 goes straight through (ATen has channels_last kernels); features right after
    dim 0 merge into one axis of a free view; a last feature axis of a rank-4/5 input is the
    channels_last NCHW/NCDHW view torch.nn's kernels take (free, and ATen's inference kernel is
    faster on it than on a matrix); anything else is permuted to (reduce..., features...) and
    flattened to (M, K) (a free view for a contiguous input whose features are last).
    """
    if feature_axes == (1,):
        return x, None
    ndim = x.dim()
    if feature_axes == (ndim - 1,) and ndim in _FEATURES_FIRST:
        return x.permute(_FEATURES_FIRST[ndim]), lambda y: y.permute(_FEATURES_LAST[ndim])
    k = len(feature_axes)
    num_features = math.prod([x.shape[a] for a in feature_axes])
    if feature_axes == tuple(range(1, 1 + k)):
        shape = x.shape
        return x.reshape((shape[0], num_features) + tuple(shape[1 + k:])), lambda y: y.reshape(shape)
    if feature_axes == tuple(range(ndim - k, ndim)):  # features already last: no permute needed
        shape = x.shape
        return x.reshape(-1, num_features), lambda y: y.reshape(shape)
    order = complement(feature_axes, ndim) + feature_axes
    moved = x.permute(order)
    inverse = [order.index(i) for i in range(ndim)]
    return moved.reshape(-1, num_features), lambda y: y.reshape(moved.shape).permute(inverse)


def _in_dtype(p, dtype):
    """A parameter (or None) in the dtype the statistics are computed in; the cast is differentiable."""
    return p if p is None or p.dtype == dtype else p.to(dtype)


def _flat(p):
    return p if p is None or p.dim() == 1 else p.reshape(-1)


def _aten_batch_norm(x, feature_axes, running_mean, running_var, weight, bias, training, momentum, eps,
                     recenter=False):
    """torch.batch_norm on any feature axes (through ``_channels_view``).

    ``recenter``: ATen's CPU kernel rounds the batch mean to the input dtype before the
    variance pass, so float32 data with |mean| >> std (1e4 vs 1e-2) gets a variance off by
    (rounding error)^2. Subtracting one sample value per feature first changes nothing in
    exact arithmetic (BN is shift invariant; the running mean is shifted and shifted back)
    and makes the rounded mean tiny.
    """
    if recenter and training:
        center = sample_per_feature(x, feature_axes)
        # Half-precision input (compiled graphs recenter every call): the residuals, the parameters and the shifted
        # running statistics in float32, as ATen's kernels compute, each rounded once. Residuals rounded to half
        # precision lost up to an ulp of the data each (a thousand times the uncentred call's error in the running
        # statistics and gamma's gradient), and a half-precision running mean was rounded shifted and back.
        widen = x.dtype in LOW_PRECISION
        if widen:
            residuals, weight, bias = x.float() - center, _in_dtype(weight, torch.float32), _in_dtype(bias, torch.float32)
            shifted_mean = None if running_mean is None else running_mean.float() - center.reshape(running_mean.shape)
            shifted_var = None if running_var is None else running_var.float()  # (the buffer itself if float32)
        else:
            residuals, shifted_var = x - center, running_var
            shifted_mean = None if running_mean is None else running_mean - center.reshape(running_mean.shape)
        y = _aten_batch_norm(residuals, feature_axes, shifted_mean, shifted_var, weight, bias, True, momentum, eps)
        if running_mean is not None:
            running_mean.copy_(shifted_mean + center.reshape(running_mean.shape))
        if shifted_var is not running_var:
            running_var.copy_(shifted_var)
        return y.to(x.dtype) if widen else y
    channels, restore = _channels_view(x, feature_axes)
    if restore is not None and eager_cpu_layouts_matter(channels):
        channels = canonical_channels_last(channels)  # (a view of features-last data: odd size-1 strides, see there)
    widen = without_float32_tensors(channels, weight, bias, running_mean, running_var)
    y = torch.batch_norm(channels.float() if widen else channels, _flat(weight), _flat(bias), _flat(running_mean),
                         _flat(running_var), training, momentum, eps, torch.backends.cudnn.enabled)
    y = guard_gradient_layout(channels, y)
    y = y.to(channels.dtype) if widen else y
    return y if restore is None else restore(y)


def without_float32_tensors(x, *tensors):
    """Whether ``x`` is half precision and the call holds no tensor (weight, bias, running statistics) that would
    make ATen compute it in float32: alone, ATen computes the whole call in half precision and normalizes by a
    mean rounded to the input's dtype (5e-2 to 0.26 off at mean 1e4, std 20), so such a call is computed on the
    float32 copy of the input and its output rounded once, as normkit's own paths compute every half input."""
    return x.dtype in LOW_PRECISION and all(t is None for t in tensors)


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, mask=None, virtual_batch_size=None,
               ghost_layout="strided", unbiased_running_var=True, renorm_mean=None, renorm_stddev=None,
               moving_stddev=None, renorm_clipping=(0.0, math.inf, math.inf), renorm_momentum=0.01,
               adjustment=None, recenter=False):
    """Twin of ``reference.batch_norm`` (see its docstring for the math); buffers updated in place.

    ``mask`` has the input's rank and broadcasts to it; any nonzero value marks a valid position.
    ``recenter`` keeps float32 statistics exact for data far from zero (see
    ``_aten_batch_norm``); modules turn it on when they see such data.

    ``momentum`` is a number (or a 0-d tensor, as compiled layers pass the cumulative average), the weight of the new
    batch value. ``momentum=None`` is refused with a TypeError, in eval too, as torch.nn.functional.batch_norm
    refuses it and as ``reference.batch_norm`` does: None is the layers' cumulative average, which they pass as
    ``1 / t`` at the t-th tracked batch (``stats.momentum_factor``).
    """
    check_floating(x)
    check_eps(eps)
    check_momentum_given(momentum)
    if (running_mean is None) != (running_var is None):
        # (ATen's plain call says so; the option paths updated running_mean alone and then failed naming nothing,
        # took running_var alone silently, and eval said "running_var must be defined in evaluation mode")
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    for tensor in (running_mean, running_var, weight, bias):
        if tensor is not None and not isinstance(tensor, torch.Tensor):  # (else "'list' object has no attribute 'dim'")
            _refuse_non_tensors(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    feature_axes = canonicalize_axes(axis, x.dim())
    if x.dim() >= 4 and not x.is_contiguous() and canonical_input_wanted(x):
        x = canonical_channels_last(x)  # (odd strides on size-1 dims mislead ATen's backward: see there)
    # (a list, not a generator, for the product: Dynamo cannot trace math.prod of a generator)
    features = x.shape[feature_axes[0]] if len(feature_axes) == 1 else math.prod([x.shape[a] for a in feature_axes])
    if _tracing_state() is None:  # (traced sizes are tensors, comparing them warns: see _tracing_state)
        check_per_feature_sizes((running_mean, running_var, weight, bias, renorm_mean, renorm_stddev, moving_stddev),
                                torch.Tensor.numel, features, axis, x.shape)
    # The options' own checks come before the eval return, as in reference.batch_norm: a mask of another shape, a
    # clipping that is not three bounds or an adjustment that cannot be called were ignored silently in eval.
    if mask is not None and _tracing_state() is None:  # (traced sizes: see _tracing_state)
        _check_mask(mask, x)
    if renorm_mean is not None:
        check_renorm_clipping_bounds(renorm_clipping)  # (else "not enough values to unpack (expected 3, got 2)")
        check_renorm_state(renorm_mean, renorm_stddev, moving_stddev, training and running_mean is not None)
    check_adjustment(adjustment)
    batch_stats = training or running_mean is None
    if not batch_stats:
        if (mask is not None and isinstance(weight, torch.Tensor) and weight.requires_grad
                and torch.is_grad_enabled()):  # (inference under no_grad has no gradient to guard)
            # (the padding rule in eval: the mask names no statistic but still the positions whose NaN or inf
            # values must not reach the weight's gradient when the loss ignores them)
            ignored = _padding_to_guard(x, mask, None)
            if ignored is None and torch.compiler.is_compiling() and not torch.compiler.is_exporting():
                # Compiled, no host read decides: the guard at once (its probe a traced Function, not a hook; before,
                # compiled graphs skipped it and NaN or inf padding made the weight's gradient NaN; found by
                # tools/fuzz_batch_norm.py --family compile).
                ignored = (mask == 0) & ~torch.isfinite(x)
            if ignored is not None:
                return _eval_guarding_padding(x, ignored, feature_axes, running_mean, running_var, weight, bias, eps)
        return _aten_batch_norm(x, feature_axes, running_mean, running_var, weight, bias, False, 0.0, eps)
    if virtual_batch_size is not None:  # (reference.py checks in ghost_view; the paths below reshape by it first)
        # (a float or 0 failed in the kernel's binding or as "integer modulo by zero"; any layout but "strided"
        # was taken as "contiguous")
        check_virtual_batch_size(virtual_batch_size)
        check_ghost_layout(ghost_layout)
        check_ghost_batch(x.shape[0], virtual_batch_size)
    if mask is not None:
        if mask.dtype != torch.bool:
            # (the padding paths gather the nonzero positions, the composite ones multiplied by the values: a 0.5
            # counted whole on one path and half on the other)
            mask = mask != 0
    plain = mask is None and virtual_batch_size is None and renorm_mean is None and adjustment is None
    if x.numel() == 0:
        # An empty batch has no statistics: an empty output, the buffers left alone, and (as in torch.nn)
        # zero gradients for weight and bias rather than none.
        shape = broadcast_shape(feature_axes, x.shape)
        return affine(x * 1.0, None if weight is None else weight.reshape(shape).to(x.dtype),
                      None if bias is None else bias.reshape(shape).to(x.dtype))
    # With normkit.kernels on, every option it covers and, on the CPU, plain features-last data of
    # rank >= 4 (where ATen's channels-last kernels are slow) take the fused kernel; other plain calls
    # keep torch.nn's own kernel (and its exact bits), as every plain call on a GPU does.
    # Under torch.compile the compiler fuses the composite paths itself: no kernels, no gathers.
    compiling = torch.compiler.is_compiling()
    if (kernels.enabled() and kernels.enabled(x.device) and adjustment is None and not compiling
            and _tracing_state() is None  # (a trace records ATen's ops: kernels.traced)
            and not (plain and unbiased_running_var and (feature_axes != (x.dim() - 1,) or x.dim() < 4 or x.is_cuda))):
        y = _fused_batch_norm(x, feature_axes, mask, virtual_batch_size, ghost_layout, running_mean, running_var,
                              weight, bias, training, momentum, eps, unbiased_running_var, renorm_mean,
                              renorm_stddev, moving_stddev, renorm_clipping, renorm_momentum)
        if y is not None:
            return y
    # (the masked rows' Function and its gather are not for torch.func's transforms or forward-mode AD either, and
    # the gather's data-dependent size cannot be known for meta or fake tensors)
    if (mask is not None and virtual_batch_size is None and adjustment is None and not compiling
            and all(mask.shape[a] == 1 for a in feature_axes) and not _functions_refused()
            and not without_data(x)):
        return _masked_rows_batch_norm(x, feature_axes, mask, running_mean, running_var, weight, bias,
                                       training, momentum, eps, unbiased_running_var, renorm_mean, renorm_stddev,
                                       moving_stddev, renorm_clipping, renorm_momentum, recenter)
    if plain and unbiased_running_var and not isinstance(momentum, torch.Tensor):
        # (a tensor momentum, the traced cumulative average, goes to the pipelines: ATen's kernel takes a number)
        check_enough_values(x.numel() // math.prod([x.shape[a] for a in feature_axes]), x.shape, training=training)
        return _aten_batch_norm(x, feature_axes, running_mean, running_var, weight, bias, True, momentum, eps,
                                recenter)
    if mask is None and adjustment is None:
        return _aten_pipeline(x, feature_axes, virtual_batch_size, ghost_layout, running_mean, running_var, weight,
                              bias, training, momentum, eps, unbiased_running_var, renorm_mean, renorm_stddev,
                              moving_stddev, renorm_clipping, renorm_momentum, recenter)
    return _batch_norm_pipeline(x, feature_axes, broadcast_shape(feature_axes, x.shape), running_mean, running_var, weight, bias, training,
                                momentum, eps, mask, virtual_batch_size, ghost_layout, unbiased_running_var,
                                renorm_mean, renorm_stddev, moving_stddev, renorm_clipping, renorm_momentum,
                                adjustment, recenter)


def _refuse_non_tensors(**tensors):
    for name, tensor in tensors.items():
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}: convert it with "
                            f"torch.as_tensor({name}, dtype=x.dtype, device=x.device)")


def _check_mask(mask, x):
    """The functional mask: a tensor of the input's rank that broadcasts to it (size 1 on the feature axes for
    padding, or varying along them). (A
    mask of another shape failed deep inside, "The expanded size of the tensor (5) must match the existing size (6)
    at non-singleton dimension 2", a list with "'list' object has no attribute 'shape'".)"""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor (boolean, or 0/1), got {type(mask).__name__}")
    shape, target = mask.shape, x.shape
    if len(shape) == len(target):
        for size, wanted in zip(shape, target):  # (axes.broadcasts_to, inline: this runs on every masked call)
            if size != 1 and size != wanted:
                break
        else:
            return
    raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit the input of shape {tuple(x.shape)}: "
                     "functional.batch_norm takes a mask of the input's rank that broadcasts to it (size 1 on the "
                     "feature axes for padding, or varying along them; the layers also take the input's shape "
                     "without its feature axes)")


def _fused_layout(x, feature_axes):
    """(N, R, C, S) of x's memory for the fused kernel, and x as that contiguous array; None if unsupported.

    Features on dim 1 of a contiguous tensor: (N, 1, C, prod(rest)); of a channels_last one:
    its NHWC memory, (N, H*W, C, 1); features last of a contiguous tensor: (N, prod(middle), C, 1).
    """
    if len(feature_axes) != 1 or x.dim() < 2:
        return None
    shape, axis = x.shape, feature_axes[0]
    if axis == 1 and x.is_contiguous():
        return (shape[0], 1, shape[1], math.prod(shape[2:])), x
    if axis == 1 and x.dim() in _FEATURES_LAST:
        memory = x.permute(_FEATURES_LAST[x.dim()])
        if memory.is_contiguous():
            return (shape[0], math.prod(memory.shape[1:-1]), shape[1], 1), memory
    if axis == x.dim() - 1 and x.is_contiguous():
        return (shape[0], math.prod(shape[1:-1]), shape[-1], 1), x
    return None


# The fused CPU kernel's size limit (defined with the kernels, which the layers ask first: kernels.takes).
FUSED_MAX_NUMEL, fused_max_numel = kernels.FUSED_MAX_NUMEL, kernels.fused_max_numel


def _fused_batch_norm(x, feature_axes, mask, virtual_batch_size, ghost_layout, running_mean, running_var, weight,
                      bias, training, momentum, eps, unbiased_running_var, renorm_mean, renorm_stddev, moving_stddev,
                      renorm_clipping, renorm_momentum):
    """A training step in one fused forward and backward (``normkit.kernels``); None where it does not apply.

    It applies to tensors with one feature axis (dim 1 or last) in contiguous or channels_last
    memory and a mask (no ghost batches with it) that is the same on every feature; on the CPU
    (C++) to float32/float64 with parameters and buffers of the input's dtype, on CUDA (Triton)
    also to float16/bfloat16 inputs with float32 parameters and buffers.
    """
    if not x.is_cuda and x.numel() > fused_max_numel():  # (the CUDA kernels apply their own limit)
        return None
    layout = _fused_layout(x, feature_axes)
    if layout is None or not isinstance(momentum, (int, float)) or not isinstance(renorm_momentum, (int, float)):
        return None
    (n, rows, channels, positions), memory = layout
    groups = 1
    if virtual_batch_size is not None:
        if mask is not None or n % virtual_batch_size:
            return None
        groups = n // virtual_batch_size
    valid = None
    if mask is not None:
        if any(mask.shape[a] != 1 for a in feature_axes) or mask.device != x.device:
            return None
        full = tuple(1 if a in feature_axes else size for a, size in enumerate(x.shape))
        valid = mask.expand(full)
        if valid.dtype != torch.bool:  # (the layers' masks are boolean already: no kernel for them)
            valid = valid != 0
        valid = valid.reshape(-1).contiguous()
    else:
        check_enough_values(n // groups * rows * positions, x.shape, virtual_batch_size=virtual_batch_size,
                            training=training)
    rmin, rmax, dmax = renorm_clipping
    settings = [float(momentum), float(renorm_momentum), float(rmin), float(rmax), float(dmax), float(eps),
                1.0 if unbiased_running_var else 0.0, 1.0 if training else 0.0]
    dims = [n, rows, channels, positions, groups, 1 if ghost_layout == "strided" else 0]
    # Parameters and buffers go as they are (C values in any shape): the kernel reads their memory, and
    # returns None, having done nothing, for dtypes, devices or memory it does not take.
    y = kernels.fused_batch_norm(memory, weight, bias, valid, running_mean, running_var, renorm_mean, renorm_stddev,
                                 moving_stddev, dims, settings)
    return y if y is None or memory is x else y.permute(_FEATURES_FIRST[x.dim()])


def _masked_rows_batch_norm(x, feature_axes, mask, running_mean, running_var, weight, bias, training,
                            momentum, eps, unbiased_running_var, renorm_mean, renorm_stddev, moving_stddev,
                            renorm_clipping, renorm_momentum, recenter):
    """The pipeline for a mask that is the same on every feature (padding): rows of an (M, K) view."""
    dtype = statistics_dtype(x)
    rows, restore = _channels_view(x.to(dtype), feature_axes)
    # The mask may broadcast along any non-feature axis (Keras: mask (1, 2, 1) on x (1, 2, 3, 4)).
    full = tuple(1 if axis in feature_axes else size for axis, size in enumerate(x.shape))
    # (a boolean mask as it is: != 0 against an int promoted it to int64, a copy of the mask first)
    valid = mask.expand(full)
    is_valid, _ = _channels_view(valid if valid.dtype == torch.bool else valid != 0, feature_axes)
    if rows.dim() > 2:  # (N, C, *) layout: put positions in rows (free for channels-last data)
        moved_shape = rows.movedim(1, -1).shape
        rows = rows.movedim(1, -1).reshape(-1, rows.shape[1])
        is_valid = is_valid.movedim(1, -1)
        undo_view = restore

        def restore(y):
            y = y.reshape(moved_shape).movedim(-1, 1)
            return y if undo_view is None else undo_view(y)
    is_valid = is_valid.reshape(-1).expand(rows.shape[0])
    valid_rows, padded_rows = is_valid.nonzero().squeeze(1), (~is_valid).nonzero().squeeze(1)
    count = valid_rows.numel()
    center = None
    if recenter and count > 0:
        # A valid row: a padded one may hold anything (NaN, zeros far from the data) and must not count.
        center = rows.index_select(0, valid_rows[:1]).detach()
        rows = rows - center
    # Statistics of the valid rows only, gathered once from the detached rows (constants to
    # autograd): ATen's one-pass kernel then sees exactly the positions that count (a fully
    # masked batch has none: mean 0, variance 0).
    if count > 0:
        mean, var = _channel_moments(rows.detach().index_select(0, valid_rows))
    else:
        mean = var = rows.new_zeros(rows.shape[1])
    batch_mean = mean if center is None else mean + center.reshape(-1)
    r = d = batch_std = None
    if renorm_mean is not None:
        batch_std = torch.add(var, number_for(eps, var)).sqrt_()
        from_mean, to_mean = _mean_from(batch_mean, renorm_mean, center, mean, 1)
        r, d = _renorm_factors(from_mean, batch_std, eps, to_mean, _flat(renorm_stddev), renorm_clipping)
    scale, offset = (_flat(weight), _flat(bias)) if r is None else _fold_renorm(_flat(weight), _flat(bias), r, d)
    scale, offset = _in_dtype(scale, dtype), _in_dtype(offset, dtype)  # (half-precision parameters: compute in float32)
    y = _MaskedRowsBatchNorm.apply(rows, valid_rows, padded_rows, scale, offset, mean, var, eps)
    y = y.to(x.dtype)
    y = y if restore is None else restore(y)
    if training and running_mean is not None and count > 0:  # (nothing valid: the buffers keep their values)
        _update_unmasked_running_stats(batch_mean, var, batch_std, count, running_mean, running_var, momentum, eps,
                                       unbiased_running_var, renorm_mean, renorm_stddev, moving_stddev, renorm_momentum)
    return y


def _ghost_channels(x, feature_axes, virtual_batch_size, ghost_layout):
    """(channels, groups, restore): the statistics view as ATen's (N', G*K, *) channels layout.

    Without ghost batches it is ``_channels_view``. With them, Keras' strided groups of a
    tensor whose features follow the batch axis are a free reshape of x itself, (V, G*K, *);
    other layouts go through ``batch_statistics_view``.
    """
    if virtual_batch_size is None or virtual_batch_size == x.shape[0]:
        # One ghost batch is the batch. (Also a workaround: reshaping a channels_last batch of one
        # gives a view with an unusual batch stride, on which torch 2.13's CPU batch-norm backward
        # returns a wrong input gradient; tests/test_options.py covers it.)
        channels, restore = _channels_view(x, feature_axes)
        return channels, 1, restore
    k = len(feature_axes)
    groups = x.shape[0] // virtual_batch_size
    if ghost_layout == "strided" and feature_axes == tuple(range(1, 1 + k)):
        shape = x.shape
        features = math.prod(shape[1:1 + k])
        return x.reshape((virtual_batch_size, groups * features) + tuple(shape[1 + k:])), groups, None
    view, _, reduce_axes, ghost_axis = batch_statistics_view(x, feature_axes, None, virtual_batch_size, ghost_layout)
    kept = tuple(a for a in range(view.dim()) if a not in reduce_axes)
    channels, restore = _channels_view(view, kept)
    return channels, groups, restore


def _ghost_positions(x, feature_axes, virtual_batch_size, ghost_layout, recenter, weight, bias):
    """Keras' strided ghost groups of contiguous features-last CPU data (N, *, K) of rank 3 or more as the free
    view (V, G, S, K), whose features are the (G, K) pairs, where ``_FoldedBatchNorm`` takes it; else None.

    ``_ghost_channels`` must copy such data to (V*S, G*K) (a group's features are not adjacent in memory), and
    ATen's kernel keeps that copy for backward: one input-sized buffer per layer. On this view the statistics
    come from ``_moments_by_position`` and ``_FoldedBatchNorm`` normalizes in place of ATen's layout, keeping
    per-feature vectors only (and is faster than the copies it spares, docs/benchmarks.md). Not for half
    precision, recentered data, small inputs, parameters of another dtype or where the Function is refused
    (the copy serves there).
    """
    if (virtual_batch_size is None or ghost_layout != "strided" or recenter or x.dim() < 3
            or feature_axes != (x.dim() - 1,) or x.shape[0] == virtual_batch_size or x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.float64) or x.numel() < FOLDED_MIN_NUMEL
            or not x.is_contiguous() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or any(p is not None and p.dtype != x.dtype for p in (weight, bias))
            or _functions_refused() or without_data(x)):
        return None
    return x.view(virtual_batch_size, x.shape[0] // virtual_batch_size, -1, x.shape[-1])


def _aten_pipeline(x, feature_axes, virtual_batch_size, ghost_layout, running_mean, running_var, weight, bias,
                   training, momentum, eps, unbiased_running_var, renorm_mean, renorm_stddev, moving_stddev,
                   renorm_clipping, renorm_momentum, recenter):
    """The pipeline when every position counts, on the (N', G*K, *) channels view of the statistics view.

    Ghost batches alone: ATen's training kernel with the parameters repeated per group. With
    renorm (or a biased running variance): per-group statistics from ATen's statistics kernel
    first, renorm's r and d folded into a per-channel scale and offset, then ``_FoldedBatchNorm``
    (large inputs) or ATen's training kernel (small ones) normalizes. Small tensors stay flat
    and the small ops are few: on small inputs they, not the data, are the cost.
    """
    channels_last = (virtual_batch_size is not None and feature_axes == (1,) and x.shape[0] != virtual_batch_size
                     and is_channels_last(x))
    if channels_last and (ghost_layout != "strided" or x.numel() >= CHANNELS_LAST_PERMUTE_MIN_NUMEL):
        # A channels_last batch is features-last data seen through a permute: its ghost groups are that data's, and
        # normalized as such (a free view, the by-position path where it applies) the output permutes back to
        # channels_last, as torch.nn's BatchNorm2d/3d keep it; measured faster than the copy to the per-group view for
        # contiguous ghosts and, from 2^17 values, to the (V, G*C, *) view for strided ones (whose output came back
        # contiguous). Smaller strided ones keep that copy, faster there, and copy the output back below.
        ndim = x.dim()
        y = _aten_pipeline(x.permute(_FEATURES_LAST[ndim]), (ndim - 1,), virtual_batch_size, ghost_layout,
                           running_mean, running_var, weight, bias, training, momentum, eps, unbiased_running_var,
                           renorm_mean, renorm_stddev, moving_stddev, renorm_clipping, renorm_momentum, recenter)
        return y.permute(_FEATURES_FIRST[ndim])
    channels = _ghost_positions(x, feature_axes, virtual_batch_size, ghost_layout, recenter, weight, bias)
    by_position = channels is not None
    if by_position:
        groups, restore = channels.shape[1], None
        per_group = channels.numel() // (groups * channels.shape[-1])
    else:
        channels, groups, restore = _ghost_channels(x, feature_axes, virtual_batch_size, ghost_layout)
        if groups > 1 and canonical_input_wanted(channels):
            # (the ghost reshape of a permuted input keeps odd strides on its size-1 dims, on which ATen's CPU
            # backward returned a wrong weight gradient: ghosts of one row, (2, 1, 4, 1) at strides (1, 8, 2, 1))
            channels = canonical_channels_last(channels)
        per_group = channels.numel() // max(channels.shape[1], 1)
    check_enough_values(per_group, x.shape, virtual_batch_size=virtual_batch_size, training=training)
    center = None
    widened = False
    if recenter:
        center = sample_per_feature(channels, (1,))
        # Half-precision input (compiled graphs recenter every call): the residuals, the normalization and the
        # parameters in float32, the output rounded once. Residuals rounded to half precision lost up to an ulp of
        # the data each, a thousand times the uncentred call's error in the running statistics and gamma's gradient.
        widened = channels.dtype in LOW_PRECISION
        if widened:
            channels = channels.float()
            weight, bias = _in_dtype(weight, torch.float32), _in_dtype(bias, torch.float32)
        channels = channels - center
    r = d = batch_std = None
    if groups > 1 and renorm_mean is None and not by_position:
        # Ghost batches alone: no constant to fold in, so ATen's training kernel computes the
        # per-group statistics it normalizes with (one pass, C++ autograd). The variance comes
        # back as 1 / invstd^2 - eps: exact up to float32 rounding of var + eps, which is all
        # that inference (var + eps again) ever sees.
        # (Half-precision input with no float32 weight to widen ATen's kernel: the statistics in float32 all the same.)
        widen = channels.dtype in LOW_PRECISION and (weight is None or weight.dtype in LOW_PRECISION)
        computed, scale, offset = ((channels.float(), _in_dtype(weight, torch.float32), _in_dtype(bias, torch.float32))
                                   if widen else (channels, weight, bias))
        y, mean, invstd = torch.native_batch_norm(computed, _repeat_groups(_flat(scale), groups),
                                                  _repeat_groups(_flat(offset), groups), None, None, True, 0.0, eps)
        y = guard_gradient_layout(computed, y)
        y = y.to(channels.dtype) if widen else y
        var = invstd.detach().pow(-2).sub_(eps).clamp(min=0.0)  # (out of place: vmap has no batching rule for clamp_)
        batch_mean, batch_var = _combine_groups(mean.detach(), var, groups, center)
    else:
        # Statistics of the detached input: everything computed from them is constant to autograd
        # (cheaper than entering no_grad twice per call).
        stats_input = channels.detach()
        if stats_input.dtype in LOW_PRECISION:
            stats_input = stats_input.float()
            # Half-precision parameters (a .half() layer) in float32 (a differentiable cast), as the float32
            # statistics: ATen refused them beside float32 mean and var, and its half-precision training kernel
            # rounded the mean it normalizes by to the input's dtype.
            weight, bias = _in_dtype(weight, torch.float32), _in_dtype(bias, torch.float32)
        mean, var = _moments_by_position(stats_input, True) if by_position else _channel_moments(stats_input)
        batch_mean, batch_var = _combine_groups(mean, var, groups, center)
        if renorm_mean is not None:
            batch_std = torch.add(batch_var, number_for(eps, batch_var)).sqrt_()
            from_mean, to_mean = _mean_from(batch_mean, renorm_mean, center, mean, groups)
            r, d = _renorm_factors(from_mean, batch_std, eps, to_mean, _flat(renorm_stddev), renorm_clipping)
        # (torch.export keeps a Python Function's forward and drops its backward, and torch.func's transforms and
        # forward-mode AD refuse it: there ATen's kernel serves)
        if by_position or (channels.numel() >= FOLDED_MIN_NUMEL and not torch.compiler.is_exporting()
                           and not _functions_refused()):
            y = _FoldedBatchNorm.apply(channels, _flat(weight), _flat(bias), mean, var, r, d, groups, eps,
                                       by_position)
        else:
            # Small inputs: Python overhead, not the data, is the cost, and a second statistics
            # pass inside ATen's training kernel (C++ autograd) is cheaper than a Python Function.
            scale, offset = (_flat(weight), _flat(bias)) if r is None else _fold_renorm(_flat(weight), _flat(bias),
                                                                                       r, d)
            # (half-precision input with no float32 tensor beside it, as without_float32_tensors says: ATen would
            # normalize in half precision, 0.03 off in bfloat16 on a (2, 3) batch; a biased running variance, or
            # no running statistics out of training, with affine=False)
            widen = without_float32_tensors(channels, scale, offset)
            y = torch.batch_norm(channels.float() if widen else channels, _repeat_groups(scale, groups),
                                 _repeat_groups(offset, groups), None, None, True, 0.0, eps,
                                 torch.backends.cudnn.enabled)
            y = guard_gradient_layout(channels, y)
            y = y.to(channels.dtype) if widen else y
    y = y if restore is None else restore(y)
    y = y if y.shape == x.shape else y.reshape(x.shape)
    y = y.to(x.dtype) if widened else y
    if channels_last:
        y = keep_channels_last(x, y)
    if training and running_mean is not None:
        _update_unmasked_running_stats(batch_mean, batch_var, batch_std, per_group, running_mean, running_var,
                                       momentum, eps, unbiased_running_var, renorm_mean, renorm_stddev,
                                       moving_stddev, renorm_momentum)
    return y


CHANNELS_LAST_PERMUTE_MIN_NUMEL = 1 << 17  # measured (one thread): (64,6,24,24) 1.27x the step copied back, 0.98x so
FOLDED_MIN_NUMEL = 1 << 14  # measured: below it (e.g. (64, 120)) the Function costs more than it saves


def _repeat_groups(param, groups):
    """A per-feature parameter repeated for G ghost groups (cat: a plain copy, cheaper than repeat)."""
    if param is None:
        return None
    if torch.compiler.is_compiling():
        return param.repeat(groups)  # (a list of G copies would fix G in the graph: one graph per batch size)
    return param if groups == 1 else torch.cat([param] * groups)


def _mean_from(batch_mean, renorm_mean, center, mean, groups):
    """(batch mean, renorm mean) for renorm's ``d = (batch_mean - renorm_mean) / stddev``; recentered, (the
    residuals' mean, renorm_mean - center) instead: the same difference, but the batch mean of float32 data far
    from zero is known only to an ulp of the data (1e-3 at 1e4, a tenth of a spread of 1e-2), which d carried
    into every output, while centre and renorm mean lie within a factor 2 of each other, so their difference is
    exact (Sterbenz)."""
    if center is None:
        return batch_mean, _flat(renorm_mean)
    return (_combine_groups(mean, mean, groups, None)[0],
            _combine_groups(_repeat_groups(_flat(renorm_mean), groups) - center.reshape(-1), mean, groups, None)[0])


def _combine_groups(mean, var, groups, center):
    """Batch statistics from per-group ones (equal counts: plain means), the centre added back."""
    if center is not None:
        mean = mean + center.reshape(-1)
    if groups == 1:
        return mean, var
    return torch.stack((mean, var)).view(2, groups, -1).mean(dim=1).unbind(0)


def _fold_renorm(weight, bias, r, d):
    """(x_hat * r + d) * weight + bias = x_hat * (r * weight) + (d * weight + bias)."""
    scale = r if weight is None else r * weight
    offset = d if weight is None else d * weight
    return scale, offset if bias is None else offset + bias


def _renorm_factors(mean, stddev, eps, renorm_mean, renorm_stddev, clipping):
    """``renorm_correction`` given the batch standard deviation, in few small ops."""
    rmin, rmax, dmax = clipping
    if torch.compiler.is_compiling():
        # r and d read renorm_mean/renorm_stddev, which this same step then updates in place. A
        # compiled graph may recompute r and d in the backward from those buffers, after the update
        # (a known fault of AOTAutograd's partitioner: silently wrong gradients). An opaque op's
        # outputs are saved, never recomputed, so the backward sees the values the forward used.
        # The bounds go in as a tensor: a clipping schedule traced with the step count as a symbol gives
        # symbolic numbers, which an op cannot take as floats.
        bounds = torch.stack([torch.scalar_tensor(bound, dtype=torch.float64, device=mean.device)
                              for bound in clipping])
        return torch.ops.normkit.renorm_factors(mean, stddev, renorm_mean, renorm_stddev, float(eps), bounds)
    return _renorm_factors_eager(mean, stddev, eps, renorm_mean, renorm_stddev, rmin, rmax, dmax)


@torch.library.custom_op("normkit::renorm_factors", mutates_args=())
def _renorm_factors_op(mean: torch.Tensor, stddev: torch.Tensor, renorm_mean: torch.Tensor,
                       renorm_stddev: torch.Tensor, eps: float, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r and d as one opaque op (its outputs are saved for the backward, never recomputed); ``bounds`` is
    (rmin, rmax, dmax)."""
    bounds = bounds.to(mean.dtype)  # (clamped on the device: no host sync for the bounds)
    r, d = _renorm_factors_eager(mean, stddev, eps, renorm_mean, renorm_stddev, 0.0, math.inf, math.inf)
    return torch.clamp(r, bounds[0], bounds[1]), torch.clamp(d, -bounds[2], bounds[2])


@_renorm_factors_op.register_fake
def _renorm_factors_shape(mean, stddev, renorm_mean, renorm_stddev, eps, bounds):
    shape = torch.broadcast_shapes(mean.shape, stddev.shape, renorm_mean.shape, renorm_stddev.shape)
    return mean.new_empty(shape), mean.new_empty(shape)


def _renorm_factors_backward(ctx, grad_r, grad_d):
    """r and d are constants of the step by design (no gradient reaches the statistics); the op's inputs come
    without gradient, except in graphs where a decomposition turned the detach before it into an alias
    (``ExportedProgram.run_decompositions()``), which then backpropagate through it as the eager step does."""
    return None, None, None, None, None, None


_renorm_factors_op.register_autograd(_renorm_factors_backward)


def _renorm_factors_eager(mean, stddev, eps, renorm_mean, renorm_stddev, rmin, rmax, dmax):
    safe_stddev = torch.clamp(renorm_stddev, min=math.sqrt(eps))
    r = torch.div(stddev, safe_stddev)
    d = torch.sub(mean, renorm_mean).div_(safe_stddev)
    # r > 0 already: the clamps run only for bounds that can bite (Keras' default has none).
    if rmin > 0 or rmax < math.inf:
        r.clamp_(rmin, rmax)
    if dmax < math.inf:
        d.clamp_(-dmax, dmax)
    return r, d


def _update_unmasked_running_stats(batch_mean, batch_var, batch_std, per_group, running_mean, running_var, momentum,
                                   eps, unbiased_running_var, renorm_mean, renorm_stddev, moving_stddev,
                                   renorm_momentum):
    """``update_batch_norm_running_stats`` when every group holds ``per_group`` values: scalar rules."""
    estimate = batch_var * number_for(bessel_factor(per_group), batch_var) if unbiased_running_var else batch_var
    _move_running_stats(running_mean, running_var, batch_mean, estimate, momentum, eps, renorm_mean, renorm_stddev,
                        moving_stddev, batch_std, renorm_momentum)


def _move_running_stats(running_mean, running_var, batch_mean, batch_var_estimate, factor, eps, renorm_mean=None,
                        renorm_stddev=None, moving_stddev=None, batch_std=None, renorm_factor=None, seen=None):
    """The one place BN's buffers change: each moves toward its batch value by ``factor``.

    ``factor`` is a number or a per-channel tensor (0 where a channel saw nothing). With
    renorm, ``running_var`` follows ``moving_stddev`` (``max(moving_stddev^2 - eps, 0)``) on the
    channels marked ``seen`` (all when None) and the renorm statistics move by
    ``renorm_factor``. One multi-tensor blend, (1 - w) b + w t, per momentum.
    """
    dtype = running_mean.dtype
    # Each value in its buffer's shape: per-feature tensors may come in any shape ((C,), (1, C), ...), and a renorm
    # state of another shape than running_mean's was broadcast into (C, C) or failed after running_mean had moved.
    cast = (lambda t, like: (t if t.dtype == dtype else t.to(dtype)) if t.shape == like.shape
            else t.to(dtype).reshape(like.shape))
    # A weight is a number, a 0-dim tensor (momentum=None's 1/t, traced) or one per feature.
    in_shape = (lambda w, like: w if not isinstance(w, torch.Tensor) or w.dim() == 0 or w.shape == like.shape
                else w.reshape(like.shape))

    def blend(buffers, targets, weight):
        # Each buffer as (1 - w) b + w t, torch.nn's form, never lerp's b + w (t - b): a buffer that overflowed to
        # inf (a variance past float16's range, or float32's from data at 1e20) stays inf at the next step, as
        # torch.nn's does, instead of becoming inf - inf = NaN (and every eval output of its channel NaN).
        low = dtype in LOW_PRECISION
        if not isinstance(weight, (int, float)):
            weight = [weight.float() if low else weight] * len(buffers)
        if low:
            # Half-precision buffers: blend in float32 and round once (as Keras does), not the target and again the
            # blend.
            weights = weight if isinstance(weight, list) else [weight] * len(buffers)
            for buffer, target, w in zip(buffers, targets, weights):
                w = in_shape(w, buffer)
                buffer.copy_(buffer.float().mul(1 - w).add_(target.float().reshape(buffer.shape).mul(w)))
            return
        if torch._C._are_functorch_transforms_active():
            # Under torch.func's vmap (an ensemble's stacked buffers) the _foreach_ ops have no batching rule: one
            # out-of-place blend and copy_ per buffer. Under functionalize a captured buffer takes the values, not
            # the functional wrappers (ATen's "INTERNAL ASSERT FAILED ... mutating a non-functional tensor with a
            # functional tensor").
            weights = weight if isinstance(weight, list) else [weight] * len(buffers)
            for buffer, target, w in zip(buffers, targets, weights):
                w = in_shape(w, buffer)
                buffer.copy_(_value_for(buffer, buffer * (1 - w) + cast(target, buffer) * w))
            return
        targets = [cast(t, buffer) for t, buffer in zip(targets, buffers)]
        if isinstance(weight, list):
            weight = [in_shape(w, buffer) for w, buffer in zip(weight, buffers)]
            torch._foreach_mul_(buffers, [1 - w for w in weight])
            torch._foreach_addcmul_(buffers, targets, weight)
        else:
            # (one 0-dim tensor for both buffers where they share a dtype: each number is cast to its buffer's)
            torch._foreach_mul_(buffers, number_for(1 - weight, buffers[0]) if buffers[0].dtype == buffers[-1].dtype
                                else 1 - weight)
            torch._foreach_add_(buffers, targets, alpha=weight)

    if renorm_mean is None:
        blend([running_mean, running_var], [batch_mean, batch_var_estimate], factor)
        return
    blend([renorm_mean, renorm_stddev], [batch_mean, batch_std], renorm_factor)
    blend([running_mean, moving_stddev],
          [batch_mean, torch.add(batch_var_estimate, number_for(eps, batch_var_estimate)).sqrt_()], factor)
    stddev = cast(moving_stddev, running_var)  # (out= resized a running_var of another shape in place)
    if seen is None and not torch._C._are_functorch_transforms_active():
        torch.mul(stddev, stddev, out=running_var).sub_(number_for(eps, running_var)).clamp_(min=0.0)
        return
    # (out of place: vmap has no batching rule for out= nor for clamp_, and ran that one sample at a time)
    derived = torch.mul(stddev, stddev).sub(eps).clamp(min=0.0)
    if seen is not None:
        derived = torch.where(cast(seen, running_var).to(torch.bool), derived, running_var)
    running_var.copy_(_value_for(running_var, derived))


def _value_for(buffer, value):
    """``value`` as an in-place update of ``buffer`` takes it: under torch.func.functionalize, a buffer the
    function captured (a module's, not wrapped) cannot take a functional tensor, so it gets the value inside."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return value  # (compiled graphs functionalize themselves; Dynamo cannot trace the test below)
    functorch = torch._C._functorch
    if functorch.is_functionaltensor(value) and not functorch.is_functionaltensor(buffer):
        torch._sync(value)
        return functorch._unwrap_functional_tensor(value, False)
    return value


class _FoldedBatchNorm(torch.autograd.Function):
    """Training-mode BN of (N, G*K, *) channels with statistics the caller already computed.

    ``y = (x - mean) * invstd * s + o`` with, per feature, ``s = r * weight`` and
    ``o = d * weight + bias`` (renorm's constants r, d; s = weight, o = bias without them),
    repeated over the G ghost groups. Forward is ATen's inference kernel with ``mean`` and
    ``var`` as its statistics; backward is ATen's training backward (gradient through the
    statistics included), with ``dweight = sum_G (r * ds + d * do)`` and ``dbias = sum_G do``.
    One statistics pass instead of two, and no autograd nodes for the folding.

    ``by_position``: the channels are a (V, G, S, K) view (``_ghost_positions``), which ATen's kernels do not
    take. Forward is ``x * a + b`` (a = invstd * s, b = o - mean * a, broadcast over V and S), ATen's inference
    arithmetic; backward takes the two sums per feature, ``sum(g)`` and ``sum(g x_hat)`` over V and S, from
    ATen's backward kernel on the (V, G*S*K) matrix (per column: mean and variance repeated over S) and one
    small sum over S, then ``dx = a g - (slope (x - mean) + c)`` with ``slope = a invstd sum(g x_hat) / M``,
    ``c = a sum(g) / M``, M = V * S values per feature, as ``_MaskedRowsBatchNorm`` computes it.
    """

    @staticmethod
    def forward(ctx, channels, weight, bias, mean, var, r, d, groups, eps, by_position=False):
        scale, offset = (weight, bias) if r is None else _fold_renorm(weight, bias, r, d)
        scale, offset = _repeat_groups(scale, groups), _repeat_groups(offset, groups)
        if by_position:
            factor = torch.add(var, eps).rsqrt_()
            factor = factor if scale is None else factor.mul_(scale)
            shift = -mean * factor if offset is None else torch.addcmul(offset, mean, factor, value=-1)
            y = torch.addcmul(_per_position(shift, channels), channels, _per_position(factor, channels))
        else:
            y = torch.batch_norm(channels, scale, offset, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        ctx.groups, ctx.eps, ctx.by_position = groups, eps, by_position
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(channels, scale, mean, var, r, d, weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad):
        channels, scale, mean, var, r, d, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradient must have a graph of its own
            return _FoldedBatchNorm._differentiable_backward(ctx, grad, channels, weight, bias, r, d)
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_weight = need_weight and ctx.has_weight
        need_bias = need_bias and ctx.has_bias
        # d(weight) needs d(offset) too when r and d are folded in.
        mask = [need_input, need_weight and scale is not None,
                need_bias or (need_weight and r is not None)]
        invstd = torch.add(var, ctx.eps).rsqrt_()
        if ctx.by_position:
            grad_input, grad_scale, grad_offset = _positions_backward(grad, channels, scale, mean, var, invstd,
                                                                      ctx.eps, mask)
        else:
            grad_input, grad_scale, grad_offset = torch.ops.aten.native_batch_norm_backward(
                canonical_channels_last(grad), channels, scale, None, None, mean, invstd, True, ctx.eps, mask)
        if ctx.groups > 1:
            grad_scale = None if grad_scale is None else grad_scale.view(ctx.groups, -1).sum(dim=0)
            grad_offset = None if grad_offset is None else grad_offset.view(ctx.groups, -1).sum(dim=0)
        grad_weight = grad_bias = None
        if need_weight:
            grad_weight = grad_scale if r is None else torch.addcmul(r * grad_scale, d, grad_offset)
        if need_bias:
            grad_bias = grad_offset
        return grad_input if need_input else None, grad_weight, grad_bias, None, None, None, None, None, None, None

    @staticmethod
    def _differentiable_backward(ctx, grad, channels, weight, bias, r, d):
        """The gradient with a graph (a gradient penalty, ``gradgradcheck``): ``scale = r * weight`` was folded
        inside forward, where autograd does not see it, so ATen's backward from the saved scale would miss how
        the input gradient depends on the weight (wrong second derivatives for the weight). Recomputed instead
        as the small inputs' path computes it, by autograd: ATen's training kernel with the folded parameters
        (the same statistics, recomputed from the same channels; a (V, G, S, K) view copied to ATen's layout and
        back, as ``_ghost_channels`` does)."""
        def training_output():
            scale, offset = (weight, bias) if r is None else _fold_renorm(weight, bias, r, d)
            rows, groups, positions, features = channels.shape if ctx.by_position else (None,) * 4
            source = (channels.transpose(1, 2).reshape(rows * positions, groups * features) if ctx.by_position
                      else channels)
            y = torch.batch_norm(source, _repeat_groups(scale, ctx.groups), _repeat_groups(offset, ctx.groups),
                                 None, None, True, 0.0, ctx.eps, torch.backends.cudnn.enabled)
            return y.view(rows, positions, groups, features).transpose(1, 2) if ctx.by_position else y

        return _gradient_of_recomputed(ctx, grad, ((0, channels), (1, weight), (2, bias)), training_output)


def _per_position(per_feature, positions):
    """A (G*K) per-feature vector shaped (1, G, 1, K) to broadcast over a (V, G, S, K) view's rows and positions."""
    return per_feature.view(1, positions.shape[1], 1, positions.shape[-1])


def _positions_backward(grad, positions, scale, mean, var, invstd, eps, mask):
    """``native_batch_norm_backward``'s training gradients (input, scale, offset; None where ``mask`` says so) for
    a (V, G, S, K) view whose features are the (G, K) pairs (``_FoldedBatchNorm``, ``by_position``)."""
    rows, groups, positions_count, features = positions.shape
    columns = groups * positions_count * features

    def per_column(per_feature):  # (a small copy: 1/V of the input's size)
        return per_feature.view(groups, 1, features).expand(groups, positions_count, features).reshape(columns)

    # ATen's backward kernel in inference mode on the (V, columns) matrix: per column, sum(g) and
    # sum(g (x - mean) invstd), with this feature's mean and variance; then the sums over the S positions.
    _, sum_grad_x_hat, sum_grad = torch.ops.aten.native_batch_norm_backward(
        grad.reshape(rows, columns), positions.view(rows, columns), None, per_column(mean), per_column(var), None,
        None, False, eps, [False, True, True])
    sum_grad_x_hat = sum_grad_x_hat.view(groups, positions_count, features).sum(dim=1).view(-1)
    sum_grad = sum_grad.view(groups, positions_count, features).sum(dim=1).view(-1)
    grad_input = None
    if mask[0]:
        count = rows * positions_count
        factor = invstd if scale is None else invstd * scale
        slope = factor * invstd * sum_grad_x_hat / count
        shift = factor * sum_grad / count
        # slope * (x - mean), not slope * x - slope * mean: the two products cancel to float32 rounding when the
        # values are close to each other and far from zero. In place in the one buffer.
        grad_input = torch.sub(positions, _per_position(mean, positions))
        torch.addcmul(_per_position(-shift, positions), grad_input, _per_position(slope, positions), value=-1,
                      out=grad_input)
        grad_input.addcmul_(grad.view(positions.shape), _per_position(factor, positions))
    return grad_input, sum_grad_x_hat if mask[1] else None, sum_grad if mask[2] else None


def _gradient_of_recomputed(ctx, grad, inputs, recompute):
    """A Function's backward that is itself differentiable (``create_graph=True``), as torch.nn's BN is twice
    differentiable: the forward ``recompute()`` run again by autograd from the saved ``inputs`` ((gradient slot,
    tensor) pairs; the slots whose tensors are wanted are filled) and differentiated with ``create_graph=True``.
    The Functions' closed-form backward works on statistics computed without a graph: differentiating it would
    miss how the statistics depend on the input (silently wrong second derivatives)."""
    wanted = [(slot, t) for slot, t in inputs if t is not None and ctx.needs_input_grad[slot]]
    grads = [None] * len(ctx.needs_input_grad)
    if wanted:
        with torch.enable_grad():
            found = torch.autograd.grad(recompute(), [t for _, t in wanted], grad, create_graph=True)
        for (slot, _), value in zip(wanted, found):
            grads[slot] = value
    return tuple(grads)


def _batch_norm_pipeline(x, feature_axes, param_shape, running_mean, running_var, weight, bias, training,
                         momentum, eps, mask, virtual_batch_size, ghost_layout, unbiased_running_var,
                         renorm_mean, renorm_stddev, moving_stddev, renorm_clipping, renorm_momentum, adjustment,
                         recenter=False, moments_fn=None):
    """moments -> [ghost combine] -> [renorm r, d] -> normalize -> [adjustment] -> affine; then running stats.

    The composite execution of the stages, for what ``_aten_pipeline`` (every position counts)
    and ``_masked_rows_batch_norm`` (padding masks) do not cover: the closed-form masked
    gradient (``_MaskedNormalize``) for masks that vary along the features or meet ghost
    batches, and plain autograd with an adjustment (whose scale may itself be trained).

    ``moments_fn(view, reduce_axes, mask_view, shift) -> (count, mean, var, (group_mean, group_shift))`` replaces
    ``moments``: ``distributed.sync_batch_norm`` passes statistics over every process's batch (the mean about
    this process's centre ``shift``, None when not recentered, for its residuals; and, without gradient, the mean
    about the centre common to the group, for the running statistics and renorm's r and d, which are then the
    same bits on every process). Its counts are then not the local ones, and autograd differentiates through it.
    """
    out_dtype = x.dtype
    # Masks (that vary along the features, or with ghost batches) and the adjustment: the
    # composite path, with the closed-form masked gradient when there is no adjustment.
    # (torch.export keeps a Python Function's forward and drops its backward, and torch.func's transforms and
    # forward-mode AD refuse it: there autograd's composite serves)
    needs_composite = (adjustment is not None or moments_fn is not None or torch.compiler.is_exporting()
                       or _functions_refused())
    if x.dtype in LOW_PRECISION and needs_composite:
        # Autograd through both uses of x (statistics and normalization): one cast to float32 for both, so
        # the two parts of the input gradient add up in float32 and are rounded once (cast separately,
        # each part was rounded to half precision before the sum: one or two ulps off torch.nn's).
        x = x.float()
    view, mask_view, reduce_axes, ghost_axis = batch_statistics_view(x, feature_axes, mask, virtual_batch_size,
                                                                     ghost_layout)
    shift = None
    if recenter and (moments_fn is None or view.numel()):
        # Float32 data far from zero: its mean is known only to an ulp of the data, a sizeable fraction of the
        # spread, and every statistic and normalized value inherits that error. About a per-feature centre
        # within an ulp of the mean the residuals are exact (Sterbenz) and so are their statistics; BN is shift
        # invariant, so the output and the gradients are the same function. (Synchronized statistics: each
        # process has its own centre, which moments_fn takes along to merge the moments about it; an empty
        # local batch has none, and ATen's statistics refuse it.)
        # (residuals in the statistics' dtype: half-precision ones would be rounded again)
        # With ghost batches, a centre per ghost batch: each is normalized by its own mean, and ghosts whose means
        # lie far apart (1e4) left residuals as large as the data about one centre per feature.
        with torch.no_grad():
            valid, shift, _ = moments(view.detach(), reduce_axes, mask_view)
            if moments_fn is not None and mask_view is not None and bool((valid == 0).any()):
                # A synchronized process with no valid value of a feature (fully masked) still normalizes its
                # padding by the group's statistics; about no centre, its residuals were the data itself, and its
                # mean (the group's, about centre 0) known to an ulp of the data: at 1e4 with spread 1e-2, masked
                # rows 0.1 off one process on the whole batch, and peers' gradients 3 off through them. A centre
                # there is any finite value near its padding (its mean: the merge takes each process's centre
                # along, and the statistics do not depend on it).
                finite = torch.isfinite(view.detach())
                padding = moments(torch.where(finite, view.detach(), 0.0), reduce_axes, finite)[1]
                # (padding near float32's limit sums to inf: no centre there, as before)
                shift = torch.where((valid > 0) | ~torch.isfinite(padding), shift, padding)
        view = view.to(statistics_dtype(view)) - shift
    local_counts = mask_view is None and moments_fn is None  # every group holds the same, known number of values
    if local_counts:
        check_enough_values(view.numel() // math.prod([view.shape[a] for a in range(view.dim()) if a not in reduce_axes]),
                            x.shape, virtual_batch_size=virtual_batch_size,
                            training=training)
    finite = None  # (whether every value of the view is known to be finite)
    with contextlib.nullcontext() if needs_composite else torch.no_grad():
        if moments_fn is None:
            count, mean, var, finite = _moments(view, reduce_axes, mask_view)
            statistics_mean, statistics_shift = mean.detach(), shift
        else:
            count, mean, var, (statistics_mean, statistics_shift) = moments_fn(view, reduce_axes, mask_view, shift)
    with torch.no_grad():
        # (the mean that leaves the layer is the data's, not the residuals': each ghost's centre added back)
        data_mean = statistics_mean if statistics_shift is None else statistics_mean + statistics_shift
        total, batch_mean, batch_var = combine_ghost_statistics(count.detach(), data_mean, var.detach(), ghost_axis,
                                                                equal_counts=local_counts)
        r = d = None
        if renorm_mean is not None:
            from_mean, to_mean = batch_mean, renorm_mean
            if statistics_shift is not None:
                # (d from the residuals' mean and renorm_mean - centre: see _mean_from)
                renorm_in_view = renorm_mean.reshape(param_shape)
                renorm_in_view = renorm_in_view if ghost_axis is None else renorm_in_view.unsqueeze(0)
                from_mean = combine_ghost_statistics(count.detach(), statistics_mean, var.detach(), ghost_axis,
                                                     equal_counts=local_counts)[1]
                seen, to_mean = combine_ghost_statistics(count.detach(),
                                                         (renorm_in_view - statistics_shift).expand_as(mean),
                                                         var.detach(), ghost_axis, equal_counts=local_counts)[:2]
                # (a feature no ghost saw has batch mean 0, so d = -renorm_mean / stddev, as without the centre)
                to_mean = torch.where(seen > 0, to_mean, renorm_in_view)
            r, d = renorm_correction(from_mean.reshape(param_shape), batch_var.reshape(param_shape), eps,
                                     to_mean.reshape(param_shape), renorm_stddev.reshape(param_shape),
                                     renorm_clipping)
    view_param = (lambda p: None if p is None else (p.reshape(param_shape) if ghost_axis is None
                                                     else p.reshape(param_shape).unsqueeze(0)))
    if needs_composite:
        y = _composite_normalize(view, mean, var, eps, view_param(r), view_param(d), x, adjustment,
                                 virtual_batch_size, ghost_layout, view_param(weight), view_param(bias),
                                 _padding_to_guard(view, mask_view, finite))
    else:  # a mask, without adjustment
        scale, offset = weight, bias
        if r is not None:
            # (x_hat * r + d) * gamma + beta = x_hat * (r * gamma) + (d * gamma + beta)
            gamma = 1.0 if weight is None else weight.reshape(param_shape)
            beta = 0.0 if bias is None else bias.reshape(param_shape)
            scale, offset = r * gamma, d * gamma + beta
        dtype = statistics_dtype(view)
        y = _MaskedNormalize.apply(view.to(dtype), mask_view.to(dtype), count, mean, torch.rsqrt(var + eps),
                                   _in_dtype(view_param(scale), dtype), _in_dtype(view_param(offset), dtype),
                                   reduce_axes, eps).to(view.dtype)
    y = y.reshape(x.shape)
    if training and running_mean is not None:
        with torch.no_grad():
            parts = {"total": total, "batch_mean": batch_mean, "batch_var": batch_var, "count": count.detach(),
                     "mean": data_mean, "var": var.detach(), "ghost_axis": ghost_axis,
                     "masked": not local_counts,
                     "group_count": view.numel() // mean.numel() if local_counts else None}
            update_batch_norm_running_stats(parts, running_mean, running_var, momentum, eps, unbiased_running_var,
                                            renorm_mean, renorm_stddev, moving_stddev, renorm_momentum)
    return y.to(out_dtype)


def _sum_to(grad, shape):
    """Sum ``grad`` over the axes where ``shape`` (same rank) has size 1: the gradient of a broadcast."""
    axes = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    return grad.sum(dim=axes, keepdim=True) if axes else grad


def _differentiable_masked_backward(ctx, grad, x, weights, reduce_axes, eps, scale, offset, first):
    """The masked Functions' gradient with a graph of its own (``_gradient_of_recomputed``): the forward
    recomputed by autograd from the saved inputs (same formula, ``moments`` with the mask). ``first`` is the
    Function's gradient slots of the input, scale and offset (0, 3, 4 or 0, 5, 6)."""
    def output():
        # The padding rule: a non-finite padded value whose output gradient is 0 is read as 0 here. Its own
        # gradient is a * 0 = 0 either way, and it adds nothing to the sums, where 0 * NaN would be NaN; finite
        # values are left as they are, so the math (second derivatives included) is unchanged.
        ignored = (weights == 0) & (grad == 0) & ~torch.isfinite(x)
        values = torch.where(ignored, 0.0, x)
        _, mean, var = moments(values, reduce_axes, weights)
        return normalize(values, mean, var, eps, scale, offset)

    return _gradient_of_recomputed(ctx, grad, tuple(zip(first, (x, scale, offset))), output)


class _MaskedNormalize(torch.autograd.Function):
    """``(x - mean) * invstd * scale + offset`` where mean/invstd are masked batch statistics of x.

    The gradient through the statistics is the closed form of ``reference.normalize_backward``
    (w = mask, n = valid count): ``dx = a g - w (a/n sum g + a invstd^2/n sum(g (x - mean)) (x - mean))``
    with ``a = invstd * scale``; three elementwise passes instead of autograd's dozen.
    """

    @staticmethod
    def forward(ctx, x, weights, count, mean, invstd, scale, offset, reduce_axes, eps):
        centered = x - mean
        factor = invstd if scale is None else invstd * scale
        y = centered * factor if offset is None else torch.addcmul(offset, centered, factor)
        ctx.reduce_axes, ctx.eps = reduce_axes, eps
        # x, not x - mean: the double backward needs x itself, and one input-sized tensor held is enough
        # (the closed form recomputes x - mean, one elementwise pass).
        ctx.save_for_backward(x, weights, count, mean, invstd, factor, scale, offset)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weights, count, mean, invstd, factor, scale, offset = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradient must have a graph of its own
            return _differentiable_masked_backward(ctx, grad, x, weights, ctx.reduce_axes, ctx.eps, scale,
                                                   offset, (0, 5, 6))
        centered = x - mean
        axes = ctx.reduce_axes
        sum_grad = grad.sum(dim=axes, keepdim=True)
        # The padding rule (reference.normalize_backward): a position whose gradient is 0 adds nothing to the
        # sums and a padded one gets a g alone, by selection, since NaN or inf padding times 0 is NaN. On the CPU
        # the products first (ATen's CPU where costs 4-5x a product): a finite sum(g (x - mean)) has finite
        # terms only, so every x is finite (0 * inf, 0 * NaN are NaN) and w * (...) below is 0 on padding;
        # otherwise the selections. (Elsewhere the selections at once: no host read of the sums.)
        selected = not host_checks(x)
        if not selected:
            sum_grad_centered = (grad * centered).sum(dim=axes, keepdim=True)
            selected = not bool(torch.isfinite(sum_grad_centered).all())
        if selected:
            sum_grad_centered = torch.where(grad != 0, grad * centered, 0.0).sum(dim=axes, keepdim=True)
        safe_count = torch.where(count > 0, count, torch.ones_like(count))
        shift = factor * sum_grad / safe_count
        # (paired so no intermediate underflows: invstd^3 is below float32's range once the std passes ~1e13)
        slope = (sum_grad_centered * invstd) * (factor * invstd) / safe_count
        through_statistics = weights * torch.addcmul(shift, centered, slope)
        if selected:
            through_statistics = torch.where(weights != 0, through_statistics, 0.0)
        grad_x = grad * factor - through_statistics
        grad_scale = None if scale is None else _sum_to(sum_grad_centered * invstd, scale.shape)
        grad_offset = None if offset is None else _sum_to(sum_grad, offset.shape)
        return grad_x, None, None, None, None, grad_scale, grad_offset, None, None


class _MaskedRowsBatchNorm(torch.autograd.Function):
    """BN of an (M, K) matrix whose rows are positions, with statistics of the valid rows only.

    ``mean`` and ``var`` are the (biased) statistics of the rows ``valid_rows`` (the others are
    ``padded_rows``). Forward is ATen's inference kernel; backward is
    ``reference.normalize_backward`` with w = 1 on valid rows and 0 on padded ones (a = invstd *
    scale, n valid rows, sums over ALL rows since every output depends on the statistics)::

        dx = a g - w (slope (x - mean) + c),  slope = a invstd sum(g x_hat) / n,  c = a sum(g) / n

    ATen's training backward kernel gives both sums in one pass; then ``u = -(slope (x - mean) + c)``,
    zero on the padded rows, and ``dx = u + a g`` in place. This is the padded-sequence
    case ((N, T, C) with an (N, T) mask), where the rows are a free view of the input.
    """

    @staticmethod
    def forward(ctx, rows, valid_rows, padded_rows, scale, offset, mean, var, eps):
        y = torch.batch_norm(rows, scale, offset, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        ctx.eps, ctx.has_scale, ctx.has_offset = eps, scale is not None, offset is not None
        ctx.count = valid_rows.numel()
        ctx.save_for_backward(rows, padded_rows, scale, mean, var, offset)
        return y

    @staticmethod
    def backward(ctx, grad):
        rows, padded_rows, scale, mean, var, offset = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradient must have a graph of its own
            weights = torch.ones_like(rows[:, :1]).index_fill_(0, padded_rows, 0.0)
            return _differentiable_masked_backward(ctx, grad, rows, weights, (0,), ctx.eps, scale, offset, (0, 3, 4))
        need_rows = ctx.needs_input_grad[0]
        need_scale = ctx.needs_input_grad[3] and ctx.has_scale
        need_offset = ctx.needs_input_grad[4] and ctx.has_offset
        invstd = torch.add(var, number_for(ctx.eps, var)).rsqrt_()
        # Only the sums: sum(g x_hat) and sum(g) (the weight and bias gradients), from ATen's kernel on the CPU.
        # The padding rule: a row whose gradient is 0 adds nothing to sum(g x_hat), whatever it holds (ATen's
        # kernel multiplies, and 0 * NaN is NaN): a non-finite sum (a non-finite value somewhere) is taken again
        # with the selection. Elsewhere the selection at once (no host read). The padded rows' input gradient
        # is selected already (index_fill_ below).
        sum_grad_x_hat = sum_grad = None
        if host_checks(rows):
            _, sum_grad_x_hat, sum_grad = torch.ops.aten.native_batch_norm_backward(
                grad, rows, scale, None, None, mean, invstd, True, ctx.eps, [False, need_rows or need_scale,
                                                                            need_rows or need_offset])
            if sum_grad_x_hat is not None and not bool(torch.isfinite(sum_grad_x_hat).all()):
                sum_grad_x_hat = None
        elif need_rows or need_offset:
            sum_grad = grad.sum(dim=0)
        if sum_grad_x_hat is None and (need_rows or need_scale):
            sum_grad_x_hat = torch.where(grad != 0, grad * (rows - mean), 0.0).sum(dim=0).mul_(invstd)
        grad_rows = None
        if need_rows:
            factor = invstd if scale is None else invstd * scale
            count = ctx.count
            if count > 0:
                count = number_for(count, factor)
                slope = factor * invstd * sum_grad_x_hat / count
                shift = factor * sum_grad / count
                # slope * (x - mean), not slope * x - slope * mean: the two products cancel to
                # float32 rounding when the values are close to each other and far from zero.
                # In place in the one buffer: a fresh input-sized allocation costs as much as a pass.
                grad_rows = torch.sub(rows, mean)
                torch.addcmul(-shift, grad_rows, slope, value=-1, out=grad_rows)
                grad_rows.index_fill_(0, padded_rows, 0.0)
                grad_rows.addcmul_(grad, factor)
            else:
                grad_rows = grad * factor
        return (grad_rows, None, None, sum_grad_x_hat if need_scale else None, sum_grad if need_offset else None,
                None, None, None)


def _adjustment_terms(adjustment, x, dtype):
    """``adjustment(shape)``'s (scale, bias), each expanded to ``x``'s shape (a clear error where it cannot be)."""
    terms = adjustment(tuple(x.shape))
    if not isinstance(terms, (tuple, list)) or len(terms) != 2:
        raise ValueError(f"adjustment must return a pair (scale, bias) for the input shape {tuple(x.shape)}, "
                         f"got {type(terms).__name__}")
    expanded = []
    for label, term in zip(("scale", "bias"), terms):
        term = torch.as_tensor(term, dtype=dtype, device=x.device)
        try:
            expanded.append(term.expand(x.shape))
        except RuntimeError:
            raise ValueError(f"adjustment returned a {label} of shape {tuple(term.shape)}, which does not broadcast "
                             f"to the input's shape {tuple(x.shape)}: return tensors broadcastable to it (size 1 on "
                             "the axes they do not vary over)") from None
    return expanded


def _composite_normalize(view, mean, var, eps, r, d, x, adjustment, virtual_batch_size, ghost_layout, weight, bias,
                         ignored=None):
    """The normalization by autograd's ops. ``ignored``: the padded positions that hold NaN or inf (see
    ``_padding_to_guard``), None when there are none to guard."""
    dtype = statistics_dtype(view)
    adj_scale = adj_bias = None
    if adjustment is not None:  # (called once: an adjustment may draw random numbers)
        adj_scale, adj_bias = _adjustment_terms(adjustment, x, dtype)
        if virtual_batch_size is not None:
            adj_scale = ghost_view(adj_scale, virtual_batch_size, ghost_layout)[0]
            adj_bias = ghost_view(adj_bias, virtual_batch_size, ghost_layout)[0]

    def output(values):
        # Divided by the standard deviation, not multiplied by rsqrt: autograd's rsqrt derivative, var^-1.5,
        # underflows float32 once the spread passes ~1e13, and the division's terms stay in range.
        x_hat = (values.to(dtype) - mean) / torch.sqrt(var + eps)
        z = x_hat if r is None else x_hat * r + d
        if adj_scale is not None:
            z = z * adj_scale + adj_bias
        return affine(z, weight, bias).to(view.dtype)

    if ignored is None:
        return output(view)
    # The padding rule for autograd's ops, whose backward multiplies the output gradient by the saved values
    # (0 * NaN is NaN even where the loss ignores the padding): the graph is built on the input with the
    # non-finite padded values read as 0, and the outputs there are set to their exact values outside it. A
    # nonzero gradient at such an output still makes its channel's gradients NaN, as the math does (NaN there
    # in place of the math's inf for inf padding); a zero one adds nothing.
    y = output(torch.where(ignored, 0.0, view))
    with torch.no_grad():
        exact = output(view)
    if y.requires_grad:
        y.register_hook(lambda grad: torch.where(ignored & (grad != 0), math.nan, grad))
    return y + torch.where(ignored, exact - y.detach(), 0.0)


class _ReadAsZero(torch.autograd.Function):
    """``x`` with the ``ignored`` positions read as 0, its gradient passed through unchanged: in eval the input's
    gradient g w / std does not depend on its value, so a padded position still gets it (``torch.where`` gave it 0)."""

    @staticmethod
    def forward(ctx, x, ignored):
        return torch.where(ignored, 0.0, x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _eval_guarding_padding(x, ignored, feature_axes, running_mean, running_var, weight, bias, eps):
    """Inference by the running statistics, with the padding rule for the weight's gradient, ``sum g x_hat``: the
    only gradient in which an input value appears (dL/dx = g w / std and dL/dbias = sum g never read x). ATen's
    backward multiplies by the saved x_hat, so NaN or inf padding made the weight's gradient NaN even where the
    loss ignores those outputs (eval under a mask, as in fine-tuning with BN in eval). The graph is built on the
    input with the ``ignored`` values read as 0 (``_ReadAsZero``: same input and bias gradients), the outputs there set to their
    exact values outside it, and a zero-valued probe gives the weight NaN where a nonzero gradient meets such a
    padded output, as the math does (NaN there for inf padding too, as on the composite paths)."""
    y = _aten_batch_norm(_ReadAsZero.apply(x, ignored), feature_axes, running_mean, running_var, weight, bias, False,
                         0.0, eps)
    with torch.no_grad():
        exact = _aten_batch_norm(x, feature_axes, running_mean, running_var, weight, bias, False, 0.0, eps)
    probe = (weight - weight.detach()).reshape(broadcast_shape(feature_axes, x.shape)).to(y.dtype).expand(x.shape)
    if torch.compiler.is_compiling():  # (a hook on an intermediate tensor does not trace; the Function does)
        probe = _NaNWhereGradientMeets.apply(probe, ignored)
    else:
        probe.register_hook(lambda grad: _nan_where_gradient_meets(grad, ignored))
    return y + torch.where(ignored, exact - y.detach(), 0.0) + probe


def _nan_where_gradient_meets(grad, ignored):
    """The probe's gradient: NaN where a nonzero gradient meets an ``ignored`` position, 0 elsewhere."""
    return torch.zeros_like(grad).masked_fill_(ignored & (grad != 0), math.nan)


class _NaNWhereGradientMeets(torch.autograd.Function):
    """``_eval_guarding_padding``'s probe hook as a Function (compiled graphs): a zero output whose gradient is NaN
    where a nonzero gradient meets an ``ignored`` position, 0 elsewhere."""

    @staticmethod
    def forward(ctx, probe, ignored):
        ctx.save_for_backward(ignored)
        return torch.zeros_like(probe)

    @staticmethod
    def backward(ctx, grad):
        ignored, = ctx.saved_tensors
        return _nan_where_gradient_meets(grad, ignored), None


def _padding_to_guard(view, mask_view, finite):
    """The padded positions of ``view`` that hold NaN or inf, for ``_composite_normalize``; None where there are
    none (``finite``: ``_moments``' finding, None if unknown) or where the guard is not taken: traced or compiled
    graphs, torch.func's transforms and tensors without data (docs/decisions.md, "Masks")."""
    if mask_view is None or finite or not torch.is_grad_enabled():
        return None
    if not eager_data(view):
        return None
    ignored = (mask_view == 0) & ~torch.isfinite(view)
    if host_checks(view) and not bool(ignored.any()):  # (on a GPU no host read: the guard at once)
        return None
    return ignored


def update_batch_norm_running_stats(parts, running_mean, running_var, momentum, eps, unbiased_running_var,
                                    renorm_mean=None, renorm_stddev=None, moving_stddev=None, renorm_momentum=0.01):
    """Twin of ``reference.update_batch_norm_running_stats``: the rules for any execution (masks, ghosts)."""
    shape = running_mean.shape
    batch_mean = parts["batch_mean"].reshape(shape)
    batch_var = parts["batch_var"].reshape(shape)
    if unbiased_running_var and parts.get("group_count") is not None:
        # Every group holds n values: the average of unbiased variances is n/(n-1) times the average.
        batch_var_estimate = batch_var * bessel_factor(parts["group_count"])
    elif unbiased_running_var:
        per_group = parts["var"] * bessel_factor(parts["count"])
        batch_var_estimate = combine_ghost_statistics(parts["count"], parts["mean"], per_group, parts["ghost_axis"])[2]
        batch_var_estimate = batch_var_estimate.reshape(shape)
    else:
        batch_var_estimate = batch_var
    # Channels that saw no valid value (everything masked) keep their running statistics.
    masked = parts.get("masked", True)
    seen = (parts["total"].reshape(shape) > 0).to(running_mean.dtype) if masked else 1.0
    batch_std = None if renorm_mean is None else torch.sqrt(batch_var + eps)
    _move_running_stats(running_mean, running_var, batch_mean, batch_var_estimate, momentum * seen, eps,
                        renorm_mean, renorm_stddev, moving_stddev, batch_std, renorm_momentum * seen,
                        seen=seen if masked else None)


# ----------------------------------------------------------------------------- layer / instance / group norm


def _params_for(x, weight, bias, running_mean=None):
    """Half-precision input with float32 parameters, or with none: compute in float32 (parameters stay float32).

    Without parameters too: ATen keeps the mean and 1/std of a half-precision call in the input's dtype
    (instance_norm normalizes with that rounded mean, and every kernel's backward reads them), which put
    the output and the input gradient of InstanceNorm/LayerNorm/GroupNorm without affine parameters up
    to 100x further from the float64 values than the same layer's with them. A half-precision layer
    (``.half()``: parameters in the input's dtype) stays in it, as torch.nn's does.

    Under autocast off the CPU the input goes to ATen as it is, so autocast's own rule for the op decides the
    computation and the output dtype exactly as for torch.nn's layer (CUDA: layer_norm and
    group_norm run in float32 and return float32). The CPU's autocast casts none of the norms: there a call with
    a float32 weight or bias goes to ATen's mixed-dtype kernel as torch.nn's does (its bits, tested), and one
    without is computed in float32 as outside autocast: it went to ATen's half-precision kernel, float32 running
    statistics or not (InstanceNorm's do not make the kernel compute in float32), and an InstanceNorm2d() of
    bfloat16 data under ``torch.autocast("cpu")`` normalized by the rounded mean, 12x further from float64.
    """
    params = (weight, bias, running_mean)
    if x.dtype in LOW_PRECISION and not any(p is not None and p.dtype == x.dtype for p in params):
        if not torch.is_autocast_enabled(x.device.type):
            return x.float(), True
        if x.device.type == "cpu" and weight is None and bias is None:
            return x.float(), True
    return x, False


def _affine_in_shape(name, value, shape):
    """``value`` (weight or bias) in ``shape``, the one ATen takes: the reference takes one value per position in
    any layout (a flat 20-value weight for normalized_shape=(4, 5)), so this twin reshapes it (a view, differentiable;
    none when it fits); another count is refused naming it (ATen's RuntimeError did not)."""
    if value is None or value.shape == shape:
        return value
    check_affine_size(name, value.numel(), math.prod(shape))
    return value.reshape(shape)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Twin of ``reference.layer_norm`` (ATen's layer_norm computes it exactly).

    ``normalized_shape`` must be the input's last dims (at least one), and weight and bias hold one value per
    position of it, in any layout: refused otherwise with the reference's ValueError, before ATen.
    """
    check_floating(x)
    check_eps(eps)
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    check_normalized_shape(normalized_shape, tuple(x.shape))
    weight = _affine_in_shape("weight", weight, normalized_shape)
    bias = _affine_in_shape("bias", bias, normalized_shape)
    computed, upcast = _params_for(x, weight, bias)
    y = torch.layer_norm(computed, normalized_shape, weight, bias, eps, torch.backends.cudnn.enabled)
    return y.to(x.dtype) if upcast else y


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Twin of ``reference.group_norm`` (ATen's group_norm computes it exactly).

    weight and bias hold one value per channel, in any layout: refused otherwise with the reference's ValueError,
    before ATen. A whole input of one value per group is refused, as torch.nn.functional.group_norm refuses it.
    """
    check_floating(x)
    check_eps(eps)
    num_groups = integer_size(num_groups)  # (a 0-dim integer tensor, as torch.nn.functional.group_norm takes it)
    check_num_groups(num_groups, x.shape)
    if x.numel() == num_groups:
        # torch.nn.functional.group_norm's rule, as the GroupNorm layers' (their message): a whole input of one value
        # per group is refused (the variance of one value is 0; this gave the bias back); a larger batch normalizes
        # each such group to 0, as torch's does
        raise ValueError(f"group_norm with num_groups={num_groups} sees a single value per group for input "
                         f"{tuple(x.shape)}: the variance is 0; use fewer groups or a larger input")
    weight = _affine_in_shape("weight", weight, (x.shape[1],))
    bias = _affine_in_shape("bias", bias, (x.shape[1],))
    computed, upcast = _params_for(x, weight, bias)
    y = aten_group_norm(computed, num_groups, weight, bias, eps)
    return y.to(x.dtype) if upcast else y


def aten_group_norm(x, num_groups, weight, bias, eps):
    """``torch.group_norm``, with a channels-last CPU input that needs no gradient, under weights that do,
    handed over as a detached alias that requires one: torch 2.13's CPU backward for that case ends the process
    (a segmentation fault, torch.nn's GroupNorm included); with the input's gradient computed (then dropped),
    it gives the weights' gradients. Same output, same memory format.

    An input without values (no spatial position, ``(N, C, 0)``, or no sample) gives an empty output and zero
    gradients for weight and bias, as an empty batch does: ATen's backward for ``(N, C, 0)`` multiplies an empty
    sum by the 0/0 statistics and gave gamma a NaN gradient (torch.nn's GroupNorm too)."""
    if _tracing_state() is None and x.numel() == 0:  # (traced sizes are tensors, and the trace needs no special case)
        with torch.no_grad():  # (ATen's own checks of the shapes: the same errors as before)
            torch.group_norm(x.detach(), num_groups, weight, bias, eps, torch.backends.cudnn.enabled)
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        return affine(x * 1.0, None if weight is None else weight.reshape(shape).to(x.dtype),
                      None if bias is None else bias.reshape(shape).to(x.dtype))
    if (x.dim() >= 4 and x.is_cpu and (not x.requires_grad or torch.jit.is_tracing())
            and torch.is_grad_enabled()
            and ((weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))
            and not kernels.transforms_active()):
        if torch.jit.is_tracing():
            # torch.jit.trace records no requires_grad_, so the alias would reach the traced graph without one and
            # its backward would end the process (torch.nn's traced GroupNorm's too); and the graph serves inputs
            # other than the example (channels-last data without a gradient after a contiguous or grad-requiring
            # example), so a trace made for training takes the contiguous input's kernels for every input.
            return _group_norm_of_contiguous(x, num_groups, weight, bias, eps)
        if not x.is_contiguous():
            if not torch.compiler.is_compiling():
                if not x.is_inference():
                    # (an inference tensor, made under torch.inference_mode, takes no requires_grad_: ATen refuses to
                    # save it for backward, naming the fix (a clone), before any backward could run. Read eagerly
                    # only: Dynamo cannot trace is_inference())
                    x = x.detach().requires_grad_()
            else:
                # Traced, requires_grad_ on an alias breaks the graph (fullgraph refuses it), and without it the
                # compiled backward (eager and aot_eager backends) ends the process as eager ATen's does: the
                # contiguous input's kernels instead, the output given back in the input's channels-last layout.
                return _group_norm_of_contiguous(x, num_groups, weight, bias, eps)
    return torch.group_norm(x, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)


def recentered(x, num_groups):
    """``x`` minus each (sample, group)'s mean, a constant of the graph: group norm (instance norm: one group per
    channel) is the same function of the result, gradients included, and ATen's kernels lose no variance on data near
    zero (docs/decisions.md). Any layout: per-channel means over the positions, then per group; the memory format
    stays the input's."""
    n, channels = x.shape[:2]
    with torch.no_grad():
        # ((N, C) data: its values are the channel means, a copy (the centres are changed in place) that views take;
        # a mean over no dims would reduce them all)
        means = (x.detach().mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2
                 else x.detach().clone(memory_format=torch.contiguous_format))
        if num_groups != channels:
            size = channels // num_groups
            means = means.view(n, num_groups, size).mean(2).repeat_interleave(size, dim=1)
        _finite_centres(means)
    return x - means.view(n, channels, *(1,) * (x.dim() - 2))


def recentered_rows(x, dims):
    """``x`` minus each row's mean over its last ``dims`` dims (layer norm's), a constant of the graph: see
    ``recentered``."""
    with torch.no_grad():
        means = _finite_centres(x.detach().mean(dim=tuple(range(-dims, 0)), keepdim=True))
    return x - means


def _finite_centres(means):
    """``means`` with every non-finite one set to 0, in place: a group (row) whose sum overflows (values near the
    dtype's largest, whose mean is then inf), or that holds an inf or a NaN, is left as it is, so it gets torch's
    own call where another group's data far from zero made the layer recenter (its mean of inf had made the whole
    group NaN where torch's kernel gives a finite output)."""
    return means.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _group_norm_of_contiguous(x, num_groups, weight, bias, eps):
    """``torch.group_norm`` of the contiguous input, the output given back channels-last where the input is
    (and not contiguous as well: a tensor whose strides fit both layouts gets ATen's contiguous output)."""
    y = torch.group_norm(x.contiguous(), num_groups, weight, bias, eps, torch.backends.cudnn.enabled)
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if layout is not None and not x.is_contiguous() and x.is_contiguous(memory_format=layout):
        return y.contiguous(memory_format=layout)
    return y


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    """Twin of ``reference.instance_norm`` (ATen computes it exactly: ``aten_instance_norm`` says which op).

    ``momentum=None`` is refused with a TypeError, as in ``batch_norm``: pass a number (the layers pass 0.0 for
    their momentum=None, torch.nn's rule: the running statistics stay as they are).
    """
    check_floating(x)
    check_eps(eps)
    check_momentum_given(momentum)
    if not use_input_stats and (running_mean is None or running_var is None):
        # The reference's error, in its order (ATen's RuntimeError "Expected running_mean and running_var to be
        # defined when use_input_stats is false" came here before; the layers raise that one themselves, as
        # torch.nn's do, and an empty batch below never reaches ATen)
        raise ValueError("use_input_stats=False normalizes with running_mean and running_var: pass both, or "
                         "use_input_stats=True")
    if x.dim() >= 2:
        check_per_feature_sizes((running_mean, running_var, weight, bias), torch.Tensor.numel, x.shape[1], 1, x.shape,
                                unit="channels")
    if use_input_stats and math.prod(x.shape[2:]) == 1:
        # (not BatchNorm's message: no batch variance is taken here, and eval without running statistics refuses too)
        raise ValueError(f"Expected more than 1 spatial element per channel when normalizing with the input's own "
                         f"statistics (training, or any call without running statistics), got input size "
                         f"{tuple(x.shape)}: the variance of a single value is 0; use a larger spatial size, "
                         "BatchNorm, or track_running_stats=True and eval()")
    if x.numel() == 0:
        # As batch_norm's empty batch: an empty output, zero gradients for weight and bias, the buffers left alone
        # (ATen's kernel fails on weights, and otherwise sets the running statistics to the NaN mean of no samples).
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        return affine(x * 1.0, None if weight is None else weight.reshape(shape).to(x.dtype),
                      None if bias is None else bias.reshape(shape).to(x.dtype))
    computed, upcast = _params_for(x, weight, bias, running_mean)
    y = aten_instance_norm(computed, weight, bias, running_mean, running_var, use_input_stats, momentum, eps)
    return y.to(x.dtype) if upcast else y


def aten_instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps):
    """ATen's instance norm of a checked ``x`` (rank >= 3, the layers' and ``instance_norm``'s one call).

    Where no running statistics are used or moved (``use_input_stats`` without buffers: torch.nn's default
    InstanceNorm), on contiguous full-precision CPU data, eagerly: ATen's group norm with one group per channel, the
    same normalization (biased variance, eps inside the root), 1.2-5x faster there than ``torch.instance_norm``,
    which runs batch norm on an ``(1, N*C, *S)`` view and repeats the weights, and whose backward is right for a loss
    gradient of any layout. Elsewhere (running statistics, CUDA, channels_last memory, which instance_norm returns
    contiguous, half precision, torch.compile, torch.export, a trace or torch.func, which see the op torch.nn's
    layers give them) ``torch.instance_norm``, its gradient handed over contiguous (``guard_instance_gradient``)."""
    if (use_input_stats and running_mean is None and running_var is None and x.is_cpu
            and x.dtype in (torch.float32, torch.float64) and all(t is None or t.dtype == x.dtype for t in (weight, bias))
            and x.is_contiguous() and _tracing_state() is None and not torch.compiler.is_compiling()
            and not kernels.transforms_active()):
        return torch.group_norm(x, x.shape[1], weight, bias, eps, False)
    y = torch.instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                            torch.backends.cudnn.enabled)
    return guard_instance_gradient(x, y)  # (a gradient whose N and C merge misleads ATen's backward: see there)
