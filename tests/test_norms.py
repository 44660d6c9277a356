"""LayerNorm, GroupNorm and InstanceNorm against the reference and torch.nn, and their equivalences."""

import copy
import math

import numpy as np
import pytest
import torch

import normkit
from normkit import reference as R

from oracle import assert_close, to_numpy


def _randomize(*modules, rng):
    with torch.no_grad():
        for p in modules[0].parameters():
            p.copy_(torch.as_tensor(rng.normal(size=p.shape)))
    for other in modules[1:]:
        other.load_state_dict(modules[0].state_dict())


def _forward_backward(module, x, g):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(g)
    return y, x.grad


def _check_sample_norm(ours, theirs, shape, forward, backward, rng):
    """Same state in ours and torch.nn's; output and all gradients vs the reference and vs torch.nn."""
    _randomize(ours, theirs, rng=rng)
    x, g = torch.tensor(rng.normal(size=shape) * 2 + 3), torch.tensor(rng.normal(size=shape))
    y, dx = _forward_backward(ours, x, g)
    y_t, dx_t = _forward_backward(theirs, x, g)
    w, b = to_numpy(ours.weight), to_numpy(ours.bias)
    assert_close(y, forward(x.numpy(), w, b))
    ref_dx, ref_dw, ref_db = backward(g.numpy(), x.numpy(), w, b)
    assert_close(dx, ref_dx)
    if w is not None:
        assert_close(ours.weight.grad, ref_dw)
        assert_close(ours.bias.grad, ref_db)
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(dx, dx_t)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("shape,normalized", [((4, 6), 6), ((3, 4, 5), (4, 5)), ((2, 3, 4, 5), (3, 4, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(shape, normalized, affine, rng):
    _check_sample_norm(normkit.LayerNorm(normalized, elementwise_affine=affine).double(),
                       torch.nn.LayerNorm(normalized, elementwise_affine=affine).double(), shape,
                       lambda x, w, b: R.layer_norm(x, normalized, w, b),
                       lambda g, x, w, b: R.layer_norm_backward(g, x, normalized, w, b), rng)


@pytest.mark.parametrize("shape,groups", [((4, 6, 5), 3), ((2, 8, 3, 3), 4), ((2, 4, 2, 2, 3), 1), ((3, 4), 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm(shape, groups, affine, rng):
    c = shape[1]
    _check_sample_norm(normkit.GroupNorm(groups, c, affine=affine).double(),
                       torch.nn.GroupNorm(groups, c, affine=affine).double(), shape,
                       lambda x, w, b: R.group_norm(x, groups, w, b),
                       lambda g, x, w, b: R.group_norm_backward(g, x, groups, w, b), rng)


@pytest.mark.parametrize("cls,theirs_cls,shape", [
    (normkit.InstanceNorm1d, torch.nn.InstanceNorm1d, (3, 4, 7)),
    (normkit.InstanceNorm2d, torch.nn.InstanceNorm2d, (3, 4, 3, 5)),
    (normkit.InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 4, 2, 3, 2)),
    (normkit.InstanceNorm2d, torch.nn.InstanceNorm2d, (4, 3, 5)),  # unbatched
])
@pytest.mark.parametrize("affine,track", [(False, False), (True, False), (True, True), (False, True)])
def test_instance_norm(cls, theirs_cls, shape, affine, track, rng):
    ours = cls(4, affine=affine, track_running_stats=track).double()
    theirs = theirs_cls(4, affine=affine, track_running_stats=track).double()
    _randomize(ours, theirs, rng=rng)
    for training in (True, True, False):
        ours.train(training), theirs.train(training)
        x, g = torch.tensor(rng.normal(size=shape) * 2 + 3), torch.tensor(rng.normal(size=shape))
        rm, rv = (to_numpy(ours.running_mean), to_numpy(ours.running_var)) if track else (None, None)
        y, dx = _forward_backward(ours, x, g)
        y_t, dx_t = _forward_backward(theirs, x, g)
        torch.testing.assert_close(y, y_t)
        torch.testing.assert_close(dx, dx_t)
        if affine:  # (gradients accumulate over the steps, alike in both layers)
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
        batched = x.numpy() if x.dim() == len(shape) and len(shape) == ours._spatial_dims + 2 else x.numpy()[None]
        use_input = training or not track
        expected = R.instance_norm(batched, rm, rv, to_numpy(ours.weight), to_numpy(ours.bias), use_input, 0.1)
        assert_close(y, expected.reshape(shape))
        if track:
            assert_close(ours.running_mean, rm)
            assert_close(ours.running_var, rv)
            torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("shape", [(4, 3, 7), (2, 3, 4, 5), (2, 3, 2, 3, 4), (3, 7)])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_without_running_statistics_runs_as_a_group_norm_per_channel(shape, affine, rng):
    """Without running statistics (torch.nn's default InstanceNorm) a CPU step is ATen's group norm with one group
    per channel (1.2-5x faster than its instance_norm, docs/benchmarks.md), in training and eval, layer and
    functional form: outputs and gradients are the reference's and torch.nn's; with running statistics the step
    stays ATen's instance_norm, which moves them as torch.nn's does."""
    spatial = len(shape) - 2 if len(shape) > 2 else 1
    cls, theirs_cls = (getattr(module, f"InstanceNorm{spatial}d") for module in (normkit, torch.nn))
    ours, theirs = cls(3, affine=affine).double(), theirs_cls(3, affine=affine).double()
    _randomize(ours, theirs, rng=rng)
    batched = shape if len(shape) > 2 else (1, *shape)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        x, g = torch.tensor(rng.normal(size=shape) * 2 + 3), torch.tensor(rng.normal(size=shape))
        functional = lambda t: normkit.functional.instance_norm(t, weight=ours.weight, bias=ours.bias)  # noqa: E731
        for call in (ours, functional) if len(shape) > 2 else (ours,):  # (the functional form takes a batch)
            leaf = x.clone().requires_grad_()
            y = call(leaf)
            assert y.grad_fn.name() in ("NativeGroupNormBackward0", "SqueezeBackward1")
            grads = torch.autograd.grad(y, [leaf, *ours.parameters()], g)
            w, b = (to_numpy(ours.weight), to_numpy(ours.bias)) if affine else (None, None)
            assert_close(y, R.instance_norm(x.numpy().reshape(batched), weight=w, bias=b).reshape(shape))
            want = R.instance_norm_backward(g.numpy().reshape(batched), x.numpy().reshape(batched), weight=w, bias=b)
            assert_close(grads[0], want[0].reshape(shape))
            for got, expected in zip(grads[1:], want[1:]):
                assert_close(got, expected)
            leaf_t = x.clone().requires_grad_()
            torch.testing.assert_close(grads[0], torch.autograd.grad(theirs(leaf_t), leaf_t, g)[0])
    tracked = cls(3, affine=affine, track_running_stats=True).double()
    y = tracked(torch.tensor(rng.normal(size=shape)))
    assert y.grad_fn is None or "GroupNorm" not in y.grad_fn.name()
    assert int(tracked.num_batches_tracked) == 0 and not torch.equal(tracked.running_mean, torch.zeros(3).double())


@pytest.mark.parametrize("name,args,reference", [
    ("LayerNorm", ((4, 5),), lambda x, eps: R.layer_norm(x, (4, 5), eps=eps)),
    ("GroupNorm", (2, 4), lambda x, eps: R.group_norm(x, 2, eps=eps)),
    ("InstanceNorm1d", (4,), lambda x, eps: R.instance_norm(x, eps=eps)),
])
def test_eps_given_to_the_layer_is_the_one_used(name, args, reference, rng):
    """A spread of the order of sqrt(eps), where eps shows: the layer's own eps, not the default."""
    x = torch.tensor(rng.normal(size=(3, 4, 5)) * 0.3)
    ours = getattr(normkit, name)(*args, eps=0.25).double()
    y = ours(x)
    assert_close(y, reference(x.numpy(), 0.25))
    torch.testing.assert_close(y, getattr(torch.nn, name)(*args, eps=0.25).double()(x))


def test_layer_norm_over_chw_equals_group_norm_with_one_group(rng):
    x = torch.tensor(rng.normal(size=(3, 4, 5, 6)))
    layer = normkit.LayerNorm((4, 5, 6), elementwise_affine=False).double()
    group = normkit.GroupNorm(1, 4, affine=False).double()
    torch.testing.assert_close(layer(x), group(x))


def test_instance_norm_equals_group_norm_with_one_channel_per_group(rng):
    x = torch.tensor(rng.normal(size=(3, 4, 5, 6)))
    instance = normkit.InstanceNorm2d(4, affine=True).double()
    group = normkit.GroupNorm(4, 4, affine=True).double()
    _randomize(instance, rng=rng)
    with torch.no_grad():
        group.weight.copy_(instance.weight), group.bias.copy_(instance.bias)
    torch.testing.assert_close(instance(x), group(x))


def test_batch_norm_with_batch_one_equals_instance_norm(rng):
    """A batch of one sample: BN's statistics are the instance's statistics."""
    x = torch.tensor(rng.normal(size=(1, 4, 5, 6)))
    torch.testing.assert_close(normkit.BatchNorm2d(4, affine=False).double()(x),
                               normkit.InstanceNorm2d(4).double()(x))


def test_group_norm_is_independent_of_batch_size(rng):
    gn = normkit.GroupNorm(2, 4).double()
    x = torch.tensor(rng.normal(size=(5, 4, 3, 3)))
    torch.testing.assert_close(gn(x)[1:2], gn(x[1:2]))


@pytest.mark.parametrize("name, arguments, shape", [("LayerNorm", (6,), (4, 3, 6)), ("GroupNorm", (2, 4), (3, 4, 5))])
def test_parametrized_weight_is_used_as_in_torch_nn(name, arguments, shape):
    # (the short path reads the parameters from the module's dict; a parametrization moves the weight out of it)
    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return 2.0 * weight

    ours, theirs = getattr(normkit, name)(*arguments), getattr(torch.nn, name)(*arguments)
    for layer in (ours, theirs):
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", Doubled())
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))
    assert not torch.allclose(ours(x), getattr(normkit, name)(*arguments)(x))


@pytest.mark.parametrize("affine,track", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3)])
def test_instance_norm_of_an_empty_batch_leaves_its_state_alone(affine, track, shape, rng):
    """As BatchNorm's empty batch: torch.nn's InstanceNorm fails with affine parameters and otherwise sets its running
    statistics to the NaN mean of no instances, which every later eval output then is."""
    layer = normkit.InstanceNorm2d(4, affine=affine, track_running_stats=track).double()
    _randomize(layer, rng=rng)
    rm, rv = (to_numpy(layer.running_mean), to_numpy(layer.running_var)) if track else (None, None)
    for training in (True, False):
        layer.train(training)
        x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape
        if affine:
            assert torch.equal(layer.weight.grad, torch.zeros(4, dtype=torch.float64))
            assert torch.equal(layer.bias.grad, torch.zeros(4, dtype=torch.float64))
    x = torch.tensor(rng.normal(size=(2, 4, 3, 3)))
    expected = R.instance_norm(x.numpy(), rm, rv, to_numpy(layer.weight), to_numpy(layer.bias), not track)
    assert_close(layer(x), expected)
    assert_close(R.instance_norm(np.zeros(shape), rm, rv), np.zeros(shape))
    if track:
        assert_close(layer.running_mean, rm)
        assert_close(layer.running_var, rv)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3), (2, 4, 3, 3)])
def test_instance_norm_in_eval_with_its_running_stats_removed_refuses_as_torch_nn(affine, shape):
    """track_running_stats=True in eval normalizes with the running statistics: set to None, torch.nn refuses any
    batch (ATen's check); normkit's empty batch, which never reaches ATen, returned an empty output instead."""
    ours, theirs = (lib.InstanceNorm2d(4, affine=affine, track_running_stats=True).eval() for lib in (normkit, torch.nn))
    for layer in (ours, theirs):
        layer.running_mean = layer.running_var = None
    # (torch.nn's layer with affine parameters fails on no instances before that check, with an IndexError)
    with pytest.raises((RuntimeError, IndexError) if affine and shape[0] == 0 else RuntimeError):
        theirs(torch.randn(shape))
    with pytest.raises(RuntimeError, match="Expected running_mean and running_var to be defined"):
        ours(torch.randn(shape))
    ours.train()(torch.randn(shape))  # training normalizes with the instance's own statistics: fine


_UNBATCHED_INSTANCE = ("InstanceNorm1d", (4,), (4, 5), lambda x, eps: R.instance_norm(x[None], eps=eps)[0])


@pytest.mark.parametrize("name,args,shape,reference,dtype", [
    ("LayerNorm", ((4, 5),), (3, 4, 5), lambda x, eps: R.layer_norm(x, (4, 5), eps=eps), torch.float16),
    ("GroupNorm", (2, 4), (3, 4, 5), lambda x, eps: R.group_norm(x, 2, eps=eps), torch.float16),
    ("InstanceNorm1d", (4,), (3, 4, 5), lambda x, eps: R.instance_norm(x, eps=eps), torch.float16),
    (*_UNBATCHED_INSTANCE, torch.float16), (*_UNBATCHED_INSTANCE, torch.float64),
])
def test_eps_given_to_the_layer_is_the_one_used_off_the_short_path(name, args, shape, reference, dtype, rng):
    """Half-precision input to a float32 layer, and unbatched InstanceNorm input, skip the layers' direct ATen call:
    the general path must pass the layer's eps too (dropping it went unnoticed: only float64 batches were tested)."""
    x = torch.tensor(rng.normal(size=shape) * 0.3).to(dtype)
    ours = getattr(normkit, name)(*args, eps=0.25).to(torch.float64 if dtype == torch.float64 else torch.float32)
    y = ours(x)
    assert y.dtype == dtype
    assert_close(y, reference(to_numpy(x), 0.25), dtype)


@pytest.mark.parametrize("dtype,layer_dtype", [(torch.float64, torch.float64), (torch.float16, torch.float32)],
                         ids=["float64", "half-input"])
@pytest.mark.parametrize("shape", [(2, 4, 0), (3, 4, 0, 5), (0, 4, 3)])
def test_group_norm_of_an_input_without_values_gives_zero_weight_gradients(shape, dtype, layer_dtype, rng):
    """A loss over no values does not depend on gamma or beta: their gradients are 0 (the reference's, and torch.nn's
    own for an empty batch). With no spatial positions, (N, C, 0), ATen's backward gave gamma a NaN gradient (0/0
    statistics times an empty sum), which an optimizer step then wrote into every weight."""
    layer = normkit.GroupNorm(2, 4).to(layer_dtype)
    _randomize(layer, rng=rng)
    x = torch.zeros(shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    g = torch.ones(shape, dtype=dtype)
    y.backward(g)
    assert y.shape == shape and y.dtype == dtype and x.grad.shape == shape
    _, ref_dw, ref_db = R.group_norm_backward(g.double().numpy(), x.detach().double().numpy(), 2,
                                              to_numpy(layer.weight), to_numpy(layer.bias))
    assert_close(layer.weight.grad, ref_dw)
    assert_close(layer.bias.grad, ref_db)
    # torch.nn's output for it: empty, of the same shape and dtype
    theirs = torch.nn.GroupNorm(2, 4).to(layer_dtype)
    assert theirs(x).shape == y.shape and theirs(x).dtype == y.dtype


def test_group_norm_without_bias_as_torch_nn(rng):
    """bias=False drops beta (torch.nn.GroupNorm's keyword since 2.1): no parameter, no state_dict key, no offset."""
    ours, theirs = normkit.GroupNorm(2, 4, bias=False).double(), torch.nn.GroupNorm(2, 4, bias=False).double()
    assert ours.bias is None and theirs.bias is None
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    _randomize(ours, theirs, rng=rng)
    x = torch.tensor(rng.normal(size=(3, 4, 5)) * 2 + 3)
    torch.testing.assert_close(ours(x), theirs(x))
    assert_close(ours(x), R.group_norm(x.numpy(), 2, to_numpy(ours.weight)))


@pytest.mark.parametrize("shape,dtype", [((3, 6), torch.float32), ((2, 3, 6), torch.float16)],
                         ids=["unbatched", "half-input"])
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_instance_norm_running_stats_off_the_short_path_follow_torch_nn(shape, dtype, momentum, rng):
    """torch.nn's InstanceNorm with momentum=None leaves its running statistics alone (its factor is 0, no count); an
    unbatched or half-precision input goes through normkit's general path, which must keep that rule too."""
    ours = normkit.InstanceNorm1d(3, momentum=momentum, track_running_stats=True)
    theirs = torch.nn.InstanceNorm1d(3, momentum=momentum, track_running_stats=True)
    for _ in range(2):
        x = torch.tensor(rng.normal(size=shape) * 2 + 3).to(dtype)
        ours(x)
        theirs(x.float())
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-3, atol=1e-3)
    if momentum is None:
        assert torch.equal(ours.running_mean, torch.zeros(3)) and torch.equal(ours.running_var, torch.ones(3))


@pytest.mark.parametrize("training", [True, False])
def test_half_precision_instance_norm_with_running_stats_stays_in_half_as_torch_nn(training, rng):
    """A ``.half()`` layer whose only tensors are its running buffers computes in half precision as torch.nn's does
    (the buffers say the layer's dtype as parameters would): identical outputs and buffers."""
    ours = normkit.InstanceNorm1d(3, track_running_stats=True).half()
    theirs = torch.nn.InstanceNorm1d(3, track_running_stats=True).half()
    for step in range(3):
        ours.train(training or step < 2), theirs.train(training or step < 2)
        x = torch.tensor(rng.normal(size=(2, 3, 6)) * 2 + 3).half()
        y = ours(x)
        assert y.dtype == torch.float16
        torch.testing.assert_close(y, theirs(x), rtol=0, atol=0)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=0)


@pytest.mark.parametrize("ours_cls,theirs_cls", [(normkit.InstanceNorm1d, torch.nn.InstanceNorm1d),
                                                 (normkit.InstanceNorm2d, torch.nn.InstanceNorm2d)])
def test_instance_norm_state_dict_version_and_stray_running_stats_as_torch_nn(ours_cls, theirs_cls):
    """The checkpoint version is torch.nn's (loaders branch on it), and stray running stats of an unversioned
    checkpoint are reported once, as torch.nn does (dropped, not also listed as unexpected keys)."""
    for track in (True, False):
        assert (ours_cls(3, track_running_stats=track).state_dict()._metadata[""]["version"]
                == theirs_cls(3, track_running_stats=track).state_dict()._metadata[""]["version"])
    state = theirs_cls(3, track_running_stats=True).state_dict()
    state._metadata[""]["version"] = None
    unexpected = []
    for cls in (theirs_cls, ours_cls):
        with pytest.raises(RuntimeError, match=r"Unexpected running stats buffer\(s\)") as error:
            cls(3).load_state_dict(state)
        unexpected.append([line for line in str(error.value).splitlines() if "Unexpected key(s)" in line])
    assert unexpected[0] == unexpected[1] and "running_mean" not in str(unexpected[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_to_instance_norm_with_float32_running_stats_gets_float32_statistics(dtype, rng):
    """No affine parameters, float32 running buffers: the buffers (not only weight/bias) say float32, so the instance
    statistics of a half-precision input are computed in float32. Data far from zero shows a half-precision mean."""
    layer = normkit.InstanceNorm1d(8, track_running_stats=True)
    x = torch.tensor(rng.normal(size=(3, 8, 64)) * 0.1 + 50).to(dtype)
    rm, rv = to_numpy(layer.running_mean), to_numpy(layer.running_var)
    y = layer(x)
    assert y.dtype == dtype and layer.running_mean.dtype == torch.float32
    assert_close(y, R.instance_norm(to_numpy(x), rm, rv), dtype)
    assert_close(layer.running_mean, rm, torch.float32)
    assert_close(layer.running_var, rv, torch.float32, rtol=1e-3)


@pytest.mark.parametrize("memory_format, shape", [(torch.channels_last, (2, 4, 3, 3)),
                                                  (torch.channels_last_3d, (2, 4, 3, 2, 3))])
@pytest.mark.parametrize("call", ["module", "functional"])
@pytest.mark.parametrize("trained", ["weight and bias", "bias only"])
def test_group_norm_of_a_channels_last_input_without_gradient_trains_its_weights(memory_format, shape, call, trained,
                                                                                 rng):
    """Data straight from a loader (no gradient) in channels-last layout into a GroupNorm with trainable weights:
    torch 2.13's CPU backward for it ends the process (segmentation fault; torch.nn.GroupNorm's too). normkit's
    gives torch.nn's output (same bits and memory format as its forward) and the weights' gradients torch.nn
    computes from the contiguous input, and the input still has no gradient."""
    ours, theirs = normkit.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4)
    _randomize(ours, theirs, rng=rng)
    if trained == "bias only":
        ours.weight.requires_grad_(False), theirs.weight.requires_grad_(False)
    x = torch.tensor(rng.normal(size=shape), dtype=torch.float32).contiguous(memory_format=memory_format)
    g = torch.tensor(rng.normal(size=shape), dtype=torch.float32)
    y = ours(x) if call == "module" else normkit.functional.group_norm(x, 2, ours.weight, ours.bias)
    with torch.no_grad():
        expected = theirs(x)  # (torch.nn's forward alone is fine)
    assert torch.equal(y, expected) and y.is_contiguous(memory_format=memory_format)
    y.backward(g)
    theirs(x.contiguous()).backward(g)
    for name in ("weight", "bias"):
        ours_grad, theirs_grad = getattr(ours, name).grad, getattr(theirs, name).grad
        assert (ours_grad is None) == (theirs_grad is None)
        if theirs_grad is not None:
            torch.testing.assert_close(ours_grad, theirs_grad)
    assert x.grad is None and not x.requires_grad


@pytest.mark.parametrize("shape", [(1, 3, 4, 2), (1, 3, 2, 2, 3), (3, 4, 2), (2, 1, 1, 2), (2, 1, 4, 2)])
@pytest.mark.parametrize("training, track", [(True, False), (False, True)])
def test_instance_norm_backward_of_a_channels_last_gradient_matches_the_reference(shape, training, track):
    """torch 2.13's InstanceNorm2d/3d (CPU) returns a wrong input and weight gradient for a channels_last loss
    gradient where ATen's (1, N*C, *S) view keeps its strides: one sample (N = 1, an unbatched input), one channel,
    size-1 dims. normkit's gives ATen that gradient contiguous. Found by tools/fuzz_batch_norm.py --family sample."""
    unbatched = len(shape) == 3
    batched = (1, *shape) if unbatched else shape
    fmt = torch.channels_last if len(batched) == 4 else torch.channels_last_3d
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batched, dtype=torch.float64, generator=gen)
    g = torch.randn(batched, dtype=torch.float64, generator=gen).contiguous(memory_format=fmt)
    layer = getattr(normkit, f"InstanceNorm{len(batched) - 2}d")(batched[1], affine=True, track_running_stats=track)
    layer = layer.double().train(training)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, batched[1]))
        if track:
            layer.running_mean.fill_(0.3)
            layer.running_var.fill_(2.0)
    leaf = (x[0] if unbatched else x).clone().requires_grad_()
    y = layer(leaf)
    gx, gw, gb = torch.autograd.grad(y, [leaf, layer.weight, layer.bias], g[0] if unbatched else g)
    stats = (layer.running_mean.numpy(), layer.running_var.numpy()) if track else (None, None)
    want = R.instance_norm_backward(g.numpy(), x.numpy(), *stats, layer.weight.detach().numpy(),
                                    layer.bias.detach().numpy(), use_input_stats=training or not track)
    assert_close(gx.reshape(batched), want[0], rtol=1e-9, atol=1e-9)
    assert_close(gw, want[1], rtol=1e-9, atol=1e-9)
    assert_close(gb, want[2], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 2, 2, 3), (4, 8, 3, 5)])
@pytest.mark.parametrize("call", ["layer", "layer_float16_input", "functional"])
@pytest.mark.parametrize("training, track", [(True, False), (False, True)])
def test_instance_norm_backward_of_a_sequence_first_gradient_matches_the_reference(shape, call, training, track):
    """A loss gradient whose N and C dims merge (innermost here: the gradient of ``y.flatten(2).permute(2, 0, 1)``,
    the (H*W, N, C) sequence a DETR-style transformer takes) keeps its strides through ATen's (1, N*C, *S) view of it,
    channels_last with an odd size-1 stride: torch 2.13's InstanceNorm2d/3d (CPU, torch.nn's too) returned a wrong
    input and weight gradient for any batch size and no size-1 dim. normkit's layers (short path, the general one: a
    float16 input under float32 weights) and functional.instance_norm give ATen that gradient contiguous. Found by
    tools/fuzz_batch_norm.py --family layouts."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    half = call == "layer_float16_input"
    if half:
        x = x.half().double()  # (the reference takes the rounded input)
    w = torch.randn((math.prod(shape[2:]), shape[0], shape[1]), dtype=torch.float64, generator=gen)
    weight = torch.linspace(0.5, 1.5, shape[1], dtype=torch.float64).requires_grad_()
    bias = torch.linspace(-1.0, 1.0, shape[1], dtype=torch.float64).requires_grad_()
    rm, rv = torch.full((shape[1],), 0.3, dtype=torch.float64), torch.full((shape[1],), 2.0, dtype=torch.float64)
    leaf = (x.half() if half else x.clone()).requires_grad_()
    if call == "functional":
        y = normkit.functional.instance_norm(leaf, rm if track else None, rv if track else None, weight, bias,
                                             use_input_stats=training or not track)
        params = [weight, bias]
    else:
        dtype = torch.float32 if half else torch.float64
        layer = getattr(normkit, f"InstanceNorm{len(shape) - 2}d")(shape[1], affine=True, track_running_stats=track,
                                                                    dtype=dtype).train(training)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
            if track:
                layer.running_mean.copy_(rm)
                layer.running_var.copy_(rv)
        y = layer(leaf)
        params = [layer.weight, layer.bias]
    gx, gw, gb = torch.autograd.grad((y.flatten(2).permute(2, 0, 1) * w.to(y.dtype)).sum(), [leaf, *params])
    g = w.permute(1, 2, 0).reshape(shape).numpy()
    want = R.instance_norm_backward(g, x.numpy(), rm.numpy() if track else None, rv.numpy() if track else None,
                                    weight.detach().numpy(), bias.detach().numpy(),
                                    use_input_stats=training or not track)
    tol = 1e-9 if not half else 2e-2  # (float16's input gradient: rounded once, to 11 bits)
    assert_close(gx, want[0], rtol=tol, atol=tol)
    assert_close(gw, want[1], rtol=tol, atol=tol)
    assert_close(gb, want[2], rtol=tol, atol=tol)



def _sample_norm_pair(make_ours, make_theirs, channels):
    ours, theirs = make_ours(), make_theirs()
    with torch.no_grad():
        for module in (ours, theirs):
            size = module.weight.numel()
            module.weight.copy_(torch.linspace(0.5, 1.5, size).view(module.weight.shape))
            module.bias.copy_(torch.linspace(-1.0, 1.0, size).view(module.weight.shape))
    return ours, theirs


def _sample_norm_step(module, x, g, memory_format, dtype=torch.float32):
    data = x.detach().to(dtype, copy=True).contiguous(memory_format=memory_format).requires_grad_()
    y = module(data)
    y.backward(g.to(dtype).contiguous(memory_format=memory_format))
    grads = (data.grad, module.weight.grad.clone(), module.bias.grad.clone())
    module.zero_grad()
    return y, grads


@pytest.mark.parametrize("kind, shape", [("group", (4, 8, 6, 6)), ("group", (2, 6, 3, 4, 5)), ("group", (4, 6, 10)),
                                         ("instance", (4, 8, 6, 6)), ("layer", (16, 120)), ("layer", (4, 8, 6, 6))])
@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_instance_and_layer_norm_of_data_far_from_zero_keep_their_variance(kind, shape, offset, layout):
    """ATen's CPU group norm takes each group's variance from float32 sums: its channels-last kernel as E[x^2] - E[x]^2
    (O(1) off at mean 1e3 and std 1, O(1e3) at 1e4, the gradients worse), its contiguous kernel 1e-3 off at 1e4 (twice
    instance_norm's error: normkit's InstanceNorm without running statistics runs as a group norm); layer norm 2e-3.
    normkit's layers find such data (a check on the first call, then every 1000) and subtract each group's (row's)
    mean first: outputs and gradients within float32's rounding of the float64 reference, where torch.nn's are not."""
    memory_format = {"contiguous": torch.contiguous_format, "channels_last": {
        4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape), torch.contiguous_format)}[layout]
    channels = shape[1]
    if kind == "group":
        groups = 2 if channels == 8 else 3
        ours, theirs = _sample_norm_pair(lambda: normkit.GroupNorm(groups, channels),
                                         lambda: torch.nn.GroupNorm(groups, channels), channels)
    elif kind == "instance":
        ours, theirs = _sample_norm_pair(lambda: normkit.InstanceNorm2d(channels, affine=True),
                                         lambda: torch.nn.InstanceNorm2d(channels, affine=True), channels)
    else:
        normalized = shape[1:]
        ours, theirs = _sample_norm_pair(lambda: normkit.LayerNorm(normalized), lambda: torch.nn.LayerNorm(normalized),
                                         normalized)
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=generator) + offset).double()  # (float32 values: the reference sees the same)
    g = torch.randn(shape, generator=generator, dtype=torch.float64)
    reference = copy.deepcopy(theirs).double()
    expected_y, expected_grads = _sample_norm_step(reference, x, g, torch.contiguous_format, torch.float64)
    y, grads = _sample_norm_step(ours, x, g, memory_format)
    assert y.is_contiguous(memory_format=memory_format if kind == "group" else torch.contiguous_format)  # (torch.nn's)
    errors = [float((got.double() - want).abs().max()) for got, want in zip((y, *grads), (expected_y, *expected_grads))]
    assert errors[0] < 2e-6 and errors[1] < 2e-6 and errors[2] < 2e-5 and errors[3] < 2e-5, errors
    torn, _ = _sample_norm_step(theirs, x, g, memory_format)
    if offset >= 1e3:  # (the premise: torch.nn's kernels are further off)
        assert float((torn.double() - expected_y).abs().max()) > 2e-5


@pytest.mark.parametrize("kind", ["group", "instance", "layer"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_instance_and_layer_norm_of_data_near_zero_are_torch_nn_s_calls(kind, layout):
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    make = {"group": (lambda: normkit.GroupNorm(2, 8), lambda: torch.nn.GroupNorm(2, 8)),
            "instance": (lambda: normkit.InstanceNorm2d(8, affine=True),
                         lambda: torch.nn.InstanceNorm2d(8, affine=True)),
            "layer": (lambda: normkit.LayerNorm([8, 5, 5]), lambda: torch.nn.LayerNorm([8, 5, 5]))}[kind]
    ours, theirs = _sample_norm_pair(*make, 8)
    generator = torch.Generator().manual_seed(6)
    x, g = torch.randn(4, 8, 5, 5, generator=generator) * 3 + 1, torch.randn(4, 8, 5, 5, generator=generator)
    y, grads = _sample_norm_step(ours, x, g, memory_format)
    expected_y, expected_grads = _sample_norm_step(theirs, x, g, memory_format)
    if kind != "instance":  # (instance: ATen's group norm, the same values in another order of operations)
        torch.testing.assert_close(y, expected_y, rtol=0, atol=0)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not ours.__dict__["_far_from_zero_data"]


@pytest.mark.parametrize("shape, groups", [((4, 8, 6, 6), 2), ((2, 6, 3, 4, 5), 3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision_group_norm_of_data_far_from_zero_keeps_its_variance(shape, groups, layout):
    """bfloat16 inputs (float32 statistics) far from zero: recentered in bfloat16 (the difference of values that close
    is exact), the output within bfloat16's rounding of the float64 reference of the same values."""
    memory_format = {"contiguous": torch.contiguous_format,
                     "channels_last": torch.channels_last if len(shape) == 4 else torch.channels_last_3d}[layout]
    ours, theirs = _sample_norm_pair(lambda: normkit.GroupNorm(groups, shape[1]),
                                     lambda: torch.nn.GroupNorm(groups, shape[1]), shape[1])
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=generator) * 8 + 1e3).bfloat16().double()  # (bfloat16 values, steps of 4-8)
    g = torch.randn(shape, generator=generator, dtype=torch.float64)
    expected_y, _ = _sample_norm_step(copy.deepcopy(theirs).double(), x, g, torch.contiguous_format, torch.float64)
    y, _ = _sample_norm_step(ours, x, g, memory_format, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=memory_format)
    assert float((y.double() - expected_y).abs().max()) < 2e-2  # (bfloat16's rounding of outputs up to ~4)


def test_a_layer_that_recenters_takes_every_other_input_as_torch_nn():
    """After a call on data far from zero the layer recenters the next 999 calls, but only where recentering can
    change the call (found by a review): channels the groups do not divide (a view error instead of the layer's
    ValueError), float16 (a value of the mean's opposite sign overflowed to inf), a trace (whose graph depended on
    the layer's history) keep torch.nn's call. (N, C) data, whose per-position means failed a view, is recentered
    since (test_group_norm_of_flat_data_far_from_zero_keeps_its_variance)."""
    layer = normkit.GroupNorm(2, 4)
    far = torch.randn(3, 4, 5) + 1e3
    layer(far)
    assert layer.__dict__["_far_from_zero_data"]
    unaffine = normkit.GroupNorm(2, 4, affine=False)
    unaffine(far)
    with pytest.raises(ValueError, match="num_groups=2 must divide the channels"):
        unaffine(torch.randn(2, 5, 3))
    half = torch.full((1, 4, 25), 60000.0, dtype=torch.float16)
    half[0, 0, 0] = -60000.0
    y = layer(half)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, normkit.GroupNorm(2, 4)(half), rtol=0, atol=0)  # (a fresh layer's: torch's call)
    traced = torch.jit.trace(layer, far)
    assert [node.kind() for node in traced.graph.nodes() if node.kind().startswith("aten::")] == ["aten::group_norm"]


@pytest.mark.parametrize("make, size", [(lambda: normkit.GroupNorm(3, 9), 9), (lambda: normkit.GroupNorm(1, 9), 9),
                                        (lambda: normkit.LayerNorm([5, 4]), 5),
                                        (lambda: normkit.InstanceNorm1d(5, affine=True), 5)])
@pytest.mark.parametrize("level", [0.0, 3.0, 0.1, -7.3, 1e4 + 0.1])
def test_constant_data_is_checked_without_the_statistics_pass(make, size, level, monkeypatch):
    """Data that is one value throughout says nothing about how far from zero the data lies, so the check stays due
    on every such call; that call is answered from one aminmax pass, not from the statistics per row or channel
    (Welford's, 4-20x the layer's own call), with the answer those statistics give: the same outputs and the same
    decision (a GroupNorm whose group mean of equal channel means rounds may take such data for far from zero, as
    before), and, where nothing varies, a check still due, so data far from zero after it is recentered."""
    with_statistics, without = make(), make()
    x = torch.full((4, size, 4), level)
    want = with_statistics(x)  # (the statistics taken: the countdown starts from this call's check)
    calls = []
    var_mean = torch.var_mean
    monkeypatch.setattr(torch, "var_mean", lambda *args, **kwargs: calls.append(1) or var_mean(*args, **kwargs))
    for _ in range(3):
        torch.testing.assert_close(without(x), want, rtol=0, atol=0)
    assert not calls
    assert (without.__dict__.get("_far_from_zero_data", False)
            == with_statistics.__dict__.get("_far_from_zero_data", False))
    if not without.__dict__.get("_far_from_zero_data", False):
        assert without.__dict__.get("_steps_to_layout_check", 0) == 0  # (due again)
        without(torch.randn(4, size, 4) * 1e-2 + 1e4)
        assert without.__dict__["_far_from_zero_data"] and calls


def test_a_constant_batch_is_checked_without_the_statistics_pass(monkeypatch):
    """BatchNorm's recentering check on a batch in which nothing varies (every value the same): one aminmax pass, not
    the statistics and extremes per channel, and the check is due again on the next batch."""
    layer = normkit.BatchNorm(3, axis=-1)
    calls = []
    var_mean = torch.var_mean
    monkeypatch.setattr(torch, "var_mean", lambda *args, **kwargs: calls.append(1) or var_mean(*args, **kwargs))
    for _ in range(3):
        layer(torch.full((8, 5, 3), 1e4))
        assert layer._steps_to_recenter_check == 0 and not layer._recenter
    assert not calls or normkit.kernels.enabled()  # (the fused kernel needs no check)



@pytest.mark.parametrize("kind, dtype, huge, pattern", [
    ("group", torch.float32, 3.3e38, "two values"), ("group", torch.float64, 1e308, "two values"),
    ("layer", torch.float64, 1e308, "two values"), ("layer", torch.float64, 1e308, "constant")])
def test_a_recentering_layer_leaves_a_group_whose_mean_overflows_as_torch_nn_does(kind, dtype, huge, pattern):
    """A batch with data far from zero makes the layer recenter every group; a sample of values near the dtype's
    largest summed to inf in the recentering mean, and the difference made that sample NaN where torch.nn's kernel
    gives a finite output (found by a hunt). Its groups are left as they are: torch.nn's output for that sample, bit
    for bit, and the float64 reference's for the samples far from zero."""
    if kind == "group":
        ours, theirs = normkit.GroupNorm(2, 4).to(dtype), torch.nn.GroupNorm(2, 4).to(dtype)
        oracle = lambda x: R.group_norm(x, 2, to_numpy(ours.weight), to_numpy(ours.bias))  # noqa: E731
    else:
        ours, theirs = normkit.LayerNorm(5).to(dtype), torch.nn.LayerNorm(5).to(dtype)
        oracle = lambda x: R.layer_norm(x, (5,), to_numpy(ours.weight), to_numpy(ours.bias))  # noqa: E731
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 5, generator=generator, dtype=dtype)
    # far from zero: float32 where torch.nn loses its variance; float64 where the reference keeps its 1e-10 (its
    # two-pass mean of data at 1e4 and std 1e-2 is itself an ulp off, 3e-10 after the division by the std)
    x = x * 1e-2 + 1e4 if dtype == torch.float32 else x + 100.0
    x[1] = huge
    if pattern == "two values":
        x[1, :, ::2] = huge / 2
    with torch.no_grad():
        y, expected = ours(x), theirs(x)
    assert ours.__dict__["_far_from_zero_data"]
    assert torch.isfinite(expected[1]).all()  # (the premise: torch.nn's kernel has a finite answer)
    torch.testing.assert_close(y[1], expected[1], rtol=0, atol=0)
    for sample in (0, 2):
        assert_close(y[sample:sample + 1], oracle(to_numpy(x[sample:sample + 1])), dtype)


@pytest.mark.parametrize("make, shape", [(normkit.InstanceNorm1d, (4, 30)), (normkit.InstanceNorm2d, (4, 6, 5)),
                                         (normkit.InstanceNorm3d, (3, 4, 3, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_an_unbatched_instance_norm_of_data_far_from_zero_keeps_its_variance(make, shape, affine):
    """An unbatched input (C, *S) far from zero is recentered as a batched one is: it kept ATen's error (outputs 0.1
    off at mean 1e4 and std 1e-2, found by a hunt); outputs and gradients within float32's rounding of the float64
    reference, as the batched input's."""
    ours = make(shape[0], affine=affine)
    if affine:
        with torch.no_grad():
            ours.weight.copy_(torch.linspace(0.5, 1.5, shape[0]))
            ours.bias.copy_(torch.linspace(-1.0, 1.0, shape[0]))
    generator = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=generator) * 1e-2 + 1e4).double()  # (float32 values: the reference sees them)
    g = torch.randn(shape, generator=generator, dtype=torch.float64)
    data = x.float().requires_grad_()
    y = ours(data)
    y.backward(g.float())
    weight, bias = (to_numpy(ours.weight), to_numpy(ours.bias)) if affine else (None, None)
    batched, grad = to_numpy(x)[None], to_numpy(g)[None]
    expected = R.instance_norm(batched, weight=weight, bias=bias)
    expected_grads = R.group_norm_backward(grad, batched, shape[0], weight, bias)
    assert float(np.abs(to_numpy(y)[None] - expected).max()) < 2e-6
    # (input gradients of size ~1e2: float32's rounding of them)
    assert float(np.abs(to_numpy(data.grad)[None] - expected_grads[0]).max()) < 2e-4
    if affine:
        assert float(np.abs(to_numpy(ours.weight.grad) - expected_grads[1]).max()) < 2e-5
        assert float(np.abs(to_numpy(ours.bias.grad) - expected_grads[2]).max()) < 2e-5
    assert ours.__dict__["_far_from_zero_data"]


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_group_norm_of_flat_data_far_from_zero_keeps_its_variance(groups, layout):
    """(N, C) data far from zero (GroupNorm in an MLP) skipped the recentering check and kept ATen's error (outputs 0.1
    off at mean 1e4 and std 1e-2, found by a hunt); it is checked and recentered as (N, C, *S) data: outputs and
    gradients within float32's rounding of the float64 reference, the input left as it was. Data near zero stays
    torch.nn's call."""
    ours, theirs = _sample_norm_pair(lambda: normkit.GroupNorm(groups, 8), lambda: torch.nn.GroupNorm(groups, 8), 8)
    generator = torch.Generator().manual_seed(13)
    x = (torch.randn(16, 8, generator=generator) * 1e-2 + 1e4).double()  # (float32 values: the reference sees them)
    g = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    data = x.float()
    if layout == "transposed":
        data = data.t().contiguous().t()
    before = data.clone()
    data.requires_grad_()
    y = ours(data)
    y.backward(g.float())
    weight, bias = to_numpy(ours.weight), to_numpy(ours.bias)
    expected = R.group_norm(to_numpy(x), groups, weight, bias)
    expected_grads = R.group_norm_backward(to_numpy(g), to_numpy(x), groups, weight, bias)
    assert float(np.abs(to_numpy(y) - expected).max()) < 2e-6
    assert float(np.abs(to_numpy(data.grad) - expected_grads[0]).max()) < 2e-4  # (gradients of size ~1e2)
    assert float(np.abs(to_numpy(ours.weight.grad) - expected_grads[1]).max()) < 2e-5
    assert float(np.abs(to_numpy(ours.bias.grad) - expected_grads[2]).max()) < 2e-5
    assert ours.__dict__["_far_from_zero_data"] and torch.equal(data.detach(), before)
    if groups == 1:  # (groups of 2 or 4 values of data near zero lie beyond 4 std by chance: see decisions.md)
        near, fresh = torch.randn(16, 8, generator=generator), copy.deepcopy(theirs)
        fresh_ours, _ = _sample_norm_pair(lambda: normkit.GroupNorm(1, 8), lambda: torch.nn.GroupNorm(1, 8), 8)
        torch.testing.assert_close(fresh_ours(near), fresh(near), rtol=0, atol=0)
        assert not fresh_ours.__dict__["_far_from_zero_data"]
