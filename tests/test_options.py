"""normkit.BatchNorm's options against the NumPy reference, over several training steps.

Renorm, ghost batches, masks, adjustment, frozen mode, initializers, regularizers, constraints,
synchronized."""

import functools
import io
import math
import sys
import warnings

import numpy as np
import pytest
import torch

import normkit
import normkit.kernels
import normkit.keras
from normkit import reference as R

from oracle import assert_close, assert_same_training_steps, assert_training_step, to_numpy

# Every test runs on ATen's paths and again through normkit.kernels' fused kernel (conftest.py).
pytestmark = pytest.mark.usefixtures("execution")


def _reference_state(layer):
    state = {"running_mean": to_numpy(layer.running_mean), "running_var": to_numpy(layer.running_var)}
    if layer.renorm:
        for name in ("moving_stddev", "renorm_mean", "renorm_stddev"):
            state[name] = to_numpy(getattr(layer, name))
    return state


def _keras_bounds(clipping, step):
    """(rmin, rmax, dmax) of a Keras ``renorm_clipping`` dict at training step ``step``, by Keras' rule: a key that
    is absent (or a dict that is None) does not clip, a callable is evaluated at the step. The reference's bounds
    come from here, not from the layer's own parsing (RenormClipping.at), which they are to check."""
    clipping = clipping or {}

    def bound(key, default):
        value = clipping.get(key, default)
        return value(step) if callable(value) else value

    return bound("rmin", 0.0), bound("rmax", math.inf), bound("dmax", math.inf)


def _compare_steps(layer, shape, rng, steps=3, mask_fn=None, dtype=torch.float64, reference_mask=None,
                   clipping=None, **reference_kwargs):
    """``steps`` training steps of ``layer`` against the reference: outputs, every gradient, every buffer.

    ``mask_fn(rng)`` draws the layer's mask; ``reference_mask(mask)`` says where its features go for the
    reference (default: a trailing feature axis when ``axis=-1``, else the mask as it is). ``clipping``: the
    ``renorm_clipping`` dict the layer was built with (the reference's bounds, by _keras_bounds)."""
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(rng.uniform(0.5, 1.5, size=layer.weight.shape)))
        layer.bias.copy_(torch.as_tensor(rng.normal(size=layer.bias.shape)))
    state = _reference_state(layer)
    w, b = to_numpy(layer.weight), to_numpy(layer.bias)
    for step in range(steps):
        x_np = rng.normal(size=shape) * (step + 1) + step
        g_np = rng.normal(size=shape)
        mask = None if mask_fn is None else mask_fn(rng)
        x = torch.tensor(x_np, dtype=dtype, requires_grad=True)
        layer.zero_grad()
        y = layer(x, mask=None if mask is None else torch.as_tensor(mask))
        y.backward(torch.tensor(g_np, dtype=dtype))
        kwargs = dict(reference_kwargs)
        if mask is not None:
            kwargs["mask"] = (reference_mask(mask) if reference_mask is not None
                              else np.expand_dims(mask, -1) if layer.axis == -1 else mask)
        if layer.renorm:
            kwargs.update(renorm_mean=state["renorm_mean"], renorm_stddev=state["renorm_stddev"],
                          renorm_clipping=_keras_bounds(clipping, step))
        grads = R.batch_norm_backward(g_np, x_np, state["running_mean"], state["running_var"], w, b, True, layer.eps,
                                      axis=layer.axis, **kwargs)
        if layer.renorm:
            kwargs.update(moving_stddev=state["moving_stddev"], renorm_momentum=layer.renorm_momentum)
        expected = R.batch_norm(x_np, state["running_mean"], state["running_var"], w, b, True, layer.momentum,
                                layer.eps, axis=layer.axis, unbiased_running_var=layer.unbiased_running_var, **kwargs)
        assert_training_step(layer, y, x.grad, expected, grads, state, dtype)
    return layer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# (32, 4, 16, 16): large enough for the statistics from per-position columns (functional._moments_by_position)
@pytest.mark.parametrize("shape,axis", [((8, 3), 1), ((4, 3, 5, 2), 1), ((4, 5, 2, 3), -1), ((32, 4, 16, 16), 1)])
@pytest.mark.parametrize("clipping", [None, {"rmax": 1.2, "rmin": 0.8, "dmax": 0.3},
                                      {"rmax": lambda t: 1.0 + t, "dmax": lambda t: 0.5 * t}])
def test_renorm(dtype, shape, axis, clipping, rng):
    layer = normkit.BatchNorm(shape[axis], axis=axis, renorm=True, renorm_clipping=clipping, renorm_momentum=0.3,
                              momentum=0.2, eps=1e-3)
    _compare_steps(layer, shape, rng, dtype=dtype, clipping=clipping)


# Inputs of FOLDED_MIN_NUMEL values or more take _FoldedBatchNorm (one statistics pass, ATen's
# backward from saved statistics); smaller ones ATen's training kernel. Both against the reference:
# Features-last ghost batches of rank 3 or more take the (V, G, S, K) view of _ghost_positions (no copy).
LARGE = [((32, 8, 8, 8), 1, 4), ((16, 8, 8, 16), -1, 2), ((16, 4, 4, 4, 16), (1, 4), 4), ((32, 32, 16), -1, 8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,axis,virtual", LARGE)
@pytest.mark.parametrize("option", ["renorm", "ghost", "renorm+ghost"])
def test_large_inputs_take_the_folded_execution(option, shape, axis, virtual, dtype, rng):
    assert math.prod(shape) >= normkit.functional.FOLDED_MIN_NUMEL
    features = shape[axis] if isinstance(axis, int) else tuple(shape[a] for a in axis)
    renorm = "renorm" in option
    virtual = virtual if "ghost" in option else None
    clipping = {"rmax": 1.1, "rmin": 0.9, "dmax": 0.2} if renorm else None
    layer = normkit.BatchNorm(features, axis=axis, renorm=renorm, renorm_clipping=clipping,
                              virtual_batch_size=virtual, momentum=0.2)
    kwargs = {} if virtual is None else {"virtual_batch_size": virtual}
    _compare_steps(layer, shape, rng, steps=2, dtype=dtype, clipping=clipping, **kwargs)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (32, 8, 8, 8)])  # below and above FOLDED_MIN_NUMEL
def test_renorm_ghost_without_affine(shape, rng):
    clipping = {"rmax": 1.1, "rmin": 0.9, "dmax": 0.2}
    layer = normkit.BatchNorm(shape[1], affine=False, renorm=True, virtual_batch_size=2, renorm_clipping=clipping,
                              momentum=0.2).double()
    layer.renorm_mean.fill_(0.5)
    layer.renorm_stddev.fill_(1.5)
    state = _reference_state(layer)
    x_np, g_np = rng.normal(size=shape) * 2 + 1, rng.normal(size=shape)
    x = torch.tensor(x_np, requires_grad=True)
    y = layer(x)
    y.backward(torch.tensor(g_np))
    kwargs = dict(virtual_batch_size=2, renorm_mean=state["renorm_mean"], renorm_stddev=state["renorm_stddev"],
                  renorm_clipping=_keras_bounds(clipping, 0))
    grad_x = R.batch_norm_backward(g_np, x_np, state["running_mean"], state["running_var"], None, None, True, 1e-5,
                                   **kwargs)[0]
    expected = R.batch_norm(x_np, state["running_mean"], state["running_var"], None, None, True, 0.2, 1e-5,
                            moving_stddev=state["moving_stddev"], renorm_momentum=0.01, **kwargs)
    assert_close(y, expected)
    assert_close(x.grad, grad_x)
    for name, value in state.items():
        assert_close(getattr(layer, name), value, err_msg=name)


def test_renorm_stddev_floor_is_sqrt_eps(rng):
    """r and d divide by max(renorm_stddev, sqrt(eps)): a renorm stddev below the floor (set by hand, or
    loaded) must not blow them up. (The buffer starts at 1 and follows sqrt(var + eps) >= sqrt(eps), so
    only a set value reaches the floor.)"""
    layer = normkit.BatchNorm(3, renorm=True, eps=1e-3, momentum=0.2)
    layer.renorm_stddev.fill_(1e-3)  # below sqrt(1e-3) = 0.0316
    _compare_steps(layer, (8, 3), rng, steps=1)


@pytest.mark.parametrize("clipping", [{"rmin": 0.95}, {"dmax": 0.1}, {"rmax": 1.05}])
def test_renorm_clipping_with_one_bound(clipping, rng):
    """Each bound clips on its own (Keras: a key that is absent does not clip): r far below 1 (renorm stddev 5
    against batch stddevs of 1-3), d far from 0, so every bound given bites."""
    layer = normkit.BatchNorm(3, renorm=True, renorm_clipping=clipping, eps=1e-3)
    layer.renorm_stddev.fill_(5.0)
    layer.renorm_mean.fill_(-3.0)
    _compare_steps(layer, (8, 3), rng, steps=2, clipping=clipping)


def test_renorm_inference_equals_plain_batch_norm(rng):
    renorm, plain = normkit.BatchNorm(3, renorm=True), normkit.BatchNorm(3)
    for _ in range(4):
        renorm(torch.randn(16, 3) * 3 + 2)
    plain.load_state_dict({k: v for k, v in renorm.state_dict().items() if k in plain.state_dict()})
    x = torch.randn(5, 3)
    torch.testing.assert_close(renorm.eval()(x), plain.eval()(x))
    torch.testing.assert_close(torch.sqrt(renorm.running_var + renorm.eps), renorm.moving_stddev)


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
@pytest.mark.parametrize("shape,axis,virtual", [((6, 2), 1, 3), ((8, 3, 4, 4), 1, 2), ((8, 4, 4, 3), -1, 4),
                                                ((6, 3, 2, 2, 4), (1, 4), 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ghost_batches(layout, shape, axis, virtual, dtype, rng):
    features = shape[axis] if isinstance(axis, int) else tuple(shape[a] for a in axis)
    layer = normkit.BatchNorm(features, axis=axis, virtual_batch_size=virtual, ghost_layout=layout, momentum=0.2)
    _compare_steps(layer, shape, rng, virtual_batch_size=virtual, ghost_layout=layout, dtype=dtype)


def test_ghost_strided_groups_are_keras_rows(rng):
    """Strided ghost batch j holds rows j, j + B/V, ...: normalizing those rows alone gives the same output."""
    x = torch.tensor(rng.normal(size=(6, 2)))
    y = normkit.BatchNorm(2, virtual_batch_size=3).double()(x)
    for j in range(2):
        rows = x[j::2]
        torch.testing.assert_close(y[j::2], normkit.BatchNorm(2).double()(rows))
    y = normkit.BatchNorm(2, virtual_batch_size=3, ghost_layout="contiguous").double()(x)
    torch.testing.assert_close(y[:3], normkit.BatchNorm(2).double()(x[:3]))


@pytest.mark.parametrize("shape", [(1, 2, 2, 2), (4, 3, 2, 2)])
def test_one_ghost_batch_on_channels_last_data(shape, rng):
    """virtual_batch_size = batch size on channels_last memory (a batch of one hit a torch 2.13 bug
    in the CPU backward of a reshaped view): the reference's output, gradients and buffers."""
    layer = normkit.BatchNorm(shape[1], virtual_batch_size=shape[0], momentum=0.3).double()
    x_np, g_np = rng.normal(size=shape) * 2 + 1, rng.normal(size=shape)
    state = {"running_mean": to_numpy(layer.running_mean), "running_var": to_numpy(layer.running_var)}
    x = torch.tensor(x_np).to(memory_format=torch.channels_last).requires_grad_()
    y = layer(x)
    y.backward(torch.tensor(g_np))
    grads = R.batch_norm_backward(g_np, x_np, state["running_mean"], state["running_var"], to_numpy(layer.weight),
                                  to_numpy(layer.bias), True, layer.eps, virtual_batch_size=shape[0])
    expected = R.batch_norm(x_np, state["running_mean"], state["running_var"], to_numpy(layer.weight),
                            to_numpy(layer.bias), True, 0.3, layer.eps, virtual_batch_size=shape[0])
    assert_training_step(layer, y, x.grad, expected, grads, state)


@pytest.mark.parametrize("x_grad", [False, True])
def test_ghost_batches_of_a_permuted_input_with_size_one_dims(x_grad, rng):
    """Ghost batches of one row on (2, 1, 4, 1) data laid out by a permute (strides (1, 8, 2, 1)): the ghost reshape
    kept odd strides on its size-1 dims and ATen's CPU backward gave gamma's gradient the wrong sign when the input
    needed no gradient (found by tools/fuzz_batch_norm.py --family layouts). The reference's output and gradients."""
    shape = (2, 1, 4, 1)
    x_np, g_np = rng.normal(size=shape), rng.normal(size=shape)
    layer = normkit.BatchNorm(1, virtual_batch_size=1).double()
    x = torch.tensor(x_np).permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3).requires_grad_(x_grad)
    assert x.stride() == (1, 8, 2, 1)
    y = layer(x)
    got = torch.autograd.grad(y, [x, layer.weight, layer.bias] if x_grad else [layer.weight, layer.bias],
                              torch.tensor(g_np))
    args = (np.zeros(1), np.ones(1), to_numpy(layer.weight), to_numpy(layer.bias), True)
    grads = R.batch_norm_backward(g_np, x_np, *args, layer.eps, virtual_batch_size=1)
    assert_close(y, R.batch_norm(x_np, *args, 0.1, layer.eps, virtual_batch_size=1))
    for g, want in zip(got, grads if x_grad else grads[1:]):
        assert_close(g, want)


def test_virtual_batch_equal_to_batch_is_plain_batch_norm(rng):
    x = torch.tensor(rng.normal(size=(8, 3, 2)))
    ghost, plain = normkit.BatchNorm(3, virtual_batch_size=8).double(), normkit.BatchNorm(3).double()
    torch.testing.assert_close(ghost(x), plain(x))
    torch.testing.assert_close(ghost.running_var, plain.running_var)


@pytest.mark.parametrize("shape,axis", [((4, 6, 3), -1), ((4, 3, 6), 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masks(shape, axis, dtype, rng):
    mask_shape = (shape[0], shape[1] if axis == -1 else shape[2])

    def mask_fn(rng):
        mask = rng.uniform(size=mask_shape) > 0.3
        mask[0, 0] = True
        return mask

    layer = normkit.BatchNorm(shape[axis], axis=axis, momentum=0.3)
    # (N, C, T) with a (N, T) mask: the mask gets the feature axis inserted at 1.
    reference_mask = (lambda mask: mask[:, None, :]) if axis == 1 else None
    _compare_steps(layer, shape, rng, mask_fn=mask_fn, dtype=dtype, reference_mask=reference_mask)


# (shape, axis, virtual_batch_size, ghost_layout, whether the mask varies along the features)
COMPOSITE_MASKS = {"feature mask": ((4, 6, 3), -1, None, "strided", True),
                   "ghost+padding mask": ((8, 5, 3), -1, 4, "strided", False),
                   "ghost+feature mask": ((8, 3, 4), 1, 2, "contiguous", True)}


@pytest.mark.parametrize("case", list(COMPOSITE_MASKS))
def test_masks_that_vary_along_the_features_or_meet_ghost_batches(case, rng):
    """The composite execution (closed-form masked gradient, count-weighted ghost statistics) against the
    reference. (test_kernels' random cases reach it too, but only where the C++ kernel builds.)"""
    shape, axis, virtual, layout, per_feature = COMPOSITE_MASKS[case]
    mask_shape = shape if per_feature else tuple(size for i, size in enumerate(shape) if i != axis % len(shape))
    layer = normkit.BatchNorm(shape[axis], axis=axis, virtual_batch_size=virtual, ghost_layout=layout, momentum=0.3)
    kwargs = {} if virtual is None else {"virtual_batch_size": virtual, "ghost_layout": layout}
    _compare_steps(layer, shape, rng, mask_fn=lambda rng: rng.uniform(size=mask_shape) > 0.4,
                   reference_mask=(lambda mask: mask) if per_feature else None, **kwargs)


@pytest.mark.parametrize("shape,axis", [((4, 3, 2, 5), (1, 2)), ((4, 5, 3, 2), (2, 3)), ((4, 3, 5, 2), (1, 3))])
def test_masks_with_several_feature_axes(shape, axis, rng):
    """A mask over the non-feature axes gets a size-1 axis at each feature axis (inserted in increasing order,
    so each lands where the input has it); against the reference with the mask expanded by NumPy."""
    mask_shape = tuple(size for i, size in enumerate(shape) if i not in axis)

    def mask_fn(rng):
        mask = rng.uniform(size=mask_shape) > 0.3
        mask[0, 0] = True
        return mask

    layer = normkit.BatchNorm(tuple(shape[a] for a in axis), axis=axis, momentum=0.3)
    _compare_steps(layer, shape, rng, mask_fn=mask_fn, reference_mask=lambda mask: np.expand_dims(mask, axis))


@pytest.mark.parametrize("shape,axis", [((4, 3, 2, 5), (1, 2)), ((4, 5, 2, 3), (-2, -1))])
def test_an_int_num_features_with_several_feature_axes_counts_their_product(shape, axis, rng):
    """num_features=6 over feature axes of sizes 3 and 2: one flat (6,) weight and buffers for the 3 x 2 features,
    as the reference reshapes them."""
    _compare_steps(normkit.BatchNorm(6, axis=axis, momentum=0.3), shape, rng)


@pytest.mark.parametrize("shape", [(3, 4, 5, 3), (2, 3, 4, 2, 3)])  # channels-last images and volumes
@pytest.mark.parametrize("renorm", [False, True])
def test_masks_on_channels_last_inputs(shape, renorm, rng):
    # Features last at rank 4/5 run as ATen's channels_last view; the padding-mask path turns it into rows.
    def mask_fn(rng):
        mask = rng.uniform(size=shape[:-1]) > 0.3
        mask.flat[0] = True
        return mask

    clipping = {"rmax": 1.1, "rmin": 0.9, "dmax": 0.2} if renorm else None
    layer = normkit.BatchNorm(shape[-1], axis=-1, momentum=0.3, renorm=renorm, renorm_clipping=clipping)
    _compare_steps(layer, shape, rng, mask_fn=mask_fn, clipping=clipping)


def test_masked_batch_equals_unpadded_rows(rng):
    """Padding a (N, T, C) batch changes nothing: statistics and valid outputs are those of the valid rows."""
    lengths = [5, 2, 4]
    x = torch.tensor(rng.normal(size=(3, 5, 4)))
    mask = torch.tensor([[t < n for t in range(5)] for n in lengths])
    padded = x.masked_fill(~mask[..., None], 123.0)
    masked_layer, plain = normkit.BatchNorm(4, axis=-1).double(), normkit.BatchNorm1d(4).double()
    y = masked_layer(padded, mask=mask)
    y_plain = plain(x[mask])
    torch.testing.assert_close(y[mask], y_plain)
    torch.testing.assert_close(masked_layer.running_mean, plain.running_mean)
    torch.testing.assert_close(masked_layer.running_var, plain.running_var)


def test_a_float_mask_counts_every_nonzero_position_as_keras_3_does(rng):
    """Keras 3 casts the mask to bool: 0.3 marks a valid position as 1.0 does (not a weight of 0.3, not padding).
    Oracle: the NumPy reference given the boolean mask, output and running statistics."""
    x = rng.normal(size=(4, 6, 3)) * 2 + 1
    weights = np.where(rng.random((4, 6)) < 0.4, 0.0, rng.choice([0.3, 1.0, 2.5], size=(4, 6)))
    layer = normkit.BatchNorm(3, axis=-1, momentum=0.5).double()
    y = layer(torch.tensor(x), mask=torch.tensor(weights))
    running_mean, running_var = np.zeros(3), np.ones(3)
    expected = R.batch_norm(x, running_mean, running_var, np.ones(3), np.zeros(3), True, 0.5, 1e-5, axis=-1,
                            mask=(weights != 0)[..., None])
    assert_close(y, expected)
    assert_close(layer.running_mean, running_mean)
    assert_close(layer.running_var, running_var)
    # normkit.functional takes such a mask as it is (the layer hands it a boolean one)
    buffers = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = normkit.functional.batch_norm(torch.tensor(x), *buffers, None, None, True, 0.5, 1e-5, axis=-1,
                                      mask=torch.tensor(weights)[..., None])
    assert_close(y, expected)
    assert_close(buffers[0], running_mean)


def test_fully_masked_batch_is_finite_and_keeps_running_statistics():
    layer = normkit.BatchNorm(3, axis=-1)
    layer(torch.randn(4, 5, 3))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(torch.randn(4, 5, 3), mask=torch.zeros(4, 5, dtype=torch.bool))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(layer.running_mean, before["running_mean"])
    torch.testing.assert_close(layer.running_var, before["running_var"])


@pytest.mark.parametrize("per_feature", [False, True])
def test_unseen_renorm_channels_keep_every_buffer(per_feature):
    """Renorm's buffers start unrelated (running_var 1, moving_stddev 1, Keras' initial values): a
    channel that sees nothing keeps running_var too, not moving_stddev^2 - eps (padding masks, and
    masks that vary along the features with one channel fully masked, as the reference)."""
    layer = normkit.BatchNorm(3, axis=-1, renorm=True).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    if per_feature:
        mask = torch.ones(4, 5, 3, dtype=torch.bool)
        mask[..., 1] = False
        unseen = [1]
    else:
        mask = torch.zeros(4, 5, dtype=torch.bool)
        unseen = [0, 1, 2]
    state = {name: to_numpy(buffer) for name, buffer in layer.named_buffers() if name != "num_batches_tracked"}
    layer(x, mask=mask)
    R.batch_norm(x.numpy(), state["running_mean"], state["running_var"], None, None, True, 0.1, 1e-5, axis=-1,
                 mask=(mask if per_feature else mask[..., None]).numpy(), renorm_mean=state["renorm_mean"],
                 renorm_stddev=state["renorm_stddev"], moving_stddev=state["moving_stddev"])
    for name, value in state.items():
        assert_close(getattr(layer, name), value, err_msg=name)
    assert (layer.running_var[unseen] == 1.0).all()


def test_adjustment_applies_in_training_only(rng):
    scale, shift = rng.uniform(0.5, 1.5, size=3), rng.uniform(-0.2, 0.2, size=3)
    adjustment = lambda shape: (torch.tensor(scale), torch.tensor(shift))
    layer = normkit.BatchNorm(3, axis=-1, adjustment=adjustment, momentum=0.2)
    _compare_steps(layer, (6, 2, 3), rng, adjustment=lambda shape: (scale, shift))
    layer.eval()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    plain = normkit.BatchNorm(3, axis=-1).double().eval()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), plain(x))


def test_adjustment_is_not_applied_in_eval_without_running_statistics(rng):
    """Without running statistics eval normalizes with the batch's, but the adjustment stays a training stage."""
    layer = normkit.BatchNorm(3, axis=-1, adjustment=lambda shape: (torch.full(shape, 2.0), torch.full(shape, 0.5)),
                              track_running_stats=False).double().eval()
    x = rng.normal(size=(6, 2, 3)) * 2 + 1
    assert_close(layer(torch.tensor(x)), R.batch_norm(x, axis=-1))


def test_eval_without_running_statistics_keeps_the_mask_but_not_the_ghost_batches(rng):
    """Without running statistics eval normalizes with the batch's statistics: over the mask's valid positions
    (padding never counts), and over the whole batch (ghost batches are a training stage; inference takes any
    batch size). Oracle: the NumPy reference in its batch-statistics mode."""
    x = rng.normal(size=(5, 4, 3)) * 2 + 1
    x[:, 3] += 10  # padding far from the data: counted, it would move every statistic
    mask = np.ones((5, 4), dtype=bool)
    mask[:, 3] = False
    mask[1, :2] = False
    layer = normkit.BatchNorm(3, axis=-1, track_running_stats=False).double().eval()
    assert_close(layer(torch.tensor(x), mask=torch.tensor(mask)), R.batch_norm(x, axis=-1, mask=mask[..., None]))
    ghost = normkit.BatchNorm(3, axis=-1, virtual_batch_size=2, track_running_stats=False).double().eval()
    for batch in (x, x[:4]):  # 5 rows (no ghost split) and 4 (two ghosts in training): one batch here
        assert_close(ghost(torch.tensor(batch)), R.batch_norm(batch, axis=-1))


def test_renorm_with_adjustment_and_ghost_batches_compose(rng):
    scale, shift = rng.uniform(0.5, 1.5, size=3), rng.uniform(-0.2, 0.2, size=3)
    clipping = {"rmax": 1.5, "dmax": 0.4}
    layer = normkit.BatchNorm(3, renorm=True, renorm_clipping=clipping, virtual_batch_size=2,
                              adjustment=lambda shape: (torch.tensor(scale), torch.tensor(shift)), momentum=0.2)
    _compare_steps(layer, (6, 3), rng, virtual_batch_size=2, adjustment=lambda shape: (scale, shift),
                   clipping=clipping)


def test_frozen_uses_running_statistics_updates_nothing_and_survives_train():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), normkit.BatchNorm1d(3))
    bn = model[1]
    model(torch.randn(16, 4))
    bn.freeze()
    model.train()  # torch.nn would go back to batch statistics here
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(8, 4)
    y = model(x)
    reference = normkit.BatchNorm1d(3).eval()
    reference.load_state_dict(state)
    torch.testing.assert_close(y, reference(model[0](x)))
    y.sum().backward()
    assert bn.weight.grad is None and bn.bias.grad is None and model[0].weight.grad is not None
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(value, state[key])
    bn.unfreeze()
    model(x)
    assert int(bn.num_batches_tracked) == int(state["num_batches_tracked"]) + 1


def test_frozen_layer_trains_nothing_even_when_requires_grad_is_switched_back_on():
    """Model-wide code (``model.requires_grad_(True)`` to fine-tune a backbone) switches a frozen layer's
    parameters back on: until unfreeze() it still gets no gradient and adds no regularization term, and
    it is the eval-mode affine map x * weight / sqrt(running_var + eps) + const."""
    bn = normkit.BatchNorm1d(3, weight_regularizer="l2", bias_regularizer="l1").double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    model = torch.nn.Sequential(bn)
    bn.freeze()
    model.train().requires_grad_(True)
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    assert bn.weight.grad is None and bn.bias.grad is None
    torch.testing.assert_close(x.grad, (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().expand(8, 3))
    assert float(normkit.regularization_loss(model)) == 0.0


def test_initializers_by_name_number_and_callable():
    layer = normkit.BatchNorm(4, weight_initializer=2.0, bias_initializer="ones", running_mean_initializer=0.5,
                              running_var_initializer=lambda shape, dtype: torch.full(shape, 3.0, dtype=dtype))
    torch.testing.assert_close(layer.weight.data, torch.full((4,), 2.0))
    torch.testing.assert_close(layer.bias.data, torch.ones(4))
    torch.testing.assert_close(layer.running_mean, torch.full((4,), 0.5))
    torch.testing.assert_close(layer.running_var, torch.full((4,), 3.0))
    layer.running_var.fill_(9.0)
    layer.reset_running_stats()
    torch.testing.assert_close(layer.running_var, torch.full((4,), 3.0))
    torch.manual_seed(0)
    noisy = normkit.BatchNorm(1000, weight_initializer="random_normal")
    assert abs(noisy.weight.std().item() - 0.05) < 0.005


def test_classes_are_made_with_no_arguments_and_arrays_are_the_values_as_in_keras():
    """Keras' get() makes a class given for an initializer, regularizer or constraint with no arguments, and takes a
    tensor or an array as the initial values. normkit took a class as the callable itself, so NonNeg(weight) failed
    at the first projection and L2(weight) made the weight its factor; an array was refused. Expected values by
    hand: NonNeg of (-1, 2, -3) is (0, 2, 0); L2's default 0.01 * (1 + 4 + 9); L1L2's defaults (0, 0) give 0."""
    layer = normkit.BatchNorm1d(3, weight_constraint=normkit.options.NonNeg, weight_regularizer=normkit.options.L2,
                                bias_regularizer=normkit.options.L1L2, bias_initializer=normkit.options.Constant)
    assert isinstance(layer.weight_constraint, normkit.options.NonNeg)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([-1.0, 2.0, -3.0]))
    torch.testing.assert_close(normkit.regularization_loss(layer), torch.tensor(0.01 * 14.0))
    normkit.apply_constraints(layer)
    torch.testing.assert_close(layer.weight.data, torch.tensor([0.0, 2.0, 0.0]))
    torch.testing.assert_close(layer.bias.data, torch.zeros(3))
    for values in (np.array([0.5, 2.0, 4.0]), torch.tensor([0.5, 2.0, 4.0], requires_grad=True)):
        given = normkit.BatchNorm1d(3, weight_initializer=values, running_var_initializer=values)
        torch.testing.assert_close(given.weight.data, torch.tensor([0.5, 2.0, 4.0]))
        torch.testing.assert_close(given.running_var, torch.tensor([0.5, 2.0, 4.0]))
    with pytest.raises(TypeError, match="made with no arguments"):
        normkit.BatchNorm1d(3, weight_regularizer=torch.nn.Linear)


def test_regularization_loss_is_keras_l1_l2():
    model = torch.nn.Sequential(normkit.BatchNorm1d(3, weight_regularizer="l2", bias_regularizer="l1"),
                                normkit.BatchNorm1d(3, weight_regularizer=lambda w: w.sum() * 0.5),
                                normkit.BatchNorm1d(3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -2.0, 3.0]))
        model[0].bias.copy_(torch.tensor([-1.0, 0.5, 0.0]))
    expected = 0.01 * (1 + 4 + 9) + 0.01 * (1 + 0.5) + 0.5 * 3
    torch.testing.assert_close(normkit.regularization_loss(model), torch.tensor(expected))
    model[0].freeze()
    torch.testing.assert_close(normkit.regularization_loss(model), torch.tensor(0.5 * 3))
    loss = normkit.regularization_loss(model)
    loss.backward()
    torch.testing.assert_close(model[1].weight.grad, torch.full((3,), 0.5))


def test_regularization_loss_of_a_model_off_the_cpu_with_layers_that_add_nothing():
    """A layer that adds no term (no running statistics, no parameters, or frozen) gave a CPU zero, and torch.stack
    refused it beside the other layers' terms on the model's device ('not on the expected device cpu'): a training
    loop on a GPU failed. The meta device shows the device rule on any machine; CUDA, where there is one, the value
    (Keras' L2, 0.01 * sum(w ** 2), computed by hand)."""
    def model(device):
        layers = torch.nn.Sequential(normkit.BatchNorm(3, track_running_stats=False),
                                     normkit.BatchNorm(3, affine=False, track_running_stats=False),
                                     normkit.BatchNorm(3, weight_regularizer="l2"),
                                     normkit.BatchNorm(3, track_running_stats=False, bias_regularizer="l2").freeze())
        with torch.no_grad():
            layers[2].weight.copy_(torch.tensor([1.0, -2.0, 3.0]))
        return layers.to(device)
    loss = normkit.regularization_loss(model("meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    if torch.cuda.is_available():
        loss = normkit.regularization_loss(model("cuda"))
        assert loss.device.type == "cuda"
        assert float(loss) == pytest.approx(0.01 * (1 + 4 + 9), rel=1e-6)


@pytest.mark.parametrize("name,project", [
    ("non_neg", lambda w: w.clamp(min=0)),
    ("unit_norm", lambda w: w / (1e-7 + w.norm())),
    ("max_norm", lambda w: w * w.norm().clamp(max=2.0) / (1e-7 + w.norm())),
])
def test_constraints_after_optimizer_step(name, project):
    layer = normkit.BatchNorm1d(3, weight_constraint=name, bias_constraint=name)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    handle = normkit.constrain_after_step(optimizer, layer)
    x = torch.randn(8, 3)
    (layer(x) * torch.tensor([5.0, -7.0, 3.0])).sum().backward()
    with torch.no_grad():
        expected_weight = project(layer.weight - layer.weight.grad)
        expected_bias = project(layer.bias - layer.bias.grad)
    optimizer.step()
    torch.testing.assert_close(layer.weight.data, expected_weight)
    torch.testing.assert_close(layer.bias.data, expected_bias)
    handle.remove()
    with torch.no_grad():
        layer.weight.fill_(-5.0)
    normkit.apply_constraints(layer)
    torch.testing.assert_close(layer.weight.data, project(torch.full((3,), -5.0)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_regularizers_and_constraints_of_a_half_precision_layer_do_not_overflow(dtype):
    """A .half() layer's sum of squares overflowed float16 (past 65504: 4096 gammas of 4): the L2 term was inf,
    and max_norm wrote NaN into every weight (rate * 2 + (1 - rate) * inf). They are computed in float32, as the
    statistics are; the oracle is the same formula in float64 on the layer's (rounded) values."""
    layer = normkit.BatchNorm(4096, weight_regularizer="l2", bias_regularizer="l1", weight_constraint="max_norm",
                              bias_constraint="unit_norm").to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(3.5, 4.5, 4096)), layer.bias.fill_(4.0)
    weight, bias = to_numpy(layer.weight), to_numpy(layer.bias)
    loss = layer.regularization_loss()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert loss.item() == pytest.approx(0.01 * np.sum(weight ** 2) + 0.01 * np.sum(np.abs(bias)), rel=1e-6)
    loss.backward()  # (the gradient reaches the half-precision weight in its dtype: 2 * 0.01 * w)
    assert layer.weight.grad.dtype == dtype
    assert_close(layer.weight.grad, 0.02 * weight, dtype)
    normkit.apply_constraints(layer)
    norm = np.sqrt(np.sum(weight ** 2))
    assert_close(layer.weight, weight * (2.0 / (1e-7 + norm)), dtype, rtol=0)
    assert_close(layer.bias, bias / (1e-7 + np.sqrt(np.sum(bias ** 2))), dtype, rtol=0)
    assert layer.weight.dtype == layer.bias.dtype == dtype


def test_step_hook_projects_only_what_its_optimizer_stepped():
    """Keras' optimizer applies a constraint once, after its own step, to the variables that step updated (those with
    a gradient). Two optimizers hooked to one model, one for gamma and one for beta, used to project every layer at
    each step: a MinMaxNorm with rate 0.5, which is not idempotent, moved gamma twice per iteration. A group added
    to the optimizer later is projected too. Values from Keras' formula by hand: ||(3, 4, 0)|| = 5, desired
    0.5 * clip(5, 0, 1) + 0.5 * 5 = 3, so gamma becomes (1.8, 2.4, 0); beta (-1, 2, -3) under non_neg (0, 2, 0)."""
    rate_half = {"class_name": "MinMaxNorm", "config": {"min_value": 0.0, "max_value": 1.0, "rate": 0.5}}
    layer = normkit.BatchNorm1d(3, weight_constraint=rate_half, bias_constraint="non_neg")
    gamma_optimizer = torch.optim.SGD([layer.weight], lr=0.0)
    beta_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    for optimizer in (gamma_optimizer, beta_optimizer):
        normkit.constrain_after_step(optimizer, layer)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([3.0, 4.0, 0.0]))
        layer.bias.copy_(torch.tensor([-1.0, 2.0, -3.0]))
    layer.weight.grad, layer.bias.grad = torch.zeros(3), torch.zeros(3)
    gamma_optimizer.step()
    beta_optimizer.step()  # holds neither gamma nor beta (yet): projects nothing
    torch.testing.assert_close(layer.weight.data, torch.tensor([1.8, 2.4, 0.0]))
    torch.testing.assert_close(layer.bias.data, torch.tensor([-1.0, 2.0, -3.0]))
    beta_optimizer.add_param_group({"params": [layer.bias]})
    beta_optimizer.step()
    torch.testing.assert_close(layer.weight.data, torch.tensor([1.8, 2.4, 0.0]))
    torch.testing.assert_close(layer.bias.data, torch.tensor([0.0, 2.0, 0.0]))
    layer.weight.grad = None  # the step skips a parameter without a gradient, and so does its projection
    gamma_optimizer.step()
    torch.testing.assert_close(layer.weight.data, torch.tensor([1.8, 2.4, 0.0]))


def test_synchronized_without_process_group_warns_once_and_is_local(rng):
    x = torch.tensor(rng.normal(size=(6, 3)))
    synced, local = normkit.BatchNorm(3, synchronized=True).double(), normkit.BatchNorm(3).double()
    with pytest.warns(RuntimeWarning, match="without an initialized torch.distributed"):
        y = synced(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        synced(x)
    torch.testing.assert_close(y, local(x))


@pytest.mark.parametrize("name, args", [("BatchNorm", (3,)), ("BatchNorm2d", (3,)), ("BatchNormalization", ())])
def test_a_process_group_without_synchronized_warns_at_the_constructing_line(name, args):
    """torch.nn.SyncBatchNorm(C, process_group=g) synchronizes by its class; its likely port BatchNorm(C,
    process_group=g) computed local statistics without a word. The constructor warns at the user's line (a drop-in
    subclass's or the Keras layer's constructor included, whose inner layer gives no second warning at its build),
    keeps the group for a later synchronized=True, and says nothing where the flag is given or no group is."""
    cls = normkit.keras.BatchNormalization if name == "BatchNormalization" else getattr(normkit, name)
    group = object()  # (a group is an opaque handle to the layer until a synchronized training call)
    with pytest.warns(UserWarning) as caught:
        layer = cls(*args, process_group=group); line = sys._getframe().f_lineno  # noqa: E702 (the constructor's line)
    (warning,) = [w for w in caught if "process_group" in str(w.message)]
    assert str(warning.message).startswith(f"{name}: process_group was given but synchronized=False")
    assert "synchronized=True" in str(warning.message)
    assert (warning.filename, warning.lineno) == (__file__, line)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(4, 3, 2, 2) if name == "BatchNorm2d" else torch.randn(4, 3))  # (a Keras layer builds here)
        assert (layer.bn if name == "BatchNormalization" else layer).process_group is group
        cls(*args, process_group=group, synchronized=True)
        cls(*args)


@pytest.mark.parametrize("make, name", [
    (lambda: normkit.BatchNorm1d(3, synchronized=True), "BatchNorm1d"),
    (lambda: torch.nn.Sequential(normkit.BatchNorm(3, synchronized=True)), "BatchNorm"),
    (lambda: __import__("normkit.keras").keras.BatchNormalization(synchronized=True), "BatchNormalization"),
])
def test_local_statistics_warning_names_the_layer_built_and_points_at_the_calling_line(make, name):
    """The warning names the layer the user made (the Keras layer, not the normkit.BatchNorm inside it) and is
    reported at the user's own line, however deep in torch and normkit the layer sits."""
    layer = make()
    with pytest.warns(RuntimeWarning) as caught:
        layer(torch.randn(6, 3)); line = sys._getframe().f_lineno  # noqa: E702 (the call's own line)
    (warning,) = [w for w in caught if "synchronized=True" in str(w.message)]
    assert str(warning.message).startswith(f"{name}(synchronized=True) runs without an initialized")
    assert (warning.filename, warning.lineno) == (__file__, line)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_synchronized_layer_without_process_group_warns_once_at_the_calling_line(fullgraph, rng):
    """torch.compile skipped the warning (it cannot be traced), so a compiled model synchronized without a group of
    processes trained on local statistics without a word; it is given while Dynamo traces, once, fullgraph too."""
    torch._dynamo.reset()
    synced, local = normkit.BatchNorm(3, synchronized=True).double(), normkit.BatchNorm(3).double()
    compiled = torch.compile(synced, backend="eager", fullgraph=fullgraph)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.tensor(rng.normal(size=(6, 3)))
            y = compiled(x); line = sys._getframe().f_lineno  # noqa: E702 (the call's own line)
            torch.testing.assert_close(y, local(x))
    ours = [w for w in caught if "synchronized=True" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert str(ours[0].message).startswith("BatchNorm(synchronized=True) runs without an initialized torch.distributed")
    assert (ours[0].filename, ours[0].lineno) == (__file__, line)
    torch.testing.assert_close(synced.running_var, local.running_var)


@pytest.mark.parametrize("make", [lambda: normkit.BatchNorm(3, synchronized=True),
                                  lambda: __import__("normkit.keras").keras.BatchNormalization(synchronized=True)])
def test_a_synchronized_layer_restored_from_torch_save_warns_again(make, rng):
    """torch.save of the whole model kept the mark that the layer had warned, so the restored layer (a job of its own,
    say one that forgot init_process_group) trained on local statistics without a word."""
    layer = make().double()
    call = (lambda m, x: m(x, training=True)) if not isinstance(layer, normkit.BatchNorm) else (lambda m, x: m(x))
    with pytest.warns(RuntimeWarning, match="without an initialized torch.distributed"):
        call(layer, torch.tensor(rng.normal(size=(6, 3))))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    local = normkit.BatchNorm(3).double()
    local.load_state_dict({k.removeprefix("bn."): v for k, v in restored.state_dict().items()})
    x = torch.tensor(rng.normal(size=(6, 3)))
    with pytest.warns(RuntimeWarning, match="without an initialized torch.distributed") as caught:
        y = call(restored, x)
    assert len([w for w in caught if "synchronized=True" in str(w.message)]) == 1
    if isinstance(layer, normkit.BatchNorm):  # (the Keras layer's eps and momentum are Keras')
        torch.testing.assert_close(y, local(x))


def test_fused_is_accepted_by_keras_layer():
    from normkit.keras import BatchNormalization
    assert BatchNormalization(fused=True)(torch.randn(4, 3), training=True).shape == (4, 3)
    with pytest.raises(ValueError, match="fused=True is not supported with renorm"):
        BatchNormalization(fused=True, renorm=True)


@pytest.mark.parametrize("settings", [
    {}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}, {"momentum": 0.7, "eps": 1e-2},
])
@pytest.mark.parametrize("shape", [(8, 3), (12, 3, 4, 2), (8, 3, 5)])
def test_plain_ghost_batches_take_one_aten_call_with_the_general_path_s_results(settings, shape, rng):
    """Ghost batches alone on (N, C, *) run as one ATen call on the (V, G*C, *) view with G copies of each
    buffer; outputs, every gradient and the buffers equal the general path's and the reference's."""
    fast = normkit.BatchNorm(3, virtual_batch_size=4, **settings).double()
    general = normkit.BatchNorm(3, virtual_batch_size=4, **settings).double()
    general._plain_ghost = False  # the pipeline of every other option
    assert fast._plain_ghost
    # Which call took the one-call path (_forward_plain_ghost returns None where it declines, and the general
    # path then computes the step): without this, a path that always declined compared the general path with itself.
    taken, plain_ghost = [], fast._forward_plain_ghost

    def recorded(input):
        y = plain_ghost(input)
        taken.append(y is not None)
        return y

    fast._forward_plain_ghost = recorded
    if fast.affine and fast.track_running_stats and fast.momentum is not None:  # (what _compare_steps covers)
        _compare_steps(fast, shape, rng, steps=3, virtual_batch_size=4, ghost_layout="strided")
        assert int(fast.num_batches_tracked) == 3
    fast.load_state_dict(general.state_dict())
    assert_same_training_steps(fast, general, shape, rng)
    if normkit.kernels.enabled():  # (the fused kernel takes ghost batches first: the one-call path declines for it)
        assert not any(taken)
    else:
        assert taken and all(taken), taken


def test_plain_ghost_path_leaves_what_it_does_not_take_to_the_general_path(rng):
    layer = normkit.BatchNorm(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="virtual_batch_size"):  # 10 rows are not whole ghost batches
        layer(torch.randn(10, 3))
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_mean, torch.zeros(3))
    # data far from zero: the layer recenters (general path), and the statistics stay exact
    far = torch.tensor(rng.normal(size=(16, 3)) * 1e-2 + 1e4, dtype=torch.float32)
    layer = normkit.BatchNorm(3, virtual_batch_size=4, momentum=1.0)
    layer(far)
    assert layer._recenter or normkit.kernels.enabled()  # (the fused kernel's statistics need no recentering)
    ghosts = far.double().view(4, 4, 3).transpose(0, 1)  # Keras' strided ghosts: rows g, g + 4, ...
    torch.testing.assert_close(layer.running_mean.double(), ghosts.mean(dim=(0, 1)), rtol=1e-7, atol=0)


def _layer_with_route(route, on, *args, rank_checked=False, **kwargs):
    """A BatchNorm (BatchNorm1d with ``rank_checked``) with its one-call route ``route`` (a flag the layer sets from
    its options) kept as the options set it, or switched off: the general route's answers to compare with."""
    built = (normkit.BatchNorm1d if rank_checked else normkit.BatchNorm)(*args, **kwargs)
    setattr(built, route, on and getattr(built, route))
    return built


def test_plain_ghost_path_keeps_every_rule_of_the_general_path(rng):
    """What the one-call ghost path must refuse or leave alone exactly as the general path does."""
    for fast in (True, False):
        layer = functools.partial(_layer_with_route, "_plain_ghost", fast)
        ranked = layer(4, virtual_batch_size=2, rank_checked=True)
        with pytest.raises(ValueError, match="expected 2D or 3D input"):
            ranked(torch.randn(8, 4, 3, 3))
        single = layer(4, virtual_batch_size=1)  # one value per ghost and feature
        with pytest.raises(ValueError, match="more than 1 value"):
            single(torch.randn(8, 4))
        assert torch.equal(single.running_var, torch.ones(4))
        unweighted = layer(4, virtual_batch_size=2, affine=False)
        with pytest.raises(TypeError, match="cast the input"):
            unweighted(torch.randn(8, 4, dtype=torch.float64))
        assert int(unweighted.num_batches_tracked) == 0
        # bfloat16 input without a float32 weight: statistics in float32 all the same (not from bfloat16 invstd)
        x = torch.tensor(rng.normal(size=(8, 4, 3)) * 2 + 1).to(torch.bfloat16)
        half = layer(4, virtual_batch_size=2, affine=False, momentum=1.0)
        half(x)
        exact = x.double().reshape(2, 4, 4, 3).permute(1, 0, 2, 3)  # the strided ghosts: (V=2) rows g, g + 4
        unbiased = exact.var(dim=(1, 3), unbiased=True).mean(dim=0)
        torch.testing.assert_close(half.running_var.double(), unbiased, rtol=1e-6, atol=0)


def _recording_direct_route(layer):
    """``layer``'s _forward_composite_direct, recording whether each call took it (it returns None where it declines,
    and the general route then computes the step): without this, a route that always declined compared the general
    route with itself."""
    taken, direct = [], layer._forward_composite_direct

    def recorded(input, mask=None):
        y = direct(input, mask)
        taken.append(y is not None)
        return y

    layer._forward_composite_direct = recorded
    return taken


@pytest.mark.parametrize("settings", [
    {"renorm": True}, {"renorm": True, "momentum": None}, {"renorm": True, "affine": False},
    {"renorm": True, "unbiased_running_var": False, "momentum": 0.7, "eps": 1e-2},
    {"renorm": True, "renorm_clipping": {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1}},
    {"renorm": True, "renorm_clipping": {"rmax": lambda step: 1 + step / 10}},
    {"renorm": True, "axis": -1}, {"axis": -1, "mask": True}, {"axis": -1, "mask": True, "renorm": True},
    {"axis": -1, "mask": True, "momentum": None, "unbiased_running_var": False},
])
@pytest.mark.parametrize("shape", [(8, 3), (12, 3, 4, 3), (8, 3, 5)])
def test_composite_direct_route_computes_the_general_route_s_step(settings, shape, rng):
    """Renorm, or a padding mask, without the kernel: the module's direct call of the functional pipeline gives the
    general route's outputs, every gradient and every buffer, over several steps."""
    settings = dict(settings)
    masked = settings.pop("mask", False)
    channels = shape[-1] if settings.get("axis") == -1 else shape[1]
    fast = normkit.BatchNorm(channels, **settings).double()
    general = normkit.BatchNorm(channels, **settings).double()
    general._composite_direct = False  # the general route
    assert fast._composite_direct
    taken = _recording_direct_route(fast)
    if masked:
        kept = shape[:-1]
        mask = torch.tensor(rng.random(size=kept) < 0.7)
        mask.view(-1)[:2] = True  # (two valid positions at least)
        steps = [(fast, lambda layer, x: layer(x, mask=mask)), (general, lambda layer, x: layer(x, mask=mask))]
        for step in range(3):
            x = torch.tensor(rng.normal(size=shape) * (step + 2) + step)
            g = torch.tensor(rng.normal(size=shape))
            results = []
            for layer, call in steps:
                leaf = x.clone().requires_grad_()
                y = call(layer, leaf)
                results.append([y, *torch.autograd.grad(y, [leaf, *layer.parameters()], g)])
            for got, want in zip(*results, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            for (name, got), want in zip(fast.state_dict().items(), general.state_dict().values(), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    else:
        assert_same_training_steps(fast, general, shape, rng)
    if normkit.kernels.enabled():  # (the fused kernel takes these steps first: the direct route declines for it)
        assert not any(taken)
    else:
        assert taken and all(taken), taken


def test_composite_direct_route_leaves_what_it_does_not_take_to_the_general_route(rng):
    """What the direct route must refuse, or leave to the general route, exactly as that route does."""
    for direct in (True, False):
        layer = functools.partial(_layer_with_route, "_composite_direct", direct)
        ranked = layer(4, renorm=True, rank_checked=True)
        with pytest.raises(ValueError, match="expected 2D or 3D input"):
            ranked(torch.randn(8, 4, 3, 3))
        single = layer(4, renorm=True)  # one value per feature
        with pytest.raises(ValueError, match="more than 1 value"):
            single(torch.randn(1, 4))
        assert int(single.num_batches_tracked) == 0 and torch.equal(single.running_var, torch.ones(4))
        other_dtype = layer(4, renorm=True)
        with pytest.raises(TypeError, match="cast the input"):
            other_dtype(torch.randn(8, 4, dtype=torch.float64))
        assert int(other_dtype.num_batches_tracked) == 0
        bad_schedule = layer(4, renorm=True, renorm_clipping={"rmax": lambda step: 1.5 if step < 1 else 1 / 0})
        bad_schedule(torch.randn(8, 4))
        with pytest.raises(ZeroDivisionError):  # (a schedule that raises at the second step: not counted)
            bad_schedule(torch.randn(8, 4))
        assert int(bad_schedule.num_batches_tracked) == 1
        masked = layer(3, axis=-1)
        with pytest.raises(ValueError, match="cannot broadcast"):
            masked(torch.randn(4, 5, 3), mask=torch.ones(4, 6, dtype=torch.bool))
        assert int(masked.num_batches_tracked) == 0
        # data far from zero: recentered on either route, with exact statistics
        far = torch.tensor(rng.normal(size=(16, 3)) * 1e-2 + 1e4, dtype=torch.float32)
        renormed = layer(3, renorm=True, momentum=1.0)
        renormed(far)
        assert renormed._recenter or normkit.kernels.enabled()  # (the fused kernel's statistics need no recentering)
        torch.testing.assert_close(renormed.running_mean.double(), far.double().mean(dim=0), rtol=1e-7, atol=0)


def test_masked_ghost_with_a_single_valid_value_keeps_a_finite_running_variance():
    """A ghost batch with one valid value has no unbiased variance: its biased one (0) is stored, as for torch.nn's
    n <= 1 rule in stats.bessel_factor, never inf * 0 = NaN. By hand (tests/test_reference.py has the same case):
    strided ghosts [0, 2, 4, 6] (mean 3, unbiased var 20/3) and [10] (var 0), weighted 4:1: running mean 22/5,
    running variance 16/3; both ghosts' values are normalized by their own statistics."""
    layer = normkit.BatchNorm(1, virtual_batch_size=4, momentum=1.0).double()
    x = torch.tensor([0.0, 10.0, 2.0, 50.0, 4.0, 100.0, 6.0, -100.0], dtype=torch.float64).reshape(8, 1)
    mask = torch.tensor([1, 1, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    y = layer(x, mask=mask)
    assert_close(layer.running_mean, [22 / 5])
    assert_close(layer.running_var, [16 / 3])
    assert_close(y[[0, 2, 4, 6], 0], (np.array([0.0, 2.0, 4.0, 6.0]) - 3) / np.sqrt(5 + layer.eps))
    assert_close(y[1, 0], [0.0])


@pytest.mark.parametrize("min_value,max_value,rate", [(0.5, 1.0, 0.5), (3.0, 5.0, 0.25), (0.0, 2.0, 1.0)])
def test_min_max_norm_constraint_blends_by_rate_as_keras(min_value, max_value, rate):
    """Keras' MinMaxNorm: w * (rate * clip(||w||, min, max) + (1 - rate) * ||w||) / (1e-7 + ||w||), computed here
    in NumPy from that formula (norms 13 and 0.5: above and below the bounds)."""
    config = {"class_name": "MinMaxNorm", "config": {"min_value": min_value, "max_value": max_value, "rate": rate}}
    for start in ([3.0, -4.0, 12.0], [0.3, 0.0, -0.4]):
        layer = normkit.BatchNorm1d(3, weight_constraint=config)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(start))
        normkit.apply_constraints(layer)
        w = np.array(start)
        norm = np.sqrt((w ** 2).sum())
        desired = rate * np.clip(norm, min_value, max_value) + (1 - rate) * norm
        assert_close(layer.weight, w * desired / (1e-7 + norm), torch.float32)


@pytest.mark.parametrize("constraint,desired", [
    (normkit.options.MaxNorm(0.5), lambda norm: norm.clamp(0.0, 0.5)),
    (normkit.options.MinMaxNorm(0.2, 0.7, 0.3), lambda norm: 0.3 * norm.clamp(0.2, 0.7) + (1 - 0.3) * norm),
])
def test_norm_constraints_round_as_keras_s(constraint, desired):
    """Keras computes w * (desired / (1e-7 + norm)): the factor first, one product on w. normkit's
    w * desired / (1e-7 + norm) rounded twice on w and differed from Keras' float32 projection in the last bits for
    most weights. The formula is written here in Keras' order with the same torch ops (norm over axis 0)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = torch.tensor(rng.normal(size=7), dtype=torch.float32)
        norm = w.square().sum(dim=0, keepdim=True).sqrt()
        torch.testing.assert_close(constraint(w), w * (desired(norm) / (1e-7 + norm)), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["unit_norm", "max_norm", "min_max_norm"])
def test_norm_constraints_leave_a_zero_weight_zero(name):
    """Keras' norm constraints divide by epsilon + ||w|| (epsilon 1e-7): an all-zero weight stays 0, not NaN."""
    layer = normkit.BatchNorm1d(3, weight_constraint=name)
    with torch.no_grad():
        layer.weight.zero_()
    normkit.apply_constraints(layer)
    assert torch.equal(layer.weight.data, torch.zeros(3))


@pytest.mark.parametrize("bad", [-0.01, math.nan, math.inf])
@pytest.mark.parametrize("make", [lambda f: normkit.options.L1L2(l1=f), lambda f: normkit.options.L1L2(l2=f),
                                  lambda f: normkit.options.L1(f), lambda f: normkit.options.L2(f)])
def test_regularization_factors_must_be_finite_and_non_negative(make, bad):
    """Keras' L1/L2/L1L2 refuse a factor that is negative, infinite or NaN (keras.regularizers'
    validate_float_arg: 'expected a non-negative float'); a NaN factor would make every loss NaN."""
    with pytest.raises(ValueError, match="regularization factors"):
        make(bad)
    with pytest.raises(ValueError, match="regularization factors"):
        normkit.BatchNorm(3, weight_regularizer={"class_name": "L1L2", "config": {"l1": 0.0, "l2": bad}})


@pytest.mark.parametrize("make,expected", [
    (lambda: normkit.options.L1L2(l1=None, l2=0.5), (0.0, 0.5)), (lambda: normkit.options.L1L2(None, None), (0.0, 0.0)),
    (lambda: normkit.options.L1(None), (0.01, 0.0)), (lambda: normkit.options.L2(None), (0.0, 0.01)),
])
def test_a_regularization_factor_of_none_is_keras_default(make, expected):
    """Keras' L1L2 reads None as 0 and L1/L2 as their 0.01 (keras.regularizers: `l1 = 0.01 if l1 is None else l1`);
    normkit failed on the comparison with a TypeError. The loss is 0.5 * sum(w^2) etc., computed here by hand."""
    regularizer = make()
    assert (regularizer.l1, regularizer.l2) == expected
    weight = torch.tensor([1.0, -2.0, 3.0])
    torch.testing.assert_close(regularizer(weight), torch.tensor(expected[0] * 6.0 + expected[1] * 14.0))


@pytest.mark.parametrize("bad", ["0.01", [0.01]])
def test_a_regularization_factor_that_is_no_number_is_keras_value_error(bad):
    """Keras' validate_float_arg refuses anything but a non-negative number with a ValueError; normkit's comparison
    raised a TypeError that named no argument."""
    with pytest.raises(ValueError, match="regularization factors"):
        normkit.options.L1L2(l2=bad)


@pytest.mark.parametrize("spelling,distribution", [("normal", "truncated_normal"), ("Normal", "truncated_normal"),
                                                   ("Uniform", "uniform"), ("UNTRUNCATED_NORMAL", "untruncated_normal")])
def test_variance_scaling_reads_the_distribution_as_keras_does(spelling, distribution):
    """Keras' VarianceScaling lower-cases the distribution and reads "normal" as "truncated_normal", which its config
    then holds; normkit refused both. A uniform draw stays within +-sqrt(3 * scale / fan_in) (scale 2, fan_in 500)."""
    initializer = normkit.options.VarianceScaling(scale=2.0, distribution=spelling, seed=0)
    assert initializer.distribution == distribution
    assert initializer.keras_config()[1]["distribution"] == distribution
    layer = normkit.BatchNorm(3, weight_initializer={"class_name": "VarianceScaling",
                                                     "config": {"distribution": spelling}})
    assert layer.weight_initializer.distribution == distribution
    if distribution == "uniform":
        values = initializer((500, 4))
        limit = math.sqrt(3.0 * 2.0 / 500)
        assert values.abs().max() <= limit and values.abs().max() > 0.9 * limit


def test_variance_scaling_fans_of_a_matrix_are_keras_rows_in_columns_out():
    """Keras' compute_fans: a (fan_in, fan_out) matrix, and (*receptive, in, out) kernels, whose fans are multiplied by
    the receptive field; HeUniform draws within +-sqrt(6 / fan_in), GlorotUniform +-sqrt(6 / (fan_in + fan_out))."""
    for shape, fan_in, fan_out in (((400, 10), 400, 10), ((3, 3, 40, 8), 360, 72)):
        he = normkit.options.HeUniform(seed=0)(shape)
        limit = math.sqrt(6.0 / fan_in)
        assert he.abs().max() <= limit and he.abs().max() > 0.9 * limit
        glorot = normkit.options.GlorotUniform(seed=0)(shape)
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        assert glorot.abs().max() <= limit and glorot.abs().max() > 0.9 * limit


def test_fully_masked_batch_gradients_are_the_reference_s(rng):
    """Nothing valid: mean 0 and variance 0, so every output is x / sqrt(eps) * weight + bias and its input gradient
    g * weight / sqrt(eps) (reference.normalize_backward with n = 0: no statistics term), not zero."""
    layer = normkit.BatchNorm(3, axis=-1, eps=1e-2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -2.0, 1.5]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    x_np, g_np = rng.normal(size=(4, 5, 3)), rng.normal(size=(4, 5, 3))
    mask = np.zeros((4, 5), dtype=bool)
    state = _reference_state(layer)
    w, b = to_numpy(layer.weight), to_numpy(layer.bias)
    x = torch.tensor(x_np, requires_grad=True)
    y = layer(x, mask=torch.as_tensor(mask))
    y.backward(torch.tensor(g_np))
    grads = R.batch_norm_backward(g_np, x_np, state["running_mean"], state["running_var"], w, b, True, 1e-2, axis=-1,
                                  mask=mask[..., None])
    expected = R.batch_norm(x_np, state["running_mean"], state["running_var"], w, b, True, 0.1, 1e-2, axis=-1,
                            mask=mask[..., None])
    assert_training_step(layer, y, x.grad, expected, grads, state)


@pytest.mark.parametrize("padding", [float("nan"), float("inf")])
@pytest.mark.parametrize("options", [
    {"virtual_batch_size": 3}, {"virtual_batch_size": 3, "ghost_layout": "contiguous"}, {"adjustment": "ones"},
    {"features_vary": True},
], ids=["ghost strided", "ghost contiguous", "adjustment", "mask along the features"])
def test_nan_or_inf_in_padding_stays_out_of_the_composite_paths_statistics(padding, options, rng):
    """The composite masked paths (ghost batches with a mask, an adjustment, a mask that varies along the features)
    weighed padded positions by 0, and 0 * NaN is NaN: every statistic of the channel, its valid outputs and its
    running buffers became NaN. Now as the reference (and the padding-mask path): the valid outputs and the
    buffers are those of the same data with any other padding value."""
    options = dict(options)
    varies = options.pop("features_vary", False)
    if options.pop("adjustment", None):
        options["adjustment"] = lambda shape: (torch.full(shape, 1.5, dtype=torch.float64),
                                               torch.full(shape, 0.25, dtype=torch.float64))
    x = rng.normal(size=(6, 3, 5)) * 2 + 1
    mask = rng.uniform(size=(6, 3, 5) if varies else (6, 1, 5)) > 0.3
    mask[0, :, 0] = False
    x[0, :, 0] = padding
    layer = normkit.BatchNorm(3, axis=1, momentum=0.5, **options).double()
    y = layer(torch.tensor(x), mask=torch.tensor(mask if varies else mask[:, 0]))
    reference_options = {key: value for key, value in options.items() if key != "adjustment"}
    if "adjustment" in options:
        reference_options["adjustment"] = lambda shape: (np.full(shape, 1.5), np.full(shape, 0.25))
    running_mean, running_var = np.zeros(3), np.ones(3)  # (the reference moves them in place)
    expected = R.batch_norm(x, running_mean, running_var, np.ones(3), np.zeros(3), True, 0.5, 1e-5, axis=1,
                            mask=mask, **reference_options)
    valid = np.broadcast_to(mask, x.shape)
    out = to_numpy(y)
    assert np.isfinite(out[valid]).all()
    np.testing.assert_allclose(out[valid], expected[valid], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(layer.running_mean), running_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(layer.running_var), running_var, rtol=1e-12, atol=1e-14)
    clean = np.where(valid, x, 0.0)
    twin = normkit.BatchNorm(3, axis=1, momentum=0.5, **options).double()
    twin(torch.tensor(clean), mask=torch.tensor(mask if varies else mask[:, 0]))
    for name in ("running_mean", "running_var"):
        assert torch.isfinite(getattr(layer, name)).all()
        torch.testing.assert_close(getattr(layer, name), getattr(twin, name), rtol=1e-12, atol=1e-14)
