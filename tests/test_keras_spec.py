"""Keras' own BatchNormalization tests, ported to normkit (section 9 of ../shared/spec/keras-batchnorm.md).

Sources: K3 ``keras/src/layers/normalization/batch_normalization_test.py`` and
``keras/src/ops/nn_test.py``; TFK ``tf_keras/layers/normalization/batch_normalization_test.py``
and ``tf_keras/legacy_tf_layers/normalization_test.py``. The layer under test is
``normkit.keras.BatchNormalization`` (Keras vocabulary: ``momentum`` is the decay, the
weight of the OLD value); tests marked "torch vocabulary" use ``normkit.BatchNorm``, whose
``momentum``/``renorm_momentum`` are the weight of the NEW value (Keras 0.99 == normkit 0.01).

Expected values are either Keras' published numbers or computed here with NumPy from the
formulas the Keras tests use; nothing is taken from normkit itself.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import normkit
from normkit import functional as NF
from normkit.keras import BatchNormalization, from_keras_config

# Every test runs on ATen's paths and again through normkit.kernels' fused kernel (conftest.py).
pytestmark = pytest.mark.usefixtures("execution")

# ----------------------------------------------------------------------------- helpers


def t(a, dtype=torch.float32):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def npy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def masking(x, mask_value=0.0):
    """Keras' ``Masking(mask_value)``: mask = any(x != mask_value, axis=-1); masked steps are zeroed."""
    x = np.asarray(x, dtype=np.float32)
    mask = np.any(x != mask_value, axis=-1)
    return x * mask[..., None], mask


def reduce_axes_for(ndim, axis):
    axes = [axis] if isinstance(axis, int) else list(axis)
    axes = [a % ndim for a in axes]
    return tuple(i for i in range(ndim) if i not in axes)


def param_view(p, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return npy(p).reshape(shape)


# ----------------------------------------------------------------------------- K3: 1. bn basics


@pytest.mark.parametrize("kwargs, shape, trainable, non_trainable, losses", [
    ({"center": True, "scale": True}, (2, 3), 2, 2, 0),
    ({"center": False, "scale": False}, (2, 3), 0, 2, 0),
    ({"center": True, "scale": True, "beta_regularizer": "l2", "gamma_regularizer": "l2"}, (2, 4, 4, 3), 2, 2, 2),
    ({"renorm": True}, (2, 3), 2, 5, 0),
    ({"renorm": True, "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}}, (2, 4, 4, 3), 2, 5, 0),
])
def test_bn_basics(kwargs, shape, trainable, non_trainable, losses):
    layer = BatchNormalization(**kwargs)
    x = torch.randn(shape)
    y = layer(x, training=True)
    assert y.shape == x.shape
    assert len(layer.trainable_weights) == trainable
    assert len(layer.non_trainable_weights) == non_trainable
    assert len(layer.weights) == trainable + non_trainable
    assert len(layer.losses) == losses
    # masking supported: a mask one dimension smaller is accepted in training and inference
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    assert layer(x, training=True, mask=mask).shape == x.shape
    assert layer(x, training=False, mask=mask).shape == x.shape
    # a compiled-style training step: gradients reach gamma/beta only, weights stay float32
    if trainable:
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        before = [w.copy() for w in layer.get_weights()[:trainable]]
        loss = (layer(x, training=True) - 1.0).square().mean() + sum(layer.losses)
        loss.backward()
        optimizer.step()
        assert any(not np.allclose(b, a) for b, a in zip(before, layer.get_weights()[:trainable]))
    # "mixed precision": half input -> half output, all weights float32
    y16 = layer(x.half(), training=True)
    assert y16.dtype == torch.float16
    assert all(w.dtype == np.float32 for w in layer.get_weights())


def test_tfk_batchnorm_weights():
    layer = BatchNormalization(scale=False, center=False)
    layer.build((None, 3))
    assert (len(layer.weights), len(layer.trainable_weights)) == (2, 0)
    layer = BatchNormalization()
    layer.build((None, 3))
    assert (len(layer.weights), len(layer.trainable_weights)) == (4, 2)


# ----------------------------------------------------------------------------- K3: 2. correctness


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("input_shape", [(5, 2, 3), (5, 3, 3, 2)])
@pytest.mark.parametrize("mm_init", ["zeros", "ones"])
@pytest.mark.parametrize("mv_init", ["zeros", "ones"])
def test_correctness(axis, input_shape, mm_init, mv_init):
    rng = np.random.default_rng(7)
    layer = BatchNormalization(axis=axis, momentum=0, moving_mean_initializer=mm_init,
                               moving_variance_initializer=mv_init)
    x = rng.normal(5.0, 10.0, input_shape).astype(np.float32)
    out = t(x)
    for _ in range(3):
        out = layer(out, training=True)
    ndim = len(input_shape)
    out = (npy(out) - param_view(layer.beta, ndim, axis)) / param_view(layer.gamma, ndim, axis)
    red = reduce_axes_for(ndim, axis)
    np.testing.assert_allclose(out.mean(axis=red), 0.0, atol=1e-3)
    np.testing.assert_allclose(out.std(axis=red), 1.0, atol=1e-3)
    np.testing.assert_allclose(npy(layer.moving_mean), 0.0, atol=1e-3)
    np.testing.assert_allclose(npy(layer.moving_variance), 1.0, atol=1e-3)

    # inference before a training call on x does not match training
    inference_out = layer(t(x), training=False)
    training_out = layer(t(x), training=True)
    assert not np.allclose(npy(inference_out), npy(training_out), atol=1e-3)
    # momentum 0: after a training call on x, inference equals training
    training_out = layer(t(x), training=True)
    inference_out = layer(t(x), training=False)
    np.testing.assert_allclose(npy(inference_out), npy(training_out), rtol=1e-5, atol=1e-5)

    # masked inference equals unmasked inference (inference is never masked)
    x[:, 1, ...] = 0.0
    unmasked_out = layer(t(x), training=False)
    masked_x, mask = masking(x)
    masked_out = layer(t(masked_x), training=False, mask=t(mask, torch.bool))
    np.testing.assert_allclose(npy(unmasked_out), npy(masked_out), rtol=1e-6, atol=1e-6)
    # masked training output differs from unmasked inference
    masked_out = layer(t(masked_x), training=True, mask=t(mask, torch.bool))
    assert not np.allclose(npy(unmasked_out), npy(masked_out), atol=1e-3)


# ----------------------------------------------------------------------------- K3: 3. fully masked


def test_input_fully_masked():
    norm = BatchNormalization(scale=False, center=False)
    x = torch.zeros(4, 5)
    mask = torch.zeros(4)
    y = norm(x, mask=mask, training=True)
    assert torch.isfinite(y).all()
    np.testing.assert_array_equal(npy(y), np.zeros((4, 5), np.float32))
    # normkit's documented choice (docs/keras.md): no valid value -> moving statistics unchanged
    # (Keras would average in mean = var = 0).
    np.testing.assert_array_equal(npy(norm.moving_mean), np.zeros(5))
    np.testing.assert_array_equal(npy(norm.moving_variance), np.ones(5))


def test_input_fully_masked_keeps_nonzero_moving_stats_and_gives_finite_gradient():
    norm = BatchNormalization(momentum=0.5)
    norm.build((None, 4, 3))
    start = [np.full(3, 1.5, np.float32), np.full(3, 0.5, np.float32), np.array([1.0, -2.0, 3.0], np.float32),
             np.array([0.5, 2.0, 4.0], np.float32)]
    norm.set_weights(start)
    x = torch.randn(2, 4, 3, requires_grad=True)
    y = norm(x, mask=torch.zeros(2, 4), training=True)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for got, want in zip(norm.get_weights()[2:], start[2:]):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- K3/TFK: 4. masked moving stats


@pytest.mark.parametrize("mask_value", [0.0, 0.1, 1.0])
def test_batchnorm_ignore_masked_values(mask_value):
    m = mask_value
    padded = np.array([[[1, 5], [2, 5], [m, m], [m, m]] for _ in range(10)], dtype=np.float32)
    masked, mask = masking(padded, mask_value)
    layer = BatchNormalization(momentum=0.0)
    layer.build((None, None, 2))
    optimizer = torch.optim.RMSprop(layer.parameters(), lr=0.001)
    for _ in range(5):  # fit: 5 epochs, batch_size 10 = one step per epoch, MSE loss
        optimizer.zero_grad()
        y = layer(t(masked), training=True, mask=t(mask, torch.bool))
        loss = (y - t(padded)).square().mean()
        loss.backward()
        optimizer.step()
    np.testing.assert_allclose(npy(layer.moving_mean), [1.5, 5.0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(npy(layer.moving_variance), [0.25, 0.0], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- K3: 5. trainable


def test_trainable_behavior():
    rng = np.random.default_rng(3)
    layer = BatchNormalization(axis=-1, momentum=0.8, epsilon=1e-7)
    layer.build((1, 4, 4, 3))
    layer.trainable = False
    assert len(layer.weights) == 4
    assert len(layer.trainable_weights) == 0
    assert len(layer.non_trainable_weights) == 4
    x = rng.normal(5.0, 10.0, (200, 4, 4, 3)).astype(np.float32)
    out = layer(t(x), training=True)
    np.testing.assert_allclose(npy(out), x, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(npy(layer.moving_mean), np.zeros(3))  # frozen: nothing moves

    layer.trainable = True
    assert len(layer.weights) == 4
    assert len(layer.trainable_weights) == 2
    assert len(layer.non_trainable_weights) == 2
    for _ in range(10):
        out = layer(t(x), training=True)
    out = (npy(out) - npy(layer.beta).reshape(1, 1, 1, 3)) / npy(layer.gamma).reshape(1, 1, 1, 3)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-3)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, atol=1e-3)


def test_frozen_layer_train_step_changes_nothing():
    # TFK test_that_trainable_disables_updates / test_batchnorm_non_trainable_with_fit
    rng = np.random.default_rng(4)
    layer = BatchNormalization(momentum=0.5)
    layer.build((None, 4))
    layer.set_weights([rng.uniform(0.5, 1.5, 4), rng.normal(0, 1, 4), rng.normal(0, 1, 4), rng.uniform(1, 2, 4)])
    layer.trainable = False
    x = t(rng.normal(3.0, 2.0, (16, 4)))
    before = layer(x, training=False)
    weights_before = layer.get_weights()
    optimizer = torch.optim.SGD([p for p in layer.parameters()], lr=1.0)
    train_out = layer(x, training=True)
    np.testing.assert_array_equal(npy(train_out), npy(before))  # train loss == evaluate loss
    assert not train_out.requires_grad
    optimizer.step()
    np.testing.assert_allclose(npy(layer(x, training=False)), npy(before), atol=1e-7)
    for a, b in zip(weights_before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert layer.losses == []


def test_batchnorm_trainable_uses_batch_statistics_in_training():
    # TFK test_batchnorm_trainable: moving stats 0.5/100, x = arange(10) -> (x - mean) / std
    layer = BatchNormalization(momentum=0.99)
    layer.build((None, 1))
    layer.set_weights([np.ones(1), np.zeros(1), np.full(1, 0.5), np.full(1, 100.0)])
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = layer(t(x), training=True)
    np.testing.assert_allclose(npy(y), (x - x.mean()) / x.std(), atol=1e-3)


# ----------------------------------------------------------------------------- K3: 6. large value, fp16


def test_large_value_within_autocast_scope():
    layer = BatchNormalization()
    layer.build((1, 4, 4, 3))
    weights = layer.get_weights()
    weights[3] = np.full(3, 70000.0)  # overflows float16 (max 65504)
    layer.set_weights(weights)
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(torch.randn(2, 4, 4, 3).half(), training=False)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert layer.moving_variance.dtype == torch.float32
    np.testing.assert_array_equal(npy(layer.moving_variance), np.full(3, 70000.0))


@pytest.mark.parametrize("shape", [(2, 1), (2, 1, 1, 1), (2, 1, 1, 1, 1)])
def test_batchnorm_mixed_precision_does_not_overflow(shape):
    layer = BatchNormalization(momentum=0.5)
    x = torch.tensor([-1000.0, 1000.0]).reshape(shape).half()
    y = layer(x, training=True)
    assert y.dtype == torch.float16
    np.testing.assert_allclose(npy(y.float()).ravel(), [-1.0, 1.0], atol=1e-3)
    # float32 statistics: variance 1e6 (> float16 max) is stored exactly
    np.testing.assert_allclose(npy(layer.moving_variance), [0.5 * 1.0 + 0.5 * 1e6], rtol=1e-6)
    assert all(w.dtype == np.float32 for w in layer.get_weights())


# ----------------------------------------------------------------------------- K3: 7. masked broadcast


def test_masked_broadcast_normalization():
    x = torch.ones(1, 2, 3, 4)
    mask = torch.ones(1, 2, 1)
    layer = BatchNormalization(axis=-1, momentum=0.0, epsilon=1e-3)
    y = layer(x, training=True, mask=mask)
    np.testing.assert_allclose(npy(y.mean(dim=(0, 1, 2))), np.zeros(4), atol=1e-6)
    np.testing.assert_allclose(npy(y), np.zeros((1, 2, 3, 4)), atol=1e-6)
    np.testing.assert_allclose(npy(layer.moving_mean), np.ones(4), atol=1e-6)
    np.testing.assert_allclose(npy(layer.moving_variance), np.zeros(4), atol=1e-6)


@pytest.mark.parametrize("mask_shape", [(2, 3, 4), (2,), (4,)])
@pytest.mark.parametrize("training", [True, False])
def test_mask_must_have_one_dimension_less(mask_shape, training):
    # Keras: "The mask provided should be one dimension less than the inputs", more dimensions or fewer, in
    # training and inference
    layer = BatchNormalization()
    with pytest.raises(ValueError, match="one dimension less"):
        layer(torch.ones(2, 3, 4), training=training, mask=torch.ones(mask_shape))


def test_a_mask_that_does_not_fit_says_keras_rule():
    """Features not last, (N, C, T) data and an (N, T) mask: the inner layer's message said "give a mask of shape
    (4, 7)", the shape given. Keras expands the mask at the last axis: it is (N, C) here; the message says so and,
    for such a layer (a channels-last one moved by load_batch_norms(axis=1)), how to mask time steps, which gives
    what the channels-last layer computes."""
    last = BatchNormalization(momentum=0.5)
    last.build((None, 7, 5))
    moved = from_keras_config({**last.get_config(), "axis": 1}, {"input_shape": [None, 5, 7]}, last.get_weights())
    x, mask = torch.randn(4, 7, 5) * 2 + 1, torch.rand(4, 7) > 0.3
    with pytest.raises(ValueError, match=r"last axis.*\(4, 5\).*axis 1, not last.*layer\.bn\(x, mask=m\)"):
        moved(x.transpose(1, 2), training=True, mask=mask)
    moved(x.transpose(1, 2), training=False, mask=mask)  # (inference ignores the mask, as in Keras)
    moved.train()
    np.testing.assert_allclose(npy(moved.bn(x.transpose(1, 2), mask=mask).transpose(1, 2)),
                               npy(last(x, training=True, mask=mask)), rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(moved.get_weights(), last.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- K3: 8-13. renorm


def test_renorm_invalid_clipping_keys():
    with pytest.raises(ValueError, match="(?i)received invalid keys"):
        BatchNormalization(renorm=True, renorm_clipping={"random_key": 1.0})
    with pytest.raises(ValueError, match="rmax should be"):
        BatchNormalization(renorm=True, renorm_clipping={"rmax": 0.0, "rmin": 1.0})
    with pytest.raises(ValueError, match="dmax should be non-negative"):
        BatchNormalization(renorm=True, renorm_clipping={"rmax": 1.0, "dmax": -1.0})


def test_renorm_clipping_without_renorm_is_accepted_and_ignored():
    # Keras keeps renorm_clipping when renorm=False and never uses it.
    x = torch.randn(6, 3)
    with_clip = BatchNormalization(renorm_clipping={"rmax": 1.1, "dmax": 0.1})
    plain = BatchNormalization()
    np.testing.assert_allclose(npy(with_clip(x, training=True)), npy(plain(x, training=True)), atol=1e-6)
    assert len(with_clip.weights) == 4


@pytest.mark.parametrize("initializer", [4.0, normkit.options.Constant(4.0)])
def test_renorm_stddev_initializer(initializer):
    layer = BatchNormalization(renorm=True, moving_variance_initializer=initializer)
    layer.build((None, 5))
    np.testing.assert_allclose(npy(layer.moving_stddev), np.full(5, 2.0), atol=1e-6)
    np.testing.assert_allclose(npy(layer.renorm_stddev), np.full(5, 2.0), atol=1e-6)
    np.testing.assert_allclose(npy(layer.moving_variance), np.full(5, 4.0), atol=1e-6)


def test_renorm_inference():
    rng = np.random.default_rng(11)
    bn, bn_renorm = BatchNormalization(renorm=False), BatchNormalization(renorm=True)
    bn.build((None, 10))
    bn_renorm.build((None, 10))
    values = [rng.normal(size=10).astype(np.float32) for _ in range(3)] + [np.abs(rng.normal(size=10)).astype(np.float32)]
    bn.set_weights(values)
    bn_renorm.set_weights(values + bn_renorm.get_weights()[4:])
    x = t(rng.normal(size=(4, 10)))
    np.testing.assert_allclose(npy(bn(x, training=False)), npy(bn_renorm(x, training=False)), rtol=1e-5, atol=1e-5)


def _renorm_correctness_case(seed=1337):
    rng = np.random.default_rng(seed)
    size = (3,)
    init = {
        "moving_mean": rng.normal(0.0, 1.0, size),
        "moving_variance": np.abs(rng.normal(1.0, 0.5, size)),
        "renorm_mean": rng.normal(0.0, 1.0, size),
        "renorm_stddev": np.abs(rng.normal(1.0, 0.5, size)),
        "gamma": rng.normal(1.0, 0.1, size),
        "beta": rng.normal(0.0, 0.1, size),
    }
    init["moving_stddev"] = np.sqrt(init["moving_variance"])
    init = {k: v.astype(np.float32).astype(np.float64) for k, v in init.items()}
    x = np.array([[4.0, 6.0, 2.0], [8.0, -2.0, 5.0], [6.0, 4.0, 3.0]], dtype=np.float32)
    return init, x


def _renorm_expected(init, x, epsilon, momentum, renorm_momentum):
    """K3 test_renorm_correctness' formulas (Keras decay convention)."""
    batch_mean, batch_var = x.mean(axis=0), x.var(axis=0)
    batch_stddev = np.sqrt(batch_var + epsilon)
    r = batch_stddev / init["renorm_stddev"]
    d = (batch_mean - init["renorm_mean"]) / init["renorm_stddev"]
    expected = {
        "y": (((x - batch_mean) / batch_stddev) * r + d) * init["gamma"] + init["beta"],
        "renorm_mean": init["renorm_mean"] * renorm_momentum + batch_mean * (1 - renorm_momentum),
        "renorm_stddev": init["renorm_stddev"] * renorm_momentum + batch_stddev * (1 - renorm_momentum),
        "moving_mean": init["moving_mean"] * momentum + batch_mean * (1 - momentum),
        "moving_stddev": init["moving_stddev"] * momentum + batch_stddev * (1 - momentum),
    }
    expected["moving_variance"] = expected["moving_stddev"] ** 2 - epsilon
    return expected


def test_renorm_correctness():
    epsilon, momentum, renorm_momentum = 1e-3, 0.9, 0.8
    init, x = _renorm_correctness_case()
    layer = BatchNormalization(axis=-1, epsilon=epsilon, momentum=momentum, renorm=True,
                               renorm_momentum=renorm_momentum)
    layer.build((None, 3))
    names = ["gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"]
    layer.set_weights([init[n] for n in names])
    expected = _renorm_expected(init, x, epsilon, momentum, renorm_momentum)
    np.testing.assert_allclose(npy(layer(t(x), training=True)), expected["y"], atol=1e-5)
    for name in names[2:]:
        np.testing.assert_allclose(npy(getattr(layer, name)), expected[name], atol=1e-5, err_msg=name)


def test_renorm_correctness_torch_vocabulary():
    # normkit.BatchNorm: momentum/renorm_momentum are the weight of the NEW value (1 - Keras').
    epsilon, momentum, renorm_momentum = 1e-3, 0.9, 0.8
    init, x = _renorm_correctness_case(seed=2024)
    bn = normkit.BatchNorm(3, eps=epsilon, momentum=1 - momentum, axis=-1, renorm=True,
                           renorm_momentum=1 - renorm_momentum, unbiased_running_var=False)
    with torch.no_grad():
        bn.weight.copy_(t(init["gamma"]))
        bn.bias.copy_(t(init["beta"]))
        for buffer, name in (("running_mean", "moving_mean"), ("running_var", "moving_variance"),
                             ("moving_stddev", "moving_stddev"), ("renorm_mean", "renorm_mean"),
                             ("renorm_stddev", "renorm_stddev")):
            getattr(bn, buffer).copy_(t(init[name]))
    expected = _renorm_expected(init, x, epsilon, momentum, renorm_momentum)
    bn.train()
    np.testing.assert_allclose(npy(bn(t(x))), expected["y"], atol=1e-5)
    for buffer, name in (("running_mean", "moving_mean"), ("running_var", "moving_variance"),
                         ("moving_stddev", "moving_stddev"), ("renorm_mean", "renorm_mean"),
                         ("renorm_stddev", "renorm_stddev")):
        np.testing.assert_allclose(npy(getattr(bn, buffer)), expected[name], atol=1e-5, err_msg=name)


def test_moving_average_torch_vocabulary():
    # Keras momentum 0.99 == normkit.BatchNorm momentum 0.01 (with Keras' biased moving variance).
    rng = np.random.default_rng(5)
    x = rng.normal(2.0, 3.0, (16, 4)).astype(np.float32)
    bn = normkit.BatchNorm(4, eps=1e-3, momentum=0.01, axis=-1, unbiased_running_var=False).train()
    bn(t(x))
    np.testing.assert_allclose(npy(bn.running_mean), 0.01 * x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(npy(bn.running_var), 0.99 + 0.01 * x.var(0), rtol=1e-5, atol=1e-6)


def test_serialization():
    layer = BatchNormalization(renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
                               renorm_momentum=0.95)
    config = layer.get_config()
    new_layer = BatchNormalization.from_config(config)
    assert new_layer.get_config() == config
    assert config["renorm_clipping"] == {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}
    assert config["renorm_momentum"] == 0.95
    for key, default in (("axis", -1), ("momentum", 0.99), ("epsilon", 1e-3), ("center", True), ("scale", True),
                         ("beta_initializer", "zeros"), ("gamma_initializer", "ones"),
                         ("moving_mean_initializer", "zeros"), ("moving_variance_initializer", "ones")):
        assert BatchNormalization().get_config()[key] == default, key


@pytest.mark.parametrize("policy,compute,variables", [("mixed_float16", torch.float16, torch.float32),
                                                       ("mixed_bfloat16", torch.bfloat16, torch.float32),
                                                       ("float64", torch.float64, torch.float64),
                                                       ("float16", torch.float16, torch.float16)])
def test_serialization_keeps_the_dtype_policy(policy, compute, variables):
    """Keras' get_config carries the dtype policy; a mixed_float16 layer must come back mixed_float16
    (output float16, float32 weights: K3's mixed-precision check), not float32."""
    layer = BatchNormalization.from_config(BatchNormalization(dtype=policy).get_config())
    assert layer.dtype_policy == policy
    y = layer(t(np.array([[-1000.0], [1000.0], [3.0]])), training=True)
    assert y.dtype == compute and layer.moving_mean.dtype == variables


# ----------------------------------------------------------------------------- K3 ops/nn_test


def test_ops_batch_normalization():
    x = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mean, var = t([0.2, 0.3, 0.4]), t([4.0, 16.0, 64.0])
    y = NF.normalize(x, mean, var, 1e-7, scale=t([10.0, 20.0, 30.0]), offset=t([5.0, 10.0, 15.0]))
    np.testing.assert_allclose(npy(y), [[4.5, 9.5, 14.625], [6.0, 11.0, 15.75]], rtol=1e-6, atol=1e-6)
    y = NF.normalize(x, mean, var, 1e-7)
    np.testing.assert_allclose(npy(y), [[-0.05, -0.025, -0.0125], [0.1, 0.05, 0.025]], rtol=1e-6, atol=1e-6)


def test_ops_moments():
    x = np.array([0, 1, 2, 3, 4, 100, -200], dtype=np.float32)
    _, mean, var = NF.moments(t(x), (0,))
    np.testing.assert_allclose(npy(mean).ravel(), [np.mean(x)], rtol=1e-6)
    np.testing.assert_allclose(npy(var).ravel(), [np.var(x)], rtol=1e-6)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    for axes in [(0,), (0, 1, 2)]:
        _, mean, var = NF.moments(t(x), axes)
        np.testing.assert_allclose(npy(mean), x.mean(axis=axes, keepdims=True), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(npy(var), x.var(axis=axes, keepdims=True), rtol=1e-5, atol=1e-6)


def test_ops_moments_float16_is_computed_in_float32():
    # Keras' ops.moments returns var clipped to 65504 for this float16 data (true var ~7.6e5);
    # normkit's moments return the float32 statistics themselves (see docs/keras.md).
    x = np.array([-1000.0, 1000.0, 0.0, 500.0, -700.0, 1200.0], dtype=np.float16)
    _, mean, var = NF.moments(t(x, torch.float16), (0,))
    assert var.dtype == torch.float32
    np.testing.assert_allclose(npy(var).ravel(), [np.var(x.astype(np.float64))], rtol=1e-6)
    assert npy(var).ravel()[0] > np.finfo(np.float16).max


# ----------------------------------------------------------------------------- TFK: ghost batch norm


def _ghost_reference(x, virtual_batch_size, feature_axes, moving_mean, moving_var, gamma, beta, momentum, eps):
    """testGhostBN*: per-ghost stats on reshape(x, (V, B/V, ...)), moving = average over axis 1."""
    shape = x.shape
    ghost = x.reshape((virtual_batch_size, shape[0] // virtual_batch_size) + shape[1:])
    reduce = tuple(i for i in range(ghost.ndim) if i != 1 and (i - 1) not in feature_axes)
    means = ghost.mean(axis=reduce, keepdims=True)
    variances = ghost.var(axis=reduce, keepdims=True)
    avg_means = means.mean(axis=1, keepdims=True)
    avg_vars = variances.mean(axis=1, keepdims=True)
    moving_mean = moving_mean * momentum + avg_means * (1 - momentum)
    moving_var = moving_var * momentum + avg_vars * (1 - momentum)
    y_train = (ghost - means) / np.sqrt(variances + eps) * gamma + beta
    y_test = (ghost - moving_mean) / np.sqrt(moving_var + eps) * gamma + beta
    return y_train.reshape(shape), y_test.reshape(shape), moving_mean, moving_var


@pytest.mark.parametrize("shape, axis, virtual_batch_size", [
    ((6, 2), -1, 3),                 # testGhostBN2Dims
    ((6, 10, 10, 3), 3, 2),          # testGhostBN4DimsAxis3
    ((6, 3, 10, 10), 1, 2),          # testGhostBN4DimsAxis1
    ((6, 3, 10, 10, 4), [1, 4], 3),  # testGhostBN5DimsMultiAxis14
])
def test_ghost_batch_norm(shape, axis, virtual_batch_size):
    beta, gamma, momentum, epsilon = 2.0, 3.0, 0.8, 1e-3
    ndim = len(shape)
    feature_axes = tuple(sorted(a % ndim for a in ([axis] if isinstance(axis, int) else axis)))
    stat_shape = tuple([1, 1] + [shape[i - 1] if (i - 1) in feature_axes else 1 for i in range(1, ndim + 1)])
    moving_mean, moving_var = np.zeros(stat_shape), np.ones(stat_shape)
    layer = BatchNormalization(axis=axis, momentum=momentum, epsilon=epsilon, beta_initializer=beta,
                               gamma_initializer=gamma, virtual_batch_size=virtual_batch_size)
    rng = np.random.default_rng(len(shape))
    for _ in range(5):
        x = rng.random(shape).astype(np.float32)
        y_train, y_test, moving_mean, moving_var = _ghost_reference(
            x.astype(np.float64), virtual_batch_size, feature_axes, moving_mean, moving_var, gamma, beta, momentum,
            epsilon)
        np.testing.assert_allclose(npy(layer(t(x), training=True)), y_train, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(npy(layer(t(x), training=False)), y_test, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(npy(layer.moving_mean).ravel(), moving_mean.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(npy(layer.moving_variance).ravel(), moving_var.ravel(), rtol=1e-5, atol=1e-6)


def test_ghost_virtual_batch_full_equals_plain():
    x = t(np.random.default_rng(1).random((6, 5, 4, 3)))
    plain, ghost = BatchNormalization(), BatchNormalization(virtual_batch_size=6)
    y1, y2 = plain(x, training=True), ghost(x, training=True)
    assert y1.shape == y2.shape == x.shape
    np.testing.assert_allclose(npy(y1), npy(y2), atol=1e-5)
    for a, b in zip(plain.get_weights(), ghost.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_ghost_negative_virtual_batch():
    with pytest.raises(ValueError):
        BatchNormalization(virtual_batch_size=-1)
    with pytest.raises(ValueError):
        BatchNormalization(virtual_batch_size=0)


def test_ghost_batch_size_must_divide_in_training_only():
    layer = BatchNormalization(virtual_batch_size=8)
    layer.build((None, None, 3))  # unknown batch and time: builds
    assert layer(torch.randn(1, 28, 3), training=False).shape == (1, 28, 3)  # inference: any batch
    assert layer(torch.randn(10, 5, 3), training=False).shape == (10, 5, 3)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        layer(torch.randn(1, 28, 3), training=True)
    assert layer(torch.randn(16, 5, 3), training=True).shape == (16, 5, 3)


def test_ghost_axis_may_not_contain_the_batch_axis():
    with pytest.raises(ValueError):
        BatchNormalization(axis=0, virtual_batch_size=2)(torch.randn(4, 3), training=True)


# ----------------------------------------------------------------------------- TFK: renorm / adjustment (legacy)


def test_renorm_legacy_clipping_five_steps():
    # testRenorm: (4, 3), axis 1, gamma 2, beta 3, eps 1e-3, momentum .99, renorm_momentum .8, clipped
    shape, momentum, renorm_momentum = (4, 3), 0.99, 0.8
    rmax, rmin, dmax, gamma, beta, epsilon = 1.1, 0.9, 0.1, 2.0, 3.0, 0.001
    layer = BatchNormalization(axis=1, gamma_initializer=gamma, beta_initializer=beta, epsilon=epsilon,
                               momentum=momentum, renorm=True, renorm_momentum=renorm_momentum,
                               renorm_clipping={"rmax": rmax, "rmin": rmin, "dmax": dmax})
    moving_mean, moving_stddev, renorm_mean, renorm_stddev = 0.0, 1.0, 0.0, 1.0
    rng = np.random.default_rng(21)
    clipped = False
    for _ in range(5):
        x = rng.random(shape).astype(np.float32)
        mean, variance = x.mean(0), x.var(0)
        stddev = np.sqrt(variance + epsilon)
        r_raw, d_raw = stddev / renorm_stddev, (mean - renorm_mean) / renorm_stddev
        r, d = r_raw.clip(rmin, rmax), d_raw.clip(-dmax, dmax)
        clipped |= bool((r != r_raw).any() or (d != d_raw).any())
        y_train = ((x - mean) / stddev * r + d) * gamma + beta
        renorm_mean += (mean - renorm_mean) * (1.0 - renorm_momentum)
        renorm_stddev += (stddev - renorm_stddev) * (1.0 - renorm_momentum)
        moving_mean += (mean - moving_mean) * (1.0 - momentum)
        moving_stddev += (stddev - moving_stddev) * (1.0 - momentum)
        y_test = ((x - moving_mean) / (moving_stddev * moving_stddev) ** 0.5 * gamma) + beta
        np.testing.assert_allclose(npy(layer(t(x), training=True)), y_train, atol=1e-5)
        # test-time output is (x - moving_mean) / sqrt(moving_variance + eps) = / moving_stddev
        np.testing.assert_allclose(npy(layer(t(x), training=False)), y_test, atol=1e-5)
    assert clipped  # the clipping was exercised


def test_renorm_no_clipping_same_momentum_gives_same_test_train():
    # testRenormNoClippingSameMomentumGivesSameTestTrain, with the current formulation: renorm_mean/
    # renorm_stddev and moving_mean/moving_stddev start equal and follow the same update, and
    # sqrt(moving_variance + eps) == moving_stddev, so the training output (pre-update renorm stats)
    # equals the inference output computed first (pre-update moving stats). Step 0 differs by ~eps/2
    # because moving_variance starts at 1 = moving_stddev^2, not moving_stddev^2 - eps.
    shape, momentum, gamma, beta, epsilon = (4, 3), 0.9, 2.0, 3.0, 0.001
    layer = BatchNormalization(axis=1, gamma_initializer=gamma, beta_initializer=beta, epsilon=epsilon,
                               momentum=momentum, renorm=True, renorm_clipping=None, renorm_momentum=momentum)
    rng = np.random.default_rng(8)
    for step in range(6):
        x = t(rng.random(shape))
        y_test = layer(x, training=False)
        y_train = layer(x, training=True)
        atol = epsilon * 1.5 if step == 0 else 1e-5
        np.testing.assert_allclose(npy(y_train), npy(y_test), atol=atol)
        if step > 0:
            assert not np.allclose(npy(y_train), npy(layer(x, training=False)), atol=1e-4)  # after the update


def _adjustment_arrays(rng, channels):
    return rng.uniform(0.5, 1.5, channels).astype(np.float32), rng.uniform(-0.2, 0.2, channels).astype(np.float32)


def test_adjustment():
    shape, momentum, gamma, beta, epsilon = (4, 3), 0.99, 2.0, 3.0, 0.001
    rng = np.random.default_rng(31)
    adj_scale, adj_bias = _adjustment_arrays(rng, shape[-1:])
    seen_shapes = []
    layer = BatchNormalization(axis=1, gamma_initializer=gamma, beta_initializer=beta, epsilon=epsilon,
                               momentum=momentum,
                               adjustment=lambda s: (seen_shapes.append(tuple(s)) or adj_scale, adj_bias))
    moving_mean, moving_variance = 0.0, 1.0
    for _ in range(5):
        x = rng.random(shape).astype(np.float32)
        y_train_val = layer(t(x), training=True)
        y_test_val = layer(t(x), training=False)
        mean, variance = x.mean(0), x.var(0)
        y_train = (((x - mean) / (variance + epsilon) ** 0.5) * adj_scale + adj_bias) * gamma + beta
        moving_mean += (mean - moving_mean) * (1.0 - momentum)
        moving_variance += (variance - moving_variance) * (1.0 - momentum)
        y_test = ((x - moving_mean) / (moving_variance + epsilon) ** 0.5 * gamma) + beta
        np.testing.assert_allclose(npy(y_train_val), y_train, atol=1e-5)
        np.testing.assert_allclose(npy(y_test_val), y_test, atol=1e-5)
    assert seen_shapes and all(s == shape for s in seen_shapes)
    assert "adjustment" not in layer.get_config()  # not serializable, dropped as Keras does


def test_renorm_with_adjustment():
    shape, momentum, renorm_momentum = (4, 3), 0.99, 0.8
    rmax, rmin, dmax, gamma, beta, epsilon = 1.1, 0.9, 0.1, 2.0, 3.0, 0.001
    rng = np.random.default_rng(32)
    adj_scale, adj_bias = _adjustment_arrays(rng, shape[-1:])
    layer = BatchNormalization(axis=1, gamma_initializer=gamma, beta_initializer=beta, epsilon=epsilon,
                               momentum=momentum, renorm=True, renorm_momentum=renorm_momentum,
                               renorm_clipping={"rmax": rmax, "rmin": rmin, "dmax": dmax},
                               adjustment=lambda _: (adj_scale, adj_bias))
    moving_mean, moving_stddev, renorm_mean, renorm_stddev = 0.0, 1.0, 0.0, 1.0
    for _ in range(5):
        x = rng.random(shape).astype(np.float32)
        y_train_val = layer(t(x), training=True)
        y_test_val = layer(t(x), training=False)
        mean, variance = x.mean(0), x.var(0)
        stddev = np.sqrt(variance + epsilon)
        r = (stddev / renorm_stddev).clip(rmin, rmax)
        d = ((mean - renorm_mean) / renorm_stddev).clip(-dmax, dmax)
        y_train = (((x - mean) / stddev * r + d) * adj_scale + adj_bias) * gamma + beta
        renorm_mean += (mean - renorm_mean) * (1.0 - renorm_momentum)
        renorm_stddev += (stddev - renorm_stddev) * (1.0 - renorm_momentum)
        moving_mean += (mean - moving_mean) * (1.0 - momentum)
        moving_stddev += (stddev - moving_stddev) * (1.0 - momentum)
        y_test = ((x - moving_mean) / (moving_stddev * moving_stddev) ** 0.5 * gamma) + beta
        np.testing.assert_allclose(npy(y_train_val), y_train, atol=1e-5)
        np.testing.assert_allclose(npy(y_test_val), y_test, atol=1e-5)


# ----------------------------------------------------------------------------- TFK: x + 100 moving statistics


@pytest.mark.parametrize("shape, axis", [
    ((5, 4, 3), 1),             # test3DInputAxis1
    ((5, 4, 3), 2),             # test3DInputAxis2
    ((5, 4, 5, 6), 1),          # test4DInputAxis1
    ((5, 4, 5, 6), 2),          # test4DInputAxis2
    ((5, 4, 5, 6), 3),          # test4DInputAxis3
    ((5, 4, 5, 6), -1),         # testNegativeAxis
    ((5, 4, 3), [1, 2]),        # test3DInputMultiAxis12
    ((5, 3, 4, 4, 3), [1, 2, 3]),  # test5DInputMultiAxis123
])
def test_moving_statistics_converge(shape, axis):
    epsilon = 1e-3
    layer = BatchNormalization(axis=axis, epsilon=epsilon, momentum=0.9)
    x = (np.random.default_rng(sum(shape)).random(shape) + 100).astype(np.float32)
    red = reduce_axes_for(len(shape), axis)
    x64 = x.astype(np.float64)
    normalized = (x64 - x64.mean(axis=red, keepdims=True)) / np.sqrt(x64.var(axis=red, keepdims=True) + epsilon)
    for _ in range(100):
        y = npy(layer(t(x), training=True))
        np.testing.assert_allclose(y, normalized, atol=1e-3)  # the axis is normalized during training
    mean, var = x64.mean(axis=red), x64.var(axis=red)
    np.testing.assert_allclose(npy(layer.moving_mean), mean, atol=1e-2)
    np.testing.assert_allclose(npy(layer.moving_variance), var, atol=1e-2)
    y = npy(layer(t(x), training=False))  # inference normalizes with the moving statistics
    assert abs(y.mean()) < 0.1 and abs(y.std() - 1.0) < 0.1


def test_multi_axis_invalid():
    x = torch.rand(6, 5, 4, 3)
    for axis in ([1, 4], [-5, 1]):
        with pytest.raises(ValueError):
            BatchNormalization(axis=axis)(x, training=True)
    with pytest.raises(ValueError):
        BatchNormalization(axis=[1, 2, 1])


# ----------------------------------------------------------------------------- TFK: training-loop checks


@pytest.mark.parametrize("shape, axis, dtype, atol", [
    ((1000, 4, 4, 3), -1, torch.float32, 0.1),  # test_batchnorm_convnet_channel_last
    ((1000, 3, 4, 4), 1, torch.float32, 0.1),   # test_batchnorm_convnet (axis 1)
    ((1000, 2, 2, 2), -1, torch.float32, 0.2),  # test_batchnorm_correctness
    ((1000, 2, 2, 2), -1, torch.float16, 0.2),  # test_batchnorm_correctness_float16
])
def test_fit_then_predict_is_normalized(shape, axis, dtype, atol):
    rng = np.random.default_rng(9)
    x = rng.normal(5.0, 10.0, shape).astype(np.float32)
    layer = BatchNormalization(axis=axis, momentum=0.8)
    layer.build(shape)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    for _ in range(4):  # 4 epochs, batch 32, MSE to the input
        for start in range(0, shape[0], 32):
            batch = t(x[start:start + 32], dtype)
            optimizer.zero_grad()
            loss = (layer(batch, training=True).float() - batch.float()).square().mean()
            loss.backward()
            optimizer.step()
    out = npy(layer(t(x, dtype), training=False).float())
    ndim = len(shape)
    out = (out - param_view(layer.beta, ndim, axis)) / param_view(layer.gamma, ndim, axis)
    red = reduce_axes_for(ndim, axis)
    np.testing.assert_allclose(out.mean(axis=red), 0.0, atol=atol)
    np.testing.assert_allclose(out.std(axis=red), 1.0, atol=atol)


def test_eager_batchnorm_ten_calls_on_constant():
    # test_eager_batchnorm_in_custom_model_call_with_tf_function: 10 training calls on 0.5
    layer = BatchNormalization()
    x = torch.full((4, 3), 0.5)
    for _ in range(10):
        layer(x, training=True)
    np.testing.assert_allclose(npy(layer.moving_mean), 0.047, atol=3e-3)
    np.testing.assert_allclose(npy(layer.moving_variance), 0.9, atol=3e-2)


def test_bessels_correction_torch_vocabulary():
    # TFK test_bessels_correction: fused tf.keras stores the unbiased variance (moving_variance == 1.0
    # for x = [0, 2], momentum .5, initial variance 0); normkit.BatchNorm does that with
    # unbiased_running_var=True (PyTorch's default), normkit.keras is Keras 3 (biased: 0.5).
    for shape in [(2, 1, 1, 1), (2, 1, 1, 1, 1)]:
        x = torch.tensor([0.0, 2.0]).reshape(shape)
        bn = normkit.BatchNorm(1, momentum=0.5, running_var_initializer="zeros").train()
        bn(x)
        assert float(bn.running_var) == 1.0
        layer = BatchNormalization(momentum=0.5, moving_variance_initializer="zeros", axis=1)
        layer(x, training=True)
        assert float(layer.moving_variance) == 0.5


# ----------------------------------------------------------------------------- regularizers, constraints


@pytest.mark.parametrize("name, formula", [
    ("l1", lambda w: 0.01 * np.abs(w).sum()),
    ("l2", lambda w: 0.01 * np.square(w).sum()),
    ("l1_l2", lambda w: 0.01 * np.abs(w).sum() + 0.01 * np.square(w).sum()),  # (tf.keras: both factors 0.01)
])
def test_regularizer_values(name, formula):
    rng = np.random.default_rng(12)
    layer = BatchNormalization(gamma_regularizer=name, beta_regularizer=name)
    layer.build((None, 4))
    gamma, beta = rng.normal(1, 1, 4).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32)
    layer.set_weights([gamma, beta, np.zeros(4), np.ones(4)])
    losses = [float(loss.detach()) for loss in layer.losses]
    np.testing.assert_allclose(losses, [formula(gamma), formula(beta)], rtol=1e-5)
    model = torch.nn.Sequential(layer)
    np.testing.assert_allclose(float(normkit.regularization_loss(model).detach()), formula(gamma) + formula(beta), rtol=1e-5)
    layer.trainable = False  # Keras: only trainable weights are regularized
    assert layer.losses == []


@pytest.mark.parametrize("how", ["trainable=False", "freeze()", "requires_grad_(False)"])
def test_constraints_leave_what_is_not_trained_alone(how):
    """Keras applies a constraint to the variables it trains only: a frozen BN keeps its pretrained gamma."""
    layer = BatchNormalization(gamma_constraint="max_norm", beta_constraint="non_neg")
    layer.build((None, 3))
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor([3.0, 4.0, 0.0]))  # norm 5 > max_norm's 2
        layer.beta.copy_(torch.tensor([-1.0, 2.0, -3.0]))
    if how == "trainable=False":
        layer.trainable = False
    elif how == "freeze()":
        layer.bn.freeze()
    else:
        layer.gamma.requires_grad_(False)
    model = torch.nn.Sequential(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    normkit.constrain_after_step(optimizer, model)
    optimizer.step()
    normkit.apply_constraints(model)
    np.testing.assert_array_equal(npy(layer.gamma), [3.0, 4.0, 0.0])
    np.testing.assert_array_equal(npy(layer.beta), [0.0, 2.0, 0.0] if how == "requires_grad_(False)"
                                  else [-1.0, 2.0, -3.0])
    if how == "trainable=False":  # trained again: constrained again
        layer.trainable = True
        normkit.apply_constraints(model)
        np.testing.assert_allclose(npy(layer.gamma), [1.2, 1.6, 0.0], rtol=1e-6)


def test_constraints_applied_after_optimizer_step():
    layer = BatchNormalization(gamma_constraint="non_neg", beta_constraint=normkit.options.MaxNorm(0.5))
    layer.build((None, 4))
    model = torch.nn.Sequential(layer)

    def step(optimizer):
        # SGD (lr 1) on 100 * sum(gamma) - 100 * sum(beta): gamma -= 100, beta += 100
        optimizer.zero_grad()
        (100.0 * layer.gamma.sum() - 100.0 * layer.beta.sum()).backward()
        optimizer.step()

    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    step(optimizer)
    assert (npy(layer.gamma) < 0).any() and np.linalg.norm(npy(layer.beta)) > 0.5  # unconstrained by the step
    normkit.apply_constraints(model)
    assert (npy(layer.gamma) >= 0).all()
    beta = npy(layer.beta)
    np.testing.assert_allclose(np.linalg.norm(beta), 0.5, rtol=1e-5)

    handle = normkit.constrain_after_step(optimizer, model)
    before = npy(layer.beta).copy()
    step(optimizer)
    assert (npy(layer.gamma) >= 0).all()
    norm = np.linalg.norm(npy(layer.beta))
    np.testing.assert_allclose(norm, 0.5, rtol=1e-5)
    # Keras' MaxNorm formula: w * clip(norm, 0, max) / (1e-7 + norm), applied to the post-step value
    raw = before + 100.0
    np.testing.assert_allclose(npy(layer.beta), raw * 0.5 / (1e-7 + np.linalg.norm(raw)), rtol=1e-5)
    handle.remove()
    step(optimizer)
    assert (npy(layer.gamma) < 0).any()  # hook removed: no projection any more
    assert layer.moving_mean.requires_grad is False


def test_weight_order_and_names_match_keras():
    layer = BatchNormalization(renorm=True, scale=False)
    layer.build((None, 3))
    weights = [layer.beta, layer.moving_mean, layer.moving_variance, layer.moving_stddev, layer.renorm_mean,
               layer.renorm_stddev]
    assert [id(w) for w in layer.weights] == [id(w) for w in weights]
    with pytest.raises(ValueError):
        layer.set_weights(layer.get_weights()[:-1])


def test_set_weights_on_an_unbuilt_layer_says_it_is_not_built():
    # Keras 3.15.1: "... with a weight list of length 4, but the layer was expecting 0 weights"; normkit said
    # "expects 0 weights ()", as if the layer had none at all.
    with pytest.raises(ValueError, match="not built yet.*build"):
        BatchNormalization(name="fresh").set_weights([np.ones(3)] * 4)
    BatchNormalization().set_weights([])  # (nothing to set: as Keras, no error)


def test_set_weights_with_an_array_that_is_no_numbers_changes_nothing():
    # Converted while copying, an array of text third in the list failed after gamma and beta were overwritten.
    layer = BatchNormalization()
    layer.build((None, 3))
    given = [np.full(3, 2.0), np.full(3, 3.0), np.array(["a", "b", "c"]), np.ones(3)]
    with pytest.raises(TypeError, match="'moving_mean'.*not numbers"):
        layer.set_weights(given)
    for weight, initial in zip(layer.get_weights(), [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)], strict=True):
        np.testing.assert_array_equal(weight, initial)


def test_get_weights_is_a_snapshot():
    # Keras' get_weights() returns copies (Keras 3.15.1, torch backend: the arrays taken before a training step
    # keep their values after it), the usual way to keep a checkpoint in memory; a view of the layer's buffers
    # would follow the training step and silently hold the new moving statistics.
    rng = np.random.default_rng(21)
    layer = BatchNormalization(momentum=0.5)
    layer.build((None, 3))
    given = [rng.uniform(0.5, 1.5, 3), rng.normal(0, 1, 3), rng.normal(0, 1, 3), rng.uniform(1, 2, 3)]
    layer.set_weights(given)
    taken = layer.get_weights()
    x = rng.normal(3.0, 2.0, (16, 3))
    layer(t(x), training=True).sum().backward()
    with torch.no_grad():
        layer.gamma.add_(1.0)
    for before, value in zip(taken, given, strict=True):
        np.testing.assert_array_equal(before, value.astype(np.float32))
    np.testing.assert_allclose(npy(layer.moving_mean), 0.5 * given[2] + 0.5 * x.mean(axis=0), rtol=1e-5)
    taken[2][:] = 100.0  # (and the other way: writing into the arrays does not reach the layer)
    np.testing.assert_allclose(npy(layer.moving_mean), 0.5 * given[2] + 0.5 * x.mean(axis=0), rtol=1e-5)


def test_mask_broadcasting_along_a_non_feature_axis_matches_reference():
    # Regression: a padding mask that broadcasts along a middle axis (Keras' (1, 2, 1) mask on
    # (1, 2, 3, 4) input, here with varied values) must weight every position it covers.
    rng = np.random.default_rng(14)
    x = rng.normal(1.0, 2.0, (3, 4, 5, 2))
    mask = np.array([[1, 0, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=bool)[:, :, None]  # (3, 4, 1)
    layer = BatchNormalization(momentum=0.5)
    xt = t(x).requires_grad_(True)
    y = layer(xt, training=True, mask=t(mask, torch.bool))
    rm, rv = np.zeros(2), np.ones(2)
    full_mask = mask[..., None]  # expanded at the last axis, as Keras does: (3, 4, 1, 1)
    want = normkit.reference.batch_norm(x, rm, rv, np.ones(2), np.zeros(2), True, 0.5, 1e-3, axis=-1,
                                        mask=full_mask, unbiased_running_var=False)
    np.testing.assert_allclose(npy(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(npy(layer.moving_mean), rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(npy(layer.moving_variance), rv, rtol=1e-5, atol=1e-6)
    g = rng.normal(size=x.shape)
    (y * t(g)).sum().backward()
    dx, _, _ = normkit.reference.batch_norm_backward(g, x, np.zeros(2), np.ones(2), np.ones(2), np.zeros(2), True,
                                                     1e-3, axis=-1, mask=full_mask)
    np.testing.assert_allclose(npy(xt.grad), dx, rtol=1e-4, atol=1e-5)


def test_float64_input_is_cast_to_the_layer_dtype_as_keras_does():
    """Keras casts floating inputs to the layer's dtype (float32): a float64 batch works, gives float32."""
    layer = BatchNormalization(axis=-1)
    x = np.random.default_rng(0).normal(size=(16, 3)) * 2 + 1
    y = layer(torch.tensor(x, dtype=torch.float64), training=True)
    assert y.dtype == torch.float32 and layer.bn.running_mean.dtype == torch.float32
    expected = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-3)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_numpy_scalar_arguments_are_numbers_as_in_keras():
    """Keras takes ``float(momentum)``, so NumPy scalars (a config computed with NumPy) are valid arguments."""
    layer = BatchNormalization(momentum=np.float32(0.5), epsilon=np.float32(0.25), renorm=True,
                               renorm_momentum=np.float32(0.5))
    assert (layer.momentum, layer.epsilon, layer.renorm_momentum) == (0.5, 0.25, 0.5)
    assert all(type(value) is float for value in (layer.momentum, layer.epsilon, layer.renorm_momentum))
    x = np.array([[1.0], [3.0]])
    layer(t(x), training=True)
    # Keras' rule: moving = 0.5 * initial + 0.5 * batch; moving_stddev = 0.5 * 1 + 0.5 * sqrt(var + eps)
    np.testing.assert_allclose(npy(layer.moving_mean), [1.0], rtol=1e-6)
    np.testing.assert_allclose(npy(layer.moving_stddev), [0.5 + 0.5 * np.sqrt(1.0 + 0.25)], rtol=1e-6)


def test_numpy_input_to_a_float64_layer_stays_float64():
    """Keras converts array inputs to the layer's dtype: NumPy float64 data of a float64 layer is not rounded
    to float32 on the way in (it was: 1e-4 relative error here, where float64 gives 1e-12)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 3)) * 1e-3 + 1.0
    layer = BatchNormalization(dtype="float64", momentum=0.5)
    y = layer(x, training=True)
    rm, rv = np.zeros(3), np.ones(3)
    want = normkit.reference.batch_norm(x, rm, rv, np.ones(3), np.zeros(3), True, 0.5, 1e-3, axis=-1,
                                        unbiased_running_var=False)
    assert y.dtype == torch.float64
    np.testing.assert_allclose(npy(y), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(npy(layer.moving_variance), rv, rtol=1e-12)
    np.testing.assert_allclose(npy(layer(x, training=False)), normkit.reference.batch_norm(
        x, rm, rv, np.ones(3), np.zeros(3), False, 0.5, 1e-3, axis=-1), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- dtype policies, inputs, build rank


@pytest.mark.parametrize("policy,compute", [("mixed_float16", torch.float16), ("mixed_bfloat16", torch.bfloat16)])
def test_mixed_policy_casts_inputs_and_keeps_float32_weights(policy, compute):
    """Keras' mixed policies: float32 inputs are cast to the compute dtype, the output comes in it, weights float32."""
    layer = BatchNormalization(dtype=policy, momentum=0.5)
    x = np.array([[-1000.0], [1000.0], [3.3], [-7.1]], dtype=np.float32)
    y = layer(t(x), training=True)
    assert y.dtype == compute and all(w.dtype == np.float32 for w in layer.get_weights())
    rounded = t(x).to(compute).double().numpy()  # what Keras normalizes: the input after the cast
    expected = (rounded - rounded.mean(axis=0)) / np.sqrt(rounded.var(axis=0) + 1e-3)
    np.testing.assert_allclose(npy(y.double()), expected, rtol=1e-2 if compute == torch.bfloat16 else 1e-3)
    np.testing.assert_allclose(npy(layer.moving_variance), 0.5 + 0.5 * rounded.var(axis=0), rtol=1e-6)
    assert layer.keras_config()["dtype"]["config"]["name"] == policy
    assert BatchNormalization.from_config(layer.keras_config()).dtype_policy == policy


class _PolicyObject:
    """Keras' DTypePolicy as the layer reads it (Keras is not needed here): an object whose ``name`` is the policy's."""

    def __init__(self, name):
        self.name = name

    __hash__ = None  # (Keras' policies are unhashable: looked up as a name, one failed with "unhashable type")


@pytest.mark.parametrize("dtype,policy", [(_PolicyObject("mixed_float16"), "mixed_float16"),
                                          (_PolicyObject("float64"), "float64"), (np.float64, "float64"),
                                          (np.dtype("float16"), "float16")])
def test_policy_objects_and_numpy_dtypes_are_policies_as_in_keras(dtype, policy):
    """Keras' layers take a DTypePolicy object or a NumPy dtype as their dtype, as they take its name; here the
    object failed with TypeError "unhashable type: 'DTypePolicy'" and NumPy dtypes were refused."""
    layer = BatchNormalization(dtype=dtype)
    assert layer.dtype_policy == policy
    named = BatchNormalization(dtype=policy)
    x = t(np.random.default_rng(0).normal(size=(6, 3)))
    assert layer(x, training=True).dtype == named(x, training=True).dtype
    for ours, theirs in zip(layer.get_weights(), named.get_weights(), strict=True):
        assert ours.dtype == theirs.dtype
    with pytest.raises(ValueError, match="dtype policy name"):
        BatchNormalization(dtype=_PolicyObject("int8_from_float32"))  # (a quantized policy: said so, by name)


def test_half_precision_moving_statistics_round_once():
    """float16 variables: the moving average is blended in float32 and rounded once (Keras: 1565, not 1566)."""
    x = torch.tensor([[0.0], [3.0]], dtype=torch.float16) * 37.3
    layer = BatchNormalization(momentum=0.5, dtype=torch.float16)
    layer(x, training=True)
    values = x.double().numpy()
    expected_var = np.float16(0.5 * 1.0 + 0.5 * values.var(axis=0))  # float64 blend, one rounding
    expected_mean = np.float16(0.5 * values.mean(axis=0))
    np.testing.assert_array_equal(layer.get_weights()[3], expected_var)
    np.testing.assert_array_equal(layer.get_weights()[2], expected_mean)
    assert float(expected_var[0]) == 1565.0


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_inputs_are_cast_to_the_layer_dtype(dtype):
    x = torch.tensor([[1, 2, 0], [4, 6, 1], [0, 1, 1]]).to(dtype)
    ours, floats = BatchNormalization(), BatchNormalization()
    y = ours(x, training=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, floats(x.float(), training=True), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["a/b", 3, b"bn"])
def test_a_name_keras_refuses_is_refused(name):
    """Keras' rule for a layer's name (a string without '/'; keras 3.15.1 raises ValueError for each of these), when
    made and when set later; only None is named automatically (an empty string stays, as in Keras)."""
    with pytest.raises(ValueError, match="name must be a string and cannot contain the character '/'"):
        BatchNormalization(name=name)
    layer = BatchNormalization(name="bn")
    with pytest.raises(ValueError, match="name must be a string"):
        layer.name = name
    assert layer.name == "bn"
    assert BatchNormalization(name="").name == "" and BatchNormalization(name=None).name.startswith("batch_norm")


@pytest.mark.parametrize("make", [lambda: torch.ones(4, 3, dtype=torch.complex64) * (1 + 2j),
                                  lambda: np.full((4, 3), 1 + 2j), lambda: [[1 + 2j, 3j, 1.0]] * 4],
                         ids=["tensor", "array", "list"])
def test_complex_inputs_are_refused_not_cast(make):
    """Keras' cast to the compute dtype keeps the real part only (torch warns; TensorFlow does it silently): a
    deliberate difference (docs/keras.md), refused with the views that keep both parts, the layer unbuilt."""
    layer = BatchNormalization()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (torch's "discards the imaginary part" warning would mean the cast ran)
        with pytest.raises(TypeError, match=r"inputs has dtype torch.complex\d+.*imaginary part.*view_as_real"):
            layer(make(), training=True)
    assert layer.bn is None


@pytest.mark.parametrize("as_array", [False, True])
@pytest.mark.parametrize("policy,dtype", [("mixed_float16", torch.float16), ("mixed_bfloat16", torch.bfloat16),
                                          ("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_integer_inputs_keep_float32_math_under_half_policies(policy, dtype, as_array):
    """Keras computes integer inputs in float32 whatever the policy (its result_type with float32) and rounds only
    the output and the stored statistics. normkit cast them to the half compute dtype first, rounding every integer
    above 256 (bfloat16) or 2048 (float16): a bfloat16 layer saw 2051, 2053, 2055 as one value, variance 0 (found
    by a differential fuzz against Keras 3.15.1)."""
    from normkit import reference as R

    x = np.array([[2049, 2051], [2301, 2053], [2101, 2055]])
    gamma, beta = np.array([1.5, -0.5], np.float32), np.array([0.25, 1.0], np.float32)  # (exact in half)
    layer = BatchNormalization(momentum=0.0, epsilon=1e-3, dtype=policy)
    layer.build((3, 2))
    layer.set_weights([gamma, beta, np.zeros(2, np.float32), np.ones(2, np.float32)])
    y = layer(x if as_array else torch.tensor(x), training=True)
    assert y.dtype == dtype
    # Keras 3.15.1's moving means (torch backend): the exact means in float32, rounded to the variables' dtype.
    keras_means = {"mixed_float16": [2150.333251953125, 2053.0], "mixed_bfloat16": [2150.333251953125, 2053.0],
                   "float16": [2150.0, 2052.0], "bfloat16": [2144.0, 2048.0]}[policy]
    np.testing.assert_array_equal(np.asarray(layer.get_weights()[2], dtype=np.float32), np.float32(keras_means))
    # Output and variance against the float64 reference on the integers themselves (Keras' own variance is
    # the one-pass E[x^2] - E[x]^2 in float32: 2.5 for the second column, not 8/3, the documented difference).
    expected = R.batch_norm(x.astype(np.float64), np.zeros(2), np.ones(2), gamma.astype(np.float64),
                            beta.astype(np.float64), training=True, eps=1e-3, axis=-1)
    ulp = torch.finfo(dtype).eps
    np.testing.assert_allclose(npy(y.double()), expected, rtol=ulp, atol=ulp)
    variables = layer.moving_variance.dtype
    np.testing.assert_allclose(npy(layer.moving_variance.double()), x.var(axis=0),
                               rtol=torch.finfo(variables).eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", [lambda: BatchNormalization(momentum=0.5, dtype="float64"),
                                  lambda: BatchNormalization(momentum=0.5).double()], ids=["policy", "double"])
def test_half_input_to_a_float64_layer_computes_in_float64(dtype, make):
    """A float16/bfloat16 input to a float64 layer raised a TypeError (the half-input path widened it to float32,
    which met the float64 weights; found by a differential fuzz against Keras 3.15.1, which takes it). Now it
    computes in float64 and returns the input's dtype, normkit's rule for half inputs to a full-precision layer."""
    rng = np.random.default_rng(11)
    x = torch.tensor(rng.normal(size=(4, 3)) * 2 + 1).to(dtype)
    g = torch.tensor(rng.normal(size=(4, 3)), dtype=torch.float32)
    layer = make()
    layer.build((4, 3))
    _half_step_against_reference(layer, x, g, dtype, np.ones(3), np.zeros(3), np.ones(3), 1e-3)
    assert layer.moving_mean.dtype == torch.float64
    seen = x.double().numpy()
    np.testing.assert_allclose(npy(layer.moving_mean), 0.5 * seen.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(npy(layer.moving_variance), 0.5 + 0.5 * seen.var(axis=0), rtol=1e-12)
    y = layer(x, training=False)
    assert y.dtype == dtype
    expected = (seen - npy(layer.moving_mean)) / np.sqrt(npy(layer.moving_variance) + 1e-3)
    np.testing.assert_allclose(npy(y.double()), expected, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


def test_bfloat16_weights_travel_as_keras_arrays():
    layer = BatchNormalization(dtype=torch.bfloat16)
    layer.build((8, 3))
    values = [np.array([1.5, -2.0, 0.25], dtype=np.float32) * (i + 1) for i in range(4)]
    layer.set_weights(values)
    for ours, given in zip(layer.get_weights(), values):
        np.testing.assert_array_equal(np.asarray(ours, dtype=np.float32), given)  # exact in bfloat16
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert all(w.dtype == ml_dtypes.bfloat16 for w in layer.get_weights())  # what Keras' get_weights returns
    layer.set_weights([v.astype(ml_dtypes.bfloat16) for v in values])
    for ours, given in zip(layer.get_weights(), values):
        np.testing.assert_array_equal(np.asarray(ours, dtype=np.float32), given)


def test_the_rank_is_fixed_at_build():
    """Keras' InputSpec: after a rank-2 build, a rank-3 input is refused (axis -1 would name another axis)."""
    layer = BatchNormalization()
    layer(torch.randn(4, 3), training=True)
    with pytest.raises(ValueError, match=r"built for inputs of rank 2.*expected ndim=2, found ndim=3"):
        layer(torch.randn(2, 3, 5), training=True)
    layer(torch.randn(7, 3), training=False)  # another batch size is fine


@pytest.mark.parametrize("name,scale,mode,distribution", [
    ("glorot_uniform", 1.0, "fan_avg", "uniform"), ("GlorotNormal", 1.0, "fan_avg", "truncated_normal"),
    ("lecun_uniform", 1.0, "fan_in", "uniform"), ("LecunNormal", 1.0, "fan_in", "truncated_normal"),
    ("he_uniform", 2.0, "fan_in", "uniform"), ("HeNormal", 2.0, "fan_in", "truncated_normal"),
    ("variance_scaling", 1.0, "fan_in", "truncated_normal"),
])
def test_variance_scaling_initializers_follow_keras_formulas(name, scale, mode, distribution):
    """Keras' VarianceScaling family on a 1-D weight of n values (fan_in = fan_out = n): uniform within
    +-sqrt(3 scale / n); truncated normal with stddev sqrt(scale / n) (before the cut at 2 stddevs)."""
    n = 20000
    layer = BatchNormalization(gamma_initializer=name)
    layer.build((2, n))
    gamma = layer.get_weights()[0].astype(np.float64)
    spread = np.sqrt(scale / n)
    if distribution == "uniform":
        limit = np.sqrt(3.0) * spread
        assert gamma.min() >= -limit and gamma.max() <= limit and gamma.max() > 0.99 * limit
        assert abs(gamma.std() - spread) < 0.03 * spread
    else:
        stddev = spread / 0.87962566103423978
        assert np.abs(gamma).max() <= 2 * stddev * (1 + 1e-6) and np.abs(gamma).max() > 1.9 * stddev
        assert abs(gamma.std() - spread) < 0.03 * spread  # the cut brings the stddev back to sqrt(scale / n)


@pytest.mark.parametrize("value", ["RandomNormal", "NonNeg", "MaxNorm", "UnitNorm", "MinMaxNorm", "L1L2", "L2"])
def test_keras_class_names_are_accepted_as_strings(value):
    option = {"RandomNormal": "gamma_initializer", "L1L2": "gamma_regularizer", "L2": "gamma_regularizer"}.get(
        value, "gamma_constraint")
    layer = BatchNormalization(**{option: value})
    layer.build((4, 3))
    kind = option.rsplit("_", 1)[1]
    assert layer.keras_config()[option]["class_name"] == value
    assert layer.keras_config()[option]["module"] == f"keras.{kind}s"


@pytest.mark.parametrize("option, value, exact", [
    ("gamma_initializer", "ZEROS", "zeros"), ("gamma_initializer", "Glorot_Uniform", "glorot_uniform"),
    ("gamma_constraint", "Non_Neg", "non_neg"), ("gamma_constraint", "MAX_NORM", "max_norm"),
    ("gamma_regularizer", "L1_L2", "l1_l2"),
])
def test_names_are_case_sensitive_as_in_keras(option, value, exact):
    """Keras 3 takes a snake-case name or the class name exactly ("zeros", "Zeros"; "ZEROS" is a ValueError): so does
    normkit, naming the spelling it knows (it took any case, so a config Keras refuses loaded here)."""
    with pytest.raises(ValueError, match=f"{option}={value!r} is not a known.*case-sensitive.*{exact!r}"):
        BatchNormalization(**{option: value})
    BatchNormalization(**{option: exact})


@pytest.mark.parametrize("alias, class_name, config", [
    ("zero", "Zeros", {}), ("one", "Ones", {}),
    ("uniform", "RandomUniform", {"minval": -0.05, "maxval": 0.05, "seed": None}),
    ("normal", "RandomNormal", {"mean": 0.0, "stddev": 0.05, "seed": None}),
])
def test_keras_3_s_short_initializer_aliases(alias, class_name, config):
    """Keras 3 also takes "zero", "one", "uniform" and "normal" (keras.initializers.get gives these classes and
    configs, recorded from Keras 3.15): the same initializers here, written back as Keras' classes."""
    layer = BatchNormalization(gamma_initializer=alias)
    layer.build((2, 20000))
    assert layer.keras_config()["gamma_initializer"]["class_name"] == class_name
    assert layer.keras_config()["gamma_initializer"]["config"] == config
    gamma = layer.gamma.detach().numpy()
    if class_name in ("Zeros", "Ones"):
        np.testing.assert_array_equal(gamma, np.full_like(gamma, 1.0 if class_name == "Ones" else 0.0))
    elif class_name == "RandomUniform":
        assert gamma.min() >= -0.05 and gamma.max() <= 0.05 and abs(gamma.std() - 0.1 / np.sqrt(12)) < 1e-3
    else:
        assert abs(gamma.mean()) < 2e-3 and abs(gamma.std() - 0.05) < 1e-3


def test_l1l2_by_keras_3_s_name_has_factors_zero():
    """Keras 3's "l1l2" is its L1L2 class with the defaults l1 = l2 = 0 (get_config {'l1': 0.0, 'l2': 0.0}); tf.keras'
    "l1_l2" is 0.01 and 0.01."""
    layer = BatchNormalization(gamma_regularizer="l1l2", beta_regularizer="l1_l2")
    layer.build((4, 3))
    with torch.no_grad():
        layer.gamma.fill_(2.0), layer.beta.fill_(-3.0)
    gamma_loss, beta_loss = layer.losses
    assert gamma_loss.item() == 0.0
    assert beta_loss.item() == pytest.approx(0.01 * 3 * 3.0 + 0.01 * 3 * 9.0, rel=1e-6)
    assert layer.keras_config()["gamma_regularizer"]["config"] == {"l1": 0.0, "l2": 0.0}


# ----------------------------------------------------------------------------- half precision: float32 math (audit)

def _half_step_against_reference(layer, x, g, seen_dtype, weight, bias, variance, eps, axis=-1):
    """One training step of ``layer`` against NumPy's float64 reference on the values Keras computes with (the
    input rounded to ``seen_dtype``, the weights as stored): output and input gradient within one rounding
    of the output dtype (Keras casts to float32, computes there and rounds once)."""
    from normkit import reference as R

    leaf = x.clone().requires_grad_()
    y = layer(leaf, training=True)
    (dx,) = torch.autograd.grad(y, leaf, g.to(y.dtype))
    seen = x.to(seen_dtype).double().numpy()
    kwargs = dict(training=True, eps=eps, axis=axis, unbiased_running_var=False)
    expected = R.batch_norm(seen, np.zeros(seen.shape[axis]), variance.copy(), weight, bias, momentum=0.1, **kwargs)
    expected_dx, _, _ = R.batch_norm_backward(g.to(y.dtype).double().numpy(), seen, np.zeros(seen.shape[axis]),
                                              variance.copy(), weight, bias, **{k: v for k, v in kwargs.items()
                                                                               if k != "unbiased_running_var"})
    ulp = torch.finfo(y.dtype).eps  # one unit in the last place, relative (atol: float32 rounding of x * inv_std)
    np.testing.assert_allclose(npy(y.double()), expected, rtol=ulp, atol=2e-5)
    np.testing.assert_allclose(npy(dx.double()), expected_dx, rtol=ulp, atol=2e-5)


@pytest.mark.parametrize("policy,dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_policy_computes_in_float32(policy, dtype):
    """A "float16"/"bfloat16" policy (half-precision variables): Keras computes in float32 with the variables cast
    to it; normkit ran ATen's half kernels, ten times Keras' error on outputs and input gradients with few values
    per channel (found by tests/test_keras_differential.py, seed 264 before the fix)."""
    rng = np.random.default_rng(264)
    for _ in range(20):
        x = torch.tensor(rng.normal(size=(3, 3)) * 2 + 1, dtype=torch.float32)
        g = torch.tensor(rng.normal(size=(3, 3)), dtype=torch.float32)
        weights = [rng.uniform(0.5, 2, 3), rng.normal(size=3), np.zeros(3), np.ones(3)]
        layer = BatchNormalization(momentum=0.9, epsilon=1e-3, dtype=policy)
        layer.build((3, 3))
        layer.set_weights([w.astype(np.float32) for w in weights])
        stored = [w.astype(np.float64) for w in layer.get_weights()]  # (rounded to the policy's dtype)
        _half_step_against_reference(layer, x, g, dtype, stored[0], stored[1], stored[3], 1e-3)
        assert layer.gamma.dtype == dtype
        # the moving statistics: blended in float32, rounded once (the step above used momentum 0.9)
        rounded = x.to(dtype).double().numpy()
        np.testing.assert_allclose(npy(layer.moving_variance.double()), 0.9 + 0.1 * rounded.var(axis=0),
                                   rtol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("center,scale", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("shape,axis", [((2, 4), -1), ((2, 1, 2), 0)])
def test_half_input_computes_in_float32(dtype, center, scale, shape, axis):
    """A half-precision input to a float32 layer: computed in float32 and rounded once, as Keras does. ATen's
    half kernels round intermediates (all in half without a float32 weight and bias), which two values per channel
    amplify in the input gradient (found by tests/test_keras_differential.py, seeds 540 and 648 before the fix)."""
    rng = np.random.default_rng(648)
    channels = shape[axis]
    for _ in range(20):
        x = torch.tensor(rng.normal(size=shape) * 2 + 1, dtype=torch.float32).to(dtype)
        g = torch.tensor(rng.normal(size=shape), dtype=torch.float32)
        layer = BatchNormalization(axis=axis, momentum=0.5, center=center, scale=scale)
        layer.build(shape)
        weight = rng.uniform(0.5, 2, channels).astype(np.float32) if scale else None
        bias = rng.normal(size=channels).astype(np.float32) if center else None
        layer.set_weights([w for w in (weight, bias) if w is not None] + [np.zeros(channels, np.float32),
                                                                          np.ones(channels, np.float32)])
        as64 = (lambda w: None if w is None else w.astype(np.float64))
        _half_step_against_reference(layer, x, g, dtype, as64(weight), as64(bias), np.ones(channels), 1e-3, axis)


def test_a_forward_pre_hook_on_the_inner_layer_keeps_the_mask():
    """A forward pre-hook on ``layer.bn`` that returns the input alone (torch's single-value form, which replaces
    the positional arguments) leaves the masked training call as the reference computes it. (The mask went to
    the inner layer positionally and the hook's return dropped it: unmasked statistics, silently.)"""
    rng = np.random.default_rng(15)
    x = rng.normal(1.0, 2.0, (4, 6, 3))
    mask = np.ones((4, 6), dtype=bool)
    mask[:, 3:] = False
    layer = BatchNormalization(momentum=0.5)
    layer.build(x.shape)
    layer.bn.register_forward_pre_hook(lambda module, args: args[0] * 1.0)
    y = layer(t(x), training=True, mask=t(mask, torch.bool))
    rm, rv = np.zeros(3), np.ones(3)
    want = normkit.reference.batch_norm(x, rm, rv, np.ones(3), np.zeros(3), True, 0.5, 1e-3, axis=-1,
                                        mask=mask[..., None], unbiased_running_var=False)
    np.testing.assert_allclose(npy(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(npy(layer.moving_mean), rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(npy(layer.moving_variance), rv, rtol=1e-5, atol=1e-6)
