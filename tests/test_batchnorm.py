"""normkit.BatchNorm against the NumPy reference (float64) and torch.nn, over a table of cases.

Each case runs two training or eval steps and checks the output, the input gradient, the
weight/bias gradients and every running buffer.
"""

import itertools
import math

import numpy as np
import pytest
import torch

import normkit
from normkit import reference as R

from oracle import assert_close, to_numpy

# Every test runs on ATen's paths and again with normkit.kernels on (conftest.py), which takes
# features-last training of rank >= 4.
pytestmark = pytest.mark.usefixtures("execution")

TORCH_NN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
SHAPES = {2: (6, 3), 3: (4, 3, 5), 4: (3, 3, 4, 2), 5: (2, 3, 2, 3, 2)}


def _cases():
    for rank, axis, training, affine, track, momentum, dtype in itertools.product(
            (2, 3, 4, 5), ("first", "last", "negative", "tuple"), (True, False), (True, False), (True, False),
            (0.1, 0.8, None), (torch.float32, torch.float64)):
        if axis == "tuple" and rank < 3:
            continue
        if not affine and momentum == 0.8 or (dtype == torch.float32 and momentum == 0.8):
            continue  # keep the table small: momentum 0.8 once per layout, affine and float64
        yield pytest.param(rank, axis, training, affine, track, momentum, dtype,
                           id=f"r{rank}-{axis}-{'train' if training else 'eval'}-{'affine' if affine else 'plain'}-"
                              f"{'track' if track else 'notrack'}-m{momentum}-{str(dtype)[6:]}")


def _axis_for(rank, kind):
    return {"first": 1, "last": rank - 1, "negative": -1, "tuple": (1, rank - 1)}[kind]


def _run_case(rank, axis_kind, training, affine, track, momentum, dtype, rng, steps=2, unbiased_running_var=True):
    shape = SHAPES[rank]
    axis = _axis_for(rank, axis_kind)
    axes = (axis % rank,) if isinstance(axis, int) else axis
    feature_shape = tuple(shape[a] for a in axes)
    num_features = feature_shape[0] if len(axes) == 1 else feature_shape
    layer = normkit.BatchNorm(num_features, momentum=momentum, affine=affine, track_running_stats=track, axis=axis,
                              eps=1e-3, unbiased_running_var=unbiased_running_var)
    with torch.no_grad():
        if affine:
            layer.weight.copy_(torch.as_tensor(rng.normal(size=feature_shape)))
            layer.bias.copy_(torch.as_tensor(rng.normal(size=feature_shape)))
        if track:
            layer.running_mean.copy_(torch.as_tensor(rng.normal(size=feature_shape)))
            layer.running_var.copy_(torch.as_tensor(rng.uniform(0.5, 2.0, size=feature_shape)))
    layer.to(dtype)
    layer.train(training)
    ref_mean = to_numpy(layer.running_mean) if track else None
    ref_var = to_numpy(layer.running_var) if track else None
    weight, bias = to_numpy(layer.weight), to_numpy(layer.bias)
    for step in range(1, steps + 1):
        x_np = rng.normal(size=shape) * 3 + 2
        g_np = rng.normal(size=shape)
        x = torch.tensor(x_np, dtype=dtype, requires_grad=True)
        layer.zero_grad()
        y = layer(x)
        y.backward(torch.tensor(g_np, dtype=dtype))
        batch_stats = training or not track
        buffers_used = (not training) or track
        factor = (1.0 / step if momentum is None else momentum) if (training and track) else 0.0
        rm, rv = (ref_mean, ref_var) if buffers_used else (None, None)
        grads = R.batch_norm_backward(g_np, x_np, rm, rv, weight, bias, batch_stats, 1e-3, axis=axis)
        expected = R.batch_norm(x_np, rm, rv, weight, bias, batch_stats, factor, 1e-3, axis=axis,
                                unbiased_running_var=unbiased_running_var)
        assert y.dtype == dtype and y.shape == x.shape
        assert_close(y, expected, dtype)
        assert_close(x.grad, grads[0], dtype)
        if affine:
            assert_close(layer.weight.grad, grads[1], dtype)
            assert_close(layer.bias.grad, grads[2], dtype)
        if track:
            assert_close(layer.running_mean, ref_mean, dtype)
            assert_close(layer.running_var, ref_var, dtype)
            assert int(layer.num_batches_tracked) == (step if training else 0)
    return layer


@pytest.mark.parametrize("rank,axis,training,affine,track,momentum,dtype", list(_cases()))
def test_matches_reference(rank, axis, training, affine, track, momentum, dtype, rng):
    _run_case(rank, axis, training, affine, track, momentum, dtype, rng)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("axis", ["first", "last", "negative"])
@pytest.mark.parametrize("affine, momentum", [(True, 0.1), (False, None), (True, 0.8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_biased_running_variance_matches_reference(rank, axis, affine, momentum, dtype, rng):
    """Keras' biased running variance with no other option (the Keras layer's inner BatchNorm) takes ATen's
    training kernel on scratch buffers and moves the running statistics itself: three steps against the
    reference, buffers included."""
    _run_case(rank, axis, True, affine, True, momentum, dtype, rng, steps=3, unbiased_running_var=False)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine,track,momentum", [(True, True, 0.1), (False, True, None), (True, False, 0.1),
                                                   (False, False, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drop_in_matches_torch_nn(rank, training, affine, track, momentum, dtype, rng):
    """normkit.BatchNorm{1,2,3}d and torch.nn's, same state, same steps: same outputs, grads and buffers."""
    ours_cls = {2: normkit.BatchNorm1d, 3: normkit.BatchNorm1d, 4: normkit.BatchNorm2d, 5: normkit.BatchNorm3d}[rank]
    ours = ours_cls(3, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    theirs = TORCH_NN[rank](3, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    with torch.no_grad():
        for p in list(theirs.parameters()) + [b for b in theirs.buffers() if b.is_floating_point()]:
            p.copy_(torch.as_tensor(rng.uniform(0.5, 1.5, size=p.shape)))
    ours.load_state_dict(theirs.state_dict())
    ours.train(training), theirs.train(training)
    for _ in range(3):
        x = torch.tensor(rng.normal(size=SHAPES[rank]) * 2 + 1, dtype=dtype)
        g = torch.tensor(rng.normal(size=SHAPES[rank]), dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        ya.backward(g), yb.backward(g)
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
        for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=name)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channels_last_input_matches_torch_nn(memory_format, rng):
    x = torch.tensor(rng.normal(size=(4, 8, 5, 5)), dtype=torch.float32).to(memory_format=memory_format)
    ours, theirs = normkit.BatchNorm2d(8), torch.nn.BatchNorm2d(8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ya.is_contiguous(memory_format=memory_format)


# Ghost batches of a channels_last batch on ATen's paths (the conftest switches the fused kernel off): the reshape
# to the (V, G*C, *) or per-group view copied the input, and the output came back contiguous, where torch.nn's
# BatchNorm2d/3d keep channels_last (the next conv's channels_last kernels expect it).
@pytest.mark.parametrize("shape", [(8, 3, 5, 4), (8, 3, 2, 5, 4), (8, 64, 16, 16)], ids=["2d", "3d", "2d-large"])
@pytest.mark.parametrize("options", [{}, {"ghost_layout": "contiguous"}, {"renorm": True},
                                     {"unbiased_running_var": False}],
                         ids=["strided", "contiguous", "renorm", "biased"])
def test_ghost_batches_of_a_channels_last_input_keep_its_memory_format(shape, options, rng):
    memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x_np, g_np = rng.normal(size=shape) * 2 + 1, rng.normal(size=shape)
    x = torch.tensor(x_np).to(memory_format=memory_format).requires_grad_()
    channels = shape[1]
    gamma, beta = np.linspace(0.5, 1.5, channels), np.linspace(-1.0, 1.0, channels)
    layer = normkit.BatchNorm(channels, virtual_batch_size=4, dtype=torch.float64, **options)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(gamma)), layer.bias.copy_(torch.tensor(beta))
    y = layer(x)
    y.backward(torch.tensor(g_np).to(memory_format=memory_format))

    torch_layer = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm3d)(channels, dtype=torch.float64)
    expected_format = torch_layer(x.detach()).is_contiguous(memory_format=memory_format)
    assert expected_format  # (torch.nn's own layer keeps channels_last: the contract)
    assert y.is_contiguous(memory_format=memory_format) == expected_format
    # The values are the reference's ghost batch norm of the same data.
    running_mean, running_var = np.zeros(channels), np.ones(channels)
    ghost = dict(virtual_batch_size=4, ghost_layout=options.get("ghost_layout", "strided"))
    renorm = {"renorm_mean": np.zeros(channels), "renorm_stddev": np.ones(channels)} if options.get("renorm") else {}
    grads = R.batch_norm_backward(g_np, x_np, running_mean.copy(), running_var.copy(), gamma, beta, True, 1e-5,
                                  **ghost, **renorm)
    expected = R.batch_norm(x_np, running_mean, running_var, gamma, beta, True, 0.1, 1e-5, **ghost,
                            unbiased_running_var=options.get("unbiased_running_var", True),
                            moving_stddev=np.ones(channels) if renorm else None, **renorm)
    assert_close(y, expected)
    assert_close(x.grad, grads[0])
    assert_close(layer.weight.grad, grads[1])
    assert_close(layer.bias.grad, grads[2])
    assert_close(layer.running_mean, running_mean)
    assert_close(layer.running_var, running_var)


@pytest.mark.parametrize("batch", [8, 64], ids=["copied-back", "features-last"])
@pytest.mark.parametrize("ghost_layout", ["strided", "contiguous"])
def test_ghost_batches_of_channels_last_samples_under_vmap(batch, ghost_layout, rng):
    """vmap has no memory formats: asked there, is_contiguous(memory_format=channels_last) raised "NYI", so an
    ensemble's channels_last samples failed once the output kept the input's format (each sample's call is the
    oracle, and the reference's ghost batch norm each sample's)."""
    x_np = rng.normal(size=(3, batch, 4, 5, 5)) * 2 + 1
    stacked = torch.tensor(np.ascontiguousarray(x_np.transpose(0, 1, 3, 4, 2))).permute(0, 1, 4, 2, 3)
    assert stacked[0].is_contiguous(memory_format=torch.channels_last) and not stacked[0].is_contiguous()
    layer = normkit.BatchNorm2d(4, virtual_batch_size=4, ghost_layout=ghost_layout, track_running_stats=False,
                                dtype=torch.float64)
    y = torch.func.vmap(layer)(stacked)
    for sample in range(3):
        assert_close(y[sample], R.batch_norm(x_np[sample], None, None, np.ones(4), np.zeros(4), True, 0.1, 1e-5,
                                             virtual_batch_size=4, ghost_layout=ghost_layout))
        torch.testing.assert_close(y[sample], layer(stacked[sample]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("options", [{}, {"renorm": True}, {"unbiased_running_var": False}],
                         ids=["plain", "renorm", "biased"])
# (N, L, C) data permuted and unsqueezed to (N, C, L, 1), and the like: channels_last memory whose size-1 dims
# have other strides than channels_last's, on which torch 2.13's CPU batch-norm backward (torch.nn's too) read
# the gradient in another memory format than the input and returned wrong input and weight gradients
@pytest.mark.parametrize("shape, order", [((4, 3, 5, 1), (0, 2, 1, 3)), ((4, 3, 1, 2), (0, 3, 1, 2)),
                                          ((4, 3, 2, 1, 2), (0, 2, 4, 1, 3))])
def test_channels_last_input_with_odd_strides_on_size_one_dims_has_the_reference_gradients(shape, order, options,
                                                                                            training, rng):
    x_np, g_np = rng.normal(size=shape) * 2 + 1, rng.normal(size=shape)
    # the values of x_np stored in the axis order ``order`` (strides of size-1 dims as that order gives them)
    x = torch.tensor(np.ascontiguousarray(x_np.transpose(order))).permute(tuple(order.index(a) for a in range(len(shape))))
    assert x.is_contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    assert torch.equal(x, torch.tensor(x_np))
    leaf = x.requires_grad_()
    layer = normkit.BatchNorm(3, dtype=torch.float64, **options).train(training)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 1.5]))
    y = layer(leaf)
    y.backward(torch.tensor(g_np))
    renorm = {"renorm_mean": np.zeros(3), "renorm_stddev": np.ones(3)} if options.get("renorm") and training else {}
    grads = R.batch_norm_backward(g_np, x_np, np.zeros(3), np.ones(3), [0.5, 1.0, 1.5], np.zeros(3), training,
                                  1e-5, **renorm)
    assert_close(y, R.batch_norm(x_np, np.zeros(3), np.ones(3), [0.5, 1.0, 1.5], np.zeros(3), training, 0.1, 1e-5,
                                 unbiased_running_var=options.get("unbiased_running_var", True),
                                 moving_stddev=np.ones(3) if renorm else None, **renorm))
    assert_close(leaf.grad, grads[0])
    assert_close(layer.weight.grad, grads[1])
    assert_close(layer.bias.grad, grads[2])


def _stored_in_order(values, order):
    """``values`` (NumPy) as a tensor whose memory holds them in the axis order ``order``: the strides of its size-1
    dims are that order's, not the contiguous or channels_last ones (a permuted and unsqueezed tensor's)."""
    return torch.tensor(np.ascontiguousarray(values.transpose(order))).permute(
        tuple(order.index(a) for a in range(values.ndim)))


# The other side of the case above: a contiguous input (or features-last data whose size-1 dims carry odd strides)
# whose loss gradient arrives channels_last with odd strides on size-1 dims, as when the next layer permutes and
# squeezes the output to (N, L, C): torch 2.13's CPU batch-norm backward (torch.nn's BatchNorm2d/3d too) read the
# two in different memory formats and returned wrong input and weight gradients, in training and eval
ODD_GRADIENT_CASES = [  # (shape, axis, order the input is stored in, order the gradient is stored in)
    ((4, 3, 5, 1), 1, (0, 1, 2, 3), (0, 2, 1, 3)),
    ((1, 3, 5, 6), 1, (0, 1, 2, 3), (2, 3, 0, 1)),
    ((4, 3, 1, 5, 2), 1, (0, 1, 2, 3, 4), (0, 3, 4, 1, 2)),
    ((4, 1, 5, 3), -1, (0, 2, 1, 3), (0, 2, 1, 3)),  # features last, the size-1 dim stored after the next one
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("build", ["layer", "drop-in", "ghost", "functional", "functional-renorm"])
@pytest.mark.parametrize("shape, axis, x_order, g_order", ODD_GRADIENT_CASES)
def test_gradient_with_odd_strides_on_size_one_dims_gives_the_reference_gradients(shape, axis, x_order, g_order,
                                                                                  build, training, rng):
    if build == "drop-in" and axis != 1:
        pytest.skip("torch.nn's drop-ins take the features on dim 1")
    x_np, g_np = rng.normal(size=shape) * 2 + 1, rng.normal(size=shape)
    x, grad = _stored_in_order(x_np, x_order), _stored_in_order(g_np, g_order)
    assert torch.equal(x, torch.tensor(x_np)) and torch.equal(grad, torch.tensor(g_np))
    leaf = x.requires_grad_()
    features = shape[axis]
    gamma = np.linspace(0.5, 1.5, features)
    running = (np.full(features, 0.3), np.full(features, 1.7))
    weight = torch.tensor(gamma, requires_grad=True)
    renorm = {}
    if build == "ghost" and training and shape[0] % 2:
        pytest.skip("two ghost batches need an even batch")
    if build in ("layer", "drop-in", "ghost"):
        layer = (normkit.BatchNorm(features, axis=axis) if build == "layer"
                 else normkit.BatchNorm(features, axis=axis, virtual_batch_size=max(shape[0] // 2, 1)) if build == "ghost"
                 else {4: normkit.BatchNorm2d, 5: normkit.BatchNorm3d}[len(shape)](features)).double().train(training)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.running_mean.fill_(0.3), layer.running_var.fill_(1.7)
        y, weight = layer(leaf), layer.weight
    else:
        if build == "functional-renorm":
            renorm = {"renorm_mean": torch.zeros(features, dtype=torch.float64),
                      "renorm_stddev": torch.ones(features, dtype=torch.float64),
                      "moving_stddev": torch.full((features,), 1.7 ** 0.5, dtype=torch.float64)}
        y = normkit.functional.batch_norm(leaf, *(torch.tensor(r) for r in running), weight, None, training,
                                          axis=axis, **renorm)
    y.backward(grad)
    reference_renorm = ({"renorm_mean": np.zeros(features), "renorm_stddev": np.ones(features)}
                        if renorm and training else {})
    ghost = {"virtual_batch_size": shape[0] // 2} if build == "ghost" and training else {}
    grads = R.batch_norm_backward(g_np, x_np, *running, gamma, None, training, 1e-5, axis=axis, **reference_renorm,
                                  **ghost)
    assert_close(leaf.grad, grads[0])
    assert_close(weight.grad, grads[1])


def test_axis_last_on_nhwc_equals_axis_one_on_nchw(rng):
    x = torch.tensor(rng.normal(size=(4, 6, 5, 3)), dtype=torch.float64)
    last, first = normkit.BatchNorm(3, axis=-1).double(), normkit.BatchNorm(3, axis=1).double()
    y_last = last(x)
    y_first = first(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(y_last, y_first)
    torch.testing.assert_close(last.running_var, first.running_var)


def test_classic_example():
    x = torch.arange(27, dtype=torch.float32).reshape(1, 3, 3, 3)
    bn = normkit.BatchNorm2d(3)
    y = bn(x)
    expected = torch.tensor([-1.5492, -1.1619, -0.7746, -0.3873, 0.0, 0.3873, 0.7746, 1.1619, 1.5492])
    for channel in range(3):
        torch.testing.assert_close(y[0, channel].reshape(-1), expected, atol=5e-5, rtol=0)
    torch.testing.assert_close(bn.running_mean, torch.tensor([0.4, 1.3, 2.2]))
    torch.testing.assert_close(bn.running_var, torch.tensor([1.65, 1.65, 1.65]))


def test_cumulative_average_and_reset():
    """momentum=None: after two batches the buffers are the mean of each batch's statistics."""
    bn = normkit.BatchNorm1d(2, momentum=None).double()
    x1, x2 = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64) * 3 + 1
    bn(x1), bn(x2)
    torch.testing.assert_close(bn.running_mean, (x1.mean(0) + x2.mean(0)) / 2)
    torch.testing.assert_close(bn.running_var, (x1.var(0) + x2.var(0)) / 2)
    bn.reset_running_stats()
    torch.testing.assert_close(bn.running_mean, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(bn.running_var, torch.ones(2, dtype=torch.float64))
    assert int(bn.num_batches_tracked) == 0


def test_eval_is_deterministic_per_sample():
    bn = normkit.BatchNorm2d(3)
    bn(torch.randn(8, 3, 4, 4) * 2 + 1)
    bn.eval()
    x = torch.randn(6, 3, 4, 4)
    torch.testing.assert_close(bn(x)[:2], bn(x[:2]))


def test_flag_flip_follows_torch_nn():
    """track_running_stats flipped to False on a module with buffers: batch stats, no update; eval uses buffers."""
    ours, theirs = normkit.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    ours.track_running_stats = theirs.track_running_stats = False
    x = torch.randn(5, 3)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_zero_batch_returns_empty_and_keeps_buffers():
    bn = normkit.BatchNorm1d(5)
    y = bn(torch.randn(0, 5, 9))
    assert y.shape == (0, 5, 9)
    torch.testing.assert_close(bn.running_mean, torch.zeros(5))


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_features_last_any_memory_layout(rank, rng):
    # axis=-1 takes a free view for contiguous inputs (channels_last NCHW for rank 4/5, (M, C) for
    # rank 3) and the general path otherwise: same outputs, gradients and buffers either way.
    shape = (4,) + (3,) * (rank - 2) + (5,)
    x = torch.as_tensor(rng.normal(size=shape) * 2 + 1)
    g = torch.as_tensor(rng.normal(size=shape))
    results = []
    for layout in ("contiguous", "strided"):
        layer = normkit.BatchNorm(5, axis=-1, dtype=torch.float64)
        # The same values, stored with the batch axis last (not contiguous as (N, ..., C)).
        source = x if layout == "contiguous" else x.movedim(0, -1).contiguous().movedim(-1, 0)
        assert source.is_contiguous() == (layout == "contiguous")
        leaf = source.detach().requires_grad_(True)
        y = layer(leaf)
        grads = torch.autograd.grad(y, [leaf, layer.weight, layer.bias], g)
        layer.eval()
        results.append((y, *grads, layer.running_mean, layer.running_var, layer(leaf)))
    expected = R.batch_norm(to_numpy(x), np.zeros(5), np.ones(5), np.ones(5), np.zeros(5), True, 0.1, 1e-5, axis=-1)
    for contiguous, strided in zip(*results):
        assert_close(strided, to_numpy(contiguous))
    assert_close(results[0][0], expected)


# Options of the statistics pipeline that apply without running buffers (renorm needs them).
WITHOUT_BUFFERS = {"plain": {}, "axis last": {"axis": -1}, "ghost": {"virtual_batch_size": 2},
                   "ghost contiguous": {"virtual_batch_size": 3, "ghost_layout": "contiguous"},
                   "mask": {"mask": "rows"}, "feature mask": {"mask": "features"},
                   "biased running var": {"unbiased_running_var": False}}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("option", list(WITHOUT_BUFFERS))
def test_functional_without_running_statistics_uses_the_batch_s_in_eval_too(option, training, rng):
    """functional.batch_norm with no running buffers normalizes with the batch's statistics whatever ``training``
    says (torch.nn's layers without running statistics, and reference.batch_norm: ``training or running_mean is
    None``), with every option of the pipeline; the reference's output and input gradient."""
    kwargs = dict(WITHOUT_BUFFERS[option])
    shape = (6, 4, 3)
    x_np, g_np = rng.normal(size=shape) * 3 + 2, rng.normal(size=shape)
    w, b = rng.uniform(0.5, 1.5, size=4), rng.normal(size=4)
    if kwargs.get("mask") == "rows":
        kwargs["mask"] = (rng.uniform(size=(6, 1, 3)) > 0.3) | (np.arange(3) == 0)
    elif kwargs.get("mask") == "features":
        kwargs["mask"] = (rng.uniform(size=shape) > 0.3) | (np.arange(6) == 0)[:, None, None]
    axis = kwargs.get("axis", 1)
    if axis == -1:
        w, b = w[:3], b[:3]
    x = torch.tensor(x_np, requires_grad=True)
    torch_kwargs = {k: torch.as_tensor(v) if k == "mask" else v for k, v in kwargs.items()}
    y = normkit.functional.batch_norm(x, None, None, torch.tensor(w), torch.tensor(b), training, eps=1e-3,
                                      **torch_kwargs)
    y.backward(torch.tensor(g_np))
    reference_kwargs = {k: v for k, v in kwargs.items() if k != "unbiased_running_var"}
    assert_close(y, R.batch_norm(x_np, None, None, w, b, training, eps=1e-3, **reference_kwargs))
    assert_close(x.grad, R.batch_norm_backward(g_np, x_np, None, None, w, b, training, 1e-3, **reference_kwargs)[0])


@pytest.mark.parametrize("kind", ["rows", "features", "ghost"])
def test_functional_mask_is_boolean_any_nonzero_value_marks_a_valid_position(kind):
    """docs/decisions.md ("Masks"): any nonzero mask value marks a valid position; fractional values are not
    weights. By hand, per feature: the valid values [1, 3, 8] (mask 1, 0.5, 2; 100 is padding) have mean 4,
    biased variance 26/3 and unbiased 13. Every execution agrees: a padding mask (the valid rows gathered), a
    mask varying along the features and ghost batches (the composite path), where fractional values were
    weights."""
    values = torch.tensor([1.0, 3.0, 100.0, 8.0], dtype=torch.float64)
    marks = torch.tensor([1.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    x, mask = values.reshape(4, 1).repeat(1, 2), marks.reshape(4, 1)
    kwargs = {}
    if kind == "features":
        mask = mask.repeat(1, 2)
    elif kind == "ghost":  # (one ghost batch of 4: the batch's statistics)
        kwargs["virtual_batch_size"] = 4
    running_mean, running_var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    y = normkit.functional.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, eps=1e-5,
                                      mask=mask, **kwargs)
    expected = ((values - 4.0) / math.sqrt(26 / 3 + 1e-5)).reshape(4, 1).repeat(1, 2)
    assert_close(y, expected)
    assert_close(running_mean, [4.0, 4.0])
    assert_close(running_var, [13.0, 13.0])


def test_broadcasts_to_answers_as_torch_broadcast_shapes_for_equal_ranks():
    """The masks' cheap check (axes.broadcasts_to) against torch.broadcast_shapes, which it stands in for: every
    shape of rank 1-3 with sizes 0-3 against every target of that rank; different ranks are not its question."""
    from normkit.axes import broadcasts_to
    for rank in (1, 2, 3):
        shapes = list(itertools.product(range(4), repeat=rank))
        for shape, target in itertools.product(shapes, shapes):
            try:
                expected = torch.broadcast_shapes(shape, target) == torch.Size(target)
            except RuntimeError:
                expected = False
            assert broadcasts_to(shape, target) == expected, (shape, target)
    assert not broadcasts_to((3,), (2, 3))


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_every_axis_from_minus_rank_to_rank_minus_one_resolves_as_numpy_does(rank, rng):
    """Negative axes count from the end as in NumPy (its normalize_axis_index is the oracle), -rank included: on a
    rank-3 input axis=-3 is the first axis, and a layer given it normalizes exactly as one given axis=0."""
    from numpy.lib.array_utils import normalize_axis_index

    from normkit.axes import canonicalize_axes
    for axis in range(-rank, rank):
        assert canonicalize_axes(axis, rank) == (normalize_axis_index(axis, rank),)
        assert canonicalize_axes((axis,), rank) == (normalize_axis_index(axis, rank),)
    shape = (4, 3, 5)[:rank] if rank < 4 else (4, 3, 5, 2)
    x = rng.normal(size=shape)
    first = normkit.BatchNorm(shape[0], axis=-rank).double()
    assert_close(first(torch.tensor(x)), R.batch_norm(x, axis=0))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
@pytest.mark.parametrize("bad,error,message", [
    ({"mask": np.ones((4, 1, 4))}, ValueError, r"mask of shape \(4, 1, 4\) does not fit the input of shape \(4, 3, 5\)"),
    ({"renorm_mean": np.zeros(3), "renorm_stddev": np.ones(3), "moving_stddev": np.ones(3),
      "renorm_clipping": (1.0, 2.0)}, TypeError, r"renorm_clipping must be the bounds \(rmin, rmax, dmax\)"),
    ({"adjustment": 3}, TypeError, r"adjustment must be a callable\(input_shape\) -> \(scale, bias\), got 3"),
], ids=["mask", "renorm_clipping", "adjustment"])
def test_the_twins_refuse_the_same_bad_option_in_eval_and_in_training(bad, error, message, training, rng):
    """reference.batch_norm checks its options before the eval step; functional.batch_norm returned ATen's eval output
    and took a mask of another shape, a clipping of two bounds or an adjustment that cannot be called silently.
    Neither twin moves a buffer before refusing."""
    x = rng.normal(size=(4, 3, 5))
    torch_value = lambda v: torch.tensor(v) if isinstance(v, np.ndarray) else v
    for batch_norm, convert in ((R.batch_norm, lambda v: v), (normkit.functional.batch_norm, torch_value)):
        running_mean, running_var = convert(np.zeros(3)), convert(np.ones(3))
        with pytest.raises(error, match=message):
            batch_norm(convert(x), running_mean, running_var, None, None, training, 0.1, 1e-5,
                       **{name: convert(value) for name, value in bad.items()})
        np.testing.assert_array_equal(np.asarray(running_mean), np.zeros(3))
        np.testing.assert_array_equal(np.asarray(running_var), np.ones(3))


@pytest.mark.parametrize("missing", ["renorm_stddev", "moving_stddev", "both"])
def test_the_twins_refuse_renorm_without_its_state_before_anything_moves(missing, rng):
    """renorm_mean turns renorm on; without renorm_stddev (or, in a training step with running statistics,
    moving_stddev) the reference moved running_mean and then failed on None arithmetic, the functional twin failed
    in _foreach_lerp_ or clamp(). Both now say which argument is missing, with the same ValueError, and leave every
    buffer as it was. moving_stddev is not needed where nothing is updated (no running statistics): both twins then
    compute the same r and d, checked against a computation from the formula."""
    x = rng.normal(size=(6, 3)) * 2 + 1
    state = {"renorm_mean": np.array([0.1, -0.2, 0.3]), "renorm_stddev": np.array([0.5, 2.0, 1.0]),
             "moving_stddev": np.ones(3)}
    names = ("renorm_stddev", "moving_stddev") if missing == "both" else (missing,)
    for name in names:
        state[name] = None
    for batch_norm, convert in ((R.batch_norm, lambda v: v), (normkit.functional.batch_norm,
                                                              lambda v: None if v is None else torch.tensor(v))):
        buffers = {name: convert(None if value is None else value.copy()) for name, value in state.items()}
        running_mean, running_var = convert(np.zeros(3)), convert(np.ones(3))
        with pytest.raises(ValueError, match=f"renorm_mean is given .* but {' and '.join(names)}"):
            batch_norm(convert(x), running_mean, running_var, None, None, True, 0.1, 1e-3,
                       renorm_clipping=(0.5, 2.0, 0.25), **buffers)
        np.testing.assert_array_equal(np.asarray(running_mean), np.zeros(3))
        np.testing.assert_array_equal(np.asarray(running_var), np.ones(3))
        for name, value in buffers.items():
            if value is not None:
                np.testing.assert_array_equal(np.asarray(value), state[name], err_msg=name)
    if missing == "moving_stddev":  # (no running statistics: nothing to update, the renorm output itself)
        mean, var = x.mean(axis=0), x.var(axis=0)
        stddev = np.sqrt(var + 1e-3)
        r = np.clip(stddev / state["renorm_stddev"], 0.5, 2.0)
        d = np.clip((mean - state["renorm_mean"]) / state["renorm_stddev"], -0.25, 0.25)
        expected = (x - mean) / stddev * r + d
        for batch_norm, convert in ((R.batch_norm, lambda v: v), (normkit.functional.batch_norm,
                                                                  lambda v: None if v is None else torch.tensor(v))):
            y = batch_norm(convert(x), None, None, None, None, True, 0.1, 1e-3, renorm_clipping=(0.5, 2.0, 0.25),
                           **{name: convert(value) for name, value in state.items()})
            np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduce_axes", [-1, 1, (-1,), (0, -1), (-3, 2), (0, 2)])
def test_the_moments_twins_take_an_axis_or_negative_axes_as_numpy_does(reduce_axes, rng):
    """reference.moments reduces over NumPy's axes (an int, negative ones from the end); functional.moments failed on
    an int ("'int' object is not iterable") and took a negative axis for a kept one: the moments of another
    grouping, silently. Both against NumPy's own mean and biased variance."""
    x = rng.normal(size=(4, 6, 5)) * 3 + 2
    axes = (reduce_axes,) if isinstance(reduce_axes, int) else reduce_axes
    expected_mean = x.mean(axis=axes, keepdims=True)
    expected_var = x.var(axis=axes, keepdims=True)
    expected_count = np.full(expected_mean.shape, x.size / expected_mean.size)
    for count, mean, var in (R.moments(x, reduce_axes), normkit.functional.moments(torch.tensor(x), reduce_axes)):
        np.testing.assert_allclose(np.asarray(mean), expected_mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(var), expected_var, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.asarray(count), expected_count)


@pytest.mark.parametrize("shape,reduce_axes,kept_shape,count", [
    ((0, 6, 5), (0, 2), (1, 6, 1), 0.0), ((4, 6, 0), (0, 2), (1, 6, 1), 0.0), ((0, 6, 5), (1, 2), (0, 1, 1), 30.0),
])
def test_the_moments_twins_give_groups_of_no_value_mean_and_variance_zero(shape, reduce_axes, kept_shape, count):
    """Their docstrings: "a group with no valid position gets mean 0 and variance 0 (never NaN)". Without a mask the
    reference gave NumPy's NaN mean of nothing (with a RuntimeWarning) and the functional twin ATen's "input tensor
    must have at least one element"; now both give a mean and variance of 0 and the count of the reduced sizes."""
    x = np.empty(shape)
    with np.errstate(all="raise"):
        results = (R.moments(x, reduce_axes), normkit.functional.moments(torch.tensor(x), reduce_axes))
    for counts, mean, var in results:
        for value in (mean, var):
            np.testing.assert_array_equal(np.asarray(value), np.zeros(kept_shape))
        np.testing.assert_array_equal(np.asarray(counts), np.full(kept_shape, count))
