"""The fused kernels (normkit.kernels): which calls they take, which they leave to ATen, and their math.

Tests taking ``fused_kernels`` run twice: through the C++ kernel, and through the Triton kernels
(the CUDA path) in Triton's interpreter on the CPU; tests/test_gpu.py runs the Triton kernels
compiled on a GPU. The option tests (test_options, test_keras_spec, test_keras_golden) already
run through the C++ kernel against the NumPy reference and Keras' numbers (the ``execution``
fixture); these are the cases specific to the kernels.
"""

import copy
import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import forward_ad

import normkit
import normkit.keras
from normkit import functional as F
from normkit import reference as R

from oracle import assert_close, assert_same_training_steps, assert_training_step, routed_to_triton, to_numpy

INF = (0.0, math.inf, math.inf)


def _state(channels, dtype, renorm=False, affine=True, running=True):
    """Parameters (requiring grad) and buffers of one layer, as tensors."""
    like = dict(dtype=dtype)
    return {"weight": (torch.rand(channels, **like) + 0.5).requires_grad_() if affine else None,
            "bias": torch.randn(channels, **like).requires_grad_() if affine else None,
            "running_mean": torch.zeros(channels, **like) if running else None,
            "running_var": torch.ones(channels, **like) if running else None,
            "renorm_mean": torch.full((channels,), 0.2, **like) if renorm else None,
            "renorm_stddev": torch.full((channels,), 1.5, **like) if renorm else None,
            "moving_stddev": torch.ones(channels, **like) if renorm else None}


def _fused(x, state, axis=1, mask=None, virtual=None, layout="strided", training=True, momentum=0.1, unbiased=True,
           clipping=INF):
    """``F._fused_batch_norm`` with the layer ``state`` (buffers move in place): the output or None."""
    return F._fused_batch_norm(x, (axis % x.dim(),), mask, virtual, layout, state["running_mean"],
                               state["running_var"], state["weight"], state["bias"], training, momentum, 1e-3,
                               unbiased, state["renorm_mean"], state["renorm_stddev"], state["moving_stddev"],
                               clipping, 0.3)


TAKEN = {
    "renorm, NCHW": dict(shape=(6, 3, 4, 5), renorm=True, clipping=(0.9, 1.1, 0.2)),
    # Batch means near -3 against a renorm mean of 0.2: d = (-3 - 0.2) / 1.5 is clipped at -dmax.
    "renorm, d clipped below": dict(shape=(6, 3, 4, 5), renorm=True, clipping=(0.9, 1.1, 0.2), center=-3.0),
    "renorm, channels_last memory": dict(shape=(6, 3, 4, 5), renorm=True, channels_last=True),
    "renorm, (N, C)": dict(shape=(10, 7), renorm=True),
    "ghost strided, NCL": dict(shape=(8, 3, 5), virtual=2),
    "ghost contiguous, NHWC axis=-1": dict(shape=(8, 2, 3, 4), axis=-1, virtual=4, layout="contiguous"),
    "ghost + renorm, no affine": dict(shape=(8, 3, 5), virtual=4, renorm=True, affine=False),
    "mask (N, T, C) axis=-1": dict(shape=(4, 6, 3), axis=-1, mask=True),
    "mask (N, C, L) axis=1 + renorm": dict(shape=(4, 3, 6), mask=True, renorm=True),
    "biased running variance (Keras)": dict(shape=(9, 4), unbiased=False),
    "batch statistics without running ones": dict(shape=(9, 4), running=False, training=False, virtual=3),
}


def _case(spec, rng):
    spec = dict(spec)
    shape, axis = spec.pop("shape"), spec.get("axis", 1)
    x = torch.tensor(rng.normal(size=shape) * 2 + spec.pop("center", 1.0), requires_grad=True)
    memory = x.to(memory_format=torch.channels_last) if spec.pop("channels_last", False) else x
    mask = None
    if spec.pop("mask", False):
        lengths = [shape[1 if axis == -1 else 2]] + [2, 4, 5][:shape[0] - 1]
        positions = np.arange(shape[1 if axis == -1 else 2])
        valid = np.stack([positions < n for n in lengths])
        mask = torch.tensor(valid[:, :, None] if axis == -1 else valid[:, None, :])
    return x, memory, mask, spec


@pytest.mark.parametrize("name", list(TAKEN))
def test_fused_path_matches_the_reference(name, fused_kernels, rng):
    x, memory, mask, spec = _case(TAKEN[name], rng)
    axis = spec.pop("axis", 1)
    renorm, running, training = spec.pop("renorm", False), spec.pop("running", True), spec.get("training", True)
    state = _state(x.shape[axis], x.dtype, renorm=renorm, affine=spec.pop("affine", True), running=running)
    before = {k: to_numpy(v) for k, v in state.items()}  # the reference moves its own copies
    y = _fused(memory, state, axis=axis, mask=mask, **spec)
    assert y is not None, "the fused kernel declined a call it should take"
    assert y.shape == x.shape
    g = torch.tensor(rng.normal(size=x.shape))
    params = [state[k] for k in ("weight", "bias") if state[k] is not None]
    grads = torch.autograd.grad(y, [x] + params, g)
    kwargs = dict(axis=axis, virtual_batch_size=spec.get("virtual"), ghost_layout=spec.get("layout", "strided"))
    if mask is not None:
        kwargs["mask"] = mask.numpy()
    if renorm:
        kwargs.update(renorm_mean=before["renorm_mean"], renorm_stddev=before["renorm_stddev"],
                      renorm_clipping=spec.get("clipping", INF))
    x_np, w, b = x.detach().numpy(), before["weight"], before["bias"]
    expected_grads = R.batch_norm_backward(g.numpy(), x_np, before["running_mean"], before["running_var"], w, b, True,
                                           1e-3, **kwargs)
    if renorm:
        kwargs.update(moving_stddev=before["moving_stddev"], renorm_momentum=0.3)
    expected = R.batch_norm(x_np, before["running_mean"], before["running_var"], w, b, training, 0.1, 1e-3,
                            unbiased_running_var=spec.get("unbiased", True), **kwargs)
    assert_close(y, expected)
    for actual, wanted in zip(grads, (expected_grads[0],) + (expected_grads[1:] if params else ())):
        assert_close(actual, wanted)
    # The reference moved ``before``'s buffers in place, as the kernel moved the layer's.
    for name in ("running_mean", "running_var", "renorm_mean", "renorm_stddev", "moving_stddev"):
        if state[name] is not None:
            assert_close(state[name], before[name], err_msg=name)
    if running and training:
        assert not np.allclose(before["running_mean"], 0.0), "the buffers should have moved"


def test_fused_gradcheck(fused_kernels):
    torch.manual_seed(0)
    # Spread 3 and mean 2 put renorm's r and d on their clipping bounds, where they are the
    # constants autograd takes them for (elsewhere they depend on x but are stop-gradient by design).
    x = (torch.randn(6, 3, 4, dtype=torch.float64) * 3 + 2).requires_grad_()
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]],
                        dtype=torch.bool)[:, None, :]
    calls = {
        "renorm, clipped": lambda x, w, b: F._fused_batch_norm(
            x, (1,), None, None, "strided", None, None, w, b, True, 0.1, 1e-3, True,
            torch.full((3,), 0.1, dtype=torch.float64), torch.full((3,), 1.2, dtype=torch.float64), None,
            (0.9, 1.1, 0.05), 0.01),
        "ghost": lambda x, w, b: F._fused_batch_norm(x, (1,), None, 3, "contiguous", None, None, w, b, True, 0.1,
                                                     1e-3, True, None, None, None, INF, 0.01),
        "ghost, strided": lambda x, w, b: F._fused_batch_norm(x, (1,), None, 2, "strided", None, None, w, b, True,
                                                              0.1, 1e-3, True, None, None, None, INF, 0.01),
        "mask": lambda x, w, b: F._fused_batch_norm(x, (1,), mask, None, "strided", None, None, w, b, True, 0.1, 1e-3,
                                                    True, None, None, None, INF, 0.01),
    }
    # (Interpreted Triton is slow: there gradcheck checks random projections of the Jacobian.)
    fast = fused_kernels._triton_on_cpu
    for name, call in calls.items():
        assert call(x, weight, bias) is not None, name
        assert torch.autograd.gradcheck(call, (x, weight, bias), fast_mode=fast), name
        # create_graph=True (gradient penalties): the gradient is itself differentiable (kernels.graph_backward)
        assert torch.autograd.gradgradcheck(call, (x, weight, bias), fast_mode=fast), name


@pytest.mark.parametrize("name", ["renorm, d clipped below", "mask (N, C, L) axis=1 + renorm", "mask (N, T, C) axis=-1",
                                  "ghost strided, NCL", "ghost contiguous, NHWC axis=-1"])
def test_gradients_with_a_graph_match_the_reference(name, fused_kernels, rng):
    """create_graph=True (a gradient penalty) sends the kernels' backward to kernels.graph_backward, which recomputes
    the step by autograd: its first derivatives must still be the reference's, with renorm's r and d (weight not 1),
    the padding mask and both ghost layouts. (gradgradcheck cannot tell: it differentiates graph_backward's own
    function, right or wrong, and test_a_gradient_penalty_through_the_kernel_equals_torch_nn_s has r = 1, d = 0.)"""
    x, memory, mask, spec = _case(TAKEN[name], rng)
    axis = spec.pop("axis", 1)
    renorm = spec.pop("renorm", False)
    state = _state(x.shape[axis], x.dtype, renorm=renorm)
    before = {k: to_numpy(v) for k, v in state.items()}
    y = _fused(memory, state, axis=axis, mask=mask, **spec)
    assert y is not None, "the fused kernel declined a call it should take"
    g = torch.tensor(rng.normal(size=x.shape))
    grads = torch.autograd.grad(y, [x, state["weight"], state["bias"]], g, create_graph=True)
    assert grads[0].requires_grad  # (graph_backward served)
    kwargs = dict(axis=axis, virtual_batch_size=spec.get("virtual"), ghost_layout=spec.get("layout", "strided"),
                  mask=None if mask is None else mask.numpy())
    if renorm:
        kwargs.update(renorm_mean=before["renorm_mean"], renorm_stddev=before["renorm_stddev"],
                      renorm_clipping=spec.get("clipping", INF))
    expected = R.batch_norm_backward(g.numpy(), x.detach().numpy(), before["running_mean"], before["running_var"],
                                     before["weight"], before["bias"], True, 1e-3, **kwargs)
    for actual, wanted, what in zip(grads, expected, ("input", "weight", "bias"), strict=True):
        assert_close(actual, wanted, err_msg=what)


def test_renorm_stddev_below_the_floor(fused_kernels, rng):
    """r and d divide by max(renorm_stddev, sqrt(eps)) (eps 1e-3: 0.0316): a renorm stddev set below it (1e-3) gives
    the reference's output, gradients and buffers through both kernels (test_options checks the C++ one only)."""
    x = torch.tensor(rng.normal(size=(8, 3, 4)) * 0.05 + 0.3, requires_grad=True)
    state = _state(3, x.dtype, renorm=True)
    with torch.no_grad():
        state["renorm_stddev"].fill_(1e-3)
        state["renorm_mean"].fill_(0.29)
    before = {k: to_numpy(v) for k, v in state.items()}
    y = _fused(x, state, clipping=(0.0, 3.0, 2.0))  # r of sqrt(0.0025 + 1e-3) / 0.0316 ~ 1.9, not 59; |d| < 2
    assert y is not None
    g = torch.tensor(rng.normal(size=x.shape))
    grads = torch.autograd.grad(y, [x, state["weight"], state["bias"]], g)
    kwargs = dict(renorm_mean=before["renorm_mean"], renorm_stddev=before["renorm_stddev"],
                  renorm_clipping=(0.0, 3.0, 2.0))
    expected_grads = R.batch_norm_backward(g.numpy(), x.detach().numpy(), before["running_mean"],
                                           before["running_var"], before["weight"], before["bias"], True, 1e-3, **kwargs)
    expected = R.batch_norm(x.detach().numpy(), before["running_mean"], before["running_var"], before["weight"],
                            before["bias"], True, 0.1, 1e-3, moving_stddev=before["moving_stddev"],
                            renorm_momentum=0.3, **kwargs)
    assert_close(y, expected)
    for actual, wanted in zip(grads, expected_grads, strict=True):
        assert_close(actual, wanted)
    for name in ("running_mean", "running_var", "renorm_mean", "renorm_stddev", "moving_stddev"):
        assert_close(state[name], before[name], err_msg=name)


@pytest.mark.parametrize("which", ["weight", "running_mean", "renorm_stddev"])
def test_fused_path_declines_parameters_and_buffers_with_gaps_in_memory(which, fused_kernels, rng):
    """The kernels read (and move) C values at consecutive addresses: a parameter or buffer that is a strided view
    (every other entry of a larger tensor, as F.batch_norm may be handed) is declined, with the buffers (and the
    entries between theirs) left alone, for the general path to serve."""
    x = torch.tensor(rng.normal(size=(8, 3, 4)) + 1)
    state = _state(3, x.dtype, renorm=True)
    base = torch.full((6,), 7.0, dtype=x.dtype)
    base[::2] = state[which].detach()
    state[which] = base[::2] if which != "weight" else base[::2].requires_grad_()
    assert not state[which].is_contiguous()
    before = {k: v.clone() for k, v in state.items() if v is not None}
    y = _fused(x, state, clipping=(0.5, 2.0, 1.0))
    assert y is None, f"the kernel took a non-contiguous {which}"
    for name, value in before.items():
        assert torch.equal(state[name], value), name
    assert torch.equal(base[1::2], torch.full((3,), 7.0, dtype=x.dtype))


@pytest.mark.parametrize("why,make", [
    ("float16 input", lambda: (torch.randn(8, 3, dtype=torch.float16), torch.float16)),
    ("float32 input with float64 parameters", lambda: (torch.randn(8, 3), torch.float64)),
    ("non-contiguous input", lambda: (torch.randn(3, 8).t(), torch.float32)),
    ("over FUSED_MAX_NUMEL values", lambda: (torch.randn(F.fused_max_numel() // 4 + 1, 4, 1, 1), torch.float32)),
])
def test_fused_path_declines_and_leaves_buffers_alone(why, make, fused_kernels):
    x, dtype = make()
    channels = x.shape[1]
    running_mean, running_var = torch.zeros(channels, dtype=dtype), torch.ones(channels, dtype=dtype)
    y = F._fused_batch_norm(x, (1,), None, None, "strided", running_mean, running_var, torch.ones(channels, dtype=dtype),
                            None, True, 0.1, 1e-5, True, None, None, None, INF, 0.01)
    assert y is None, why
    assert torch.equal(running_mean, torch.zeros(channels, dtype=dtype))
    assert torch.equal(running_var, torch.ones(channels, dtype=dtype))


@pytest.mark.parametrize("missing", ["running_var", "renorm_stddev", "moving_stddev"])
def test_fused_path_declines_a_step_missing_a_buffer_it_needs(missing, fused_kernels, rng):
    """running_mean without running_var, renorm_mean without renorm_stddev, a renorm step moving the running
    statistics without moving_stddev: ATen's paths refuse these. The Triton kernels ran them through the absent
    buffer's placeholder pointer (their saved statistics: the update written over the batch means the backward
    reads), the C++ kernel raised an error of its own; both decline now, having done nothing."""
    x = torch.tensor(rng.normal(size=(8, 3, 4)) + 1)
    state = _state(3, x.dtype, renorm=missing != "running_var")
    state[missing] = None
    before = {name: value.clone() for name, value in state.items() if value is not None}
    assert _fused(x, state, clipping=(0.5, 2.0, 1.0)) is None, f"the kernel took a step without {missing}"
    for name, value in before.items():
        assert torch.equal(state[name], value), name
    errors = []
    for on in (True, False):  # the layers' entry point: the same error whether the kernels are on or off
        with fused_kernels.switched(on), pytest.raises((TypeError, ValueError)) as refused:
            F.batch_norm(x, state["running_mean"], state["running_var"], training=True,
                         renorm_mean=state["renorm_mean"], renorm_stddev=state["renorm_stddev"],
                         moving_stddev=state["moving_stddev"])
        errors.append(refused.type)
    assert errors[0] is errors[1]


def test_size_limit_shrinks_with_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert F.fused_max_numel() == F.FUSED_MAX_NUMEL
        torch.set_num_threads(8)
        assert F.fused_max_numel() == F.FUSED_MAX_NUMEL // 4
    finally:
        torch.set_num_threads(threads)


def test_layers_leave_cpu_inputs_over_the_size_limit_to_aten(cpp_kernel):
    """kernels.takes() is what lets a layer skip the general path: over fused_max_numel() values (where ATen's
    multi-threaded kernels are as fast or faster) a CPU input is not taken, at the limit it is."""
    limit = F.fused_max_numel()
    assert cpp_kernel.takes(torch.empty(limit // 4, 4))
    assert not cpp_kernel.takes(torch.empty(limit // 4 + 1, 4))
    with cpp_kernel.switched(False):
        assert not cpp_kernel.takes(torch.empty(8, 4))


def test_modules_fall_back_to_aten_when_declined(cpp_kernel, rng):
    """float16 data on the CPU with the fused kernel on gives what ATen's path gives."""
    x = torch.tensor(rng.normal(size=(16, 4, 3)), dtype=torch.float16)
    outputs = []
    for on in (True, False):
        with cpp_kernel.switched(on):
            layer = normkit.BatchNorm(4, renorm=True, virtual_batch_size=8)
            outputs.append((layer(x), layer.running_mean.clone()))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])


def test_fused_variance_is_exact_far_from_zero(fused_kernels):
    """float32 data with mean 1e4 and std 1e-2: the fused statistics keep the float64 variance."""
    torch.manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(64, 3, 8)).float()
    layer = normkit.BatchNorm(3, virtual_batch_size=64, momentum=1.0)  # one ghost batch: plain BN, fused
    layer(x)
    expected = x.double().var(dim=(0, 2), unbiased=True)
    relative = ((layer.running_var.double() - expected).abs() / expected).max().item()
    assert relative < 1e-3
    assert (layer.running_var >= 0).all()


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
def test_ghost_groups_far_apart_keep_exact_variances(layout, fused_kernels):
    """Each ghost group is its own batch: group means 1e3 apart with spreads of 1e-2 (float64) give each
    group's exact variance, as the reference computes it."""
    torch.manual_seed(0)
    x = torch.randn(8, 2, 16, dtype=torch.float64) * 1e-2
    groups = torch.arange(8) % 2 if layout == "strided" else torch.arange(8) // 4
    x[groups == 1] += 1e3
    layer = normkit.BatchNorm(2, virtual_batch_size=4, ghost_layout=layout, momentum=1.0,
                              unbiased_running_var=False).double()
    y = layer(x)
    running_mean, running_var = torch.zeros(2, dtype=torch.float64).numpy(), torch.ones(2, dtype=torch.float64).numpy()
    expected = R.batch_norm(x.numpy(), running_mean, running_var, np.ones(2), np.zeros(2), True, 1.0, layer.eps,
                            virtual_batch_size=4, ghost_layout=layout, unbiased_running_var=False)
    assert_close(y, expected, torch.float64)
    assert_close(layer.running_var, running_var, torch.float64)


def test_a_nan_stays_in_its_ghost_group(fused_kernels):
    """A NaN in the first sample spoils its own ghost batch's statistics only, as in the reference."""
    x = torch.randn(4, 3, dtype=torch.float64)
    x[0, 1] = float("nan")
    y = normkit.BatchNorm(3, virtual_batch_size=2).double()(x)
    assert torch.isnan(y[:, 1]).tolist() == [True, False, True, False]  # strided ghosts: rows 0, 2 and 1, 3
    assert torch.isfinite(y[:, [0, 2]]).all()


def test_an_infinite_value_gives_an_infinite_running_mean(fused_kernels):
    x = torch.randn(4, 3, dtype=torch.float64)
    x[0, 1] = float("inf")
    layer = normkit.BatchNorm(3, renorm=True).double()
    layer(x)
    assert layer.running_mean[1].item() == math.inf and layer.renorm_mean[1].item() == math.inf


def test_fully_masked_batch_through_the_fused_kernel(fused_kernels):
    layer = normkit.BatchNorm(3, axis=-1, renorm=True)
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    y = layer(torch.randn(2, 4, 3), mask=torch.zeros(2, 4, dtype=torch.bool))
    assert torch.isfinite(y).all()
    for name, buffer in layer.named_buffers():
        if name != "num_batches_tracked":
            assert torch.equal(buffer, before[name]), name


def test_switched_restores_the_previous_state(fused_kernels):
    assert fused_kernels.enabled()
    with fused_kernels.switched(False):
        assert not fused_kernels.enabled()
        with fused_kernels.switched(True):
            assert fused_kernels.enabled()
        assert not fused_kernels.enabled()
    assert fused_kernels.enabled()


def test_environment_variable_enables_the_kernel_at_import(cpp_kernel):
    env = dict(os.environ, NORMKIT_FUSED_KERNELS="1")
    code = "import normkit, normkit.kernels as k; print(k.enabled('cpu'), k.enabled('cuda'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


_PROBE = """
import warnings
warnings.simplefilter("always")
import torch, normkit, normkit.kernels as k
x = torch.randn(8, 3, requires_grad=True)
y = normkit.BatchNorm(3, renorm=True)(x)
print(k.enabled("cpu"), k.enabled("cuda"), "FusedBatchNorm" in y.grad_fn.name())
"""


def _import_normkit(mode=None, extensions_dir=None):
    """A fresh ``import normkit`` with NORMKIT_FUSED_KERNELS=mode (unset: None): its kernels' state and stderr."""
    env = {key: value for key, value in os.environ.items() if key != "NORMKIT_FUSED_KERNELS"}
    if mode is not None:
        env["NORMKIT_FUSED_KERNELS"] = mode
    if extensions_dir is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(extensions_dir)
    child = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    return child.stdout.split(), child.stderr


def _copy_of_the_build(built_kernels, root, record=True):
    """This machine's build copied into another extensions folder (as a cache the import can find): the library
    and, with ``record``, the record of its size and SHA-256 that its build wrote."""
    folder = root / built_kernels.build_directory().name
    folder.mkdir(parents=True)
    for name in (built_kernels._library(folder).name,) + ((built_kernels._RECORD,) if record else ()):
        (folder / name).write_bytes((built_kernels.build_directory() / name).read_bytes())
    return folder


def test_import_loads_a_cached_build_by_default_for_cpu_tensors_only(built_kernels, tmp_path):
    """NORMKIT_FUSED_KERNELS unset or auto: a finished build on this machine is used, CUDA kernels stay off."""
    _copy_of_the_build(built_kernels, tmp_path)
    for mode in (None, "auto"):
        state, _ = _import_normkit(mode, tmp_path)
        assert state == ["True", "False", "True"], mode
    assert _import_normkit("0", tmp_path)[0] == ["False", "False", "False"]


def test_import_compiles_nothing_without_a_cached_build(tmp_path):
    state, errors = _import_normkit(None, tmp_path)
    assert state == ["False", "False", "False"]
    assert list(tmp_path.iterdir()) == [] and "Warning" not in errors


def test_import_loads_only_a_library_its_build_record_vouches_for(built_kernels, tmp_path):
    """A library cut short (a build killed while linking, a full disk) would pass the loader's checks and then
    kill the process (SIGBUS): without a record of its size and SHA-256 matching it, it is not loaded."""
    folder = _copy_of_the_build(built_kernels, tmp_path)
    library = built_kernels._library(folder)
    library.write_bytes(library.read_bytes()[:len(library.read_bytes()) // 2])
    state, errors = _import_normkit(None, tmp_path)
    assert state == ["False", "False", "False"]
    assert "incomplete or changed" in errors and "normkit kernels build" in errors
    (folder / "lock").touch()  # another process building now: the half-written library is no news
    state, errors = _import_normkit(None, tmp_path)
    assert state == ["False", "False", "False"] and "Warning" not in errors
    unrecorded = _copy_of_the_build(built_kernels, tmp_path / "unrecorded", record=False)
    state, errors = _import_normkit(None, unrecorded.parent)
    assert state == ["False", "False", "False"] and "incomplete or changed" in errors


def test_a_finished_build_is_loaded_whatever_lock_or_compiler(built_kernels, tmp_path):
    """torch's loader takes the build folder's lock even to load: with the record, the import needs neither it
    nor ninja nor a compiler (enable() too), so a lock held a moment by another process changes nothing."""
    folder = _copy_of_the_build(built_kernels, tmp_path)
    (folder / "lock").touch()
    assert _import_normkit(None, tmp_path)[0] == ["True", "False", "True"]
    (folder / "lock").unlink()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-compiler"),
               NORMKIT_FUSED_KERNELS="1", PATH=os.path.dirname(sys.executable))
    child = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and child.stdout.split() == ["True", "True", "True"], child.stderr


def test_a_build_folder_that_cannot_be_made_is_a_warning_at_import(tmp_path):
    (tmp_path / "afile").write_text("")
    for mode in ("1", None):
        state, errors = _import_normkit(mode, tmp_path / "afile" / "cache")
        # (mode 1's CUDA kernels need no build folder: they stay on)
        assert state == ["False", "True" if mode == "1" else "False", "False"], mode
        if mode == "1":
            assert "cannot use the build folder" in errors and "TORCH_EXTENSIONS_DIR" in errors


def test_a_library_cut_short_is_relinked_by_the_next_build(built_kernels, tmp_path):
    """ninja would take the truncated library for up to date; build() removes what its record does not vouch for."""
    folder = _copy_of_the_build(built_kernels, tmp_path)
    library = built_kernels._library(folder)
    library.write_bytes(library.read_bytes()[:4096])
    (folder / "lock").touch()  # left by the build killed while linking, long ago
    stamp = time.time() - built_kernels.STALE_LOCK_SECONDS - 60
    os.utime(folder / "lock", (stamp, stamp))
    built = _kernels_command("build", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert built.returncode == 0, built.stderr
    assert "removing" in built.stderr and "build lock" in built.stderr  # (the stale lock, with a warning)
    assert _import_normkit(None, tmp_path) == (["True", "False", "True"], "")


def test_a_cached_build_that_does_not_load_is_a_warning_not_a_failed_import(built_kernels, tmp_path):
    folder = tmp_path / built_kernels.build_directory().name
    folder.mkdir()
    built_kernels._library(folder).write_bytes(b"not a shared library")
    built_kernels._write_record(folder)  # (as if a broken toolchain had built it)
    state, errors = _import_normkit(None, tmp_path)
    assert state == ["False", "False", "False"]
    assert "does not load" in errors and "normkit kernels build" in errors


def test_an_unknown_kernels_setting_is_named_and_read_as_auto(tmp_path):
    state, errors = _import_normkit("fast", tmp_path)
    assert state == ["False", "False", "False"]
    assert "NORMKIT_FUSED_KERNELS='fast'" in errors and "auto, 1, cuda, 0" in errors


def test_the_build_name_changes_with_the_kernel_source(built_kernels, monkeypatch, tmp_path):
    """A cache written by another version of the kernel is never loaded: the source is part of the name."""
    name = built_kernels._extension_name()
    changed = tmp_path / "fused_batch_norm.cpp"
    changed.write_bytes(built_kernels._SOURCE.read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(built_kernels, "_SOURCE", changed)
    assert built_kernels._extension_name() != name


def test_the_build_name_changes_with_the_compiler_flags(built_kernels, monkeypatch):
    """A build made with other flags (an older normkit's) is never loaded as this one: the flags are part of the
    name, like the source; the compiler is not (a finished build serves a machine without one)."""
    name = built_kernels._extension_name()
    monkeypatch.setenv("CXX", "/opt/another/g++")
    assert built_kernels._extension_name() == name
    monkeypatch.setattr(built_kernels, "_CFLAGS", built_kernels._CFLAGS[:-1])
    assert built_kernels._extension_name() != name


def _kernels_command(action, **env):
    environment = {key: value for key, value in os.environ.items() if key != "NORMKIT_FUSED_KERNELS"}
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "normkit.cli", "kernels", action], env=environment,
                          capture_output=True, text=True, timeout=600)


def test_kernels_command_builds_and_reports(built_kernels, tmp_path):
    built = _kernels_command("build")
    assert built.returncode == 0, built.stderr
    assert str(built_kernels.build_directory()) in built.stdout
    status = _kernels_command("status").stdout.splitlines()
    assert {"mode: auto", "cached: True", "loaded: True", "cpu: True", "cuda: False"} <= set(status)
    elsewhere = _kernels_command("status", TORCH_EXTENSIONS_DIR=str(tmp_path)).stdout.splitlines()
    assert {"cached: False", "loaded: False", "cpu: False"} <= set(elsewhere)


def test_kernels_command_says_in_one_line_why_a_build_failed(tmp_path):
    failed = _kernels_command("build", TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-compiler"))
    assert failed.returncode == 1
    line = failed.stderr.splitlines()[-1]
    assert line.startswith("normkit kernels: error:")
    assert "C++ compiler" in failed.stderr and "Traceback" not in failed.stderr
    # The cause (the shell's line), not the first 300 characters of ninja's command line.
    assert "no-compiler: not found" in line and "-isystem" not in line, line


def test_a_failed_cpu_build_at_import_leaves_the_cuda_kernels_on(tmp_path, monkeypatch):
    """NORMKIT_FUSED_KERNELS=1 asks for both kernels; the CUDA ones need no build, so a CPU build that fails (here:
    no compiler) warns and leaves them on, instead of turning everything off."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-compiler"))
    (cpu, cuda, fused), stderr = _import_normkit("1", tmp_path)
    assert (cpu, cuda, fused) == ("False", "True", "False")
    assert "building the fused kernel failed" in stderr and "the CUDA kernels are on" in stderr


def test_a_build_that_waited_for_another_process_s_loads_it(built_kernels, tmp_path):
    """Two `normkit kernels build` at once: the second waits for the first's lock, then loads what the first
    built (torch drops the lock before the builder writes the record), not deleting and relinking its library
    (which the first was about to import): here it has no compiler, so relinking would fail."""
    folder = tmp_path / built_kernels.build_directory().name
    folder.mkdir()
    (folder / "lock").touch()  # the first process, building
    library = built_kernels._library(folder)
    library.write_bytes(built_kernels._library(built_kernels.build_directory()).read_bytes())
    environment = {key: value for key, value in os.environ.items() if key != "NORMKIT_FUSED_KERNELS"}
    environment.update(TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-compiler"))
    child = subprocess.Popen([sys.executable, "-m", "normkit.cli", "kernels", "build"], env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiting = child.stderr.readline()
    assert "waiting for another process's build" in waiting, waiting + child.stderr.read()
    (folder / "lock").unlink()  # the first build has linked: torch's loader drops the lock, then
    time.sleep(0.5)             # the first process imports its library and writes the record
    (folder / built_kernels._RECORD).write_bytes((built_kernels.build_directory() / built_kernels._RECORD).read_bytes())
    inode = library.stat().st_ino
    out, errors = child.communicate(timeout=300)
    assert child.returncode == 0, errors
    assert "in " + str(folder) in out and library.stat().st_ino == inode


def test_a_build_arriving_as_another_writes_its_record_loads_that_build(built_kernels, tmp_path):
    """Concurrent first imports (NORMKIT_FUSED_KERNELS=1 in several workers): one arriving after torch's loader
    dropped the builder's lock, before the builder imported its library and wrote the record, saw no lock and
    no record, deleted that library and relinked it (the builder's import then failed). A library linked
    moments ago is given RECORD_WAIT_SECONDS for its record; here relinking would fail (no compiler)."""
    folder = tmp_path / built_kernels.build_directory().name
    folder.mkdir()
    library = built_kernels._library(folder)
    library.write_bytes(built_kernels._library(built_kernels.build_directory()).read_bytes())  # just linked
    environment = {key: value for key, value in os.environ.items() if key != "NORMKIT_FUSED_KERNELS"}
    environment.update(TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-compiler"))
    child = subprocess.Popen([sys.executable, "-m", "normkit.cli", "kernels", "build"], env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    inode = library.stat().st_ino
    time.sleep(1.0)  # the builder imports its library, then writes the record
    (folder / built_kernels._RECORD).write_bytes((built_kernels.build_directory() / built_kernels._RECORD).read_bytes())
    out, errors = child.communicate(timeout=300)
    assert child.returncode == 0, errors
    assert "in " + str(folder) in out and library.stat().st_ino == inode


@st.composite
def option_cases(draw):
    rank = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 4)) for _ in range(rank)]
    option = draw(st.sampled_from(["renorm", "ghost", "ghost+renorm", "mask", "mask+renorm", "plain", "ghost+mask",
                                   "feature mask", "feature mask+renorm+ghost", "squeezed mask",
                                   "squeezed mask+renorm"]))
    virtual = draw(st.sampled_from([1, 2, 4])) if "ghost" in option else None
    shape[0] = draw(st.integers(1, 3)) * (virtual or 2)
    axis = draw(st.sampled_from([1, -1]))
    channels_last = rank == 4 and axis == 1 and draw(st.booleans())
    return (tuple(shape), axis, option, virtual, channels_last, draw(st.sampled_from([torch.float64, torch.float32])),
            draw(st.integers(0, 2 ** 31 - 1)), draw(st.booleans()))


@settings(max_examples=150, deadline=None)
@given(option_cases())
def test_options_match_the_reference_on_random_cases(built_kernels, case):
    _check_random_case(built_kernels, case)


def _check_random_case(kernels, case):
    shape, axis, option, virtual, channels_last, dtype, seed, fused = case  # (fused: else ATen's paths)
    rng = np.random.default_rng(seed)
    features = shape[axis]
    count = math.prod(shape) // features // (shape[0] // virtual if virtual else 1)
    if count < 2 and "mask" not in option:
        return  # one value per channel (per ghost batch) is an error, tested in test_errors
    renorm = "renorm" in option
    layer = normkit.BatchNorm(features, axis=axis, renorm=renorm, virtual_batch_size=virtual, momentum=0.3,
                              renorm_momentum=0.2, eps=1e-3,
                              renorm_clipping={"rmax": 1.3, "rmin": 0.7, "dmax": 0.4} if renorm else None).to(dtype)
    mask_np = None
    if "mask" in option:
        mask_np = rng.random(shape) < 0.7
        if "feature" not in option:
            mask_np = np.take(mask_np, [0], axis=axis)  # the same on every feature (size 1 on the feature axis)
    x_np, g_np = rng.normal(size=shape) * 3 + 2, rng.normal(size=shape)
    state = {name: to_numpy(buffer) for name, buffer in layer.named_buffers() if name != "num_batches_tracked"}
    w, b = to_numpy(layer.weight), to_numpy(layer.bias)
    x, g = torch.tensor(x_np, dtype=dtype), torch.tensor(g_np, dtype=dtype)
    # The reference takes the values the layer sees: rounded to float32, a ghost batch of nearly equal values
    # (eps 1e-3) turns the rounding of x alone into 1e-3 relative changes of the exact input gradient.
    x_np, g_np = to_numpy(x), to_numpy(g)
    x = (x.to(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    mask = None if mask_np is None else torch.tensor(mask_np)
    if "squeezed" in option:  # (the input's shape without its feature axis: the module's direct route takes it)
        mask = mask.squeeze(axis)
    with kernels.switched(fused):
        y = layer(x, mask=mask)
    y.backward(g)
    kwargs = dict(axis=axis, virtual_batch_size=virtual, mask=mask_np)
    if renorm:
        kwargs.update(renorm_mean=state["renorm_mean"], renorm_stddev=state["renorm_stddev"],
                      renorm_clipping=layer.renorm_clipping.at(0))
    grads = R.batch_norm_backward(g_np, x_np, state["running_mean"], state["running_var"], w, b, True, 1e-3, **kwargs)
    if renorm:
        kwargs.update(moving_stddev=state["moving_stddev"], renorm_momentum=0.2)
    expected = R.batch_norm(x_np, state["running_mean"], state["running_var"], w, b, True, 0.3, 1e-3, **kwargs)
    assert_training_step(layer, y, x.grad, expected, grads, state, dtype)


@settings(max_examples=40, deadline=None)
@given(option_cases())
def test_triton_kernels_match_the_reference_on_random_cases(built_triton_kernels, case):
    """The same random cases through the Triton kernels (interpreted: fewer examples, each is slow)."""
    with routed_to_triton(built_triton_kernels):
        _check_random_case(built_triton_kernels, case[:-1] + (True,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernels_take_half_precision_with_float32_state(dtype, fused_kernels, rng):
    """On CUDA the Triton kernels take float16/bfloat16 data with float32 parameters (normkit's rule)."""
    if not fused_kernels._triton_on_cpu:
        pytest.skip("the C++ kernel leaves half precision to ATen (test_modules_fall_back_to_aten_when_declined)")
    x_np = rng.normal(size=(8, 3, 5)) * 2 + 1
    x = torch.tensor(x_np, dtype=dtype, requires_grad=True)
    g = torch.tensor(rng.normal(size=x.shape), dtype=dtype)
    layer = normkit.BatchNorm(3, renorm=True, virtual_batch_size=4,
                              renorm_clipping={"rmax": 1.2, "rmin": 0.8, "dmax": 0.3})
    state = {name: to_numpy(buffer) for name, buffer in layer.named_buffers() if name != "num_batches_tracked"}
    y = layer(x)
    assert y.dtype == dtype and layer.running_mean.dtype == torch.float32
    y.backward(g)
    exact_x = to_numpy(x)  # the rounded values the layer saw
    kwargs = dict(virtual_batch_size=4, renorm_mean=state["renorm_mean"], renorm_stddev=state["renorm_stddev"],
                  renorm_clipping=(0.8, 1.2, 0.3))
    grads = R.batch_norm_backward(to_numpy(g), exact_x, state["running_mean"], state["running_var"],
                                  to_numpy(layer.weight), to_numpy(layer.bias), True, 1e-5, **kwargs)
    kwargs.update(moving_stddev=state["moving_stddev"], renorm_momentum=0.01)
    expected = R.batch_norm(exact_x, state["running_mean"], state["running_var"], to_numpy(layer.weight),
                            to_numpy(layer.bias), True, 0.1, 1e-5, **kwargs)
    assert_close(y, expected, dtype)
    assert_close(x.grad, grads[0], dtype)
    # Parameter gradients and buffers are float32 sums of the rounded values.
    assert_close(layer.weight.grad, grads[1], torch.float32, rtol=1e-3, atol=1e-3)
    assert_close(layer.bias.grad, grads[2], torch.float32, rtol=1e-3, atol=1e-3)
    for name, value in state.items():
        assert_close(getattr(layer, name), value, torch.float32, err_msg=name)


@pytest.mark.parametrize("why,make", [
    ("more values per feature than one program takes", lambda T: dict(x=torch.randn(T.MAX_PER_FEATURE + 1, 2))),
    ("as many over ghost groups (one program walks them all)",
     lambda T: dict(x=torch.randn(T.MAX_PER_FEATURE + 2, 2), groups=2)),
    ("float16 input with float16 parameters", lambda T: dict(x=torch.randn(8, 3, dtype=torch.float16),
                                                              dtype=torch.float16)),
    ("float32 input with float64 parameters", lambda T: dict(x=torch.randn(8, 3), dtype=torch.float64)),
    ("a mask that is not boolean", lambda T: dict(x=torch.randn(8, 3), valid=torch.ones(8, dtype=torch.uint8))),
    ("a mask of the wrong size", lambda T: dict(x=torch.randn(8, 3), valid=torch.ones(7, dtype=torch.bool))),
])
def test_triton_kernels_decline_and_do_nothing(why, make):
    T = pytest.importorskip("normkit.kernels.triton_batch_norm")
    case = make(T)
    x, dtype = case["x"], case.get("dtype", torch.float32)
    channels = x.shape[1]
    running_mean, running_var = torch.zeros(channels, dtype=dtype), torch.ones(channels, dtype=dtype)
    dims = [x.shape[0], 1, channels, 1, case.get("groups", 1), 1]
    settings_ = [0.1, 0.01, 0.0, math.inf, math.inf, 1e-5, 1.0, 1.0]
    y = T.fused_batch_norm(x, torch.ones(channels, dtype=dtype), None, case.get("valid"), running_mean, running_var,
                           None, None, None, dims, settings_)
    assert y is None, why
    assert torch.equal(running_mean, torch.zeros(channels, dtype=dtype))
    assert torch.equal(running_var, torch.ones(channels, dtype=dtype))


@pytest.mark.parametrize("options", [dict(virtual_batch_size=2), dict(virtual_batch_size=2, ghost_layout="contiguous"),
                                     dict(axis=-1), dict(unbiased_running_var=False, virtual_batch_size=2, axis=-1)],
                         ids=["ghost", "contiguous ghost", "features last", "keras variance + ghost, features last"])
def test_torch_func_transforms_take_aten_s_path(fused_kernels, options, rng):
    """grad, jacrev, vmap(grad) and forward-mode AD cannot see inside the kernels' autograd functions: under them the
    layer declines the kernel (the cached build is on by default) and computes what ATen's path computes.
    (Without running statistics: torch.func refuses a step that updates them, for torch.nn's layers too,
    and renorm needs them.)"""
    shape = (4, 3, 3, 2) if options.get("axis") == -1 else (4, 2, 3, 3)
    x = torch.tensor(rng.normal(size=shape) * 2 + 1)
    samples = torch.tensor(rng.normal(size=(3,) + shape))
    results = []
    for on in (True, False):
        with fused_kernels.switched(on):
            layer = normkit.BatchNorm(2, track_running_stats=False, **options).double()
            eager = layer(x)
            params = {name: value.detach() for name, value in layer.named_parameters()}
            loss = (lambda p, x, layer=layer: torch.func.functional_call(layer, p, (x,)).pow(3).sum())
            gradients = torch.func.grad(loss, argnums=(0, 1))(params, x)
            jacobian = torch.func.jacrev(layer)(x)
            per_sample = torch.func.vmap(torch.func.grad(loss, argnums=1), in_dims=(None, 0))(params, samples)
            with forward_ad.dual_level():  # forward-mode AD, outside torch.func
                tangent = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, torch.ones_like(x)))).tangent
            results.append([eager, *gradients[0].values(), gradients[1], jacobian, per_sample, tangent])
    assert results[0][0].grad_fn.name() != results[1][0].grad_fn.name()  # (eagerly the kernel serves)
    for got, want in zip(results[0][1:], results[1][1:], strict=True):
        assert torch.equal(got, want)
    torch.testing.assert_close(results[0][0], results[1][0])  # (eagerly, the kernel itself: equal to rounding)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_gradient_penalty_through_the_kernel_equals_torch_nn_s(dtype, fused_kernels):
    """Channels-last training takes the kernel by default once it is built; a gradient penalty (create_graph=True)
    through it must give torch.nn's second derivatives, not an error."""
    torch.manual_seed(0)
    ours, theirs = normkit.BatchNorm(3, axis=-1).to(dtype), torch.nn.BatchNorm2d(3).to(dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 4, 4, 3, dtype=dtype) * 2 + 1
    results = []
    for layer, run in ((ours, lambda x: ours(x)), (theirs, lambda x: theirs(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))):
        x_ = x.clone().requires_grad_()
        y = run(x_)
        gradient, = torch.autograd.grad((y.pow(2) * torch.linspace(-1, 2, y.numel(), dtype=dtype).view(y.shape)).sum(),
                                        x_, create_graph=True)
        results.append([gradient, *torch.autograd.grad(gradient.pow(2).sum(), (x_, layer.weight, layer.bias),
                                                       allow_unused=True, materialize_grads=True)])
    assert ours(x).grad_fn.name() != "PermuteBackward0"  # (the kernel served)
    tolerance = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for got, want, name in zip(*results, ("gradient", "x", "weight", "bias")):
        torch.testing.assert_close(got, want, **tolerance, msg=name)


def test_first_derivatives_with_create_graph_through_renorm_are_the_reference_s(fused_kernels):
    """create_graph=True takes kernels.graph_backward, which recomputes the step by autograd; with renorm's d away
    from 0 (clipped at dmax) the weight's gradient keeps d's term, y = (x_hat r + d) weight + bias. (gradgradcheck
    cannot see this: it differentiates that same backward.) Oracle: the NumPy reference's backward."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 4)) * 3 + 2  # far from the renorm statistics: r and d on their bounds
    weight, bias, g = rng.uniform(0.5, 1.5, 3), rng.normal(size=3), rng.normal(size=(6, 3, 4))
    renorm_mean, renorm_stddev, clipping = np.full(3, 0.1), np.full(3, 1.2), (0.9, 1.1, 0.05)
    want = R.batch_norm_backward(g, x, None, None, weight, bias, training=True, eps=1e-3, renorm_mean=renorm_mean,
                                 renorm_stddev=renorm_stddev, renorm_clipping=clipping)
    leaves = [torch.tensor(t, requires_grad=True) for t in (x, weight, bias)]
    y = F._fused_batch_norm(*leaves[:1], (1,), None, None, "strided", None, None, *leaves[1:], True, 0.1, 1e-3, True,
                            torch.tensor(renorm_mean), torch.tensor(renorm_stddev), None, clipping, 0.01)
    assert y is not None  # (the kernel served)
    got = torch.autograd.grad(y, leaves, torch.tensor(g), create_graph=True)
    for value, expected, name in zip(got, want, ("x", "weight", "bias")):
        assert_close(value, expected, err_msg=name)


@pytest.mark.slow
def test_triton_kernels_compile_for_hopper():
    """The interpreter runs code the compiler may reject: compile every branch for sm_90 (no GPU needed)."""
    if importlib.util.find_spec("triton") is None:
        if os.environ.get("NORMKIT_REQUIRE_KERNELS") == "1":
            raise RuntimeError("Triton is needed to compile normkit's CUDA kernels")
        pytest.skip("Triton is not installed")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    tool = Path(__file__).resolve().parents[1] / "tools" / "triton_compile_check.py"
    result = subprocess.run([sys.executable, str(tool), "--arch", "90"], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled 68 kernel variants for sm_90" in result.stdout


@pytest.mark.parametrize("how", ["enable(cpu=False)", "NORMKIT_FUSED_KERNELS=cuda"])
def test_cuda_only_enabling_compiles_nothing(how, tmp_path):
    """A GPU machine can switch on the Triton kernels alone: no C++ build, CPU calls keep ATen's paths."""
    env = {key: value for key, value in os.environ.items() if key != "NORMKIT_FUSED_KERNELS"}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path)  # (no cached build for the default mode to load)
    code = "import normkit.kernels as k\n"
    if how.startswith("enable"):
        code += "k.enable(cpu=False)\n"
    else:
        env["NORMKIT_FUSED_KERNELS"] = "cuda"
    code += "print(k._extension is None, k.enabled(), k.enabled('cpu'), k.enabled('cuda'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "False", "True"]
    assert list(tmp_path.iterdir()) == []


def test_cpu_calls_keep_aten_when_only_cuda_is_enabled(cpp_kernel, rng):
    x = torch.tensor(rng.normal(size=(16, 4, 3)), dtype=torch.float32)
    outputs = []
    for setting in ("off", "cuda only"):
        with cpp_kernel.switched(False):
            if setting == "cuda only":
                cpp_kernel.enable(cpu=False)
                assert cpp_kernel.enabled("cuda") and not cpp_kernel.enabled("cpu")
            torch.manual_seed(0)
            layer = normkit.BatchNorm(4, renorm=True, virtual_batch_size=8)
            outputs.append((layer(x), layer.running_var.clone()))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_a_finished_build_loads_whatever_lock_its_folder_holds(built_kernels, tmp_path):
    """torch's loader waits forever for a lock in the build folder (taken even to load); a finished build is
    loaded without it, so neither a lock left by a killed process nor one held by another's load delays it."""
    folder = _copy_of_the_build(built_kernels, tmp_path)
    for age in (0, built_kernels.STALE_LOCK_SECONDS + 60):
        (folder / "lock").touch()
        stamp = time.time() - age
        os.utime(folder / "lock", (stamp, stamp))
        child = subprocess.run([sys.executable, "-c", "import normkit.kernels as k; k.build(); print('built')"],
                               env=dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path)), capture_output=True,
                               text=True, timeout=120)
        assert child.returncode == 0 and "built" in child.stdout and "waiting" not in child.stderr, child.stderr


def _watch_contiguous_route(layer) -> list:
    """What each call of ``layer._forward_fused_contiguous`` returned, in order."""
    answers, reach = [], layer._forward_fused_contiguous
    layer._forward_fused_contiguous = lambda *args: answers.append(reach(*args)) or answers[-1]
    return answers


@pytest.mark.parametrize("options, shape", [
    ({"renorm": True, "renorm_clipping": {"rmax": lambda t: 1.0 + t / 4, "dmax": lambda t: t / 8}}, (8, 3, 5)),
    ({"virtual_batch_size": 4, "momentum": None}, (8, 3, 2, 2)),
    ({"virtual_batch_size": 2, "renorm": True, "ghost_layout": "contiguous"}, (8, 3)),
    ({"unbiased_running_var": False, "axis": -1}, (6, 4, 3)),
    ({"renorm": True, "axis": -1}, (4, 2, 3, 3)),
    ({"renorm": True, "momentum": None, "renorm_momentum": 0.3}, (6, 3, 2, 2)),
    ({"renorm": True, "virtual_batch_size": 3, "axis": -1, "unbiased_running_var": False}, (6, 2, 3)),
    ({"virtual_batch_size": 2, "axis": -3}, (4, 3, 2, 2)),
    ({"renorm": True, "axis": -1}, (5, 3)),
])
def test_the_module_reaches_the_kernel_directly_with_the_general_path_s_results(cpp_kernel, options, shape, rng):
    """BatchNorm._forward_fused skips the general path's plumbing (contiguous data: _forward_fused_contiguous, which
    also skips functional._fused_batch_norm's); same outputs, gradients and buffers, and one count per step, also
    when the kernel declines (float16 on the CPU: the general path takes it)."""
    direct = normkit.BatchNorm(3, **options).double()
    general = normkit.BatchNorm(3, **options).double()
    general._fusable = False
    assert direct._fusable
    answers = _watch_contiguous_route(direct)
    assert_same_training_steps(direct, general, shape, rng, steps=4)
    assert int(direct.num_batches_tracked) == 4
    if options.get("unbiased_running_var") is False and options.get("virtual_batch_size") is None:
        assert answers == []  # (the biased variance alone takes _forward_fused_plain, before)
    else:
        assert len(answers) == 4 and all(y is not None for y in answers)
    half = normkit.BatchNorm(3, **options)
    half(torch.tensor(rng.normal(size=shape), dtype=torch.float16))  # declined by the C++ kernel
    assert int(half.num_batches_tracked) == 1


def test_the_contiguous_route_leaves_other_steps_to_the_general_one(cpp_kernel, rng):
    """_forward_fused_contiguous takes contiguous data with the features first or last; channels_last memory goes
    on to functional._fused_batch_norm (the same results as the general path), and a step it cannot take changes
    nothing there: refused by name on the general path (a batch the ghost size does not divide, one value per
    feature, a weight of another size), or computed there (float16, which the C++ kernel declines)."""
    direct = normkit.BatchNorm(3, renorm=True, virtual_batch_size=2).double()
    general = normkit.BatchNorm(3, renorm=True, virtual_batch_size=2).double()
    general._fusable = False
    answers = _watch_contiguous_route(direct)
    x = torch.tensor(rng.normal(size=(4, 3, 2, 5)) * 2 + 1)
    for layer in (direct, general):
        layer(x.to(memory_format=torch.channels_last))
    assert answers == [] and int(direct.num_batches_tracked) == 1
    torch.testing.assert_close(direct.state_dict(), general.state_dict(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="virtual_batch_size=2 must divide the batch size"):
        direct(torch.randn(3, 3, 2, dtype=torch.float64))
    direct.weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="has a weight of 4 values"):
        direct(x)
    assert answers == [None, None] and int(direct.num_batches_tracked) == 1
    single = normkit.BatchNorm(3, renorm=True).double()
    answers = _watch_contiguous_route(single)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        single(torch.randn(1, 3, dtype=torch.float64))
    assert answers == [None] and int(single.num_batches_tracked) == 0
    half = normkit.BatchNorm(3, renorm=True, virtual_batch_size=2)
    answers = _watch_contiguous_route(half)
    half(torch.randn(4, 3, 2, dtype=torch.float16))  # declined by the C++ kernel: ATen's path
    assert answers == [None] and int(half.num_batches_tracked) == 1


@pytest.mark.parametrize("options, shape", [
    ({"axis": -1}, (6, 5, 3)),
    ({"axis": -1, "renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.3}}, (4, 3, 2, 3)),
    ({"axis": 1, "momentum": None}, (5, 3, 4)),
    ({"axis": 1, "renorm": True, "unbiased_running_var": False}, (3, 3, 2, 2, 2)),
    ({"axis": -1, "unbiased_running_var": False}, (7, 3)),
])
def test_a_padding_mask_of_the_input_s_shape_without_features_reaches_the_kernel_directly(cpp_kernel, options, shape,
                                                                                          rng):
    """A boolean mask of the input's shape without its feature axis (padding: (N, T) for (N, T, C)) goes straight from
    the module to the kernel (_forward_fused_contiguous): each step's output, gradients and buffers are the
    reference's and the general route's (the same mask, through functional.batch_norm), including a fully masked
    step, which leaves the running statistics alone."""
    direct, general = (normkit.BatchNorm(3, **options).double() for _ in range(2))
    general._mask_fusable = False
    answers = _watch_contiguous_route(direct)
    axis = options["axis"] % len(shape)
    kept = tuple(size for dim, size in enumerate(shape) if dim != axis)
    for step in range(4):
        mask = torch.tensor(rng.random(kept) < (0.7 if step < 3 else 0.0))  # (the last step: all padding)
        x, g = torch.tensor(rng.normal(size=shape) * 2 + 1), torch.tensor(rng.normal(size=shape))
        state = {name: to_numpy(buffer).copy() for name, buffer in direct.named_buffers() if name != "num_batches_tracked"}
        results = []
        for layer in (direct, general):
            leaf = x.clone().requires_grad_()
            y = layer(leaf, mask=mask)
            results.append([y, *torch.autograd.grad(y, [leaf, *layer.parameters()], g)])
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(direct.state_dict(), general.state_dict(), rtol=1e-12, atol=1e-12)
        mask_np = np.expand_dims(mask.numpy(), axis)
        kwargs = dict(axis=axis, mask=mask_np, unbiased_running_var=options.get("unbiased_running_var", True))
        if direct.renorm:
            kwargs.update(renorm_mean=state["renorm_mean"], renorm_stddev=state["renorm_stddev"],
                          renorm_clipping=direct.renorm_clipping.at(step), moving_stddev=state["moving_stddev"],
                          renorm_momentum=direct.renorm_momentum)
        momentum = options.get("momentum", 0.1)
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        expected = R.batch_norm(x.numpy(), state["running_mean"], state["running_var"], to_numpy(direct.weight),
                                to_numpy(direct.bias), True, factor, direct.eps, **kwargs)
        assert_close(results[0][0], expected)
        assert_close(direct.running_mean, state["running_mean"])
        assert_close(direct.running_var, state["running_var"])
        if step == 3:  # (a fully masked batch: the buffers keep their values, the output is finite)
            assert torch.isfinite(results[0][0]).all()
    assert len(answers) == 4 and all(y is not None for y in answers) and int(direct.num_batches_tracked) == 4


def test_the_keras_layer_s_padding_mask_takes_the_direct_route_as_the_reference(cpp_kernel, rng):
    """Keras' mask of a features-last layer ((N, T) for (N, T, C)) reaches the inner layer as that padding mask, so
    its kernel serves it straight from the module: outputs, gradients and moving statistics are the reference's
    (Keras' biased moving variance, momentum 0.99)."""
    layer = normkit.keras.BatchNormalization(dtype=torch.float64)
    layer(torch.zeros(4, 5, 3, dtype=torch.float64), training=False)  # (builds it; no step)
    bn = layer.bn
    answers = _watch_contiguous_route(bn)
    for _ in range(2):
        x = torch.tensor(rng.normal(size=(4, 5, 3)) * 2 + 1, requires_grad=True)
        g = rng.normal(size=(4, 5, 3))
        mask = torch.tensor(rng.random((4, 5)) < 0.7)
        mean, var = bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()
        weight, bias = bn.weight.detach().numpy(), bn.bias.detach().numpy()
        mask_np = mask.numpy()[..., None]
        expected = R.batch_norm(x.detach().numpy(), mean, var, weight, bias, True, 0.01, 1e-3, axis=2, mask=mask_np,
                                unbiased_running_var=False)
        grads = R.batch_norm_backward(g, x.detach().numpy(), None, None, weight, bias, True, 1e-3, axis=2,
                                      mask=mask_np)
        y = layer(x, training=True, mask=mask)
        got = torch.autograd.grad(y, [x, bn.weight, bn.bias], torch.tensor(g))
        assert_close(y, expected)
        for value, want in zip(got, grads):
            assert_close(value, want)
        assert_close(bn.running_mean, mean)
        assert_close(bn.running_var, var)
    assert len(answers) == 2 and all(y is not None for y in answers)


def test_the_direct_route_leaves_other_masks_to_the_general_one(cpp_kernel, rng):
    """Masks the direct route does not take as they are (numbers, the input's rank, another device's) go the general
    way, with the same results; one that fits nothing is refused there by name, the count untouched; ghost batches
    with a mask never try the direct route."""
    layer = normkit.BatchNorm(3, axis=-1).double()
    twin = normkit.BatchNorm(3, axis=-1).double()
    answers = _watch_contiguous_route(layer)
    x = torch.tensor(rng.normal(size=(4, 5, 3)))
    valid = torch.tensor(rng.random((4, 5)) < 0.7)
    twin(x, mask=valid)
    for mask in (valid.double(), valid.unsqueeze(-1), valid.t().contiguous().t()):
        torch.testing.assert_close(layer(x, mask=mask), twin(x, mask=valid), rtol=1e-12, atol=1e-12)
    assert answers == [None] * 3  # (numbers, the input's rank, strided memory: each computed the general way)
    with pytest.raises(ValueError, match="mask of shape"):
        layer(x, mask=torch.ones(4, 4, dtype=torch.bool))
    assert int(layer.num_batches_tracked) == 3 and answers[-1] is None
    ghost = normkit.BatchNorm(3, axis=-1, virtual_batch_size=2).double()
    ghost_answers = _watch_contiguous_route(ghost)
    ghost(x, mask=valid)
    assert ghost_answers == [] and int(ghost.num_batches_tracked) == 1


class _FeaturesLast(torch.nn.Module):
    """A torch.nn BN layer on features-last data (moved to channels-first and back), with the layer's state_dict."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.movedim(-1, 1)).movedim(1, -1)

    def state_dict(self, *args, **kwargs):
        return self.layer.state_dict(*args, **kwargs)

    def load_state_dict(self, state, *args, **kwargs):
        return self.layer.load_state_dict(state, *args, **kwargs)


@pytest.mark.parametrize("options, shape", [
    ({}, (6, 4, 5, 3)),
    ({"momentum": None}, (4, 2, 3, 2, 3)),
    ({}, (2, 1, 1, 3)),  # (two values per feature, the fewest the step takes)
    ({"affine": False, "eps": 1e-3, "momentum": 0.3}, (5, 2, 2, 3)),
])
def test_plain_features_last_training_reaches_the_kernel_directly_with_the_general_path_s_results(cpp_kernel, options,
                                                                                                 shape, rng):
    """BatchNorm(axis=-1)'s plain path calls the kernel itself (_forward_fused_plain), not through _forward_options:
    same outputs, gradients and buffers, one count per step; where the kernel declines (float16, a weight of another
    size) or the call is not simply valid, the general path takes it or refuses it as before. (Keras' biased
    running variance is not plain: _forward_fused serves it, tested above.)"""
    direct = normkit.BatchNorm(3, axis=-1, **options).double()
    general = normkit.BatchNorm(3, axis=-1, **options).double()
    general._forward_fused_plain = lambda input: None  # (the route before: _forward_options, then the kernel)
    calls = []
    reach = direct._forward_fused_plain
    direct._forward_fused_plain = lambda input: calls.append(input.shape) or reach(input)
    assert_same_training_steps(direct, general, shape, rng, steps=4)
    assert len(calls) == 4 and int(direct.num_batches_tracked) == 4
    y = direct(torch.randn(shape, dtype=torch.float64, requires_grad=True))
    assert y.grad_fn.name() != "PermuteBackward0" and len(calls) == 5  # (the kernel served, straight from the module)
    # (both routes end in the same kernel: torch.nn's layer on the channels-first data is the independent oracle)
    torch_nn = _FeaturesLast({4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[len(shape)](3, **options).double())
    torch_nn.load_state_dict(direct.state_dict())
    assert_same_training_steps(direct, torch_nn, shape, rng, steps=2)
    assert len(calls) == 7
    half = normkit.BatchNorm(3, axis=-1, **options)
    half(torch.randn(shape, dtype=torch.float16))  # declined by the C++ kernel: ATen's path
    assert int(half.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # refused on the general path
        normkit.BatchNorm(3, axis=-1, **options).double()(torch.randn((1, 1, 1, 3), dtype=torch.float64))
    if "affine" not in options:
        resized = normkit.BatchNorm(3, axis=-1, **options).double()
        resized.weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))  # declined, then refused by name
        with pytest.raises(ValueError, match="has a weight of 4 values"):
            resized(torch.randn(shape, dtype=torch.float64))
        assert int(resized.num_batches_tracked) == 0


@pytest.mark.parametrize("make", [
    lambda: normkit.BatchNorm(5, unbiased_running_var=False, momentum=0.2).double(),
    lambda: normkit.BatchNorm(5, unbiased_running_var=False, momentum=None, affine=False).double(),
    lambda: normkit.keras.BatchNormalization(momentum=0.8, epsilon=1e-3, scale=False, dtype=torch.float64),
], ids=["biased", "biased-cumulative-no-affine", "keras-no-gamma"])
def test_a_matrix_with_the_biased_running_variance_takes_the_kernel_directly_as_the_reference(cpp_kernel, make, rng):
    """Training on an (N, C) matrix with Keras' biased running variance (ATen's kernel cannot move a biased variance)
    takes the fused kernel's direct call (_forward_fused_plain, not functional._fused_batch_norm's plumbing):
    outputs, gradients and buffers of each step are the reference's."""
    layer = make()
    bn = layer
    if isinstance(layer, normkit.keras.BatchNormalization):
        layer(torch.zeros(6, 5, dtype=torch.float64), training=True)  # (builds the Keras layer; one step)
        bn = layer.bn
        bn.num_batches_tracked.zero_()
    calls = []
    reach = bn._forward_fused_plain
    bn._forward_fused_plain = lambda input: calls.append(input.shape) or reach(input)
    for step in range(3):
        x = torch.tensor(rng.normal(size=(6, 5)) * 3 + 2, requires_grad=True)
        g = rng.normal(size=(6, 5))
        mean, var = bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()
        weight = None if bn.weight is None else bn.weight.detach().numpy()
        bias = None if bn.bias is None else bn.bias.detach().numpy()
        factor = bn.momentum if bn.momentum is not None else 1.0 / (step + 1)
        expected = R.batch_norm(x.detach().numpy(), mean, var, weight, bias, True, factor, bn.eps,
                                unbiased_running_var=False)
        grads = R.batch_norm_backward(g, x.detach().numpy(), None, None, weight, bias, True, bn.eps)
        y = layer(x, training=True) if bn is not layer else layer(x)
        params = [p for p in (bn.weight, bn.bias) if p is not None]
        got = torch.autograd.grad(y, [x] + params, torch.tensor(g))
        assert_close(y, expected)
        assert_close(got[0], grads[0])
        for value, want in zip(got[1:], [w for w in grads[1:] if w is not None]):
            assert_close(value, want)
        assert_close(bn.running_mean, mean)
        assert_close(bn.running_var, var)
    assert len(calls) == 3 and int(bn.num_batches_tracked) == 3


def test_the_direct_kernel_route_reads_the_layer_s_flags_at_every_call(cpp_kernel, rng):
    x = torch.tensor(rng.normal(size=(8, 4)) + 5)
    layer = normkit.BatchNorm(4, renorm=True).double()
    layer.track_running_stats = False  # switched off on a built layer: read per call, as torch.nn does
    layer(x)
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_mean, torch.zeros(4, dtype=torch.float64))
    layer = normkit.BatchNorm2d(4, renorm=True)
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(8, 4))
    layer = normkit.BatchNorm(4, renorm=True).double()
    layer.num_batches_tracked = None  # (torch.nn's layers run on with no count, moving the buffers by momentum)
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.1 * x.mean(dim=0))
    keras_layer = normkit.keras.BatchNormalization(renorm=True, dtype=torch.float64)  # builds with axis 3
    keras_layer(torch.tensor(rng.normal(size=(4, 3, 3, 2))), training=True)
    assert keras_layer.bn._fusable  # a positive feature axis reaches the kernel too


class _Masked(torch.nn.Module):
    """A layer called with a fixed padding mask (checkpoint passes the input alone)."""

    def __init__(self, layer, mask):
        super().__init__()
        self.layer, self.mask = layer, mask

    def forward(self, x):
        return self.layer(x, mask=self.mask)


@pytest.mark.parametrize("case", [
    dict(shape=(4, 3, 5), options=dict(virtual_batch_size=2)),  # _forward_fused_contiguous
    dict(shape=(4, 3, 5), options=dict(virtual_batch_size=2, momentum=None)),
    dict(shape=(4, 3, 2, 2), options=dict(virtual_batch_size=2), channels_last=True),  # the general fused route
    dict(shape=(4, 5, 3), options=dict(unbiased_running_var=False, axis=-1)),  # _forward_fused_plain
    dict(shape=(4, 2, 2, 3), options=dict(axis=-1)),  # plain features-last, rank 4
    dict(shape=(4, 5, 3), options=dict(axis=-1), mask=True),
], ids=lambda case: str(case))
def test_checkpoint_stopping_at_the_kernel_counts_the_recomputed_step_as_torch_nn(fused_kernels, case):
    """Non-reentrant checkpointing stops its recomputation once the block's saved tensors are all recomputed; when
    nothing after the layer saves any, that is inside the kernel's call, after it moved the buffers. The count came
    after the call and was skipped: the buffers of two forwards with a count of one (torch.nn's BN counts first: two),
    so ``momentum=None``'s next average was wrong. Oracle: the same layer, not checkpointed, run twice (decisions.md,
    activation checkpointing: the buffers of two forwards)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    shape, options = case["shape"], dict(case["options"])
    axis = options.get("axis", 1)
    layer = normkit.BatchNorm(shape[axis], **options).double()
    mask = None
    if case.get("mask"):
        mask = torch.rand(shape[:-1]) < 0.7
        layer = _Masked(layer, mask)
    plain = copy.deepcopy(layer)
    x = torch.randn(shape, dtype=torch.float64)
    if case.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    leaf = x.clone().requires_grad_()
    # (nothing in the block saves a tensor after the layer: the recomputation stops at the kernel's saved tensors)
    checkpoint(layer, leaf, use_reentrant=False).square().sum().backward()
    plain(x.clone().requires_grad_())
    plain(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        got_buffer, want_buffer = (getattr(getattr(m, "layer", m), name) for m in (layer, plain))
        torch.testing.assert_close(got_buffer, want_buffer, rtol=1e-12, atol=1e-12, msg=name)
    assert int(getattr(layer, "layer", layer).num_batches_tracked) == 2


@pytest.mark.parametrize("shape, axis", [((4, 5, 3), -1), ((4, 3, 5), 1)])
def test_a_mask_refilled_before_the_backward_leaves_the_step_s_gradient_as_aten_s_paths(fused_kernels, shape, axis,
                                                                                          rng):
    """One mask buffer refilled for the next micro-batch before the backward (gradient accumulation): the kernels
    saved the caller's mask itself and the backward raised autograd's "modified by an inplace operation" about a
    tensor the user never handed to autograd, where ATen's paths keep what they derived from it. They save a copy:
    the gradients of the step as it ran (oracle: the reference with the mask of the forward)."""
    layer = normkit.BatchNorm(shape[axis], axis=axis).double()
    kept = tuple(size for i, size in enumerate(shape) if i != axis % len(shape))
    mask = torch.tensor(rng.uniform(size=kept) < 0.7)
    mask.view(-1)[0] = True
    used = mask.clone()
    x = torch.tensor(rng.normal(size=shape), requires_grad=True)
    g = torch.tensor(rng.normal(size=shape))
    y = layer(x, mask=mask)
    mask.copy_(~mask)  # (the next micro-batch's padding, in the same buffer)
    y.backward(g)
    full = used.unsqueeze(axis % len(shape)).expand(shape).numpy()
    want = R.batch_norm_backward(g.numpy(), x.detach().numpy(), np.zeros(shape[axis]), np.ones(shape[axis]),
                                 np.ones(shape[axis]), np.zeros(shape[axis]), training=True, axis=axis, mask=full)
    for got, expected in zip((x.grad, layer.weight.grad, layer.bias.grad), want, strict=True):
        assert_close(got, expected)
