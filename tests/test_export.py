"""Deploying normkit layers: torch.export and torch.jit.trace give the eager layer's results; torch.jit.script says what to use.

The oracle is the eager layer itself (tested against the NumPy reference elsewhere), stepped on the same data
as the exported program: outputs, input and parameter gradients, and every buffer."""

import copy
import warnings

import numpy as np
import pytest
import torch

import normkit
from normkit import reference as R
from normkit.keras import BatchNormalization

# name: (layer factory, input shape)
LAYERS = {
    "BatchNorm2d": (lambda: normkit.BatchNorm2d(4), (8, 4, 5, 5)),
    "BatchNorm axis=-1": (lambda: normkit.BatchNorm(4, axis=-1), (8, 5, 5, 4)),
    "renorm with clipping": (lambda: normkit.BatchNorm2d(4, renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}),
                             (8, 4, 5, 5)),
    "ghost batches": (lambda: normkit.BatchNorm2d(4, virtual_batch_size=4), (8, 4, 5, 5)),
    "momentum None": (lambda: normkit.BatchNorm1d(4, momentum=None), (8, 4)),
    "frozen": (lambda: normkit.BatchNorm2d(4).freeze(), (8, 4, 5, 5)),
    "LayerNorm": (lambda: normkit.LayerNorm([4, 5]), (8, 3, 4, 5)),
    "GroupNorm": (lambda: normkit.GroupNorm(2, 4), (8, 4, 5)),
    "InstanceNorm2d with stats": (lambda: normkit.InstanceNorm2d(4, affine=True, track_running_stats=True),
                                  (8, 4, 5, 5)),
    "Keras layer": (lambda: BatchNormalization(momentum=0.9, dtype="float64"), (8, 5, 4)),
}


def _layer(name):
    make, shape = LAYERS[name]
    layer = make().double()
    layer(torch.zeros(shape, dtype=torch.float64))  # (builds the Keras layer; a step for the rest)
    return layer, shape


def _step(module, params, x, g):
    leaf = x.clone().requires_grad_()
    y = module(leaf)
    return [y, *torch.autograd.grad(y, [leaf, *params], g)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_exported_program_steps_as_the_eager_layer(name, training):
    layer, shape = _layer(name)
    layer.train(training)
    _assert_exported_steps_as_eager(layer, shape, np.random.default_rng(0))


class _Masked(torch.nn.Module):
    """A layer called with a fixed mask (the exported program's input is the tensor alone)."""

    def __init__(self, layer, mask):
        super().__init__()
        self.layer = layer
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        return self.layer(x, mask=self.mask)


_PADDING = torch.arange(6).reshape(1, 1, 6) < torch.tensor([6, 4, 5, 3, 6, 2, 6, 5]).reshape(8, 1, 1)

# Training paths whose eager gradient comes from a Python autograd.Function (torch.export keeps a Function's
# forward and drops its backward): exported, they must take a differentiable composite.
FUNCTION_PATHS = {
    "padding mask": (lambda: _Masked(normkit.BatchNorm1d(4), _PADDING), (8, 4, 6)),
    "ghost batches + mask": (lambda: _Masked(normkit.BatchNorm1d(4, virtual_batch_size=4), _PADDING), (8, 4, 6)),
    "mask varying along the features": (
        lambda: _Masked(normkit.BatchNorm1d(4), torch.rand(8, 4, 6, generator=torch.Generator().manual_seed(0)) > 0.3),
        (8, 4, 6)),
    "renorm, 2^14 values": (lambda: normkit.BatchNorm2d(4, renorm=True), (16, 4, 16, 16)),
    "biased running variance, 2^14 values": (lambda: normkit.BatchNorm2d(4, unbiased_running_var=False),
                                             (16, 4, 16, 16)),
}


@pytest.mark.parametrize("name", list(FUNCTION_PATHS))
def test_exported_training_step_keeps_the_gradient_through_the_statistics(name):
    make, shape = FUNCTION_PATHS[name]
    layer = make().double().train()
    _assert_exported_steps_as_eager(layer, shape, np.random.default_rng(2))


class _Functional(torch.nn.Module):
    """normkit.functional.batch_norm in training mode with a weight, as a model's own forward calls it."""

    def __init__(self, features):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, features, dtype=torch.float64))
        self.register_buffer("running_mean", torch.zeros(features, dtype=torch.float64))
        self.register_buffer("running_var", torch.ones(features, dtype=torch.float64))

    def forward(self, x):
        return normkit.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, None, True)


@pytest.mark.parametrize("build", ["layer", "functional"])
@pytest.mark.parametrize("shape, order", [((4, 3, 5, 1), (0, 2, 1, 3)), ((4, 3, 2, 1, 2), (0, 2, 4, 1, 3))])
def test_exported_program_gives_the_reference_gradient_for_odd_strides_on_size_one_dims(build, shape, order):
    """(N, L, C) data permuted and unsqueezed, channels_last memory whose size-1 dims carry other strides: torch
    2.13's CPU batch-norm backward (the exported program's) returned a wrong input gradient for it unless the input
    is given channels_last's own strides first; functional.batch_norm's exported program skipped that repair."""
    rng = np.random.default_rng(3)
    x_np, g_np = rng.normal(size=shape) * 2 + 1, rng.normal(size=shape)

    def stored():  # the values of x_np, in memory in the axis order ``order``
        return torch.tensor(np.ascontiguousarray(x_np.transpose(order))).permute(
            tuple(order.index(axis) for axis in range(len(shape))))

    model = normkit.BatchNorm(3).double() if build == "layer" else _Functional(3)
    program = torch.export.export(model, (stored(),)).module()
    leaf = stored().requires_grad_()
    program(leaf).backward(torch.tensor(g_np))
    gamma = model.weight.detach().numpy()
    expected = R.batch_norm_backward(g_np, x_np, np.zeros(3), np.ones(3), gamma, None, True, 1e-5)[0]
    np.testing.assert_allclose(leaf.grad.numpy(), expected, rtol=1e-10, atol=1e-12)


# Plain training BN decomposes to ATen's functional batch norm, which autograd cannot run with the running
# buffers it updates (torch.nn.BatchNorm2d's program fails too, on a buffer updated in place: PyTorch does not
# promise autograd through decomposed programs). Every other layer's decomposed training step is differentiable.
DECOMPOSED_TRAINING = [name for name in LAYERS if name not in ("BatchNorm2d", "BatchNorm axis=-1")]


@pytest.mark.parametrize("name", DECOMPOSED_TRAINING)
def test_a_decomposed_training_program_steps_as_the_eager_layer(name):
    """run_decompositions() (ATen's core ops, as backends lower them) keeps the step and its gradients."""
    layer, shape = _layer(name)
    _assert_exported_steps_as_eager(layer.train(), shape, np.random.default_rng(1), decomposed=True)


def test_a_clipping_schedule_cannot_be_exported_for_training_and_says_so():
    layer = normkit.BatchNorm1d(3, renorm=True, renorm_clipping={"rmax": lambda step: 1.0 + step / 100})
    with pytest.raises(RuntimeError, match="cannot trace a renorm_clipping schedule.*export in eval mode"):
        torch.export.export(layer, (torch.randn(8, 3),))
    torch.export.export(layer.eval(), (torch.randn(8, 3),))  # (inference uses no clipping)


def _assert_exported_steps_as_eager(layer, shape, rng, decomposed=False):
    """Three steps of the exported program and of the eager layer on the same data: outputs, gradients, buffers."""
    eager = copy.deepcopy(layer)
    example = torch.tensor(rng.normal(size=shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (export's notes on mutated buffers)
        exported = torch.export.export(layer, (example,))
        program = (exported.run_decompositions() if decomposed else exported).module()
    exported_params = [p for p in program.parameters() if p.requires_grad]
    eager_params = [p for p in eager.parameters() if p.requires_grad]
    assert len(exported_params) == len(eager_params)
    for step in range(3):
        x = torch.tensor(rng.normal(size=shape) * (step + 2) + step)
        g = torch.tensor(rng.normal(size=shape))
        for got, want in zip(_step(program, exported_params, x, g), _step(eager, eager_params, x, g), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        exported_buffers = dict(program.named_buffers())
        for buffer_name, want in eager.named_buffers():
            torch.testing.assert_close(exported_buffers[buffer_name], want, rtol=1e-10, atol=1e-10, msg=buffer_name)


@pytest.mark.parametrize("name", list(LAYERS))
def test_traced_inference_module_equals_the_eager_layer(name):
    rng = np.random.default_rng(1)
    layer, shape = _layer(name)
    layer.eval()
    example = torch.tensor(rng.normal(size=shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (tracer warnings about Python values in shape checks)
        traced = torch.jit.trace(layer, example)
    x = torch.tensor(rng.normal(2.0, 3.0, size=shape))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_torchscript_scripting_says_what_to_use_instead(name):
    layer, _ = _layer(name)
    model = torch.nn.Sequential(torch.nn.Identity(), layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.jit.script's own deprecation warning)
        with pytest.raises(TypeError, match=r"torch.jit.script cannot compile .*torch\.export\.export.*torch.jit.trace"):
            torch.jit.script(model)
    assert model[1] is layer  # (the model is left as it was)


_TRACED_GROUP_NORM_STEP = """
import sys, torch, normkit
example_kind, memory_format, path = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
layer = normkit.GroupNorm(2, 4)
with torch.no_grad():
    layer.weight.uniform_(0.5, 2.0), layer.bias.uniform_(-1.0, 1.0)
shape = (2, 4, 3, 5) if memory_format == torch.channels_last else (2, 4, 3, 2, 5)
x = torch.randn(shape).contiguous(memory_format=memory_format)  # (data from a loader: no gradient)
g = torch.randn(shape)
example = x if example_kind == "the data" else torch.randn(shape).requires_grad_()
traced = torch.jit.trace(layer, example, check_trace=False)
y = traced(x)
y.backward(g)
torch.save({"state": layer.state_dict(), "x": x, "g": g, "y": y.detach(),
            "grads": [layer.weight.grad, layer.bias.grad], "x_grad": x.grad}, path)
"""


@pytest.mark.parametrize("memory_format", ["channels_last", "channels_last_3d"])
@pytest.mark.parametrize("example", ["the data", "contiguous, requiring a gradient"])
def test_traced_group_norm_trains_its_weights_on_channels_last_data_without_gradient(example, memory_format,
                                                                                       tmp_path):
    """A GroupNorm traced for training (torch.jit.trace, weights requiring gradients) and stepped on channels-last
    data that needs no gradient: the eager layer's workaround for torch 2.13's CPU backward (which ends the process
    there) is a requires_grad_ that the trace does not record, so the traced backward ended the process too (a
    segmentation fault; torch.nn's traced GroupNorm's as well). Run in a subprocess, which must survive and give
    torch.nn's output and the weights' gradients torch.nn computes from the contiguous input."""
    import subprocess
    import sys

    path = tmp_path / "step.pt"
    result = subprocess.run([sys.executable, "-c", _TRACED_GROUP_NORM_STEP, example, memory_format, str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the traced step ended with {result.returncode}: {result.stderr[-2000:]}"
    saved = torch.load(path)
    theirs = torch.nn.GroupNorm(2, 4)
    theirs.load_state_dict(saved["state"])
    y = theirs(saved["x"].contiguous())
    y.backward(saved["g"])
    torch.testing.assert_close(saved["y"], y.detach())
    torch.testing.assert_close(saved["grads"], [theirs.weight.grad, theirs.bias.grad])
    assert saved["x_grad"] is None
