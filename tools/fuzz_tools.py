"""Differential fuzzer of the model-surgery tools (fold_batch_norm, convert_batch_norm, freeze_batch_norm) on random models: local, not CI.

tests/test_tools.py checks hand-picked models; this draws random small ones: Sequentials (flat, nested, inside a
module, a Sequential subclass with its own forward) of Conv1d/2d/3d (groups, dilation, stride, padding and padding
modes, bias on/off), ConvTranspose1d/2d (groups, stride, output_padding) and Linear (bias on/off, (N, F) or
features-last (N, L, F) inputs), each followed or not by a BN: torch.nn BatchNorm1d/2d/3d, normkit BatchNorm1d/2d/3d,
plain normkit.BatchNorm (axis 1, or axis -1 after a Linear on features-last inputs, some with renorm, ghost batches
or a biased running variance), normkit.keras.BatchNormalization (axis 1 or -1, built by the training steps), affine
on/off, track_running_stats on/off. Some BNs must not fold: after a ReLU, after a conv used at two places, a shared
BN, a conv whose output also feeds a residual sum, a conv wrapped in its own Sequential. Models are trained a few
steps (non-trivial running statistics), then put in eval mode; float32 or float64, channels_last inputs.

Oracles, per example:
  fold     the folded model's output equals the model's own eval output (float64: 1e-10 of the output's largest
           magnitude; float32: FLOAT32_TOL of it); the folded names are
           exactly those the documented rules give (docs/tools.md, "fold_batch_norm"); the input model is unchanged
           (same module types, same state_dict values, same eval output); no folded name holds a BN.
  torch    the model converted to torch.nn (when docs/tools.md says it converts; otherwise a ValueError and nothing
           changed) computes the same eval output; its state_dict loads into a freshly drawn model of the same shape
           built with torch.nn layers, and converted back to normkit, into one built with normkit layers: the same
           outputs, identical.
  freeze   converted to normkit and frozen, the model's train()-mode output equals its eval output, and a train()
           forward pass changes no buffer.

Not derandomized: every run draws new examples. Run niced (the machine is shared):

    PYTHONPATH=src nice -n 10 python tools/fuzz_tools.py --examples 300 [--family conv2d]

A failure prints ``CASE = {...}``; ``--replay "{...}"`` runs that case alone.
"""

from __future__ import annotations

import argparse
import copy
import sys
import traceback

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import normkit
import normkit.keras
from normkit import convert_batch_norm, fold_batch_norm, freeze_batch_norm

FAMILIES = ("conv1d", "conv2d", "conv3d", "convT1d", "convT2d", "convT3d", "linear", "linear_last")
STATS = {"folded": 0, "kept": 0, "float32": 0, "convertible": 0, "frozen": 0, "lazy": 0}
FLOAT32_TOL = 1e-4  # float32: of the output's largest magnitude (at least 1): the folded weights round differently
SPATIAL = {"conv1d": 1, "conv2d": 2, "conv3d": 3, "convT1d": 1, "convT2d": 2, "convT3d": 3, "linear": 0, "linear_last": 0}
BN_TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
BN_NORMKIT = {1: normkit.BatchNorm1d, 2: normkit.BatchNorm2d, 3: normkit.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
LAZY_CONV = {1: nn.LazyConv1d, 2: nn.LazyConv2d, 3: nn.LazyConv3d}
LAZY_CONVT = {1: nn.LazyConvTranspose1d, 2: nn.LazyConvTranspose2d, 3: nn.LazyConvTranspose3d}
LAZY_BN = {"torch": {1: nn.LazyBatchNorm1d, 2: nn.LazyBatchNorm2d, 3: nn.LazyBatchNorm3d},
           "normkit_nd": {1: normkit.LazyBatchNorm1d, 2: normkit.LazyBatchNorm2d, 3: normkit.LazyBatchNorm3d}}


class Residual(nn.Module):
    """layer's output feeds the BN and a sum: the BN must not fold (not a Sequential)."""

    def __init__(self, layer, bn):
        super().__init__()
        self.layer, self.bn = layer, bn

    def forward(self, x):
        y = self.layer(x)
        return self.bn(y) + y


class ResidualSequential(nn.Sequential):
    """A Sequential subclass with its own forward: the conv's output is used twice, the BN must not fold."""

    def forward(self, x):
        y = self[0](x)
        return self[1](y) + y


class Net(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


# ----------------------------------------------------------------------------- strategies


@st.composite
def bn_spec(draw, family, last):
    if last:
        lib = draw(st.sampled_from(["normkit_last", "keras_last", "none", "keras_axis1"]))
    else:
        lib = draw(st.sampled_from(["torch", "normkit_nd", "normkit_plain", "keras", "none", "sync"]
                                   + (["normkit_last", "keras_last"] if family == "linear" else [])))
    spec = {"lib": lib, "affine": draw(st.booleans()), "bias": draw(st.booleans()), "track": draw(st.booleans()),
            "momentum": draw(st.sampled_from([0.1, 0.5, 0.9, None])), "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
            "option": draw(st.sampled_from([None, None, "renorm", "ghost", "biased"]))}
    if lib.startswith("keras"):
        spec["track"] = True
        spec["momentum"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
        spec["policy"] = draw(st.sampled_from(["same", "same", None, "float32", "float64", "mixed_float16", "float16",
                                               "mixed_bfloat16"]))
    return spec


@st.composite
def case_strategy(draw, families=FAMILIES):
    family = draw(st.sampled_from(families))
    d = SPATIAL[family]
    last = family == "linear_last"
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        if family.startswith("linear"):
            layer = {"kind": "linear", "out": draw(st.integers(1, 6)), "bias": draw(st.booleans())}
        else:
            transpose = family.startswith("convT") or (d < 3 and draw(st.integers(0, 3)) == 0)
            stride = draw(st.integers(1, 2))
            dilation = draw(st.integers(1, 2))
            layer = {"kind": "convT" if transpose else "conv", "groups": draw(st.sampled_from([1, 1, 2, 3])),
                     "per_group": draw(st.integers(1, 3)), "k": draw(st.integers(1, 3)), "stride": stride,
                     "dilation": dilation, "padding": draw(st.integers(0, 2)), "bias": draw(st.booleans()),
                     "padding_mode": "zeros" if transpose else draw(st.sampled_from(
                         ["zeros", "zeros", "reflect", "replicate", "circular"])),
                     "output_padding": draw(st.integers(0, max(stride, dilation) - 1)) if transpose else 0}
        wrap = draw(st.sampled_from(["flat", "flat", "nested", "split", "relu", "residual", "residual_seq",
                                     "shared_layer", "shared_bn", "tied", "hooked_layer", "hooked_bn",
                                     "weight_norm", "pre_hooked_bn"]))
        blocks.append({"layer": layer, "bn": draw(bn_spec(family, last)), "wrap": wrap})
    groups_in = [b["layer"].get("groups", 1) for b in blocks[:1]]
    in_ch = groups_in[0] * draw(st.integers(1, 3))
    return {"family": family, "dtype": draw(st.sampled_from(["float64", "float32"])),
            "channels_last": draw(st.booleans()) and d in (2, 3), "in_ch": in_ch,
            "size": draw(st.integers(4, 8)) if d < 3 else draw(st.integers(3, 5)), "length": draw(st.integers(1, 4)),
            "outer": draw(st.sampled_from(["seq", "net"])), "blocks": blocks, "seed": draw(st.integers(0, 2 ** 31 - 1)),
            "steps": draw(st.integers(1, 4)), "batch": draw(st.sampled_from([4, 8]))}


# ----------------------------------------------------------------------------- model building


class Invalid(Exception):
    """The drawn case cannot be built (shapes): rejected, not a failure."""


def watch(module, *args):
    """A hook that only watches."""
    return None


def make_layer(spec, family, in_ch, dtype):
    d = SPATIAL[family]
    if spec["kind"] == "linear":
        return nn.Linear(in_ch, spec["out"], bias=spec["bias"], dtype=dtype), spec["out"]
    groups = spec["groups"]
    if in_ch % groups:
        groups = 1
    out = groups * spec["per_group"]
    try:
        if spec["kind"] == "conv":
            layer = CONV[d](in_ch, out, spec["k"], stride=spec["stride"], padding=spec["padding"],
                            dilation=spec["dilation"], groups=groups, bias=spec["bias"],
                            padding_mode=spec["padding_mode"], dtype=dtype)
        else:
            layer = CONVT[d](in_ch, out, spec["k"], stride=spec["stride"], padding=spec["padding"],
                             output_padding=spec["output_padding"], dilation=spec["dilation"], groups=groups,
                             bias=spec["bias"], dtype=dtype)
    except (ValueError, RuntimeError) as error:
        raise Invalid(str(error))
    return layer, out


def make_bn(spec, family, channels, dtype, lib=None):
    """(module, foldable by the documented rules if directly after a conv/linear, convertible to torch.nn)."""
    lib = lib or spec["lib"]
    d = max(SPATIAL[family], 1)
    if lib == "none":
        return None, False, True
    kw = dict(eps=spec["eps"], momentum=spec["momentum"], affine=spec["affine"], track_running_stats=spec["track"],
              dtype=dtype)
    convertible = True
    if lib == "torch":
        bn = BN_TORCH[d](channels, bias=spec["bias"], **kw)
    elif lib == "sync":  # (plain BN on the CPU without torch.distributed)
        bn = nn.SyncBatchNorm(channels, bias=spec["bias"], **kw)
    elif lib.startswith("normkit"):
        extra = {}
        if spec["option"] == "renorm" and spec["track"]:
            extra = {"renorm": True}
        elif spec["option"] == "ghost":
            extra = {"virtual_batch_size": 2}
        elif spec["option"] == "biased" and spec["track"]:
            extra = {"unbiased_running_var": False}
        convertible = not extra
        if lib == "normkit_nd":
            bn = BN_NORMKIT[d](channels, bias=spec["bias"], **kw, **extra)
        elif lib == "normkit_plain":
            bn = normkit.BatchNorm(channels, bias=spec["bias"], **kw, **extra)
        else:
            bn = normkit.BatchNorm(channels, bias=spec["bias"], axis=-1, **kw, **extra)
            convertible = False
    else:
        bn = normkit.keras.BatchNormalization(axis=1 if lib in ("keras", "keras_axis1") else -1, momentum=spec["momentum"],
                                              epsilon=spec["eps"], center=spec["bias"], scale=spec["affine"],
                                              dtype=dtype if spec.get("policy", "same") == "same" else spec["policy"])
        convertible = False
        # A Keras layer whose policy casts its output (float64 after a float32 layer, ...) must stay: the documented
        # rule, checked here on a probe layer of the same settings (eval output dtype for an input of the model's)
        probe = normkit.keras.BatchNormalization(axis=bn.axis, dtype=bn.dtype_policy if hasattr(bn, "dtype_policy")
                                                 else (dtype if spec.get("policy", "same") == "same" else spec["policy"]))
        with torch.no_grad():
            probe(torch.randn(4, channels, dtype=dtype))
            same_dtype = probe.eval()(torch.randn(4, channels, dtype=dtype)).dtype == dtype
        # (axis 1 over (N, L, F) Linear outputs normalizes L, not the Linear's outputs: documented to stay)
        return bn, spec["track"] and same_dtype and lib != "keras_axis1", convertible
    return bn, spec["track"], convertible


def build(case, libs=None, seed=None):
    """(model, expected folded names, convertible, plain_as). libs: the BN library per block, replacing the case's
    (to build the same model with torch.nn or normkit layers); seed: the weights' seed (default the case's)."""
    torch.manual_seed(case["seed"] if seed is None else seed)
    dtype = getattr(torch, case["dtype"])
    family = case["family"]
    items, expected, convertible = [], [], True
    channels = case["in_ch"]
    example = example_input(case, dtype)
    for index, block in enumerate(case["blocks"]):
        layer, out = make_layer(block["layer"], family, channels, dtype)
        lib = libs[index] if libs else None
        bn, foldable, conv_ok = make_bn(block["bn"], family, out, dtype, lib)
        convertible &= conv_ok
        wrap = block["wrap"]
        if bn is None and wrap in ("residual", "residual_seq", "shared_bn"):
            wrap = "flat"
        position = len(items)
        if wrap == "flat":
            items += [layer] + ([bn] if bn is not None else [])
            if foldable and bn is not None:
                expected.append(str(position + 1))
        elif wrap == "nested":
            items.append(nn.Sequential(layer, *([bn] if bn is not None else [])))
            if foldable and bn is not None:
                expected.append(f"{position}.1")
        elif wrap == "split":
            items += [nn.Sequential(layer)] + ([bn] if bn is not None else [])
        elif wrap == "relu":
            items += [layer, nn.ReLU()] + ([bn] if bn is not None else [])
        elif wrap == "residual":
            items.append(Residual(layer, bn))
        elif wrap == "residual_seq":
            items.append(ResidualSequential(layer, bn))
        elif wrap == "shared_layer":
            # layer, bn, then the same layer again (if shapes allow: a square one) with a fresh BN
            items += [layer] + ([bn] if bn is not None else [])
            if out == channels and shape_after(nn.Sequential(*items), example) is not None:
                probe = nn.Sequential(*items, layer)
                if shape_after(probe, example) == shape_after(nn.Sequential(*items), example):
                    second, _, ok2 = make_bn(block["bn"], family, out, dtype, lib)
                    convertible &= ok2
                    items += [layer] + ([second] if second is not None else [])
                elif foldable and bn is not None:
                    expected.append(str(position + 1))
            elif foldable and bn is not None:
                expected.append(str(position + 1))
        elif wrap in ("hooked_layer", "hooked_bn", "pre_hooked_bn", "weight_norm"):
            # a watching hook, or a weight recomputed each call: documented to stay
            if wrap == "hooked_layer":
                layer.register_forward_hook(watch)
            elif wrap == "weight_norm":
                nn.utils.parametrizations.weight_norm(layer)
            elif bn is not None:
                (bn.register_forward_pre_hook if wrap == "pre_hooked_bn" else bn.register_forward_hook)(watch)
            items += [layer] + ([bn] if bn is not None else [])
        elif wrap == "tied":
            # layer, bn, then a twin layer whose weight (or bias) is the first one's Parameter: neither BN folds
            items += [layer] + ([bn] if bn is not None else [])
            if out == channels and shape_after(nn.Sequential(*items), example) is not None:
                twin = copy.deepcopy(layer)
                if block["layer"].get("bias") and index % 2:
                    twin.bias = layer.bias
                else:
                    twin.weight = layer.weight
                second, _, ok2 = make_bn(block["bn"], family, out, dtype, lib)
                convertible &= ok2
                items += [twin] + ([second] if second is not None else [])
            elif foldable and bn is not None:
                expected.append(str(position + 1))
        elif wrap == "shared_bn":
            items += [layer, bn]
            # the same BN again after a fresh layer of out -> out channels: neither place folds
            again, _ = make_layer({**block["layer"], "groups": 1, "per_group": out, "out": out}, family, out, dtype)
            items += [again, bn]
        shape = shape_after(nn.Sequential(*items), example)
        if shape is None:
            raise Invalid("shapes")
        channels = out
    body = nn.Sequential(*items)
    if case["outer"] == "net":
        return Net(body), [f"body.{name}" for name in expected], convertible
    return body, expected, convertible


def layout(model, case):
    """channels_last cases: the weights too (their layout changes the float sums' order, so compared models share it)."""
    if case["channels_last"]:
        model.to(memory_format=torch.channels_last if SPATIAL[case["family"]] == 2 else torch.channels_last_3d)
    return model


def lazy_twin(model, case):
    """The model rebuilt from torch's and normkit's lazy layers (same settings), or None where it has no lazy twin
    (Keras layers, BN options, shared or tied modules). Sized by a loaded state_dict, it must fold as the model does."""
    if any(b["wrap"] in ("shared_layer", "shared_bn", "tied", "hooked_layer", "hooked_bn", "pre_hooked_bn",
                         "weight_norm") for b in case["blocks"]):
        return None
    d = max(SPATIAL[case["family"]], 1)
    dtype = getattr(torch, case["dtype"])
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        kind = type(module)
        if kind in CONV.values():
            new = LAZY_CONV[d](module.out_channels, module.kernel_size, module.stride, module.padding, module.dilation,
                               module.groups, module.bias is not None, module.padding_mode, dtype=dtype)
        elif kind in CONVT.values():
            new = LAZY_CONVT[d](module.out_channels, module.kernel_size, module.stride, module.padding,
                                module.output_padding, module.groups, module.bias is not None, module.dilation,
                                dtype=dtype)
        elif kind is nn.Linear:
            new = nn.LazyLinear(module.out_features, module.bias is not None, dtype=dtype)
        elif kind in BN_TORCH.values():
            new = LAZY_BN["torch"][d](module.eps, module.momentum, module.affine, module.track_running_stats,
                                      dtype=dtype, bias=module.bias is not None or not module.affine)
        elif kind in BN_NORMKIT.values() or kind is normkit.BatchNorm:
            if (module.axis != 1 or module.renorm or module.virtual_batch_size
                                               or not module.unbiased_running_var):
                return None
            cls = LAZY_BN["normkit_nd"][d] if kind is not normkit.BatchNorm else normkit.LazyBatchNorm
            new = cls(module.eps, module.momentum, module.affine, module.track_running_stats, dtype=dtype,
                      bias=module.bias is not None or not module.affine)
        elif kind is normkit.keras.BatchNormalization:
            return None
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, new.train(module.training))
    return twin


def shape_after(model, x):
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            # (Keras layers build on their first call; build on a copy so the probe does not set anything)
            y = copy.deepcopy(model)(x)
            model.train(was)
        return tuple(y.shape) if all(s > 0 for s in y.shape) else None
    except (RuntimeError, ValueError) as error:
        if "Expected more than 1 value" in str(error):
            return None
        return None


def example_input(case, dtype, batch=None, scale=1.0, shift=0.0, generator=None):
    d = SPATIAL[case["family"]]
    n = batch or case["batch"]
    if case["family"] == "linear":
        shape = (n, case["in_ch"])
    elif case["family"] == "linear_last":
        shape = (n, case["length"], case["in_ch"])
    else:
        shape = (n, case["in_ch"]) + (case["size"],) * d
    x = torch.randn(*shape, dtype=dtype, generator=generator) * scale + shift
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last if d == 2 else torch.channels_last_3d)
    return x


def train_and_eval(model, case, dtype):
    """Random affine parameters, a few training steps (running statistics move), then eval."""
    g = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():
        model.train()(example_input(case, dtype, generator=g))  # (builds the Keras layers)
        layout(model, case)
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5
                    + (1.0 if name.endswith("weight") and p.dim() == 1 else 0.0))
        model.train()
        for _ in range(case["steps"]):
            model(example_input(case, dtype, scale=2.0, shift=1.5, generator=g))
    return model.eval()


def perturb(model, seed):
    """Other values in every parameter and buffer (so that a load_state_dict has something to overwrite)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype) + 0.5)
    return model


# ----------------------------------------------------------------------------- checks


def tol(case, expected):
    """Absolute tolerance: float64 1e-10 of the largest output magnitude (at least 1); float32 FLOAT32_TOL of it."""
    scale = max(1.0, expected.abs().max().item())
    if case["dtype"] == "float64":
        return 1e-10 * scale
    return FLOAT32_TOL * scale


def assert_close(name, got, want, atol, case):
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
    err = (got.double() - want.double()).abs().max().item()
    if not err <= atol:
        raise AssertionError(f"{name}: max abs error {err:.3g} > {atol:.3g}")


def bn_names(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, normkit.BatchNorm, normkit.keras.BatchNormalization))]


def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def same_snapshot(a, b):
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def run_case(case):
    dtype = getattr(torch, case["dtype"])
    try:
        model, expected_names, convertible = build(case)
    except Invalid:
        return "invalid"
    try:
        train_and_eval(model, case, dtype)
    except (RuntimeError, ValueError) as error:
        if "Expected more than 1 value" in str(error) or "virtual_batch_size" in str(error):
            return "invalid"
        raise
    x = example_input(case, dtype, batch=5 if case["batch"] == 4 else 6, scale=2.0, shift=1.0,
                      generator=torch.Generator().manual_seed(case["seed"] + 2))
    with torch.no_grad():
        want = model(x)
    before = snapshot(model)
    atol = tol(case, want)

    # fold
    folded, names = fold_batch_norm(model)
    STATS["folded"] += len(names)
    STATS["kept"] += len(bn_names(folded))
    STATS["float32"] += case["dtype"] == "float32"
    STATS["convertible"] += convertible
    assert sorted(names) == sorted(expected_names), f"folded {names}, documented rules give {expected_names}"
    assert same_snapshot(before, snapshot(model)), "fold_batch_norm changed its input model"
    for name in names:
        assert isinstance(folded.get_submodule(name), nn.Identity), name
    with torch.no_grad():
        assert_close("folded output", folded(x), want, atol, case)
        assert_close("input model after fold", model(x), want, 0.0, case)
    assert not folded.training

    # inplace: the same names and function, on the model itself
    other = copy.deepcopy(model)
    folded_inplace, names_inplace = fold_batch_norm(other, inplace=True)
    assert folded_inplace is other and names_inplace == names, f"inplace folded {names_inplace}, copy {names}"
    with torch.no_grad():
        assert_close("folded inplace", folded_inplace(x), folded(x), 0.0, case)

    # a lazy twin sized by the model's state_dict folds the same layers to the same function
    lazy = lazy_twin(model, case)
    if lazy is not None:
        STATS["lazy"] += 1
        lazy.load_state_dict(model.state_dict())
        lazy.eval()
        layout(lazy, case)
        folded_lazy, names_lazy = fold_batch_norm(lazy)
        assert sorted(names_lazy) == sorted(expected_names), f"lazy twin: folded {names_lazy}"
        with torch.no_grad():
            assert_close("lazy twin folded", folded_lazy(x), want, atol, case)
            assert_close("lazy twin", lazy(x), want, 0.0, case)

    # torch.nn equivalent (convert to torch, state_dict round trips both ways)
    d = max(SPATIAL[case["family"]], 1)
    as_torch = copy.deepcopy(model)
    snap = snapshot(as_torch)
    if not convertible:
        try:
            convert_batch_norm(as_torch, "torch", plain_as=BN_TORCH[d])
        except ValueError:
            assert same_snapshot(snap, snapshot(as_torch)), "a refused conversion changed the model"
        else:
            raise AssertionError("convert_batch_norm to torch did not refuse an unconvertible model")
    else:
        as_torch = convert_batch_norm(as_torch, "torch", plain_as=BN_TORCH[d])
        assert not any(isinstance(m, normkit.BatchNorm) for m in as_torch.modules())
        with torch.no_grad():
            # (another library's BN: the same function, float rounding of its own; identical within a library)
            torch_out = as_torch(x)
            assert_close("torch.nn model", torch_out, want, atol, case)
        libs = [("none" if b["bn"]["lib"] == "none" else "torch") for b in case["blocks"]]
        fresh, _, _ = build(case, libs=libs, seed=case["seed"] + 7)
        layout(perturb(fresh, case["seed"] + 8).eval(), case)
        fresh.load_state_dict(as_torch.state_dict())
        with torch.no_grad():
            assert_close("fresh torch.nn model + state_dict", fresh(x), torch_out, 0.0, case)
        back = convert_batch_norm(copy.deepcopy(as_torch), "normkit")
        libs = [("none" if b["bn"]["lib"] == "none" else "normkit_nd") for b in case["blocks"]]
        fresh_nk, _, _ = build(case, libs=libs, seed=case["seed"] + 9)
        layout(perturb(fresh_nk, case["seed"] + 10).eval(), case)
        fresh_nk.load_state_dict(back.state_dict())
        with torch.no_grad():
            back_out = back(x)
            assert_close("back to normkit", back_out, want, atol, case)
            assert_close("fresh normkit model + state_dict", fresh_nk(x), back_out, 0.0, case)
        # and the original model's state_dict straight into a torch.nn one
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert_close("original state_dict into torch.nn model", fresh(x), torch_out, 0.0, case)

    # freeze
    frozen = convert_batch_norm(copy.deepcopy(model), "normkit")
    if bn_names(frozen):
        freeze_batch_norm(frozen)
        STATS["frozen"] += 1
        with torch.no_grad():
            eval_out = frozen.eval()(x)
            assert_close("frozen eval", eval_out, want, atol, case)  # (torch.nn layers became normkit's)
            buffers = {k: v.clone() for k, v in frozen.state_dict().items()}
            frozen.train()
            train_out = frozen(x)
            frozen(example_input(case, dtype, scale=3.0, shift=-1.0))
        assert_close("frozen train() output vs eval", train_out, eval_out, 0.0, case)
        after = frozen.state_dict()
        changed = [k for k in buffers if not torch.equal(buffers[k], after[k])]
        assert not changed, f"frozen model's train() pass changed {changed}"
        # a frozen model folds to the same function
        frozen.eval()
        folded_frozen, names_frozen = fold_batch_norm(frozen)
        assert sorted(names_frozen) == sorted(expected_names), f"frozen: folded {names_frozen}"
        with torch.no_grad():
            assert_close("folded frozen output", folded_frozen(x), want, atol, case)
    return "ok"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--family", choices=FAMILIES, action="append")
    parser.add_argument("--replay", help="a CASE dict printed by a failure: run that case alone")
    args = parser.parse_args()
    if args.replay:
        case = eval(args.replay, {"None": None})
        print(run_case(case))
        return
    counts = {}

    @settings(max_examples=args.examples, deadline=None, derandomize=False, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case_strategy(tuple(args.family or FAMILIES)))
    def fuzz(case):
        try:
            result = run_case(case)
        except Exception:
            print("CASE =", repr(case), file=sys.stderr)
            traceback.print_exc()
            raise
        assume(result != "invalid")
        counts[case["family"]] = counts.get(case["family"], 0) + 1

    try:
        fuzz()
    finally:
        print("valid examples per family:", dict(sorted(counts.items())), "total", sum(counts.values()), STATS)


if __name__ == "__main__":
    main()
