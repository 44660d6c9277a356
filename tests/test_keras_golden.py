"""Replay golden values recorded from the real Keras through normkit.keras.BatchNormalization.

tests/data/keras_golden.npz is written by tools/keras_recordings/keras_golden.py in an environment that has
Keras 3 (torch backend) and tf_keras; this test needs neither. For every recorded
configuration the normkit layer gets the same constructor arguments and initial weights,
then the same calls (three training steps and one inference step, same inputs, masks and
training flags); after each call the output, the gradients of sum(y * g) with respect to
the input, gamma and beta, and get_weights() must match what Keras produced.

Tolerances: float32 everywhere, rtol 1e-5 with atol 1e-5 on O(1) values. Keras 3's torch
backend computes the batch variance one-pass (E[x^2] - E[x]^2), normkit two-pass; for
these inputs (mean 0.5, std 1.5, >= 8 values per channel) the difference is ~1e-7
relative, far inside the tolerance, so the tolerance is not hiding that difference.
The masked mean of Keras 3 divides by (count + 1e-7), normkit by count: ~1e-8 relative.

tf.keras' fused configuration (rank 4, unbiased moving variance) is not a normkit.keras
behaviour; it is replayed through normkit.BatchNorm(unbiased_running_var=True) instead.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import normkit
from normkit.keras import BatchNormalization

# Every test runs on ATen's paths and again through normkit.kernels' fused kernel (conftest.py).
pytestmark = pytest.mark.usefixtures("execution")

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "keras_golden.npz")
RTOL, ATOL = 1e-5, 1e-5


def _load():
    with np.load(GOLDEN) as f:
        data = {k: f[k] for k in f.files}
    meta = json.loads(str(data.pop("__meta__")))
    return data, meta


DATA, META = _load()
CONFIG_NAMES = sorted(k for k in META if not k.startswith("__"))
REPLAYED = [name for name in CONFIG_NAMES if not META[name].get("fused")]


def _build(name):
    cfg = META[name]
    kwargs = dict(cfg["kwargs"])
    if cfg["adjustment"]:
        scale, bias = DATA[f"{name}/adj_scale"], DATA[f"{name}/adj_bias"]
        kwargs["adjustment"] = lambda shape: (scale, bias)
    layer = BatchNormalization(**kwargs)
    layer.build(tuple(cfg["shape"]))
    return layer


def _to_normkit(layer, keras_weights):
    """Keras' arrays reshaped to normkit's shapes (tf.keras' ghost/multi-axis weights carry extra 1-dims)."""
    return [np.asarray(w).reshape(tuple(t.shape)) for w, t in zip(keras_weights, layer.weights)]


def _weights(name, prefix, count):
    return [DATA[f"{name}/{prefix}/w{i}"] for i in range(count)]


def test_golden_file_is_small_and_versioned():
    assert os.path.getsize(GOLDEN) < 500_000
    versions = META["__versions__"]
    assert any("keras 3." in v for v in versions["k3"])
    assert len(CONFIG_NAMES) >= 15


@pytest.mark.parametrize("name", REPLAYED)
def test_replay_matches_keras(name):
    cfg = META[name]
    layer = _build(name)
    n_weights = len(cfg["weights"])
    assert [w.shape for w in layer.get_weights()] == [tuple(t.shape) for t in layer.weights]
    assert len(layer.weights) == n_weights, (layer.weights, cfg["weights"])
    init = _weights(name, "init", n_weights)
    layer.set_weights(_to_normkit(layer, init))
    if not cfg["trainable"]:
        layer.trainable = False
    fully_masked = name == "k3_fully_masked"
    for step, training in enumerate(cfg["training"]):
        prefix = f"{name}/step{step}"
        if fully_masked and not training:
            # normkit kept its moving statistics through the fully masked steps (checked below);
            # give it Keras' state so that inference is compared on the same statistics.
            layer.set_weights(_to_normkit(layer, _weights(name, f"step{step - 1}", n_weights)))
        x = torch.tensor(DATA[f"{prefix}/x"], requires_grad=True)
        g = torch.tensor(DATA[f"{prefix}/g"])
        mask = DATA.get(f"{prefix}/mask")
        call = {"training": training}
        if mask is not None:
            call["mask"] = torch.tensor(mask)
        y = layer(x, **call)
        params = {}
        if layer.trainable:
            params = {n: p for n, p in (("gamma", layer.gamma), ("beta", layer.beta)) if p is not None}
        grads = torch.autograd.grad((y * g).sum(), [x] + list(params.values()))
        where = f"{name} step {step} (training={training})"
        np.testing.assert_allclose(y.detach().numpy(), DATA[f"{prefix}/y"], RTOL, ATOL, err_msg=f"y, {where}")
        np.testing.assert_allclose(grads[0].numpy(), DATA[f"{prefix}/dx"], RTOL, ATOL, err_msg=f"dx, {where}")
        recorded = sorted(k.rsplit("/", 1)[1][1:] for k in DATA if k.startswith(prefix + "/d") and k != prefix + "/dx")
        assert sorted(params) == recorded, where
        for pname, grad in zip(params, grads[1:]):
            np.testing.assert_allclose(grad.numpy().ravel(), DATA[f"{prefix}/d{pname}"].ravel(), RTOL, ATOL,
                                       err_msg=f"d{pname}, {where}")
        keras_after = _to_normkit(layer, _weights(name, f"step{step}", n_weights))
        if fully_masked and training:
            # Deliberate difference (docs/keras.md): a batch with no valid position leaves normkit's
            # moving statistics unchanged; Keras 3 averages in mean = var = 0.
            for got, start in zip(layer.get_weights(), _to_normkit(layer, init)):
                np.testing.assert_array_equal(got, start, err_msg=where)
            momentum = cfg["kwargs"].get("momentum", 0.99)
            for i, wname in enumerate(cfg["weights"]):
                if wname in ("moving_mean", "moving_variance"):
                    np.testing.assert_allclose(keras_after[i], init[i] * momentum ** (step + 1), 1e-6, 1e-7)
            continue
        for wname, got, want in zip(cfg["weights"], layer.get_weights(), keras_after):
            np.testing.assert_allclose(got, want, RTOL, ATOL, err_msg=f"{wname} after {where}")


FUSED = sorted(name for name in CONFIG_NAMES if META[name].get("fused"))


def test_fused_configs_are_recorded():
    assert FUSED == ["tfk_fused_4d"]


@pytest.mark.parametrize("name", FUSED)
def test_tf_keras_fused_kernel_is_normkit_batchnorm_with_unbiased_running_var(name):
    """tf.keras' fused kernel (rank 4/5) feeds the UNBIASED batch variance to the moving average.

    normkit.keras follows Keras 3 (biased; see docs/keras.md), so it must differ from the
    recording here, while normkit.BatchNorm(unbiased_running_var=True) (PyTorch's rule, with
    momentum = 1 - Keras' momentum) reproduces it step by step.
    """
    cfg = META[name]
    shape, momentum = tuple(cfg["shape"]), cfg["kwargs"]["momentum"]
    eps = max(cfg["kwargs"].get("epsilon", 1e-3), 1.001e-5)  # the fused kernel's epsilon floor
    bn = normkit.BatchNorm(shape[-1], eps=eps, momentum=1.0 - momentum, axis=-1, unbiased_running_var=True)
    gamma, beta, mean, var = _weights(name, "init", 4)
    with torch.no_grad():
        for tensor, value in ((bn.weight, gamma), (bn.bias, beta), (bn.running_mean, mean), (bn.running_var, var)):
            tensor.copy_(torch.as_tensor(value))
    keras_layer = BatchNormalization(**cfg["kwargs"])
    keras_layer.build(shape)
    keras_layer.set_weights([gamma, beta, mean, var])
    for step, training in enumerate(cfg["training"]):
        prefix = f"{name}/step{step}"
        x = torch.tensor(DATA[f"{prefix}/x"], requires_grad=True)
        bn.train(training)
        y = bn(x)
        grads = torch.autograd.grad((y * torch.tensor(DATA[f"{prefix}/g"])).sum(), [x, bn.weight, bn.bias])
        np.testing.assert_allclose(y.detach().numpy(), DATA[f"{prefix}/y"], RTOL, ATOL)
        for got, key in zip(grads, ("dx", "dgamma", "dbeta")):
            np.testing.assert_allclose(got.numpy(), DATA[f"{prefix}/{key}"], RTOL, ATOL, err_msg=key)
        want = _weights(name, f"step{step}", 4)
        for got, value in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), want):
            np.testing.assert_allclose(got.detach().numpy(), value, RTOL, ATOL)
        keras_layer(DATA[f"{prefix}/x"], training=training)
    # the Keras 3 layer (biased moving variance) ends elsewhere: the difference is real
    assert not np.allclose(keras_layer.get_weights()[3], _weights(name, "step2", 4)[3], rtol=1e-4)
    np.testing.assert_allclose(keras_layer.get_weights()[2], _weights(name, "step2", 4)[2], RTOL, ATOL)
