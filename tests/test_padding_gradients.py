"""NaN or inf in padded positions that the loss ignores must stay out of every gradient (the padding rule)."""

import numpy as np
import pytest

from normkit import reference as R

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
