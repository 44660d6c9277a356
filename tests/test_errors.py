"""Bad input gets a clear ValueError/TypeError naming the argument and the fix."""

import re

import numpy as np
import pytest
import torch

import normkit
from normkit.keras import BatchNormalization


def test_channel_count_mismatch_names_num_features():
    with pytest.raises(ValueError, match=r"num_features=3 .* 4 features on axis 1.*num_features=4"):
        normkit.BatchNorm2d(3)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"num_features=5"):
        normkit.BatchNorm(5, axis=-1)(torch.randn(2, 4, 3))


def test_channel_count_mismatch_under_renorm_names_num_features_without_running_statistics():
    """renorm reads its own statistics (renorm_mean, renorm_stddev, moving_stddev) in training, so with the running
    statistics set to None and no weights another channel count is still refused by name. (It reached the
    renorm buffers: "The size of tensor a (6) must match the size of tensor b (5)" from deep inside.)"""
    layer = normkit.BatchNorm(5, affine=False, renorm=True)
    layer.running_mean = layer.running_var = None
    with pytest.raises(ValueError, match=r"num_features=5 but the input of shape \(8, 6, 4\) has 6 features"):
        layer(torch.randn(8, 6, 4))
    assert layer(torch.randn(8, 5, 4)).shape == (8, 5, 4)  # (the layer's own count works)


def test_features_last_into_a_drop_in_class_names_the_layer_that_takes_them():
    """(N, L, C) data into BatchNorm1d(C): the drop-in classes refuse axis=..., so the message names normkit.BatchNorm."""
    with pytest.raises(ValueError, match=r"num_features=10; BatchNorm1d normalizes axis 1 only.*"
                                         r"normkit\.BatchNorm\(16, axis=-1\)"):
        normkit.BatchNorm1d(16)(torch.randn(4, 10, 16))
    with pytest.raises(ValueError, match=r"BatchNorm2d normalizes axis 1 only.*normkit\.BatchNorm\(3, axis=\.\.\.\)"):
        normkit.BatchNorm2d(3)(torch.randn(4, 8, 3, 5))
    normkit.BatchNorm(16, axis=-1)(torch.randn(4, 10, 16))  # what the message suggests works


@pytest.mark.parametrize("cls,rank", [(normkit.BatchNorm1d, 4), (normkit.BatchNorm2d, 3), (normkit.BatchNorm3d, 4),
                                      (normkit.BatchNorm1d, 1)])
def test_wrong_rank_says_expected_and_got(cls, rank):
    with pytest.raises(ValueError, match=r"expected .*D input \(got %dD input\)" % rank):
        cls(3)(torch.randn(*([3] * rank)))


def test_generic_batch_norm_needs_rank_two():
    with pytest.raises(ValueError, match="rank >= 2"):
        normkit.BatchNorm(3)(torch.randn(3))


@pytest.mark.parametrize("shape,axis", [((), -1), ((5,), -1), ((5,), 1), ((5,), 0)])
def test_keras_layer_refuses_rank_below_two_by_rank_not_by_an_axis_range(shape, axis):
    # The axis range of a rank-0 or rank-1 input ("use an axis in [0, -1]", or axis 0, itself refused) misleads.
    layer = normkit.keras.BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match=r"rank >= 2 .*input_shape %s of rank %d" % (re.escape(str(shape)), len(shape))):
        layer(torch.randn(shape), training=True)
    assert not layer.built


@pytest.mark.parametrize("axis,match", [(4, r"axis=4 is out of range .* rank 4.*\[-4, 3\]"),
                                        (-5, "out of range"), ((1, 1), "names the same axis twice"),
                                        ((1, -3), "names the same axis twice")])
def test_axis_out_of_range_or_repeated(axis, match):
    layer = normkit.BatchNorm(3 if isinstance(axis, int) else (3, 3), axis=axis) if axis != (1, 1) else None
    if layer is None:
        with pytest.raises(ValueError, match=match):
            normkit.BatchNorm((3, 3), axis=axis)
        return
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(2, 3, 3, 3))


def test_axis_type_is_checked():
    with pytest.raises(TypeError, match="axis entries must be ints"):
        normkit.BatchNorm(3, axis=1.0)


def test_axis_checks_survive_the_cache():
    # The axis cache must not let values that compare equal to ints (True, 1.0) through.
    from normkit.axes import canonicalize_axes
    assert canonicalize_axes(1, 3) == (1,) and canonicalize_axes((1,), 3) == (1,)
    for axis in (True, (True,), 1.0, (1.0,)):
        with pytest.raises(TypeError, match="axis entries must be ints"):
            canonicalize_axes(axis, 3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input_says_convert_to_float(dtype):
    with pytest.raises(TypeError, match=r"dtype .*floating-point.*\.float\(\)"):
        normkit.BatchNorm1d(3)(torch.ones(4, 3, dtype=dtype))
    with pytest.raises(TypeError, match="floating-point"):
        normkit.GroupNorm(1, 3)(torch.ones(4, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("make", [lambda: normkit.BatchNorm1d(3), lambda: normkit.BatchNorm(3, renorm=True),
                                  lambda: normkit.LayerNorm(3), lambda: normkit.GroupNorm(1, 3),
                                  lambda: normkit.InstanceNorm1d(3), lambda: normkit.LazyBatchNorm1d()])
def test_complex_input_is_not_told_to_drop_its_imaginary_part(make, dtype):
    """input.float() on complex data discards the imaginary part (torch only warns): the message named it as the fix.
    It names the real views that keep both parts instead (torch.nn's layers fail in ATen, 'not implemented for
    ComplexFloat' or 'mixed dtype')."""
    x = torch.ones(4, 3, 2, dtype=dtype)
    with pytest.raises(TypeError, match=r"input has dtype torch.complex\d+.*imaginary part.*torch.view_as_real") as error:
        make()(x)
    assert ".float()" not in str(error.value)


@pytest.mark.parametrize("eps", [0, -1, 0.0, float("nan")])
def test_non_positive_eps(eps):
    for make in (lambda: normkit.BatchNorm2d(3, eps=eps), lambda: normkit.LayerNorm(3, eps=eps),
                 lambda: normkit.GroupNorm(1, 3, eps=eps), lambda: normkit.InstanceNorm1d(3, eps=eps)):
        with pytest.raises(ValueError, match="eps must be a positive number"):
            make()
    with pytest.raises(ValueError, match="eps must be a positive number"):
        normkit.functional.batch_norm(torch.randn(4, 3), training=True, eps=eps)


@pytest.mark.parametrize("make", [
    lambda: normkit.BatchNorm1d(3, track_running_stats=False),
    lambda: normkit.BatchNorm(3, track_running_stats=False, virtual_batch_size=2),  # (eval: no ghost batches)
    lambda: normkit.BatchNorm(3, track_running_stats=False, axis=-1),
], ids=["BatchNorm1d", "ghost", "axis=-1"])
def test_one_value_per_channel_in_eval_without_running_statistics_does_not_advise_eval(make):
    """In eval a layer without running statistics normalizes by the batch (torch.nn's rule), so one value per channel
    is refused there too; the refusal said 'when training' and advised 'use eval()', where the layer already is.
    It says why the batch's statistics are used and what gives the layer statistics to use instead."""
    layer = make().eval()
    with pytest.raises(ValueError, match="more than 1 value per channel") as raised:
        layer(torch.randn(1, 3))
    message = str(raised.value)
    assert "when training" not in message and "use eval()" not in message
    assert "no running statistics" in message and "track_running_stats=True" in message
    layer.running_mean = layer.running_var = None  # (buffers set to None: the same)
    layer.track_running_stats = True
    with pytest.raises(ValueError, match="no running statistics"):
        layer(torch.randn(1, 3))


def test_one_value_per_channel_in_training_suggests_remedies():
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*eval\(\).*larger batch.*GroupNorm"):
        normkit.BatchNorm1d(10)(torch.randn(1, 10))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        normkit.BatchNorm1d(10)(torch.randn(1, 10, 1))
    normkit.BatchNorm1d(10)(torch.randn(1, 10, 2))  # one sample, two positions: fine
    layer = normkit.BatchNorm1d(10).eval()
    assert layer(torch.randn(1, 10)).shape == (1, 10)  # eval never needs a batch


@pytest.mark.parametrize("make", [lambda: normkit.InstanceNorm1d(3), lambda: normkit.InstanceNorm1d(3).eval(),
                                  lambda: normkit.InstanceNorm2d(3, affine=True, track_running_stats=True)])
def test_one_spatial_value_in_instance_norm_names_its_remedies(make):
    """An instance's statistics, in training and in eval without running statistics: BatchNorm's 'when training'
    and 'batch variance' misdescribed both."""
    layer = make()
    x = torch.randn((2, 3) + (1,) * layer._spatial_dims)
    with pytest.raises(ValueError, match=r"more than 1 spatial element.*input's own statistics.*track_running_stats"):
        layer(x)
    if layer.track_running_stats:
        assert layer.eval()(x).shape == x.shape  # the running statistics need no spatial size


@pytest.mark.parametrize("options", [{}, {"renorm": True}, {"ghost_layout": "contiguous"},
                                     {"adjustment": lambda shape: (1.0, 0.0)}])
def test_one_value_per_ghost_batch_names_virtual_batch_size(options, execution):
    """The batch holds 8 values per channel; the ghost batches of 1 hold one: "a larger batch" would not help."""
    layer = normkit.BatchNorm(3, virtual_batch_size=1, **options)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*virtual_batch_size=1.*larger virtual_batch_size"):
        layer(torch.randn(8, 3))
    normkit.BatchNorm(3, virtual_batch_size=2, **options)(torch.randn(8, 3))  # two rows per ghost batch: fine


@pytest.mark.parametrize("options", [{}, {"ghost_layout": "contiguous"}])
def test_one_value_per_ghost_batch_out_of_training_does_not_advise_eval(options):
    """functional.batch_norm without running statistics and training=False normalizes by its ghost batches'
    statistics; the refusal of ghosts of one row said 'when training' and 'or eval()', where the call already is.
    (The layers take ghost batches in training only.)"""
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*virtual_batch_size=1") as raised:
        normkit.functional.batch_norm(x, None, None, training=False, virtual_batch_size=1, **options)
    message = str(raised.value)
    assert "when training" not in message and "eval()" not in message
    assert "larger virtual_batch_size" in message and "running_mean and running_var" in message
    assert torch.isfinite(normkit.functional.batch_norm(x, None, None, training=False, virtual_batch_size=2,
                                                        **options)).all()


def test_group_norm_groups_must_divide_channels():
    with pytest.raises(ValueError, match=r"num_groups=4 must divide num_channels=6; choose one of \[1, 2, 3, 6\]"):
        normkit.GroupNorm(4, 6)


def test_group_norm_channel_mismatch():
    with pytest.raises(ValueError, match=r"num_channels=4"):
        normkit.GroupNorm(2, 4)(torch.randn(2, 6, 3))


def test_layer_norm_shape_mismatch():
    with pytest.raises(ValueError, match=r"last 1 dims are \(5,\)"):
        normkit.LayerNorm(5)(torch.randn(2, 4))


@pytest.mark.parametrize("make, shape, fix", [
    (lambda: normkit.InstanceNorm1d(3), (8, 3, 4, 4), r"got 4D input\) for InstanceNorm1d; .*InstanceNorm2d\(3\)"),
    (lambda: normkit.InstanceNorm2d(3, affine=True), (8, 3, 4, 4, 4), r"InstanceNorm3d\(3\)"),
    (lambda: normkit.InstanceNorm3d(3), (8, 3), r"InstanceNorm1d\(3\)"),
    (lambda: normkit.InstanceNorm2d(3), (2, 3, 4, 4, 4, 4), r"GroupNorm\(3, 3\)"),
    (lambda: normkit.LazyInstanceNorm1d(), (8, 3, 4, 4), r"for LazyInstanceNorm1d; .*LazyInstanceNorm2d\(\)"),
])
def test_instance_norm_of_another_rank_names_the_class_that_takes_it(make, shape, fix):
    """As the BN classes (below): the refusal of a rank names the instance norm of that rank (batched), or GroupNorm
    with one group per channel, the same normalization for any rank; it named nothing."""
    with pytest.raises(ValueError, match=fix):
        make()(torch.randn(shape))


@pytest.mark.parametrize("make, shape, fix", [
    (lambda: normkit.BatchNorm2d(3), (8, 3, 5), r"expected 4D input \(got 3D input\) for BatchNorm2d; .*BatchNorm1d\(3\)"),
    (lambda: normkit.BatchNorm1d(3), (8, 3, 4, 4), r"expected 2D or 3D input \(got 4D input\).*BatchNorm2d\(3\)"),
    (lambda: normkit.BatchNorm3d(3), (8, 3, 4, 4), r"BatchNorm2d\(3\)"),
    (lambda: normkit.BatchNorm2d(3), (2, 3, 4, 4, 4, 4), r"normkit\.BatchNorm\(3\) for inputs of any rank"),
    # one sample's features, no batch: no class of BN takes that, normkit.BatchNorm neither
    (lambda: normkit.BatchNorm1d(3), (3,), r"needs a batch.*x\.unsqueeze\(0\)"),
])
def test_batch_norm_of_another_rank_names_the_class_that_takes_it(make, shape, fix):
    """The drop-in classes refuse ranks as torch.nn's do, and say what takes the input: the class of its rank (a
    BatchNorm2d given a sequence's (N, C, L)), normkit.BatchNorm for ranks without one. A 1D input was sent to
    normkit.BatchNorm 'for inputs of any rank', which refuses it too: BN needs a batch axis."""
    with pytest.raises(ValueError, match=fix):
        make()(torch.randn(shape))
    with pytest.raises(ValueError):
        normkit.BatchNorm(3)(torch.randn(3))


@pytest.mark.parametrize("make, shape, fix", [
    # channels at dim 1 where LayerNorm normalizes the last dims (a conv's (N, C, H, W) output)
    (lambda: normkit.LayerNorm(4), (2, 4, 3), r"normalized_shape=\(3,\).*features \(dim 1 holds 4\) last: x\.movedim\(1, -1\)"),
    (lambda: normkit.LayerNorm((2, 3)), (5, 2, 4), r"normalized_shape=\(2, 4\)"),
    (lambda: normkit.LayerNorm((2, 3)), (3,), r"normalized_shape=\(3,\)"),
    # features last where GroupNorm takes them at dim 1 (NHWC data)
    (lambda: normkit.GroupNorm(2, 4), (2, 5, 5, 4), r"num_channels=5.*\[1, 5\].*channels are last: x\.movedim\(-1, 1\)"),
    (lambda: normkit.GroupNorm(2, 4), (2, 6, 3), r"num_channels=6 \(and num_groups one of \[1, 2, 3, 6\]\)"),
])
def test_sample_norms_refusing_a_shape_say_what_fixes_it(make, shape, fix):
    """A refused argument's error names it and the fix (docs/decisions.md's exception contract). LayerNorm and
    GroupNorm named the expected shape only, where BatchNorm and InstanceNorm say which size to build the layer with
    and where the features must be."""
    with pytest.raises(ValueError, match=fix):
        make()(torch.randn(shape))


@pytest.mark.parametrize("kwargs,match", [
    (dict(momentum=1.5), "momentum must be a number in"), (dict(momentum="0.1"), "momentum"),
    (dict(num_features=0), "num_features must be a positive int"),
    (dict(virtual_batch_size=0), "virtual_batch_size must be a positive int"),
    (dict(virtual_batch_size=4, axis=0), "axis may not contain 0"),
    (dict(ghost_layout="random"), "ghost_layout must be"),
    (dict(renorm_clipping={"rmax": 2}), "renorm=True"),
    (dict(renorm=True, renorm_clipping={"random_key": 1}), "invalid keys"),
    (dict(renorm=True, renorm_clipping={"rmax": 0, "rmin": 1}), "rmax should be"),
    (dict(renorm=True, renorm_clipping={"rmax": 1, "dmax": -1}), "dmax should be non-negative"),
    # NaN passes every comparison as False: it clipped nothing, silently (Keras' output is NaN)
    (dict(renorm=True, renorm_clipping={"rmax": float("nan")}), "rmax is NaN"),
    (dict(renorm=True, renorm_clipping={"dmax": lambda step: float("nan")}), "dmax is NaN"),
    # float() took strings and bools: a config's "2" or True loaded as a bound (found by a fuzz against Keras 3.15.1)
    (dict(renorm=True, renorm_clipping={"rmax": "2"}), r"\['rmax'\] must be a number"),
    (dict(renorm=True, renorm_clipping={"dmax": True}), r"\['dmax'\] must be a number"),
    (dict(renorm=True, track_running_stats=False), "renorm=True needs running statistics"),
    (dict(weight_initializer="nope"), "weight_initializer='nope' is not a known initializer"),
    # a value beyond the weight's dtype: torch.full's RuntimeError named no argument, an array or a callable's values
    # became inf without a word (an inf gamma or variance is NaN at the first step)
    (dict(weight_initializer=1e300), r"weight_initializer=Constant\(1e\+300\).*beyond torch\.float32's range"),
    (dict(running_var_initializer=np.array([1.0, 1.0, 1e39])), r"running_var_initializer=.*beyond torch\.float32's range"),
    (dict(bias_initializer=lambda shape, dtype: torch.full(shape, -1e39, dtype=torch.float64)),
     r"bias_initializer=.*gives values beyond torch\.float32's range"),
    (dict(weight_initializer=1e5, dtype=torch.float16), r"weight_initializer=.*beyond torch\.float16's range"),
    (dict(weight_regularizer="l3"), "weight_regularizer='l3' is not a known regularizer"),
    (dict(bias_constraint="positive"), "bias_constraint='positive' is not a known constraint"),
    (dict(num_features=(3, 4), axis=1), "axis must be a tuple of 2 axes"),
    # a backend name or the ranks: taken unchecked, they failed inside torch.distributed at the first training step
    (dict(synchronized=True, process_group="nccl"), r"process_group must be None .*dist\.init_process_group"),
    (dict(synchronized=True, process_group=[0, 1]), r"process_group must be None .*dist\.new_group\(ranks\)"),
])
def test_constructor_errors(kwargs, match):
    kwargs.setdefault("num_features", 3)
    with pytest.raises((ValueError, TypeError), match=match):
        normkit.BatchNorm(**kwargs)


@pytest.mark.parametrize("returned", [torch.ones(1), 2.0, torch.ones(1, 3)])
def test_an_initializer_returning_another_shape_is_refused(returned):
    """A callable initializer is given the shape and must return it: a broadcastable value (one number, a (1,)
    or (1, 3) array) would otherwise fill the parameter silently, hiding an initializer written for another one."""
    with pytest.raises(ValueError, match=r"returned shape .*, expected \(3,\)"):
        normkit.BatchNorm(3, weight_initializer=lambda shape, dtype: returned)
    normkit.BatchNorm(3, weight_initializer=lambda shape, dtype: torch.full(shape, 2.0))  # the right shape: fine


def test_virtual_batch_must_divide_batch_in_training_only():
    layer = normkit.BatchNorm(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide the batch size .* got a batch of 6"):
        layer(torch.randn(6, 3))
    layer.eval()
    assert layer(torch.randn(6, 3)).shape == (6, 3)
    # The functional twins say the same (not a reshape error from inside the statistics).
    x = torch.randn(6, 3, dtype=torch.float64)
    for ghost_layout in ("strided", "contiguous"):
        for batch_norm in (normkit.functional.batch_norm, normkit.reference.batch_norm):
            data = x if batch_norm is normkit.functional.batch_norm else x.numpy()
            with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide the batch size .* batch of 6"):
                batch_norm(data, training=True, virtual_batch_size=4, ghost_layout=ghost_layout)


def test_mask_shape_mismatch():
    layer = normkit.BatchNorm(4, axis=-1)
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not fit.*\(2, 5\)"):
        layer(torch.randn(2, 5, 4), mask=torch.ones(3))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 6\) cannot broadcast.*shape \(2, 5\)"):
        layer(torch.randn(2, 5, 4), mask=torch.ones(2, 6))


def test_non_tensor_input():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        normkit.BatchNorm1d(3)([[1.0, 2.0, 3.0]])


def test_one_value_per_channel_names_the_input_shape_for_features_last():
    with pytest.raises(ValueError, match=r"got input size \(1, 1, 1, 3\)"):
        normkit.BatchNorm(3, axis=-1)(torch.randn(1, 1, 1, 3))


def _state(layer):
    return {name: tensor.clone() for name, tensor in layer.state_dict().items()}


def _same_state(before, layer):
    after = layer.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("options", [{}, {"momentum": None}, {"unbiased_running_var": False}, {"virtual_batch_size": 2},
                                     {"axis": -1}, {"renorm": True}])
def test_an_input_refused_in_training_leaves_the_layer_as_it_was(options):
    """The plain and ghost paths counted the step (num_batches_tracked + 1) before ATen refused an input of another
    dtype or device: a call that raised left the count moved (torch.nn's layer does too)."""
    layer = normkit.BatchNorm(3, **options)
    x = torch.randn(4, 3, 3)
    before = _state(layer)
    with pytest.raises(TypeError, match=r"input has dtype torch.float64 .* torch.float32"):
        layer(x.double())
    assert _same_state(before, layer)
    with pytest.raises(RuntimeError, match=r"input is on device meta but the layer's parameters/buffers are on cpu"):
        layer(x.to("meta"))
    assert _same_state(before, layer)
    layer(x)  # (and the layer still trains)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("momentum", ["0.1", [0.1]])
@pytest.mark.parametrize("options", [{}, {"renorm": True}, {"mask": "rows"}, {"mask": "per feature"},
                                     {"virtual_batch_size": 2}, {"adjustment": lambda shape: (1.0, 0.0)},
                                     {"unbiased_running_var": False}])
def test_a_momentum_that_is_not_a_number_is_refused_by_name(options, momentum, execution):
    """functional.batch_norm and its reference with a string or a list for momentum: the option paths failed deep
    inside ("expected Tensor as element 0 in argument 2, but got str", "can't multiply sequence by non-int"), the
    reference with "ufunc 'multiply' did not contain a loop". Found by tools/fuzz_batch_norm.py."""
    import numpy as np

    from normkit import reference as R

    options = dict(options)
    if options.get("renorm"):
        del options["renorm"]
        options.update(renorm_mean=torch.zeros(3), renorm_stddev=torch.ones(3), moving_stddev=torch.ones(3))
    if "mask" in options:
        options["mask"] = torch.ones((4, 1) if options["mask"] == "rows" else (4, 3), dtype=torch.bool)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match=r"momentum must be a number .* got (str|list)"):
        normkit.functional.batch_norm(torch.randn(4, 3), running_mean, running_var, training=True, momentum=momentum,
                                      **options)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))
    numpy_options = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    with pytest.raises(TypeError, match=r"momentum must be a number .* got (str|list)"):
        R.batch_norm(np.ones((4, 3)), np.zeros(3), np.ones(3), training=True, momentum=momentum, **numpy_options)


@pytest.mark.parametrize("options, shape", [
    ({}, (1, 3)), ({}, (1, 3, 1, 1)), ({"momentum": None}, (1, 3)), ({"unbiased_running_var": False}, (1, 3)),
    ({"axis": -1}, (1, 3)), ({"axis": (1, 2)}, (1, 3, 2)), ({"renorm": True}, (1, 3)),
    ({"virtual_batch_size": 1}, (4, 3)), ({"virtual_batch_size": 1, "renorm": True}, (4, 3)),
    ({"virtual_batch_size": 1, "ghost_layout": "contiguous"}, (4, 3)), ({"adjustment": lambda shape: (1.0, 0.0)}, (1, 3)),
])
def test_one_value_per_channel_refused_in_training_leaves_the_layer_as_it_was(options, shape, execution):
    """Every path counted the step (num_batches_tracked + 1) before refusing one value per channel (or per ghost
    batch): a training loop that skips such a batch (try/except) then weighted every later batch of the cumulative
    average (momentum=None) and renorm's clipping schedule by a step too many. Found by tools/fuzz_batch_norm.py."""
    layer = normkit.BatchNorm((3, 2) if options.get("axis") == (1, 2) else 3, **options)
    trained = "virtual_batch_size" not in options  # (ghost batches of one row refuse every batch)
    if trained:
        layer(torch.randn((4,) + shape[1:]))
    before = _state(layer)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(shape))
    assert _same_state(before, layer)
    assert int(layer.num_batches_tracked) == int(trained)


@pytest.mark.parametrize("make", [lambda: normkit.BatchNorm1d(3).eval(), lambda: normkit.LayerNorm(5),
                                  lambda: normkit.GroupNorm(1, 3), lambda: normkit.InstanceNorm1d(3, affine=True),
                                  lambda: normkit.InstanceNorm1d(3, affine=True, track_running_stats=True).eval()])
def test_an_input_on_another_device_names_the_input_and_the_layer(make):
    """ATen's "Tensor on device cpu is not on the expected device meta!" said neither which tensor nor what to do."""
    with pytest.raises(RuntimeError, match=r"input is on device meta .* on cpu: move the input .* or the layer"):
        make()(torch.randn(4, 3, 5, device="meta"))


@pytest.mark.parametrize("cls", [normkit.LazyBatchNorm, normkit.LazyBatchNorm1d, normkit.LazyInstanceNorm1d])
@pytest.mark.parametrize("bad", ["int", "double", "meta", "mask"])
def test_a_lazy_layer_that_refuses_its_first_input_stays_unsized(cls, bad):
    """The lazy layer was sized (and became its eager class) by the input its forward then refused."""
    layer = cls()
    x = torch.randn(4, 3, 5)
    if bad == "mask":
        if cls is normkit.LazyInstanceNorm1d:
            pytest.skip("instance norms take no mask")
        with pytest.raises(ValueError, match=r"mask of shape \(4, 6\) cannot broadcast"):
            layer(x, mask=torch.ones(4, 6))
    else:
        data = {"int": x.long(), "double": x.double(), "meta": x.to("meta")}[bad]
        with pytest.raises((TypeError, RuntimeError), match=r"input (has dtype|is on device)"):
            layer(data)
    assert layer.has_uninitialized_params() and type(layer) is cls
    assert layer(x).shape == x.shape  # the right input sizes it as before


def test_a_mask_that_is_no_tensor_names_mask():
    layer = normkit.BatchNorm(3)
    with pytest.raises(TypeError, match=r"mask must be a tensor .* got str"):
        layer(torch.randn(4, 3, 5), mask="valid")
    with pytest.raises(ValueError, match=r"mask is a meta tensor"):
        layer(torch.randn(4, 3, 5), mask=torch.ones(4, 5, device="meta"))


@pytest.mark.parametrize("make", [lambda: normkit.LayerNorm(5), lambda: normkit.GroupNorm(1, 3),
                                  lambda: normkit.InstanceNorm1d(3, affine=True, track_running_stats=True)])
@pytest.mark.parametrize("eps", ["1e-5", None, float("inf"), True, 0, -1e-5])
def test_eps_set_on_a_built_sample_norm_is_checked(make, eps):
    """LayerNorm/GroupNorm's short path compared eps > 0 per call: a string failed there with "'>' not supported
    between instances of 'str' and 'int'", and inf (every output the bias) or True passed silently."""
    layer = make()
    with pytest.raises(ValueError, match="eps must be a positive number"):
        layer.eps = eps
    assert layer.eps == 1e-5  # (refused, not kept)
    layer.eps = 1e-3
    assert layer(torch.randn(4, 3, 5)).shape == (4, 3, 5)


@pytest.mark.parametrize("momentum", ["0.1", float("nan"), -0.5, 2.0, True])
def test_momentum_set_on_a_built_instance_norm_is_checked(momentum):
    """BatchNorm's momentum setter was checked, the instance norms' not: NaN, negative or > 1 values moved the
    running statistics silently (NaN made them NaN), a string failed inside ATen."""
    layer = normkit.InstanceNorm1d(3, track_running_stats=True)
    before = _state(layer)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):
        layer.momentum = momentum
    assert layer.momentum == 0.1
    layer(torch.randn(4, 3, 5))
    assert torch.isfinite(layer.running_mean).all() and not _same_state(before, layer)
    layer.momentum = None  # (torch.nn's: the running statistics stay as they are)


def _both_twins(x):
    """functional.batch_norm and reference.batch_norm, each with its own kind of data."""
    import numpy as np
    torch_x = x.double()
    return [(normkit.functional.batch_norm, torch_x, lambda t: t), (normkit.reference.batch_norm, torch_x.numpy(),
                                                                     lambda t: t.numpy() if torch.is_tensor(t) else np.asarray(t))]


@pytest.mark.parametrize("kwargs,error,match", [
    # any layout but "strided" was silently taken as "contiguous"
    (dict(virtual_batch_size=2, ghost_layout="Strided"), ValueError, "ghost_layout must be 'strided' or 'contiguous'"),
    # "integer modulo by zero"; the kernel binding's "incompatible function arguments"; a str: "%: 'int' and 'str'"
    (dict(virtual_batch_size=0), ValueError, "virtual_batch_size must be a positive int, got 0"),
    (dict(virtual_batch_size=2.0), ValueError, "virtual_batch_size must be a positive int, got 2.0"),
    (dict(virtual_batch_size="2"), ValueError, "virtual_batch_size must be a positive int"),
    # "'int' object is not callable" from inside the pipeline
    (dict(adjustment=3), TypeError, "adjustment must be a callable"),
    # "The expanded size of the tensor (5) must match the existing size (6)"; numpy's "could not be broadcast"
    (dict(mask=torch.ones(4, 6)), ValueError, r"mask of shape \(4, 6\) does not fit the input of shape \(4, 3, 5\)"),
    (dict(mask=torch.ones(4, 1, 6)), ValueError, r"mask of shape \(4, 1, 6\) does not fit"),
    # "not enough values to unpack (expected 3, got 2)"
    (dict(renorm_mean=torch.zeros(3), renorm_stddev=torch.ones(3), moving_stddev=torch.ones(3),
          running_mean=torch.zeros(3), running_var=torch.ones(3), renorm_clipping={"rmax": 3}),
     TypeError, r"renorm_clipping must be the bounds \(rmin, rmax, dmax\)"),
    # the bounds' values, as the layers check them: a NaN bound never clipped, rmax < rmin and a negative dmax
    # were taken silently
    *[(dict(renorm_mean=torch.zeros(3), renorm_stddev=torch.ones(3), moving_stddev=torch.ones(3),
            running_mean=torch.zeros(3), running_var=torch.ones(3), renorm_clipping=bounds), ValueError, match)
      for bounds, match in (((0.5, float("nan"), 1.0), "rmax is NaN"), ((2.0, 1.0, 1.0), "rmax should be greater"),
                            ((0.5, 2.0, -1.0), "dmax should be non-negative"), ((-1.0, 2.0, 1.0), "rmin should be"))],
    (dict(renorm_mean=torch.zeros(3), renorm_stddev=torch.ones(3), moving_stddev=torch.ones(3),
          running_mean=torch.zeros(3), running_var=torch.ones(3), renorm_clipping=(0.5, lambda step: 2.0, 1.0)),
     TypeError, "must hold numbers"),
])
def test_functional_twins_name_a_bad_option(kwargs, error, match):
    x = torch.randn(4, 3, 5)
    for batch_norm, data, convert in _both_twins(x):
        args = {k: convert(v.double()) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        before = {k: (v.clone() if torch.is_tensor(v) else v.copy()) for k, v in args.items() if hasattr(v, "shape")}
        with pytest.raises(error, match=match):
            batch_norm(data, training=True, **args)
        assert all((before[k] == args[k]).all() for k in before)  # (nothing moved)


def test_functional_batch_norm_names_a_tensor_argument_that_is_no_tensor():
    """"'list' object has no attribute 'dim'" from deep inside (torch.nn.functional.batch_norm names the argument)."""
    x = torch.randn(4, 3)
    for name in ("running_mean", "running_var", "weight", "bias"):
        kwargs = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), name: [1.0, 1.0, 1.0]}
        with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor or None, got list"):
            normkit.functional.batch_norm(x, training=True, **kwargs)
    with pytest.raises(TypeError, match=r"mask must be a torch.Tensor"):
        normkit.functional.batch_norm(x, training=True, mask=[[1], [1], [1], [1]])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("options", [{}, {"virtual_batch_size": 2}, {"mask": True}, {"unbiased_running_var": False},
                                     {"renorm": True}, {"adjustment": lambda shape: (1.0, 0.0)}])
def test_functional_batch_norm_refuses_half_a_pair_of_running_statistics_on_every_path(options, training, execution):
    """As ATen's plain call and the reference refuse it: the option paths updated running_mean alone and then failed
    ("expected Tensor as element 1 in argument 0, but got NoneType"), took running_var alone silently, and eval said
    "running_var must be defined in evaluation mode". Found by tools/fuzz_batch_norm.py."""
    options = dict(options)
    if options.pop("mask", False):
        options["mask"] = torch.ones(4, 1, dtype=torch.bool)
    if options.pop("renorm", False):
        options.update(renorm_mean=torch.zeros(3), renorm_stddev=torch.ones(3), moving_stddev=torch.ones(3))
    running_mean = torch.zeros(3)
    for kwargs in (dict(running_mean=running_mean), dict(running_var=torch.ones(3))):
        with pytest.raises(ValueError, match="running_mean and running_var must either both be None or neither"):
            normkit.functional.batch_norm(torch.randn(4, 3), training=training, **kwargs, **options)
    assert (running_mean == 0).all()


def test_reference_batch_norm_refuses_half_a_pair_of_running_statistics_before_moving_anything():
    """running_mean without running_var was updated in place and then failed (TypeError inside the update); running_var
    without running_mean was ignored. The functional twin (ATen) refuses both."""
    import numpy as np
    x = np.random.default_rng(0).normal(size=(4, 3))
    running_mean = np.zeros(3)
    for kwargs in (dict(running_mean=running_mean), dict(running_var=np.ones(3))):
        with pytest.raises(ValueError, match="running_mean and running_var must either both be None or neither"):
            normkit.reference.batch_norm(x, training=True, **kwargs)
    assert (running_mean == 0).all()
    with pytest.raises(ValueError, match=r"running_mean has 4 values but the input has 3 features on axis 1"):
        normkit.reference.batch_norm(x, np.zeros(4), np.ones(4), training=True)


@pytest.mark.parametrize("call,match", [
    # "'str' object has no attribute 'modules'" and "... 'register_step_post_hook'"
    (lambda: normkit.regularization_loss("model"), r"regularization_loss: model must be a torch.nn.Module, got str"),
    (lambda: normkit.apply_constraints(None), r"apply_constraints: model must be a torch.nn.Module, got NoneType"),
    (lambda: normkit.constrain_after_step("sgd", torch.nn.Linear(2, 2)), r"optimizer must be a torch.optim.Optimizer"),
    # (a model that is no Module was taken, and failed at the optimizer's first step)
    (lambda: normkit.constrain_after_step(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), 0.1), "model"),
     r"constrain_after_step: model must be a torch.nn.Module, got str"),
    # "'NoneType' object is not iterable"; one tensor was taken row by row and refused by the first layer's rank check
    (lambda: normkit.recalibrate_running_stats(torch.nn.Sequential(normkit.BatchNorm1d(3)), None),
     r"batches must be an iterable of input batches"),
    (lambda: normkit.recalibrate_running_stats(torch.nn.Sequential(normkit.BatchNorm1d(3)), torch.randn(4, 3)),
     r"batches is one tensor; pass an iterable of batches, such as \[batch\]"),
])
def test_model_wide_helpers_name_a_bad_argument(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("rank", ["2", 2.0, True, 1, None])
def test_create_norm_checks_the_rank(rank):
    """A string rank '2' built 'layer' as GroupNorm (its conv form) silently: `rank == 2` was False."""
    with pytest.raises(ValueError, match=r"rank must be the input's rank, an int >= 2"):
        normkit.create_norm("layer", 3, rank)
    assert type(normkit.create_norm("layer", 3, 2)) is normkit.LayerNorm


@pytest.mark.parametrize("options", [{}, {"virtual_batch_size": 2}, {"virtual_batch_size": 2, "ghost_layout": "contiguous"},
                                     {"renorm": True}, {"adjustment": lambda shape: (1.0, 0.0)},
                                     {"unbiased_running_var": False}, {"axis": -1}])
@pytest.mark.parametrize("name,size", [("weight", 4), ("weight", 1), ("bias", 4), ("running_mean", 1),
                                       ("running_var", 6)])
@pytest.mark.parametrize("training", [True, False])
def test_a_layer_tensor_of_another_size_is_refused_by_name(options, name, size, training):
    """A weight, bias or running buffer replaced by one of another size: ghost batches normalized silently with the
    first values of a 4-value (or the one value of a 1-value) weight repeated across the groups; renorm failed with
    "The size of tensor a (3) must match the size of tensor b (4)" after counting the step."""
    layer = normkit.BatchNorm(3, **options).train(training)
    x = torch.randn(4, 3, 3) if options.get("axis") != -1 else torch.randn(4, 5, 3)
    replacement = torch.ones(size)
    setattr(layer, name, torch.nn.Parameter(replacement) if name in ("weight", "bias") else replacement)
    before = _state(layer)
    with pytest.raises(ValueError, match=rf"BatchNorm\(num_features=3\) has a {name} of {size} values .*give it 3 values"):
        layer(x)
    assert _same_state(before, layer)


@pytest.mark.parametrize("make,x,name,size", [
    (lambda: normkit.LayerNorm(4), (2, 4), "weight", 5), (lambda: normkit.LayerNorm(4), (2, 4), "bias", 3),
    (lambda: normkit.LayerNorm((2, 3)), (2, 2, 3), "weight", 5),
    (lambda: normkit.GroupNorm(2, 4), (2, 4, 3), "weight", 6), (lambda: normkit.GroupNorm(2, 4), (2, 4), "bias", 2),
    (lambda: normkit.GroupNorm(2, 4), "channels_last", "weight", 6),
    (lambda: normkit.InstanceNorm1d(4, affine=True), (2, 4, 3), "weight", 6),
    (lambda: normkit.InstanceNorm1d(4, track_running_stats=True), (2, 4, 3), "running_mean", 6),
    (lambda: normkit.InstanceNorm1d(4, track_running_stats=True).eval(), (2, 4, 3), "running_var", 2)])
def test_a_sample_norm_tensor_of_another_size_is_refused_by_name(make, x, name, size):
    """The sample norms' short paths hand ATen the layer's tensors as they are: one replaced by a tensor of another
    size raised ATen's RuntimeError ("Expected weight to be a vector of size equal to the number of channels"), where
    their general paths, BatchNorm and the functional twins raise a ValueError naming it (decisions.md, "Exception
    types")."""
    layer = make()
    replacement = torch.ones(size)
    setattr(layer, name, torch.nn.Parameter(replacement) if name in ("weight", "bias") else replacement)
    x = (torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last) if x == "channels_last"
         else torch.randn(*x))
    with pytest.raises(ValueError, match=rf"{type(layer).__name__} has a {name} of {size} values"):
        layer(x)


_TWIN_OPTIONS = [{}, {"virtual_batch_size": 2}, {"virtual_batch_size": 2, "ghost_layout": "contiguous"},
                 {"mask": torch.ones(4, 1, 5)}, {"adjustment": lambda shape: (1.0, 0.0)},
                 {"unbiased_running_var": False}, {"renorm": True}]


@pytest.mark.parametrize("options,name,size", [
    (options, name, size) for options in _TWIN_OPTIONS
    for name, size in [("weight", 4), ("weight", 1), ("bias", 4), ("running_mean", 4), ("running_var", 2),
                       ("renorm_mean", 4), ("moving_stddev", 4)]
    if options.get("renorm") or name not in ("renorm_mean", "moving_stddev")])  # (renorm's buffers: read with renorm)
def test_functional_twins_name_a_per_feature_tensor_of_another_size(options, name, size):
    """functional.batch_norm's option paths took a weight or bias of another size silently (ghost batches), resized
    a running_var of 2 values in place (renorm), or failed deep inside after moving running_mean; the reference did
    not check moving_stddev (numpy's "operands could not be broadcast" after moving the other buffers)."""
    options = dict(options)  # (the parameter is shared by every case: popped in place, renorm ran once)
    renorm = options.pop("renorm", False)
    x = torch.randn(4, 3, 5)
    for batch_norm, data, convert in _both_twins(x):
        tensors = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "weight": torch.ones(3),
                   "bias": torch.zeros(3)}
        if renorm:
            tensors.update(renorm_mean=torch.zeros(3), renorm_stddev=torch.ones(3), moving_stddev=torch.ones(3))
        tensors[name] = torch.ones(size)
        args = {k: convert(v.double()) if torch.is_tensor(v) else v for k, v in {**tensors, **options}.items()}
        before = {k: (v.clone() if torch.is_tensor(v) else v.copy()) for k, v in args.items() if hasattr(v, "shape")}
        with pytest.raises(ValueError, match=rf"{name} has {size} values but the input has 3 features on axis 1"):
            batch_norm(data, training=True, **args)
        assert all(before[k].shape == args[k].shape and (before[k] == args[k]).all() for k in before)  # (nothing moved)


@pytest.mark.parametrize("size,layout,match", [
    (0, "strided", "virtual_batch_size must be a positive int, got 0"),
    (2.0, "strided", "virtual_batch_size must be a positive int, got 2.0"),
    (3, "strided", r"virtual_batch_size=3 must divide the batch size .* batch of 4"),
    (2, "Strided", "ghost_layout must be 'strided' or 'contiguous', got 'Strided'"),
])
def test_ghost_view_twins_name_a_bad_argument(size, layout, match):
    """functional.ghost_view said "integer division or modulo by zero" for 0, reshape's "shape '[3, 1, 3, 5]' is
    invalid" for a size that does not divide the batch, and took any layout but "strided" as "contiguous" silently;
    reference.ghost_view named each."""
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    for ghost_view, data in ((normkit.functional.ghost_view, x), (normkit.reference.ghost_view, x.numpy())):
        with pytest.raises(ValueError, match=match):
            ghost_view(data, size, layout)


@pytest.mark.parametrize("kwargs,match", [
    # running_mean alone was updated in place, then "unsupported operand type(s) for -: 'float' and 'NoneType'";
    # running_var alone was ignored (the functional twin refuses both)
    (dict(running_mean=torch.zeros(3)), "running_mean and running_var must either both be None or neither"),
    (dict(running_var=torch.ones(3)), "running_mean and running_var must either both be None or neither"),
    # numpy's "cannot reshape array of size 4 into shape (1,3,1)" after the running statistics had moved; ATen's
    # "weight should contain 12 elements not 16" (the weight repeated over the batch)
    (dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(4)),
     r"weight has 4 values but the input has 3 channels on axis 1"),
    (dict(running_mean=torch.zeros(4), running_var=torch.ones(4)),
     r"running_mean has 4 values but the input has 3 channels on axis 1"),
])
def test_instance_norm_twins_refuse_a_bad_running_pair_or_size_before_moving_anything(kwargs, match):
    x = torch.randn(4, 3, 5)
    for instance_norm, data, convert in ((normkit.functional.instance_norm, x.double(), lambda t: t.double()),
                                         (normkit.reference.instance_norm, x.double().numpy(), lambda t: t.double().numpy())):
        args = {k: convert(v) for k, v in kwargs.items()}
        before = {k: v.copy() if hasattr(v, "copy") and not torch.is_tensor(v) else v.clone() for k, v in args.items()}
        with pytest.raises(ValueError, match=match):
            instance_norm(data, **args)
        assert all((before[k] == args[k]).all() for k in args)  # (nothing moved)


@pytest.mark.parametrize("num_groups,error,match", [
    (0, ValueError, "num_groups must be a positive int, got 0"),
    (2, ValueError, r"num_groups=2 must divide the channels .* got shape \(4, 3, 5\); choose one of \[1, 3\]"),
    ("1", TypeError, "num_groups must be a positive int, got '1' of type str"),
    (1.0, TypeError, "num_groups must be a positive int, got 1.0 of type float"),
])
def test_group_norm_twins_name_a_bad_num_groups(num_groups, error, match):
    """functional.group_norm passed these to ATen ("argument 'num_groups' (position 2) must be int, not str"), the
    reference failed with "integer modulo by zero" or "unsupported operand type(s) for %"."""
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    for group_norm, data in ((normkit.functional.group_norm, x), (normkit.reference.group_norm, x.numpy())):
        with pytest.raises(error, match=match):
            group_norm(data, num_groups)


def test_group_norm_twins_name_an_input_without_channels():
    """functional.group_norm of a 1-D input raised IndexError "Dimension out of range" (torch.nn's says "Expected at
    least 2 dimensions")."""
    x = torch.randn(3, dtype=torch.float64)
    for group_norm, data in ((normkit.functional.group_norm, x), (normkit.reference.group_norm, x.numpy())):
        with pytest.raises(ValueError, match=r"group_norm needs an \(N, C, \*\) input, got shape \(3,\)"):
            group_norm(data, 1)


@pytest.mark.parametrize("call", [
    lambda x, w: normkit.reference.group_norm(x, 1, w),
    lambda x, w: normkit.reference.group_norm_backward(x, x, 3, w),
    lambda x, w: normkit.reference.layer_norm(x[..., :3], (3,), None, w),
    lambda x, w: normkit.reference.layer_norm_backward(x[..., :3], x[..., :3], 3, w),
])
def test_reference_sample_norms_name_a_weight_of_another_size(call):
    """numpy's "cannot reshape array of size 4 into shape (1,1,3,1)" named neither the argument nor the size wanted."""
    import numpy as np
    x = np.random.default_rng(0).normal(size=(4, 3, 5))
    with pytest.raises(ValueError, match=r"(weight|bias) has 4 values but this normalization takes 3"):
        call(x, np.ones(4))


_TWIN_CALLS_WITH_EPS = {
    "batch_norm": lambda lib, x, eps: lib.batch_norm(x, training=True, eps=eps),
    "layer_norm": lambda lib, x, eps: lib.layer_norm(x, (5,), eps=eps),
    "group_norm": lambda lib, x, eps: lib.group_norm(x, 1, eps=eps),
    "instance_norm": lambda lib, x, eps: lib.instance_norm(x, eps=eps),
}
_REFERENCE_BACKWARDS_WITH_EPS = {
    "batch_norm_backward": lambda R, g, x, eps: R.batch_norm_backward(g, x, training=True, eps=eps),
    "layer_norm_backward": lambda R, g, x, eps: R.layer_norm_backward(g, x, (5,), eps=eps),
    "group_norm_backward": lambda R, g, x, eps: R.group_norm_backward(g, x, 1, eps=eps),
    "instance_norm_backward": lambda R, g, x, eps: R.instance_norm_backward(g, x, eps=eps),
}


@pytest.mark.parametrize("eps", [0, 0.0, -1e-5, float("nan"), float("inf"), "1e-5", True])
@pytest.mark.parametrize("name", sorted(_TWIN_CALLS_WITH_EPS))
def test_twins_refuse_the_same_eps(name, eps):
    """functional refused eps <= 0 (check_eps) where the reference computed with it: eps=0 divides by zero for a
    constant group, a negative eps takes the square root of a negative number. Both refuse, with one message, and
    so do the reference's backward functions."""
    import re

    import numpy as np
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    message = re.escape(f"eps must be a positive number (it keeps 1/sqrt(var + eps) finite), got {eps!r}")
    call = _TWIN_CALLS_WITH_EPS[name]
    with pytest.raises(ValueError, match=message):
        call(normkit.functional, x, eps)
    with pytest.raises(ValueError, match=message):
        call(normkit.reference, x.numpy(), eps)
    with pytest.raises(ValueError, match=message):
        _REFERENCE_BACKWARDS_WITH_EPS[name + "_backward"](normkit.reference, np.ones((4, 3, 5)), x.numpy(), eps)


@pytest.mark.parametrize("name", sorted(_TWIN_CALLS_WITH_EPS))
def test_reference_still_takes_a_small_positive_eps(name):
    """The check refuses eps <= 0 only: a tiny positive eps (an int too) computes, and a constant input gives 0
    (x - mean is exactly 0), as the formula (x - mean) / sqrt(0 + eps) says."""
    import numpy as np
    x = np.full((4, 3, 5), 7.0)
    for eps in (1e-30, 1):
        np.testing.assert_array_equal(_TWIN_CALLS_WITH_EPS[name](normkit.reference, x, eps), np.zeros(x.shape))


@pytest.mark.parametrize("call", [
    lambda lib, x, rm, rv: lib.batch_norm(x, rm, rv, training=True, momentum=None),
    lambda lib, x, rm, rv: lib.batch_norm(x, training=True, momentum=None),
    lambda lib, x, rm, rv: lib.batch_norm(x, rm, rv, training=False, momentum=None),
    lambda lib, x, rm, rv: lib.instance_norm(x, rm, rv, momentum=None),
    lambda lib, x, rm, rv: lib.instance_norm(x, rm, rv, use_input_stats=False, momentum=None),
    lambda lib, x, rm, rv: lib.instance_norm(x, momentum=None),
], ids=["bn-train", "bn-train-no-running", "bn-eval", "in-train", "in-eval", "in-no-running"])
def test_twins_refuse_momentum_none_as_torch_functional_does(call):
    """momentum=None failed in both twins with unrelated TypeErrors ("unsupported operand type(s) for *: 'NoneType'
    and ...", or ATen's binding) where it failed at all. torch.nn.functional.batch_norm refuses it (a TypeError naming
    momentum), so both twins refuse it the same way, in every mode, before anything moves, saying what to pass."""
    import numpy as np
    with pytest.raises(TypeError, match="momentum"):
        torch.nn.functional.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    message = (r"momentum=None is the layers' cumulative average, .* pass the weight of the new batch value as a "
               r"number .*momentum_factor\(None, t\)")
    for lib, data, zeros, ones in ((normkit.functional, x, torch.zeros(3, dtype=torch.float64),
                                    torch.ones(3, dtype=torch.float64)),
                                   (normkit.reference, x.numpy(), np.zeros(3), np.ones(3))):
        with pytest.raises(TypeError, match=message):
            call(lib, data, zeros, ones)
        assert (zeros == 0).all() and (ones == 1).all()  # (nothing moved)


def test_twins_take_the_cumulative_average_as_one_over_t():
    """What the message says to pass: momentum 1/t at the t-th batch leaves the running mean at the arithmetic mean
    of the batch means and the running variance at the mean of the unbiased batch variances (numpy, by hand)."""
    import numpy as np
    rng = np.random.default_rng(3)
    batches = [rng.normal(loc=t, scale=1 + t, size=(6, 3)) for t in range(3)]
    expected_mean = np.mean([b.mean(axis=0) for b in batches], axis=0)
    expected_var = np.mean([b.var(axis=0, ddof=1) for b in batches], axis=0)
    for lib, convert in ((normkit.reference, lambda a: a), (normkit.functional, torch.from_numpy)):
        running_mean, running_var = convert(np.zeros(3)), convert(np.ones(3))
        for t, batch in enumerate(batches, start=1):
            lib.batch_norm(convert(batch), running_mean, running_var, training=True,
                           momentum=normkit.stats.momentum_factor(None, t))
        np.testing.assert_allclose(np.asarray(running_mean), expected_mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(running_var), expected_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 3, 5), (0, 3, 5), (4, 3, 0)])
@pytest.mark.parametrize("present", [(), ("running_mean",), ("running_var",)])
def test_instance_norm_twins_refuse_use_input_stats_false_without_running_statistics_alike(shape, present):
    """use_input_stats=False normalizes with the running statistics: without both, the reference raised its
    ValueError and functional.instance_norm ATen's RuntimeError (its own copy of it for an empty batch). Both raise
    the reference's now; the layers keep torch.nn's RuntimeError (tests/test_norms.py), and a tensor given alone is
    left as it was."""
    import numpy as np
    message = "use_input_stats=False normalizes with running_mean and running_var: pass both, or use_input_stats=True"
    x = torch.randn(shape, dtype=torch.float64)
    for lib, data, new in ((normkit.functional, x, lambda: torch.full((3,), 2.0, dtype=torch.float64)),
                           (normkit.reference, x.numpy(), lambda: np.full(3, 2.0))):
        given = {name: new() for name in present}
        with pytest.raises(ValueError, match=message):
            lib.instance_norm(data, use_input_stats=False, **given)
        assert all((value == 2.0).all() for value in given.values())


def test_instance_norm_twins_with_use_input_stats_false_normalize_with_the_running_statistics():
    """The call the message asks for: with both running statistics, every instance is normalized with them (numpy by
    hand), in both twins, and they stay as they were."""
    import numpy as np
    rng = np.random.default_rng(5)
    x, mean, var = rng.normal(size=(2, 3, 4)), rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)
    expected = (x - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
    np.testing.assert_allclose(normkit.reference.instance_norm(x, mean.copy(), var.copy(), use_input_stats=False),
                               expected, rtol=1e-12, atol=1e-12)
    running_mean, running_var = torch.from_numpy(mean.copy()), torch.from_numpy(var.copy())
    y = normkit.functional.instance_norm(torch.from_numpy(x), running_mean, running_var, use_input_stats=False)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert np.array_equal(running_mean.numpy(), mean) and np.array_equal(running_var.numpy(), var)


def _np_or_torch(lib, value):
    import numpy as np
    return torch.as_tensor(np.asarray(value, dtype=np.float64)) if lib is normkit.functional else value


@pytest.mark.parametrize("call,match", [
    (lambda lib, x: lib.layer_norm(x, ()), r"normalized_shape must name at least one trailing dim .* got \(\)"),
    (lambda lib, x: lib.layer_norm(x, (5, 4)), r"normalized_shape=\(5, 4\) must be the input's last 2 dims, got "
                                               r"input shape \(2, 4, 5\)"),
    (lambda lib, x: lib.layer_norm(x, 4), r"normalized_shape=\(4,\) must be the input's last 1 dims"),
    (lambda lib, x: lib.layer_norm(x, (2, 4, 5, 1)), r"normalized_shape=\(2, 4, 5, 1\) must be the input's last 4"),
    (lambda lib, x: lib.layer_norm(x, (4, 5), _np_or_torch(lib, [1.0] * 19)),
     "weight has 19 values but this normalization takes 20"),
    (lambda lib, x: lib.layer_norm(x, 5, None, _np_or_torch(lib, [0.0] * 4)),
     "bias has 4 values but this normalization takes 5"),
    (lambda lib, x: lib.group_norm(x, 2, _np_or_torch(lib, [1.0] * 5)),
     "weight has 5 values but this normalization takes 4"),
    (lambda lib, x: lib.group_norm(x, 2, None, _np_or_torch(lib, [[0.0] * 4] * 2)),
     "bias has 8 values but this normalization takes 4"),
], ids=["empty-shape", "transposed", "not-last", "too-long", "weight-19", "bias-4", "gn-weight-5", "gn-bias-8"])
def test_layer_and_group_norm_twins_refuse_shapes_alike(call, match):
    """functional let ATen refuse these with RuntimeErrors ("Expected weight to be of same shape as normalized_shape",
    "Expected normalized_shape to be at least 1-dimensional") where the reference named the argument with a
    ValueError; over normalized_shape=() the reference returned the bias (every value its own group). Both refuse
    each with the same ValueError now."""
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    for lib, data in ((normkit.functional, x), (normkit.reference, x.numpy())):
        with pytest.raises(ValueError, match=match):
            call(lib, data)


def test_layer_norm_twins_take_weight_and_bias_in_any_layout():
    """A flat 20-value weight and bias for normalized_shape=(4, 5): the reference took them (one value per position),
    functional refused them (ATen wants the shape itself). Both compute the numpy formula now, and functional's
    gradients come back in the parameters' own (flat) layout: dL/dweight = sum over samples of g * x_hat."""
    import numpy as np
    rng = np.random.default_rng(11)
    x, g = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
    w, b = rng.normal(size=20), rng.normal(size=20)
    mean = x.mean(axis=(1, 2), keepdims=True)
    x_hat = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=(1, 2), keepdims=True) + 1e-5)
    expected = x_hat * w.reshape(4, 5) + b.reshape(4, 5)
    np.testing.assert_allclose(normkit.reference.layer_norm(x, (4, 5), w, b), expected, rtol=1e-12, atol=1e-12)
    weight, bias = (torch.tensor(p, requires_grad=True) for p in (w, b))
    y = normkit.functional.layer_norm(torch.from_numpy(x), (4, 5), weight, bias)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    (y * torch.from_numpy(g)).sum().backward()
    assert weight.grad.shape == (20,) and bias.grad.shape == (20,)
    np.testing.assert_allclose(weight.grad.numpy(), (g * x_hat).sum(axis=0).reshape(20), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bias.grad.numpy(), g.sum(axis=0).reshape(20), rtol=1e-12, atol=1e-12)
    _, grad_w, grad_b = normkit.reference.layer_norm_backward(g, x, (4, 5), w, b)
    np.testing.assert_allclose(grad_w, weight.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_b, bias.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_group_norm_twins_take_per_channel_weights_in_any_layout():
    """A (C, 1) weight and a (1, C) bias: one value per channel, as the reference takes them; functional reshapes
    them for ATen (which wants a vector) and computes the numpy formula."""
    import numpy as np
    rng = np.random.default_rng(12)
    x, w, b = rng.normal(size=(2, 4, 3)), rng.normal(size=(4, 1)), rng.normal(size=(1, 4))
    groups = x.reshape(2, 2, 6)
    x_hat = ((groups - groups.mean(axis=2, keepdims=True))
             / np.sqrt(groups.var(axis=2, keepdims=True) + 1e-5)).reshape(2, 4, 3)
    expected = x_hat * w.reshape(1, 4, 1) + b.reshape(1, 4, 1)
    np.testing.assert_allclose(normkit.reference.group_norm(x, 2, w, b), expected, rtol=1e-12, atol=1e-12)
    y = normkit.functional.group_norm(torch.from_numpy(x), 2, torch.from_numpy(w), torch.from_numpy(b))
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)


def _built_keras_layer():
    layer = normkit.keras.BatchNormalization(synchronized=True)
    layer.build((4, 3))
    return layer


@pytest.mark.parametrize("make", [lambda: normkit.BatchNorm1d(3, synchronized=True),
                                  lambda: normkit.keras.BatchNormalization(synchronized=True), _built_keras_layer],
                         ids=["BatchNorm1d", "keras unbuilt", "keras built"])
def test_a_process_group_set_later_is_checked_and_the_layer_keeps_its_own(make):
    """Set after construction (a built Keras layer hands the group to its inner layer), a backend name is refused as
    the constructor refuses it, and the layer keeps the group it had."""
    layer = make()
    with pytest.raises(TypeError, match="process_group must be None"):
        layer.process_group = "gloo"
    assert layer.process_group is None
    if isinstance(layer, normkit.keras.BatchNormalization) and layer.bn is not None:
        assert layer.bn.process_group is None


@pytest.mark.parametrize("kwargs, shape, wrong", [
    ({}, (None, 3), (4, 5)),
    ({"axis": 1}, (None, 3, 6), (4, 2, 6)),
    ({"center": False, "scale": False}, (None, 3), (4, 5)),
])
def test_keras_layer_with_another_feature_count_names_its_build(kwargs, shape, wrong):
    """normkit.keras.BatchNormalization has no num_features argument: its refusal of another number of features
    advised "build the layer with num_features=5". As Keras' InputSpec, it names the layer, the built shape, the axis
    and the remedy (a new layer, or the right axis)."""
    layer = BatchNormalization(name="bn_features", **kwargs)
    layer.build(shape)
    for training in (True, False):
        with pytest.raises(ValueError) as refusal:
            layer(torch.randn(*wrong), training=training)
        message = str(refusal.value)
        assert "num_features" not in message
        assert "bn_features" in message and str(shape[layer.bn.axis]) in message and str(wrong) in message
        assert "new" in message and "axis" in message


def test_a_keras_initializer_beyond_the_dtype_is_named_by_its_keras_name_and_leaves_the_layer_unbuilt():
    layer = BatchNormalization(moving_variance_initializer=1e300)
    with pytest.raises(ValueError, match=r"moving_variance_initializer=Constant\(1e\+300\).*float32's range"):
        layer(torch.randn(4, 3))
    assert layer.bn is None and not layer.built
    layer.moving_variance_initializer = "ones"
    assert layer(torch.randn(4, 3)).shape == (4, 3)


def test_a_keras_style_initializer_that_refuses_a_torch_dtype_is_named():
    """A callable initializer written for Keras (``np.full(shape, 2.0, dtype=dtype)``: Keras passes a dtype name)
    failed at the build with NumPy's "Cannot interpret 'torch.float32' as a data type", naming neither the
    initializer nor what it was given. The refusal names both and says that the dtype is torch's."""
    def keras_style(shape, dtype=None):
        import numpy as np
        return np.full(shape, 2.0, dtype=dtype)

    with pytest.raises(TypeError, match=r"keras_style.*shape=\(3,\).*torch\.float32.*torch dtype"):
        BatchNormalization(gamma_initializer=keras_style).build((2, 3))
    layer = BatchNormalization(gamma_initializer=lambda shape, dtype: torch.full(shape, 2.0, dtype=dtype))
    layer.build((2, 3))
    assert torch.equal(layer.gamma.detach(), torch.full((3,), 2.0))
