"""Options changed on a built layer act as if the layer had been built with them, or are refused clearly.

torch.nn users change ``momentum`` or ``eps`` on a built layer; Keras users set ``layer.momentum``
and Keras reads it on the next call. normkit chooses short execution paths from its options, so a
change must reach that choice: the oracle here is a layer constructed with the option, stepped
on the same data (every output, gradient and buffer equal)."""

import warnings

import numpy as np
import pytest
import torch

import normkit
from normkit import reference
from normkit.keras import BatchNormalization

from oracle import assert_close, assert_same_training_steps

# Each test runs on ATen's paths and again with normkit.kernels' fused kernel on (conftest.py), whose
# short path is chosen from the options too.
pytestmark = pytest.mark.usefixtures("execution")


def _adjust(shape):
    return torch.full((1, 4, 1), 1.5, dtype=torch.float64), torch.full((1, 4, 1), -0.25, dtype=torch.float64)


# (option, value, constructor arguments of the layer it is set on, input shape[, input shape before the change])
CHANGES = [
    ("virtual_batch_size", 4, {}, (16, 4, 3)),
    ("virtual_batch_size", 4, {}, (16, 4)),
    ("virtual_batch_size", None, {"virtual_batch_size": 4}, (16, 4, 3)),
    ("ghost_layout", "contiguous", {"virtual_batch_size": 4}, (16, 4, 3)),
    ("axis", -1, {}, (8, 3, 4), (8, 4, 3)),
    ("axis", (1, 2), {"num_features": 12}, (8, 3, 4), (8, 12, 2)),
    ("adjustment", _adjust, {}, (8, 4, 3)),
    ("unbiased_running_var", False, {}, (8, 4, 3)),
    ("renorm_momentum", 0.5, {"renorm": True}, (8, 4, 3)),
    ("renorm_clipping", {"rmax": 1.1, "rmin": 0.9, "dmax": 0.05}, {"renorm": True}, (8, 4, 3)),
    ("momentum", None, {"renorm": True, "virtual_batch_size": 4}, (16, 4, 3)),
    ("eps", 0.5, {"virtual_batch_size": 4}, (16, 4, 3)),
]


@pytest.mark.parametrize("option, value, built_with, shape, before", [c if len(c) == 5 else (*c, c[3]) for c in CHANGES],
                         ids=[f"{c[0]}={c[1].__name__ if callable(c[1]) else c[1]}" for c in CHANGES])
def test_an_option_set_on_a_built_layer_acts_as_if_built_with_it(option, value, built_with, shape, before):
    arguments = {"num_features": 4, "dtype": torch.float64, **built_with}
    changed = normkit.BatchNorm(**arguments)
    changed(torch.randn(before, dtype=torch.float64))  # (a step first: the layer has chosen its paths)
    setattr(changed, option, value)
    expected = normkit.BatchNorm(**{**arguments, option: value})
    expected.load_state_dict(changed.state_dict())
    assert_same_training_steps(changed, expected, shape, np.random.default_rng(0))


def test_virtual_batch_size_set_later_is_not_plain_batch_norm():
    # (the difference the test above relies on: the ghost statistics are not the whole batch's)
    layer, plain = normkit.BatchNorm1d(4, dtype=torch.float64), normkit.BatchNorm1d(4, dtype=torch.float64)
    layer.virtual_batch_size = 4
    x = torch.randn(16, 4, dtype=torch.float64) * torch.arange(1, 17, dtype=torch.float64)[:, None]
    assert not torch.allclose(layer(x), plain(x))


def test_renorm_switched_on_for_fine_tuning_starts_from_the_learned_statistics():
    rng = np.random.default_rng(1)
    layer = normkit.BatchNorm2d(3, dtype=torch.float64)
    for _ in range(3):
        layer(torch.tensor(rng.normal(2.0, 3.0, size=(8, 3, 4, 4))))
    layer.renorm = True
    assert {"moving_stddev", "renorm_mean", "renorm_stddev"} <= set(layer.state_dict())
    # The same state as loading the plain checkpoint into a renorm layer (BatchNorm's documented conversion).
    loaded = normkit.BatchNorm2d(3, dtype=torch.float64, renorm=True)
    plain_state = {k: v for k, v in layer.state_dict().items() if k not in BatchNormRenormState}
    loaded.load_state_dict(plain_state)
    assert_same_training_steps(layer, loaded, (8, 3, 4, 4), rng)
    torch.testing.assert_close(layer.moving_stddev, (layer.running_var + layer.eps).sqrt(), rtol=1e-12, atol=1e-12)


BatchNormRenormState = normkit.BatchNorm.RENORM_STATE


def test_renorm_switched_off_and_on_again_resyncs_its_stddev_with_the_running_variance():
    rng = np.random.default_rng(2)
    layer = normkit.BatchNorm1d(3, dtype=torch.float64, renorm=True)
    layer(torch.tensor(rng.normal(size=(8, 3))))
    layer.renorm = False
    for _ in range(2):  # plain steps move running_var but not renorm's moving_stddev
        layer(torch.tensor(rng.normal(5.0, 4.0, size=(8, 3))))
    assert not torch.allclose(layer.moving_stddev, (layer.running_var + layer.eps).sqrt())
    layer.renorm = True
    torch.testing.assert_close(layer.moving_stddev, (layer.running_var + layer.eps).sqrt(), rtol=1e-12, atol=1e-12)


def test_a_refused_change_keeps_the_old_value():
    layer = normkit.BatchNorm(4, virtual_batch_size=2)
    for option, value, error in [("virtual_batch_size", 0, ValueError), ("virtual_batch_size", 2.5, ValueError),
                                 ("ghost_layout", "rows", ValueError), ("adjustment", 3, TypeError),
                                 ("momentum", 1.5, ValueError), ("eps", 0, ValueError), ("axis", 0, ValueError),
                                 ("renorm_clipping", {"rmax": 2}, ValueError), ("renorm_momentum", None, ValueError),
                                 ("weight_regularizer", "l3", ValueError)]:
        before = getattr(layer, option)
        with pytest.raises(error, match=option):
            setattr(layer, option, value)
        assert getattr(layer, option) == before


def test_drop_in_classes_keep_their_feature_axis():
    layer = normkit.BatchNorm2d(3)
    with pytest.raises(ValueError, match="BatchNorm2d normalizes over axis 1.*normkit.BatchNorm"):
        layer.axis = -1
    assert layer.axis == 1
    with pytest.raises(ValueError, match="axis 1"):
        normkit.BatchNorm1d(3, axis=-1)


def test_renorm_needs_running_statistics_when_switched_on_too():
    layer = normkit.BatchNorm1d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="renorm=True needs running statistics"):
        layer.renorm = True
    assert not layer.renorm and "moving_stddev" not in dict(layer.named_buffers())


def test_renorm_switched_on_where_the_running_buffers_were_set_to_none_says_it_needs_them():
    """A layer whose running buffers were set to None has no statistics for renorm to start from (nor to correct
    toward): renorm switched on raised an AttributeError ('NoneType' object has no attribute 'double') from
    deriving its state; it is refused as on a layer built without running statistics, and nothing changes."""
    layer = normkit.BatchNorm1d(3)
    layer.running_mean = layer.running_var = None
    with pytest.raises(ValueError, match="renorm=True needs running statistics"):
        layer.renorm = True
    assert not layer.renorm and "moving_stddev" not in dict(layer.named_buffers())


@pytest.mark.parametrize("switch_off", ["track_running_stats", "buffers", "both"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
@pytest.mark.parametrize("options", [{}, {"virtual_batch_size": 2},
                                     {"renorm_clipping": {"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}}])
def test_a_renorm_layer_whose_running_statistics_are_switched_off_normalizes_by_the_batch(switch_off, layout,
                                                                                            options, rng):
    """Test-time adaptation (TENT) switches a trained model's BN statistics off by hand: ``track_running_stats =
    False`` and/or the running buffers set to None, then training-mode calls normalize each batch by itself. A renorm
    layer kept correcting toward its renorm averages, which no longer move there: the output was normalized by the
    statistics of old data (0.3-1.0 off the batch's normalization), silently. With no running statistics there is
    nothing for renorm to correct toward (the constructor refuses renorm without them), so the layer normalizes by
    the batch, as normkit.replace_all_batch_norm_modules_ makes it. Oracle: the reference without running
    statistics."""
    layer = normkit.BatchNorm(4, renorm=True, **options).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1.0, 1.0)
    for _ in range(5):  # renorm averages away from the data below
        layer(torch.tensor(rng.normal(size=(8, 4, 3, 3)) * 3 + 2))
    renorm_state = {name: getattr(layer, name).clone() for name in layer.RENORM_STATE}
    if switch_off in ("track_running_stats", "both"):
        layer.track_running_stats = False
    if switch_off in ("buffers", "both"):
        layer.running_mean = layer.running_var = None
    count = None if layer.num_batches_tracked is None else layer.num_batches_tracked.clone()
    for _ in range(2):
        x = rng.normal(size=(8, 4, 3, 3))
        g = rng.normal(size=x.shape)
        leaf = torch.tensor(x)
        if layout == "transposed":
            leaf = torch.tensor(x.transpose(0, 1, 3, 2).copy()).transpose(2, 3)
        elif layout == "channels_last":
            leaf = leaf.contiguous(memory_format=torch.channels_last)
        leaf.requires_grad_()
        y = layer(leaf)
        got = torch.autograd.grad(y, [leaf, layer.weight, layer.bias], torch.tensor(g))
        weight, bias = layer.weight.detach().numpy(), layer.bias.detach().numpy()
        assert_close(y, reference.batch_norm(x, None, None, weight, bias, True, 0.1, layer.eps,
                                             virtual_batch_size=layer.virtual_batch_size))
        want = reference.batch_norm_backward(g, x, None, None, weight, bias, True, layer.eps,
                                             virtual_batch_size=layer.virtual_batch_size)
        for value, expected in zip(got, want, strict=True):
            assert_close(value, expected)
    for name, value in renorm_state.items():
        torch.testing.assert_close(getattr(layer, name), value, rtol=0, atol=0, msg=name)
    if count is not None:
        assert torch.equal(layer.num_batches_tracked, count + (2 if layer.track_running_stats else 0))


def test_synchronized_set_later_warns_without_a_process_group_as_when_built_with_it():
    layer = normkit.BatchNorm1d(3)
    layer.synchronized = True
    with pytest.warns(RuntimeWarning, match="process group"):
        layer(torch.randn(8, 3))


def test_regularizers_and_constraints_set_later_take_part():
    layer = normkit.BatchNorm1d(3)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    layer.weight_regularizer = "l2"
    torch.testing.assert_close(layer.regularization_loss(), torch.tensor(0.01 * 3 * 4.0))
    layer.weight_constraint = "unit_norm"
    layer.apply_constraints()
    torch.testing.assert_close(layer.weight.norm(), torch.tensor(1.0))


# -- the Keras-vocabulary layer ---------------------------------------------------------------------------------

KERAS_CHANGES = [
    # (momentum 0.8, not 0.5: Keras' decay is 1 - PyTorch's momentum, and 0.5 would hide a missing conversion)
    ("momentum", 0.8, {}), ("epsilon", 0.25, {}), ("renorm", True, {}), ("renorm", False, {"renorm": True}),
    ("renorm_momentum", 0.3, {"renorm": True}), ("renorm_clipping", {"rmax": 1.2, "dmax": 0.1}, {"renorm": True}),
    ("virtual_batch_size", 4, {}), ("ghost_layout", "contiguous", {"virtual_batch_size": 4}),
]


@pytest.mark.parametrize("option, value, built_with", KERAS_CHANGES,
                         ids=[f"{c[0]}={c[1]}" for c in KERAS_CHANGES])
def test_keras_options_set_on_a_built_layer_take_effect_as_in_keras(option, value, built_with):
    # Keras reads these on every call: a layer changed after its first call steps as one built with the value.
    shape = (16, 5, 3)
    changed = BatchNormalization(dtype="float64", **built_with).train()
    changed(torch.randn(shape, dtype=torch.float64))
    setattr(changed, option, value)
    expected = BatchNormalization(dtype="float64", **{**built_with, option: value}).train()
    expected.build(shape)
    # (switched on, the renorm state follows from the running statistics, as when such a state_dict loads)
    expected.load_state_dict(changed.state_dict(), strict=False)
    assert_same_training_steps(changed, expected, shape, np.random.default_rng(3),
                               state=lambda layer: dict(enumerate(layer.weights)))


def test_keras_renorm_clipping_changed_in_place_bounds_the_next_step_as_in_keras():
    # Keras reads the dict at every call; get_config() reports the edited dict, so the layer must step by it.
    shape = (16, 5)
    changed = BatchNormalization(dtype="float64", renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 1.0}).train()
    changed(torch.randn(shape, dtype=torch.float64))
    changed.renorm_clipping["rmax"] = 1.0
    changed.renorm_clipping["dmax"] = 0.0
    assert changed.get_config()["renorm_clipping"] == {"rmax": 1.0, "dmax": 0.0}
    expected = BatchNormalization(dtype="float64", renorm=True, renorm_clipping={"rmax": 1.0, "dmax": 0.0}).train()
    expected.build(shape)
    expected.load_state_dict(changed.state_dict())
    assert_same_training_steps(changed, expected, shape, np.random.default_rng(4),
                               state=lambda layer: dict(enumerate(layer.weights)))
    changed.renorm_clipping["typo"] = 2.0  # (checked as a new dict is)
    with pytest.raises(ValueError, match="renorm_clipping received invalid keys"):
        changed(torch.randn(shape, dtype=torch.float64), training=True)


def test_keras_frozen_layer_called_in_training_ignores_a_mask_as_inference_does():
    # trainable=False is inference in Keras whatever `training` says: a mask that does not fit is not checked.
    layer = BatchNormalization(trainable=False)
    inputs, mask = torch.randn(4, 3, 2), torch.ones(2, 3)
    torch.testing.assert_close(layer(inputs, training=True, mask=mask), layer(inputs, training=False))
    layer.trainable = True
    with pytest.raises(ValueError, match="does not fit"):
        layer(inputs, training=True, mask=mask)


def test_keras_options_set_before_the_first_call_are_used_by_the_build():
    layer = BatchNormalization()
    layer.momentum, layer.axis, layer.center = 0.8, 1, False
    layer(torch.randn(8, 3, 2))
    assert layer.bn.momentum == pytest.approx(0.2) and layer.bn.axis == 1 and layer.bn.bias is None


def test_keras_weight_shaping_options_are_fixed_once_built():
    layer = BatchNormalization()
    layer(torch.randn(8, 3))
    for option, value in (("axis", 0), ("center", False), ("scale", False)):
        with pytest.raises(ValueError, match=f"built: {option} is fixed"):
            setattr(layer, option, value)
    layer.axis = -1  # (the same value is no change)
    assert layer.center and layer.scale and len(layer.get_weights()) == 4


def test_keras_option_checks_apply_to_changes():
    layer = BatchNormalization()
    layer(torch.randn(8, 3))
    for option, value, error in [("momentum", 2, ValueError), ("epsilon", -1, ValueError),
                                 ("renorm", "yes", TypeError), ("virtual_batch_size", 0, ValueError),
                                 ("renorm_clipping", {"bad": 1}, ValueError), ("gamma_regularizer", "l3", ValueError)]:
        before = getattr(layer, option)
        with pytest.raises(error, match=option):
            setattr(layer, option, value)
        assert getattr(layer, option) == before
    assert layer.bn.momentum == pytest.approx(0.01)


@pytest.mark.parametrize("decay,weight", [(0.99, 0.01), (0.9, 0.1), (0.5, 0.5), (0.999, 0.001)])
def test_keras_decays_become_the_decimal_weight_of_the_new_value(decay, weight):
    """Keras' momentum 0.99 is PyTorch's 0.01 as written, not 1 - 0.99 = 0.010000000000000009 (one ulp off, shown in
    every repr of a ported layer), at construction and when changed on a built layer."""
    layer = BatchNormalization(momentum=decay, renorm=True, renorm_momentum=decay)
    layer(torch.randn(8, 3))
    assert layer.bn.momentum == weight and layer.bn.renorm_momentum == weight
    assert f"momentum={weight}," in repr(layer.bn)
    layer.momentum = 0.8
    assert layer.bn.momentum == 0.2 and abs(layer.bn.momentum - (1 - 0.8)) < 1e-15
    # A decay a few ulps from 1 is shorter in decimal than in binary: there the float difference is kept.
    layer.momentum = 1 - 2**-52
    assert layer.bn.momentum == 2**-52


def test_keras_regularizer_set_later_counts_in_losses():
    layer = BatchNormalization(gamma_initializer="ones")
    layer(torch.randn(8, 3))
    assert layer.losses == []
    layer.gamma_regularizer = "l2"
    [loss] = layer.losses
    torch.testing.assert_close(loss, torch.tensor(0.01 * 3.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer.get_config()["gamma_regularizer"] == "l2"


def test_an_adjustment_of_the_wrong_shape_is_named():
    layer = normkit.BatchNorm(4, adjustment=lambda shape: (torch.ones(4), torch.zeros(4)))
    with pytest.raises(ValueError, match=r"adjustment returned a scale of shape \(4,\).*\(8, 4, 3\)"):
        layer(torch.randn(8, 4, 3))
    layer.adjustment = lambda shape: torch.ones(shape)
    with pytest.raises(ValueError, match="adjustment must return a pair"):
        layer(torch.randn(8, 4, 3))


@pytest.mark.parametrize("make_layer, freeze", [
    (lambda: normkit.BatchNorm1d(3), lambda layer: layer.freeze()),
    (lambda: BatchNormalization(), lambda layer: setattr(layer, "trainable", False)),
], ids=["freeze()", "keras trainable=False"])
def test_a_frozen_layer_is_skipped_by_optimizers_with_decay_and_momentum(make_layer, freeze):
    # A gradient kept from before freezing (zero_grad(set_to_none=False) keeps zeros) would let SGD's momentum and
    # weight decay move the layer; frozen, its parameters hold no gradient and optimizers skip them.
    layer = make_layer()
    layer(torch.randn(8, 3)).square().sum().backward()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    freeze(layer)
    before = [p.clone() for p in layer.parameters()]
    optimizer.step()
    assert all(p.grad is None for p in layer.parameters())
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before, strict=True))


def test_keras_dtype_policy_set_later_changes_the_compute_dtype_as_in_keras():
    x = torch.randn(8, 3)
    changed, expected = BatchNormalization(), BatchNormalization(dtype="mixed_bfloat16")
    changed(x, training=False), expected(x, training=False)  # (built, the moving statistics as initialized)
    changed.dtype_policy = "mixed_bfloat16"
    y = changed(x, training=True)
    assert y.dtype == torch.bfloat16 and changed.gamma.dtype == torch.float32
    torch.testing.assert_close(y, expected(x, training=True))
    for got, want in zip(changed.get_weights(), expected.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    unbuilt = BatchNormalization()
    unbuilt.dtype_policy = "float64"  # (before the build: the variables take it)
    unbuilt(x)
    assert unbuilt.gamma.dtype == torch.float64 and unbuilt.keras_config()["dtype"]["config"]["name"] == "float64"
    with pytest.raises(ValueError, match="dtype must be"):
        unbuilt.dtype_policy = "float8"
    assert unbuilt.dtype_policy == "float64"


def test_repr_names_every_option_that_differs_from_torch_nn():
    def adjust(shape):
        return 1.0, 0.0

    text = repr(normkit.BatchNorm(3, virtual_batch_size=2, ghost_layout="contiguous", adjustment=adjust,
                                  unbiased_running_var=False, renorm=True))
    for part in ("renorm=True", "virtual_batch_size=2", "ghost_layout='contiguous'", "adjustment=adjust",
                 "unbiased_running_var=False"):
        assert part in text
    assert repr(normkit.BatchNorm2d(3)) == repr(torch.nn.BatchNorm2d(3))


def test_keras_half_policy_changed_to_float32_returns_float32_as_keras():
    # (Keras 3: a "float16" layer set to "float32" computes and returns float32; its variables stay float16)
    x = torch.randn(8, 3)
    layer = BatchNormalization(dtype="float16")
    layer(x, training=False)
    layer.dtype_policy = "float32"
    y = layer(x, training=True)
    assert y.dtype == torch.float32 and layer.gamma.dtype == torch.float16


@pytest.mark.parametrize("built,policy", [("float32", "float64"), ("float64", "float32")])
def test_keras_full_precision_policy_set_later_computes_in_it(built, policy):
    """Keras 3.15.1: a float32 layer set to "float64" (or back) computes and returns the policy's dtype, its
    variables keep theirs. This raised a TypeError (float64 input, float32 parameters) before. Oracle: the
    NumPy reference in float64 on what the layer sees (the input and the weights in the policy's dtype)."""
    from normkit import reference as R
    rng = np.random.default_rng(11)
    weights = [rng.uniform(0.5, 2.0, 3) for _ in range(4)]
    layer = BatchNormalization(dtype=built, momentum=0.5)
    layer.build((6, 3))
    layer.set_weights(weights)
    layer.dtype_policy = policy
    compute, stored = getattr(torch, policy), getattr(torch, built)
    seen = [np.asarray(w, dtype=np.float32 if "float32" in (built, policy) else np.float64).astype(np.float64)
            for w in weights]  # (the weights as stored, then in the policy's dtype: float32 on either side)
    gamma, beta, mean, var = seen
    x = rng.normal(size=(6, 3)) * 1e-2 + 1.0
    x_seen = torch.tensor(x).to(compute).double().numpy()
    leaf = torch.tensor(x, requires_grad=True)
    y = layer(leaf, training=True)
    g = rng.normal(size=(6, 3))
    (y * torch.tensor(g, dtype=compute)).sum().backward()
    want = R.batch_norm(x_seen, mean, var, gamma, beta, True, 0.5, 1e-3, axis=-1, unbiased_running_var=False)
    dx, dgamma, _ = R.batch_norm_backward(g, x_seen, None, None, gamma, beta, True, 1e-3, axis=-1)
    tol = dict(rtol=1e-10, atol=1e-10) if compute == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert y.dtype == compute and layer.gamma.dtype == stored and layer.moving_mean.dtype == stored
    np.testing.assert_allclose(y.detach().double().numpy(), want, **tol)
    np.testing.assert_allclose(leaf.grad.numpy(), dx, **{k: 100 * v for k, v in tol.items()})
    np.testing.assert_allclose(layer.gamma.grad.double().numpy(), dgamma, **{k: 100 * v for k, v in tol.items()})
    # the moving statistics move by Keras' rule (reference: mean, var updated in place), stored in their dtype
    # (float32 variables: the blend rounded once, half an ulp)
    stats_tol = dict(rtol=6e-8, atol=0) if stored == torch.float32 else tol
    np.testing.assert_allclose(layer.moving_mean.double().numpy(), mean, **stats_tol)
    np.testing.assert_allclose(layer.moving_variance.double().numpy(), var, **stats_tol)
    y = layer(torch.tensor(x), training=False)
    assert y.dtype == compute
    as_stored = np.float32 if stored == torch.float32 else np.float64  # (inference reads the statistics as stored)
    mean, var = (np.asarray(v, dtype=as_stored).astype(np.float64) for v in (mean, var))
    np.testing.assert_allclose(y.detach().double().numpy(),
                               R.batch_norm(x_seen, mean, var, gamma, beta, False, eps=1e-3, axis=-1), **tol)


def test_sample_norms_refuse_an_eps_set_to_zero_on_every_path():
    for layer, x in ((normkit.LayerNorm(4), torch.ones(2, 4)), (normkit.GroupNorm(2, 4), torch.ones(2, 4, 3))):
        # The setter refuses it as the constructor does (docs/decisions.md, "Options changed on a built layer")...
        with pytest.raises(ValueError, match="eps"):
            layer.eps = 0.0
        # ...and an eps that got past it (written to the instance's dict) is still refused by the call.
        layer.__dict__["eps"] = 0.0
        with pytest.raises(ValueError, match="eps"):
            layer(x)


def test_sample_norm_sizes_set_on_a_built_layer_are_checked_as_the_constructor_checks_them(rng):
    """LayerNorm's normalized_shape and GroupNorm's num_groups, changed on a built layer: an int normalized_shape is
    one size, as the constructor (and torch.nn's) takes it, and the layer then computes the reference's LayerNorm;
    a bad value is refused by name and the old one kept."""
    from normkit import reference as R
    layer = normkit.LayerNorm(5, elementwise_affine=False, dtype=torch.float64)
    layer.normalized_shape = np.int64(5)  # (it failed at the next call: "object of type 'int' has no len()")
    assert layer.normalized_shape == (5,)
    x = rng.normal(size=(3, 5))
    np.testing.assert_allclose(layer(torch.tensor(x)).numpy(), R.layer_norm(x, (5,), None, None, 1e-5),
                               rtol=1e-9, atol=1e-10)
    for bad, error in (("5", TypeError), ((5, 0), ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="normalized_shape"):
            layer.normalized_shape = bad
        assert layer.normalized_shape == (5,)
    groups = normkit.GroupNorm(2, 6)
    for bad, error in (("x", TypeError), (0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="num_groups"):  # (ATen's "argument 'num_groups' (position 2)" at the call)
            groups.num_groups = bad
        assert groups.num_groups == 2
    groups.num_groups = np.int64(3)
    assert groups.num_groups == 3 and type(groups.num_groups) is int


def test_group_count_that_does_not_divide_the_channels_is_a_value_error_at_the_next_call():
    # Whether num_groups divides the channels is the next call's check, as in torch.nn (surgery may change
    # num_groups before num_channels); the refusal is the ValueError of the general path and of
    # functional.group_norm (decisions.md, "Exception types"), not ATen's RuntimeError from the layer's short path.
    for shape in ((2, 4), (2, 4, 5), (2, 4, 5, 5)):
        groups = normkit.GroupNorm(2, 4)
        groups.num_groups = 3
        with pytest.raises(ValueError, match="num_groups=3 must divide"):
            groups(torch.randn(shape))
        groups.num_groups = 4  # (then the call computes torch.nn's GroupNorm(4, 4))
        torch.testing.assert_close(groups(x := torch.randn(shape)), torch.nn.GroupNorm(4, 4)(x))


def test_buffers_replaced_by_attributes_are_the_ones_used():
    # (the short paths read tensors from the module's dicts; a buffer moved out of them must still be used)
    layer, reference = normkit.BatchNorm1d(4).eval(), torch.nn.BatchNorm1d(4).eval()
    for module in (layer, reference):
        del module.running_mean, module.running_var
        module.running_mean, module.running_var = torch.ones(4), torch.full((4,), 4.0)
    x = torch.randn(8, 4)
    torch.testing.assert_close(layer(x), reference(x))


def test_a_subclass_may_set_options_before_the_constructor():
    class Ghost(normkit.BatchNorm):
        def __init__(self, channels):
            self.virtual_batch_size = 2  # (before super().__init__: no axis yet to check against)
            super().__init__(channels, virtual_batch_size=2)

    assert Ghost(3).virtual_batch_size == 2
