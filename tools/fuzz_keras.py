"""Differential fuzzer of normkit.keras.BatchNormalization against the real Keras 3 (torch backend) over TRAINING STEPS.

tests/test_keras_differential.py compares single calls of 300 drawn configurations; this draws configurations the same
way and more widely (momentum 0 and 1, epsilon 1e-10 to 1e3, initializers with arguments as Keras objects, constraints
(NonNeg, MaxNorm, UnitNorm, MinMaxNorm), regularizers (L1, L2, L1L2; of gamma, beta and the output), renorm with clipping and renorm_momentum, masks
broadcast along any axis given as bool, float or int, trainable=False from the constructor or toggled, dtype policies
by name or as keras.DTypePolicy: mixed_float16, mixed_bfloat16, float16, bfloat16, float64; ranks 2-5, any axis,
batch size 1) and runs several steps of training, inference and ``training=None`` calls (normkit in ``eval()``), each
followed by one SGD step on gamma and beta of ``sum(y * g) + sum(layer.losses)`` and the constraints (Keras'
optimizer rule: ``v.assign(constraint(v))``; here ``normkit.apply_constraints``). After each call: outputs, the
gradients of the input, gamma and beta, the regularization losses, every weight. Then ``keras_config()`` against
``get_config()``, ``from_keras``/``to_keras`` of the trained layers and of unbuilt ones, ``from_config(get_config())``.

A difference is a failure unless Keras' own rounding explains it: the same call in float64 (normkit's float64 layer on
the same weights and the input both layers see) is then at least as close to normkit as to Keras (docs/keras.md,
"Deliberate differences": Keras' one-pass variance, its float32 math for float64 layers, its masked denominator).
Fully masked channels and one value per channel (documented differences) are not drawn.

    KERAS_BACKEND=torch PYTHONPATH=src:<keras site-packages> python tools/fuzz_keras.py --seeds 0 500
    ... --replay 102    (one seed, with every comparison printed)

Seeded: a seed names one configuration and its data. Exits 1 if any seed fails. Needs Keras 3 (torch backend).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import torch

try:
    import keras
except ImportError as error:  # (the fuzzer is local, never CI: say what it needs, not a traceback)
    sys.exit(f"tools/fuzz_keras.py needs Keras 3 with KERAS_BACKEND=torch ({error})")
if keras.backend.backend() != "torch":
    sys.exit(f"tools/fuzz_keras.py needs Keras 3 on the torch backend (KERAS_BACKEND=torch), not {keras.backend.backend()}")

import normkit
from normkit.keras import BatchNormalization, from_keras, to_keras

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from oracle import keras_initial_weights  # noqa: E402  (the tests' draw of Keras weights, shared)

HALF = {"mixed_float16": torch.float16, "float16": torch.float16, "mixed_bfloat16": torch.bfloat16,
        "bfloat16": torch.bfloat16}
TOLERANCE = {None: dict(rtol=2e-4, atol=2e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


class Mismatch(AssertionError):
    pass


# ----------------------------------------------------------------------------- drawing configurations

def _initializer(rng, positive):
    """A name or a Keras initializer object with arguments; ``positive``: for a variance."""
    if positive:
        return ["ones", keras.initializers.Constant(float(rng.uniform(0.2, 3))),
                keras.initializers.RandomUniform(0.5, 2.0, seed=int(rng.integers(50))),
                keras.initializers.TruncatedNormal(2.0, 0.1, seed=3), keras.initializers.Ones()][rng.integers(5)]
    return [str(rng.choice(["zeros", "ones", "random_normal", "glorot_uniform", "he_normal", "lecun_normal",
                            "truncated_normal", "random_uniform"])),
            keras.initializers.Constant(float(rng.uniform(-2, 2))),
            keras.initializers.RandomNormal(0.5, 0.3, seed=int(rng.integers(50))),
            keras.initializers.VarianceScaling(float(rng.uniform(0.5, 3)), str(rng.choice(["fan_in", "fan_out", "fan_avg"])),
                                               str(rng.choice(["uniform", "truncated_normal", "untruncated_normal"])), seed=5),
            keras.initializers.GlorotNormal(seed=9), keras.initializers.HeUniform(seed=2)][rng.integers(6)]


def _constraint(rng):
    return [keras.constraints.NonNeg(), keras.constraints.MaxNorm(float(rng.uniform(0.5, 2)), axis=0),
            keras.constraints.UnitNorm(axis=0), keras.constraints.MinMaxNorm(0.3, 1.5, float(rng.uniform(0.2, 1)), axis=0),
            "non_neg", "unit_norm", "max_norm"][rng.integers(7)]


def draw(seed):
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(2, 6))
    shape = [int(rng.integers(1, 6))] + [int(rng.integers(1, 5)) for _ in range(rank - 1)]
    if rng.random() < 0.1:
        shape[0] = 1
    feature = int(rng.integers(0, rank)) if rng.random() < 0.1 else int(rng.integers(1, rank))
    kwargs = dict(axis=feature - rank if rng.random() < 0.5 else feature)
    if rng.random() < 0.7:
        kwargs["momentum"] = float(rng.choice([0.0, 0.5, 0.9, 0.99, 1.0, rng.uniform(0, 1)]))
    if rng.random() < 0.7:
        kwargs["epsilon"] = float(rng.choice([1e-10, 1e-7, 1e-3, 0.5, 10.0, 1e3, rng.uniform(1e-5, 1)]))
    for flag in ("center", "scale"):
        if rng.random() < 0.25:
            kwargs[flag] = False
    for name, positive in (("gamma_initializer", False), ("beta_initializer", False),
                           ("moving_mean_initializer", False), ("moving_variance_initializer", True)):
        if rng.random() < 0.3:
            kwargs[name] = _initializer(rng, positive)
    for name in ("gamma_regularizer", "beta_regularizer"):
        if rng.random() < 0.2:
            kwargs[name] = ["l1", "l2", keras.regularizers.L2(0.3), keras.regularizers.L1L2(0.1, 0.2),
                            keras.regularizers.L1(0.05), "l1l2"][rng.integers(6)]
    for name in ("gamma_constraint", "beta_constraint"):
        if rng.random() < 0.2:
            kwargs[name] = _constraint(rng)
    if rng.random() < 0.35:
        kwargs["renorm"] = True
        choice = rng.integers(4)
        if choice == 1:
            kwargs["renorm_clipping"] = {}
        elif choice >= 2:
            kwargs["renorm_clipping"] = {key: float(rng.uniform(low, high)) for key, low, high in
                                         (("rmax", 1.0, 2.0), ("rmin", 0.3, 1.0), ("dmax", 0.0, 1.0))
                                         if rng.random() < 0.7}
        if rng.random() < 0.7:
            kwargs["renorm_momentum"] = float(rng.choice([0.0, 0.5, 0.8, 0.99, rng.uniform(0, 1)]))
    policy = None
    if rng.random() < 0.3:
        policy = str(rng.choice(["mixed_float16", "mixed_bfloat16", "float64", "float64", "bfloat16", "float16"]))
        kwargs["dtype"] = policy if rng.random() < 0.5 else keras.DTypePolicy(policy)
    if rng.random() < 0.12:
        kwargs["trainable"] = False
    # (its own stream, so that every seed drawn before activity regularizers were draws the same configuration)
    extra = np.random.default_rng((seed, 1))
    if extra.random() < 0.2:
        kwargs["activity_regularizer"] = ["l1", "l2", keras.regularizers.L2(0.3), keras.regularizers.L1L2(0.1, 0.2),
                                          keras.regularizers.L1(0.05)][extra.integers(5)]
    steps = int(rng.integers(2, 5))
    return dict(seed=seed, shape=tuple(shape), feature=feature, kwargs=kwargs, policy=policy,
                masked=rng.random() < 0.3 and shape[feature] > 1, mask_kind=int(rng.integers(4)),
                modes=[str(rng.choice(["train", "train", "infer", "none"])) for _ in range(steps)],
                toggle=rng.random() < 0.1)


def _mask(rng, shape, kind, feature):
    """A Keras mask (the input's shape without its last axis; kind 1: size 1 along a middle axis, 3: along the batch)
    leaving every channel two valid values (fewer are documented differences), as bool, float or int."""
    for _ in range(200):
        mask_shape = list(shape[:-1])
        if kind == 1 and len(mask_shape) > 1:
            mask_shape[int(rng.integers(1, len(mask_shape)))] = 1
        if kind == 3:
            mask_shape[0] = 1
        mask = rng.random(mask_shape) < 0.75
        expanded = np.broadcast_to(np.expand_dims(mask, -1), shape)
        if np.moveaxis(expanded, feature, 0).reshape(shape[feature], -1).sum(1).min() >= 2:
            return [mask, mask.astype(np.float32), mask.astype(np.int64)][rng.integers(3)]
    return None


# ----------------------------------------------------------------------------- comparing

def _np(value):
    if isinstance(value, torch.Tensor):
        return value.detach().double().cpu().numpy()
    return np.asarray(np.asarray(value).astype(np.float32) if np.asarray(value).dtype.kind == "V"
                      or "bfloat16" in str(np.asarray(value).dtype) else value, dtype=np.float64)


def _compare(ours, theirs, truth, tol, what, log):
    """Equal within ``tol``, or Keras the further from the float64 ``truth`` (its rounding, documented)."""
    ours, theirs = _np(ours), _np(theirs)
    if ours.shape != theirs.shape:
        raise Mismatch(f"{what}: shape {ours.shape} vs Keras' {theirs.shape}")
    if np.allclose(ours, theirs, **tol, equal_nan=True):
        return
    if truth is not None:
        truth = _np(truth)
        if np.nanmax(np.abs(ours - truth), initial=0) <= np.nanmax(np.abs(theirs - truth), initial=0):
            log.append(f"  (Keras' rounding) {what}: normkit {np.nanmax(np.abs(ours - truth)):.3g} from float64, "
                       f"Keras {np.nanmax(np.abs(theirs - truth)):.3g}")
            return
    raise Mismatch(f"{what}: max difference {np.nanmax(np.abs(ours - theirs)):.3g} (normkit {ours.ravel()[:4]}, "
                   f"Keras {theirs.ravel()[:4]})")


def _truth(ours, x, g, mask_args, training):
    """The same call in float64 on what both layers see: normkit's float64 layer, the same weights."""
    config = {key: value for key, value in ours.get_config().items() if key not in ("name", "dtype")}
    exact = BatchNormalization(**config, dtype=torch.float64)
    exact.build(tuple(x.shape))
    exact.set_weights([_np(w) for w in ours.get_weights()])
    seen = x.to(HALF[ours.dtype_policy]) if ours.dtype_policy in HALF else x
    leaf = seen.double().requires_grad_()
    y = exact(leaf, training=training and ours.trainable, **mask_args)
    params = [p for p in (exact.gamma, exact.beta) if p is not None and p.requires_grad]
    grads = torch.autograd.grad((y * g.double()).sum() + sum(exact.losses, torch.tensor(0.0, dtype=torch.float64)),
                                [leaf] + params, allow_unused=True)
    return y, grads, exact.get_weights()


def run(config, log):
    shape, kwargs, feature, policy = config["shape"], config["kwargs"], config["feature"], config["policy"]
    rng = np.random.default_rng(10000 + config["seed"])
    theirs, ours = keras.layers.BatchNormalization(**kwargs), BatchNormalization(**kwargs)
    theirs.build(shape)
    ours.build(shape)
    tol = TOLERANCE[HALF.get(policy)]
    names = [variable.name for variable in theirs.weights]
    if names != [name for name, _ in ours._weight_tensors()]:
        raise Mismatch(f"weights {[name for name, _ in ours._weight_tensors()]} vs Keras' {names}")
    dtypes = [w.dtype for w in theirs.get_weights()]
    if [str(d) for d in dtypes] != [str(w.dtype) for w in ours.get_weights()]:
        raise Mismatch(f"weight dtypes {[w.dtype for w in ours.get_weights()]} vs Keras' {dtypes}")
    weights = keras_initial_weights(rng, names, tuple(theirs.weights[0].shape))
    weights = [w.astype(np.float32).astype(d) for w, d in zip(weights, dtypes)]
    theirs.set_weights(weights)
    ours.set_weights(weights)
    for step, mode in enumerate(config["modes"]):
        what = f"step {step} ({mode})"
        if config["toggle"] and step == 1:
            theirs.trainable = ours.trainable = not theirs.trainable
        x = torch.tensor(rng.normal(size=shape) * rng.uniform(0.5, 3) + rng.uniform(-3, 3), dtype=torch.float32)
        g = torch.tensor(rng.normal(size=shape), dtype=torch.float32)
        mask = _mask(rng, shape, config["mask_kind"], feature) if config["masked"] else None
        mask_args = {} if mask is None else {"mask": torch.tensor(mask)}
        training = mode == "train"
        if training and ours.trainable and mask is None and np.prod(shape) == shape[feature]:
            return "one value per channel (documented: a ValueError here)"
        truth = _truth(ours, x, g, mask_args, training)
        leaf_ours, leaf_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        if mode == "none":
            ours.eval()  # (training=None: Keras' inference, normkit's module mode)
        try:
            y_ours = ours(leaf_ours, **({} if mode == "none" else {"training": training}), **mask_args)
        finally:
            ours.train()
        y_theirs = theirs(leaf_theirs, **({} if mode == "none" else {"training": training}), **mask_args)
        if y_ours.dtype != y_theirs.dtype:
            raise Mismatch(f"{what}: output dtype {y_ours.dtype} vs Keras' {y_theirs.dtype}")
        _compare(y_ours, y_theirs, truth[0], tol, f"{what}: output", log)
        pairs = [(name, getattr(ours, name), getattr(theirs, name)) for name in ("gamma", "beta")
                 if getattr(theirs, name) is not None and getattr(theirs, name).trainable and theirs.trainable]
        losses_ours, losses_theirs = ours.losses, theirs.losses
        if len(losses_ours) != len(losses_theirs):
            raise Mismatch(f"{what}: {len(losses_ours)} losses vs Keras' {len(losses_theirs)}")
        for got, want in zip(losses_ours, losses_theirs):
            _compare(got, want, None, tol, f"{what}: regularization loss", log)
        loss_ours = (y_ours.float() * g).sum() + sum(loss.float() for loss in losses_ours)
        loss_theirs = (y_theirs.float() * g).sum() + sum(loss.float() for loss in losses_theirs)
        grads_ours = torch.autograd.grad(loss_ours, [leaf_ours] + [p for _, p, _ in pairs], allow_unused=True)
        grads_theirs = torch.autograd.grad(loss_theirs, [leaf_theirs] + [v.value for _, _, v in pairs], allow_unused=True)
        truth_grads = dict(zip(["x"] + [name for name in ("gamma", "beta") if getattr(ours, name) is not None
                                        and getattr(ours, name).requires_grad], truth[1]))
        for name, got, want in zip(["x"] + [name for name, _, _ in pairs], grads_ours, grads_theirs):
            if (got is None) != (want is None):
                raise Mismatch(f"{what}: gradient of {name}: {got} vs Keras' {want}")
            if got is not None:
                _compare(got, want, truth_grads.get(name), tol, f"{what}: gradient of {name}", log)
        # One SGD step on each side, then the constraints as Keras' optimizer applies them.
        with torch.no_grad():
            for (_, parameter, _), grad in zip(pairs, grads_ours[1:]):
                parameter -= 0.1 * grad.to(parameter.dtype)
        normkit.apply_constraints(ours)
        for (_, _, variable), grad in zip(pairs, grads_theirs[1:]):
            variable.assign(variable.value - 0.1 * grad.to(variable.value.dtype))
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable.value))
        # (the float64 truth of the weights is that of the call, before the SGD step moved gamma and beta)
        for index, (got, want) in enumerate(zip(ours.get_weights(), theirs.get_weights(), strict=True)):
            moved = names[index] in ("gamma", "beta")
            _compare(got, want, None if moved else truth[2][index], tol, f"{what}: weight {names[index]}", log)
    _round_trips(ours, theirs, kwargs, shape, tol, log)
    return "ok"


def _round_trips(ours, theirs, kwargs, shape, tol, log):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from oracle import assert_same_config

    ours.name = theirs.name
    expected = theirs.get_config()
    ported, back = from_keras(theirs), to_keras(ours)
    for what, config in (("keras_config", ours.keras_config()), ("from_keras", ported.keras_config()),
                         ("to_keras", back.get_config())):
        try:
            assert_same_config(config, expected, what)
        except AssertionError as error:
            raise Mismatch(f"{what}: {str(error)[:300]}") from None
    for what, layer, other in (("from_keras", ported, theirs), ("to_keras", back, ours)):
        for got, want in zip(layer.get_weights(), other.get_weights(), strict=True):
            if not np.array_equal(_np(got), _np(want)):
                raise Mismatch(f"{what}: weights differ")
    x = torch.randn(shape)
    expected_y = theirs(x, training=False)
    again = BatchNormalization.from_config(ported.get_config())
    again.build(shape)
    again.set_weights(ported.get_weights())
    for what, layer in (("from_keras", ported), ("to_keras", back), ("from_config", again)):
        _compare(layer(x, training=False), expected_y, None, tol, f"{what}: inference", log)
    unbuilt = keras.layers.BatchNormalization(**kwargs)
    unported = from_keras(unbuilt)
    unported.name = unbuilt.name
    if unported.built:
        raise Mismatch("from_keras of an unbuilt layer is built")
    try:
        assert_same_config(unported.keras_config(), unbuilt.get_config(), "unbuilt from_keras")
        assert_same_config({**to_keras(BatchNormalization(**kwargs)).get_config(), "name": unbuilt.name},
                           unbuilt.get_config(), "unbuilt to_keras")
    except AssertionError as error:
        raise Mismatch(str(error)[:300]) from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=(0, 200), metavar=("FIRST", "STOP"))
    parser.add_argument("--replay", type=int, help="run one seed, printing its configuration and every note")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    seeds = [args.replay] if args.replay is not None else range(*args.seeds)
    failed, counts = [], {}
    for seed in seeds:
        config, log = draw(seed), []
        try:
            status = run(config, log)
        except Mismatch as error:
            status = f"MISMATCH {error}"
        except Exception as error:  # (a crash on either side is a finding too)
            status = f"ERROR {type(error).__name__}: {str(error)[:300]}"
        kind = status.split()[0]
        counts[kind] = counts.get(kind, 0) + 1
        if args.replay is not None or kind in ("MISMATCH", "ERROR"):
            print(f"seed {seed}: {status}\n  {config}", *log, sep="\n", flush=True)
        if kind in ("MISMATCH", "ERROR"):
            failed.append(seed)
    print(counts, "failed seeds:", failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
