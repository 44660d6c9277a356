"""NaN or inf in padded positions that the loss ignores must stay out of every gradient (the padding rule)."""

import copy

import numpy as np
import pytest
import torch

import normkit
import normkit.keras
from normkit import reference as R

from oracle import to_numpy

PADDINGS = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("padding", PADDINGS, ids=["nan", "inf", "-inf"])
def test_reference_normalize_backward_ignores_padding_with_zero_gradient(padding, rng):
    """reference.normalize_backward with non-finite padding and gradient 0 there equals it with zero padding
    (the oracle the layers are held to), padded positions' gradients included (inv * g = 0)."""
    x = rng.normal(size=(4, 6, 3)) * 2 + 1
    mask = np.ones((4, 6, 1), dtype=bool)
    mask[:, 4:] = False
    mask[0, 1] = False
    g = rng.normal(size=x.shape) * mask
    axes = (0, 1)
    _, mean, var = R.moments(np.where(mask, x, 0.0), axes, mask)
    inv_std = 1.0 / np.sqrt(var + 1e-3)
    zero_padded = R.normalize_backward(g, (np.where(mask, x, 0.0) - mean) * inv_std, inv_std, axes, mask)
    padded = R.normalize_backward(g, (np.where(mask, x, padding) - mean) * inv_std, inv_std, axes, mask)
    assert np.isfinite(padded).all()
    np.testing.assert_array_equal(padded, zero_padded)
    # and the whole layer's backward, weight and bias included
    args = (None, None, np.array([1.5, -0.5, 2.0]), np.array([0.1, 0.2, 0.3]), True, 1e-3)
    expected = R.batch_norm_backward(g, np.where(mask, x, 0.0), *args, axis=-1, mask=mask)
    for got, want in zip(R.batch_norm_backward(g, np.where(mask, x, padding), *args, axis=-1, mask=mask), expected):
        np.testing.assert_array_equal(got, want)


def test_reference_keeps_a_nonzero_gradient_at_a_nan_input_nan(rng):
    """The rule selects away only what a zero gradient multiplies: a padded NaN output that the loss reads still
    makes its channel's gradients NaN, as the math says."""
    x = rng.normal(size=(4, 6, 3))
    mask = np.ones((4, 6, 1), dtype=bool)
    mask[:, 4:] = False
    x[1, 5, 2] = np.nan
    g = rng.normal(size=x.shape)
    dx, dw, db = R.batch_norm_backward(g, x, None, None, np.ones(3), np.zeros(3), True, 1e-3, axis=-1, mask=mask)
    assert np.isnan(dx[mask[..., 0]][:, 2]).all() and np.isnan(dw[2])
    assert np.isfinite(dx[..., :2]).all() and np.isfinite(dw[:2]).all() and np.isfinite(db).all()


# ----------------------------------------------------------------------------- the layers, every masked path

def _adjustment(shape):
    return torch.full(shape, 1.5, dtype=torch.float64), torch.full(shape, 0.25, dtype=torch.float64)


# name: (layer factory, input shape, mask shape); masks of the input's shape without the feature axis, or of its
# full shape (a mask that varies along the features). (N, T, C) with axis=-1 is the fused C++ kernel's rows layout,
# (N, C, T) with axis=1 its positions layout; ghost batches, per-feature masks and an adjustment take the composite
# paths on either execution.
LAYERS = {
    "padding mask": (lambda: normkit.BatchNorm(3, axis=-1), (4, 6, 3), (4, 6)),
    "padding mask, features at dim 1": (lambda: normkit.BatchNorm(3, axis=1), (4, 3, 6), (4, 6)),
    "per-feature mask": (lambda: normkit.BatchNorm(3, axis=-1), (4, 6, 3), (4, 6, 3)),
    "ghost + mask": (lambda: normkit.BatchNorm(3, axis=-1, virtual_batch_size=2), (4, 6, 3), (4, 6)),
    "renorm + mask": (lambda: normkit.BatchNorm(3, axis=-1, renorm=True), (4, 6, 3), (4, 6)),
    "adjustment + mask": (lambda: normkit.BatchNorm(3, axis=-1, adjustment=_adjustment), (4, 6, 3), (4, 6)),
    "keras layer + mask": (lambda: normkit.keras.BatchNormalization(), (4, 6, 3), (4, 6)),
}


def _layer(name, dtype):
    make, shape, _ = LAYERS[name]
    layer = make()
    if isinstance(layer, normkit.keras.BatchNormalization):
        layer(torch.zeros(shape), training=False)  # (built by its first call; inference moves nothing)
    layer = layer.to(dtype)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator, dtype=dtype) + 0.5)
    return layer


def _call(layer, x, mask):
    if isinstance(layer, normkit.keras.BatchNormalization):
        return layer(x, training=True, mask=mask)
    return layer(x, mask=mask)


def _data(name, dtype, rng):
    _, shape, mask_shape = LAYERS[name]
    x = torch.tensor(rng.normal(size=shape) * 2 + 1, dtype=dtype)
    mask = torch.tensor(rng.uniform(size=mask_shape) > 0.3)
    mask.view(-1)[0] = True
    mask.view(-1)[1] = False
    if len(mask_shape) == 2:
        mask[:, -2:] = False  # (and a padded tail, as sequences have)
    axis = -1 if shape[-1] == 3 else 1
    valid = mask if mask.dim() == x.dim() else (mask.unsqueeze(axis)).expand(shape)
    return x, mask, valid


def _step(layer, x, mask, loss_weights):
    x = x.clone().requires_grad_()
    y = _call(layer, x, mask)
    (y * loss_weights).sum().backward()
    return y.detach(), x.grad, {name: p.grad for name, p in layer.named_parameters()}


def _assert_padding_changes_nothing(name, dtype, padding, rng):
    """Fresh copies of the layer on the data padded with ``padding`` and with zeros, the loss reading the valid
    outputs only: equal valid outputs, input gradients (0 at padding), weight/bias gradients and state.
    Returns the padded run's (input gradient, parameter gradients)."""
    x, mask, valid = _data(name, dtype, rng)
    loss_weights = torch.tensor(rng.normal(size=x.shape), dtype=dtype) * valid
    layer = _layer(name, dtype)
    padded, zeros = copy.deepcopy(layer), copy.deepcopy(layer)
    y, x_grad, grads = _step(padded, x.masked_fill(~valid, padding), mask, loss_weights)
    y0, x_grad0, grads0 = _step(zeros, x.masked_fill(~valid, 0.0), mask, loss_weights)
    torch.testing.assert_close(y[valid], y0[valid])
    torch.testing.assert_close(x_grad, x_grad0)
    assert (x_grad[~valid] == 0).all()
    assert grads.keys() == grads0.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], grads0[key])
    for (key, value), (_, value0) in zip(padded.state_dict().items(), zeros.state_dict().items(), strict=True):
        torch.testing.assert_close(value, value0, msg=key)
    return x_grad, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("padding", PADDINGS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_non_finite_padding_that_the_loss_ignores_changes_no_gradient(name, padding, dtype, execution, rng):
    """The same layer (fresh copies) on the same data, padded with NaN or inf and with zeros, the loss reading the
    valid outputs only: the same valid outputs, input gradients everywhere (0 at padding: a g with g = 0), weight
    and bias gradients and running statistics (before the padding rule, 0 * NaN made the channel's gradients
    NaN on every path)."""
    x_grad, grads = _assert_padding_changes_nothing(name, dtype, padding, rng)
    assert torch.isfinite(x_grad).all()
    assert grads and all(torch.isfinite(grad).all() for grad in grads.values())


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_nonzero_gradient_at_a_nan_padded_output_still_gives_nan(name, execution, rng):
    """The rule hides nothing real: a loss that reads a padded output holding NaN gets NaN gradients for that
    channel (its weight and the valid inputs that share its statistics), as the math says; the other channels
    stay finite."""
    dtype = torch.float64
    x, mask, valid = _data(name, dtype, rng)
    feature = 1
    index = tuple(i[0] for i in torch.nonzero(~valid[..., feature] if x.shape[-1] == 3 else ~valid[:, feature]).T)
    index = index + (feature,) if x.shape[-1] == 3 else (index[0], feature) + index[1:]
    x[index] = float("nan")
    layer = _layer(name, dtype)
    _, x_grad, grads = _step(layer, x, mask, torch.ones_like(x))  # (every output read, the NaN one included)
    channel = (lambda t: t[..., feature]) if x.shape[-1] == 3 else (lambda t: t[:, feature])
    others = (lambda t: t[..., [0, 2]]) if x.shape[-1] == 3 else (lambda t: t[:, [0, 2]])
    weight = next(p for n, p in grads.items() if n.split(".")[-1] == "weight")
    assert torch.isnan(weight[feature])
    # (with ghost batches the NaN's own ghost batch only: strided, rows n with n % 2 == its row's)
    statistics_shared = valid.clone()
    if name.startswith("ghost"):
        statistics_shared[torch.arange(x.shape[0]) % 2 != index[0] % 2] = False
    assert torch.isnan(channel(x_grad)[channel(statistics_shared)]).all()
    assert torch.isfinite(others(x_grad)).all() and torch.isfinite(weight[[0, 2]]).all()


@pytest.mark.parametrize("padding", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ["padding mask", "padding mask, features at dim 1", "renorm + mask"])
def test_fused_kernels_follow_the_padding_rule(name, padding, fused_kernels, rng):
    """The fused kernels' backward (C++, and Triton in its interpreter), as the layers' test above: NaN or inf
    padding with zero gradient gives the gradients of zero padding."""
    _assert_padding_changes_nothing(name, torch.float32, padding, rng)


@pytest.mark.parametrize("name", ["padding mask", "padding mask, features at dim 1", "per-feature mask",
                                  "ghost + mask", "renorm + mask"])
def test_the_padding_rule_holds_for_gradients_with_a_graph(name, execution, rng):
    """``create_graph=True`` (a gradient penalty) recomputes the step by autograd: there too NaN padding with zero
    gradient gives zero padding's first derivatives and the penalty's gradient with respect to the weights."""
    dtype = torch.float64
    x, mask, valid = _data(name, dtype, rng)
    loss_weights = torch.tensor(rng.normal(size=x.shape), dtype=dtype) * valid
    results = []
    for padding in (float("nan"), 0.0):
        layer = _layer(name, dtype)
        inputs = x.masked_fill(~valid, padding).requires_grad_()
        y = _call(layer, inputs, mask)
        (x_grad,) = torch.autograd.grad((y * loss_weights).sum(), inputs, create_graph=True)
        (x_grad[valid] ** 2).sum().backward()
        results.append((x_grad.detach(), layer.weight.grad))
    (x_grad, weight_grad), (x_grad0, weight_grad0) = results
    assert torch.isfinite(x_grad).all() and torch.isfinite(weight_grad).all()
    torch.testing.assert_close(x_grad, x_grad0)
    torch.testing.assert_close(weight_grad, weight_grad0)


@pytest.mark.parametrize("padding", [float("nan"), 0.0], ids=["nan", "zeros"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_the_branch_free_formulations_follow_the_rule_too(name, padding, monkeypatch, rng):
    """On a GPU (and in compiled graphs) no sum is read on the host: the Functions select at once and the autograd
    composite paths always take the padding guard. Forced here on the CPU (``host_checks`` says no), against the
    host-checked execution on zero padding, finite padding included (the guard must then change nothing)."""
    from normkit import functional

    dtype = torch.float64
    x, mask, valid = _data(name, dtype, rng)
    loss_weights = torch.tensor(rng.normal(size=x.shape), dtype=dtype) * valid
    layer = _layer(name, dtype)
    expected = _step(copy.deepcopy(layer), x.masked_fill(~valid, 0.0), mask, loss_weights)
    monkeypatch.setattr(functional, "host_checks", lambda tensor: False)
    y, x_grad, grads = _step(layer, x.masked_fill(~valid, padding), mask, loss_weights)
    torch.testing.assert_close(y[valid], expected[0][valid])
    torch.testing.assert_close(x_grad, expected[1])
    for key in grads:
        torch.testing.assert_close(grads[key], expected[2][key])


EVAL_LAYERS = ["padding mask", "padding mask, features at dim 1", "per-feature mask", "ghost + mask", "renorm + mask",
               "adjustment + mask", "keras layer + mask"]


def _eval_step(layer, x, mask, loss_weights):
    x = x.clone().requires_grad_()
    keras = isinstance(layer, normkit.keras.BatchNormalization)
    y = layer(x, training=False, mask=mask) if keras else layer(x, mask=mask)
    (y * loss_weights).sum().backward()
    return y.detach(), x.grad, {name.split(".")[-1]: p.grad for name, p in layer.named_parameters()}


@pytest.mark.parametrize("padding", PADDINGS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", EVAL_LAYERS)
def test_the_padding_rule_holds_in_eval(name, padding, execution, rng):
    """In eval (running statistics, as when fine-tuning with BN in eval) the mask names no statistic, and ATen's
    backward multiplied the saved x_hat by the output gradient: NaN or inf padding that the loss ignores made the
    weight's gradient NaN, where the reference (and training) give that of zero padding. Found by
    tools/fuzz_batch_norm.py."""
    layer = _layer(name, torch.float64)
    layer(torch.randn(LAYERS[name][1], dtype=torch.float64) * 2 + 1)  # (running statistics of their own)
    layer.eval()
    x, mask, valid = _data(name, torch.float64, rng)
    loss_weights = torch.tensor(rng.normal(size=x.shape)) * valid
    y, x_grad, grads = _eval_step(copy.deepcopy(layer), x.masked_fill(~valid, padding), mask, loss_weights)
    y0, x_grad0, grads0 = _eval_step(copy.deepcopy(layer), x.masked_fill(~valid, 0.0), mask, loss_weights)
    torch.testing.assert_close(y[valid], y0[valid])
    assert not torch.isfinite(y[~valid]).any()  # (the padded outputs keep their exact values)
    torch.testing.assert_close(x_grad, x_grad0)
    for key in grads:
        torch.testing.assert_close(grads[key], grads0[key], msg=key)
    # A nonzero gradient at a NaN padded output: the weight's gradient of that channel is NaN, as the math says; every
    # input gradient stays g * w / std (eval's, which never reads the input), like the reference's
    x = x.masked_fill(~valid, float("nan"))
    _, x_grad, grads = _eval_step(copy.deepcopy(layer), x, mask, torch.ones_like(x))
    bn = layer.bn if isinstance(layer, normkit.keras.BatchNormalization) else layer
    expected = R.batch_norm_backward(np.ones(x.shape), x.numpy(), to_numpy(bn.running_mean),
                                     to_numpy(bn.running_var), to_numpy(bn.weight), to_numpy(bn.bias),
                                     False, bn.eps, axis=bn.axis)
    torch.testing.assert_close(x_grad, torch.tensor(expected[0]))
    assert torch.isnan(grads["weight"]).all() and torch.isfinite(grads["bias"]).all()
