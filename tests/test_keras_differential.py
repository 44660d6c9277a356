"""Differential audit: normkit.keras.BatchNormalization against the real Keras 3 layer on random configurations (needs Keras).

Each drawn configuration builds Keras' layer and normkit's with the same arguments and the same
initial weights, then runs training steps, inference calls and ``training=None`` calls (normkit's
following ``train()``/``eval()``), comparing outputs, the gradients with respect to the input and
gamma/beta, and every weight after each call. The draws are seeded (``numpy.random.default_rng``),
so a failure names the seed that reproduces it. Where Keras deliberately differs (docs/keras.md,
"Deliberate differences") the documented behaviour is asserted instead. Without Keras (CI) the
module skips; the regressions found here are pinned without Keras in tests/test_keras_spec.py.
"""

import math
import os

import numpy as np
import pytest
import torch

from normkit.keras import BatchNormalization, from_keras, to_keras

from oracle import assert_same_config, keras_initial_weights

# One skip for the module where Keras is missing (CI) or runs on another backend, not one per configuration.
os.environ.setdefault("KERAS_BACKEND", "torch")
KERAS = pytest.importorskip("keras", reason="Keras 3 is not installed (the differential audit needs it)")
if KERAS.backend.backend() != "torch":
    pytest.skip("Keras runs on another backend here", allow_module_level=True)

SEEDS = range(300)
F32 = dict(rtol=1e-4, atol=1e-5)
# Half-precision outputs: Keras and normkit both compute in float32 and round once, so they agree to
# one rounding of the output dtype (an ulp where the float32 results straddle a rounding boundary).
HALF = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


# ----------------------------------------------------------------------------- drawing configurations

_NAMED_INITIALIZERS = ["zeros", "ones", "random_normal", "random_uniform", "truncated_normal", "glorot_uniform",
                       "he_normal", "lecun_uniform"]


def _initializer(rng, keras, positive):
    """A name, or a Keras initializer object; ``positive``: for a variance (a draw must not be negative)."""
    kind = rng.integers(4)
    if kind == 0:
        return "ones" if positive else str(rng.choice(_NAMED_INITIALIZERS))
    if kind == 1:
        return keras.initializers.Constant(float(rng.uniform(0.2, 3.0) if positive else rng.uniform(-2, 2)))
    if kind == 2 and not positive:
        return keras.initializers.RandomNormal(mean=0.5, stddev=0.3, seed=int(rng.integers(100)))
    return "ones" if positive else "zeros"


def draw_config(seed, keras):
    """One random configuration: shape, constructor arguments and how the layer is exercised."""
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(2, 6))
    shape = [int(rng.integers(1, 7))] + [int(rng.integers(1, 5)) for _ in range(rank - 1)]
    feature = int(rng.integers(1, rank)) if rng.random() > 0.05 else 0
    axis = feature - rank if rng.random() < 0.5 else feature
    if rng.random() < 0.1:
        shape[0] = 1  # batch size 1
    kwargs = dict(axis=axis)
    if rng.random() < 0.7:
        kwargs["momentum"] = float(rng.choice([0.0, 0.5, 0.9, 0.99, rng.uniform(0, 1)]))
    if rng.random() < 0.7:
        kwargs["epsilon"] = float(rng.choice([1e-3, 1e-5, 0.1, rng.uniform(1e-4, 0.5)]))
    for flag in ("center", "scale"):
        if rng.random() < 0.3:
            kwargs[flag] = False
    for name, positive in (("gamma_initializer", False), ("beta_initializer", False),
                           ("moving_mean_initializer", False), ("moving_variance_initializer", True)):
        if rng.random() < 0.3:
            kwargs[name] = _initializer(rng, keras, positive)
    for name in ("gamma_regularizer", "beta_regularizer"):
        if rng.random() < 0.15:
            kwargs[name] = str(rng.choice(["l1", "l2"])) if rng.random() < 0.5 else keras.regularizers.L2(0.3)
    if rng.random() < 0.35:
        kwargs["renorm"] = True
        choice = rng.integers(4)
        if choice == 1:
            kwargs["renorm_clipping"] = {}
        elif choice >= 2:
            clipping = {}
            if rng.random() < 0.7:
                clipping["rmax"] = float(rng.uniform(1.0, 2.0))
            if rng.random() < 0.7:
                clipping["rmin"] = float(rng.uniform(0.3, 1.0))
            if rng.random() < 0.7:
                clipping["dmax"] = float(rng.uniform(0.0, 1.0))
            kwargs["renorm_clipping"] = clipping
        if rng.random() < 0.7:
            kwargs["renorm_momentum"] = float(rng.choice([0.0, 0.5, 0.8, rng.uniform(0, 1)]))
    policy = None
    if rng.random() < 0.15:
        policy = str(rng.choice(["mixed_float16", "mixed_bfloat16", "bfloat16", "float16"]))
        kwargs["dtype"] = policy
    input_dtype = torch.float32
    if policy is None and rng.random() < 0.15:
        input_dtype = [torch.float16, torch.bfloat16][int(rng.integers(2))]
    channels = shape[feature]
    # Keras 3's masked moments squeeze the (1, .., C, .., 1) statistics to () when C == 1 and then fail in
    # ops.batch_normalization (mean.shape[0]): a Keras bug, so masks are drawn for C > 1 only.
    masked = rng.random() < 0.3 and channels > 1 and _reduced_count(shape, feature) >= 4
    trainable = rng.random() > 0.12
    toggle = rng.random() < 0.15
    return dict(seed=seed, shape=tuple(shape), feature=feature, kwargs=kwargs, policy=policy,
                input_dtype=input_dtype, masked=masked, trainable=trainable, toggle=toggle)


# ----------------------------------------------------------------------------- running both layers


_POLICY_COMPUTE = {"mixed_float16": torch.float16, "float16": torch.float16, "mixed_bfloat16": torch.bfloat16,
                   "bfloat16": torch.bfloat16}


def _mask(rng, shape, feature):
    """A Keras mask (the input's shape without its last axis) leaving every channel two valid positions."""
    while True:
        mask = rng.random(shape[:-1]) < 0.7
        expanded = np.broadcast_to(mask[..., None], shape)
        counts = np.moveaxis(expanded, feature, 0).reshape(shape[feature], -1).sum(axis=1)
        if counts.min() >= 2:
            return mask


def _reduced_count(shape, feature):
    return math.prod(shape) // shape[feature]


def _as_float64(array):
    return np.asarray(array, dtype=np.float32).astype(np.float64)


def _close(ours, theirs, tol, what):
    ours = ours.detach().float().numpy() if isinstance(ours, torch.Tensor) else _as_float64(ours)
    theirs = theirs.detach().float().numpy() if isinstance(theirs, torch.Tensor) else _as_float64(theirs)
    assert ours.shape == theirs.shape, f"{what}: shapes {ours.shape} vs {theirs.shape}"
    np.testing.assert_allclose(ours, theirs, **tol, err_msg=what)


def _close_or_keras_error(ours, theirs, truth, tol, what):
    """Equal to Keras within ``tol``; where not, Keras' own error must explain it (documented: Keras 3's torch
    backend computes the batch variance in one pass, E[x^2] - E[x]^2, normkit in two; with two or three values
    per channel the input gradient amplifies that rounding): then normkit must be within ``tol`` of the
    float64 truth and at least as close to it as Keras."""
    try:
        _close(ours, theirs, tol, what)
    except AssertionError as error:
        ours_error = (ours.detach().double() - truth.detach()).abs().max().item()
        theirs_error = (theirs.detach().double() - truth.detach()).abs().max().item()
        if ours_error > theirs_error:
            raise AssertionError(f"{error}\nnormkit is further from the float64 truth ({ours_error:.3g}) than Keras "
                                 f"({theirs_error:.3g})") from None
        if 10 * ours_error > theirs_error:  # (ten times closer than Keras: an ill-conditioned case, not a fault here)
            _close(ours, truth, tol, f"{what} (against the float64 truth; Keras' error {theirs_error:.3g})")


def _weights_close(ours, theirs, tol, what, truth=None):
    ours, theirs = ours.get_weights(), theirs.get_weights()
    assert len(ours) == len(theirs), f"{what}: {len(ours)} weights vs Keras' {len(theirs)}"
    for i, (got, want) in enumerate(zip(ours, theirs)):
        assert got.dtype == want.dtype, f"{what}: weight {i} dtype {got.dtype} vs Keras' {want.dtype}"
        if truth is None:
            _close(got, want, tol, f"{what}: weight {i}")
        else:
            _close_or_keras_error(torch.as_tensor(_as_float64(got)), torch.as_tensor(_as_float64(want)), truth[i],
                                  tol, f"{what}: weight {i}")


def _trainable_params(ours, theirs):
    """gamma/beta pairs (normkit's parameter, Keras' torch tensor) that take gradients in Keras."""
    pairs = []
    for name in ("gamma", "beta"):
        variable = getattr(theirs, name)
        if variable is not None and variable.trainable:
            pairs.append((name, getattr(ours, name), variable.value))
    return pairs


def _truth(ours, x, g, mask, training):
    """The same call in float64 (normkit's float64 path, checked against the NumPy reference elsewhere) on the
    values both layers see: the input rounded to the compute dtype, the weights as stored."""
    config = {key: value for key, value in ours.get_config().items() if key not in ("name", "dtype")}
    exact = BatchNormalization(**config, dtype=torch.float64)
    exact.build(tuple(x.shape))
    exact.set_weights([np.asarray(w, dtype=np.float32).astype(np.float64) for w in ours.get_weights()])
    policy = ours.dtype_policy
    seen = x.to(_POLICY_COMPUTE[policy]) if policy in _POLICY_COMPUTE else x
    leaf = seen.double().requires_grad_()
    y = exact(leaf, training=training, mask=None if mask is None else torch.tensor(mask))
    params = [p for p in (exact.gamma, exact.beta) if p is not None and p.requires_grad]
    grads = torch.autograd.grad((y * torch.as_tensor(g).double()).sum(), [leaf] + params)
    return y, grads, [torch.as_tensor(w) for w in exact.get_weights()]


def _call_both(ours, theirs, x, g, mask, ours_training, theirs_training, tol, what):
    """One call of each layer: output and gradients compared."""
    truth = _truth(ours, x, g, mask, theirs_training and ours.trainable)
    ours_x = x.clone().requires_grad_()
    theirs_x = x.clone().requires_grad_()
    mask_args = {} if mask is None else {"mask": torch.tensor(mask)}
    kwargs = {} if ours_training == "default" else {"training": ours_training}
    y_ours = ours(ours_x, **kwargs, **mask_args)
    y_theirs = theirs(theirs_x, training=theirs_training, **mask_args)
    if ours.dtype_policy is None and x.dtype != torch.float32:
        # Deliberate difference: a half-precision input to a float32 layer comes back in its own dtype here
        # (Keras: float32). So Keras' output rounded to that dtype is what normkit must return, gradients included.
        assert y_theirs.dtype == torch.float32
        y_theirs = y_theirs.to(x.dtype)
    assert y_ours.dtype == y_theirs.dtype, f"{what}: output dtype {y_ours.dtype} vs Keras' {y_theirs.dtype}"
    _close_or_keras_error(y_ours, y_theirs, truth[0], tol, f"{what}: output")
    pairs = _trainable_params(ours, theirs)
    for name, parameter, _ in pairs:
        assert parameter.requires_grad, f"{what}: normkit's {name} does not take gradients, Keras' does"
    g = torch.as_tensor(g, dtype=y_ours.dtype)
    grads_ours = torch.autograd.grad((y_ours * g).sum(), [ours_x] + [p for _, p, _ in pairs], allow_unused=True)
    grads_theirs = torch.autograd.grad((y_theirs * g).sum(), [theirs_x] + [t for _, _, t in pairs],
                                       allow_unused=True)
    names = ["x"] + [name for name, _, _ in pairs]
    truth_grads = dict(zip(["x"] + [n for n in ("gamma", "beta") if getattr(ours, n) is not None and getattr(ours, n).requires_grad], truth[1]))
    for name, got, want in zip(names, grads_ours, grads_theirs):
        assert (got is None) == (want is None), f"{what}: gradient of {name}: {got} vs {want}"
        if got is not None:
            grad_tol = tol if name != "x" or x.dtype == torch.float32 else HALF[x.dtype]
            _close_or_keras_error(got, want, truth_grads.get(name), grad_tol, f"{what}: gradient of {name}")
    return truth[2]


def run_pair(keras, config):
    shape, feature, kwargs = config["shape"], config["feature"], config["kwargs"]
    rng = np.random.default_rng(1000 + config["seed"])
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours = BatchNormalization(**kwargs)
    theirs.build(shape)
    ours.build(shape)
    names = [variable.name for variable in theirs.weights]
    assert [name for name, _ in ours._weight_tensors()] == names
    # Deterministic initializers give the same initial weights without set_weights.
    deterministic = all(not isinstance(kwargs.get(key, "zeros"), str) and "Constant" in type(kwargs[key]).__name__
                        or kwargs.get(key, "zeros") in ("zeros", "ones")
                        for key in ("gamma_initializer", "beta_initializer", "moving_mean_initializer",
                                    "moving_variance_initializer"))
    tol = F32 if config["policy"] is None else HALF[_POLICY_COMPUTE[config["policy"]]]
    if deterministic:
        _weights_close(ours, theirs, tol, "initial weights")
    weights = keras_initial_weights(rng, names, tuple(theirs.weights[0].shape))
    theirs.set_weights(weights)
    ours.set_weights(weights)
    _weights_close(ours, theirs, tol, "weights set")
    if not config["trainable"]:
        theirs.trainable = ours.trainable = False
    if config["policy"] is None and config["input_dtype"] != torch.float32:
        tol = HALF[config["input_dtype"]]
    one_value = _reduced_count(shape, feature) == 1
    schedule = ["train", "train", "infer", "default_eval", "train", "default_train"]
    for step, mode in enumerate(schedule):
        what = f"seed {config['seed']} step {step} ({mode}) {config}"
        if config["toggle"] and step == 2:
            theirs.trainable = ours.trainable = not theirs.trainable  # toggled after build
        x = torch.tensor(rng.normal(size=shape) * rng.uniform(0.5, 3) + rng.uniform(-3, 3),
                         dtype=torch.float32).to(config["input_dtype"])
        g = rng.normal(size=shape).astype(np.float32)
        mask = _mask(rng, shape, feature) if config["masked"] and mode != "infer" else None
        training = mode in ("train", "default_train")
        if mode == "default_eval":
            ours.eval()
            ours_training = "default"
        elif mode == "default_train":
            ours.train()
            ours_training = "default"
        else:
            ours_training = training
        if training and ours.trainable and one_value and mask is None:
            # Deliberate difference: one value per channel in training is a ValueError here (Keras: output = beta).
            with pytest.raises(ValueError, match="one value|single value|per channel"):
                ours(x, **({} if ours_training == "default" else {"training": True}))
            variance = theirs.moving_variance.numpy().astype(np.float64)
            y = theirs(x, training=True).float()
            if "renorm" not in kwargs:  # (renorm adds d * gamma)
                beta = theirs.beta.value.float() if theirs.beta is not None else torch.zeros(shape[feature])
                view = [1] * len(shape)
                view[feature] = shape[feature]
                _close(y, beta.reshape(view).expand(shape), tol, f"{what}: Keras' output with one value per channel")
                # ... and its moving variance pulled toward 0
                _close(theirs.moving_variance.numpy(), variance * theirs.momentum, tol, f"{what}: Keras' variance")
            theirs.set_weights(ours.get_weights())  # (the steps after this start from the same weights again)
            continue
        truth = _call_both(ours, theirs, x, g, mask, ours_training, training, tol, what)
        _weights_close(ours, theirs, tol, what, truth)
        _same_bookkeeping(ours, theirs, tol, what)
    _round_trips(keras, ours, theirs, tol, f"seed {config['seed']} {config}")
    return ours, theirs


def _same_bookkeeping(ours, theirs, tol, what):
    """Weight lists (trainable or not) and regularization losses, as Keras has them."""
    assert len(ours.trainable_weights) == len(theirs.trainable_weights), what
    assert len(ours.non_trainable_weights) == len(theirs.non_trainable_weights), what
    ours_losses, theirs_losses = ours.losses, theirs.losses
    assert len(ours_losses) == len(theirs_losses), f"{what}: losses {ours_losses} vs Keras' {theirs_losses}"
    for got, want in zip(ours_losses, theirs_losses):
        _close(got, want, tol, f"{what}: regularization loss")  # (of half-precision weights under a half policy)


def _round_trips(keras, ours, theirs, tol, what):
    """keras_config() is Keras' get_config(); from_keras and to_keras carry options, build and weights."""
    ours.name = theirs.name
    assert_same_config(ours.keras_config(), theirs.get_config(), f"{what}: keras_config")
    # (Keras keeps the shape build() was given, a tuple here; saved as JSON it is the list normkit gives)
    assert ours.get_build_config()["input_shape"] == list(theirs.get_build_config()["input_shape"]), what
    ported = from_keras(theirs)
    assert_same_config(ported.keras_config(), theirs.get_config(), f"{what}: from_keras")
    for got, want in zip(ported.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_array_equal(_as_float64(got), _as_float64(want), err_msg=f"{what}: from_keras weights")
    back = to_keras(ours)
    assert_same_config(back.get_config(), theirs.get_config(), f"{what}: to_keras")
    for got, want in zip(back.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_array_equal(_as_float64(got), _as_float64(want), err_msg=f"{what}: to_keras weights")
    x = torch.randn(theirs.get_build_config()["input_shape"])
    expected = theirs(x, training=False)
    _close(ported(x, training=False), expected, tol, f"{what}: from_keras inference")
    _close(back(x, training=False), expected, tol, f"{what}: to_keras inference")


@pytest.mark.parametrize("seed", SEEDS)
def test_random_configuration_matches_keras(seed):
    keras = KERAS
    run_pair(keras, draw_config(seed, keras))


def test_a_list_axis_is_keras_on_the_merged_axes():
    """Keras 3 refuses a list axis (tf.keras' option, kept here); normkit's axis=[2, 3] on (N, H, W, C) is Keras'
    axis=-1 on the input with W and C merged: outputs, gradients and weights after each step."""
    keras = KERAS
    with pytest.raises(TypeError):
        keras.layers.BatchNormalization(axis=[2, 3])
    rng = np.random.default_rng(7)
    ours, theirs = BatchNormalization(axis=[2, 3], momentum=0.8), keras.layers.BatchNormalization(momentum=0.8)
    ours.build((4, 3, 2, 5))
    theirs.build((4, 3, 10))
    weights = keras_initial_weights(rng, ["gamma", "beta", "moving_mean", "moving_variance"], (10,))
    theirs.set_weights(weights)
    ours.set_weights([w.reshape(2, 5) for w in weights])
    for training in (True, True, False):
        x = torch.tensor(rng.normal(size=(4, 3, 2, 5)) * 2 + 1, dtype=torch.float32)
        leaf, merged = x.clone().requires_grad_(), x.reshape(4, 3, 10).clone().requires_grad_()
        y_ours, y_theirs = ours(leaf, training=training), theirs(merged, training=training)
        _close(y_ours.reshape(4, 3, 10), y_theirs, F32, "output")
        g = torch.tensor(rng.normal(size=(4, 3, 10)), dtype=torch.float32)
        (dx_ours,) = torch.autograd.grad((y_ours.reshape(4, 3, 10) * g).sum(), leaf)
        (dx_theirs,) = torch.autograd.grad((y_theirs * g).sum(), merged)
        _close(dx_ours.reshape(4, 3, 10), dx_theirs, F32, "gradient of x")
        for got, want in zip(ours.get_weights(), theirs.get_weights(), strict=True):
            _close(got.reshape(-1), want, F32, "weights")


def test_masks_of_the_wrong_rank_are_refused_by_both():
    keras = KERAS
    x, mask = torch.randn(4, 3, 2), torch.ones(4, dtype=torch.bool)
    for layer in (keras.layers.BatchNormalization(), BatchNormalization()):
        with pytest.raises(ValueError, match="one dimension less than the inputs"):
            layer(x, training=True, mask=mask)


def test_a_fully_masked_batch_is_the_documented_difference():
    """docs/keras.md: the same output and gradient; Keras decays the moving statistics toward 0, normkit keeps them."""
    keras = KERAS
    rng = np.random.default_rng(3)
    ours, theirs = BatchNormalization(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)
    for layer in (ours, theirs):
        layer.build((3, 4, 2))
    weights = keras_initial_weights(rng, ["gamma", "beta", "moving_mean", "moving_variance"], (2,))
    ours.set_weights(weights)
    theirs.set_weights(weights)
    x, mask = torch.tensor(rng.normal(size=(3, 4, 2)), dtype=torch.float32), torch.zeros(3, 4, dtype=torch.bool)
    _close(ours(x, training=True, mask=mask), theirs(x, training=True, mask=mask), F32, "output")
    for got, initial, theirs_now in zip(ours.get_weights()[2:], weights[2:], theirs.get_weights()[2:]):
        np.testing.assert_array_equal(got, initial)
        _close(theirs_now, initial * 0.5, F32, "Keras' moving statistics")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "float64", "bfloat16"])
def test_a_dtype_policy_object_is_taken_as_keras_takes_it(policy):
    """keras.DTypePolicy objects (and NumPy dtypes) are Keras' dtype arguments too; normkit failed with TypeError
    "unhashable type: 'DTypePolicy'". The layer made with one computes what Keras' does, and ports both ways."""
    keras = KERAS
    rng = np.random.default_rng(11)
    theirs = keras.layers.BatchNormalization(momentum=0.5, dtype=keras.DTypePolicy(policy))
    ours = BatchNormalization(momentum=0.5, dtype=keras.DTypePolicy(policy))
    assert ours.dtype_policy == theirs.dtype_policy.name == policy
    x = torch.tensor(rng.normal(size=(8, 3)) * 2 + 1, dtype=torch.float32)
    y_ours, y_theirs = ours(x, training=True), theirs(x, training=True)
    assert y_ours.dtype == y_theirs.dtype
    tol = HALF[_POLICY_COMPUTE[policy]] if policy in _POLICY_COMPUTE else F32
    _close(y_ours, y_theirs, tol, "output")
    _weights_close(ours, theirs, tol, "weights")
    ours.name = theirs.name
    assert_same_config(ours.keras_config(), theirs.get_config(), "keras_config")
    assert to_keras(ours).dtype_policy.name == policy
    numpy_typed = BatchNormalization(dtype=np.float64)
    assert numpy_typed.dtype_policy == keras.layers.BatchNormalization(dtype=np.float64).dtype_policy.name


def test_a_keras_layer_with_custom_objects_ports():
    """from_keras of a Keras layer whose regularizer and initializer are registered custom classes, and whose
    constraint is a lambda, was refused ("not one normkit knows; use ... a callable", which from_keras cannot be
    given): under the torch backend the layer's own objects are callables on torch tensors, and are used. The port
    computes Keras' losses and projections, and to_keras writes the registered classes back."""
    keras = KERAS

    @keras.saving.register_keras_serializable(package="normkit_tests")
    class SquareSum(keras.regularizers.Regularizer):
        def __call__(self, weight):
            return keras.ops.sum(weight * weight) * 0.3

        def get_config(self):
            return {}

    @keras.saving.register_keras_serializable(package="normkit_tests")
    class Twos(keras.initializers.Initializer):
        def __call__(self, shape, dtype=None):
            return keras.ops.ones(shape, dtype=dtype) * 2

        def get_config(self):
            return {}

    kwargs = dict(gamma_regularizer=SquareSum(), beta_initializer=Twos(), gamma_constraint=lambda w: keras.ops.clip(w, 0, 0.5))
    for built in (False, True):
        theirs = keras.layers.BatchNormalization(**kwargs)
        if built:
            theirs.build((4, 3))
        ours = from_keras(theirs)
        if not built:
            theirs.build((4, 3))
            ours.build((4, 3))
        _weights_close(ours, theirs, F32, f"built={built}: weights")
        _close(ours.losses[0], theirs.losses[0], F32, f"built={built}: loss")
        ours.bn.apply_constraints()
        _close(ours.gamma, keras.ops.clip(theirs.gamma.value, 0, 0.5), F32, f"built={built}: constraint")
        with pytest.raises(ValueError, match="gamma_constraint"):
            to_keras(ours)  # (a lambda: Keras cannot load it, as before)
    ours.gamma_constraint = None
    back = to_keras(ours)
    assert isinstance(back.gamma_regularizer, SquareSum) and isinstance(back.beta_initializer, Twos)
    _close(back.losses[0], ours.losses[0], F32, "to_keras: loss")
