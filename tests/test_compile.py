"""Under torch.compile every layer traces as one graph (fullgraph=True) and computes what it computes eagerly.

The eager results are themselves checked against the NumPy reference by the rest of the suite.
Most cases compile with the ``aot_eager`` backend (Dynamo's capture and AOTAutograd, no code
generation: fast); a few go through inductor, whose generated kernels compute the statistics
differently (and lose float32 variance far from zero, which normkit's compiled graphs avoid).
"""

import pytest
import torch

import normkit
import normkit.keras
from normkit.stats import RenormClipping

from oracle import assert_close, to_numpy

torch._dynamo.config.cache_size_limit = 64  # one test module compiles many small graphs


def _adjust(shape):
    return torch.full((1, shape[1], 1), 1.5), torch.full((1, shape[1], 1), -0.25)


def _without_running_buffers(build):
    """A layer whose running buffers were set to None after construction (torch.nn's layer then normalizes by the
    batch and still counts the steps)."""
    def built():
        layer = build()
        layer.running_mean = layer.running_var = None
        return layer
    return built


# name: (layer factory, input shape, mask shape or None, whole graph?)
CASES = {
    "BatchNorm1d (N, C)": (lambda: normkit.BatchNorm1d(6), (9, 6), None, True),
    "BatchNorm2d": (lambda: normkit.BatchNorm2d(4), (8, 4, 5, 5), None, True),
    "BatchNorm3d": (lambda: normkit.BatchNorm3d(3), (4, 3, 2, 3, 4), None, True),
    "axis=-1 (N, T, C)": (lambda: normkit.BatchNorm(5, axis=-1), (6, 7, 5), None, True),
    "axis=-1 NHWC": (lambda: normkit.BatchNorm(5, axis=-1), (6, 3, 4, 5), None, True),
    "tuple axis": (lambda: normkit.BatchNorm((3, 4), axis=(1, -1)), (6, 3, 5, 4), None, True),
    "no running stats": (lambda: normkit.BatchNorm2d(4, track_running_stats=False), (8, 4, 3, 3), None, True),
    "renorm clipped": (lambda: normkit.BatchNorm(4, renorm=True, renorm_clipping={"rmax": 1.1, "rmin": 0.9,
                                                                                   "dmax": 0.1}),
                       (8, 4, 5, 5), None, True),
    "renorm, folded path": (lambda: normkit.BatchNorm(16, renorm=True), (32, 16, 8, 8), None, True),
    "ghost strided": (lambda: normkit.BatchNorm(4, virtual_batch_size=4), (8, 4, 5, 5), None, True),
    "ghost contiguous + renorm": (lambda: normkit.BatchNorm(4, virtual_batch_size=2, ghost_layout="contiguous",
                                                            renorm=True), (8, 4, 3), None, True),
    "adjustment": (lambda: normkit.BatchNorm(4, adjustment=_adjust), (8, 4, 3), None, True),
    "padding mask": (lambda: normkit.BatchNorm(4, axis=-1), (6, 7, 4), (6, 7), True),
    "padding mask + renorm": (lambda: normkit.BatchNorm(4, axis=-1, renorm=True), (6, 7, 4), (6, 7), True),
    "Keras layer": (lambda: normkit.keras.BatchNormalization(momentum=0.9, renorm=True, dtype=torch.float64),
                    (6, 7, 4), None, True),
    "frozen": (lambda: normkit.BatchNorm2d(4).freeze(), (8, 4, 3, 3), None, True),
    "synchronized, no process group": (lambda: normkit.BatchNorm(4, synchronized=True), (8, 4, 3), None, True),
    "LayerNorm": (lambda: normkit.LayerNorm((4, 5)), (6, 4, 5), None, True),
    "GroupNorm": (lambda: normkit.GroupNorm(2, 4), (6, 4, 5), None, True),
    "InstanceNorm2d with stats": (lambda: normkit.InstanceNorm2d(4, affine=True, track_running_stats=True),
                                  (6, 4, 3, 3), None, True),
    # The cumulative average's weight 1/t stays a tensor when traced: one graph (torch.nn's layer breaks here).
    "momentum None": (lambda: normkit.BatchNorm2d(4, momentum=None), (8, 4, 3, 3), None, True),
    "momentum None, renorm and ghosts": (lambda: normkit.BatchNorm2d(4, momentum=None, renorm=True, virtual_batch_size=4),
                                         (8, 4, 3, 3), None, True),
    "momentum None, running buffers set to None": (_without_running_buffers(lambda: normkit.BatchNorm2d(4, momentum=None)),
                                                   (8, 4, 3, 3), None, True),
    "momentum None, masked": (lambda: normkit.BatchNorm(4, momentum=None, axis=-1), (8, 6, 4), (8, 6), True),
    # Clipping schedules trace with the step count as a symbol (the bounds reach r and d as a tensor).
    "clipping schedule": (lambda: normkit.BatchNorm(4, renorm=True, renorm_clipping={
        "rmax": lambda step: 1.0 + step / 10, "rmin": lambda step: 1.0 / (1.0 + step / 10),
        "dmax": lambda step: step / 20}), (8, 4, 3), None, True),
    "paper clipping schedule": (lambda: normkit.BatchNorm(4, renorm=True, renorm_clipping=(
        RenormClipping.paper_schedule(0.0001))), (8, 4, 3), None, True),  # ramps over steps 0.5 to 4
}


def _step(layer, x, g, mask):
    leaf = x.clone().requires_grad_(True)
    y = layer(leaf) if mask is None else layer(leaf, mask=mask)
    params = [p for p in layer.parameters() if p.requires_grad]
    return [y, *torch.autograd.grad(y, [leaf, *params], g)]


def _assert_compiled_equals_eager(build, shape, mask_shape, fullgraph, backend, dtype, rng, steps=3):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, compiled_layer = build().to(dtype), build().to(dtype)
    x0 = torch.zeros(shape, dtype=dtype)
    eager(x0) if mask_shape is None else eager(x0, mask=torch.ones(mask_shape, dtype=torch.bool))  # builds lazy layers
    compiled_layer(x0) if mask_shape is None else compiled_layer(x0, mask=torch.ones(mask_shape, dtype=torch.bool))
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, backend=backend, fullgraph=fullgraph)
    for step in range(steps):
        x = torch.as_tensor(rng.normal(size=shape) * (step + 1) + step, dtype=dtype)
        g = torch.as_tensor(rng.normal(size=shape), dtype=dtype)
        mask = None if mask_shape is None else torch.as_tensor(rng.uniform(size=mask_shape) > 0.3)
        for got, want in zip(_step(compiled, x, g, mask), _step(eager, x, g, mask), strict=True):
            assert_close(got, to_numpy(want), dtype)
        for (name, got), want in zip(compiled_layer.state_dict().items(), eager.state_dict().values()):
            assert_close(got, to_numpy(want), dtype, err_msg=name)
    eager.eval(), compiled_layer.eval()
    x = torch.as_tensor(rng.normal(size=shape), dtype=dtype)
    with torch.no_grad():
        assert_close(compiled(x), to_numpy(eager(x)), dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_graph_equals_eager(name, rng):
    build, shape, mask_shape, fullgraph = CASES[name]
    _assert_compiled_equals_eager(build, shape, mask_shape, fullgraph, "aot_eager", torch.float64, rng)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["BatchNorm2d", "ghost contiguous + renorm", "padding mask + renorm",
                                  "paper clipping schedule"])
def test_inductor_kernels_equal_eager(name, rng):
    build, shape, mask_shape, fullgraph = CASES[name]
    _assert_compiled_equals_eager(build, shape, mask_shape, fullgraph, "inductor", torch.float32, rng, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "padding mask"])
def test_compiled_statistics_stay_exact_far_from_zero(masked):
    """float32 data with mean 1e4 and std 1e-2: the compiled layer's variance is within 1e-3 of the
    float64 one (inductor's own statistics are off by several percent here; compiled torch.nn too).
    With a padding mask the compiled graph takes the composite pipeline, which recenters too."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(128, 3, 8, 8)).float()
    mask = torch.ones(128, 1, 8, 8, dtype=torch.bool)
    if masked:
        mask[::3, :, 5:] = False
    layer = normkit.BatchNorm2d(3, momentum=1.0)
    y = torch.compile(layer, fullgraph=True)(x, mask=mask) if masked else torch.compile(layer, fullgraph=True)(x)
    valid = x.double().permute(1, 0, 2, 3)[:, mask[:, 0]]  # (C, valid positions)
    expected = valid.var(dim=1, unbiased=True)
    relative = ((layer.running_var.double() - expected).abs() / expected).max().item()
    assert relative < 1e-3
    biased = valid.var(dim=1, unbiased=False).reshape(1, 3, 1, 1)
    normalized = (x.double() - valid.mean(dim=1).reshape(1, 3, 1, 1)) / (biased + layer.eps).sqrt()
    keep = mask.expand_as(x)
    assert_close(y[keep], to_numpy(normalized[keep]), torch.float32, rtol=1e-3, atol=1e-3)


def test_an_unbuilt_keras_layer_compiles(rng):
    """The first call builds the layer (outside the graph: one graph break); the compiled layer then trains as
    an eager one. With fullgraph=True the layer must be built first (documented), and then compiles whole."""
    torch._dynamo.reset()
    compiled_layer, eager = normkit.keras.BatchNormalization(momentum=0.5), normkit.keras.BatchNormalization(momentum=0.5)
    compiled = torch.compile(compiled_layer, backend="aot_eager")
    for _ in range(2):
        x = torch.tensor(rng.normal(size=(6, 4)) * 2 + 1, dtype=torch.float32)
        torch.testing.assert_close(compiled(x, training=True), eager(x, training=True))
    for ours, theirs in zip(compiled_layer.get_weights(), eager.get_weights(), strict=True):
        assert_close(ours, theirs, torch.float32)

    torch._dynamo.reset()
    unbuilt = torch.compile(normkit.keras.BatchNormalization(), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="_build_on_first_call"):
        unbuilt(torch.randn(6, 4), training=True)
    built = normkit.keras.BatchNormalization()
    built.build((6, 4))
    x = torch.randn(6, 4)
    torch.testing.assert_close(torch.compile(built, backend="aot_eager", fullgraph=True)(x, training=True),
                               normkit.keras.BatchNormalization()(x, training=True))


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
def test_ghost_batches_compile_once_for_every_batch_size(layout, rng):
    """dynamic=True: one graph serves every batch size (the ghost-group count stays symbolic), equal to eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_layer = normkit.BatchNorm(4, virtual_batch_size=4, ghost_layout=layout).double()
    eager = normkit.BatchNorm(4, virtual_batch_size=4, ghost_layout=layout).double()
    compiled = torch.compile(compiled_layer, backend="aot_eager", dynamic=True)
    for batch in (8, 12, 16, 20):
        x = torch.tensor(rng.normal(size=(batch, 4, 3)) * 2 + 1)
        torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("memory_format, shape", [(torch.channels_last, (2, 4, 3, 3)),
                                                  (torch.channels_last_3d, (2, 4, 3, 2, 3))])
def test_group_norm_of_a_channels_last_input_without_gradient_compiles_and_trains(memory_format, shape, rng):
    """A channels-last CPU input without gradient into a GroupNorm with trainable weights, compiled whole: the
    output and the weights' gradients are torch.nn's from the contiguous input, the output in the input's layout.
    (Eager normkit sidestepped torch 2.13's crashing backward for this input, but compiled it still ended the
    process: a segmentation fault.)"""
    torch._dynamo.reset()
    ours, theirs = normkit.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4)
    with torch.no_grad():
        ours.weight.copy_(torch.as_tensor(rng.normal(size=4)))
        ours.bias.copy_(torch.as_tensor(rng.normal(size=4)))
    theirs.load_state_dict(ours.state_dict())
    x = torch.tensor(rng.normal(size=shape), dtype=torch.float32).contiguous(memory_format=memory_format)
    g = torch.tensor(rng.normal(size=shape), dtype=torch.float32)
    y = torch.compile(ours, backend="aot_eager", fullgraph=True)(x)
    assert y.is_contiguous(memory_format=memory_format)
    y.backward(g)
    expected = theirs(x.contiguous())
    expected.backward(g)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    assert x.grad is None and not x.requires_grad


# name: (float32 layer factory, input shape)
MIXED_PRECISION = {
    "BatchNorm2d": (lambda: normkit.BatchNorm2d(4), (8, 4, 3, 3)),
    "ghost batches": (lambda: normkit.BatchNorm(4, virtual_batch_size=4), (8, 4, 3)),
    "renorm": (lambda: normkit.BatchNorm(4, renorm=True), (8, 4, 3)),
    "biased running variance": (lambda: normkit.BatchNorm(4, unbiased_running_var=False), (8, 4, 3)),
}


@pytest.mark.parametrize("input_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(MIXED_PRECISION))
def test_compiled_mixed_precision_steps_keep_float32_statistics(name, input_dtype, rng):
    """Half-precision input into a float32 layer (mixed precision), compiled: the running statistics and the
    parameters' gradients are float32 quantities of the input's values, as in an eager call (which ATen computes in
    float32); the oracle is the float64 layer stepped on the same values. Compiled graphs recenter every call, and
    the residuals were rounded to half precision: statistics and gamma's gradient a thousand times further off."""
    build, shape = MIXED_PRECISION[name]
    torch._dynamo.reset()
    compiled_layer = build()
    oracle = build().double()
    oracle.load_state_dict(compiled_layer.state_dict())
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    for step in range(3):
        x = torch.tensor(rng.normal(size=shape) * (step + 1) + step).to(input_dtype)
        g = torch.tensor(rng.normal(size=shape)).to(input_dtype)
        got = _step(compiled, x, g, None)
        want = _step(oracle, x.double(), g.double(), None)
        assert_close(got[0], to_numpy(want[0]), input_dtype, err_msg="output")
        assert_close(got[1], to_numpy(want[1]), input_dtype, err_msg="input gradient")
        for got_grad, want_grad in zip(got[2:], want[2:], strict=True):
            assert_close(got_grad, to_numpy(want_grad), torch.float32, err_msg="parameter gradient")
        for (buffer_name, got_buffer), want_buffer in zip(compiled_layer.state_dict().items(),
                                                          oracle.state_dict().values(), strict=True):
            assert_close(got_buffer, to_numpy(want_buffer), torch.float32, err_msg=buffer_name)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("pad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_compiled_eval_keeps_nonfinite_padding_out_of_the_weight_gradient(pad, backend, rng):
    """In eval a mask names no statistic but still the padding: NaN or inf padded values that the loss ignores
    must not reach gamma's gradient, compiled as eagerly (the compiled graph skipped the eager guard, a
    data-dependent step with a hook: gamma's gradient was NaN; found by tools/fuzz_batch_norm.py --family compile).
    A nonzero gradient on a padded output gives that channel NaN, as the math and the eager layer do."""
    torch._dynamo.reset()
    eager = normkit.BatchNorm(4, axis=-1).double()
    with torch.no_grad():
        eager.weight.copy_(torch.as_tensor(rng.normal(size=4)))
        eager.running_mean.copy_(torch.as_tensor(rng.normal(size=4)))
    compiled_layer = normkit.BatchNorm(4, axis=-1).double()
    compiled_layer.load_state_dict(eager.state_dict())
    eager.eval(), compiled_layer.eval()
    compiled = torch.compile(compiled_layer, backend=backend, fullgraph=True, dynamic=False)
    mask = torch.as_tensor(rng.uniform(size=(6, 5)) > 0.3)
    x = torch.as_tensor(rng.normal(size=(6, 5, 4))).masked_fill(~mask[..., None], pad)
    for poke in (False, True):
        g = torch.as_tensor(rng.normal(size=(6, 5, 4))).masked_fill(~mask[..., None], 0.0)
        if poke:
            g[~mask] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # channel 0 reads the padding
        got, want = _step(compiled, x, g, mask), _step(eager, x, g, mask)
        valid = mask[..., None].expand_as(x)
        assert_close(got[0][valid], to_numpy(want[0][valid]), torch.float64)
        for ours, theirs in zip(got[1:], want[1:], strict=True):
            assert_close(ours, to_numpy(theirs), torch.float64)
        assert got[2][1:].isfinite().all() and got[2][0].isnan() == poke


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, axis, layout", [
    ((4, 2, 2, 1, 3), -1, "channels_last_3d"), ((4, 2, 2, 1, 3), 1, "channels_last_3d"),
    ((4, 3, 5, 1), 1, "odd strides"), ((4, 3, 5, 1), -1, "odd strides")])
def test_channels_last_inputs_with_a_size_1_dim_compile(shape, axis, layout, train, rng):
    """The eager layer's repair of channels_last inputs with a size-1 dim (for ATen's CPU backward, which compiled
    graphs do not run) is left out of compiled graphs: traced, its flat view became a ``view`` of the gradient in
    AOTAutograd's backward that failed on the gradient's run-time strides ("view size is not compatible", aot_eager,
    channels_last_3d (4, 2, 2, 1, 3); found by tools/fuzz_batch_norm.py --family compile). Gradients equal eager's,
    on the odd-strides layout that misleads ATen's backward too."""
    def laid(t):
        if layout == "channels_last_3d":
            return t.contiguous(memory_format=torch.channels_last_3d)
        # (N, L, C) data permuted and unsqueezed to (N, C, L, 1): strides (L*C, 1, C, 1)
        return t.squeeze(-1).transpose(1, 2).contiguous().transpose(1, 2).unsqueeze(-1)

    torch._dynamo.reset()
    features = shape[axis]
    eager = normkit.BatchNorm(features, axis=axis).double()
    with torch.no_grad():
        eager.weight.copy_(torch.as_tensor(rng.normal(size=features)))
        eager.running_var.fill_(2.0)
    compiled_layer = normkit.BatchNorm(features, axis=axis).double()
    compiled_layer.load_state_dict(eager.state_dict())
    eager.train(train), compiled_layer.train(train)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True, dynamic=False)
    x, g = laid(torch.as_tensor(rng.normal(size=shape))), laid(torch.as_tensor(rng.normal(size=shape)))
    for got, want in zip(_step(compiled, x, g, None), _step(eager, x, g, None), strict=True):
        assert_close(got, to_numpy(want), torch.float64)
    assert_close(compiled_layer.running_var, to_numpy(eager.running_var), torch.float64)


@pytest.mark.parametrize("features, first_batch", [(2, 2), (3, 4)], ids=["batch = features", "length = features"])
def test_masked_layer_compiles_with_dynamic_shapes(features, first_batch, rng):
    """dynamic=True with a mask, the feature count equal to another size of the input: the mask check
    (``axes.broadcasts_to``) refused every fitting mask when traced ("cannot broadcast", a ValueError; found by
    tools/fuzz_batch_norm.py --family compile). One graph then serves the batch sizes, equal to eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = normkit.BatchNorm(features, axis=1).double()
    compiled_layer = normkit.BatchNorm(features, axis=1).double()
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (first_batch, 7, 5):
        x = torch.as_tensor(rng.normal(size=(batch, features, 3)))
        g = torch.as_tensor(rng.normal(size=(batch, features, 3)))
        mask = torch.as_tensor(rng.uniform(size=(batch, 3)) > 0.3)
        for got, want in zip(_step(compiled, x, g, mask), _step(eager, x, g, mask), strict=True):
            assert_close(got, to_numpy(want), torch.float64)
    assert_close(compiled_layer.running_var, to_numpy(eager.running_var), torch.float64)
    # (a first batch of the feature count's size: Dynamo's duck sizing gives both one symbol, and the next batch size
    # compiles once more)
    assert counters["stats"]["unique_graphs"] == (2 if first_batch == features else 1)


@pytest.mark.parametrize("make, shape", [(lambda: normkit.LayerNorm(16), (3, 16)), (lambda: normkit.GroupNorm(2, 4), (3, 4, 5)),
                                         (lambda: normkit.InstanceNorm1d(4), (3, 4, 5))],
                         ids=["LayerNorm", "GroupNorm", "InstanceNorm1d"])
def test_sample_norms_compile_once_after_eager_calls(make, shape):
    """The check of where the data sits counts calls down in the layer's __dict__; traced, Dynamo guarded on the count
    and compiled the layer again at every call (until its recompile limit ran it eagerly)."""
    import torch._dynamo
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    layer = make()
    x = torch.randn(shape) + 100.0  # (far from zero: the eager calls recenter)
    expected = layer(x)
    compiled = torch.compile(layer, backend=backend)
    for _ in range(5):
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
    assert len(graphs) == 1
    torch._dynamo.reset()
