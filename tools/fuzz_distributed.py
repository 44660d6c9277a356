"""Differential fuzzer of synchronized=True over real gloo processes (the tests check fixed cases): local, not CI.

Two gloo processes are spawned ONCE and run every example (a spawn costs seconds; an example milliseconds). Process
0 draws each example with hypothesis and sends every process its part of each step's batch; each process trains its
synchronized layer on its part and sends back what it saw; process 0 compares with normkit.reference in float64 on
the concatenation of the processes' batches. Families (``--family``):

  module   normkit.BatchNorm(synchronized=True): rank 2-5, feature axis first/last/tuple, local batch sizes that
           differ between the processes and between steps (an empty local batch, a fully masked one), masks (padding,
           per feature, broadcast over the rows, of the input's rank as 0/1, one process unmasked) with 0/NaN/inf in
           padded positions, ghost batches (strided or contiguous: ghost j of the group's batch is every process's
           ghost j, docs/decisions.md; the reference runs contiguous ghosts of V*P rows on the rows reordered so),
           renorm with fixed or scheduled clipping, an adjustment, momentum 0.1/None, either running variance, affine
           or not, running statistics or not, freeze, memory layouts, options set on a built layer, a process group
           of its own (dist.new_group), several training steps with eval between and last; float64 mostly, float32
           (at 1e4 with spread 1e-2 too), float16 and bfloat16. Each step compares each process's output and input
           gradient, the weight/bias gradients summed over the processes (as DDP sums them), and every buffer of
           every process (the same bits on every process after a merge); a group with one value per feature and
           no mask must be refused by every process at once, and leave the layer as it was. A quarter of the
           float64 examples take second derivatives (a gradient penalty) instead, against one process's
           normkit.BatchNorm on the whole batch (the reference has none).
  keras    normkit.keras.BatchNormalization(synchronized=True) the same way (Keras' decay and biased variance; mixed
           and half-precision dtype policies).
  invalid  processes that disagree (number of features or their shape, input dtype, ghost count or divisibility,
           ghost batches on one process only or with an empty local batch, mask shape, masks or array inputs that
           are no arrays, the Keras layer's rank, an adjustment whose terms fit one batch only, a lazy layer's first
           call): every process must raise a clear error (ValueError/TypeError), none may hang (the group's timeout,
           --timeout, turns a hang into a failure), and a valid synchronized example afterwards must still equal the
           reference (the collectives still pair).

Eval without running statistics is each process's own batch (eval never synchronizes), compared per process.
Options: --big (local batches up to 33 rows, sizes up to 9), --dtypes, --replay "CASE" (the dict a failure prints),
--world N (processes; 2 by default).
Run niced (the machine is shared), each family in chunks; every run draws new examples:

    PYTHONPATH=src nice -n 10 python tools/fuzz_distributed.py --family module --examples 300

A failure prints the CASE (replay it with --replay "CASE" --family ...). Tolerances are tools/fuzz_batch_norm.py's.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_batch_norm as FB  # noqa: E402  (its helpers: tolerances, masks, padding, adjustment, ramps)

import normkit  # noqa: E402
import normkit.keras  # noqa: E402
from normkit import reference as R  # noqa: E402
from normkit.stats import RenormClipping  # noqa: E402

WORLD = 2  # (--world: every process sets it from the arguments, spawned processes import this module anew)
BUFFERS = FB.BUFFERS


# ----------------------------------------------------------------------------- drawing examples


@st.composite
def sync_cases(draw, dtypes, keras=False, big=False):
    rank = draw(st.integers(2, 5))
    rest = [draw(st.integers(1, 3 if not big or rank > 3 else 9)) for _ in range(rank - 1)]
    two = rank >= 3 and not keras and draw(st.booleans())
    axes = sorted(draw(st.lists(st.integers(1, rank - 1), min_size=2 if two else 1, max_size=2 if two else 1,
                                unique=True)))
    if not two and draw(st.booleans()):
        axes = [rank - 1]  # (features last, Keras' default, half the time)
    signed = tuple(a - rank if draw(st.booleans()) else a for a in axes)
    axis = signed[0] if len(signed) == 1 else signed
    per_row = math.prod(s for i, s in enumerate(rest, 1) if i not in axes)
    steps = draw(st.integers(1, 3))
    virtual = None
    if draw(st.integers(0, 2)) == 0:
        virtual = draw(st.sampled_from([1, 2, 3]))
        if virtual * per_row * WORLD < 2:
            virtual = None
    if virtual is not None:  # (every process the same multiple of virtual_batch_size, per step)
        groups = [draw(st.sampled_from([0, 1, 1, 2, 3] if not big else [1, 4, 8])) for _ in range(steps)]  # (0: empty)
        sizes = [(virtual * g,) * WORLD for g in groups]
    else:
        sizes = [tuple(draw(st.sampled_from([0, 1, 2, 3, 5] if not big else [0, 7, 16, 33])) for _ in range(WORLD))
                 for _ in range(steps)]
    track = draw(st.booleans())
    renorm = track and draw(st.booleans())
    clipping = FB.draw_clipping(draw, callables=not keras) if renorm else None
    # each process's own mask kind: none, padding (over the non-feature axes), per feature, rows off, all off
    kinds = ["none", "padding", "rows_off", "all_off"] + ([] if keras else ["per_feature", "broadcast", "full_rank"])
    masked = draw(st.booleans())
    mask_kinds = tuple(draw(st.sampled_from(kinds)) if masked else "none" for _ in range(WORLD))
    dtype = draw(st.sampled_from(dtypes if not keras else [d for d in dtypes if d in ("float64", "float32")]))
    offset = draw(st.sampled_from([0.0, 3.0, -50.0, 1e4] if dtype in ("float64", "float32") else [0.0, 3.0]))
    spread = draw(st.sampled_from([1.0, 5.0, 1e-2] if dtype in ("float64", "float32") else [1.0, 5.0]))
    policy = (draw(st.sampled_from([None, None, "mixed_float16", "mixed_bfloat16", "float16", "bfloat16"]))
              if keras and dtype == "float32" else None)
    if policy is not None:  # (half precision's range and resolution, as for float16/bfloat16 data)
        offset, spread = min(offset, 3.0), max(spread, 1.0)
    return dict(
        keras=keras, shape_rest=tuple(rest), axis=axis, axes=tuple(axes), virtual=virtual,
        layout=draw(st.sampled_from(["strided", "contiguous"])), sizes=sizes, track=track or keras, renorm=renorm,
        clipping=clipping, renorm_momentum=draw(st.sampled_from([0.01, 0.5, 1.0])), affine=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, None] if not keras else [0.1, 0.01])), unbiased=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        adjustment=FB.Adjustment(tuple(axes), draw(st.integers(0, 99))) if draw(st.integers(0, 3)) == 0 else None,
        mask_kinds=mask_kinds, pad_value=draw(st.sampled_from([0.0, 7.0, math.nan, math.inf, -math.inf])),
        dtype=dtype, offset=offset, spread=spread, freeze_at=draw(st.sampled_from([None, None, None, 1, 2])),
        seed=draw(st.integers(0, 2 ** 31 - 1)), weight_init=draw(st.booleans()),
        # (bfloat16: contiguous only. Out of training without running statistics each process normalizes its own
        # batch by ATen's kernel, as torch.nn does, and ATen's CPU bfloat16 backward of non-contiguous data is off:
        # 0.51 for 0.67 at 2 rows, torch.nn.BatchNorm1d too. Not the merge's; left to the single-process fuzzer.)
        memory=draw(st.sampled_from(["contiguous", "contiguous", "transposed", "channels_last", "sliced"]
                                    if dtype != "bfloat16" else ["contiguous"])),
        # (train steps with eval between some of them, eval last)
        evals=tuple(draw(st.booleans()) for _ in range(steps)),
        # options (synchronized included) set on a built layer, as normkit.synchronize_batch_norm sets them
        late=not keras and draw(st.booleans()),
        # a second backward (a gradient penalty) through the merge, against one process's normkit.BatchNorm
        double=not keras and dtype == "float64" and draw(st.integers(0, 3)) == 0,
        # a process_group of its own (dist.new_group of both processes) instead of the default group
        group=draw(st.booleans()),
        # Keras' mixed precision: float16/bfloat16 computation of float32 data, float32 variables
        policy=policy,
    )


def ghost_order(sizes, virtual, layout):
    """The rows of the concatenated batch in an order where the group's ghost j (every process's ghost j) is the
    contiguous rows j*V*P ... (j+1)*V*P - 1: the reference then runs contiguous ghosts of V*P rows on it."""
    starts = np.cumsum((0,) + tuple(sizes))
    groups = sizes[0] // virtual
    order = []
    for j in range(groups):
        for p, size in enumerate(sizes):
            local = np.arange(size).reshape((virtual, groups) if layout == "strided" else (groups, virtual))
            rows = local[:, j] if layout == "strided" else local[j]
            order.extend(starts[p] + rows)
    return np.asarray(order, dtype=np.int64)


def local_mask(kind, shape, axes, rng):
    """(full-rank boolean mask, the layer's mask) of one process's local batch; (None, None) without."""
    return FB.drawn_mask(kind, shape, axes, rng)


def keras_mask(kind, shape, rng):
    if kind == "none":
        return None, None
    m = rng.uniform(size=shape[:-1]) < 0.6
    if kind == "rows_off" and shape[0]:
        m[0] = False
    elif kind == "all_off":
        m[...] = False
    return m[..., None], m


def make_steps(case):
    """Every step's data: the whole batch (x, g, full mask or None, rows order) and each process's part."""
    rng = np.random.default_rng(case["seed"])
    dtype = FB.DTYPES[case["dtype"]]
    # (a mixed policy computes on the input rounded to its compute dtype: that rounded input is the data)
    dtype = {"mixed_float16": torch.float16, "mixed_bfloat16": torch.bfloat16, "float16": torch.float16,
             "bfloat16": torch.bfloat16}.get(case.get("policy"), dtype)
    steps = []
    modes = []
    for train_sizes, eval_between in zip(case["sizes"], case["evals"]):
        modes.append((True, train_sizes))
        if eval_between:
            modes.append((False, train_sizes))
    modes.append((False, case["sizes"][-1]))
    for train, sizes in modes:
        parts = []
        for p, n in enumerate(sizes):
            shape = (n,) + case["shape_rest"]
            x = torch.tensor(rng.normal(size=shape) * case["spread"] + case["offset"]).to(dtype)
            x_np = FB.to_np(x)
            g_np = rng.normal(size=shape)
            kind = case["mask_kinds"][p]
            full, layer_mask = (keras_mask(kind, shape, rng) if case["keras"] else
                                local_mask(kind, shape, case["axes"], rng))
            if full is not None:
                x_np, g_np = FB.padded(x_np, g_np, full, case["pad_value"])
                full = np.broadcast_to(full, shape)
            x_t = torch.tensor(x_np).to(dtype)
            g_t = torch.tensor(g_np).to(dtype)
            parts.append(dict(x=x_t, g=g_t, mask=None if layer_mask is None else torch.as_tensor(layer_mask),
                              full=full))
        steps.append(dict(train=train, sizes=sizes, parts=parts))
    return steps


# ----------------------------------------------------------------------------- what each process runs


GROUP = []  # (the process group of the examples that ask for one: made once, by every process, at the start)


def build(case, synchronized=True):
    group = GROUP[0] if case.get("group") and synchronized and GROUP else None
    feats = tuple(case["shape_rest"][a - 1] for a in case["axes"])
    if case["keras"]:
        kwargs = dict(axis=case["axis"], momentum=1.0 - case["momentum"], epsilon=case["eps"], center=case["affine"],
                      scale=case["affine"] or case["weight_init"], virtual_batch_size=case["virtual"],
                      ghost_layout=case["layout"], adjustment=case["adjustment"], synchronized=synchronized,
                      process_group=group)
        if case["renorm"]:
            kwargs.update(renorm=True, renorm_clipping=case["clipping"], renorm_momentum=1.0 - case["renorm_momentum"])
        layer = normkit.keras.BatchNormalization(**kwargs, dtype="float64" if case["dtype"] == "float64"
                                                 else case.get("policy"))
        layer.build((None,) + case["shape_rest"])
        bn = layer.bn
    else:
        kwargs = dict(momentum=case["momentum"], eps=case["eps"], affine=case["affine"],
                      track_running_stats=case["track"], axis=case["axis"], unbiased_running_var=case["unbiased"],
                      virtual_batch_size=case["virtual"], ghost_layout=case["layout"], adjustment=case["adjustment"],
                      synchronized=synchronized, process_group=group)
        if case["renorm"]:
            kwargs.update(renorm=True, renorm_clipping=case["clipping"], renorm_momentum=case["renorm_momentum"])
        features = feats[0] if len(feats) == 1 else feats
        if case.get("late"):
            layer = bn = normkit.BatchNorm(features, axis=case["axis"], affine=case["affine"],
                                           track_running_stats=case["track"])
            for name, value in kwargs.items():
                if name not in ("affine", "track_running_stats", "axis"):
                    setattr(layer, name, value)
        else:
            layer = bn = normkit.BatchNorm(features, **kwargs)
        if case["dtype"] == "float64":
            layer = bn = layer.double()
    if case["weight_init"]:
        rng = np.random.default_rng(case["seed"] + 1)
        with torch.no_grad():
            if bn.weight is not None:
                bn.weight.copy_(torch.as_tensor(1 + 0.5 * rng.normal(size=feats)))
            if bn.bias is not None:
                bn.bias.copy_(torch.as_tensor(rng.normal(size=feats)))
    return layer, bn


def call(layer, bn, case, step, part, frozen, h=None):
    x = FB.laid_out(part["x"].clone(), case["memory"]).requires_grad_()
    if case["keras"]:
        layer.trainable = not frozen
        y = layer(x, training=step["train"], mask=part["mask"])
    else:
        if frozen and not bn.frozen:
            bn.freeze()
        layer.train(step["train"])
        y = layer(x) if part["mask"] is None else layer(x, mask=part["mask"])
    params = [p for p in (bn.weight, bn.bias) if p is not None and p.requires_grad]
    if case.get("double") and y.requires_grad:
        # d/d(x, params) of <d<y, g>/dx, h>: h is the input gradient's own gradient (g's values, reversed)
        first, = torch.autograd.grad(y, x, FB.laid_out(part["g"], case["memory"]), create_graph=True)
        h = (part["g"].flip(0) if h is None else h).to(first.dtype)
        got = (torch.autograd.grad(first, [x, *params], h, allow_unused=True) if first.requires_grad
               else (None,) * (1 + len(params)))  # (eval without affine: the first derivative is a constant)
        got = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(got, [x, *params]))
    else:
        got = torch.autograd.grad(y, [x, *params], FB.laid_out(part["g"], case["memory"]), allow_unused=True)
    got_w = got[1] if bn.weight is not None and bn.weight.requires_grad else None
    got_b = got[-1] if bn.bias is not None and bn.bias.requires_grad else None
    buffers = {name: getattr(bn, name, None) for name in BUFFERS}
    buffers["num_batches_tracked"] = getattr(bn, "num_batches_tracked", None)
    out = dict(y=y, gx=got[0], gw=got_w, gb=got_b, dtype=y.dtype, **buffers)
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def run_local(case, steps, rank):
    """This process's results of every step (or the error of the step that raised, as "Type: message")."""
    layer, bn = build(case)
    results = []
    for index, step in enumerate(steps):
        frozen = case["freeze_at"] is not None and index >= case["freeze_at"]
        try:
            results.append(call(layer, bn, case, step, step["parts"][rank], frozen))
        except Exception as error:  # noqa: BLE001 (recorded; process 0 says what was expected)
            # (a refused merge is refused by every process at once: the group goes on to the next step together,
            # and the refused call must have left the layer as it was)
            results.append(f"{type(error).__name__}: {error}")
    return results


# ----------------------------------------------------------------------------- the reference on the whole batch


def reference_steps(case, steps):
    """What one process on the concatenated batch gives (float64 reference), per step: the whole batch's output and
    input gradient, weight/bias gradients, buffers; "refuse" where one process on that batch refuses it (one value
    per feature without a mask), for every process to refuse."""
    layer, bn = build(case, synchronized=False)
    state = {name: FB.to_np(getattr(bn, name, None)) for name in BUFFERS}
    momentum = case["momentum"]
    count = 0
    out = []
    for index, step in enumerate(steps):
        frozen = case["freeze_at"] is not None and index >= case["freeze_at"]
        training = step["train"] and not frozen
        batch_stats = training or not case["track"]
        parts = step["parts"]
        x_np = np.concatenate([FB.to_np(p["x"]) for p in parts])
        g_np = np.concatenate([FB.to_np(p["g"]) for p in parts])
        any_mask = any(p["full"] is not None for p in parts)
        full = (np.concatenate([np.ones(p["x"].shape, bool) if p["full"] is None else p["full"] for p in parts])
                if any_mask else None)
        w, b = FB.to_np(bn.weight), FB.to_np(bn.bias)
        if training:
            valid = x_np.size if full is None else int(full.sum())
            per_feature = valid / max(math.prod(case["shape_rest"][a - 1] for a in case["axes"]), 1)
            if full is None and per_feature == 1:
                out.append("refuse")  # (one process refuses one value per feature; an empty batch it accepts)
                continue
        if training:
            count += 1
        factor = 0.0
        if training:
            factor = momentum if momentum is not None else 1.0 / count
        renorm = case["renorm"] and training
        clip = RenormClipping.from_dict(case["clipping"]).at(count - 1) if renorm else (0.0, math.inf, math.inf)
        order = None
        virtual = None
        if training and case["virtual"] is not None:
            order = ghost_order(step["sizes"], case["virtual"], case["layout"])
            virtual = case["virtual"] * len(parts)
        unbiased = case["unbiased"] and not case["keras"]
        if batch_stats and not training:
            # Eval never synchronizes: without running statistics each process normalizes its own batch.
            ys, gxs, gws, gbs = [], [], [], []
            features = math.prod(case["shape_rest"][a - 1] for a in case["axes"])
            alone = [rank for rank, p in enumerate(parts) if p["full"] is None and p["x"].numel() == features]
            if alone:  # (a process with one value per feature refuses it, as one process does)
                out.append(("refuse_local", alone))
                continue
            for p in parts:
                if p["x"].shape[0] == 0:
                    ys.append(np.zeros(p["x"].shape))
                    gxs.append(np.zeros(p["x"].shape))
                    continue
                xp, gp = FB.to_np(p["x"]), FB.to_np(p["g"])
                kwargs = dict(axis=case["axis"], mask=p["full"])
                ys.append(R.batch_norm(xp, None, None, w, b, True, 0.0, case["eps"], **kwargs))
                grads = R.batch_norm_backward(gp, xp, None, None, w, b, True, case["eps"], **kwargs)
                gxs.append(grads[0])
                gws.append(grads[1])
                gbs.append(grads[2])
            out.append(dict(y=np.concatenate(ys), gx=np.concatenate(gxs),
                            gw=None if w is None else sum(gws) if gws else np.zeros_like(w),
                            gb=None if b is None else sum(gbs) if gbs else np.zeros_like(b),
                            state={k: None if v is None else v.copy() for k, v in state.items()}, count=count,
                            x=x_np, g=g_np, full=full, batch_stats=True, training=False, rv=state["running_var"], w=w,
                            local=[(FB.to_np(p["x"]), FB.to_np(p["g"]), p["full"]) for p in parts if p["x"].numel()]))
            continue
        xr, gr, fr = x_np, g_np, full
        if order is not None:
            xr, gr = x_np[order], g_np[order]
            fr = None if full is None else full[order]
        rm = state["running_mean"] if case["track"] else None
        rv = state["running_var"] if rm is not None else None
        kwargs = dict(axis=case["axis"], mask=fr if batch_stats else None, virtual_batch_size=virtual,
                      ghost_layout="contiguous", renorm_mean=state["renorm_mean"] if renorm else None,
                      renorm_stddev=state["renorm_stddev"] if renorm else None, renorm_clipping=clip,
                      adjustment=case["adjustment"] if training else None)
        grads = R.batch_norm_backward(gr, xr, None if rm is None else rm.copy(), None if rv is None else rv.copy(),
                                      w, b, batch_stats, case["eps"], **kwargs)
        rv_before = None if rv is None else rv.copy()
        y = R.batch_norm(xr, rm, rv, w, b, batch_stats, factor, case["eps"], unbiased_running_var=unbiased,
                         moving_stddev=state["moving_stddev"] if renorm else None,
                         renorm_momentum=case["renorm_momentum"], **kwargs)
        if bn.running_mean is not None and bn.running_mean.dtype in (torch.float16, torch.bfloat16):
            # (half-precision variables, Keras' "float16" policy: each updated statistic is rounded as it is stored,
            # and the next step's r and d are measured against the rounded values)
            for value in state.values():
                if value is not None:
                    value[...] = FB.to_np(torch.as_tensor(value).to(bn.running_mean.dtype))
        gx = grads[0]
        if order is not None:
            inverse = np.argsort(order)
            y, gx = y[inverse], gx[inverse]
        out.append(dict(y=y, gx=gx, gw=grads[1], gb=grads[2],
                        state={k: None if v is None else v.copy() for k, v in state.items()}, count=count,
                        x=xr, g=gr, full=fr, batch_stats=batch_stats, training=training, rv=rv_before, w=w))
    return out


def single_steps(case, steps):
    """The second derivatives (``case["double"]``) of one process's normkit.BatchNorm on the whole batch (ghost
    batches: in the reference's order, contiguous ghosts of V*P rows), per training step; None elsewhere."""
    single = dict(case)  # (late too: renorm switched on late starts from the running statistics)
    if case["virtual"] is not None:
        single.update(virtual=case["virtual"] * WORLD, layout="contiguous")
    layer, bn = build(single, synchronized=False)
    out = []
    for index, step in enumerate(steps):
        frozen = case["freeze_at"] is not None and index >= case["freeze_at"]
        parts = step["parts"]
        order = np.arange(sum(step["sizes"]))
        if step["train"] and not frozen and case["virtual"] is not None:
            order = ghost_order(step["sizes"], case["virtual"], case["layout"])
        order = torch.as_tensor(order, dtype=torch.int64)
        x = torch.cat([p["x"] for p in parts])[order]
        g = torch.cat([p["g"] for p in parts])[order]
        h = torch.cat([p["g"].flip(0) for p in parts])[order]
        mask = None
        if any(p["full"] is not None for p in parts):
            mask = torch.as_tensor(np.concatenate([np.ones(p["x"].shape, bool) if p["full"] is None else p["full"]
                                                   for p in parts]))[order]
        whole = dict(x=x, g=g, mask=mask, full=None)
        try:
            result = call(layer, bn, dict(single, double=True, memory="contiguous"), step, whole, frozen, h=h)
        except ValueError:  # (refused: the group refuses it too)
            out.append(None)
            continue
        if not (step["train"] and not frozen):
            out.append(None)
            continue
        inverse = torch.argsort(order)
        out.append(dict(gx=result["gx"][inverse], gw=result["gw"], gb=result["gb"]))
    return out


def tolerance_case(case):
    """The case as fuzz_batch_norm.conditioning reads it (ghost batches: the reference's contiguous V*P rows)."""
    return dict(axes=case["axes"], virtual=None if case["virtual"] is None else case["virtual"] * WORLD,
                layout="contiguous", eps=case["eps"])


def compare(case, steps, results):
    """Each process's results against the reference on the whole batch."""
    expected = reference_steps(case, steps)
    second = single_steps(case, steps) if case.get("double") else None
    for index, want in enumerate(expected):
        step = steps[index]
        where = f"step {index} ({'train' if step['train'] else 'eval'}, sizes {step['sizes']})"
        got = [r[index] if index < len(r) else "missing" for r in results]
        if want == "refuse":
            for rank, g in enumerate(got):
                assert isinstance(g, str) and g.startswith("ValueError") and "more than 1 value" in g, \
                    f"{where}: process {rank} did not refuse one value per feature over the group: {str(g)[:300]}"
            continue
        if isinstance(want, tuple):
            for rank in want[1]:
                g = got[rank]
                assert isinstance(g, str) and g.startswith("ValueError") and "more than 1 value" in g, \
                    f"{where}: process {rank} did not refuse its one value per feature: {str(g)[:300]}"
            continue
        for rank, g in enumerate(got):
            assert not isinstance(g, str), f"{where}: process {rank} raised {g}"
        compute = got[0]["dtype"]
        assert all(g["dtype"] == compute for g in got)
        # (eval without running statistics: each process's own batch, whose conditioning is its own)
        pieces = want.get("local") or ([(want["x"], want["g"], want["full"])] if want["x"].size else [])
        e_y, e_g, e_w, e_s = (np.max([FB.extras(x, g, full, tolerance_case(case), want["training"],
                                                want["batch_stats"], want["rv"], want["w"], compute)
                                      for x, g, full in pieces], axis=0) if pieces else (0.0,) * 4)
        FB.close(f"{where} output", torch.cat([g["y"] for g in got]), want["y"], compute, e_y)
        if second is not None:  # (the gradients are second derivatives: one process's normkit.BatchNorm's)
            if second[index] is not None:
                want = dict(want, **{key: FB.to_np(value) for key, value in second[index].items()})
            else:
                want = dict(want, gx=None, gw=None, gb=None)
        if want["gx"] is not None:
            FB.close(f"{where} input grad", torch.cat([g["gx"] for g in got]), want["gx"], compute, e_g)
        for key, extra in (("gw", e_w), ("gb", 0.0)):
            if second is not None and want["gx"] is None:
                continue
            present = [g[key] is not None for g in got]
            assert len(set(present)) == 1, f"{where}: {key} on some processes only"
            if present[0]:
                total = sum(g[key].double() for g in got)
                # (each process's gradient is rounded to the parameters' dtype before the sum, which may cancel:
                # their own magnitudes set the rounding, as in DDP's all_reduce)
                extra += FB.REL[got[0][key].dtype] * sum(float(piece[key].double().abs().max()) for piece in got)
                FB.close(f"{where} {key} (summed)", total, want[key], compute, extra)
        for rank, g in enumerate(got):
            for name in BUFFERS:
                value = want["state"][name]
                if value is not None:
                    extra = e_s * float(np.abs(value).max()) if value.size else 0.0
                    FB.close(f"{where} process {rank} {name}", g[name], value, compute, extra)
            if case["track"]:
                assert int(g["num_batches_tracked"]) == want["count"], \
                    f"{where}: process {rank} count {int(g['num_batches_tracked'])} vs {want['count']}"
        if want["training"]:  # (one merge, the same numbers: every process holds the same bits)
            for name in BUFFERS:
                if got[0][name] is not None:
                    assert all(torch.equal(g[name], got[0][name]) for g in got), f"{where}: {name} differs"
    for rank, r in enumerate(results):
        assert len(r) == len(expected), f"process {rank} ran {len(r)} steps, expected {len(expected)}"


# ----------------------------------------------------------------------------- invalid: processes that disagree

INVALID_KINDS = ("features", "dtype", "ghost_divisible", "ghost_count", "ghost_empty", "mask_shape", "keras_rank",
                 "features_tuple", "features_transposed", "ghost_one_side",
                 "adjustment_fit", "keras_mask_ragged", "keras_mask_fit", "keras_mask_dim", "mask_ragged",
                 "lazy_mask", "lazy_rank", "lazy_integer", "keras_build_features")


def invalid_call(kind, rank, seed):
    """One synchronized training call where process 1 (``bad``) differs from process 0."""
    bad = rank == 1
    torch.manual_seed(seed + rank)
    f = 3
    if kind == "features":
        layer = normkit.BatchNorm(f + bad, synchronized=True).double()
        return lambda: layer(torch.randn(4, f + bad, 2, dtype=torch.float64)).sum().backward()
    if kind == "features_tuple":
        layer = normkit.BatchNorm((f, 2), axis=(1, 2), synchronized=True).double()
        return lambda: layer(torch.randn(4, f, 2 + bad, dtype=torch.float64)).sum().backward()
    if kind == "features_transposed":  # (as many features, another shape)
        shape = (2, f) if bad else (f, 2)
        layer = normkit.BatchNorm(shape, axis=(1, 2), synchronized=True).double()
        return lambda: layer(torch.randn(4, *shape, dtype=torch.float64)).sum().backward()
    if kind == "ghost_one_side":  # (one ghost batch on one process, none asked for on the other)
        layer = normkit.BatchNorm(f, virtual_batch_size=None if bad else 4, synchronized=True).double()
        return lambda: layer(torch.randn(4, f, dtype=torch.float64)).sum().backward()
    if kind == "adjustment_fit":  # (terms of a fixed batch size: they fit one process's batch, not the other's)
        terms = (torch.full((4, f), 1.5, dtype=torch.float64), torch.zeros(4, f, dtype=torch.float64))
        layer = normkit.BatchNorm(f, adjustment=lambda shape: terms, synchronized=True).double()
        return lambda: layer(torch.randn(4 + bad, f, dtype=torch.float64)).sum().backward()
    if kind in ("keras_mask_ragged", "keras_mask_fit", "keras_mask_dim"):  # (process 1's mask is refused)
        layer = normkit.keras.BatchNormalization(axis=-1, synchronized=True)
        layer.build((None, 2, f))
        good = torch.ones(4, 2, dtype=torch.bool)
        bad_mask = {"keras_mask_ragged": [[1, 0], [1]], "keras_mask_fit": torch.ones(4, 3, dtype=torch.bool),
                    "keras_mask_dim": torch.ones(4, dtype=torch.bool)}[kind]
        return lambda: layer(torch.randn(4, 2, f), training=True, mask=bad_mask if bad else good).sum().backward()
    if kind == "keras_build_features":  # (unbuilt: each process's first call builds on its own input)
        layer = normkit.keras.BatchNormalization(axis=-1, synchronized=True)
        return lambda: layer(torch.randn(4, 2, f + bad), training=True).sum().backward()
    if kind == "mask_ragged":
        layer = normkit.BatchNorm(f, synchronized=True).double()
        return lambda: layer(torch.randn(2, f, 2, dtype=torch.float64),
                             mask=[[1, 0], [1]] if bad else [[1, 0], [1, 1]]).sum().backward()
    if kind in ("lazy_mask", "lazy_rank", "lazy_integer"):  # (a lazy layer's first call, refused on process 1)
        layer = normkit.LazyBatchNorm1d(synchronized=True).double()
        x = torch.randn(4, f, 2, dtype=torch.float64)
        mask = torch.ones(4, 2 + (bad and kind == "lazy_mask"), dtype=torch.bool)
        if bad and kind == "lazy_rank":
            x = x[..., None, None]
        if bad and kind == "lazy_integer":
            x = x.long()
        return lambda: layer(x, mask=mask).sum().backward()
    if kind == "dtype":
        layer = normkit.BatchNorm(f, synchronized=True)
        dtype = torch.float64 if bad else torch.float32
        layer = layer.to(dtype)
        return lambda: layer(torch.randn(4, f, dtype=dtype)).sum().backward()
    if kind == "ghost_divisible":
        layer = normkit.BatchNorm(f, virtual_batch_size=2, synchronized=True).double()
        return lambda: layer(torch.randn(4 + bad, f, dtype=torch.float64)).sum().backward()
    if kind == "ghost_count":
        layer = normkit.BatchNorm(f, virtual_batch_size=2, synchronized=True).double()
        return lambda: layer(torch.randn(4 + 2 * bad, f, dtype=torch.float64)).sum().backward()
    if kind == "ghost_empty":
        layer = normkit.BatchNorm(f, virtual_batch_size=2, synchronized=True).double()
        return lambda: layer(torch.randn(0 if bad else 4, f, dtype=torch.float64)).sum().backward()
    if kind == "mask_shape":
        layer = normkit.BatchNorm(f, synchronized=True).double()
        return lambda: layer(torch.randn(4, f, 3, dtype=torch.float64),
                             mask=torch.ones(4, 3 + bad, dtype=torch.bool)).sum().backward()
    if kind == "keras_rank":
        layer = normkit.keras.BatchNormalization(axis=-1, synchronized=True)
        layer.build((None, 2, f))
        return lambda: layer(torch.randn(4, *((2,) if not bad else ()), f), training=True).sum().backward()
    raise AssertionError(kind)


def run_invalid_local(case, rank):
    errors = []
    for kind in case["kinds"]:
        try:
            invalid_call(kind, rank, case["seed"])()
            errors.append(None)
        except Exception as error:  # noqa: BLE001
            errors.append(f"{type(error).__name__}: {error}")
    # then a valid step: the collectives must still pair
    valid = dict(case["after"])
    return errors, run_local(valid, make_steps(valid), rank)


def check_invalid(case, steps, results):
    for index, kind in enumerate(case["kinds"]):
        for rank, (errors, _) in enumerate(results):
            error = errors[index]
            assert error is not None, f"{kind}: process {rank} raised nothing"
            assert error.startswith(("ValueError", "TypeError")), f"{kind}: process {rank}: {error[:400]}"
            assert "Timeout" not in error and "timed out" not in error.lower(), f"{kind}: process {rank}: {error}"
    compare(case["after"], steps, [r[1] for r in results])


# ----------------------------------------------------------------------------- the processes


def worker(rank, init_file, args):
    global WORLD
    WORLD = args.world
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=args.timeout))
    torch.set_num_threads(1)
    GROUP.append(dist.new_group(list(range(WORLD))))
    try:
        if rank == 0:
            code = leader(args)
            box = [None]
            dist.broadcast_object_list(box, src=0)
        else:
            code = follower(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if code:
        sys.exit(code)


def exchange(message):
    """Process 0 sends ``message`` (the example) to every process, runs its own part and gathers everyone's."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    mine = execute(box[0], dist.get_rank())
    gathered = [None] * WORLD
    dist.gather_object(mine, gathered if dist.get_rank() == 0 else None, dst=0)
    return gathered


def execute(message, rank):
    kind, case, steps = message
    if kind == "invalid":
        return run_invalid_local(case, rank)
    return run_local(case, steps, rank)


def follower(rank):
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return 0
        mine = execute(box[0], rank)
        dist.gather_object(mine, None, dst=0)


@st.composite
def invalid_cases(draw):
    kinds = draw(st.lists(st.sampled_from(INVALID_KINDS), min_size=1, max_size=3))
    after = draw(sync_cases(("float64",)))
    return dict(kinds=kinds, seed=draw(st.integers(0, 2 ** 20)), after=after)


def leader(args):
    dtypes = tuple(args.dtypes.split(","))
    counter = {"n": 0}

    def check_one(case):
        counter["n"] += 1
        counter["case"] = case
        if args.family == "invalid":
            steps = make_steps(case["after"])
            check_invalid(case, steps, exchange(("invalid", case, None)))
        else:
            steps = make_steps(case)
            compare(case, steps, exchange(("valid", case, steps)))

    if args.replay:
        case = eval(args.replay, {"Adjustment": FB.Adjustment, "Ramp": FB.Ramp, "nan": math.nan, "inf": math.inf})
        try:
            check_one(case)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            return 1
        print("replayed: OK")
        return 0
    run = settings(max_examples=args.examples, deadline=None, derandomize=False, database=None,
                   suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    strategy = (invalid_cases() if args.family == "invalid" else
                sync_cases(dtypes, keras=args.family == "keras", big=args.big))

    @run
    @given(strategy)
    def fuzz(case):
        check_one(case)

    start = time.monotonic()
    try:
        fuzz()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("CASE", repr(counter.get("case")))
        print(f"FAILED after {counter['n']} examples ({args.family})", flush=True)
        return 1
    print(f"OK: {counter['n']} examples ({args.family}, {time.monotonic() - start:.0f} s)", flush=True)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["module", "keras", "invalid"], required=True)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--dtypes", default="float64,float64,float64,float32,float16,bfloat16")
    parser.add_argument("--big", action="store_true", help="larger local batches (up to 33 rows) and feature sizes")
    parser.add_argument("--timeout", type=float, default=60.0, help="the group's collective timeout (s)")
    parser.add_argument("--replay", help="a CASE line printed by a failure: run that example alone")
    parser.add_argument("--world", type=int, default=2, help="the number of processes (a hunt ran 3 too)")
    args = parser.parse_args()
    global WORLD
    WORLD = args.world
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(worker, args=(os.path.join(folder, "store"), args), nprocs=WORLD, join=False,
                                     start_method="spawn")
        try:
            while not context.join():
                pass
        except Exception as error:  # noqa: BLE001 (a process failed: end the other, by its own handle)
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            print(f"FAILED: {error}")
            sys.exit(1)


if __name__ == "__main__":
    main()
