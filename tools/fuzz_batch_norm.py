"""Differential fuzzer of BatchNorm's option COMBINATIONS (the tests check options one or two at a time): local, not CI.

Each example draws a random combination (rank, axis, dtype, affine, tracking, momentum, running variance rule, renorm
with fixed or scheduled clipping, ghost batches, masks (padding, per feature, broadcast over the rows, 0/1 integers
of the input's rank) with NaN/inf padding, adjustment, eps, freeze, an empty batch now and then, several training
steps then eval, data far from zero) and compares the layer's outputs, gradients and every buffer after each step
with normkit.reference in float64. Families (``--family``):

  module   normkit.BatchNorm against the reference (float64 exact; float32/bfloat16/float16 loose)
  fused    the same with the fused C++ kernel switched on (NORMKIT_FUSED_KERNELS=1 builds it), and on vs off
  keras    normkit.keras.BatchNormalization against the reference with Keras' semantics (decay, biased variance)
  torchnn  plain BN (axis 1, any rank) against torch.nn.BatchNorm1d/2d/3d
  sample   LayerNorm, GroupNorm, InstanceNorm1d/2d/3d and the lazy instance norms against torch.nn's layer built with
           the same arguments and state_dict (outputs, input/weight/bias gradients, buffers) and the reference
  sample_invalid  bad constructor arguments, settings and calls of those layers: ValueError/TypeError naming the
           argument wherever torch.nn refuses too (or normkit alone, deliberately stricter)
  layouts  every layer (BatchNorm with any axis and options, BatchNorm1d/2d/3d, the Keras layer, LayerNorm, GroupNorm,
           InstanceNorm1d/2d/3d) in train, eval or frozen, on shapes with size-1 dims, with independently drawn memory
           layouts for the input and the loss gradient (contiguous, channels_last, either with odd size-1 strides, a
           permutation's, a non-dense slice; expanded stride-0 gradients), inputs that need a gradient or not:
           output, gradients and buffers against the same layer on contiguous copies, the fused kernels on or off
           (float64 1e-10, float32 2e-4 of the largest), and float64 against the reference (all but renorm)
  invalid  random invalid options (constructor, set later, forward; the Keras layer; functional.batch_norm and its
           reference): ValueError/TypeError naming the argument, the layer's state and the buffers unchanged
  compile  the module family's combinations (small shapes; also synchronized without a process group) under
           torch.compile(dynamic=False; dynamic=True in one example of five, the batch size changing between steps),
           inductor mostly, aot_eager sometimes, fullgraph=True mostly (one graph
           checked either way, but for clipping schedules without fullgraph: docs/decisions.md), against a deep copy
           run eagerly and against the reference, step by step (outputs, input/weight/bias gradients, every buffer
           and the count); options set on both built layers between steps (momentum, eps, the variance rule, ghost
           batches, an adjustment, renorm on/off and its settings, synchronized, parameters frozen by requires_grad)
           and sometimes set back; inputs without gradient, eval under no_grad. float64/float32 by default, half
           precision with --dtypes. Compiled code is shared across examples (Dynamo's cache, reset when the backend
           changes and every 100 examples): about 1 s an example. Left out: NaN/inf padding with an adjustment or
           synchronized layers (the known open item in docs/decisions.md, "Masks")

Options: --big (2^14 to 2^17 values: the folded, by-position and wide-moment paths), --dtypes, --replay "CASE"
(the dict a failure prints, run alone).

Not derandomized: every run draws new examples. Run in chunks, niced (the machine is shared):

    PYTHONPATH=src nice -n 19 python tools/fuzz_batch_norm.py --family module --examples 500

Tolerances: float64 rtol 1e-7 and atol 1e-7 times the compared array's largest magnitude (two float64 algorithms on
data at 1e4 with spread 1e-2); float32 2e-4 of the largest magnitude; float16 and bfloat16 inputs are compared with
the reference run on the same rounded inputs, 2e-2 (float16) and 5e-2 (bfloat16) of the largest magnitude, their
output being rounded once to 11 or 8 bits. Below float64, plus float32's rounding of the terms that cancel
(``conditioning``: |x| / std, n values per channel), which the math, not a path, makes large.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
import warnings

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import normkit
from normkit import reference as R
from normkit.stats import RenormClipping

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REL = {torch.float64: 1e-7, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def to_np(t):
    return None if t is None else t.detach().to(torch.float64).cpu().numpy().copy()


def close(name, got, want, dtype, extra=0.0):
    got = to_np(got) if isinstance(got, torch.Tensor) else (None if got is None else np.asarray(got, np.float64))
    if want is None or got is None:
        assert (got is None) == (want is None), f"{name}: {got} vs {want}"
        return
    want = np.asarray(want, np.float64).reshape(got.shape) if np.size(want) == got.size else np.asarray(want)
    finite = want[np.isfinite(want)]
    scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    rel = REL[dtype]
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * scale + extra, equal_nan=True, err_msg=name)


U32 = 2.0 ** -24  # float32's unit roundoff: every path below float64 computes in float32


def conditioning(x, g, full, case, training, batch_stats, running_var):
    """(amp, n, inv): the largest |x| / sqrt(var + eps) over the batch (the size of the terms that cancel in
    x * invstd - mean * invstd, ATen's folded form), the largest count per statistics group, and the largest
    1 / sqrt(var + eps). float32 arithmetic loses about U32 of those terms: an output of 0 at data -50 with a single
    valid value (var 0, eps 1e-5) comes out 3e-4, and two values per channel give an input gradient that is
    eps / var times its terms (1e-3 relative in float32). Those are the math's conditioning, not a path's error."""
    axes = tuple(sorted(a % x.ndim for a in case["axes"]))
    finite = np.abs(np.where(np.isfinite(x), x, 0.0))
    if batch_stats:
        virtual = case["virtual"] if training else None
        view, mask_view, reduce_axes, _ = R.batch_statistics_view(np.where(np.isfinite(x), x, 0.0), axes, full,
                                                                  virtual, case["layout"])
        count, _, var = R.moments(view, reduce_axes, mask_view)
        n = float(count.max(initial=0))  # (initial: an empty batch has no values, ghost batches not even a count)
    else:
        var = np.asarray(running_var)
        n = x.size / math.prod(x.shape[a] for a in axes)  # (gamma's gradient still sums every position)
    inv = float((1.0 / np.sqrt(np.asarray(var) + case["eps"])).max(initial=0.0))
    return float(finite.max(initial=0.0)) * inv, max(n, 1.0), inv


class Adjustment:
    """A deterministic adjustment: (scale, bias) varying along the feature axes, as NumPy arrays."""

    def __init__(self, feature_axes, seed):
        self.feature_axes, self.seed = feature_axes, seed

    def __call__(self, shape):
        rng = np.random.default_rng(self.seed)
        pshape = tuple(s if i in self.feature_axes else 1 for i, s in enumerate(shape))
        return 1 + 0.5 * rng.uniform(-1, 1, size=pshape), 0.3 * rng.normal(size=pshape)

    def __repr__(self):
        return f"Adjustment({self.feature_axes}, {self.seed})"


class TorchAdjustment:
    """An adjustment computed by torch ops (Dynamo cannot trace NumPy's generator): (scale, bias) varying along the
    feature axes as float64 tensors; ``numpy()`` is the same function for the reference."""

    def __init__(self, feature_axes, seed):
        self.feature_axes, self.seed = feature_axes, seed

    def _terms(self, shape, lib):
        pshape = tuple(s if i in self.feature_axes else 1 for i, s in enumerate(shape))
        idx = lib.arange(math.prod(pshape), dtype=lib.float64).reshape(pshape) * 1.7 + self.seed
        return 1 + 0.5 * lib.sin(idx), 0.3 * lib.cos(idx * 0.9)

    def __call__(self, shape):
        return self._terms(shape, torch)

    def numpy(self):
        return lambda shape: self._terms(shape, np)

    def __repr__(self):
        return f"TorchAdjustment({self.feature_axes}, {self.seed})"


class Ramp:
    def __init__(self, start, slope):
        self.start, self.slope = start, slope

    def __call__(self, step):
        return self.start + self.slope * step

    def __repr__(self):
        return f"Ramp({self.start}, {self.slope})"


def draw_clipping(draw, callables=True):
    """None (renorm's default clipping) or a renorm_clipping dict: each bound absent, a number or, with
    ``callables``, a schedule of the step (``Ramp``)."""
    if not draw(st.booleans()):
        return None
    clipping = {}
    for key, lo, hi in (("rmax", 1.0, 3.0), ("rmin", 0.2, 1.0), ("dmax", 0.0, 3.0)):
        kind = draw(st.sampled_from(["absent", "number"] + (["callable"] if callables else [])))
        if kind == "number":
            clipping[key] = draw(st.sampled_from([lo, hi, (lo + hi) / 2]))
        elif kind == "callable":
            clipping[key] = (Ramp(1.0, draw(st.sampled_from([0.5, 1.0]))) if key == "rmax" else
                             Ramp(1.0, -0.1) if key == "rmin" else Ramp(0.0, draw(st.sampled_from([0.5, 1.0]))))
    return clipping


@st.composite
def cases(draw, dtypes=("float64", "float32", "bfloat16", "float16"), keras=False, big=None):
    rank = draw(st.integers(2, 5))
    rest = [draw(st.integers(1, 3)) for _ in range(rank - 1)]
    two = rank >= 3 and draw(st.booleans()) and not keras
    axes = sorted(draw(st.lists(st.integers(1, rank - 1), min_size=2 if two else 1, max_size=2 if two else 1,
                                unique=True)))
    signed = tuple(a - rank if draw(st.booleans()) else a for a in axes)
    axis = signed[0] if len(signed) == 1 else signed
    virtual = None
    layout = draw(st.sampled_from(["strided", "contiguous"]))
    per_row = math.prod(s for i, s in enumerate(rest, 1) if i not in axes)
    big = draw(st.integers(0, 5)) == 0 if big is None else big  # (the paths for 2^14 values or more: folded, by position, wide moments)
    if big:
        # features kept few, the other axes long: 2^14 to 2^16 values, 32 rows or more
        rest = [s if i in axes else draw(st.sampled_from([8, 16, 64])) for i, s in enumerate(rest, 1)]
        per_row = math.prod(s for i, s in enumerate(rest, 1) if i not in axes)
    if draw(st.booleans()):
        virtual = draw(st.sampled_from([1, 2, 3] if not big else [8, 16, 32]))
        groups = draw(st.integers(2, 3))
        batch = virtual * groups
        if virtual * per_row < 2:
            virtual = None
    else:
        batch = draw(st.integers(2, 6)) if not big else draw(st.sampled_from([32, 48, 64]))
    if big:
        # (the floor too: rank 2, or one short non-feature axis, gave 32 to 4,096 values, under the folded and
        # wide-moment paths' 2^14 and 2^15, in four examples of five; a non-feature axis, else the batch (a multiple
        # of the ghost size still), doubles until there are 2^14)
        long = [i for i in range(len(rest)) if i + 1 not in axes]
        grow = draw(st.sampled_from(long)) if long else None
        while batch * math.prod(rest) < 1 << 14:
            if grow is None:
                batch *= 2
            else:
                rest[grow] *= 2
        while batch * math.prod(rest) > 1 << 17 and max(rest) > 1:
            rest[rest.index(max(rest))] //= 2
        per_row = math.prod(s for i, s in enumerate(rest, 1) if i not in axes)
        if virtual is not None and virtual * per_row < 2:
            virtual = None
    if not big and draw(st.integers(0, 9)) == 0:
        batch = 0  # (an empty batch, ghost batches or not: an empty output, the buffers kept, the step counted)
    shape = (batch, *rest)
    track = draw(st.booleans())
    renorm = track and draw(st.booleans())
    clipping = draw_clipping(draw) if renorm else None
    # (broadcast and full_rank too, the mask forms only the distributed fuzzer drew: one row of mask for every row, and
    # 0/1 integers of the input's rank; the keras family takes none of them, its mask being Keras')
    mask_kind = draw(st.sampled_from(["none", "none", "padding", "per_feature", "rows_off", "all_off", "broadcast",
                                      "full_rank"]))
    dtype = draw(st.sampled_from(dtypes))
    policy = draw(st.sampled_from([None, None, "mixed_float16", "mixed_bfloat16"])) if keras and dtype == "float32" \
        else None
    # (a mixed policy computes in half precision: its data is drawn as half precision's, since data at 1e4 rounded to
    # float16's spacing of 8 has a variance of 0 or of the rounding, and outputs past float16's 65504, inf)
    wide = dtype in ("float64", "float32") and policy is None
    offset = draw(st.sampled_from([0.0, 3.0, -50.0, 1e4] if wide else [0.0, 3.0, -5.0]))
    spread = draw(st.sampled_from([1.0, 5.0, 1e-2] if wide else [1.0, 5.0]))
    if offset == 1e4 and dtype == "float32":
        spread = max(spread, 1.0)  # (float32 holds 1e4 to 1e-3: the input's own rounding at 1e-2 spread)
    return dict(
        shape=shape, axis=axis, axes=tuple(axes), virtual=virtual, layout=layout, track=track, renorm=renorm,
        clipping=clipping, renorm_momentum=draw(st.sampled_from([0.01, 0.5, 1.0])),
        affine=draw(st.booleans()), momentum=draw(st.sampled_from([0.1, 0.9, None] if not keras else [0.1, 0.9, 0.0])),
        unbiased=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        adjustment=Adjustment(tuple(axes), draw(st.integers(0, 99))) if draw(st.integers(0, 3)) == 0 else None,
        mask_kind=mask_kind, pad_value=draw(st.sampled_from([0.0, 7.0, math.nan, math.inf, -math.inf])),
        dtype=dtype, offset=offset, spread=spread, steps=draw(st.integers(1, 3)),
        freeze_at=draw(st.sampled_from([None, None, 0, 1, 2])), seed=draw(st.integers(0, 2 ** 31 - 1)),
        weight_init=draw(st.booleans()), late=draw(st.booleans()),
        memory=draw(st.sampled_from(["contiguous", "contiguous", "transposed", "channels_last", "sliced"])),
        modes=draw(st.lists(st.booleans(), min_size=1, max_size=4)) + [False],  # (train/eval interleaved, eval last)
        policy=policy,
    )


def laid_out(t, memory):
    """The same values in another memory layout (strides), as data from permutes, channels_last models and slices."""
    if memory == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if memory == "channels_last" and t.dim() in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if memory == "sliced":
        return torch.cat([t, t], dim=-1)[..., : t.shape[-1]]
    return t


def padded(x_np, g_np, full, value):
    """The data with ``value`` (0, NaN or +-inf) at the positions ``full`` marks padded, and a loss gradient of 0
    there (the loss ignores padding: the padding rule's condition)."""
    invalid = ~np.broadcast_to(full, x_np.shape)
    return np.where(invalid, value, x_np), np.where(invalid, 0.0, g_np)


def step_data(case, rng, shape, dtype):
    """One step's input and loss gradient with the case's mask: (x, x as a tensor, g, g as a tensor, the full mask,
    the layer's mask), the NumPy arrays rounded to ``dtype`` as the layer sees them (the reference takes those).
    Out of training with running statistics the mask names no statistic, but the padding rule holds: NaN/inf
    padding the loss ignores changes no gradient."""
    x_np = rng.normal(size=shape) * case["spread"] + case["offset"]
    x_t = torch.tensor(x_np).to(dtype)
    x_np = to_np(x_t)
    g_np = rng.normal(size=shape)
    full, layer_mask = make_mask(case, rng)
    if full is not None:
        x_np, g_np = padded(x_np, g_np, full, case["pad_value"])
        x_t = torch.tensor(x_np).to(dtype)
    g_t = torch.tensor(g_np).to(dtype)
    return x_np, x_t, to_np(g_t), g_t, full, layer_mask


def make_mask(case, rng):
    """(full-rank mask for the reference, the layer's mask) or (None, None)."""
    return drawn_mask(case["mask_kind"], case["shape"], case["axes"], rng)


def drawn_mask(kind, shape, axes, rng):
    """(full-rank boolean mask for the reference, the layer's mask) of one kind, or (None, None): "none", "padding"
    (over the non-feature axes), "per_feature" (full rank), "rows_off" (the first row padded), "all_off",
    "broadcast" (one row of mask for every row), "full_rank" (the input's rank, size 1 on the feature axes, 0/1
    integers)."""
    if kind == "none":
        return None, None
    reduced = tuple(1 if i in axes else s for i, s in enumerate(shape))
    if kind == "per_feature":
        full = rng.uniform(size=shape) < 0.6
        return full, full
    if kind == "broadcast":
        m = rng.uniform(size=(1,) + reduced[1:]) < 0.6
        return np.broadcast_to(m, reduced), m.reshape(tuple(s for i, s in enumerate(m.shape) if i not in axes))
    m = rng.uniform(size=reduced) < 0.6
    if kind == "rows_off" and shape[0]:
        m[0] = False
    elif kind == "all_off":
        m[...] = False
    if kind == "full_rank":
        return m, m.astype(np.int64)
    return m, m.reshape(tuple(s for i, s in enumerate(shape) if i not in axes))


def build_layer(case, features):
    kwargs = dict(momentum=case["momentum"], eps=case["eps"], affine=case["affine"],
                  track_running_stats=case["track"], axis=case["axis"], unbiased_running_var=case["unbiased"],
                  virtual_batch_size=case["virtual"], ghost_layout=case["layout"], adjustment=case["adjustment"])
    if case["renorm"]:
        kwargs.update(renorm=True, renorm_clipping=case["clipping"], renorm_momentum=case["renorm_momentum"])
    if case.get("late"):
        # every option set on a built layer (docs/decisions.md: it computes what the constructed one computes)
        layer = normkit.BatchNorm(features, axis=case["axis"], affine=case["affine"],
                                  track_running_stats=case["track"])
        for name, value in kwargs.items():
            if name not in ("affine", "track_running_stats", "axis"):
                setattr(layer, name, value)
    else:
        layer = normkit.BatchNorm(features, **kwargs)
    if case["dtype"] == "float64":
        layer = layer.double()
    return layer


BUFFERS = ("running_mean", "running_var", "renorm_mean", "renorm_stddev", "moving_stddev")


def seeded_layer(case):
    """(the case's random generator, shape, dtype, and its layer with the drawn weights) for a module-family case."""
    rng = np.random.default_rng(case["seed"])
    feats = tuple(case["shape"][a] for a in case["axes"])
    layer = build_layer(case, feats[0] if len(feats) == 1 else feats)
    if case["weight_init"] and case["affine"]:
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(1 + 0.5 * rng.normal(size=feats)))
            layer.bias.copy_(torch.as_tensor(rng.normal(size=feats)))
    return rng, case["shape"], DTYPES[case["dtype"]], layer


def run_module_case(case, fused=False, check=True):
    """Steps of normkit.BatchNorm against the reference; returns every step's results (for fused on vs off)."""
    from normkit import kernels

    rng, shape, dtype, layer = seeded_layer(case)
    state = {name: to_np(getattr(layer, name, None)) for name in BUFFERS}
    count = 0
    results = []
    step_modes = case.get("modes") or [True] * case["steps"] + [False]
    with kernels.switched(fused):
        for step, train in enumerate(step_modes):
            if case["freeze_at"] is not None and step == case["freeze_at"]:
                layer.freeze()
            layer.train(train)
            x_np, x_t, g_np, g_t, full, layer_mask = step_data(case, rng, shape, dtype)
            training = train and not layer.frozen
            batch_stats = training or not case["track"]
            w = to_np(layer.weight)
            b = to_np(layer.bias)
            # reference
            if training and case["track"]:
                count += 1
            expected, grads, rv = reference_step(case, state, count, training, batch_stats, x_np, g_np, full, w, b)
            # layer
            leaf = laid_out(x_t.clone(), case.get("memory")).requires_grad_()
            y = layer(leaf) if layer_mask is None else layer(leaf, mask=torch.as_tensor(layer_mask))
            params = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
            got = torch.autograd.grad(y, [leaf, *params], laid_out(g_t, case.get("memory")), allow_unused=True)
            got_w = got[1] if layer.weight is not None and layer.weight.requires_grad else None
            got_b = got[-1] if layer.bias is not None and layer.bias.requires_grad else None
            results.append([y, got[0], got_w, got_b, *[getattr(layer, n, None) for n in BUFFERS]])
            results[-1] = [None if t is None else t.detach().clone() for t in results[-1]]
            if check:
                where = f"step {step} ({'train' if train else 'eval'}{', frozen' if layer.frozen else ''})"
                assert y.dtype == dtype, f"{where}: output dtype {y.dtype}"
                e_y, e_g, e_w, e_s = extras(x_np, g_np, full, case, training, batch_stats, rv, w, dtype)
                close(f"{where} output", y, expected, dtype, e_y)
                close(f"{where} input grad", got[0], grads[0], dtype, e_g)
                if got_w is not None:
                    close(f"{where} weight grad", got_w, grads[1], dtype, e_w)
                if got_b is not None:
                    close(f"{where} bias grad", got_b, grads[2], dtype)
                for name in BUFFERS:
                    if state[name] is not None:
                        extra = e_s * float(np.abs(state[name]).max()) if state[name].size else 0.0
                        close(f"{where} {name}", getattr(layer, name), state[name], dtype, extra)
                if case["track"]:
                    assert int(layer.num_batches_tracked) == count, f"{where}: count {int(layer.num_batches_tracked)}"
    return results


def reference_step(case, state, count, training, batch_stats, x_np, g_np, full, w, b):
    """(output, (input grad, weight grad, bias grad), running variance before the step) of normkit.reference for one
    call of the module family's layer (``count``: training steps so far, this one included); moves ``state``."""
    factor = 0.0
    if training and case["track"]:
        factor = case["momentum"] if case["momentum"] is not None else 1.0 / count
    renorm = case["renorm"] and training
    clip = (0.0, math.inf, math.inf)
    if renorm:
        clip = RenormClipping.from_dict(case["clipping"]).at(count - 1)
    rm = state["running_mean"] if (not training or case["track"]) else None
    rv = state["running_var"] if rm is not None else None
    kwargs = dict(axis=case["axis"], mask=full if batch_stats else None,
                  virtual_batch_size=case["virtual"] if training else None, ghost_layout=case["layout"],
                  renorm_mean=state["renorm_mean"] if renorm else None,
                  renorm_stddev=state["renorm_stddev"] if renorm else None,
                  renorm_clipping=clip, adjustment=None)
    if training and case["adjustment"] is not None:
        adjustment = case["adjustment"]
        kwargs["adjustment"] = adjustment.numpy() if isinstance(adjustment, TorchAdjustment) else adjustment
    grads = R.batch_norm_backward(g_np, x_np, None if rm is None else rm.copy(),
                                  None if rv is None else rv.copy(), w, b, batch_stats, case["eps"], **kwargs)
    expected = R.batch_norm(x_np, rm, rv, w, b, batch_stats, factor, case["eps"],
                            unbiased_running_var=case["unbiased"],
                            moving_stddev=state["moving_stddev"] if renorm else None,
                            renorm_momentum=case["renorm_momentum"], **kwargs)
    return expected, grads, rv


def extras(x_np, g_np, full, case, training, batch_stats, rv, w, dtype):
    """Absolute tolerances added below float64 (output, input gradient, weight gradient, buffers per unit): see
    ``conditioning``."""
    if dtype == torch.float64:
        return 0.0, 0.0, 0.0, 0.0
    amp, n, inv = conditioning(x_np, g_np, full, case, training, batch_stats, rv)
    wmax = 1.0 if w is None else max(1.0, float(np.abs(w).max()))
    gmax = float(np.abs(g_np).max(initial=0.0))
    # (gamma's gradient: a float32 sum of n terms, each off by ~U32 * amp; rounding errors that add as a random walk,
    # sqrt(n): 0.116 in 78.4 for 65,536 values per channel at mean 3, std 1e-2, where n times would allow 150)
    return (32 * U32 * amp * wmax, 32 * U32 * n * gmax * wmax * inv * max(1.0, amp),
            32 * U32 * min(n, 8 * math.sqrt(n)) * gmax * max(1.0, amp), 32 * U32 * n)


# ----------------------------------------------------------------------------- torch.compile


@st.composite
def compile_cases(draw, dtypes=("float64", "float32")):
    """A module-family combination (small: every new shape, stride or option compiles again) with a backend, a
    whole-graph flag and options changed on the built layer before some step (they must recompile or guard)."""
    case = draw(cases(dtypes, big=False))
    if case["adjustment"] is not None:
        case["adjustment"] = TorchAdjustment(case["adjustment"].feature_axes, case["adjustment"].seed)
    case["shape"] = tuple(min(s, 4) for s in case["shape"])  # (cases draws sizes up to 6 already; kept small)
    if case["virtual"] is not None and case["shape"][0] % case["virtual"]:
        case["virtual"] = None
    # docs/decisions.md ("torch.compile"): every BatchNorm option traces as one graph (not synchronized with a
    # process group, not drawn here)
    # synchronized without a process group: local statistics, on the autograd composite path (traces whole)
    case["synchronized"] = draw(st.integers(0, 4)) == 0
    case["backend"] = draw(st.sampled_from(["inductor", "inductor", "aot_eager"]))
    case["fullgraph"] = draw(st.sampled_from([True, True, True, False]))
    if ((case["adjustment"] is not None or case["synchronized"]) and case["mask_kind"] != "none"
            and not math.isfinite(case["pad_value"])):
        # Known open item (docs/decisions.md, padding): NaN/inf padding on the adjustment's autograd composite path
        # under torch.compile reaches its channel's gradients (no hook, no data-dependent step in a graph).
        case["pad_value"] = draw(st.sampled_from([0.0, 7.0]))
    changes = {}
    steps = len(case["modes"])
    if draw(st.booleans()) and steps > 1:
        at = draw(st.integers(1, steps - 1))
        batch = case["shape"][0]
        per_row = math.prod(s for i, s in enumerate(case["shape"]) if i and i not in case["axes"])
        options = ["momentum", "eps", "unbiased", "layout", "virtual", "adjustment", "synchronized"]
        if case["renorm"]:
            options += ["renorm_momentum", "clipping"]
        if case["track"]:
            options += ["renorm"]
        if case["affine"]:
            options += ["params_grad"]  # (parameters frozen by requires_grad_(False): a guard)
        change = {}
        for name in draw(st.lists(st.sampled_from(options), min_size=1, max_size=3, unique=True)):
            if name == "momentum":
                change[name] = draw(st.sampled_from([0.1, 0.9, None]))
            elif name == "eps":
                change[name] = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
            elif name == "unbiased":
                change[name] = not case["unbiased"]
            elif name == "layout":
                change[name] = "contiguous" if case["layout"] == "strided" else "strided"
            elif name == "virtual":
                sizes = [v for v in range(1, batch) if batch % v == 0 and v * per_row >= 2]
                change[name] = draw(st.sampled_from([None, *sizes]))
            elif name == "adjustment":
                change[name] = (None if case["adjustment"] is not None else
                                TorchAdjustment(tuple(case["axes"]), draw(st.integers(0, 99))))
                if change[name] is not None and case["mask_kind"] != "none" and not math.isfinite(case["pad_value"]):
                    change[name] = None  # (the known open item above)
            elif name == "synchronized":
                change[name] = not case["synchronized"]
                if change[name] and case["mask_kind"] != "none" and not math.isfinite(case["pad_value"]):
                    change[name] = False  # (the known open item above)
            elif name == "params_grad":
                change[name] = False
            elif name == "renorm_momentum":
                change[name] = draw(st.sampled_from([0.01, 0.5, 1.0]))
            elif name == "clipping":
                change[name] = draw(st.sampled_from([None, {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5},
                                                     {"rmax": Ramp(1.0, 0.5), "dmax": Ramp(0.0, 1.0)}]))
            elif name == "renorm":
                change[name] = not case["renorm"]
        if change.get("renorm") is False:  # (renorm's settings are refused on a layer without renorm)
            change.pop("clipping", None), change.pop("renorm_momentum", None)
        changes[at] = change
    if len(changes) == 1 and draw(st.booleans()):  # (and back: requires_grad on again, or the first options)
        (at, change), = changes.items()
        if at + 1 < steps:
            changes[at + 1] = {name: (True if name == "params_grad" else case[name]) for name in change}
    case["changes"] = changes
    case["input_grad"] = draw(st.integers(0, 3)) > 0
    # dynamic=True now and then: batch sizes multiples of the drawn one (ghost batches still divide them)
    case["batches"] = ([draw(st.integers(1, 3)) for _ in case["modes"]] if draw(st.integers(0, 4)) == 0 else None)
    case["no_grad_steps"] = [i for i, train in enumerate(case["modes"]) if not train and draw(st.booleans())]
    return case


LAYER_OPTIONS = {"momentum": "momentum", "eps": "eps", "unbiased": "unbiased_running_var", "layout": "ghost_layout",
                 "virtual": "virtual_batch_size", "adjustment": "adjustment", "renorm_momentum": "renorm_momentum",
                 "clipping": "renorm_clipping", "renorm": "renorm", "synchronized": "synchronized"}
_COMPILED = {"backend": None, "examples": 0}


def _call_step(fn, layer, x_t, g_t, layer_mask, memory, input_grad=True, no_grad=False):
    """(output, input grad, weight grad, bias grad) of one call, None for what needs no gradient."""
    leaf = laid_out(x_t.clone(), memory).requires_grad_(input_grad)
    with torch.set_grad_enabled(not no_grad):
        y = fn(leaf) if layer_mask is None else fn(leaf, mask=torch.as_tensor(layer_mask))
    params = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
    inputs = [leaf] * input_grad + params
    if no_grad or not inputs or not y.requires_grad:  # (a frozen layer stops its parameters' gradients)
        return y.detach(), None, None, None
    got = list(torch.autograd.grad(y, inputs, laid_out(g_t, memory), allow_unused=True))
    got_x = got.pop(0) if input_grad else None
    got_w = got.pop(0) if layer.weight is not None and layer.weight.requires_grad else None
    got_b = got.pop(0) if layer.bias is not None and layer.bias.requires_grad else None
    return y.detach(), got_x, got_w, got_b


def run_compile_case(case):
    """The layer under torch.compile (dynamic=False, or True with ``batches``) against a deep copy run eagerly and against normkit.reference,
    step by step (outputs, input/weight/bias gradients, every buffer), options changed on both built layers
    between steps. Compiled code is reused across examples (Dynamo's cache, keyed by guards on the layer's
    options, shapes and strides: a fresh layer with the same configuration hits it); the caches are reset when the
    backend changes (an entry compiled by one backend would serve the other) and every 100 examples."""
    import copy
    import torch._dynamo
    from torch._dynamo.utils import counters

    if _COMPILED["backend"] != case["backend"] or _COMPILED["examples"] >= 100:
        torch._dynamo.reset()
        _COMPILED.update(backend=case["backend"], examples=0)
    _COMPILED["examples"] += 1
    case = dict(case)
    warnings.filterwarnings("ignore", "BatchNorm.synchronized=True. runs without", RuntimeWarning)
    rng, shape, dtype, layer = seeded_layer(case)
    if case.get("synchronized"):
        layer.synchronized = True
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend=case["backend"], fullgraph=case["fullgraph"],
                             dynamic=True if case.get("batches") else False)
    state = {name: to_np(getattr(layer, name, None)) for name in BUFFERS}
    count = 0
    for step, train in enumerate(case["modes"]):
        for name, value in case["changes"].get(step, {}).items():
            case[name] = value
            if name == "params_grad":
                for target in (layer, eager):
                    for p in (target.weight, target.bias):
                        if p is not None:
                            p.requires_grad_(value)
                continue
            for target in (layer, eager):
                setattr(target, LAYER_OPTIONS[name], value)
                if name == "renorm" and value:  # (the drawn renorm settings, which a plain layer has not been given)
                    target.renorm_momentum, target.renorm_clipping = case["renorm_momentum"], case["clipping"]
            if name == "renorm":  # (the renorm state derived from the running statistics: the eager layer's)
                state.update({n: to_np(getattr(eager, n, None)) for n in BUFFERS})
        if case["freeze_at"] is not None and step == case["freeze_at"]:
            layer.freeze()
            eager.freeze()
        layer.train(train)
        eager.train(train)
        if case.get("batches"):  # (dynamic=True: the batch size changes between steps, one graph for all)
            shape = (case["shape"][0] * case["batches"][step], *case["shape"][1:])
            case["shape"] = shape
        x_np, x_t, g_np, g_t, full, layer_mask = step_data(case, rng, shape, dtype)
        training = train and not layer.frozen
        batch_stats = training or not case["track"]
        w, b = to_np(layer.weight), to_np(layer.bias)
        if training and case["track"]:
            count += 1
        expected, grads, rv = reference_step(case, state, count, training, batch_stats, x_np, g_np, full, w, b)
        no_grad = not train and step in case.get("no_grad_steps", ())
        want = _call_step(eager, eager, x_t, g_t, layer_mask, case["memory"], case.get("input_grad", True), no_grad)
        breaks = sum(counters["graph_break"].values())
        got = _call_step(compiled, layer, x_t, g_t, layer_mask, case["memory"], case.get("input_grad", True), no_grad)
        # (fullgraph=False too: one graph, docs/decisions.md; a break that fullgraph=True would refuse is a failure)
        scheduled = case["renorm"] and training and RenormClipping.from_dict(case["clipping"]).scheduled
        if not scheduled:  # (a schedule's step count breaks the graph without fullgraph=True: decisions.md)
            assert sum(counters["graph_break"].values()) == breaks, f"graph break: {dict(counters['graph_break'])}"
        where = f"step {step} ({'train' if train else 'eval'}{', frozen' if layer.frozen else ''})"
        assert got[0].dtype == dtype, f"{where}: output dtype {got[0].dtype}"
        e_y, e_g, e_w, e_s = extras(x_np, g_np, full, case, training, batch_stats, rv, w, dtype)
        for label, ours, eagers, ref, extra in zip(("output", "input grad", "weight grad", "bias grad"), got, want,
                                                   (expected, *grads), (e_y, e_g, e_w, 0.0)):
            if ours is None:
                assert eagers is None, f"{where} {label}: None compiled, not eager"
                continue
            close(f"{where} {label} (compiled vs eager)", ours, to_np(eagers), dtype, 2 * extra)
            close(f"{where} {label} (compiled vs reference)", ours, ref, dtype, extra)
        for name in (*BUFFERS, "num_batches_tracked"):
            ours, eagers = getattr(layer, name, None), getattr(eager, name, None)
            assert (ours is None) == (eagers is None), f"{where} {name}: {ours} vs {eagers}"
            if ours is None:
                continue
            extra = e_s * float(np.abs(to_np(eagers)).max()) if eagers.numel() else 0.0
            close(f"{where} {name} (compiled vs eager)", ours, to_np(eagers), dtype, 2 * extra)
            if name in state and state[name] is not None:
                extra = e_s * float(np.abs(state[name]).max()) if state[name].size else 0.0
                close(f"{where} {name} (compiled vs reference)", ours, state[name], dtype, extra)
        if case["track"]:
            assert int(layer.num_batches_tracked) == count, f"{where}: count {int(layer.num_batches_tracked)}"


# ----------------------------------------------------------------------------- Keras


def run_keras_case(case):
    from normkit.keras import BatchNormalization

    rng = np.random.default_rng(case["seed"])
    shape, axes = case["shape"], case["axes"]
    dtype = DTYPES[case["dtype"]]
    decay = 1.0 - case["momentum"]
    kwargs = dict(axis=case["axis"], momentum=decay, epsilon=case["eps"], center=case["affine"],
                  scale=case["affine"] or case["weight_init"], virtual_batch_size=case["virtual"],
                  ghost_layout=case["layout"], adjustment=case["adjustment"])
    if case["renorm"]:
        kwargs.update(renorm=True, renorm_clipping={k: v for k, v in (case["clipping"] or {}).items()
                                                    if not callable(v)} or None,
                      renorm_momentum=1.0 - case["renorm_momentum"])
    policy = case.get("policy")
    layer = BatchNormalization(**kwargs, dtype="float64" if dtype == torch.float64 else policy)
    compute = {"mixed_float16": torch.float16, "mixed_bfloat16": torch.bfloat16}.get(policy, dtype)
    layer.build(shape)
    bn = layer.bn
    feats = tuple(shape[a] for a in axes)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.as_tensor(1 + 0.5 * rng.normal(size=feats)))
        if bn.bias is not None:
            bn.bias.copy_(torch.as_tensor(rng.normal(size=feats)))
    state = {name: to_np(getattr(bn, name, None)) for name in BUFFERS}
    clip_dict = kwargs.get("renorm_clipping")
    count = 0
    for step, train in enumerate(case.get("modes") or [True] * case["steps"] + [False]):
        if case["freeze_at"] is not None and step == case["freeze_at"]:
            layer.trainable = False
        training = train and layer.trainable
        x_np = rng.normal(size=shape) * case["spread"] + case["offset"]
        x_t = torch.tensor(x_np).to(dtype)
        x_np = to_np(x_t.to(compute))  # (a mixed policy computes on the input rounded to its compute dtype)
        g_np = rng.normal(size=shape)
        full = layer_mask = None
        if case["mask_kind"] in ("padding", "rows_off", "all_off"):  # (in inference too: the padding rule)
            m = rng.uniform(size=shape[:-1]) < 0.6
            if case["mask_kind"] == "rows_off" and shape[0]:
                m[0] = False
            elif case["mask_kind"] == "all_off":
                m[...] = False
            layer_mask = m
            full = m[..., None]
            x_np, g_np = padded(x_np, g_np, full, case["pad_value"])
            x_t = torch.tensor(x_np).to(dtype)
        g_t = torch.tensor(g_np).to(compute)
        g_np = to_np(g_t)
        w, b = to_np(bn.weight), to_np(bn.bias)
        if training:
            count += 1
        factor = case["momentum"] if training else 0.0
        renorm = case["renorm"] and training
        clip = RenormClipping.from_dict(clip_dict).at(count - 1) if renorm else (0.0, math.inf, math.inf)
        kwargs_r = dict(axis=case["axis"], mask=full if training else None, virtual_batch_size=case["virtual"] if training else None,
                        ghost_layout=case["layout"], renorm_mean=state["renorm_mean"] if renorm else None,
                        renorm_stddev=state["renorm_stddev"] if renorm else None, renorm_clipping=clip,
                        adjustment=case["adjustment"] if training else None)
        rm, rv = state["running_mean"], state["running_var"]
        grads = R.batch_norm_backward(g_np, x_np, rm.copy(), rv.copy(), w, b, training, case["eps"], **kwargs_r)
        expected = R.batch_norm(x_np, rm, rv, w, b, training, factor, case["eps"], unbiased_running_var=False,
                                moving_stddev=state["moving_stddev"] if renorm else None,
                                renorm_momentum=case["renorm_momentum"], **kwargs_r)
        leaf = laid_out(x_t.clone(), case.get("memory")).requires_grad_()
        y = layer(leaf, training=train, mask=None if layer_mask is None else torch.as_tensor(layer_mask))
        params = [p for p in (bn.weight, bn.bias) if p is not None and p.requires_grad]
        got = torch.autograd.grad(y, [leaf, *params], laid_out(g_t, case.get("memory")), allow_unused=True)
        where = f"keras step {step} ({'train' if train else 'eval'}, trainable={layer.trainable}, {policy})"
        assert y.dtype == compute, f"{where}: output dtype {y.dtype}"
        e_y, e_g, e_w, e_s = extras(x_np, g_np, full, case, training, training, rv, w, compute)
        close(f"{where} output", y, expected, compute, e_y)
        close(f"{where} input grad", got[0], grads[0], compute, e_g)
        if params and bn.weight is not None and bn.weight.requires_grad:
            close(f"{where} gamma grad", got[1], grads[1], compute, e_w)
        if params and bn.bias is not None and bn.bias.requires_grad:
            close(f"{where} beta grad", got[-1], grads[2], compute)
        for name in BUFFERS:
            if state[name] is not None:
                extra = e_s * float(np.abs(state[name]).max()) if state[name].size else 0.0
                close(f"{where} {name}", getattr(bn, name), state[name], compute, extra)


# ----------------------------------------------------------------------------- torch.nn


def run_torchnn_case(case):
    rng = np.random.default_rng(case["seed"])
    rank = len(case["shape"])
    shape = case["shape"]
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[rank]
    kwargs = dict(momentum=case["momentum"], eps=case["eps"], affine=case["affine"],
                  track_running_stats=case["track"])
    ours = normkit.BatchNorm(shape[1], **kwargs).double()
    theirs = cls(shape[1], **kwargs).double()
    if case["affine"]:
        with torch.no_grad():
            for layer in (ours, theirs):
                layer.weight.copy_(torch.as_tensor(1 + np.arange(shape[1]) * 0.1))
                layer.bias.copy_(torch.as_tensor(np.arange(shape[1]) * 0.2))
    for step, train in enumerate(case.get("modes") or [True] * case["steps"] + [False]):
        x = laid_out(torch.tensor(rng.normal(size=shape) * case["spread"]
                                  + (case["offset"] if case["offset"] < 1e3 else 5.0)), case["memory"])
        g = laid_out(torch.tensor(rng.normal(size=shape)), case["memory"])
        outs = []
        for layer in (ours, theirs):
            layer.train(train)
            leaf = x.clone().requires_grad_()
            y = layer(leaf)
            outs.append([y, *torch.autograd.grad(y, [leaf, *layer.parameters()], g)])
        for i, (a, b) in enumerate(zip(*outs, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"step {step} item {i}")
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-10, atol=1e-10, msg=f"step {step} {name}")


# ----------------------------------------------------------------------------- invalid options

INVALID = {
    "num_features": [0, -1, 2.5, "a", None, (), (3, 0)],
    "eps": [0, -1e-5, math.nan, math.inf, "a", None, torch.tensor(1e-5)],
    "momentum": [-0.1, 1.5, math.nan, "x", [0.1]],
    "axis": [(1, 1), 1.5, "a", (), None, (1, -1, 1)],  # (7 is a rank-8 input's axis: refused by the call)
    "virtual_batch_size": [0, -2, 2.5, "a", True],
    "ghost_layout": ["foo", 3, None],
    "renorm_clipping": [{"rmax": 0.5, "rmin": 1.0}, {"rmin": -1.0}, {"foo": 1}, {"rmax": math.nan}, {"dmax": -1.0}, 3, "a",
                        {"rmax": "a"}],
    "renorm_momentum": [-1, 2, None, "a", math.nan],
    "adjustment": [3, "a"],
    "weight_initializer": ["nope", object()],  # (a number is a constant)
    "weight_regularizer": ["nope", object()],
    "weight_constraint": ["nope", object()],
}


def state_of(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}, {k: repr(v) for k, v in vars(layer).items()
                                                                   if not k.startswith("_")}


def same_state(before, after, where):
    for k, v in before[0].items():
        assert k in after[0] and torch.equal(v, after[0][k]) or (v.is_floating_point() and torch.equal(
            v.isnan(), after[0][k].isnan())), f"{where}: state {k} changed"
    assert before[1] == after[1], f"{where}: attributes changed {set(before[1].items()) ^ set(after[1].items())}"


def named(error, names):
    return any(n in str(error) for n in names)


def assert_refused(call, names, where, may_accept=False):
    """``call()`` raises a ValueError or TypeError whose message names one of ``names`` (never another exception);
    ``may_accept``: where a documented rule lets the call through."""
    try:
        call()
    except (ValueError, TypeError) as error:
        assert named(error, names), f"{where}: {type(error).__name__}: {error}"
    except Exception as error:  # noqa: BLE001
        raise AssertionError(f"{where}: {type(error).__name__}: {error}") from error
    else:
        if not may_accept:
            raise AssertionError(f"{where}: accepted")


def run_invalid_case(data):
    option = data.draw(st.sampled_from(sorted(INVALID)))
    value = data.draw(st.sampled_from(INVALID[option]))
    renorm = option.startswith("renorm") or data.draw(st.booleans())
    base = dict(renorm=True) if renorm else {}
    for extra, choices in (("momentum", [0.1, None]), ("virtual_batch_size", [None, 2]), ("axis", [1, -1]),
                           ("unbiased_running_var", [True, False])):
        if extra != option:
            base[extra] = data.draw(st.sampled_from(choices))
    where = f"{option}={value!r}"
    num = value if option == "num_features" else 3
    kwargs = dict(base)
    if option != "num_features":
        kwargs[option] = value
    assert_refused(lambda: normkit.BatchNorm(num, **kwargs), [option], f"constructor {where}")
    # set on a built layer (trained a step: state to keep)
    if option == "num_features":
        return
    layer = normkit.BatchNorm(3, **base).double()
    layer(torch.randn(4, 3, dtype=torch.float64))
    layer.train(data.draw(st.booleans()))
    before = state_of(layer)
    assert_refused(lambda: setattr(layer, option, value), [option], f"set {where}")
    same_state(before, state_of(layer), f"set {where}")
    layer(torch.randn(4, 3, dtype=torch.float64))  # (still works)


KERAS_INVALID = {
    "axis": [(1, 1), 1.5, "a", 5, -5, ()],
    "momentum": [-0.1, 1.5, math.nan, "x"],
    "epsilon": [0, -1e-3, math.nan, "a"],
    "renorm_momentum": [-1, 2, "a"],
    "renorm_clipping": [{"rmax": 0.5, "rmin": 1.0}, {"foo": 1}, {"dmax": -1.0}, 3],
    "virtual_batch_size": [0, -2, 2.5, "a"],
    "ghost_layout": ["foo", 3],
    "adjustment": [3, "a"],
    "gamma_initializer": ["nope", object()],
    "beta_regularizer": ["nope", object()],
}


def run_invalid_keras(data):
    """Keras-vocabulary options: refused by name at construction and when set on a built layer, which stays as it was;
    a wrong mask or rank in a call leaves it as it was too."""
    from normkit.keras import BatchNormalization

    option = data.draw(st.sampled_from(sorted(KERAS_INVALID)))
    value = data.draw(st.sampled_from(KERAS_INVALID[option]))
    base = dict(renorm=True) if option.startswith("renorm") else {}
    where = f"keras {option}={value!r}"
    late = option == "axis" and isinstance(value, int)  # (the rank is known at build)
    def construct():
        built = BatchNormalization(**base, **{option: value})
        if late:
            built(torch.randn(4, 3))

    assert_refused(construct, [option], f"constructor {where}")
    layer = BatchNormalization(**base)
    layer(torch.randn(4, 3), training=True)
    before = state_of(layer.bn), {k: repr(v) for k, v in vars(layer).items() if not k.startswith("_")}
    kind = data.draw(st.sampled_from(["set", "mask", "rank"]))
    calls = {"set": lambda: setattr(layer, option, value),
             "mask": lambda: layer(torch.randn(4, 3), training=True, mask=torch.ones(4, 3, dtype=torch.bool)),
             "rank": lambda: layer(torch.randn(4, 3, 2), training=True)}
    names = {"set": [option], "mask": ["mask"], "rank": ["rank", "ndim"]}[kind]
    # (axis may change until built: checked below)
    assert_refused(calls[kind], names, f"{kind} {where}", may_accept=kind == "set" and option == "axis")
    after = state_of(layer.bn), {k: repr(v) for k, v in vars(layer).items() if not k.startswith("_")}
    same_state(before[0], after[0], f"{kind} {where}")
    assert before[1] == after[1], f"{kind} {where}: attributes changed"


FUNCTIONAL_INVALID = {
    "eps": [0.0, -1.0, math.nan, "a"],
    "momentum": [None, "a"],
    "axis": [5, -5, (1, 1), "a"],
    "virtual_batch_size": [0, 5, 2.5, "a"],
    "ghost_layout": ["foo"],
    "renorm_clipping": [(1.0, 0.5, 1.0), (0.0, math.inf), (0.0, math.nan, 1.0), "a", (0.0, lambda t: 2.0, 1.0)],
    "adjustment": [3],
    "mask": ["mask_shape", "mask_rank", "mask_list"],
    "running_mean": ["half_pair", "size"],
    "weight": ["size", "list"],
}


def run_invalid_functional(data):
    """functional.batch_norm and reference.batch_norm (its oracle) given one invalid argument: both refuse it by name
    with ValueError/TypeError, and neither moves the running buffers."""
    from normkit import functional as F

    option = data.draw(st.sampled_from(sorted(FUNCTIONAL_INVALID)))
    value = data.draw(st.sampled_from(FUNCTIONAL_INVALID[option]))
    training = data.draw(st.booleans()) or option in ("virtual_batch_size", "momentum")
    renorm = option == "renorm_clipping" or data.draw(st.booleans())
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    kwargs = dict(axis=1)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    w, b = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    names = [option]
    if renorm:
        kwargs.update(renorm_mean=torch.zeros(3, dtype=torch.float64), renorm_stddev=torch.ones(3, dtype=torch.float64),
                      moving_stddev=torch.ones(3, dtype=torch.float64))
    if option == "mask":
        value = {"mask_shape": torch.ones(4, 1, 3), "mask_rank": torch.ones(4, 2), "mask_list": [[1, 0]]}[value]
    elif option == "running_mean":
        names = ["running_mean", "running_var", "values", "size"]
        if value == "half_pair":
            rv = None
        else:
            rm = torch.zeros(4, dtype=torch.float64)
        value = rm
    elif option == "weight":
        names = ["weight", "values", "size"]
        value = torch.ones(4, dtype=torch.float64) if value == "size" else [1.0, 1.0, 1.0]
    kwargs[option] = value
    if option == "ghost_layout":  # (a layout names how ghost batches group: checked where there are ghost batches)
        kwargs["virtual_batch_size"], training = 2, True
    args = dict(running_mean=kwargs.pop("running_mean", rm), running_var=rv, weight=kwargs.pop("weight", w), bias=b,
                training=training, momentum=kwargs.pop("momentum", 0.1), eps=kwargs.pop("eps", 1e-5))
    for name, fn, convert in (("functional", F.batch_norm, lambda v: v),
                              ("reference", R.batch_norm, lambda v: v.numpy() if isinstance(v, torch.Tensor) else v)):
        call = {k: convert(v) for k, v in {**args, **kwargs}.items()}
        if name == "reference" and (callable(kwargs.get("adjustment")) or isinstance(call.get("weight"), list)):
            continue  # (NumPy takes a list as an array)
        buffers = {k: (v.clone() if isinstance(v, torch.Tensor) else np.array(v, copy=True))
                   for k, v in call.items() if k in ("running_mean", "running_var", "renorm_mean", "renorm_stddev",
                                                      "moving_stddev") and v is not None}
        where = f"{name} {option}={value!r} (training={training}, renorm={renorm})"
        assert_refused(lambda: fn(convert(x), **call), names, where,
                       may_accept=option == "virtual_batch_size" and not training)
        for k, before in buffers.items():
            after = call[k]
            same = torch.equal(before, after) if isinstance(before, torch.Tensor) else np.array_equal(before, after)
            assert same, f"{where}: {k} moved"


def run_invalid_forward(data):
    """Inputs a training call must refuse by name, leaving the layer as it was."""
    virtual = data.draw(st.sampled_from([None, 2, 3]))
    renorm = data.draw(st.booleans())
    momentum = data.draw(st.sampled_from([0.1, None]))
    layer = normkit.BatchNorm(3, axis=-1, virtual_batch_size=virtual, renorm=renorm, momentum=momentum).double()
    layer(torch.randn(6, 3, dtype=torch.float64))
    before = state_of(layer)
    kind = data.draw(st.sampled_from(["axis", "features", "mask_shape", "mask_rank", "batch", "rank1", "int", "one_value",
                                      "mask_type"]))
    x = torch.randn(6, 3, dtype=torch.float64)
    mask = None
    names = []
    if kind == "axis":
        layer.axis = data.draw(st.sampled_from([2, -3, 5]))
        before = state_of(layer)
        names = ["axis"]
    elif kind == "features":
        x, names = torch.randn(6, 4, dtype=torch.float64), ["num_features"]
    elif kind == "mask_shape":
        mask, names = torch.ones(5, dtype=torch.bool), ["mask"]
    elif kind == "mask_rank":
        mask, names = torch.ones(6, 3, 2, dtype=torch.bool), ["mask"]
    elif kind == "mask_type":
        mask, names = object(), ["mask"]
    elif kind == "batch":
        if virtual is None:
            return
        x, names = torch.randn(7, 3, dtype=torch.float64), ["virtual_batch_size"]
    elif kind == "rank1":
        x, names = torch.randn(3, dtype=torch.float64), ["rank", "dim"]
    elif kind == "int":
        x, names = torch.ones(6, 3, dtype=torch.int64), ["float", "dtype"]
    elif kind == "one_value":
        if virtual is not None:
            return
        x, names = torch.randn(1, 3, dtype=torch.float64), ["value per", "batch"]
    assert_refused(lambda: layer(x) if mask is None else layer(x, mask=mask), names, f"forward {kind}")
    same_state(before, state_of(layer), f"forward {kind}")


# ----------------------------------------------------------------------------- LayerNorm, GroupNorm, InstanceNorm

SAMPLE_KINDS = ("layer", "group", "instance1d", "instance2d", "instance3d", "lazy1d", "lazy2d", "lazy3d")


@st.composite
def sample_cases(draw, dtypes=("float64", "float32", "bfloat16", "float16")):
    """A LayerNorm, GroupNorm or (lazy) InstanceNorm*d configuration, its data and its steps."""
    kind = draw(st.sampled_from(SAMPLE_KINDS))
    dtype = draw(st.sampled_from(dtypes))
    batch = draw(st.sampled_from([0, 1, 1, 2, 3, 5]))
    case = dict(kind=kind, dtype=dtype, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
                memory=draw(st.sampled_from(["contiguous", "contiguous", "transposed", "channels_last", "sliced"])),
                seed=draw(st.integers(0, 2 ** 31 - 1)), weight_init=draw(st.booleans()),
                modes=draw(st.lists(st.booleans(), min_size=1, max_size=4)) + [False],
                # (half inputs: float32 parameters, mixed precision, or the layer in the input's dtype)
                param_dtype=draw(st.sampled_from(["float32", "same"])) if dtype in ("bfloat16", "float16") else dtype)
    case["offset"] = draw(st.sampled_from([0.0, 3.0, -50.0, 1e4] if dtype in ("float64", "float32") else [0.0, 3.0, -5.0]))
    case["spread"] = draw(st.sampled_from([1.0, 5.0, 1e-2] if dtype in ("float64", "float32") else [1.0, 5.0]))
    if case["offset"] == 1e4 and dtype == "float32":
        case["spread"] = max(case["spread"], 1.0)
    if kind == "layer":
        rank = draw(st.integers(1, 4))
        k = draw(st.integers(1, min(3, max(1, rank - 1))))  # (the batch axis, maybe 0, stays out)
        rest = [draw(st.integers(1, 4)) for _ in range(rank - 1)]
        shape = (batch, *rest) if rank > 1 else (draw(st.integers(1, 5)),)
        case.update(normalized_shape=shape[len(shape) - k:], affine=draw(st.booleans()), bias=draw(st.booleans()))
    elif kind == "group":
        groups = draw(st.integers(1, 4))
        channels = groups * draw(st.integers(1, 3))
        spatial = [draw(st.integers(0 if batch else 1, 3)) for _ in range(draw(st.integers(0, 3)))]
        shape = (batch, channels, *spatial)
        case.update(num_groups=groups, affine=draw(st.booleans()), bias=draw(st.booleans()))
    else:
        dims = int(kind[-2])
        channels = draw(st.integers(1, 4))
        spatial = [draw(st.integers(1, 4)) for _ in range(dims)]
        unbatched = draw(st.integers(0, 4)) == 0
        shape = (channels, *spatial) if unbatched else (batch, channels, *spatial)
        case.update(affine=draw(st.booleans()), bias=draw(st.booleans()), track=draw(st.booleans()),
                    momentum=draw(st.sampled_from([0.1, 0.9, 1.0, 0.0, None])), unbatched=unbatched,
                    running_init=draw(st.booleans()))
    case["shape"] = tuple(shape)
    return case


def build_sample_pair(case):
    """(normkit layer, torch.nn layer) with the same arguments; the torch.nn one loads normkit's state_dict."""
    kind, shape = case["kind"], case["shape"]
    pdtype = DTYPES[case["dtype"] if case["param_dtype"] == "same" else case["param_dtype"]]
    rng = np.random.default_rng(case["seed"] + 1)
    if kind == "layer":
        args = (case["normalized_shape"],), dict(eps=case["eps"], elementwise_affine=case["affine"], bias=case["bias"])
        classes = normkit.LayerNorm, torch.nn.LayerNorm
    elif kind == "group":
        args = (case["num_groups"], shape[1]), dict(eps=case["eps"], affine=case["affine"], bias=case["bias"])
        classes = normkit.GroupNorm, torch.nn.GroupNorm
    else:
        dims = kind[-2:]
        kwargs = dict(eps=case["eps"], momentum=case["momentum"], affine=case["affine"], bias=case["bias"],
                      track_running_stats=case["track"])
        if kind.startswith("lazy"):
            args = (), kwargs
            classes = getattr(normkit, f"LazyInstanceNorm{dims}"), getattr(torch.nn, f"LazyInstanceNorm{dims}")
        else:
            channels = shape[0] if case["unbatched"] else shape[1]
            args = (channels,), kwargs
            classes = getattr(normkit, f"InstanceNorm{dims}"), getattr(torch.nn, f"InstanceNorm{dims}")
    ours = classes[0](*args[0], **args[1], dtype=pdtype)
    theirs = classes[1](*args[0], **args[1], dtype=pdtype)
    if not kind.startswith("lazy"):
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if case["weight_init"]:
                    p.copy_(torch.as_tensor(rng.normal(size=p.shape) * 0.5 + (1.0 if name == "weight" else 0.0)))
            if case.get("running_init") and getattr(ours, "running_mean", None) is not None:
                ours.running_mean.copy_(torch.as_tensor(rng.normal(size=ours.running_mean.shape)))
                ours.running_var.copy_(torch.as_tensor(rng.uniform(0.5, 2.0, size=ours.running_var.shape)))
        theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def sample_reference(case, layer, x_np, g_np, training, state):
    """(output, (input grad, weight grad, bias grad)) of normkit.reference in float64; moves ``state``'s buffers."""
    kind = case["kind"]
    w = to_np(getattr(layer, "weight", None))
    b = to_np(getattr(layer, "bias", None))
    if kind == "layer":
        ns = case["normalized_shape"]
        return R.layer_norm(x_np, ns, w, b, case["eps"]), R.layer_norm_backward(g_np, x_np, ns, w, b, case["eps"])
    if kind == "group":
        G = case["num_groups"]
        return R.group_norm(x_np, G, w, b, case["eps"]), R.group_norm_backward(g_np, x_np, G, w, b, case["eps"])
    if case["unbatched"]:
        x_np, g_np = x_np[None], g_np[None]
    use_input_stats = training or not case["track"]
    rm, rv = state.get("running_mean"), state.get("running_var")
    grads = R.instance_norm_backward(g_np, x_np, None if rm is None else rm.copy(), None if rv is None else rv.copy(),
                                     w, b, use_input_stats, case["eps"])
    momentum = case["momentum"] if case["momentum"] is not None else 0.0
    y = R.instance_norm(x_np, rm, rv, w, b, use_input_stats, momentum if training else 0.0, case["eps"])
    if case["unbatched"]:
        y, grads = y[0], (grads[0][0], *grads[1:])
    return y, grads


def sample_extras(case, x_np, g_np, w, dtype, training):
    """Tolerances added below float64 (output, input gradient, weight gradient), as ``extras``: the math's
    conditioning (|x| / std per normalized group, values per group)."""
    if dtype == torch.float64 or x_np.size == 0:
        return 0.0, 0.0, 0.0
    kind, x = case["kind"], x_np
    if kind == "layer":
        groups = x.reshape(-1, math.prod(case["normalized_shape"]))
    elif kind == "group":
        groups = x.reshape(x.shape[0] * case["num_groups"], -1)
    else:
        xb = x[None] if case["unbatched"] else x
        groups = xb.reshape(xb.shape[0] * xb.shape[1], -1)
    var = groups.var(axis=1)
    if kind.startswith(("instance", "lazy")) and case["track"] and not training:
        var = np.concatenate([var, np.ones(1)])  # (running statistics: variance near 1, or the initialized ones)
    inv = float((1.0 / np.sqrt(var + case["eps"])).max())
    amp = float(np.abs(x).max()) * inv
    n = float(groups.shape[1])
    wmax = 1.0 if w is None else max(1.0, float(np.abs(w).max()))
    gmax = float(np.abs(g_np).max()) if g_np.size else 0.0
    nw = float(x.size / max(1, (w.size if w is not None else 1)))  # (a weight's gradient sums these many terms)
    # (a layer in half precision, as torch.nn's, keeps its statistics in the input's dtype: its unit roundoff)
    u = U32 if case["param_dtype"] != "same" else {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    return (32 * u * amp * wmax, 32 * u * n * gmax * wmax * inv * max(1.0, amp),
            32 * u * min(nw, 8 * math.sqrt(nw)) * gmax * max(1.0, amp) * (1 + inv))


def _call(layer, leaf, g):
    """(output, input grad, param grads by name) or the exception the call raised."""
    try:
        y = layer(leaf)
    except Exception as error:  # noqa: BLE001
        return error
    params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [leaf, *[p for _, p in params]], g, allow_unused=True) if y.requires_grad \
        else [None] * (1 + len(params))
    return y, grads[0], {n: gr for (n, _), gr in zip(params, grads[1:])}


def run_sample_case(case):
    """normkit's layer against torch.nn's (same arguments and state_dict) and against the reference, step by step:
    outputs, gradients of input, weight and bias, and every buffer."""
    rng = np.random.default_rng(case["seed"])
    dtype = DTYPES[case["dtype"]]
    shape = case["shape"]
    ours, theirs = build_sample_pair(case)
    instance = case["kind"].startswith(("instance", "lazy"))
    state = {} if case["kind"].startswith("lazy") else {k: to_np(v) for k, v in ours.state_dict().items()
                                                         if k.startswith("running")}
    empty = math.prod(shape) == 0
    for step, train in enumerate(case["modes"]):
        where = f"step {step} ({'train' if train else 'eval'})"
        x_t = torch.tensor(rng.normal(size=shape) * case["spread"] + case["offset"]).to(dtype)
        g_t = torch.tensor(rng.normal(size=shape)).to(dtype)
        x_np, g_np = to_np(x_t), to_np(g_t)
        for layer in (ours, theirs):
            layer.train(train)
        res = []
        # (torch 2.13's InstanceNorm2d/3d gets a wrong input and weight gradient for a channels_last loss gradient
        # where ATen's (1, N*C, *S) view keeps its strides: one sample, N = 1 or unbatched, one channel, size-1 dims;
        # there only the output is compared with torch.nn's, the gradients with the reference)
        torch_wrong = case["kind"][-2:] in ("2d", "3d") and (case.get("unbatched") or 1 in shape) \
            and case["memory"] != "contiguous"
        for layer in (ours, theirs):
            leaf = laid_out(x_t.clone(), case["memory"]).requires_grad_()
            res.append(_call(layer, leaf, laid_out(g_t.clone(), case["memory"])))
        a, b = res
        if case["kind"].startswith("lazy") and case["unbatched"]:
            b = None  # (documented: a lazy layer reads C from an unbatched (C, *S), torch.nn's S[0])
            if isinstance(a, Exception):
                assert isinstance(a, (ValueError, TypeError)), f"{where}: normkit {type(a).__name__}: {a}"
                return
        elif isinstance(b, Exception) and empty and instance and not isinstance(a, Exception):
            b = None  # (documented: an empty batch with affine parameters fails in torch.nn's ATen call)
        elif isinstance(b, Exception):
            # torch.nn refuses: normkit refuses too, by name, with ValueError/TypeError
            assert isinstance(a, (ValueError, TypeError)), f"{where}: torch.nn {type(b).__name__}: {b}; normkit {a!r}"
            return
        assert not isinstance(a, Exception), f"{where}: normkit {type(a).__name__}: {a}; torch.nn accepts"
        if step == 0 and case["kind"].startswith("lazy") and case["track"]:  # (uninitialized until the call: 0, 1)
            state = {k: to_np(v) for k, v in ours.state_dict().items() if k.startswith("running")}
            state = {k: (np.zeros_like(v) if k == "running_mean" else np.ones_like(v)) for k, v in state.items()}
        y, gx, gp = a
        assert y.dtype == dtype and y.shape == shape, f"{where}: output {y.dtype} {tuple(y.shape)}"
        training = train
        before = {k: v.copy() for k, v in state.items()}
        exp_y, exp_g = sample_reference(case, ours, x_np, g_np, training, state)
        # documented differences with torch.nn: an empty input's InstanceNorm running statistics and GroupNorm's
        # weight gradient for no spatial position (docs/decisions.md); half inputs without parameters (float32 here)
        documented_empty = empty and case["kind"] != "layer"
        pd = ours.weight.dtype if getattr(ours, "weight", None) is not None else None
        half_no_params = dtype in (torch.float16, torch.bfloat16) and (pd is None or pd != dtype)
        vs_torch = not documented_empty and not half_no_params and b is not None
        if (case["kind"] == "group" and case["memory"] == "channels_last" and dtype != torch.float64
                and abs(case["offset"]) > 4 * case["spread"]):
            # (torch.nn's channels-last CPU kernel loses the variance of data far from zero; normkit's layer takes
            # the contiguous kernel there, docs/decisions.md: the reference alone judges it)
            vs_torch = False
        e_y, e_g, e_w = sample_extras(case, x_np, g_np, to_np(getattr(ours, "weight", None)), dtype, training)
        if vs_torch and torch_wrong:
            # (the forward is right; with the conditioning allowance: two float32 kernels on data at 1e4 differ)
            close(f"{where} output vs torch.nn", y, to_np(b[0]), dtype, e_y)
            vs_torch = False
        # torch.nn (primary): the same dtype's tolerance
        tdt = dtype
        if vs_torch:
            close(f"{where} output vs torch.nn", y, to_np(b[0]), tdt, e_y)
            if b[1] is not None or gx is not None:
                close(f"{where} input grad vs torch.nn", gx, to_np(b[1]) if b[1] is not None else np.zeros(shape),
                      tdt, e_g)
            for name, gr in gp.items():
                close(f"{where} {name} grad vs torch.nn", gr, to_np(b[2].get(name)), tdt, e_w)
            for (k, v), (k2, v2) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
                assert k == k2, f"{where}: state_dict keys {k} vs {k2}"
                assert v.dtype == v2.dtype and v.shape == v2.shape, f"{where}: {k} {v.dtype}{tuple(v.shape)} vs {v2.dtype}{tuple(v2.shape)}"
                close(f"{where} {k} vs torch.nn", v, to_np(v2), tdt if v.is_floating_point() else torch.float64,
                      32 * U32 * float(np.abs(to_np(v2)).max()) if v.is_floating_point() and v.numel()
                      and dtype != torch.float64 else 0.0)
        # the reference in float64
        close(f"{where} output", y, exp_y, dtype, e_y)
        close(f"{where} input grad", gx if gx is not None else torch.zeros(shape), exp_g[0], dtype, e_g)
        for i, name in ((1, "weight"), (2, "bias")):
            if name in gp:
                close(f"{where} {name} grad", gp[name], exp_g[i], dtype, e_w)
        for k, v in state.items():
            pdt = DTYPES[case["dtype"] if case["param_dtype"] == "same" else case["param_dtype"]]
            extra = 32 * U32 * (1 + float(np.abs(before[k]).max()) + float(np.abs(v).max())) if pdt != torch.float64 else 0
            if pdt in (torch.float16, torch.bfloat16):
                extra += REL[pdt] * (1 + float(np.abs(v).max()))
            close(f"{where} {k}", ours.state_dict()[k], v, pdt if pdt != torch.float64 else dtype, extra)


SAMPLE_INVALID_CTOR = {
    "layer": {"normalized_shape": [0, -1, 2.5, "a", None, (), (3, 0), (2.0,)], "eps": [0, -1e-5, math.nan, math.inf, "a", None]},
    "group": {"num_groups": [0, -1, 2.5, "a", None, (2,), 5], "num_channels": [0, -4, 4.0, "a", None],
              "eps": [0, -1.0, math.nan, "a"]},
    "instance": {"num_features": [0, -1, 2.5, "a", None, (3,)], "eps": [0, -1e-5, math.nan, "a"],
                 "momentum": [-0.1, 1.5, math.nan, "x"]},
}


def run_invalid_sample(data):
    """Bad constructor arguments and calls: where torch.nn refuses, normkit refuses with ValueError/TypeError naming
    the argument; where normkit alone refuses, the argument is named too (docs/decisions.md: deliberately stricter)."""
    family = data.draw(st.sampled_from(["layer", "group", "instance", "call"]))
    if family != "call":
        option = data.draw(st.sampled_from(sorted(SAMPLE_INVALID_CTOR[family])))
        value = data.draw(st.sampled_from(SAMPLE_INVALID_CTOR[family][option]))
        dims = data.draw(st.sampled_from(["1d", "2d", "3d"]))
        default = {"layer": dict(normalized_shape=4), "group": dict(num_groups=2, num_channels=4),
                   "instance": dict(num_features=3)}[family]
        kwargs = {**default, option: value}
        names = {"layer": ("LayerNorm", "LayerNorm"), "group": ("GroupNorm", "GroupNorm"),
                 "instance": (f"InstanceNorm{dims}", f"InstanceNorm{dims}")}[family]
        where = f"{names[0]}({kwargs})"
        x = {"layer": torch.randn(2, 4), "group": torch.randn(2, 4, 3),
             "instance": torch.randn(2, 3, *[3] * int(dims[0]))}[family]
        outcomes = []
        for module in (normkit, torch.nn):
            try:
                getattr(module, names[0])(**kwargs)(x)  # (torch.nn may take it and fail only at the call)
                outcomes.append(None)
            except Exception as error:  # noqa: BLE001
                outcomes.append(error)
        ours, theirs = outcomes
        if ours is None:
            assert theirs is None, f"{where}: normkit accepts, torch.nn {theirs!r}"
            return
        assert isinstance(ours, (ValueError, TypeError)), f"{where}: {type(ours).__name__}: {ours}"
        assert named(ours, [option]), f"{where}: not named: {ours}"
        return
    kind = data.draw(st.sampled_from(["layer_shape", "layer_rank", "group_channels", "group_rank", "instance_rank",
                                      "instance_channels", "int", "dtype", "one_spatial", "one_per_group",
                                      "set_eps", "set_num_groups", "set_normalized_shape", "set_momentum"]))
    layer_kind = data.draw(st.sampled_from(["layer", "group", "instance"]))
    affine = data.draw(st.booleans())
    if kind.startswith("layer") or kind == "set_normalized_shape":
        layer_kind = "layer"
    elif kind.startswith("group") or kind in ("one_per_group", "set_num_groups"):
        layer_kind = "group"
    elif kind.startswith("instance") or kind in ("one_spatial", "set_momentum"):
        layer_kind = "instance"
    track = data.draw(st.booleans())
    layers = []
    for module in (normkit, torch.nn):
        if layer_kind == "layer":
            layers.append(module.LayerNorm((3, 4), elementwise_affine=affine))
        elif layer_kind == "group":
            layers.append(module.GroupNorm(2, 4, affine=affine))
        else:
            layers.append(module.InstanceNorm2d(4, affine=affine, track_running_stats=track))
    x = {"layer": torch.randn(2, 3, 4), "group": torch.randn(2, 4, 3), "instance": torch.randn(2, 4, 3, 3)}[layer_kind]
    names, setting = [], None
    if kind == "layer_shape":
        x, names = torch.randn(2, 4, 3), ["normalized_shape", "dims"]
    elif kind == "layer_rank":
        x, names = torch.randn(4), ["normalized_shape", "dims"]
    elif kind == "group_channels":
        x, names = torch.randn(2, 6, 3), ["num_channels", "channels", "groups"]
    elif kind == "group_rank":
        x, names = torch.randn(4), ["num_channels", "input", "dim"]
    elif kind == "instance_rank":
        x, names = torch.randn(2, 4, 3, 3, 2), ["input", "D"]
    elif kind == "instance_channels":
        x, names = torch.randn(2, 5, 3, 3), ["num_features", "channels"]
    elif kind == "int":
        x, names = x.to(torch.int64), ["float", "dtype"]
    elif kind == "dtype":
        x, names = x.double(), ["dtype", "float"]
    elif kind == "one_spatial":
        x, names = torch.randn(2, 4, 1, 1), ["spatial", "value"]
    elif kind == "one_per_group":
        x, names = torch.randn(1, 4)[..., None][..., 0], ["group", "value"]
        x = torch.randn(1, 2)
        layers = [m.GroupNorm(2, 2, affine=affine) for m in (normkit, torch.nn)]
    else:
        setting = kind[4:]
        value = data.draw(st.sampled_from({"eps": [0, -1.0, math.nan, "a", None],
                                           "num_groups": [0, -1, "a", None, 2.5],
                                           "normalized_shape": [0, "a", None, 2.5, (3, 0)],
                                           "momentum": [-0.5, 2.0, math.nan, "a"]}[setting]))
        names = [setting]
    outcomes = []
    for layer in layers:
        try:
            if setting is not None:
                setattr(layer, setting, value)
            layer.train(data.draw(st.booleans()) if layer is layers[0] else layers[0].training)
            layer(x)
            outcomes.append(None)
        except Exception as error:  # noqa: BLE001
            outcomes.append(error)
    ours, theirs = outcomes
    where = f"{kind} ({layer_kind}, affine={affine}, track={track}, training={layers[0].training}" \
            f"{', ' + setting + '=' + repr(value) if setting else ''})"
    if theirs is None and ours is None:
        return
    if theirs is not None and ours is None:
        raise AssertionError(f"{where}: normkit accepts, torch.nn {type(theirs).__name__}: {theirs}")
    assert isinstance(ours, (ValueError, TypeError)), f"{where}: {type(ours).__name__}: {ours}"
    assert named(ours, names), f"{where}: not named: {ours}"


# ----------------------------------------------------------------------------- memory layouts

LAYOUT_KINDS = ("batchnorm", "bn1d", "bn2d", "bn3d", "keras", "layer", "group", "instance1d", "instance2d",
                "instance3d")
X_LAYOUTS = ("contiguous", "channels_last", "channels_last_odd", "contiguous_odd", "permuted", "sliced")
G_LAYOUTS = X_LAYOUTS + ("expanded", "expanded_channel")


@st.composite
def layout_cases(draw, dtypes=("float64", "float32")):
    """A layer of any kind (options included), a mode, a shape with size-1 dims and two independent memory layouts:
    the input's and the loss gradient's."""
    kind = draw(st.sampled_from(LAYOUT_KINDS + ("batchnorm", "batchnorm", "keras")))  # (the options: more often)
    ranks = {"bn1d": [2, 3], "bn2d": [4], "bn3d": [5], "instance1d": [3], "instance2d": [4], "instance3d": [5],
             "layer": [2, 3, 4, 5], "group": [2, 3, 4, 5]}.get(kind, [2, 3, 4, 5])
    rank = draw(st.sampled_from(ranks))
    # (mostly tiny; now and then sizes that fill ATen's vector lanes and take its other loops)
    sizes = [1, 1, 2, 3] if draw(st.integers(0, 3)) else [1, 1, 4, 8, 17]
    shape = [draw(st.sampled_from(sizes)) for _ in range(rank)]
    while math.prod(shape) > 1 << 13:
        shape[shape.index(max(shape))] //= 2
    case = dict(kind=kind, dtype=draw(st.sampled_from(dtypes)), mode=draw(st.sampled_from(["train", "eval", "frozen"])),
                affine=draw(st.booleans()), track=draw(st.booleans()), fused=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 31 - 1)), x_layout=draw(st.sampled_from(X_LAYOUTS)),
                g_layout=draw(st.sampled_from(G_LAYOUTS)), odd_strides=draw(st.integers(0, 2 ** 31 - 1)),
                perm=draw(st.permutations(range(rank))), sliced_dim=draw(st.integers(0, rank - 1)),
                grad_dim=draw(st.integers(0, rank - 1)), steps=draw(st.integers(1, 2)),
                x_grad=draw(st.integers(0, 3)) > 0)  # (else data straight from a loader: the parameters' gradients)
    if kind in ("batchnorm", "keras"):
        two = kind == "batchnorm" and rank >= 3 and draw(st.booleans())
        axes = sorted(draw(st.lists(st.integers(1, rank - 1), min_size=2 if two else 1, max_size=2 if two else 1,
                                    unique=True)))
        signed = tuple(a - rank if draw(st.booleans()) else a for a in axes)
        case.update(axes=tuple(axes), axis=signed[0] if len(signed) == 1 else signed,
                    renorm=case["track"] and draw(st.booleans()), unbiased=draw(st.booleans()),
                    mask=kind == "batchnorm" and draw(st.integers(0, 3)) == 0, virtual=None,
                    ghost_layout=draw(st.sampled_from(["strided", "contiguous"])))
        if draw(st.integers(0, 3)) == 0:
            virtual = draw(st.sampled_from([1, 2]))
            shape[0] = virtual * draw(st.integers(1, 3))
            case["virtual"] = virtual
    elif kind == "layer":
        case["k"] = draw(st.integers(1, rank - 1))
    elif kind == "group":
        groups = draw(st.integers(1, 4))
        shape[1] = groups * draw(st.integers(1, 3))
        case["groups"] = groups
    case["shape"] = tuple(shape)
    return case


def layout_of(t, layout, case, grad=False):
    """``t``'s values in ``layout``: strides as models hand them over (see ``G_LAYOUTS``; the expanded ones, for a
    gradient, replace the values with the gradient of ``y.sum()`` or of ``(y * w).sum()``, w along one dim)."""
    rank = t.dim()
    rng = np.random.default_rng(case["odd_strides"] + grad)
    if layout == "channels_last" and rank in (4, 5):  # (channels_last's own strides, even where size-1 dims
        last = (0, *range(2, rank), 1)                   # make the input contiguous too, as ATen computes them)
        return t.permute(last).contiguous().permute([last.index(i) for i in range(rank)])
    if layout in ("channels_last_odd", "contiguous_odd"):
        base = layout_of(t, layout[:-4], case, grad).contiguous() if layout == "contiguous_odd" else \
            layout_of(t, "channels_last", case, grad)
        stride = list(base.stride())
        for i, size in enumerate(base.shape):
            if size == 1:
                stride[i] = int(rng.choice([1, 2, 3, max(1, base.numel()), 7 * max(1, base.numel())]))
        return base.as_strided(base.shape, stride)
    if layout == "permuted":
        perm = list(case["perm"])
        return t.permute(perm).contiguous().permute([perm.index(i) for i in range(rank)])
    if layout == "sliced":  # (every other element along one dim, one longer than 1 where there is one)
        d = case["sliced_dim"] if t.shape[case["sliced_dim"]] > 1 or max(t.shape) == 1 else \
            max(range(rank), key=lambda i: t.shape[i])
        big = torch.zeros([2 * s if i == d else s for i, s in enumerate(t.shape)], dtype=t.dtype)
        view = big[(slice(None),) * d + (slice(None, None, 2),)]
        view.copy_(t)
        return view
    if layout == "expanded":
        return torch.ones((), dtype=t.dtype).expand(t.shape)
    if layout == "expanded_channel":
        d = case["grad_dim"]
        w = torch.as_tensor(rng.normal(size=[s if i == d else 1 for i, s in enumerate(t.shape)]), dtype=t.dtype)
        return w.expand(t.shape)
    return t


def build_layout_layer(case):
    from normkit.keras import BatchNormalization

    kind, shape = case["kind"], case["shape"]
    rng = np.random.default_rng(case["seed"] + 1)
    dtype = DTYPES[case["dtype"]]
    if kind == "batchnorm":
        feats = tuple(shape[a] for a in case["axes"])
        kwargs = dict(axis=case["axis"], affine=case["affine"], track_running_stats=case["track"],
                      unbiased_running_var=case["unbiased"], virtual_batch_size=case["virtual"],
                      ghost_layout=case.get("ghost_layout", "strided"))
        if case["renorm"]:
            kwargs.update(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5})
        layer = normkit.BatchNorm(feats[0] if len(feats) == 1 else feats, **kwargs)
    elif kind.startswith("bn"):
        layer = getattr(normkit, f"BatchNorm{kind[2:]}")(shape[1], affine=case["affine"],
                                                          track_running_stats=case["track"])
    elif kind == "keras":
        kwargs = dict(axis=case["axis"], center=case["affine"], scale=case["affine"] or case["track"],
                      virtual_batch_size=case["virtual"], ghost_layout=case.get("ghost_layout", "strided"),
                      dtype="float64" if dtype == torch.float64 else None)
        if case["renorm"]:
            kwargs.update(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5})
        layer = BatchNormalization(**kwargs)
        layer.build(shape)
        if case["mode"] == "frozen":
            layer.trainable = False
    elif kind == "layer":
        layer = normkit.LayerNorm(shape[len(shape) - case["k"]:], elementwise_affine=case["affine"])
    elif kind == "group":
        layer = normkit.GroupNorm(case["groups"], shape[1], affine=case["affine"])
    else:
        layer = getattr(normkit, f"InstanceNorm{kind[-2:]}")(shape[1], affine=case["affine"],
                                                             track_running_stats=case["track"])
    if kind != "keras":
        layer = layer.to(dtype)
        if case["mode"] == "frozen" and hasattr(layer, "freeze"):
            layer.freeze()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.as_tensor(rng.normal(size=p.shape) * 0.5 + (1.0 if name.endswith("weight") else 0.0)))
        for name, b in layer.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.as_tensor(rng.normal(size=b.shape)))
            elif name.endswith("running_var"):
                b.copy_(torch.as_tensor(rng.uniform(0.5, 2.0, size=b.shape)))
    layer.train(case["mode"] == "train")
    return layer


def _layout_step(case, layer, x, g, mask):
    """(output, input grad, {param: grad}, {buffer: value}) of one call, or the exception it raised."""
    leaf = x.detach().requires_grad_(case.get("x_grad", True))
    try:
        if case["kind"] == "keras":
            y = layer(leaf, training=case["mode"] != "eval")
        elif mask is not None:
            y = layer(leaf, mask=mask)
        else:
            y = layer(leaf)
        params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        inputs = [leaf] * leaf.requires_grad + [p for _, p in params]
        if not leaf.requires_grad and inputs and y.requires_grad:
            # Data from a loader trains through backward(): torch.autograd.grad for the weights alone through a
            # channels-last CPU GroupNorm ends the process in torch 2.13 (docs/decisions.md; torch.nn's too)
            for _, p in params:
                p.grad = None
            y.backward(g)
            grads = [p.grad for _, p in params]
        else:
            grads = (torch.autograd.grad(y, inputs, g, allow_unused=True) if inputs and y.requires_grad
                     else [None] * len(inputs))
    except Exception as error:  # noqa: BLE001
        return error
    if not leaf.requires_grad:
        grads = [None, *grads]
    return (y.detach().clone(), grads[0], {n: gr for (n, _), gr in zip(params, grads[1:])},
            {n: b.detach().clone() for n, b in layer.named_buffers()})


def layout_reference(case, layer, x, g, mask):
    """(output, (input grad, weight grad, bias grad)) of normkit.reference in float64 for the layer as it stands
    before the call, or None (renorm, whose clipping state the contiguous twin covers)."""
    kind, x, g = case["kind"], to_np(x), to_np(g)
    bn = layer.bn if kind == "keras" else layer
    w, b = to_np(getattr(bn, "weight", None)), to_np(getattr(bn, "bias", None))
    if kind == "layer":
        ns = layer.normalized_shape
        return R.layer_norm(x, ns, w, b, layer.eps), R.layer_norm_backward(g, x, ns, w, b, layer.eps)
    if kind == "group":
        G = layer.num_groups
        return R.group_norm(x, G, w, b, layer.eps), R.group_norm_backward(g, x, G, w, b, layer.eps)
    rm, rv = to_np(getattr(bn, "running_mean", None)), to_np(getattr(bn, "running_var", None))
    if kind.startswith("instance"):
        use = case["mode"] == "train" or rm is None
        return (R.instance_norm(x, rm, rv, w, b, use, 0.0, layer.eps),
                R.instance_norm_backward(g, x, rm, rv, w, b, use, layer.eps))
    if case.get("renorm"):
        return None
    training = case["mode"] == "train"
    batch_stats = training or rm is None
    kwargs = dict(axis=case.get("axis", 1), virtual_batch_size=case.get("virtual") if training else None,
                  ghost_layout=case.get("ghost_layout", "strided"))
    if mask is not None and batch_stats:
        kwargs["mask"] = mask.numpy().reshape([1 if i in case["axes"] else s for i, s in enumerate(x.shape)])
    return (R.batch_norm(x, rm, rv, w, b, batch_stats, 0.0, bn.eps, **kwargs),
            R.batch_norm_backward(g, x, rm, rv, w, b, batch_stats, bn.eps, **kwargs))


def run_layout_case(case):
    """The layer on the input and loss gradient in their drawn layouts (fused kernels on or off) against a copy of
    it on contiguous copies of both (fused off): output, input gradient, parameter gradients, buffers; in float64
    against normkit.reference too (all but renorm)."""
    import copy

    from normkit import kernels

    rng = np.random.default_rng(case["seed"])
    dtype = DTYPES[case["dtype"]]
    shape = case["shape"]
    layer = build_layout_layer(case)
    twin = copy.deepcopy(layer)
    # (float16/bfloat16 when asked for: REL's tolerance, without the conditioning terms the other families add; two
    # values 2% apart in bfloat16 give input gradients 20% apart between ATen's contiguous and strided kernels)
    tol = {torch.float64: 1e-10, torch.float32: 2e-4}.get(dtype, REL[dtype])
    for step in range(case["steps"]):
        x = torch.as_tensor(rng.normal(size=shape), dtype=dtype)
        g = torch.as_tensor(rng.normal(size=shape), dtype=dtype)
        mask = None
        if case.get("mask"):
            mshape = tuple(s for i, s in enumerate(shape) if i not in case["axes"])
            mask = torch.as_tensor(rng.uniform(size=mshape) < 0.7)
        x_l, g_l = layout_of(x, case["x_layout"], case), layout_of(g, case["g_layout"], case, grad=True)
        expected = layout_reference(case, layer, x_l, g_l, mask) if dtype == torch.float64 else None
        with kernels.switched(False):
            want = _layout_step(case, twin, x_l.contiguous(), g_l.contiguous(), mask)
        with kernels.switched(case["fused"]):
            got = _layout_step(case, layer, x_l, g_l, mask)
        where = f"step {step} x {tuple(x_l.stride())} g {tuple(g_l.stride())}"
        if isinstance(want, Exception) or isinstance(got, Exception):
            assert type(want) is type(got), f"{where}: contiguous {want!r}, laid out {got!r}"
            return
        y, gx, gp, bufs = got
        assert y.dtype == want[0].dtype and y.shape == want[0].shape, f"{where}: output {y.dtype} {tuple(y.shape)}"
        for name, a, b in [("output", y, want[0]), ("input grad", gx, want[1])] + \
                [(f"{n} grad", gp[n], want[2][n]) for n in want[2]] + [(n, bufs[n], want[3][n]) for n in want[3]]:
            if a is None or b is None:
                assert (a is None) == (b is None), f"{where} {name}: {a} vs {b}"
                continue
            scale = max(1.0, float(b.double().abs().nan_to_num(0, 0, 0).max())) if b.numel() else 1.0
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, equal_nan=True, msg=f"{where} {name}")
        if expected is not None:  # (the contiguous twin itself, and the laid-out call, against the reference)
            exp_y, (exp_gx, exp_gw, exp_gb) = expected
            close(f"{where} output vs reference", y, exp_y, dtype)
            if gx is not None:
                close(f"{where} input grad vs reference", gx, exp_gx, dtype)
            for name, gr in gp.items():
                close(f"{where} {name} grad vs reference", gr, exp_gw if name.endswith("weight") else exp_gb, dtype)


# ----------------------------------------------------------------------------- driver


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["module", "fused", "keras", "torchnn", "invalid", "sample", "sample_invalid",
                                             "layouts", "compile"], required=True)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--dtypes", default="float64,float32,bfloat16,float16")
    parser.add_argument("--big", action="store_true", help="large inputs only (2^14 to 2^17 values)")
    parser.add_argument("--replay", help="a CASE line printed by a failure: run that case alone (module/keras/torchnn/sample/layouts/compile)")
    args = parser.parse_args()
    if args.replay:
        case = eval(args.replay, {"Adjustment": Adjustment, "TorchAdjustment": TorchAdjustment, "Ramp": Ramp, "nan": math.nan, "inf": math.inf})
        {"module": run_module_case, "keras": run_keras_case, "torchnn": run_torchnn_case, "sample": run_sample_case,
         "fused": lambda c: run_module_case(c, fused=True), "layouts": run_layout_case,
         "compile": run_compile_case}[args.family](case)
        print("replayed: OK")
        return
    dtypes = tuple(args.dtypes.split(","))
    run = settings(max_examples=args.examples, deadline=None, derandomize=False, database=None,
                   suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    counter = {"n": 0}

    def fuzzer(strategy, check):
        """A hypothesis test of ``check`` over ``strategy``, counting its examples and keeping the failing case."""
        @run
        @given(strategy)
        def fuzz(case):
            counter["n"] += 1
            try:
                check(case)
            except Exception:
                counter["case"] = case
                raise
        return fuzz

    if args.family == "module":
        fuzz = fuzzer(cases(dtypes, big=args.big or None), run_module_case)
    elif args.family == "fused":
        from normkit import kernels
        kernels.build()

        @run
        @given(cases(tuple(d for d in dtypes if d in ("float64", "float32")), big=args.big or None))
        def fuzz(case):
            counter["n"] += 1
            counter['case'] = case
            on = run_module_case(case, fused=True)
            off = run_module_case(case, fused=False)
            if case["dtype"] != "float64":
                return  # (float32: each against the reference above, within float32's conditioning)
            # (two float64 algorithms: 1e-9, and more for data far from zero, where each loses ~1e-16 of |x| / std per
            # term: 8e-9 relative in gamma's gradient at mean 1e4, std 1e-2, 1,536 values)
            cond = (abs(case["offset"]) + case["spread"]) / case["spread"]
            tol = max(1e-9, 1e-14 * cond * math.prod(case["shape"]) ** 0.5)
            for step, (a_step, b_step) in enumerate(zip(on, off)):
                for i, (a, b) in enumerate(zip(a_step, b_step)):
                    if a is None or b is None:
                        assert a is None and b is None, f"step {step} item {i}"
                        continue
                    scale = max(1.0, float(b.double().abs().nan_to_num(0, 0, 0).max()) if b.numel() else 0.0)
                    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, equal_nan=True,
                                               msg=f"fused on vs off, step {step} item {i}")
    elif args.family == "keras":
        fuzz = fuzzer(cases(dtypes, keras=True, big=args.big or None), run_keras_case)
    elif args.family == "torchnn":
        fuzz = fuzzer(cases(("float64",)), run_torchnn_case)
    elif args.family == "sample":
        fuzz = fuzzer(sample_cases(dtypes), run_sample_case)
    elif args.family == "layouts":
        from normkit import kernels
        kernels.build()
        fuzz = fuzzer(layout_cases(tuple(d for d in dtypes if d in ("float64", "float32"))), run_layout_case)
    elif args.family == "sample_invalid":
        fuzz = fuzzer(st.data(), run_invalid_sample)
    elif args.family == "compile":
        from torch import _dynamo  # (not "import torch._dynamo": it would make torch a local name of main)
        _dynamo.config.cache_size_limit = 512  # (examples share compiled code; a reset every 100)
        _dynamo.config.accumulated_cache_size_limit = 4096
        run = settings(run, phases=[Phase.explicit, Phase.generate])  # (shrinking would compile every candidate)
        fuzz = fuzzer(compile_cases(dtypes if args.dtypes != parser.get_default("dtypes") else ("float64", "float32")),
                      run_compile_case)
    else:
        @run
        @given(st.data())
        def fuzz(data):
            counter["n"] += 1
            family = data.draw(st.sampled_from(["options", "forward", "keras", "functional"]))
            {"options": run_invalid_case, "forward": run_invalid_forward, "keras": run_invalid_keras,
             "functional": run_invalid_functional}[family](data)
    try:
        fuzz()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("CASE", repr(counter.get("case")))
        print(f"FAILED after {counter['n']} examples ({args.family})")
        sys.exit(1)
    print(f"OK: {counter['n']} examples ({args.family})")


if __name__ == "__main__":
    main()
