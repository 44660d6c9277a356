"""Property tests (hypothesis): random shapes, axes and values against the reference."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit
from normkit import reference as R

from oracle import assert_close, to_numpy


@st.composite
def batch_norm_cases(draw):
    rank = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    shape = (max(shape[0], 2),) + shape[1:]
    n_axes = draw(st.integers(1, min(2, rank - 1)))
    axes = draw(st.lists(st.integers(1, rank - 1), min_size=n_axes, max_size=n_axes, unique=True))
    signed = tuple(a - rank if draw(st.booleans()) else a for a in axes)
    axis = signed[0] if len(signed) == 1 else signed
    scale = draw(st.floats(1e-2, 1e2))
    offset = draw(st.floats(-1e3, 1e3))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    training = draw(st.booleans())
    momentum = draw(st.sampled_from([0.1, 0.5, None]))
    return shape, axis, scale, offset, seed, training, momentum


@settings(max_examples=60, deadline=None)
@given(batch_norm_cases())
def test_batch_norm_matches_reference(case):
    shape, axis, scale, offset, seed, training, momentum = case
    rng = np.random.default_rng(seed)
    canonical = tuple(sorted(a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis)))
    features = tuple(shape[a] for a in canonical)
    layer = normkit.BatchNorm(features[0] if len(features) == 1 else features, momentum=momentum, axis=axis).double()
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(rng.normal(size=features)))
        layer.bias.copy_(torch.as_tensor(rng.normal(size=features)))
    layer.train(training)
    x_np = rng.normal(size=shape) * scale + offset
    count = x_np.size // int(np.prod(features))
    if training and count == 1:
        return  # one value per channel is an error (tested in test_errors)
    rm, rv = to_numpy(layer.running_mean), to_numpy(layer.running_var)
    x = torch.tensor(x_np, requires_grad=True)
    y = layer(x)
    g = rng.normal(size=shape)
    y.backward(torch.tensor(g))
    factor = (1.0 if momentum is None else momentum) if training else 0.0
    w, b = to_numpy(layer.weight), to_numpy(layer.bias)
    grads = R.batch_norm_backward(g, x_np, rm.copy(), rv.copy(), w, b, training, 1e-5, axis=axis)
    expected = R.batch_norm(x_np, rm, rv, w, b, training, factor, 1e-5, axis=axis)
    tol = dict(rtol=1e-7, atol=1e-7)
    assert_close(y, expected, **tol)
    assert_close(x.grad, grads[0], rtol=1e-6, atol=1e-6 * max(1.0, 1.0 / scale))
    assert_close(layer.weight.grad, grads[1], rtol=1e-6, atol=1e-6)
    assert_close(layer.bias.grad, grads[2], rtol=1e-6, atol=1e-6)
    assert_close(layer.running_mean, rm, **tol)
    assert_close(layer.running_var, rv, rtol=1e-7, atol=1e-7 * scale ** 2)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2 ** 31 - 1))
def test_group_norm_matches_reference_and_normalizes(n, groups, per_group, seed):
    rng = np.random.default_rng(seed)
    channels = groups * per_group
    x = rng.normal(size=(n, channels, 3)) * 5 + 2
    y = normkit.GroupNorm(groups, channels, affine=False)(torch.tensor(x))
    assert_close(y, R.group_norm(x, groups))
    grouped = to_numpy(y).reshape(n, groups, -1)
    np.testing.assert_allclose(grouped.mean(-1), 0, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(1, 4), st.integers(0, 2 ** 31 - 1), st.floats(0.1, 0.9))
def test_masked_statistics_equal_unpadded_rows(n, t, seed, keep):
    """A padded (N, T, C) batch gives the statistics of its valid rows alone."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, t, 3)) * 2 + 1
    mask = rng.uniform(size=(n, t)) < keep
    mask[0, 0] = mask[-1, -1] = True
    x[~mask] = 1e6  # padding garbage must not leak
    layer = normkit.BatchNorm(3, axis=-1, momentum=1.0).double()
    y = layer(torch.tensor(x), mask=torch.tensor(mask))
    valid = x[mask]
    plain = normkit.BatchNorm1d(3, momentum=1.0).double()
    y_valid = plain(torch.tensor(valid))
    torch.testing.assert_close(y[torch.tensor(mask)], y_valid)
    torch.testing.assert_close(layer.running_mean, plain.running_mean)
    if valid.shape[0] > 1:
        torch.testing.assert_close(layer.running_var, plain.running_var)
