"""state_dicts load both ways between torch.nn and normkit, with identical outputs after loading."""

import io

import numpy as np
import pytest
import torch

import normkit

PAIRS = [(normkit.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4)), (normkit.BatchNorm2d, torch.nn.BatchNorm2d, (3, 4, 3, 3)),
         (normkit.BatchNorm3d, torch.nn.BatchNorm3d, (2, 4, 2, 2, 2)),
         (normkit.InstanceNorm2d, torch.nn.InstanceNorm2d, (3, 4, 3, 3))]


def _train_a_bit(module, shape):
    module.train()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    for _ in range(3):
        module(torch.randn(*shape) * 2 + 1)
    return module.eval()


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_round_trip_both_directions(ours_cls, theirs_cls, shape, affine, track):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    theirs = _train_a_bit(theirs_cls(4, affine=affine, track_running_stats=track), shape)
    ours = ours_cls(4, affine=affine, track_running_stats=track)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    ours = _train_a_bit(ours_cls(4, affine=affine, track_running_stats=track), shape)
    theirs = theirs_cls(4, affine=affine, track_running_stats=track)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    theirs.load_state_dict(torch.load(buffer, weights_only=True))
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in ours.state_dict().items():
        assert value.dtype == theirs.state_dict()[key].dtype, key


def test_layer_and_group_norm_state_dicts_load_both_ways():
    for ours, theirs, shape in ((normkit.LayerNorm((4, 3)), torch.nn.LayerNorm((4, 3)), (2, 4, 3)),
                                (normkit.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4), (2, 4, 3))):
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_()
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(*shape)
        torch.testing.assert_close(ours(x), theirs(x))
        theirs.load_state_dict(ours.state_dict())


def test_old_checkpoint_without_num_batches_tracked_loads():
    """Version-1 checkpoints (before num_batches_tracked existed) load strictly, keeping the module's count."""
    for cls in (normkit.BatchNorm2d, torch.nn.BatchNorm2d):
        state = torch.nn.BatchNorm2d(3).state_dict()
        del state["num_batches_tracked"]
        state._metadata[""]["version"] = 1
        bn = cls(3)
        bn.num_batches_tracked.fill_(7)
        bn.load_state_dict(state)  # strict: the missing key is filled in, not reported
        assert int(bn.num_batches_tracked) == 7
    missing = torch.nn.BatchNorm2d(3).state_dict()
    del missing["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        normkit.BatchNorm2d(3).load_state_dict(missing)  # a current-version file must have it


@pytest.mark.parametrize("ours, theirs", [(normkit.InstanceNorm1d, torch.nn.InstanceNorm1d),
                                          (normkit.InstanceNorm2d, torch.nn.InstanceNorm2d)])
def test_pre_0_4_instance_norm_checkpoint_with_running_stats_is_refused_as_torch_nn(ours, theirs):
    """A checkpoint without a version (before torch 0.4, when InstanceNorm tracked running stats by default) that
    holds running stats, loaded into a layer that tracks none: torch.nn reports them even with strict=False."""
    state = theirs(3, track_running_stats=True).state_dict()
    state._metadata[""]["version"] = None
    for cls in (theirs, ours):
        with pytest.raises(RuntimeError, match=r"Unexpected running stats buffer\(s\)"):
            cls(3).load_state_dict(state, strict=False)
    assert set(state) == {"running_mean", "running_var", "num_batches_tracked"}  # the caller's dict is not changed
    state._metadata[""]["version"] = 1  # a versioned file: the usual unexpected-keys rule, which strict=False skips
    for cls in (theirs, ours):
        cls(3).load_state_dict(state, strict=False)


def test_renorm_buffers_are_in_the_state_dict():
    bn = normkit.BatchNorm(3, renorm=True)
    assert {"moving_stddev", "renorm_mean", "renorm_stddev"} <= set(bn.state_dict())


def test_module_in_a_model_loads_torch_nn_model_weights():
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    ours = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), normkit.BatchNorm2d(4), torch.nn.ReLU())
    _train_a_bit(theirs, (4, 1, 6, 6))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(ours.eval()(x), theirs(x))


@pytest.mark.parametrize("kwargs,shape", [
    (dict(), (8, 5, 3)),                                   # features last, rank 3
    (dict(axis=1, renorm=True, scale=False), (8, 4, 3, 3)),  # channels first, renorm, no gamma
    (dict(axis=[1, 2]), (6, 2, 3, 4)),                     # tf.keras' multi-axis
])
def test_unbuilt_keras_layer_loads_a_state_dict(kwargs, shape):
    """An unbuilt normkit.keras layer takes its sizes from the state it loads, then computes what the saved one does."""
    import normkit.keras

    torch.manual_seed(0)
    saved = normkit.keras.BatchNormalization(momentum=0.9, **kwargs)
    for _ in range(3):
        saved(torch.randn(shape) * 2 + 1, training=True)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    loaded = normkit.keras.BatchNormalization(momentum=0.9, **kwargs)
    assert not loaded.built
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.built and loaded.get_build_config() is None
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(shape)
    assert torch.equal(loaded(x, training=False), saved(x, training=False))
    assert torch.equal(loaded(x, training=True), saved(x, training=True))
    # A rank the layer was not built with: the axis still counts as given (here: from the end).
    if kwargs == {}:
        reference = normkit.BatchNorm(3, axis=-1, eps=1e-3)
        reference.load_state_dict(saved.bn.state_dict())
        wider = torch.randn(4, 2, 5, 3)
        assert torch.equal(loaded(wider, training=False), reference.eval()(wider))


def test_plain_checkpoint_into_a_renorm_layer_derives_its_renorm_state():
    """torch.nn's BN state loads strictly into a renorm layer (fine-tuning with renorm): moving_stddev =
    sqrt(running_var + eps), so eval is unchanged and the next step moves running_var by the momentum."""
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm1d(3).double()
    for _ in range(3):
        theirs(torch.randn(16, 3, dtype=torch.float64) * 2 + 1)
    ours = normkit.BatchNorm1d(3, renorm=True).double()
    ours.load_state_dict(theirs.state_dict())
    v0 = theirs.running_var.numpy().copy()
    np.testing.assert_allclose(ours.moving_stddev.numpy(), np.sqrt(v0 + ours.eps), rtol=1e-15)
    np.testing.assert_array_equal(ours.renorm_mean.numpy(), theirs.running_mean.numpy())
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    ours.train()
    batch = torch.randn(16, 3, dtype=torch.float64) * 3
    ours(batch)
    unbiased = batch.var(dim=0, unbiased=True).numpy()
    stddev = 0.9 * np.sqrt(v0 + ours.eps) + 0.1 * np.sqrt(unbiased + ours.eps)  # moving_stddev's step
    np.testing.assert_allclose(ours.running_var.numpy(), stddev ** 2 - ours.eps, rtol=1e-12)


@pytest.mark.parametrize("saved,layer", [(torch.float16, torch.float32), (torch.bfloat16, torch.float64),
                                         (torch.float32, torch.float16)])
def test_plain_checkpoint_of_another_dtype_derives_the_renorm_state_rounded_once_to_the_layer_s(saved, layer):
    """A half-precision torch.nn checkpoint into a float32 renorm layer: moving_stddev was rounded to the
    checkpoint's float16 before the copy into float32 (3e-4 off at a variance of 8, carried into running_var);
    now sqrt(var + eps) in float64, rounded once to the layer's dtype (float32 into float16: no double rounding)."""
    theirs = torch.nn.BatchNorm1d(5).to(saved)
    with torch.no_grad():
        theirs.running_var.copy_(torch.linspace(0.3, 7.7, 5)), theirs.running_mean.copy_(torch.linspace(-2, 2, 5))
    ours = normkit.BatchNorm1d(5, renorm=True).to(layer)
    ours.load_state_dict(theirs.state_dict())
    stddev = torch.from_numpy(np.sqrt(theirs.running_var.double().numpy() + ours.eps)).to(layer)
    for name in ("moving_stddev", "renorm_stddev"):
        assert getattr(ours, name).dtype == layer
        torch.testing.assert_close(getattr(ours, name), stddev, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(ours.renorm_mean, theirs.running_mean.to(layer), rtol=0, atol=0)


def test_plain_checkpoint_into_a_layer_with_renorm_switched_off_derives_its_kept_renorm_state():
    """A layer whose renorm was switched off keeps its renorm buffers; a plain checkpoint loaded into it derives
    them as for a renorm layer (it failed strictly on "missing" renorm keys, and with strict=False kept the old
    model's renorm_mean/renorm_stddev, which renorm then measured the loaded model's batches against)."""
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm1d(3).double()
    for _ in range(3):
        theirs(torch.randn(16, 3, dtype=torch.float64) * 2 + 1)
    switched_off = normkit.BatchNorm1d(3, renorm=True).double()
    switched_off(torch.randn(16, 3, dtype=torch.float64) * 5 - 3)  # its own renorm state, unlike the checkpoint's
    switched_off.renorm = False
    switched_off.load_state_dict(theirs.state_dict())  # strict
    mean, var = theirs.running_mean.numpy(), theirs.running_var.numpy()
    np.testing.assert_allclose(switched_off.moving_stddev.numpy(), np.sqrt(var + switched_off.eps), rtol=1e-15)
    np.testing.assert_allclose(switched_off.renorm_stddev.numpy(), np.sqrt(var + switched_off.eps), rtol=1e-15)
    np.testing.assert_array_equal(switched_off.renorm_mean.numpy(), mean)
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.testing.assert_close(switched_off.eval()(x), theirs.eval()(x))
    # Switched on again, it trains as a renorm layer that loaded the same checkpoint.
    renorm = normkit.BatchNorm1d(3, renorm=True).double()
    renorm.load_state_dict(theirs.state_dict())
    switched_off.renorm = True
    batch = torch.randn(16, 3, dtype=torch.float64) * 3
    torch.testing.assert_close(switched_off.train()(batch), renorm.train()(batch), rtol=0, atol=0)
    for key, value in renorm.state_dict().items():
        assert torch.equal(switched_off.state_dict()[key], value), key


@pytest.mark.parametrize("spoil", ["wrong size", "wrong size of running_var only", "not a tensor"])
def test_a_bad_plain_checkpoint_into_a_renorm_layer_fails_as_torch_nn_names_it(spoil):
    """The renorm state derived from a plain checkpoint's statistics is not in the checkpoint: a statistic that
    cannot load is reported as torch.nn reports it (not as 'size mismatch for moving_stddev ... from checkpoint',
    nor an AttributeError from the derivation), and the renorm state stays as it was."""
    state = torch.nn.BatchNorm1d(4 if spoil == "wrong size" else 3).state_dict()
    if spoil == "wrong size of running_var only":
        state["running_var"] = torch.ones(4)
    elif spoil == "not a tensor":
        state["running_var"] = [1.0, 1.0, 1.0]
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.BatchNorm1d(3).load_state_dict(state)
    ours = normkit.BatchNorm1d(3, renorm=True)
    ours(torch.randn(8, 3) * 3 + 2)
    before = {name: getattr(ours, name).clone() for name in ours.RENORM_STATE}
    with pytest.raises(RuntimeError) as raised:
        ours.load_state_dict(state)
    assert str(raised.value) == str(theirs.value)
    for name, value in before.items():
        assert torch.equal(getattr(ours, name), value), name


@pytest.mark.parametrize("strict", [True, False])
def test_a_checkpoint_into_a_renorm_layer_whose_running_buffers_were_set_to_none_loads_as_torch_nn(strict):
    """Test-time adaptation code sets the running buffers to None; a checkpoint loaded afterwards then has running
    statistics the layer does not hold: torch.nn's layer reports them as unexpected keys (strict) or skips them, and
    loads the rest. A renorm layer failed with an AttributeError ('NoneType' object has no attribute 'shape') while
    deriving its renorm state from its own missing statistics; it now loads as torch.nn's does, and its renorm state,
    which the checkpoint does not hold, stays as it was."""
    source = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        source.weight.uniform_(0.5, 1.5)
    state = source.state_dict()
    theirs = torch.nn.BatchNorm1d(3)
    theirs.running_mean = theirs.running_var = None
    ours = normkit.BatchNorm1d(3, renorm=True)
    ours(torch.randn(8, 3) * 3 + 2)
    ours.running_mean = ours.running_var = None
    before = {name: getattr(ours, name).clone() for name in ours.RENORM_STATE}
    if strict:
        with pytest.raises(RuntimeError) as expected:
            theirs.load_state_dict(state)
        with pytest.raises(RuntimeError) as raised:
            ours.load_state_dict(state)
        assert str(raised.value) == str(expected.value)
    else:
        want = theirs.load_state_dict(state, strict=False)
        got = ours.load_state_dict(state, strict=False)
        assert (got.missing_keys, got.unexpected_keys) == (want.missing_keys, want.unexpected_keys)
        assert torch.equal(ours.weight, source.weight)
    for name, value in before.items():
        assert torch.equal(getattr(ours, name), value), name


def test_a_bad_plain_checkpoint_into_a_lazy_renorm_layer_names_only_the_checkpoints_tensors():
    """The unsized lazy layer's size check lists what the checkpoint has: not renorm state derived from it."""
    state = torch.nn.BatchNorm1d(3).state_dict()
    state["running_var"] = torch.ones(4)
    with pytest.raises(RuntimeError) as plain:
        normkit.LazyBatchNorm1d().load_state_dict(state)
    renorm = normkit.LazyBatchNorm1d(renorm=True)
    with pytest.raises(RuntimeError) as raised:
        renorm.load_state_dict(state)
    assert str(raised.value) == str(plain.value)
    assert renorm.has_uninitialized_params()  # sized nothing


@pytest.mark.parametrize("saved_axis, loading_axis, spoil", [
    ([1, 2], -1, None),     # two feature axes saved, one to load into
    (-1, [1, 2], None),     # the reverse
    (-1, -1, "bn.weight"),  # one axis, but the checkpoint's tensors disagree on the size
])
def test_an_unbuilt_keras_layer_refuses_a_checkpoint_it_cannot_build_from_and_builds_nothing(saved_axis, loading_axis,
                                                                                             spoil):
    """As the lazy layers: sizes of another rank than the feature axes, or that disagree, are a load error naming the
    keys (it raised the constructor's ValueError from inside load_state_dict, or built the layer at one size and
    then failed on the other, leaving it built, its optimizer's pending weights sized, with initial values)."""
    import normkit.keras

    saved = normkit.keras.BatchNormalization(axis=saved_axis)
    saved(torch.randn(4, 3, 2), training=True)
    state = saved.state_dict()
    if spoil:
        state[spoil] = torch.ones(5)
    layer = normkit.keras.BatchNormalization(axis=loading_axis)
    with pytest.raises(RuntimeError, match=r"(?s)Error\(s\) in loading state_dict.*bn\.running_mean: \[") as raised:
        layer.load_state_dict(state)
    if spoil:
        assert f"{spoil}: [5]" in str(raised.value)
    assert not layer.built
    assert all(torch.nn.parameter.is_lazy(parameter) for parameter in layer.parameters())


def test_an_unbuilt_keras_layer_names_the_missing_key_it_builds_from():
    """A built layer's state without bn.running_mean (the key an unbuilt layer takes its sizes from): the strict load
    says it is missing, and strict=False reports it, where both named only the other bn.* keys as unexpected."""
    import normkit.keras

    saved = normkit.keras.BatchNormalization()
    saved(torch.randn(4, 3), training=True)
    state = saved.state_dict()
    del state["bn.running_mean"]
    layer = normkit.keras.BatchNormalization()
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bn.running_mean"'):
        layer.load_state_dict(state)
    assert layer.load_state_dict(state, strict=False).missing_keys == ["bn.running_mean"]
    assert not layer.built
    # (an unbuilt layer's own state, which has no bn.* key, still loads into an unbuilt one)
    assert not normkit.keras.BatchNormalization().load_state_dict(layer.state_dict()).missing_keys
