"""normkit's lazy layers against torch.nn's (the oracle) and against normkit's eager layers of the size they infer."""

import inspect
import re
import warnings

import pytest
import torch
from torch import nn

import normkit
from normkit import reference as R

from oracle import assert_close, assert_same_training_steps, to_numpy

PAIRS = [("LazyBatchNorm1d", (6, 3)), ("LazyBatchNorm1d", (6, 3, 4)), ("LazyBatchNorm2d", (4, 3, 5, 2)),
         ("LazyBatchNorm3d", (4, 3, 2, 3, 2)), ("LazyInstanceNorm1d", (4, 3, 5)),
         ("LazyInstanceNorm2d", (4, 3, 5, 2)), ("LazyInstanceNorm3d", (2, 3, 2, 3, 2))]
SETTINGS = [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}, {"bias": False},
            {"affine": False, "track_running_stats": False}]


def _torch_lazy(name, **kwargs):
    with warnings.catch_warnings():
        # (torch.nn's lazy instance norm without any sized tensor keeps num_features=0 and warns on every call)
        warnings.simplefilter("ignore")
        return getattr(nn, name)(**kwargs)


@pytest.mark.parametrize("name", sorted({name for name, _ in PAIRS}))
def test_constructors_take_torch_nn_arguments_and_defaults(name):
    ours, theirs = inspect.signature(getattr(normkit, name)), inspect.signature(getattr(nn, name))
    ours_defaults = {p.name: p.default for p in ours.parameters.values() if p.kind is not p.VAR_KEYWORD}
    theirs_defaults = {p.name: p.default for p in theirs.parameters.values()}
    # (BatchNorm's keyword-only options, bias among them, pass through **options)
    assert {k: v for k, v in theirs_defaults.items() if k != "bias" or "bias" in ours_defaults} == ours_defaults


@pytest.mark.parametrize("name,shape", PAIRS, ids=[f"{n}-{len(s)}d" for n, s in PAIRS])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_training_and_eval_match_torch_nn(name, shape, settings, rng):
    """Three training steps and an eval call: outputs, gradients and the whole state_dict equal torch.nn's lazy
    layer's; both become their eager class with the input's channel count."""
    ours = getattr(normkit, name)(dtype=torch.float64, **settings)
    theirs = _torch_lazy(name, dtype=torch.float64, **settings)
    assert ours.num_features == 0 and ours.has_uninitialized_params() == theirs.has_uninitialized_params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.nn's instance norm without sized tensors, as above)
        assert_same_training_steps(ours, theirs, shape, rng)
        x = torch.tensor(rng.normal(size=shape))
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-12, atol=1e-12)
    eager = getattr(normkit, name.removeprefix("Lazy"))
    assert type(ours) is eager and type(theirs) is getattr(nn, name.removeprefix("Lazy"))
    assert ours.num_features == shape[1]
    assert not hasattr(ours, "_initialize_hook") and not ours._forward_pre_hooks


@pytest.mark.parametrize("name,shape", [(n, s) for n, s in PAIRS if "Instance" in n])
@pytest.mark.parametrize("settings", [{"affine": False}, {"affine": False, "momentum": None}])
def test_instance_norm_without_weights_takes_float64_input_with_float32_buffers_as_torch_nn(name, shape, settings, rng):
    """The eager layer and torch.nn's lazy one take float64 data with float32 running statistics (no weight to
    disagree with); the lazy layer's first call refused it as a dtype mismatch before sizing."""
    ours, theirs = getattr(normkit, name)(**settings), _torch_lazy(name, **settings)
    for training in (True, False):
        x = torch.tensor(rng.normal(size=shape) * 2 + 1)
        ours.train(training), theirs.train(training)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert ours.running_mean.dtype == torch.float32 and ours.num_features == shape[1]
    with pytest.raises(TypeError, match="float64"):  # (with a float32 weight, refused as by the eager layer)
        normkit.LazyInstanceNorm1d()(torch.randn(2, 3, 4, dtype=torch.float64))


def test_an_unbatched_instance_norm_input_gives_its_channels(rng):
    """(C, L) has C channels: the layer is InstanceNorm1d(C), equal to the eager one (torch.nn's lazy layer reads
    L here, and then fails on the next batched input)."""
    x = torch.tensor(rng.normal(size=(3, 7)))
    lazy = normkit.LazyInstanceNorm1d(dtype=torch.float64)
    eager = normkit.InstanceNorm1d(3, affine=True, track_running_stats=True, dtype=torch.float64)
    torch.testing.assert_close(lazy(x), eager(x), rtol=1e-12, atol=1e-12)
    assert lazy.num_features == 3 and lazy.weight.shape == (3,)
    torch.testing.assert_close(lazy.running_var, eager.running_var, rtol=1e-12, atol=1e-12)
    lazy(torch.tensor(rng.normal(size=(2, 3, 7))))  # then a batch of the same channels


@pytest.mark.parametrize("options,shape", [
    ({"axis": -1}, (6, 4, 5)), ({"axis": (1, 2)}, (6, 3, 4, 2)), ({"renorm": True}, (8, 3)),
    ({"virtual_batch_size": 2, "weight_initializer": "he_normal", "running_var_initializer": "zeros"}, (8, 3, 2)),
    ({"unbiased_running_var": False, "momentum": None}, (5, 3)),
], ids=["axis-1", "axis-tuple", "renorm", "ghost-initializers", "keras-variance"])
def test_lazy_batch_norm_equals_the_eager_layer_of_the_inferred_size(options, shape, rng):
    """Every option of normkit.BatchNorm: the lazy layer, once sized, is BatchNorm(num_features, **options)
    (initializers applied at sizing, from the same seed), step after step."""
    axes = options.get("axis", 1)
    sizes = tuple(shape[a] for a in ((axes,) if isinstance(axes, int) else axes))
    torch.manual_seed(3)
    lazy = normkit.LazyBatchNorm(dtype=torch.float64, **options)
    x = torch.tensor(rng.normal(size=shape))
    lazy(x.clone())  # sized here: its initializers draw now
    torch.manual_seed(3)
    eager = normkit.BatchNorm(sizes if isinstance(axes, tuple) else sizes[0], dtype=torch.float64, **options)
    eager(x.clone())
    assert type(lazy) is normkit.BatchNorm and lazy.num_features == eager.num_features
    assert_same_training_steps(lazy, eager, shape, rng)


def test_the_first_step_matches_the_reference(rng):
    """One training step of a lazy BatchNorm2d against the float64 NumPy reference."""
    x = torch.tensor(rng.normal(size=(4, 3, 2, 2)) * 2 + 1, requires_grad=True)
    layer = normkit.LazyBatchNorm2d(dtype=torch.float64)
    y = layer(x)
    mean, var = torch.zeros(3, dtype=torch.float64).numpy(), torch.ones(3, dtype=torch.float64).numpy()
    expected = R.batch_norm(to_numpy(x), mean, var, to_numpy(layer.weight), to_numpy(layer.bias), True, 0.1, 1e-5)
    assert_close(y, expected)
    assert_close(layer.running_mean, mean)
    assert_close(layer.running_var, var)


def test_a_loaded_state_dict_sizes_the_layer_before_its_first_call(rng):
    """A torch.nn.BatchNorm2d checkpoint loaded into a lazy layer: num_features is its size at once (torch.nn's lazy
    layer says 0 until it is called) and the layer then computes what torch.nn's loaded layer does."""
    source = nn.BatchNorm2d(3, dtype=torch.float64)
    source(torch.tensor(rng.normal(size=(4, 3, 2, 2)) + 2))
    lazy = normkit.LazyBatchNorm2d(dtype=torch.float64)
    assert lazy.load_state_dict(source.state_dict())
    assert lazy.num_features == 3 and "LazyBatchNorm2d(3," in repr(lazy)
    assert_same_training_steps(lazy, source, (4, 3, 2, 2), rng)
    assert type(lazy) is normkit.BatchNorm2d


def test_a_wrong_rank_is_refused_before_anything_is_sized():
    layer = normkit.LazyBatchNorm2d()
    with pytest.raises(ValueError, match=r"expected 4D input \(got 2D input\) for LazyBatchNorm2d"):
        layer(torch.randn(4, 3))
    assert layer.num_features == 0 and layer.has_uninitialized_params()
    layer(torch.randn(4, 3, 2, 2))
    assert layer.num_features == 3
    with pytest.raises(ValueError, match=r"expected 2D \(unbatched\) or 3D \(batched\) input"):
        normkit.LazyInstanceNorm1d()(torch.randn(4, 3, 2, 2))
    with pytest.raises(TypeError, match="expects a tensor input"):
        normkit.LazyBatchNorm1d()([1.0, 2.0])


def test_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="axis 1"):
        normkit.LazyBatchNorm2d(axis=-1)
    with pytest.raises(ValueError, match="eps"):
        normkit.LazyBatchNorm(eps=0)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        normkit.LazyBatchNorm(virtual_batch_size=0)


def test_convert_carries_lazy_layers_both_ways(rng):
    """A model with torch.nn's lazy BN, converted before its first call, trains as the unconverted copy; a user's
    pre-hook sees the layer sized (the sizing hook still runs first); converting back gives torch.nn's lazy layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1, dtype=torch.float64), nn.LazyBatchNorm2d(momentum=0.3, dtype=torch.float64))
    copy = nn.Sequential(nn.Conv2d(3, 3, 1, dtype=torch.float64), nn.LazyBatchNorm2d(momentum=0.3, dtype=torch.float64))
    copy[0].load_state_dict(model[0].state_dict())
    seen = []
    model[1].register_forward_pre_hook(lambda module, args: seen.append(module.num_features))
    normkit.convert_batch_norm(model, "normkit")
    assert type(model[1]) is normkit.LazyBatchNorm2d
    assert_same_training_steps(model, copy, (4, 3, 3, 3), rng)
    assert type(model[1]) is normkit.BatchNorm2d and seen == [3, 3, 3]
    back = normkit.convert_batch_norm(nn.Sequential(normkit.LazyBatchNorm1d(eps=1e-3)), "torch")
    assert type(back[0]) is nn.LazyBatchNorm1d and back[0].eps == 1e-3
    back(torch.randn(5, 4))
    assert type(back[0]) is nn.BatchNorm1d and back[0].num_features == 4


def test_synchronize_makes_torch_lazy_layers_synchronized_normkit_ones():
    model = normkit.synchronize_batch_norm(nn.Sequential(nn.LazyBatchNorm1d()))
    assert type(model[0]) is normkit.LazyBatchNorm1d and model[0].synchronized


@pytest.mark.parametrize("name", ["LazyBatchNorm1d", "LazyBatchNorm", "LazyInstanceNorm1d"])
def test_sized_inside_torch_compile_with_dynamic_shapes(name, rng):
    """torch.compile with dynamic shapes (dynamic=True, or automatic after a recompile) traces the input's sizes as
    symbols; the layer is still sized by them (torch.nn's lazy layer fails there) and computes the eager layer."""
    torch._dynamo.reset()
    model = nn.Sequential(getattr(normkit, name)(dtype=torch.float64))
    x = torch.tensor(rng.normal(size=(4, 5, 7)))
    y = torch.compile(model, backend="eager", dynamic=True)(x)
    eager = getattr(normkit, name.removeprefix("Lazy"))(5, affine=True, track_running_stats=True, dtype=torch.float64)
    torch.testing.assert_close(y, eager(x), rtol=1e-12, atol=1e-12)
    assert type(model[0].num_features) is int and model[0].num_features == 5
    torch.testing.assert_close(model[0].running_var, eager.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,shape,dropped", [
    ("LazyBatchNorm1d", (6, 3, 4), ("running_var",)), ("LazyBatchNorm1d", (6, 3), ("weight", "bias", "running_mean")),
    ("LazyInstanceNorm2d", (2, 3, 4, 4), ("running_mean",)),
], ids=["no-running_var", "buffers-only", "instance-no-running_mean"])
def test_a_partial_state_dict_keeps_its_values_through_the_first_call(name, shape, dropped, rng):
    """load_state_dict(strict=False) of part of a checkpoint: num_features is the loaded size at once, and the
    first call sizes the rest without resetting what was loaded: the eager layer that loaded the same part,
    step after step (the first call reset every tensor, the loaded ones too)."""
    eager = getattr(normkit, name.removeprefix("Lazy"))
    source = eager(shape[1], affine=True, track_running_stats=True, dtype=torch.float64)
    with torch.no_grad():
        for tensor in source.parameters():
            tensor.copy_(torch.tensor(rng.normal(size=tensor.shape)))
    source(torch.tensor(rng.normal(size=shape) * 3 + 1))
    part = {key: value for key, value in source.state_dict().items() if key not in dropped}
    lazy = getattr(normkit, name)(dtype=torch.float64)
    reference = eager(shape[1], affine=True, track_running_stats=True, dtype=torch.float64)
    assert lazy.load_state_dict(part, strict=False) == reference.load_state_dict(part, strict=False)
    assert lazy.num_features == shape[1]
    assert_same_training_steps(lazy, reference, shape, rng)
    assert type(lazy) is eager


def test_renorm_switched_on_before_sizing(rng):
    """renorm=True set on a lazy layer not yet sized (options may change on a built layer): its renorm state is sized
    with the rest, and the layer is the eager layer that had renorm switched on the same way."""
    lazy = normkit.LazyBatchNorm(dtype=torch.float64)
    lazy.renorm = True
    eager = normkit.BatchNorm(3, dtype=torch.float64)
    eager.renorm = True
    assert_same_training_steps(lazy, eager, (6, 3), rng)
    assert type(lazy) is normkit.BatchNorm and lazy.renorm


def test_tools_before_sizing_refuse_clearly_and_work_after(rng):
    """freeze(), regularization_loss() and apply_constraints() need the weight: before sizing a clear error that
    names the layer (freeze_batch_norm changes nothing then: it froze the layers before the lazy one); after
    sizing they give the eager layer's results. unfreeze() of a layer not sized yet has nothing to refuse."""
    options = {"weight_regularizer": "l2", "bias_constraint": "non_neg"}
    for call in (lambda layer: layer.freeze(), lambda layer: layer.regularization_loss(),
                 lambda layer: layer.apply_constraints(), lambda layer: normkit.regularization_loss(layer)):
        layer = normkit.LazyBatchNorm(dtype=torch.float64, **options)
        with pytest.raises(ValueError, match="LazyBatchNorm.*no size yet.*call it on a batch, or load a state_dict"):
            call(layer)
        assert not layer.frozen and layer.has_uninitialized_params()
    plain = normkit.LazyBatchNorm1d()
    assert plain.regularization_loss() == 0 and plain.apply_constraints() is None  # (nothing to compute)
    assert plain.unfreeze() is plain and not plain.frozen and plain.weight.requires_grad
    model = nn.Sequential(normkit.BatchNorm1d(3), normkit.LazyBatchNorm1d())
    with pytest.raises(ValueError, match=r"freeze_batch_norm: not sized yet: '1' \(LazyBatchNorm1d\)"):
        normkit.freeze_batch_norm(model)
    assert not model[0].frozen and model[0].weight.requires_grad
    normkit.unfreeze_batch_norm(model)
    # After sizing: the eager layer's values.
    lazy = normkit.LazyBatchNorm(dtype=torch.float64, **options)
    eager = normkit.BatchNorm(3, dtype=torch.float64, **options)
    x = torch.tensor(rng.normal(size=(6, 3)))
    for layer in (lazy, eager):
        layer(x)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, -2.0, 3.0]))
            layer.bias.copy_(torch.tensor([-1.0, 2.0, -3.0]))
        layer.apply_constraints()
    torch.testing.assert_close(lazy.regularization_loss(), eager.regularization_loss(), rtol=0, atol=0)
    torch.testing.assert_close(lazy.bias, eager.bias, rtol=0, atol=0)
    normkit.freeze_batch_norm(nn.Sequential(lazy))
    assert lazy.frozen and not lazy.weight.requires_grad


def test_convert_a_torch_lazy_layer_sized_by_a_state_dict(rng):
    """torch.nn's lazy layer that loaded a checkpoint but was not called yet: converted, it says the loaded size at
    once (as when the checkpoint is loaded into normkit's lazy layer) and trains as the unconverted one."""
    source = nn.BatchNorm2d(3, dtype=torch.float64)
    source(torch.tensor(rng.normal(size=(4, 3, 2, 2)) + 2))
    model = nn.Sequential(nn.LazyBatchNorm2d(dtype=torch.float64))
    copy = nn.Sequential(nn.LazyBatchNorm2d(dtype=torch.float64))
    for each in (model, copy):
        each[0].load_state_dict(source.state_dict())
    normkit.convert_batch_norm(model, "normkit")
    direct = normkit.LazyBatchNorm2d(dtype=torch.float64)
    direct.load_state_dict(source.state_dict())
    assert type(model[0]) is normkit.LazyBatchNorm2d and model[0].num_features == direct.num_features == 3
    assert repr(model[0]) == repr(direct)
    assert_same_training_steps(model, copy, (4, 3, 2, 2), rng)
    assert type(model[0]) is normkit.BatchNorm2d and model[0].num_features == 3


@pytest.mark.parametrize("source", [normkit.LazyBatchNorm1d, nn.LazyBatchNorm1d], ids=["normkit", "torch.nn"])
def test_an_unsized_checkpoint_loads_into_a_renorm_layer(source, rng):
    """A plain lazy layer's state_dict before it was sized: a lazy renorm layer loads it as a lazy plain one does
    (nothing sized; it then trains as a fresh eager renorm layer), and a sized renorm layer refuses it as torch.nn's
    sized layer does (the renorm state was derived from the unsized statistics: torch's generic error)."""
    state = source(dtype=torch.float64).state_dict()
    lazy = normkit.LazyBatchNorm(renorm=True, dtype=torch.float64)
    assert lazy.load_state_dict(state) and lazy.has_uninitialized_params()
    assert_same_training_steps(lazy, normkit.BatchNorm(3, renorm=True, dtype=torch.float64), (6, 3), rng)
    with pytest.raises(RuntimeError) as theirs:
        nn.BatchNorm1d(3, dtype=torch.float64).load_state_dict(state)
    with pytest.raises(RuntimeError, match="^" + re.escape(str(theirs.value))):
        normkit.BatchNorm(3, renorm=True, dtype=torch.float64).load_state_dict(state)


@pytest.mark.parametrize("layer,checkpoint,rank,shape", [
    (lambda: normkit.LazyBatchNorm(axis=(1, 2)), lambda: nn.BatchNorm2d(3).state_dict(), 2, (4, 3, 2, 2)),
    (normkit.LazyBatchNorm2d, lambda: normkit.BatchNorm((3, 2), axis=(1, 2)).state_dict(), 1, (4, 3, 2, 2)),
    (normkit.LazyInstanceNorm2d, lambda: normkit.BatchNorm((3, 2), axis=(1, 2)).state_dict(), 1, (4, 3, 2, 2)),
    (normkit.LazyBatchNorm1d, lambda: {**nn.BatchNorm1d(3).state_dict(), "bias": torch.zeros(4)}, 1, (4, 3)),
], ids=["one-axis-into-two", "two-axes-into-one", "two-axes-into-instance", "sizes-disagree"])
def test_a_checkpoint_of_other_feature_axes_is_refused_at_load(layer, checkpoint, rank, shape):
    """A checkpoint whose tensors have another rank than the layer's feature axes, or sizes that disagree, is refused
    by load_state_dict as the eager layer of its size refuses it, and leaves the layer unsized and usable (it was
    sized by it, then failed on every call)."""
    lazy = layer()
    with pytest.raises(RuntimeError, match=f"size mismatch for {type(lazy).__name__}: .*need one shape of {rank} dim"):
        lazy.load_state_dict(checkpoint())
    assert lazy.num_features == 0 and lazy.has_uninitialized_params()
    lazy(torch.randn(shape))
    assert lazy.weight.shape == lazy.running_mean.shape == shape[1:1 + rank]
