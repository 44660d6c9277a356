"""The drop-in classes in torch.nn's corners: each case runs normkit's layer and torch.nn's side by side."""

import numpy as np
import pytest
import torch
from torch import nn

import normkit


def _pair(name, *args, **kwargs):
    return getattr(normkit, name)(*args, **kwargs), getattr(nn, name)(*args, **kwargs)


@pytest.mark.parametrize("name,args,kwargs", [
    ("BatchNorm1d", (3,), {}), ("BatchNorm2d", (4,), {"affine": False}), ("BatchNorm3d", (2,), {"bias": False}),
    ("BatchNorm2d", (4,), {"momentum": None, "track_running_stats": False}),
    ("InstanceNorm2d", (3,), {}), ("InstanceNorm1d", (3,), {"affine": True, "track_running_stats": True}),
    ("LayerNorm", (4,), {}), ("LayerNorm", ((2, 3),), {"bias": False}),
    ("LayerNorm", (4,), {"elementwise_affine": False}),
    ("GroupNorm", (2, 4), {}), ("GroupNorm", (2, 4), {"affine": False}),
])
def test_repr_is_torch_nn_s(name, args, kwargs):
    ours, theirs = _pair(name, *args, **kwargs)
    assert repr(ours) == repr(theirs)


def test_numpy_scalars_are_accepted_like_python_numbers():
    ours = normkit.BatchNorm1d(np.int64(3), eps=np.float32(1e-3), momentum=np.float64(0.2))
    theirs = nn.BatchNorm1d(3, eps=float(np.float32(1e-3)), momentum=0.2)
    x = torch.randn(6, 3)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=0)
    assert isinstance(ours.num_features, int)
    assert normkit.LayerNorm((np.int64(4),)).normalized_shape == (4,)
    group = normkit.GroupNorm(np.int64(2), np.int64(4))
    assert (group.num_groups, group.num_channels) == (2, 4) and type(group.num_groups) is int


@pytest.mark.parametrize("name,args,kwargs,shape", [
    ("LayerNorm", (torch.tensor([3, 5]),), {}, (2, 3, 5)), ("LayerNorm", ((torch.tensor(3), 5),), {}, (2, 3, 5)),
    ("GroupNorm", (torch.tensor(2), torch.tensor(6)), {}, (2, 6, 5)),
    ("InstanceNorm1d", (torch.tensor(6, dtype=torch.int32),), {"affine": True, "track_running_stats": True}, (2, 6, 5)),
    ("InstanceNorm2d", (torch.tensor(6),), {}, (2, 6, 3, 4)), ("BatchNorm2d", (torch.tensor(6),), {}, (2, 6, 3, 4)),
])
def test_integer_tensor_sizes_are_accepted_like_python_ints(name, args, kwargs, shape):
    """A 0-dim integer tensor is a size to torch.nn's constructors (a count computed with torch, a 1-D tensor as
    normalized_shape): normkit's refused it with a TypeError. It is kept as the Python int it holds."""
    ours, theirs = _pair(name, *args, **kwargs)
    sizes = [getattr(ours, key) for key in ("normalized_shape", "num_groups", "num_channels", "num_features")
             if hasattr(ours, key)]
    assert sizes and all(type(size) in (int, tuple) for size in sizes)
    assert all(type(entry) is int for size in sizes if isinstance(size, tuple) for entry in size)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    assert normkit.functional.group_norm(x, torch.tensor(3)).shape == x.shape
    for bad in (torch.tensor(2.0), torch.tensor(True), torch.tensor([2, 3])):
        with pytest.raises(TypeError, match="num_groups"):
            normkit.GroupNorm(bad, 6)


@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("name", ["InstanceNorm1d", "InstanceNorm2d"])
def test_instance_norm_running_stats_follow_torch_nn(name, momentum):
    """torch.nn's InstanceNorm never counts batches, and momentum=None leaves its running statistics alone."""
    ours, theirs = _pair(name, 3, affine=True, track_running_stats=True, momentum=momentum)
    shape = (4, 3, 5) if name == "InstanceNorm1d" else (4, 3, 5, 2)
    for _ in range(3):
        x = torch.randn(shape) * 2 + 1
        torch.testing.assert_close(ours(x), theirs(x))
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    ours.eval(), theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))


def test_group_norm_with_one_value_per_group_follows_torch_nn():
    """Each group normalizes to 0 when a batch gives it one value; only a single value in all is refused."""
    ours, theirs = _pair("GroupNorm", 4, 4)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    x = torch.randn(8, 4)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours(x), theirs.bias.detach().expand(8, 4), rtol=0, atol=1e-4)  # float32 rounding
    for layer in (ours, theirs):
        with pytest.raises(ValueError):
            layer(torch.randn(1, 4))


@pytest.mark.parametrize("shape,refused", [((1, 4), True), ((1, 4, 1), True), ((1, 4, 1, 1), True),
                                           ((8, 4), False), ((1, 4, 2), False), ((1, 8), False)])
def test_functional_group_norm_refuses_one_value_in_all_as_torch_nn_functional(shape, refused):
    """normkit.functional.group_norm refuses a whole input of one value per group where torch.nn.functional's does
    (it returned the bias, the layers refusing the same input); a larger input normalizes as torch's."""
    x = torch.randn(shape)
    weight, bias = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    if refused:
        for group_norm in (nn.functional.group_norm, normkit.functional.group_norm):
            with pytest.raises(ValueError, match="more than 1 value per|single value per group"):
                group_norm(x, 4, weight, bias)
    else:
        torch.testing.assert_close(normkit.functional.group_norm(x, 4, weight, bias),
                                   nn.functional.group_norm(x, 4, weight, bias))


@pytest.mark.parametrize("shape", [(0, 3), (4, 3, 0, 2)])
def test_empty_batch_gives_zero_gradients_as_torch_nn(shape):
    ours, theirs = _pair("BatchNorm1d" if len(shape) == 2 else "BatchNorm2d", 3)
    for layer in (ours, theirs):
        layer(torch.randn(shape)).sum().backward()
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, msg=name)
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


def test_eval_without_running_stats_refuses_one_value_per_channel_as_torch_nn():
    for layer in _pair("BatchNorm1d", 3, track_running_stats=False):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer.eval()(torch.randn(1, 3))


def test_track_running_stats_switched_off_after_construction_stops_counting():
    ours, theirs = _pair("BatchNorm1d", 3)
    ours.track_running_stats = theirs.track_running_stats = False
    x = torch.randn(5, 3)
    torch.testing.assert_close(ours(x), theirs(x))
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    # The buffers are not used at all (not moved by a zero weight: 0 * inf would poison them).
    x[0, 1] = float("inf")
    ours(x), theirs(x)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name,options,shape", [
    ("BatchNorm2d", {}, (4, 3, 2, 2)), ("BatchNorm1d", {}, (8, 3)), ("BatchNorm1d", {"virtual_batch_size": 2}, (8, 3)),
    ("BatchNorm1d", {"renorm": True}, (8, 3)),
])
def test_running_stats_without_a_batch_count_move_by_momentum_as_torch_nn(name, options, shape, momentum):
    """A layer whose num_batches_tracked is None (code that strips it for older checkpoints) still moves its
    running statistics by momentum in torch.nn; only momentum=None, which needs the count, leaves them alone."""
    ours = getattr(normkit, name)(3, momentum=momentum, **options).double()
    theirs = getattr(nn, name)(3, momentum=momentum).double()
    ours.num_batches_tracked = theirs.num_batches_tracked = None
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 5
        ours(x), theirs(x)
    assert ours.num_batches_tracked is None
    # Ghost batches of equal size and renorm move running_mean toward the batch mean as torch.nn does (their
    # running variances follow their own rules).
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    if not options:
        torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_a_clipping_schedule_without_a_batch_count_says_so():
    layer = normkit.BatchNorm1d(3, renorm=True, renorm_clipping={"rmax": lambda step: 1 + step / 100})
    layer.num_batches_tracked = None
    with pytest.raises(ValueError, match="num_batches_tracked"):
        layer(torch.randn(8, 3))


def test_running_stats_removed_in_eval_normalize_with_the_batch():
    """Test-time adaptation code sets the buffers to None: eval then uses the batch's statistics."""
    ours, theirs = _pair("BatchNorm2d", 3)
    for layer in (ours, theirs):
        layer.eval()
        layer.running_mean = layer.running_var = None
    x = torch.randn(4, 3, 2, 2) * 3 + 1
    torch.testing.assert_close(ours(x), theirs(x))


def test_vmap_over_a_layer_without_running_stats():
    ours, theirs = _pair("BatchNorm1d", 3, track_running_stats=False)
    x = torch.randn(8, 4, 3) * 2 + 1
    torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(theirs)(x))


def test_per_sample_gradients_through_a_training_layer_without_running_stats():
    """vmap(grad(f)): the input reaches the layer as a gradient wrapper around a batched tensor; the layer's
    periodic far-from-zero check (first step, then every RECENTER_CHECK_EVERY) must see through it."""
    ours, theirs = _pair("BatchNorm1d", 3, track_running_stats=False)
    ours.RECENTER_CHECK_EVERY = 2  # (1000 by default: steps 0, 2 and 4 run the check here)
    x = torch.randn(6, 4, 3) * 2 + 1
    per_sample = [torch.func.vmap(torch.func.grad(lambda x, layer=layer: layer(x).pow(3).sum()))
                  for layer in (ours, theirs)]
    expected = per_sample[1](x)
    for _ in range(5):
        torch.testing.assert_close(per_sample[0](x), expected)


def test_constant_channel_far_from_zero_keeps_torch_nn_bits():
    """A constant channel is no reason to leave torch.nn's kernel: outputs and buffers stay bit for bit equal."""
    ours, theirs = _pair("BatchNorm1d", 3)
    for _ in range(3):
        x = torch.randn(16, 3)
        x[:, 1] = 5.0
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert not ours._recenter


def test_torch_tools_that_read_torch_nn_attributes_work():
    """fuse_conv_bn_eval folds by attribute (running_mean, weight, eps): the same result as torch.nn's layer;
    torch.export traces the eval layer to the same outputs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).eval()
    ours, theirs = (layer.eval() for layer in _pair("BatchNorm2d", 4))
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.running_mean.copy_(torch.tensor([0.1, -0.3, 0.5, 0.0]))
            layer.running_var.copy_(torch.tensor([0.5, 1.5, 2.0, 1.0]))
    x = torch.randn(2, 3, 8, 8)
    fused_ours = nn.utils.fuse_conv_bn_eval(conv, ours)
    fused_theirs = nn.utils.fuse_conv_bn_eval(conv, theirs)
    torch.testing.assert_close(fused_ours(x), fused_theirs(x), rtol=0, atol=0)
    model = nn.Sequential(conv, ours).eval()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


# ------------------------------------------------------------------------------ constructors, as torch.nn's

@pytest.mark.parametrize("name,args", [("LayerNorm", (3,)), ("GroupNorm", (1, 3)), ("BatchNorm1d", (3,)),
                                       ("InstanceNorm1d", (3,))])
def test_a_subclass_s_reset_parameters_runs_at_construction(name, args):
    """torch.nn calls reset_parameters() in __init__, so a subclass's own initialization (zero gamma) applies."""
    def zero_gamma(base):
        class ZeroGamma(base):
            def reset_parameters(self):
                super().reset_parameters()
                if getattr(self, "weight", None) is not None:
                    nn.init.zeros_(self.weight)
        return ZeroGamma
    kwargs = {"affine": True} if name.startswith("Instance") else {}
    ours, theirs = zero_gamma(getattr(normkit, name))(*args, **kwargs), zero_gamma(getattr(nn, name))(*args, **kwargs)
    assert torch.equal(ours.weight, theirs.weight) and not ours.weight.any()


@pytest.mark.parametrize("build, error, words", [
    (lambda: normkit.LayerNorm(4.0), TypeError, "normalized_shape"),
    (lambda: normkit.LayerNorm("4"), TypeError, "normalized_shape"),
    (lambda: normkit.LayerNorm(()), ValueError, "normalized_shape"),
    (lambda: normkit.LayerNorm((4, 0)), ValueError, "normalized_shape"),
    (lambda: normkit.GroupNorm((2,), 4), TypeError, "num_groups"),
    (lambda: normkit.GroupNorm(2.0, 4), TypeError, "num_groups"),
    (lambda: normkit.GroupNorm(2, (4,)), TypeError, "num_channels"),
    (lambda: normkit.BatchNorm1d(3.0), TypeError, "num_features"),
    (lambda: normkit.BatchNorm1d(0), ValueError, "num_features"),
    (lambda: normkit.InstanceNorm2d((6,), affine=True), TypeError, "num_features"),
    (lambda: normkit.InstanceNorm1d((6,)), TypeError, "num_features"),
    (lambda: normkit.BatchNorm(3, axis=1.0), TypeError, "axis"),
])
def test_bad_sizes_name_the_argument(build, error, words):
    with pytest.raises(error, match=words):
        build()


def test_numpy_integer_axes_are_ints():
    x = torch.randn(6, 5, 3)
    for axis in (np.int64(-1), (np.int32(2),), [np.int64(-1)]):
        layer = normkit.BatchNorm(3, axis=axis)
        assert layer.axis in (2, -1, (2,), (-1,)) and all(type(a) is int for a in np.atleast_1d(layer.axis).tolist())
        torch.testing.assert_close(layer(x), normkit.BatchNorm(3, axis=-1)(x), rtol=0, atol=0)
    assert normkit.keras.BatchNormalization(axis=np.int64(1)).axis == 1


@pytest.mark.parametrize("name,args,kwargs", [
    ("BatchNorm2d", (3,), {"eps": 1, "momentum": 1}), ("LayerNorm", (4,), {"eps": 1}),
    ("GroupNorm", (2, 4), {"eps": 1}), ("InstanceNorm1d", (3,), {"eps": 1, "momentum": 0}),
])
def test_repr_keeps_numbers_as_written(name, args, kwargs):
    ours, theirs = _pair(name, *args, **kwargs)
    assert repr(ours) == repr(theirs)


def test_instance_norm_with_running_stats_refuses_other_channel_counts():
    """torch.nn fails inside ATen on the running buffers' size; normkit names num_features."""
    with pytest.raises(ValueError, match="num_features=4 but the input of shape .* has 5 channels"):
        normkit.InstanceNorm1d(4, track_running_stats=True)(torch.randn(2, 5, 6))
    with pytest.warns(UserWarning, match="5 channels but num_features=4"):  # no buffers, no weights: as torch.nn
        normkit.InstanceNorm1d(4)(torch.randn(2, 5, 6))


def _without_buffers(layer):
    layer.running_mean = layer.running_var = None
    return layer


@pytest.mark.parametrize("name,args,kwargs,shape,mode,prepare", [
    ("BatchNorm1d", (3,), {"affine": False, "track_running_stats": False}, (4, 5, 2), "train", None),
    ("BatchNorm1d", (3,), {"affine": False, "track_running_stats": False}, (4, 5), "eval", None),
    ("BatchNorm2d", (3,), {"affine": False}, (4, 2, 3, 3), "train", _without_buffers),
    ("BatchNorm3d", (1,), {"affine": False}, (2, 3, 2, 2, 2), "eval", _without_buffers),
    ("GroupNorm", (2, 4), {"affine": False}, (3, 6, 5), "train", None),
])
def test_layers_without_sized_tensors_take_any_channel_count_as_torch_nn(name, args, kwargs, shape, mode, prepare):
    """Without weight, bias or running statistics in use, torch.nn's BatchNorm and GroupNorm normalize however many
    channels come (GroupNorm: any its groups divide); normkit's refused them with its num_features error."""
    ours, theirs = _pair(name, *args, **kwargs)
    x = torch.randn(shape) * 2 + 1
    for layer in (ours, theirs):
        layer.train(mode == "train")
        if prepare is not None:
            prepare(layer)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(y_ours, y_theirs)
    grad = torch.randn(shape)
    y_ours.backward(grad), y_theirs.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad)
    if getattr(theirs, "num_batches_tracked", None) is not None:
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)
    # With a weight the channel count matters again: refused (torch.nn fails inside ATen).
    with pytest.raises(ValueError, match=r"num_features=\d+ but|num_channels=4"):
        _pair(name, *args, **{**kwargs, "affine": True})[0].train(mode == "train")(x)


# ------------------------------------------------------------------------------ autocast

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,args,kwargs,shape", [
    ("LayerNorm", (5,), {}, (4, 8, 5)), ("GroupNorm", (2, 8), {}, (4, 8, 5, 5)),
    ("InstanceNorm2d", (8,), {"affine": True, "track_running_stats": True}, (4, 8, 5, 5)),
])
def test_under_cpu_autocast_as_torch_nn(name, args, kwargs, shape, dtype):
    """Autocast's rule for the op decides the computation and output dtype, for both layers alike."""
    torch.manual_seed(0)
    ours, theirs = _pair(name, *args, **kwargs)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(torch.linspace(0.5, 1.5, layer.weight.numel()).view_as(layer.weight))
    for given in (torch.float32, dtype):
        x = torch.randn(shape).to(given).requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            y_ours, y_theirs = ours(x), theirs(x)
        assert y_ours.dtype == y_theirs.dtype
        torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=0)
        g = torch.randn(shape).to(y_ours.dtype)
        grads_ours = torch.autograd.grad(y_ours, (x, ours.weight, ours.bias), g)
        grads_theirs = torch.autograd.grad(y_theirs, (x, theirs.weight, theirs.bias), g)
        for a, b in zip(grads_ours, grads_theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name,args,kwargs,shape", [
    ("BatchNorm1d", (3,), {}, (8, 3)), ("BatchNorm1d", (3,), {"affine": False}, (8, 3)),
    ("LayerNorm", (3,), {}, (2, 3)), ("GroupNorm", (1, 3), {}, (2, 3, 4)),
    ("InstanceNorm1d", (3,), {"affine": True}, (2, 3, 4)),
    ("InstanceNorm1d", (3,), {"track_running_stats": True}, (2, 3, 4)),
    ("LayerNorm", (3,), {"elementwise_affine": False}, (2, 3)),
])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_float64_input_to_a_float32_layer_as_torch_nn(name, args, kwargs, shape, mode):
    """Refused where torch.nn refuses (normkit: a TypeError saying what to cast), accepted where it accepts."""
    ours, theirs = _pair(name, *args, **kwargs)
    getattr(ours, mode)(), getattr(theirs, mode)()
    x = torch.randn(shape, dtype=torch.float64)
    try:
        expected = theirs(x)
    except RuntimeError as error:
        assert "mixed dtype" in str(error)
        with pytest.raises(TypeError, match=r"input has dtype torch.float64 .*torch.float32: cast the input"):
            ours(x)
    else:
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("options", [{"renorm": True}, {"virtual_batch_size": 4}, {"momentum": None}])
def test_float64_input_to_a_float32_layer_with_options(options):
    """The option paths refuse as the plain one does (renorm used to compute in float64 in training)."""
    for mode in ("train", "eval"):
        layer = getattr(normkit.BatchNorm(3, **options), mode)()
        with pytest.raises(TypeError, match="cast the input"):
            layer(torch.randn(8, 3, dtype=torch.float64))
        assert layer.double()(torch.randn(8, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("layer_dtype,input_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                                     (torch.float64, torch.float32)])
@pytest.mark.parametrize("options", [{}, {"renorm": True}, {"virtual_batch_size": 4}, {"momentum": None},
                                     {"renorm": True, "virtual_batch_size": 4}, {"axis": -1, "mask": True},
                                     {"adjustment": lambda shape: (torch.ones(shape[-1:]), torch.zeros(shape[-1:]))}])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_batch_of_another_dtype_is_refused_under_autocast_as_torch_nn_refuses_it(layer_dtype, input_dtype, options,
                                                                                    mode):
    """Autocast does not cast batch_norm's input (the op is in none of its lists, CPU or CUDA), so torch.nn's layer
    refuses a .half() model's float32 batch under autocast as without it ("mixed dtype"). normkit's plain path passed
    ATen's message on (naming neither the input nor a fix) and its training option paths computed the batch; every
    path now refuses with the TypeError that says what to cast, and the layer is left as it was."""
    options = dict(options)
    masked = options.pop("mask", False)
    theirs = getattr(nn.BatchNorm1d(3).to(layer_dtype), mode)()
    ours = getattr(normkit.BatchNorm(3, **options).to(layer_dtype), mode)()
    x = torch.randn(8, 3).to(input_dtype)
    mask = torch.rand(8, 1) > 0.2 if masked else None
    before = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="mixed dtype"):
            theirs(x)
        with pytest.raises(TypeError, match=rf"input has dtype {input_dtype} .*{layer_dtype}: cast the input"):
            ours(x, mask=mask)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("name,args,kwargs,shape", [
    ("LayerNorm", (3,), {}, (2, 4, 3)), ("GroupNorm", (1, 3), {}, (2, 3, 4)),
    ("InstanceNorm1d", (3,), {"affine": True}, (2, 3, 4)),
    ("InstanceNorm1d", (3,), {"affine": True, "track_running_stats": True}, (2, 3, 4)),
    ("LazyBatchNorm1d", (), {}, (8, 3)), ("LazyInstanceNorm1d", (), {}, (2, 3, 4)),
])
@pytest.mark.parametrize("layer_dtype,input_dtype", [(torch.float16, torch.float32), (torch.float64, torch.bfloat16)])
def test_the_other_norms_refuse_a_batch_of_another_dtype_under_cpu_autocast_by_name(name, args, kwargs, shape,
                                                                                   layer_dtype, input_dtype):
    """The CPU's autocast casts none of the norms' inputs (CUDA's casts layer_norm's and group_norm's to float32):
    torch.nn's layers refuse the mix there as without autocast, and normkit's now say what to cast instead of passing
    ATen's message on; a lazy layer refuses before it is sized (a LazyBatchNorm was sized by the refused batch)."""
    ours, theirs = (getattr(module, name)(*args, **kwargs).to(layer_dtype) for module in (normkit, nn))
    x = torch.randn(shape).to(input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="mixed dtype"):
            theirs(x)
        with pytest.raises(TypeError, match=rf"input has dtype {input_dtype} .*{layer_dtype}: cast the input"):
            ours(x)
    if name.startswith("Lazy"):
        assert nn.parameter.is_lazy(ours.weight)


@pytest.mark.parametrize("options", [{}, {"renorm": True}, {"virtual_batch_size": 4}])
def test_float64_input_is_refused_under_autocast_too(options):
    """Autocast leaves float64 alone and ATen refuses the mix; normkit says so on every path (renorm used to
    compute the batch in float64 under autocast)."""
    layer = normkit.BatchNorm(3, **options)
    theirs = nn.BatchNorm1d(3)
    x = torch.randn(8, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="mixed dtype"):
            theirs(x)
        with pytest.raises(TypeError, match="cast the input"):
            layer(x)
