"""NumPy float64 reference of every normalization in normkit, forward AND backward: the oracle of the tests.

This file is also the derivation for learners. It computes with NumPy alone (no torch call, so
it cannot share a bug with the code it checks; the package itself still needs torch installed);
functional.py is its PyTorch twin (same function names, same arguments, same order of steps; the
``*_backward`` functions have no twin there: its gradients come from autograd, and the tests check them
against these). docs/learn.md is a tutorial that walks through it with runnable, tested examples.

The one idea (../shared/DESIGN.md, beside the repository): a normalization is a choice of
*reduce axes* (where the statistics are taken), *parameter axes* (where gamma/beta live) and
*where the statistics come from* (this batch, or running averages). Every layer below is:

    count, mean, var = moments(x, reduce_axes, mask)         # biased, two-pass
    x_hat = (x - mean) / sqrt(var + eps)
    y     = x_hat * weight + bias

Backward, derived once (``normalize_backward``; docs/learn.md, section 3, derives the unmasked case with
the same names). With h = dL/dx_hat (weight * dL/dy), w the 0/1 mask (all ones without a mask), n = sum w
the number of valid positions of a group, and inv = 1/sqrt(var+eps); sums run over ALL positions of the
group, padded ones included, because a padded position's output is still normalized with the group's
statistics:

    dL/dmean = -inv * sum h                      (var's own dependence on mean is zero)
    dL/dvar  = -1/2 * inv^2 * sum h * x_hat
    dmean/dx_i = w_i / n,   dvar/dx_i = 2 w_i (x_i - mean) / n

    dL/dx_i  = inv * h_i + dL/dmean * dmean/dx_i + dL/dvar * dvar/dx_i
             = inv * (h_i - w_i / n * (sum h + x_hat_i * sum h * x_hat))

and, when the statistics are constants (eval mode), simply dL/dx = inv * h.

Padding rule (NaN or inf in padded positions that the loss ignores): a position whose h is exactly 0 adds
nothing to any sum, whatever x_hat holds there, and a padded position (w_i = 0) gets inv * h_i alone, the
other term selected away rather than multiplied by w_i = 0 (0 * NaN is NaN, and 0 * inf too). For finite
values this is the formula above exactly; a nonzero h at a NaN input still gives NaN, as the math does.
"""

from __future__ import annotations

import math

import numpy as np

from .axes import broadcast_shape, broadcasts_to, canonicalize_axes, complement
from .stats import (bessel_factor, check_adjustment, check_affine_size, check_eps, check_ghost_batch,
                    check_ghost_layout, check_momentum_given, check_normalized_shape, check_num_groups,
                    check_per_feature_sizes, check_renorm_clipping_bounds, check_renorm_state, check_virtual_batch_size,
                    ema_update)

# ----------------------------------------------------------------------------- statistics core


def moments(x, reduce_axes, mask=None):
    """Count, mean and biased variance of ``x`` over ``reduce_axes`` (kept as size-1 dims).

    .. math::
        n = \\sum_R w,\\quad \\mu = \\frac{1}{n}\\sum_R w\\,x,\\quad
        \\sigma^2 = \\frac{1}{n}\\sum_R w\\,(x-\\mu)^2

    ``mask`` (broadcastable to ``x``) marks the valid positions: any nonzero value (True, 1)
    is valid, 0 is padding, so w is 0 or 1 (a mask is not a weight: docs/decisions.md);
    without it every position counts; a masked position's value never enters (NaN or inf
    padding included). Two passes (mean first, then squared deviations) keep the variance accurate
    when the mean is large compared to the spread. A group with no valid position gets
    mean 0 and variance 0 (never NaN).
    """
    x = np.asarray(x, dtype=np.float64)
    if mask is None:
        # (the product of the reduced sizes, not x.size / mean.size: with no group at all, an empty batch of
        # per-sample statistics, that quotient divided by zero)
        size = float(np.prod([x.shape[axis] for axis in np.atleast_1d(reduce_axes)]))
        if size == 0:
            # Groups of no value: mean 0 and variance 0, as with a mask that leaves none (NumPy's mean of nothing
            # is NaN, with a RuntimeWarning; the functional twin's ATen refused the empty input)
            shape = x.sum(axis=reduce_axes, keepdims=True).shape
            return np.zeros(shape), np.zeros(shape), np.zeros(shape)
        mean = x.mean(axis=reduce_axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=reduce_axes, keepdims=True)
        return np.full(mean.shape, size), mean, var
    weights = _valid_weights(mask, x.shape)
    count = weights.sum(axis=reduce_axes, keepdims=True)
    safe_count = np.where(count > 0, count, 1.0)
    # where, not a product: a masked position may hold NaN or inf (padding), and 0 * NaN is NaN
    valid = weights != 0
    mean = (weights * np.where(valid, x, 0.0)).sum(axis=reduce_axes, keepdims=True) / safe_count
    var = (weights * np.where(valid, x - mean, 0.0) ** 2).sum(axis=reduce_axes, keepdims=True) / safe_count
    return count, mean, var


def _valid_weights(mask, shape):
    """The mask as 0/1 float64 of ``shape``: any nonzero value marks a valid position, as for the layers and the
    functional twin (taken as weights, a 0.5 counted half here where the layers count it whole)."""
    return np.broadcast_to(np.asarray(mask) != 0, shape).astype(np.float64)


def affine(x_hat, scale=None, offset=None):
    """``x_hat * scale + offset``; a missing scale is 1 and a missing offset 0."""
    y = x_hat if scale is None else x_hat * scale
    return y if offset is None else y + offset


def normalize(x, mean, var, eps, scale=None, offset=None):
    """``(x - mean) / sqrt(var + eps) * scale + offset`` (scale/offset broadcast-shaped or None)."""
    return affine((x - mean) / np.sqrt(var + eps), scale, offset)


def normalize_backward(grad_x_hat, x_hat, inv_std, reduce_axes, mask=None, batch_statistics=True):
    """dL/dx from h = dL/dx_hat (``grad_x_hat``), for statistics taken over ``reduce_axes`` (see the module docstring).

    The padding rule, with selections (``np.where``), not products with 0: a position whose gradient is
    exactly 0 adds nothing to ``sum h * x_hat`` whatever ``x_hat`` holds there (NaN or inf padding the loss
    ignores), and a padded position (mask 0) gets only its direct term ``inv * h``. Finite values: the same
    numbers as the plain formula; a nonzero gradient at a NaN input still gives NaN.
    """
    if not batch_statistics:
        return grad_x_hat * inv_std
    weights = np.ones_like(x_hat) if mask is None else _valid_weights(mask, x_hat.shape)
    count = weights.sum(axis=reduce_axes, keepdims=True)
    safe_count = np.where(count > 0, count, 1.0)
    sum_grad = grad_x_hat.sum(axis=reduce_axes, keepdims=True)
    with np.errstate(invalid="ignore"):  # (0 * inf is computed, then selected away)
        sum_grad_x_hat = np.where(grad_x_hat != 0, grad_x_hat * x_hat, 0.0).sum(axis=reduce_axes, keepdims=True)
        through_statistics = np.where(weights != 0, weights / safe_count * (sum_grad + x_hat * sum_grad_x_hat), 0.0)
    return inv_std * (grad_x_hat - through_statistics)


def _param(value, shape):
    return None if value is None else np.asarray(value, dtype=np.float64).reshape(shape)


def _sum_to(grad, shape):
    """Sum ``grad`` over the axes where ``shape`` (same rank) has size 1."""
    axes = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


# ----------------------------------------------------------------------------- batch norm


def ghost_view(x, virtual_batch_size, layout="strided"):
    """View a batch of B rows as V-row ghost batches; returns (view, member_axis, ghost_axis).

    ``strided`` (Keras): reshape to (V, B/V, ...), ghost batch j holds rows j, j + B/V, ...
    ``contiguous``: reshape to (B/V, V, ...), ghost batch g holds rows gV ... gV + V - 1.
    Statistics reduce over ``member_axis`` and keep ``ghost_axis``.
    """
    batch = x.shape[0]
    size = check_virtual_batch_size(virtual_batch_size)  # (0: "integer modulo by zero"; a float: reshape's error)
    check_ghost_layout(layout)  # (any layout but "strided" was taken as "contiguous")
    check_ghost_batch(batch, size)
    if layout == "strided":
        return x.reshape((size, batch // size) + x.shape[1:]), 0, 1
    return x.reshape((batch // size, size) + x.shape[1:]), 1, 0


def batch_statistics_view(x, feature_axes, mask=None, virtual_batch_size=None, ghost_layout="strided"):
    """The tensor, mask, reduce axes and ghost axis on which batch statistics are taken.

    Without ghost batches this is ``x`` itself reduced over every non-feature axis. With
    them, the batch axis splits into (member, ghost) and only the member axis is reduced.
    """
    ndim = x.ndim
    if virtual_batch_size is None:
        return x, mask, complement(feature_axes, ndim), None
    view, member_axis, ghost_axis = ghost_view(x, virtual_batch_size, ghost_layout)
    mask_view = None
    if mask is not None:
        # A mask of the input's rank may broadcast over the batch axis; ghost views split
        # that axis, so give it its real length first.
        mask = np.asarray(mask)
        mask_view = ghost_view(np.broadcast_to(mask, x.shape[:1] + mask.shape[1:]), virtual_batch_size, ghost_layout)[0]
    shifted = tuple(a + 1 for a in feature_axes)
    reduce_axes = tuple(i for i in range(ndim + 1) if i not in shifted and i != ghost_axis)
    return view, mask_view, reduce_axes, ghost_axis


def combine_ghost_statistics(count, mean, var, ghost_axis):
    """Batch-level mean and variance from per-ghost ones: count-weighted means over ghosts.

    Without a mask every ghost has the same count, so this is Keras' plain average of the
    per-ghost means and (biased) variances. Returns (total count, mean, mean variance).
    """
    if ghost_axis is None:
        return count, mean, var
    total = count.sum(axis=ghost_axis, keepdims=True)
    safe_total = np.where(total > 0, total, 1.0)
    combined_mean = (count * mean).sum(axis=ghost_axis, keepdims=True) / safe_total
    combined_var = (count * var).sum(axis=ghost_axis, keepdims=True) / safe_total
    return total, combined_mean, combined_var


def renorm_correction(mean, var, eps, renorm_mean, renorm_stddev, clipping):
    """Batch renormalization's r and d (treated as constants by the gradient).

    .. math::
        s = \\sqrt{\\sigma_B^2 + \\epsilon},\\quad \\hat s = \\max(s_{renorm}, \\sqrt\\epsilon),\\quad
        r = \\mathrm{clip}(s / \\hat s, r_{min}, r_{max}),\\quad
        d = \\mathrm{clip}((\\mu_B - \\mu_{renorm}) / \\hat s, -d_{max}, d_{max})

    computed from the renorm statistics *before* this step's update.
    """
    rmin, rmax, dmax = clipping
    stddev = np.sqrt(var + eps)
    safe_stddev = np.maximum(renorm_stddev, math.sqrt(eps))
    r = np.clip(stddev / safe_stddev, rmin, rmax)
    d = np.clip((mean - renorm_mean) / safe_stddev, -dmax, dmax)
    return r, d


def _batch_norm_parts(x, running_mean, running_var, weight, bias, training, eps, axis, mask,
                      virtual_batch_size, ghost_layout, renorm_mean, renorm_stddev, renorm_clipping,
                      adjustment, moving_stddev=None, updating=False):
    """Everything forward and backward need, computed once and in pipeline order (``updating``: the forward of a
    step that then moves the running statistics)."""
    x = np.asarray(x, dtype=np.float64)
    check_eps(eps)  # (as the functional twin: eps=0 divided by zero for a constant channel, a negative eps gave NaN)
    feature_axes = canonicalize_axes(axis, x.ndim)
    param_shape = broadcast_shape(feature_axes, x.shape)
    # Refused here, before anything moves (the functional twin, through ATen, refuses the same): a running_mean
    # without running_var was updated in place, then a TypeError; a running_var without running_mean was ignored.
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    check_per_feature_sizes((running_mean, running_var, weight, bias, renorm_mean, renorm_stddev, moving_stddev),
                            np.size, math.prod(param_shape), axis, x.shape)
    if mask is not None and (np.ndim(mask) != x.ndim or not broadcasts_to(np.shape(mask), x.shape)):
        raise ValueError(f"mask of shape {np.shape(mask)} does not fit the input of shape {x.shape}: reference.batch_norm "
                         "takes a mask of the input's rank that broadcasts to it (size 1 on the feature axes for padding, "
                         "or varying along them)")
    if renorm_mean is not None:
        check_renorm_clipping_bounds(renorm_clipping)
        check_renorm_state(renorm_mean, renorm_stddev, moving_stddev, updating)
    check_adjustment(adjustment)
    parts = {"feature_axes": feature_axes, "param_shape": param_shape}
    batch_stats = training or running_mean is None
    parts["batch_statistics"] = batch_stats
    if not batch_stats:
        mean, var = _param(running_mean, param_shape), _param(running_var, param_shape)
        parts.update(view=x, mask=None, reduce_axes=complement(feature_axes, x.ndim), ghost_axis=None,
                     mean=mean, var=var, count=None, r=None, d=None, adj_scale=None, adj_bias=None)
        parts["batch_mean"], parts["batch_var"] = mean, var
        return parts
    view, mask_view, reduce_axes, ghost_axis = batch_statistics_view(x, feature_axes, mask, virtual_batch_size, ghost_layout)
    count, mean, var = moments(view, reduce_axes, mask_view)
    total, batch_mean, batch_var = combine_ghost_statistics(count, mean, var, ghost_axis)
    parts.update(view=view, mask=mask_view, reduce_axes=reduce_axes, ghost_axis=ghost_axis,
                 virtual_batch_size=virtual_batch_size, ghost_layout=ghost_layout, count=count, mean=mean, var=var, total=total, batch_mean=batch_mean, batch_var=batch_var)
    parts["r"] = parts["d"] = None
    if renorm_mean is not None:
        r, d = renorm_correction(batch_mean.reshape(param_shape), batch_var.reshape(param_shape), eps,
                                 _param(renorm_mean, param_shape), _param(renorm_stddev, param_shape), renorm_clipping)
        parts["r"], parts["d"] = _to_view(r, parts), _to_view(d, parts)
    parts["adj_scale"] = parts["adj_bias"] = None
    if adjustment is not None:
        adj_scale, adj_bias = adjustment(x.shape)
        parts["adj_scale"] = _to_view(np.broadcast_to(np.asarray(adj_scale, np.float64), x.shape), parts, full=True)
        parts["adj_bias"] = _to_view(np.broadcast_to(np.asarray(adj_bias, np.float64), x.shape), parts, full=True)
    return parts


def _to_view(value, parts, full=False):
    """Reshape a param-shaped (or, with ``full``, input-shaped) array to the statistics view."""
    if parts["ghost_axis"] is None:
        return value
    if full:
        return ghost_view(value, parts["virtual_batch_size"], parts["ghost_layout"])[0]
    return np.expand_dims(value, 0)


def _view_param(value, parts):
    return None if value is None else _to_view(_param(value, parts["param_shape"]), parts)


def _pre_affine(parts, x_hat):
    """x_hat after renorm and adjustment, before weight and bias."""
    z = x_hat
    if parts.get("r") is not None:
        z = z * parts["r"] + parts["d"]
    if parts.get("adj_scale") is not None:
        z = z * parts["adj_scale"] + parts["adj_bias"]
    return z


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, mask=None, virtual_batch_size=None,
               ghost_layout="strided", unbiased_running_var=True, renorm_mean=None, renorm_stddev=None,
               moving_stddev=None, renorm_clipping=(0.0, math.inf, math.inf), renorm_momentum=0.01,
               adjustment=None):
    """Batch normalization over every axis but ``axis``; updates running buffers in place.

    .. math::
        y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\,\\gamma + \\beta

    Statistics: the batch's (biased) mean and variance when ``training`` or when there
    are no running buffers; the running buffers otherwise. In training, buffers move by
    ``momentum`` (the weight of the new value) toward the batch mean and the batch
    variance, unbiased (``n/(n-1)``) when ``unbiased_running_var`` as PyTorch does.

    Options, each one stage of the pipeline:
      * ``mask``: positions with mask 0 do not count in the statistics; channels with no
        valid position leave their running statistics unchanged.
      * ``virtual_batch_size``: statistics per ghost batch (see ``ghost_view``); running
        statistics move toward the average of the per-ghost statistics, once per step.
      * renorm (``renorm_mean`` given): ``y = ((x_hat * r + d) [* a + b]) * gamma + beta``;
        ``moving_stddev`` is averaged and ``running_var = max(moving_stddev^2 - eps, 0)``.
      * ``adjustment(shape) -> (a, b)``: extra scale and shift wherever batch statistics
        are used (layers pass it in training only), after renorm and before gamma/beta.

    ``momentum`` is a number. ``momentum=None`` is refused with a TypeError, in eval too, as
    torch.nn.functional.batch_norm and the functional twin refuse it: None is the layers'
    cumulative average, which they pass as ``1 / t`` at the t-th tracked batch
    (``stats.momentum_factor``).
    """
    check_eps(eps)
    check_momentum_given(momentum)
    parts = _batch_norm_parts(x, running_mean, running_var, weight, bias, training, eps, axis, mask,
                              virtual_batch_size, ghost_layout, renorm_mean, renorm_stddev, renorm_clipping,
                              adjustment, moving_stddev, updating=training and running_mean is not None)
    view = parts["view"]
    x_hat = (view - parts["mean"]) / np.sqrt(parts["var"] + eps)
    z = _pre_affine(parts, x_hat)
    y = affine(z, _view_param(weight, parts), _view_param(bias, parts))
    y = y.reshape(np.shape(x))
    # (an empty batch carries no statistics: the buffers stay, as the layers keep them, not the NaN mean of nothing)
    if training and running_mean is not None and np.size(x) > 0:
        update_batch_norm_running_stats(parts, running_mean, running_var, momentum, eps, unbiased_running_var,
                                        renorm_mean, renorm_stddev, moving_stddev, renorm_momentum)
    return y


def update_batch_norm_running_stats(parts, running_mean, running_var, momentum, eps, unbiased_running_var,
                                    renorm_mean=None, renorm_stddev=None, moving_stddev=None, renorm_momentum=0.01):
    """The one place where BN's running statistics change (in place)."""
    shape = np.shape(running_mean)
    total = parts["total"].reshape(shape)
    batch_mean = parts["batch_mean"].reshape(shape)
    batch_var = parts["batch_var"].reshape(shape)
    if unbiased_running_var:
        per_group = parts["var"] * bessel_factor(parts["count"])
        batch_var_estimate = combine_ghost_statistics(parts["count"], parts["mean"], per_group, parts["ghost_axis"])[2]
        batch_var_estimate = batch_var_estimate.reshape(shape)
    else:
        batch_var_estimate = batch_var
    # Channels that saw no valid value (everything masked) keep their running statistics.
    factor = momentum * (total > 0)
    if renorm_mean is not None:
        renorm_factor = renorm_momentum * (total > 0)
        ema_update(renorm_mean, batch_mean, renorm_factor)
        ema_update(renorm_stddev, np.sqrt(batch_var + eps), renorm_factor)
        ema_update(running_mean, batch_mean, factor)
        ema_update(moving_stddev, np.sqrt(batch_var_estimate + eps), factor)
        # running_var follows moving_stddev, on the channels that saw something (a fully masked
        # channel keeps it, even where Keras' initial values, both 1, are not yet related).
        derived = np.maximum(np.reshape(moving_stddev, shape) ** 2 - eps, 0.0)  # (in running_mean's shape)
        running_var[...] = np.where(total > 0, derived, np.reshape(running_var, shape)).reshape(np.shape(running_var))
        return
    ema_update(running_mean, batch_mean, factor)
    ema_update(running_var, batch_var_estimate, factor)


def batch_norm_backward(grad_output, x, running_mean=None, running_var=None, weight=None, bias=None,
                        training=False, eps=1e-5, *, axis=1, mask=None, virtual_batch_size=None,
                        ghost_layout="strided", renorm_mean=None, renorm_stddev=None,
                        renorm_clipping=(0.0, math.inf, math.inf), adjustment=None):
    """(dL/dx, dL/dweight, dL/dbias) of ``batch_norm`` with the same arguments (buffers before the step)."""
    parts = _batch_norm_parts(x, running_mean, running_var, weight, bias, training, eps, axis, mask,
                              virtual_batch_size, ghost_layout, renorm_mean, renorm_stddev, renorm_clipping,
                              adjustment)
    view = parts["view"]
    inv_std = 1.0 / np.sqrt(parts["var"] + eps)
    x_hat = (view - parts["mean"]) * inv_std
    grad = np.asarray(grad_output, dtype=np.float64).reshape(view.shape)
    # (the padding rule: a position with gradient 0 adds nothing, whatever its x_hat; see normalize_backward)
    with np.errstate(invalid="ignore"):
        grad_times_z = np.where(grad != 0, grad * _pre_affine(parts, x_hat), 0.0)
    grad_weight = None if weight is None else _sum_to(grad_times_z, _view_param_shape(parts))
    grad_bias = None if bias is None else _sum_to(grad, _view_param_shape(parts))
    grad_z = grad if weight is None else grad * _view_param(weight, parts)
    if parts["adj_scale"] is not None:
        grad_z = grad_z * parts["adj_scale"]
    grad_x_hat = grad_z if parts["r"] is None else grad_z * parts["r"]
    grad_x = normalize_backward(grad_x_hat, x_hat, inv_std, parts["reduce_axes"], parts["mask"],
                                parts["batch_statistics"])
    reshape = (lambda g, param: None if g is None else g.reshape(np.shape(param)))
    return grad_x.reshape(np.shape(x)), reshape(grad_weight, weight), reshape(grad_bias, bias)


def _view_param_shape(parts):
    shape = parts["param_shape"]
    return shape if parts["ghost_axis"] is None else (1,) + tuple(shape)


# ----------------------------------------------------------------------------- layer / instance / group norm


def _check_affine_sizes(param_shape, weight, bias):
    """weight and bias hold one value per parameter position (else numpy's "cannot reshape array of size 4 into
    shape (1,1,3,1)", as the functional twins' ATen names them)."""
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            check_affine_size(name, np.size(value), math.prod(param_shape))


def _norm_over(x, reduce_axes, param_shape, weight, bias, eps):
    _check_affine_sizes(param_shape, weight, bias)
    count, mean, var = moments(x, reduce_axes)
    return normalize(x, mean, var, eps, _param(weight, param_shape), _param(bias, param_shape))


def _norm_over_backward(grad_output, x, reduce_axes, param_shape, weight, bias, eps):
    x = np.asarray(x, dtype=np.float64)
    _check_affine_sizes(param_shape, weight, bias)
    _, mean, var = moments(x, reduce_axes)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean) * inv_std
    grad = np.asarray(grad_output, dtype=np.float64)
    grad_weight = None if weight is None else _sum_to(grad * x_hat, param_shape).reshape(np.shape(weight))
    grad_bias = None if bias is None else _sum_to(grad, param_shape).reshape(np.shape(bias))
    grad_x_hat = grad if weight is None else grad * _param(weight, param_shape)
    return normalize_backward(grad_x_hat, x_hat, inv_std, reduce_axes), grad_weight, grad_bias


def _layer_norm_geometry(x, normalized_shape):
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    check_normalized_shape(normalized_shape, x.shape)  # (one dim at least, the input's last ones)
    k = len(normalized_shape)
    reduce_axes = tuple(range(x.ndim - k, x.ndim))
    param_shape = (1,) * (x.ndim - k) + normalized_shape
    return reduce_axes, param_shape


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalize each sample over its trailing ``normalized_shape`` axes; parameters over the same axes.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\gamma + \\beta
    """
    x = np.asarray(x, dtype=np.float64)
    check_eps(eps)
    reduce_axes, param_shape = _layer_norm_geometry(x, normalized_shape)
    return _norm_over(x, reduce_axes, param_shape, weight, bias, eps)


def layer_norm_backward(grad_output, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """(dL/dx, dL/dweight, dL/dbias) of ``layer_norm``: ``normalize_backward`` per sample."""
    x = np.asarray(x, dtype=np.float64)
    check_eps(eps)
    reduce_axes, param_shape = _layer_norm_geometry(x, normalized_shape)
    return _norm_over_backward(grad_output, x, reduce_axes, param_shape, weight, bias, eps)


def _group_view(x, num_groups):
    """(N, C, *S) -> (N, G, C/G, *S); statistics reduce over (C/G, *S)."""
    check_num_groups(num_groups, x.shape)
    n, c = x.shape[:2]
    view = x.reshape((n, num_groups, c // num_groups) + x.shape[2:])
    return view, tuple(range(2, view.ndim)), (1, num_groups, c // num_groups) + (1,) * (x.ndim - 2)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Normalize each sample over groups of C/G channels and all spatial positions; gamma/beta per channel."""
    x = np.asarray(x, dtype=np.float64)
    check_eps(eps)
    view, reduce_axes, param_shape = _group_view(x, num_groups)
    return _norm_over(view, reduce_axes, param_shape, weight, bias, eps).reshape(x.shape)


def group_norm_backward(grad_output, x, num_groups, weight=None, bias=None, eps=1e-5):
    """(dL/dx, dL/dweight, dL/dbias) of ``group_norm``: ``normalize_backward`` per sample and group."""
    x = np.asarray(x, dtype=np.float64)
    check_eps(eps)
    view, reduce_axes, param_shape = _group_view(x, num_groups)
    grad_view = np.asarray(grad_output, dtype=np.float64).reshape(view.shape)
    grad_x, grad_weight, grad_bias = _norm_over_backward(grad_view, view, reduce_axes, param_shape, weight, bias, eps)
    return grad_x.reshape(x.shape), grad_weight, grad_bias


def _check_instance_norm_arguments(x, use_input_stats, running_mean, running_var, weight, bias):
    """Refused before anything moves, as the functional twin refuses: half a pair of running statistics (running_mean
    alone was updated in place, then "unsupported operand type(s) for -: 'float' and 'NoneType'"; running_var alone
    was ignored), and a per-channel tensor of another size (a 4-value weight for 3 channels failed in numpy's reshape
    after the running statistics had moved)."""
    if x.ndim < 2:
        raise ValueError(f"instance_norm needs an (N, C, *) input, got shape {x.shape}")
    if not use_input_stats and (running_mean is None or running_var is None):
        raise ValueError("use_input_stats=False normalizes with running_mean and running_var: pass both, or "
                         "use_input_stats=True")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    check_per_feature_sizes((running_mean, running_var, weight, bias), np.size, x.shape[1], 1, x.shape,
                            unit="channels")


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    """Normalize each sample and channel over its spatial positions; running stats optional.

    With running buffers and ``use_input_stats``, they move toward the mean over samples
    of the per-instance means and unbiased variances (PyTorch's rule). Without
    ``use_input_stats`` the running statistics normalize every instance.

    ``momentum=None`` is refused with a TypeError, as in ``batch_norm``: pass a number (the
    layers pass 0.0 for their momentum=None, torch.nn's rule: the running statistics stay).
    """
    x = np.asarray(x, dtype=np.float64)
    check_eps(eps)
    check_momentum_given(momentum)
    _check_instance_norm_arguments(x, use_input_stats, running_mean, running_var, weight, bias)
    n, c = x.shape[:2]
    reduce_axes = tuple(range(2, x.ndim))
    param_shape = (1, c) + (1,) * (x.ndim - 2)
    if x.size == 0:
        return x.copy()  # no instance, no statistics: the running ones stay as they are
    if not use_input_stats:
        return normalize(x, _param(running_mean, param_shape), _param(running_var, param_shape), eps,
                         _param(weight, param_shape), _param(bias, param_shape))
    count, mean, var = moments(x, reduce_axes)
    if running_mean is not None:
        ema_update(running_mean, mean.reshape(n, c).mean(axis=0), momentum)
        ema_update(running_var, (var * bessel_factor(count)).reshape(n, c).mean(axis=0), momentum)
    return normalize(x, mean, var, eps, _param(weight, param_shape), _param(bias, param_shape))


def instance_norm_backward(grad_output, x, running_mean=None, running_var=None, weight=None, bias=None,
                           use_input_stats=True, eps=1e-5):
    """(dL/dx, dL/dweight, dL/dbias) of ``instance_norm`` (eval with running statistics: affine)."""
    x = np.asarray(x, dtype=np.float64)
    check_eps(eps)
    _check_instance_norm_arguments(x, use_input_stats, running_mean, running_var, weight, bias)
    c = x.shape[1]
    reduce_axes = tuple(range(2, x.ndim))
    param_shape = (1, c) + (1,) * (x.ndim - 2)
    if use_input_stats:
        return _norm_over_backward(grad_output, x, reduce_axes, param_shape, weight, bias, eps)
    return batch_norm_backward(grad_output, x, running_mean, running_var, weight, bias, False, eps, axis=1)
