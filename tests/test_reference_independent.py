"""reference.py against oracles sharing no code with it or normkit, so a bug the two share cannot pass unseen."""

# Why: every other test compares normkit's torch code with reference.py, and functional.py was written as its
# translation, so a mistake in the reference could be shared by both and pass everything. The oracles here are
# written from ../shared/spec/keras-batchnorm.md (and docs/decisions.md's documented differences) alone:
#   * ``naive_step``: per-feature, per-ghost Python loops in float64 NumPy (forward and running statistics);
#   * ``naive_torch_forward``: the same loops in torch float64, differentiated by torch.autograd (r, d detached);
#   * central finite differences of the reference's own forward, renorm's r and d held fixed by construction;
#   * numbers quoted from Keras' own tests (spec section 9).

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import normkit
from normkit import reference as R
from normkit.keras import BatchNormalization as KerasBatchNormalization

from oracle import numeric_gradient
from normkit.stats import RenormClipping

NO_CLIPPING = (0.0, math.inf, math.inf)
BUFFERS = ("running_mean", "running_var", "renorm_mean", "renorm_stddev", "moving_stddev")

# ----------------------------------------------------------------------------- the naive oracles


def _features(axis, ndim):
    return tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis)))


def _to_bmf(a, feat):
    """(B, ...) -> (B, M, F): the feature axes moved last (in order) and flattened, the other non-batch axes into M."""
    k = len(feat)
    moved = np.moveaxis(a, feat, tuple(range(a.ndim - k, a.ndim)))
    return moved.reshape(a.shape[0], -1, int(np.prod([a.shape[i] for i in feat])))


def _from_bmf(a, feat, shape):
    k, ndim = len(feat), len(shape)
    moved_shape = [shape[i] for i in range(ndim) if i not in feat] + [shape[i] for i in feat]
    return np.moveaxis(np.reshape(a, moved_shape), tuple(range(ndim - k, ndim)), feat)


def _ghost_rows(batch, virtual_batch_size, layout):
    """Row lists of the ghost batches: Keras' reshape to (V, B/V) puts rows j, j + B/V, ... in ghost j (strided);
    contiguous ghosts are chunks of V rows; without ghost batches one group of every row."""
    if virtual_batch_size is None:
        return [list(range(batch))]
    groups = batch // virtual_batch_size
    if layout == "strided":
        return [[j + i * groups for i in range(virtual_batch_size)] for j in range(groups)]
    return [list(range(g * virtual_batch_size, (g + 1) * virtual_batch_size)) for g in range(groups)]


def _ema(old, new, rate):
    return (1.0 - rate) * old + rate * new


def naive_step(x, state, *, axis=1, mask=None, virtual_batch_size=None, layout="strided", weight=None, bias=None,
               eps=1e-3, momentum=0.1, unbiased=True, clipping=None, renorm_momentum=0.01, adjustment=None,
               training=True):
    """One call of batch norm, from the spec with loops. ``state``: dict of flat per-feature float arrays (moved in
    place in training; ``None`` = no running statistics, batch statistics always); renorm iff ``clipping`` is given.
    ``momentum`` is the weight of the new value. Returns y and, in training, per-feature (batch mean, biased batch
    variance, running-variance target) for the caller's own averages."""
    x = np.asarray(x, np.float64)
    feat = _features(axis, x.ndim)
    X = _to_bmf(x, feat)
    B, M, F = X.shape
    gamma = np.ones(F) if weight is None else np.ravel(weight)
    beta = np.zeros(F) if bias is None else np.ravel(bias)
    Y = np.empty_like(X)
    if not training and state is not None:  # inference: the running statistics, nothing else
        for f in range(F):
            for b in range(B):
                for m in range(M):
                    Y[b, m, f] = (X[b, m, f] - state["running_mean"][f]) / math.sqrt(state["running_var"][f] + eps)
                    Y[b, m, f] = Y[b, m, f] * gamma[f] + beta[f]
        return _from_bmf(Y, feat, x.shape), None
    valid = _to_bmf(np.broadcast_to(np.ones(1, bool) if mask is None else np.asarray(mask) != 0, x.shape), feat)
    if adjustment is not None:
        adj_scale, adj_bias = (_to_bmf(np.broadcast_to(np.asarray(t, np.float64), x.shape), feat) for t in adjustment)
    ghosts = _ghost_rows(B, virtual_batch_size, layout)
    batch = []
    for f in range(F):
        stats = []
        for rows in ghosts:
            values = [X[b, m, f] for b in rows for m in range(M) if valid[b, m, f]]
            n = len(values)
            mean = sum(values) / n if n else 0.0  # (a group with no valid value: mean 0, variance 0)
            var = sum((v - mean) ** 2 for v in values) / n if n else 0.0
            stats.append((n, mean, var))
            for b in rows:
                for m in range(M):
                    Y[b, m, f] = (X[b, m, f] - mean) / math.sqrt(var + eps)
        total = sum(n for n, _, _ in stats)
        batch_mean = sum(n * mean for n, mean, _ in stats) / total if total else 0.0
        batch_var = sum(n * var for n, _, var in stats) / total if total else 0.0
        if unbiased:  # n / (n - 1) per group, the biased value where n <= 1
            target = sum(n * var * (n / (n - 1) if n > 1 else 1.0) for n, _, var in stats) / total if total else 0.0
        else:
            target = batch_var
        batch.append((batch_mean, batch_var, target))
        if clipping is not None:
            rmin, rmax, dmax = clipping
            s = math.sqrt(batch_var + eps)
            rs = max(state["renorm_stddev"][f], math.sqrt(eps))
            r = min(max(s / rs, rmin), rmax)
            d = min(max((batch_mean - state["renorm_mean"][f]) / rs, -dmax), dmax)
            Y[:, :, f] = Y[:, :, f] * r + d
        if adjustment is not None:
            Y[:, :, f] = Y[:, :, f] * adj_scale[:, :, f] + adj_bias[:, :, f]
        Y[:, :, f] = Y[:, :, f] * gamma[f] + beta[f]
        if state is None or not training or total == 0:  # (documented: a channel that saw nothing keeps its buffers)
            continue
        if clipping is not None:
            state["renorm_mean"][f] = _ema(state["renorm_mean"][f], batch_mean, renorm_momentum)
            state["renorm_stddev"][f] = _ema(state["renorm_stddev"][f], math.sqrt(batch_var + eps), renorm_momentum)
            state["running_mean"][f] = _ema(state["running_mean"][f], batch_mean, momentum)
            state["moving_stddev"][f] = _ema(state["moving_stddev"][f], math.sqrt(target + eps), momentum)
            state["running_var"][f] = max(state["moving_stddev"][f] ** 2 - eps, 0.0)
        else:
            state["running_mean"][f] = _ema(state["running_mean"][f], batch_mean, momentum)
            state["running_var"][f] = _ema(state["running_var"][f], target, momentum)
    return _from_bmf(Y, feat, x.shape), np.array(batch)


def naive_torch_forward(x, weight, bias, *, axis=1, mask=None, virtual_batch_size=None, layout="strided", eps=1e-3,
                        renorm=None, adjustment=None):
    """Training forward in torch (float64, autograd), the same loops: ``renorm`` = (renorm_mean, renorm_stddev,
    clipping) flat per feature, r and d detached (Keras' stop_gradient)."""
    ndim = x.dim()
    feat = _features(axis, ndim)
    others = [i for i in range(ndim) if i not in feat]
    perm = others + list(feat)
    moved = x.permute(perm)
    B, F = x.shape[0], int(np.prod([x.shape[i] for i in feat]))
    X = moved.reshape(B, -1, F)
    M = X.shape[1]
    valid = np.broadcast_to(np.ones(1, bool) if mask is None else np.asarray(mask) != 0, tuple(x.shape))
    valid = torch.as_tensor(_to_bmf(valid, feat).copy())
    columns, batch_stats = [], []
    for f in range(F):
        column = torch.zeros(B, M, dtype=x.dtype)
        stats = []
        for rows in _ghost_rows(B, virtual_batch_size, layout):
            index = torch.tensor(rows)
            values, keep = X[index, :, f], valid[index, :, f]
            n = keep.sum()
            mean = torch.where(keep, values, 0.0).sum() / n
            var = (torch.where(keep, values - mean, 0.0) ** 2).sum() / n
            stats.append((n, mean, var))
            slab = (values - mean) / torch.sqrt(var + eps)
            column = column + torch.zeros(B, M, dtype=x.dtype).index_put((index,), slab)
        total = sum(n for n, _, _ in stats)
        batch_stats.append((sum(n * m for n, m, _ in stats) / total, sum(n * v for n, _, v in stats) / total))
        columns.append(column)
    Y = torch.stack(columns, -1)
    if renorm is not None:
        renorm_mean, renorm_stddev, (rmin, rmax, dmax) = renorm
        rs = [max(float(v), math.sqrt(eps)) for v in renorm_stddev]
        r = torch.stack([torch.clamp(torch.sqrt(v.detach() + eps) / rs[f], rmin, rmax)
                         for f, (_, v) in enumerate(batch_stats)])
        d = torch.stack([torch.clamp((m.detach() - float(renorm_mean[f])) / rs[f], -dmax, dmax)
                         for f, (m, _) in enumerate(batch_stats)])
        Y = Y * r + d
    if adjustment is not None:
        a, b = (torch.as_tensor(_to_bmf(np.broadcast_to(np.asarray(t, np.float64), tuple(x.shape)), feat).copy())
                for t in adjustment)
        Y = Y * a + b
    if weight is not None:
        Y = Y * weight.reshape(-1)
    if bias is not None:
        Y = Y + bias.reshape(-1)
    return Y.reshape([x.shape[i] for i in perm]).permute(list(np.argsort(perm)))


# ----------------------------------------------------------------------------- generated cases


@st.composite
def cases(draw):
    """A batch-norm call with any combination of options, its data drawn from a seed."""
    rank = draw(st.integers(2, 4))
    k = draw(st.integers(1, min(2, rank - 1)))
    feat = tuple(sorted(draw(st.lists(st.integers(1, rank - 1), min_size=k, max_size=k, unique=True))))
    signed = tuple(a - rank if draw(st.booleans()) else a for a in feat)
    axis = signed[0] if k == 1 else signed
    virtual = draw(st.sampled_from([None, None, 1, 2, 3, 4]))
    groups = draw(st.integers(1, 3))
    batch = draw(st.integers(2, 6)) if virtual is None else virtual * groups
    shape = [batch] + [draw(st.integers(1, 3)) for _ in range(rank - 1)]
    options = dict(
        axis=axis, shape=tuple(shape), virtual_batch_size=virtual,
        layout=draw(st.sampled_from(["strided", "contiguous"])),
        mask=draw(st.sampled_from([None, "padding", "full"])),
        renorm=draw(st.sampled_from([None, NO_CLIPPING, (0.7, 1.4, 0.5), (0.95, 1.05, 0.05)])),
        adjustment=draw(st.sampled_from([None, "per_feature", "full"])),
        affine=draw(st.sampled_from(["both", "weight", "bias", "neither"])),
        unbiased=draw(st.booleans()), momentum=draw(st.sampled_from([0.1, 0.5, 1.0, 0.0])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.3])), renorm_momentum=draw(st.sampled_from([0.01, 0.3, 1.0])),
        steps=draw(st.integers(1, 3)), seed=draw(st.integers(0, 2 ** 31 - 1)),
    )
    return options


def _materialize(case, rng):
    """The arrays of a case: x per step, mask, adjustment, weight, bias, initial buffers."""
    shape, feat = case["shape"], _features(case["axis"], len(case["shape"]))
    fshape = tuple(shape[i] for i in feat)
    pshape = tuple(shape[i] if i in feat else 1 for i in range(len(shape)))
    xs = [rng.normal(size=shape) * rng.uniform(0.2, 5.0, size=pshape) + rng.normal(size=pshape) * 3
          for _ in range(case["steps"])]
    mask = None
    if case["mask"] == "padding":
        mask = rng.uniform(size=tuple(1 if i in feat else s for i, s in enumerate(shape))) < 0.7
    elif case["mask"] == "full":
        mask = rng.uniform(size=shape) < 0.7
    adjustment = None
    if case["adjustment"] is not None:
        ashape = pshape if case["adjustment"] == "per_feature" else shape
        adjustment = (rng.uniform(0.5, 1.5, size=ashape), rng.uniform(-0.3, 0.3, size=ashape))
    weight = None
    if case["affine"] in ("both", "weight"):
        weight = rng.uniform(0.5, 2.0, size=fshape) * rng.choice([-1, 1], size=fshape)
    bias = rng.normal(size=fshape) if case["affine"] in ("both", "bias") else None
    state = {"running_mean": rng.normal(size=fshape), "running_var": rng.uniform(0.3, 3.0, size=fshape)}
    if case["renorm"] is not None:
        state.update(renorm_mean=rng.normal(size=fshape), renorm_stddev=rng.uniform(0.01, 3.0, size=fshape),
                     moving_stddev=rng.uniform(0.3, 2.0, size=fshape))
    return xs, mask, adjustment, weight, bias, state


def _reference_kwargs(case, mask, adjustment, state):
    kwargs = dict(axis=case["axis"], mask=mask, virtual_batch_size=case["virtual_batch_size"],
                  ghost_layout=case["layout"],
                  adjustment=None if adjustment is None else (lambda shape: adjustment))
    if case["renorm"] is not None:
        kwargs.update(renorm_mean=state["renorm_mean"], renorm_stddev=state["renorm_stddev"],
                      renorm_clipping=case["renorm"])
    return kwargs


def _naive_kwargs(case, mask, adjustment, weight, bias):
    return dict(axis=case["axis"], mask=mask, virtual_batch_size=case["virtual_batch_size"], layout=case["layout"],
                weight=weight, bias=bias, eps=case["eps"], momentum=case["momentum"], unbiased=case["unbiased"],
                clipping=case["renorm"], renorm_momentum=case["renorm_momentum"], adjustment=adjustment)


def _every_group_has_a_value(shape, mask, case):
    """Whether every (ghost batch, feature) group holds a valid value (else it has no statistics to differentiate)."""
    if mask is None:
        return True
    valid = _to_bmf(np.broadcast_to(mask, shape), _features(case["axis"], len(shape)))
    return all(valid[rows].any(axis=(0, 1)).all()
               for rows in _ghost_rows(shape[0], case["virtual_batch_size"], case["layout"]))


def _flat(state):
    return {name: value.reshape(-1) for name, value in state.items()}


# ----------------------------------------------------------------------------- forward and running statistics


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_reference_training_steps_match_the_naive_loops(case):
    """Forward output and all five buffers over 1-3 steps, every option combined (renorm's clipping included), the
    reference's in-place buffers against the loops' own."""
    rng = np.random.default_rng(case["seed"])
    xs, mask, adjustment, weight, bias, state = _materialize(case, rng)
    naive_state = {name: value.copy().reshape(-1) for name, value in state.items()}
    for x in xs:
        expected, _ = naive_step(x, naive_state, **_naive_kwargs(case, mask, adjustment, weight, bias))
        y = R.batch_norm(x, state["running_mean"], state["running_var"], weight, bias, True, case["momentum"],
                         case["eps"], unbiased_running_var=case["unbiased"], renorm_momentum=case["renorm_momentum"],
                         moving_stddev=state.get("moving_stddev"), **_reference_kwargs(case, mask, adjustment, state))
        np.testing.assert_allclose(y, expected, rtol=1e-9, atol=1e-9)
        for name, value in state.items():  # (moved in place by the reference)
            np.testing.assert_allclose(value.reshape(-1), naive_state[name], rtol=1e-10, atol=1e-12, err_msg=name)
    # and inference with the buffers the steps left
    expected, _ = naive_step(xs[0], naive_state, training=False, **_naive_kwargs(case, mask, adjustment, weight, bias))
    y = R.batch_norm(xs[0], state["running_mean"], state["running_var"], weight, bias, False, case["momentum"],
                     case["eps"], axis=case["axis"])
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_normkit_batch_norm_matches_the_naive_loops(case):
    """The same generated steps through normkit.BatchNorm (float64): the torch path against the loops, not the
    reference, so a mistake the two share shows here."""
    rng = np.random.default_rng(case["seed"])
    xs, mask, adjustment, weight, bias, state = _materialize(case, rng)
    shape, feat = case["shape"], _features(case["axis"], len(case["shape"]))
    fshape = tuple(shape[i] for i in feat)
    per_group = np.prod(shape) // np.prod(fshape) // (shape[0] // (case["virtual_batch_size"] or shape[0]))
    assume(per_group > 1)  # (one value per channel, or per ghost batch, in training is refused)
    renorm = case["renorm"] is not None
    layer = normkit.BatchNorm(fshape[0] if len(fshape) == 1 else fshape, eps=case["eps"], momentum=case["momentum"],
                              axis=case["axis"], affine=weight is not None or bias is not None,
                              bias=bias is not None or weight is None,
                              renorm=renorm, renorm_momentum=case["renorm_momentum"],
                              renorm_clipping=dict(zip(("rmin", "rmax", "dmax"), case["renorm"])) if renorm else None,
                              virtual_batch_size=case["virtual_batch_size"], ghost_layout=case["layout"],
                              adjustment=None if adjustment is None else (lambda s: tuple(map(torch.as_tensor,
                                                                                              adjustment))),
                              unbiased_running_var=case["unbiased"]).double()
    with torch.no_grad():
        for name, value in state.items():
            getattr(layer, name).copy_(torch.as_tensor(value))
        if layer.weight is not None:
            layer.weight.copy_(torch.as_tensor(np.ones(fshape) if weight is None else weight))
        if layer.bias is not None:
            layer.bias.copy_(torch.as_tensor(np.zeros(fshape) if bias is None else bias))
    naive_state = {name: value.copy().reshape(-1) for name, value in state.items()}
    full_mask = None if mask is None else torch.as_tensor(np.broadcast_to(mask, shape).copy())
    flat = _flat(state)
    renorm_before = None if not renorm else (flat["renorm_mean"].copy(), flat["renorm_stddev"].copy(), case["renorm"])
    for step, x in enumerate(xs):
        expected, _ = naive_step(x, naive_state, **_naive_kwargs(case, mask, adjustment, weight, bias))
        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt, mask=full_mask)
        np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-9, atol=1e-9)
        if step == 0 and _every_group_has_a_value(x.shape, mask, case):
            # gradients too: autograd through the naive torch loops (with the renorm statistics before the step)
            g = rng.normal(size=x.shape)
            y.backward(torch.tensor(g))
            wt, bt = (None if t is None else torch.tensor(t, requires_grad=True) for t in (weight, bias))
            leaves = [t for t in (wt, bt) if t is not None]
            xn = torch.tensor(x, requires_grad=True)
            naive = naive_torch_forward(xn, wt, bt, axis=case["axis"], mask=mask,
                                        virtual_batch_size=case["virtual_batch_size"], layout=case["layout"],
                                        eps=case["eps"], renorm=renorm_before, adjustment=adjustment)
            expected_grads = torch.autograd.grad(naive, [xn] + leaves, torch.tensor(g))
            ours = [xt.grad] + [p.grad for p, t in ((layer.weight, weight), (layer.bias, bias)) if t is not None]
            scale = 1.0 / math.sqrt(case["eps"])
            for got, want, name in zip(ours, expected_grads, ("dx", "dweight", "dbias")):
                np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-8, atol=1e-10 * scale, err_msg=name)
        for name in naive_state:
            np.testing.assert_allclose(getattr(layer, name).numpy().reshape(-1), naive_state[name], rtol=1e-9,
                                       atol=1e-11, err_msg=name)


# ----------------------------------------------------------------------------- gradients


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_reference_backward_matches_autograd_on_the_naive_torch_loops(case):
    """dL/dx, dL/dweight, dL/dbias of the reference against torch.autograd through naive_torch_forward (r and d
    detached, as Keras' stop_gradient), training with every option; the loops' forward equals the NumPy loops'."""
    rng = np.random.default_rng(case["seed"])
    xs, mask, adjustment, weight, bias, state = _materialize(case, rng)
    x = xs[0]
    if mask is not None:  # (every group keeps a valid value: an empty group has no gradient to compare)
        mask = np.broadcast_to(mask, x.shape).copy()
        for rows in _ghost_rows(x.shape[0], case["virtual_batch_size"], case["layout"]):
            mask[rows[0]] = True
    g = rng.normal(size=x.shape)
    flat = _flat(state)
    xt = torch.tensor(x, requires_grad=True)
    wt = None if weight is None else torch.tensor(weight, requires_grad=True)
    bt = None if bias is None else torch.tensor(bias, requires_grad=True)
    renorm = None if case["renorm"] is None else (flat["renorm_mean"], flat["renorm_stddev"], case["renorm"])
    y = naive_torch_forward(xt, wt, bt, axis=case["axis"], mask=mask, virtual_batch_size=case["virtual_batch_size"],
                            layout=case["layout"], eps=case["eps"], renorm=renorm, adjustment=adjustment)
    naive_state = None if renorm is None else {k: v.copy() for k, v in flat.items()}
    loops, _ = naive_step(x, naive_state, **_naive_kwargs(case, mask, adjustment, weight, bias))
    np.testing.assert_allclose(y.detach().numpy(), loops, rtol=1e-10, atol=1e-10)
    inputs = [t for t in (xt, wt, bt) if t is not None]
    expected = torch.autograd.grad(y, inputs, torch.tensor(g))
    dx, dw, db = R.batch_norm_backward(g, x, state["running_mean"], state["running_var"], weight, bias, True,
                                       case["eps"], **_reference_kwargs(case, mask, adjustment, state))
    got = [dx] + ([dw] if weight is not None else []) + ([db] if bias is not None else [])
    assert (dw is None) == (weight is None) and (db is None) == (bias is None)
    scale = 1.0 / math.sqrt(case["eps"])
    for ours, theirs, name in zip(got, expected, ("dx", "dweight", "dbias")):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-8, atol=1e-10 * scale, err_msg=name)


def _fixed_renorm_as_adjustment(case, x, mask, adjustment, state):
    """Renorm with r and d held at this batch's values is the plain forward with the adjustment (r a, d a + b):
    ``((x_hat r + d) a + b) = x_hat (r a) + (d a + b)``. r and d come from the spec's formula, not the reference."""
    _, batch = naive_step(x, {k: v.copy() for k, v in _flat(state).items()},
                          **{**_naive_kwargs(case, mask, adjustment, None, None), "clipping": None})
    eps, (rmin, rmax, dmax) = case["eps"], case["renorm"]
    rs = np.maximum(state["renorm_stddev"].reshape(-1), math.sqrt(eps))
    r = np.clip(np.sqrt(batch[:, 1] + eps) / rs, rmin, rmax)
    d = np.clip((batch[:, 0] - state["renorm_mean"].reshape(-1)) / rs, -dmax, dmax)
    feat = _features(case["axis"], x.ndim)
    pshape = tuple(x.shape[i] if i in feat else 1 for i in range(x.ndim))
    r, d = r.reshape(pshape), d.reshape(pshape)
    a, b = (np.ones(pshape), np.zeros(pshape)) if adjustment is None else adjustment
    return np.broadcast_to(r * a, x.shape).copy(), np.broadcast_to(d * a + b, x.shape).copy()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from(["train", "eval", "eval_batch_statistics"]))
def test_reference_backward_matches_finite_differences_of_its_forward(case, mode):
    """Central differences of R.batch_norm for every option, training and eval (with running statistics, and
    without them: batch statistics). With renorm, r and d are constants of the step by design: the difference is
    taken of the forward with r and d held at their values (as the equivalent adjustment), not of R.batch_norm
    recomputing them, which agrees only where clipping saturates them."""
    assume(int(np.prod(case["shape"])) <= 48)
    rng = np.random.default_rng(case["seed"])
    xs, mask, adjustment, weight, bias, state = _materialize(case, rng)
    x = xs[0]
    training = mode == "train"
    batch_statistics = mode != "eval"
    if not batch_statistics:
        case = {**case, "renorm": None}
        mask = adjustment = None
    running = (state["running_mean"], state["running_var"]) if mode != "eval_batch_statistics" else (None, None)
    options = _reference_kwargs(case, mask, adjustment, state)
    if mode == "eval_batch_statistics":
        options.pop("renorm_mean", None), options.pop("renorm_stddev", None), options.pop("renorm_clipping", None)
        case = {**case, "renorm": None}
    g = rng.normal(size=x.shape)
    dx, dw, db = R.batch_norm_backward(g, x, *running, weight, bias, training, case["eps"], **options)
    forward_options = dict(options)
    if case["renorm"] is not None:
        fixed = _fixed_renorm_as_adjustment(case, x, mask, adjustment, state)
        for key in ("renorm_mean", "renorm_stddev", "renorm_clipping"):
            forward_options.pop(key)
        forward_options["adjustment"] = lambda shape: fixed

    def loss(v, w, b):
        buffers = [None if t is None else t.copy() for t in running]
        return float((R.batch_norm(v, *buffers, w, b, training, 0.1, case["eps"], **forward_options) * g).sum())

    scale = max(1.0, 1.0 / math.sqrt(case["eps"]))
    np.testing.assert_allclose(dx, numeric_gradient(lambda v: loss(v, weight, bias), x), rtol=1e-6, atol=1e-7 * scale)
    # The loss is affine in weight and bias (the statistics, r, d and the adjustment do not depend on them), so a
    # step of 1e-2 differentiates exactly and carries 1e4 times less rounding than 1e-6: with outputs of hundreds
    # (eps 1e-5, padding) the rounding of the loss over a 1e-6 step reached 7e-7 in a bias gradient.
    if weight is not None:
        np.testing.assert_allclose(dw, numeric_gradient(lambda v: loss(x, v, bias), weight, step=1e-2), rtol=1e-6,
                                   atol=1e-7 * scale)
    if bias is not None:
        np.testing.assert_allclose(db, numeric_gradient(lambda v: loss(x, weight, v), bias, step=1e-2), rtol=1e-6,
                                   atol=1e-7)


def test_renorm_backward_holds_r_and_d_fixed_unlike_the_full_derivative(rng):
    """The converse guard: where r and d are not clipped, the reference's gradient is NOT the full derivative of
    R.batch_norm (which recomputes r and d from the batch): the stop_gradient is really there."""
    x = rng.normal(size=(6, 3)) * 2 + 1
    g = rng.normal(size=x.shape)

    def loss(v):
        y = R.batch_norm(v, np.zeros(3), np.ones(3), None, None, True, 0.1, 1e-3, renorm_mean=np.zeros(3),
                         renorm_stddev=np.ones(3), moving_stddev=np.ones(3), renorm_clipping=NO_CLIPPING)
        return float((y * g).sum())

    dx = R.batch_norm_backward(g, x, np.zeros(3), np.ones(3), None, None, True, 1e-3, renorm_mean=np.zeros(3),
                               renorm_stddev=np.ones(3), renorm_clipping=NO_CLIPPING)[0]
    assert np.abs(dx - numeric_gradient(loss, x)).max() > 1e-2


@pytest.mark.parametrize("kind", ["layer", "group", "instance"])
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 6, 2, 3)])
def test_layer_group_instance_norm_match_naive_loops_autograd_and_finite_differences(kind, shape, rng):
    """Forward against per-sample (per-group, per-instance) loops; backward against autograd through the same
    loops in torch and against central differences of the reference's forward."""
    x = rng.normal(size=shape) * 3 + 2
    eps = 1e-3
    n, c = shape[:2]
    if kind == "layer":
        normalized = shape[2:] if len(shape) > 3 else shape[1:]
        k = len(normalized)
        weight, bias = rng.normal(size=normalized), rng.normal(size=normalized)
        blocks = [[(i,) + idx for idx in np.ndindex(*shape[1:])] for i in range(n)]
        pshape = (1,) * (len(shape) - k) + tuple(normalized)
        if len(shape) > 3:  # normalize over the trailing dims only: one block per (sample, channel)
            blocks = [[(i, j) + idx for idx in np.ndindex(*shape[2:])] for i in range(n) for j in range(c)]
        forward = lambda v, w, b: R.layer_norm(v, normalized, w, b, eps)
        backward = lambda gr, v, w, b: R.layer_norm_backward(gr, v, normalized, w, b, eps)
    elif kind == "group":
        groups = 2
        weight, bias = rng.normal(size=c), rng.normal(size=c)
        per = c // groups
        blocks = [[(i, j) + idx for j in range(gi * per, (gi + 1) * per) for idx in np.ndindex(*shape[2:])]
                  for i in range(n) for gi in range(groups)]
        pshape = (1, c) + (1,) * (len(shape) - 2)
        forward = lambda v, w, b: R.group_norm(v, groups, w, b, eps)
        backward = lambda gr, v, w, b: R.group_norm_backward(gr, v, groups, w, b, eps)
    else:
        weight, bias = rng.normal(size=c), rng.normal(size=c)
        blocks = [[(i, j) + idx for idx in np.ndindex(*shape[2:])] for i in range(n) for j in range(c)]
        pshape = (1, c) + (1,) * (len(shape) - 2)
        forward = lambda v, w, b: R.instance_norm(v, None, None, w, b, eps=eps)
        backward = lambda gr, v, w, b: R.instance_norm_backward(gr, v, None, None, w, b, eps=eps)

    def loops(v, w, b, xp):
        out = [None] * v.numel() if xp is torch else np.empty_like(v)
        for block in blocks:
            values = [v[i] for i in block]
            mean = sum(values) / len(values)
            var = sum((t - mean) ** 2 for t in values) / len(values)
            for i in block:
                value = (v[i] - mean) / xp.sqrt(var + eps)
                if xp is torch:
                    out[int(np.ravel_multi_index(i, shape))] = value
                else:
                    out[i] = value
        y = torch.stack(out).reshape(shape) if xp is torch else out
        return y * w.reshape(pshape) + b.reshape(pshape)

    g = rng.normal(size=shape)
    np.testing.assert_allclose(forward(x, weight, bias), loops(x, weight, bias, np), rtol=1e-12, atol=1e-12)
    xt, wt, bt = (torch.tensor(t, requires_grad=True) for t in (x, weight, bias))
    expected = torch.autograd.grad(loops(xt, wt, bt, torch), (xt, wt, bt), torch.tensor(g))
    got = backward(g, x, weight, bias)
    numeric = (numeric_gradient(lambda v: float((forward(v, weight, bias) * g).sum()), x),
               numeric_gradient(lambda v: float((forward(x, v, bias) * g).sum()), weight),
               numeric_gradient(lambda v: float((forward(x, weight, v) * g).sum()), bias))
    for ours, auto, fd, name in zip(got, expected, numeric, ("dx", "dweight", "dbias")):
        np.testing.assert_allclose(ours, auto.numpy(), rtol=1e-10, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(ours, fd, rtol=1e-6, atol=1e-7, err_msg=name)


def test_instance_norm_running_statistics_follow_torch_s_rule(rng):
    """torch.nn's rule from the spec: the running buffers move toward the mean over samples of the per-instance
    means and unbiased variances."""
    x = rng.normal(size=(3, 2, 5)) * 2 + 1
    running_mean, running_var = np.array([0.5, -1.0]), np.array([2.0, 0.5])
    expected_mean = 0.7 * running_mean + 0.3 * np.array([np.mean([np.mean(x[i, j]) for i in range(3)])
                                                          for j in range(2)])
    expected_var = 0.7 * running_var + 0.3 * np.array([np.mean([np.var(x[i, j], ddof=1) for i in range(3)])
                                                        for j in range(2)])
    R.instance_norm(x, running_mean, running_var, momentum=0.3)
    np.testing.assert_allclose(running_mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(running_var, expected_var, rtol=1e-12)


# ----------------------------------------------------------------------------- module-level rules


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
@pytest.mark.parametrize("unbiased", [True, False], ids=["torch_var", "keras_var"])
def test_momentum_none_is_the_plain_average_of_every_step(renorm, unbiased, rng):
    """momentum=None: after t steps the running mean is the arithmetic mean of the t batch means (and, with renorm,
    moving_stddev that of the t values sqrt(target + eps), running_var following it); the initial values are gone.
    The average is computed here directly, not by the 1/t recursion; renorm's own statistics keep renorm_momentum."""
    layer = normkit.BatchNorm(3, momentum=None, eps=1e-3, axis=-1, renorm=renorm, renorm_momentum=0.25,
                              renorm_clipping={"rmax": 1.3, "rmin": 0.8, "dmax": 0.4} if renorm else None,
                              virtual_batch_size=2, unbiased_running_var=unbiased).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64))
    state = {name: getattr(layer, name).numpy().copy() for name in BUFFERS if getattr(layer, name, None) is not None}
    batches = []
    for t in range(4):
        x = rng.normal(size=(6, 2, 3)) * [1.0, 4.0, 0.3] + [0.0, -2.0, 5.0]
        expected, batch = naive_step(x, state, axis=-1, virtual_batch_size=2, weight=[1.5, -0.5, 2.0],
                                     bias=[0.1, 0.2, -0.3], eps=1e-3, momentum=1.0 / (t + 1), unbiased=unbiased,
                                     clipping=(0.8, 1.3, 0.4) if renorm else None, renorm_momentum=0.25)
        batches.append(batch)
        with torch.no_grad():
            y = layer(torch.tensor(x))
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10, atol=1e-10)
        stacked = np.array(batches)  # (steps, features, (mean, var, target))
        np.testing.assert_allclose(layer.running_mean.numpy(), stacked[:, :, 0].mean(0), rtol=1e-10)
        if renorm:
            moving_stddev = np.sqrt(stacked[:, :, 2] + 1e-3).mean(0)
            np.testing.assert_allclose(layer.moving_stddev.numpy(), moving_stddev, rtol=1e-10)
            np.testing.assert_allclose(layer.running_var.numpy(), np.maximum(moving_stddev ** 2 - 1e-3, 0), rtol=1e-10)
        else:
            np.testing.assert_allclose(layer.running_var.numpy(), stacked[:, :, 2].mean(0), rtol=1e-10)
        for name, value in state.items():
            np.testing.assert_allclose(getattr(layer, name).numpy(), value, rtol=1e-10, err_msg=name)


def test_clipping_schedule_is_read_at_the_number_of_steps_before_this_one(rng):
    """A schedule's bounds at step t (0 for the first training step), through normkit.BatchNorm, against the loops
    given those numbers; the paper's schedule against its formula."""
    schedule = {"rmax": lambda t: 1.0 + 0.1 * t, "rmin": lambda t: 1.0 / (1.0 + 0.1 * t), "dmax": lambda t: 0.2 * t}
    layer = normkit.BatchNorm(2, momentum=0.2, eps=1e-3, renorm=True, renorm_momentum=0.3,
                              renorm_clipping=schedule).double()
    state = {name: getattr(layer, name).numpy().copy() for name in BUFFERS}
    for t in range(4):
        x = rng.normal(size=(5, 2)) * [3.0, 0.2] + [1.0, -1.0]
        bounds = (schedule["rmin"](t), schedule["rmax"](t), schedule["dmax"](t))
        expected, _ = naive_step(x, state, eps=1e-3, momentum=0.2, clipping=bounds, renorm_momentum=0.3)
        with torch.no_grad():
            y = layer(torch.tensor(x))
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10, atol=1e-10)
        for name, value in state.items():
            np.testing.assert_allclose(getattr(layer, name).numpy(), value, rtol=1e-10, err_msg=name)
    # Ioffe (2017), section 4, at scale 0.01: BN until step 50, dmax 0 -> 5 by 250, rmax 1 -> 3 by 400, rmin 1/rmax
    paper = RenormClipping.paper_schedule(0.01)
    for step in (0, 50, 100, 150, 250, 300, 400, 1000):
        rmax = 1.0 + 2.0 * min(max((step - 50) / 350, 0.0), 1.0)
        dmax = 5.0 * min(max((step - 50) / 200, 0.0), 1.0)
        np.testing.assert_allclose(paper.at(step), (1.0 / rmax, rmax, dmax), rtol=1e-12)


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("options", [
    dict(),
    dict(renorm=True, renorm_momentum=0.8, renorm_clipping={"rmax": 1.2, "rmin": 0.9, "dmax": 0.3}),
    dict(virtual_batch_size=2, masked=True),
    dict(renorm=True, renorm_momentum=0.7, virtual_batch_size=3, ghost_layout="contiguous", adjusted=True, masked=True),
], ids=["plain", "renorm", "ghost_mask", "everything"])
def test_keras_layer_converts_decays_and_keeps_the_biased_variance(options, axis, rng):
    """normkit.keras.BatchNormalization with Keras' decays (momentum 0.9: the OLD value's weight), biased moving
    variance and the (N, T) mask expanded at the LAST axis whatever ``axis`` (with axis=1 it varies along the
    features), against the loops with momentum 1 - decay."""
    options = dict(options)
    masked, adjusted = options.pop("masked", False), options.pop("adjusted", False)
    shape = (6, 4, 3)
    c = shape[axis]
    pshape = tuple(c if i == axis % 3 else 1 for i in range(3))
    scale, shift = rng.uniform(0.5, 1.5, pshape), rng.uniform(-0.2, 0.2, pshape)
    layer = KerasBatchNormalization(axis=axis, momentum=0.9, epsilon=1e-2, dtype="float64",
                                    adjustment=(lambda s: (torch.tensor(scale), torch.tensor(shift))) if adjusted
                                    else None, **options)
    layer.build(shape)
    weights = [rng.uniform(0.5, 2, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(0.5, 2, c)]
    renorm = options.get("renorm", False)
    if renorm:
        weights += [rng.uniform(0.5, 2, c), rng.normal(size=c), rng.uniform(0.5, 2, c)]
    layer.set_weights(weights)
    keras_names = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
    ours_names = ("running_mean", "running_var", "moving_stddev", "renorm_mean", "renorm_stddev")
    state = {name: value.copy() for name, value in zip(ours_names, weights[2:])}
    bounds = options.get("renorm_clipping", {})
    clipping = (bounds.get("rmin", 0.0), bounds.get("rmax", math.inf), bounds.get("dmax", math.inf)) if renorm else None
    for _ in range(3):
        x = rng.normal(size=shape) * rng.uniform(0.3, 3.0, pshape) + rng.normal(size=pshape) * 2
        mask = rng.uniform(size=shape[:-1]) < 0.7 if masked else None
        if masked:
            mask[:, 0] = True
        expected, _ = naive_step(x, state, axis=axis, mask=None if mask is None else mask[..., None],
                                 virtual_batch_size=options.get("virtual_batch_size"),
                                 layout=options.get("ghost_layout", "strided"), weight=weights[0], bias=weights[1],
                                 eps=1e-2, momentum=1 - 0.9, unbiased=False, clipping=clipping,
                                 renorm_momentum=1 - options.get("renorm_momentum", 0.99),
                                 adjustment=(scale, shift) if adjusted else None)
        with torch.no_grad():
            y = layer(torch.tensor(x), training=True, mask=None if mask is None else torch.tensor(mask))
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10, atol=1e-10)
        for keras_name, name in zip(keras_names, ours_names):
            if name in state:
                np.testing.assert_allclose(getattr(layer, keras_name).detach().numpy(), state[name], rtol=1e-10,
                                           err_msg=keras_name)


# ----------------------------------------------------------------------------- Keras' published numbers (spec 9)


def test_keras_ops_batch_normalization_numbers():
    """keras ops/nn_test.py: batch_normalization with given mean, variance, offset, scale (eps 1e-7), and without
    offset/scale."""
    x = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mean, var = np.array([0.2, 0.3, 0.4]), np.array([4.0, 16.0, 64.0])
    y = R.normalize(x, mean, var, 1e-7, np.array([10.0, 20.0, 30.0]), np.array([5.0, 10.0, 15.0]))
    np.testing.assert_allclose(y, [[4.5, 9.5, 14.625], [6.0, 11.0, 15.75]], rtol=1e-6)
    np.testing.assert_allclose(R.normalize(x, mean, var, 1e-7), [[-0.05, -0.025, -0.0125], [0.1, 0.05, 0.025]],
                               rtol=1e-6)
    y = R.batch_norm(x, mean.copy(), var.copy(), [10.0, 20.0, 30.0], [5.0, 10.0, 15.0], False, eps=1e-7)
    np.testing.assert_allclose(y, [[4.5, 9.5, 14.625], [6.0, 11.0, 15.75]], rtol=1e-6)


def test_keras_ignore_masked_values_and_masked_broadcast_numbers():
    """test_bachnorm_ignore_masked_values: data [[1,5],[2,5],[m,m],[m,m]] with the padding rows masked, Keras
    momentum 0 -> moving_mean [1.5, 5.0], moving_variance [0.25, 0.0]; test_masked_broadcast_normalization: ones
    (1, 2, 3, 4) with mask ones (1, 2, 1) (Keras' expansion at the last axis), momentum 0 -> y 0, moving stats 1, 0."""
    for pad in (0.0, 0.1, 1.0):
        x = np.array([[1.0, 5.0], [2.0, 5.0], [pad, pad], [pad, pad]] * 10)
        mask = np.array([1, 1, 0, 0] * 10, dtype=bool)[:, None]
        running_mean, running_var = np.zeros(2), np.ones(2)
        R.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, eps=1e-3, axis=-1, mask=mask,
                     unbiased_running_var=False)
        np.testing.assert_allclose(running_mean, [1.5, 5.0], rtol=1e-12)
        np.testing.assert_allclose(running_var, [0.25, 0.0], atol=1e-12)
    running_mean, running_var = np.zeros(4), np.ones(4)
    y = R.batch_norm(np.ones((1, 2, 3, 4)), running_mean, running_var, training=True, momentum=1.0, eps=1e-3,
                     axis=-1, mask=np.ones((1, 2, 1))[..., None], unbiased_running_var=False)
    np.testing.assert_allclose(y, 0.0, atol=1e-6)
    np.testing.assert_allclose([running_mean, running_var], [np.ones(4), np.zeros(4)], atol=1e-12)


def test_keras_moving_average_and_bessel_numbers():
    """tf.keras: ten training calls on a constant 0.5 (momentum 0.99) -> moving_mean ~0.047, moving_variance ~0.9;
    test_bessels_correction (fused: unbiased): x = [0, 2], momentum 0.5, variance initialized 0 -> exactly 1.0."""
    running_mean, running_var = np.zeros(1), np.ones(1)
    for _ in range(10):
        R.batch_norm(np.full((4, 1), 0.5), running_mean, running_var, training=True, momentum=1 - 0.99, eps=1e-3,
                     unbiased_running_var=False)
    np.testing.assert_allclose(running_mean, [0.047], atol=3e-3)
    np.testing.assert_allclose(running_var, [0.9], atol=3e-2)
    for shape in ((2, 1, 1, 1), (2, 1, 1, 1, 1)):
        running_mean, running_var = np.zeros(1), np.zeros(1)
        R.batch_norm(np.array([0.0, 2.0]).reshape(shape), running_mean, running_var, training=True, momentum=0.5)
        assert running_var[0] == 1.0


def test_keras_renorm_without_clipping_and_equal_momenta_trains_as_it_infers(rng):
    """legacy normalization_test testRenormNoClippingSameMomentumGivesSameTestTrain: with momentum = renorm_momentum
    (0.9 in Keras' decay), no clipping and Keras' biased variance, the training output equals the inference output
    computed with the statistics before the step (atol 1.5 eps at step 0, where moving_variance 1 and moving_stddev
    1 are not yet sqrt-related; 1e-5 afterwards)."""
    eps = 1e-3
    running_mean, running_var = np.zeros(3), np.ones(3)
    moving_stddev, renorm_mean, renorm_stddev = np.ones(3), np.zeros(3), np.ones(3)
    gamma, beta = np.array([2.0, 2.0, 2.0]), np.array([3.0, 3.0, 3.0])
    for step in range(5):
        x = rng.uniform(size=(4, 3))
        test = R.batch_norm(x, running_mean.copy(), running_var.copy(), gamma, beta, False, eps=eps)
        train = R.batch_norm(x, running_mean, running_var, gamma, beta, True, 0.1, eps, renorm_mean=renorm_mean,
                             renorm_stddev=renorm_stddev, moving_stddev=moving_stddev, renorm_momentum=0.1,
                             unbiased_running_var=False)
        np.testing.assert_allclose(train, test, atol=1.5 * eps if step == 0 else 1e-5)
