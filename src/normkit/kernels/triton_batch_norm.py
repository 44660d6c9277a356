"""BatchNorm's options (renorm, ghost batches, padding masks) as one Triton kernel each way: the CUDA twin of fused_batch_norm.cpp.

On a GPU a small BatchNorm step is launch-bound: the composite path of an option (renorm,
ghost batches, a mask) launches a dozen or more small kernels where torch.nn launches two
(docs/benchmarks.md, "On a GPU"). Here the training step is one kernel and its backward
another, with the same contract as the C++ kernel (``normkit.kernels.fused_batch_norm``):

* the input is an (N, R, C, S) contiguous array (see ``functional._fused_layout``); ghost group
  of sample n: ``n % G`` (Keras' strided layout) or ``n // (N / G)`` (contiguous);
* one program per feature c walks every group of that feature: two passes for the group's
  mean and variance (float64 accumulators, so float32 data far from zero keeps its variance),
  renorm's r and d from the renorm statistics before this step's update, one pass writing
  ``y = (x - mean_g) * invstd_g * gamma * r + gamma * d + beta``, then the running buffers;
* backward: per group, ``sum(g)`` and ``sum(g * (x - mean_g))`` over every position (each
  output depends on the statistics), then
  ``dx = a g - w (a invstd^2 sum(g (x - mean)) / n + a sum(g) / n)`` with ``a = invstd gamma r``
  and ``w = 1`` on valid positions, 0 on padding; ``dgamma = r sum(g x_hat) + d sum(g)``,
  ``dbeta = sum(g)``. The padding rule (reference.normalize_backward): a position with ``g == 0`` adds
  nothing to the sums and a padded one gets ``a g`` alone, both by ``tl.where`` (NaN or inf padding that
  the loss ignores: 0 * NaN would be NaN).

One program per feature keeps every statistic in registers (no second launch, no atomics), at
the price of parallelism: features with more than ``MAX_PER_FEATURE`` values are left to ATen's
multi-block kernels. Half-precision inputs (float16/bfloat16 with float32 parameters, normkit's
rule) are read and written in their dtype; arithmetic is float64. Triton passes Python floats as
float32, which would round eps, the momenta and the clipping bounds (r clipped at 1.1 off by 2e-8):
each setting travels as two float32 numbers whose float64 sum is the setting to about 1e-15.

Tests run these kernels compiled on a CUDA device (tests/test_gpu.py) and, without one, in
Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py), against the NumPy
reference; tools/triton_compile_check.py compiles every branch for sm_90 without a GPU.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from . import complete_state, graph_backward

# The most values one program walks (every ghost group of a feature). Not a measured crossover with
# ATen's kernels: a bound well above the benchmarked features (at most 100,352 values), below which
# one program stays within a few passes of about a megabyte.
MAX_PER_FEATURE = 1 << 18
BLOCK = 1024
_HALF = (torch.float16, torch.bfloat16)


@triton.jit
def _where_in_memory(e, g, G, NG, R, S, C, c, STRIDED: tl.constexpr):
    """Element offsets in x and row indices in the mask of a group's positions e (0 <= e < NG * R * S)."""
    rs_count = R * S
    q = e // rs_count                       # sample within the group
    rs = e - q * rs_count                   # (row, position) within the sample
    r = rs // S
    s = rs - r * S
    if STRIDED:
        n = q * G + g
    else:
        n = g * NG + q
    offset = ((n * R + r) * C + c) * S + s
    return offset, n * rs_count + rs


@triton.jit
def _block(start, g, G, NG, R, S, C, c, positions, valid_ptr, STRIDED: tl.constexpr, HAS_MASK: tl.constexpr,
           BLOCK: tl.constexpr):
    """One block of a group's positions: in range, offsets in x, mask rows, and valid (in range, not padding)."""
    e = start + tl.arange(0, BLOCK)
    inside = e < positions
    offset, row = _where_in_memory(e, g, G, NG, R, S, C, c, STRIDED)
    valid = inside
    if HAS_MASK:
        valid = valid & (tl.load(valid_ptr + row, mask=inside, other=0) != 0)
    return inside, offset, valid


@triton.jit
def _store(pointer, value, mask):
    """Store float64 values in the pointer's dtype (half precision by way of float32, which
    Triton's interpreter needs and which changes nothing that rounding to half keeps)."""
    if pointer.dtype.element_ty == tl.float64:
        tl.store(pointer, value, mask=mask)
    else:
        tl.store(pointer, value.to(tl.float32).to(pointer.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, valid_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
                    renorm_mean_ptr, renorm_stddev_ptr, moving_stddev_ptr, stats_ptr, rd_ptr,
                    G, NG, R, C, S, factor, factor_lo, renorm_factor, renorm_factor_lo, rmin, rmin_lo, rmax, rmax_lo,
                    dmax, dmax_lo, eps, eps_lo,
                    STRIDED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, UPDATE: tl.constexpr,
                    UNBIASED: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    positions = NG * R * S
    zero = tl.zeros((BLOCK,), dtype=tl.float64)
    nothing = tl.sum(zero, axis=0)  # a float64 scalar 0: adding it makes a float argument float64
    eps64 = nothing + eps + eps_lo
    batch_mean = nothing
    batch_var = nothing
    total = nothing
    # stats: (3, G, C) float64 = mean, invstd, count of every (group, feature)
    for g in range(0, G):
        sums = zero
        counts = zero
        for start in range(0, positions, BLOCK):
            inside, offset, ok = _block(start, g, G, NG, R, S, C, c, positions, valid_ptr, STRIDED, HAS_MASK, BLOCK)
            sums += tl.load(x_ptr + offset, mask=ok, other=0.0).to(tl.float64)
            counts += ok.to(tl.float64)
        count = tl.sum(counts, axis=0)
        mean = tl.sum(sums, axis=0) / tl.maximum(count, 1.0)
        squares = zero
        for start in range(0, positions, BLOCK):
            inside, offset, ok = _block(start, g, G, NG, R, S, C, c, positions, valid_ptr, STRIDED, HAS_MASK, BLOCK)
            centered = tl.where(ok, tl.load(x_ptr + offset, mask=ok, other=0.0).to(tl.float64) - mean, 0.0)
            squares += centered * centered
        var = tl.sum(squares, axis=0) / tl.maximum(count, 1.0)
        tl.store(stats_ptr + g * C + c, mean)
        tl.store(stats_ptr + (G + g) * C + c, 1.0 / tl.sqrt(var + eps64))
        tl.store(stats_ptr + (2 * G + g) * C + c, count)
        batch_mean += mean / G
        batch_var += var / G
        total += count
    gamma = nothing + 1.0
    if HAS_WEIGHT:
        gamma = tl.load(weight_ptr + c).to(tl.float64)
    beta = nothing
    if HAS_BIAS:
        beta = tl.load(bias_ptr + c).to(tl.float64)
    r = nothing + 1.0
    d = nothing
    if RENORM:  # r and d from the renorm statistics before this step's update, clipped
        safe = tl.maximum(tl.load(renorm_stddev_ptr + c).to(tl.float64), tl.sqrt(eps64))
        r = tl.minimum(tl.maximum(tl.sqrt(batch_var + eps64) / safe, (nothing + rmin + rmin_lo)), (nothing + rmax + rmax_lo))
        d = (batch_mean - tl.load(renorm_mean_ptr + c).to(tl.float64)) / safe
        d = tl.minimum(tl.maximum(d, -(nothing + dmax + dmax_lo)), (nothing + dmax + dmax_lo))
    tl.store(rd_ptr + c, r)
    tl.store(rd_ptr + C + c, d)
    scale = gamma * r
    shift = gamma * d + beta
    for g in range(0, G):
        mean = tl.load(stats_ptr + g * C + c)
        slope = tl.load(stats_ptr + (G + g) * C + c) * scale
        for start in range(0, positions, BLOCK):
            inside, offset, _ = _block(start, g, G, NG, R, S, C, c, positions, valid_ptr, STRIDED, False, BLOCK)
            x = tl.load(x_ptr + offset, mask=inside, other=0.0).to(tl.float64)
            _store(y_ptr + offset, (x - mean) * slope + shift, inside)
    if UPDATE:
        if total > 0.0:
            n = tl.load(stats_ptr + 2 * G * C + c)  # the first group's count (groups have equal counts)
            bessel = nothing + 1.0
            if UNBIASED:
                bessel = tl.where(n > 1.0, n / tl.maximum(n - 1.0, 1.0), 1.0)
            estimate = batch_var * bessel
            f = nothing + factor + factor_lo
            # (each buffer as (1 - f) old + f new, torch.nn's form: old + f (new - old) made an inf buffer NaN)
            old_mean = tl.load(running_mean_ptr + c).to(tl.float64)
            tl.store(running_mean_ptr + c, ((1.0 - f) * old_mean + f * batch_mean).to(
                running_mean_ptr.dtype.element_ty))
            if RENORM:
                rf = nothing + renorm_factor + renorm_factor_lo
                old = tl.load(renorm_mean_ptr + c).to(tl.float64)
                tl.store(renorm_mean_ptr + c, ((1.0 - rf) * old + rf * batch_mean).to(renorm_mean_ptr.dtype.element_ty))
                old = tl.load(renorm_stddev_ptr + c).to(tl.float64)
                tl.store(renorm_stddev_ptr + c, ((1.0 - rf) * old + rf * tl.sqrt(batch_var + eps64)).to(
                    renorm_stddev_ptr.dtype.element_ty))
                old = tl.load(moving_stddev_ptr + c).to(tl.float64)
                stddev = ((1.0 - f) * old + f * tl.sqrt(estimate + eps64)).to(moving_stddev_ptr.dtype.element_ty)
                tl.store(moving_stddev_ptr + c, stddev)
                stddev64 = stddev.to(tl.float64)
                tl.store(running_var_ptr + c, tl.maximum(stddev64 * stddev64 - eps64, 0.0).to(
                    running_var_ptr.dtype.element_ty))
            else:
                old = tl.load(running_var_ptr + c).to(tl.float64)
                tl.store(running_var_ptr + c, ((1.0 - f) * old + f * estimate).to(running_var_ptr.dtype.element_ty))


@triton.jit
def _backward_kernel(x_ptr, grad_ptr, valid_ptr, weight_ptr, stats_ptr, rd_ptr, grad_input_ptr, grad_weight_ptr,
                     grad_bias_ptr, G, NG, R, C, S,
                     STRIDED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     NEED_INPUT: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
                     BLOCK: tl.constexpr):
    c = tl.program_id(0)
    positions = NG * R * S
    zero = tl.zeros((BLOCK,), dtype=tl.float64)
    r = tl.load(rd_ptr + c)
    d = tl.load(rd_ptr + C + c)
    scale = r
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + c).to(tl.float64) * r
    grad_scale = tl.sum(zero, axis=0)
    grad_shift = tl.sum(zero, axis=0)
    for g in range(0, G):
        mean = tl.load(stats_ptr + g * C + c)
        invstd = tl.load(stats_ptr + (G + g) * C + c)
        count = tl.load(stats_ptr + (2 * G + g) * C + c)
        sum_g = zero
        sum_gx = zero
        for start in range(0, positions, BLOCK):
            inside, offset, _ = _block(start, g, G, NG, R, S, C, c, positions, valid_ptr, STRIDED, False, BLOCK)
            gv = tl.load(grad_ptr + offset, mask=inside, other=0.0).to(tl.float64)
            x = tl.load(x_ptr + offset, mask=inside, other=0.0).to(tl.float64)
            sum_g += gv
            # (the padding rule: a zero gradient adds nothing, whatever x holds; 0 * NaN would be NaN)
            sum_gx += tl.where(gv != 0.0, gv * (x - mean), 0.0)
        total_g = tl.sum(sum_g, axis=0)
        total_gx = tl.sum(sum_gx, axis=0)
        if NEED_INPUT:
            a = invstd * scale
            seen = tl.maximum(count, 1.0)
            slope = tl.where(count > 0.0, a * invstd * invstd * total_gx / seen, 0.0)
            shift = tl.where(count > 0.0, a * total_g / seen, 0.0)
            for start in range(0, positions, BLOCK):
                inside, offset, valid = _block(start, g, G, NG, R, S, C, c, positions, valid_ptr, STRIDED, HAS_MASK,
                                               BLOCK)
                gv = tl.load(grad_ptr + offset, mask=inside, other=0.0).to(tl.float64)
                x = tl.load(x_ptr + offset, mask=inside, other=0.0).to(tl.float64)
                # Padding contributes nothing to the statistics, so only the direct term reaches it.
                correction = tl.where(valid, slope * (x - mean) + shift, 0.0)
                _store(grad_input_ptr + offset, a * gv - correction, inside)
        grad_scale += invstd * total_gx
        grad_shift += total_g
    if NEED_WEIGHT:
        _store(grad_weight_ptr + c, r * grad_scale + d * grad_shift, None)
    if NEED_BIAS:
        _store(grad_bias_ptr + c, grad_shift, None)


@functools.lru_cache(maxsize=64)
def _float32_pairs(settings: tuple) -> tuple:
    """Each setting as float32 numbers (hi, lo) with hi + lo == setting to about 1e-15 (infinities: (inf, 0)).

    Cached: a layer's settings repeat from step to step, and this runs on every one.
    """
    pairs = []
    for value in settings:
        hi = float(np.float32(value))
        lo = value - hi if math.isfinite(value) else 0.0
        pairs += [hi, float(np.float32(lo))]
    return tuple(pairs)


class _FusedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, valid, running_mean, running_var, renorm_mean, renorm_stddev, moving_stddev,
                dims, settings):
        n, rows, channels, positions, groups, strided = dims
        unbiased, update = settings[6:]
        renorm = renorm_mean is not None
        # One float64 allocation: mean, invstd, count of every (group, feature), then r and d per feature.
        saved = torch.empty(3 * groups * channels + 2 * channels, dtype=torch.float64, device=x.device)
        stats, rd = saved[:3 * groups * channels], saved[3 * groups * channels:]
        y = torch.empty_like(x)
        absent = stats  # any pointer: the constexpr flags keep the kernel from touching it
        _forward_kernel[(channels,)](
            x, y, absent if valid is None else valid, absent if weight is None else weight,
            absent if bias is None else bias, absent if running_mean is None else running_mean,
            absent if running_var is None else running_var, absent if not renorm else renorm_mean,
            absent if renorm_stddev is None else renorm_stddev, absent if moving_stddev is None else moving_stddev,
            stats, rd, groups, n // groups, rows, channels, positions,
            *_float32_pairs(tuple(float(value) for value in settings[:6])),
            STRIDED=bool(strided), HAS_MASK=valid is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, RENORM=renorm, UPDATE=bool(update) and running_mean is not None,
            UNBIASED=bool(unbiased), BLOCK=BLOCK)
        # (a copy of the mask, as the C++ kernel saves: the caller's may be refilled before the backward)
        ctx.save_for_backward(x, weight, None if valid is None else valid.clone(), stats, rd)
        ctx.dims = dims
        ctx.eps = float(settings[5])  # (for graph_backward)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, valid, stats, rd = ctx.saved_tensors
        n, rows, channels, positions, groups, strided = ctx.dims
        need_input = ctx.needs_input_grad[0]
        need_weight = weight is not None and ctx.needs_input_grad[1]
        need_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        if torch.is_grad_enabled():  # create_graph=True: the kernel's gradient has no graph; autograd's has
            return (*graph_backward(x, weight, valid, ctx.dims, ctx.eps, rd[:channels], rd[channels:], grad,
                                    (need_input, need_weight, need_bias)), *[None] * 8)
        grad = grad.contiguous()
        grad_input = torch.empty_like(x) if need_input else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty(channels, dtype=ctx.bias_dtype, device=x.device) if need_bias else None
        if need_input or need_weight or need_bias:
            _backward_kernel[(channels,)](
                x, grad, stats if valid is None else valid, stats if weight is None else weight, stats, rd,
                stats if grad_input is None else grad_input, stats if grad_weight is None else grad_weight,
                stats if grad_bias is None else grad_bias, groups, n // groups, rows, channels, positions,
                STRIDED=bool(strided), HAS_MASK=valid is not None, HAS_WEIGHT=weight is not None,
                NEED_INPUT=need_input, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, BLOCK=BLOCK)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def supported(x, weight, bias, valid, running_mean, running_var, renorm_mean, renorm_stddev, moving_stddev,
              dims, update=True) -> bool:
    """Whether the kernels take this call: a contiguous floating x, C-valued contiguous parameters and
    buffers on its device (float32 for float16/bfloat16 inputs, else x's dtype), every buffer the step
    needs (``normkit.kernels.complete_state``: an absent one's pointer is a placeholder), a boolean mask
    with one flag per (n, r, s), and at most ``MAX_PER_FEATURE`` values per feature."""
    if len(dims) != 6 or not x.is_contiguous() or x.dtype not in (torch.float32, torch.float64, *_HALF):
        return False
    if not complete_state(running_mean, running_var, renorm_mean, renorm_stddev, moving_stddev, update):
        return False
    n, rows, channels, positions, groups, _ = dims
    if x.numel() != n * rows * channels * positions or x.numel() >= 2 ** 31 or groups < 1 or n % groups:
        return False
    if n * rows * positions > MAX_PER_FEATURE:  # one program walks every group of its feature
        return False
    wanted = torch.float32 if x.dtype in _HALF else x.dtype
    for tensor in (weight, bias, running_mean, running_var, renorm_mean, renorm_stddev, moving_stddev):
        if tensor is not None and (tensor.device != x.device or tensor.dtype != wanted
                                   or tensor.numel() != channels or not tensor.is_contiguous()):
            return False
    if valid is not None and (valid.device != x.device or valid.dtype != torch.bool or not valid.is_contiguous()
                              or valid.numel() != n * rows * positions):
        return False
    return True


def fused_batch_norm(x, weight, bias, valid, running_mean, running_var, renorm_mean, renorm_stddev, moving_stddev,
                     dims, settings):
    """The normalized x (running buffers moved in place when training), or None when the call is not one
    the kernels take (nothing done): the contract of the C++ kernel's function of the same name."""
    if not supported(x, weight, bias, valid, running_mean, running_var, renorm_mean, renorm_stddev, moving_stddev,
                     dims, bool(settings[-1])):
        return None
    return _FusedBatchNorm.apply(x, weight, bias, valid, running_mean, running_var, renorm_mean, renorm_stddev,
                                 moving_stddev, list(dims), list(settings))
