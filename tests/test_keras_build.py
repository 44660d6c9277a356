"""The Keras layer's build on its first call, as a torch module: optimizers and DDP made before it, dtype moves, state.

Until the build, gamma and beta are torch's uninitialized parameters (torch.nn.LazyBatchNorm's mechanism): torch.nn's
layers built from the start are the oracle for what training then does.
"""

import copy
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from normkit.keras import BatchNormalization

from oracle import assert_close


def _models(optimizer):
    """(Keras-layer model, unbuilt; torch.nn model with the same first layer; an optimizer on each, made now)."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 5).double()
    ours = nn.Sequential(copy.deepcopy(linear), BatchNormalization(momentum=0.9, epsilon=1e-3).double())
    theirs = nn.Sequential(copy.deepcopy(linear), nn.BatchNorm1d(5, eps=1e-3, momentum=0.1).double())
    return ours, theirs, optimizer(ours.parameters()), optimizer(theirs.parameters())


@pytest.mark.parametrize("optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=0.01),
    lambda params: torch.optim.Adam(params, lr=0.05),
    lambda params: torch.optim.RMSprop(params, lr=0.01),
], ids=["sgd", "adam", "rmsprop"])
def test_an_optimizer_made_before_the_first_call_trains_gamma_and_beta(optimizer):
    """The optimizer holds the layer's weights from before they exist: three steps train gamma and beta as
    torch.nn's BatchNorm1d (built from the start) trains its weight and bias. (The optimizer held nothing of the
    layer before: gamma and beta stayed at 1 and 0.)"""
    ours, theirs, ours_opt, theirs_opt = _models(optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 4, generator=generator, dtype=torch.float64) * 3 + 1
        target = torch.randn(16, 5, generator=generator, dtype=torch.float64)
        for model, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            opt.zero_grad()
            (model(x) - target).square().mean().backward()
            opt.step()
    layer = ours[1]
    assert not torch.equal(layer.gamma, torch.ones(5, dtype=torch.float64))
    assert_close(layer.gamma.detach(), theirs[1].weight.detach())
    assert_close(layer.beta.detach(), theirs[1].bias.detach())
    assert_close(ours[0].weight.detach(), theirs[0].weight.detach())
    assert {id(p) for p in ours_opt.param_groups[0]["params"]} == {id(p) for p in ours.parameters()}


def test_an_optimizer_made_before_a_state_dict_loads_trains_the_loaded_weights():
    """An unbuilt layer that builds from a checkpoint gives the optimizer's parameters the loaded values."""
    trained = BatchNormalization()
    trained(torch.randn(8, 3) * 2 + 1, training=True)
    with torch.no_grad():
        trained.gamma.copy_(torch.tensor([2.0, 3.0, 4.0]))
        trained.beta.copy_(torch.tensor([-1.0, 0.5, 1.0]))
    layer = BatchNormalization()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.load_state_dict(trained.state_dict())
    assert opt.param_groups[0]["params"][0] is layer.gamma and opt.param_groups[0]["params"][1] is layer.beta
    torch.testing.assert_close(layer.gamma.detach(), torch.tensor([2.0, 3.0, 4.0]))
    layer(torch.randn(8, 3), training=True).sum().backward()  # (d/d beta = 1 per row: 8)
    opt.step()
    torch.testing.assert_close(layer.beta.detach(), torch.tensor([-1.0, 0.5, 1.0]) - 0.5 * 8)


@pytest.mark.parametrize("center, scale, pending", [(True, True, 2), (True, False, 1), (False, True, 1),
                                                    (False, False, 0)])
def test_the_parameters_before_and_after_the_build(center, scale, pending):
    """Before the build: one uninitialized parameter per trainable weight Keras will make, and an empty state_dict;
    after it: the same objects are the inner layer's, and nothing is left pending."""
    layer = BatchNormalization(center=center, scale=scale)
    before = list(layer.parameters())
    assert len(before) == pending
    assert all(isinstance(p, nn.parameter.UninitializedParameter) for p in before)
    assert layer.state_dict() == {}
    layer(torch.randn(4, 3), training=True)
    after = dict(layer.named_parameters())
    assert [id(p) for p in after.values()] == [id(p) for p in before]
    assert sorted(after) == sorted(name for name, present in (("bn.weight", scale), ("bn.bias", center)) if present)
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in after.values())
    assert sorted(layer.state_dict()) == sorted(["bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
                                                 *after])


def test_a_frozen_unbuilt_layer_builds_frozen():
    layer = BatchNormalization(trainable=False)
    layer(torch.randn(4, 3) + 5, training=True)
    assert not layer.gamma.requires_grad and not layer.beta.requires_grad
    torch.testing.assert_close(layer.moving_mean, torch.zeros(3))  # (frozen: nothing updated)


@pytest.mark.parametrize("convert, dtype", [(lambda m: m.double(), torch.float64), (lambda m: m.half(), torch.float16),
                                            (lambda m: m.to(torch.float64), torch.float64),
                                            (lambda m: m.float(), torch.float32)])
def test_a_dtype_conversion_before_the_first_call_sets_the_weights_dtype(convert, dtype):
    """As torch.nn's lazy layers: a model converted before its first call builds its weights in that dtype (they came
    out float32 in a float64 model)."""
    lazy = convert(nn.LazyBatchNorm1d())
    layer = convert(BatchNormalization())
    x = torch.randn(8, 3, dtype=dtype)
    lazy(x), layer(x)
    for ours, theirs in ((layer.gamma, lazy.weight), (layer.moving_mean, lazy.running_mean)):
        assert ours.dtype == theirs.dtype == dtype


def test_a_conversion_that_keeps_the_device_leaves_the_build_to_follow_the_input():
    layer = BatchNormalization().float()
    assert layer._factory["device"] is None
    layer = BatchNormalization().to("meta")
    layer(torch.empty(4, 3, device="meta"), training=True)
    assert layer.gamma.device.type == "meta"


def test_an_unbuilt_model_copies_and_saves():
    model = nn.Sequential(nn.Linear(4, 3), BatchNormalization())
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert set(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)) == {"0.weight", "0.bias"}
    x = torch.randn(6, 4)
    twin(x)
    assert twin[1].built and not model[1].built
    assert isinstance(next(iter(model[1].parameters())), nn.parameter.UninitializedParameter)


@pytest.fixture
def single_process_group(tmp_path):
    """A real gloo process group of one process (this one), torn down after the test."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("single_process_group")
def test_ddp_refuses_an_unbuilt_layer_with_torchs_advice_then_trains_it_once_built():
    """DistributedDataParallel made before the first call refuses the uninitialized weights (it left gamma and
    beta out of its gradient averaging and broadcast, silently); after one batch it wraps the model and trains it
    as torch.nn's layer trains."""
    ours, theirs, _, _ = _models(lambda params: None)
    with pytest.raises(RuntimeError, match="uninitialized parameters"):
        DistributedDataParallel(ours)
    x = torch.randn(16, 4, dtype=torch.float64)
    with torch.no_grad():
        ours.eval()(x)  # (the dry run builds the layer; in eval it updates nothing)
    ours.train()
    wrapped = DistributedDataParallel(ours)
    opt, theirs_opt = torch.optim.SGD(wrapped.parameters(), lr=0.2), torch.optim.SGD(theirs.parameters(), lr=0.2)
    for model, optimizer in ((wrapped, opt), (theirs, theirs_opt)):
        model(x * 2 + 1).square().mean().backward()
        optimizer.step()
    assert_close(ours[1].gamma.detach(), theirs[1].weight.detach())
    assert_close(ours[1].beta.detach(), theirs[1].bias.detach())
    assert_close(ours[1].moving_mean.detach(), theirs[1].running_mean.detach())


def test_requires_grad_before_the_first_call_says_to_run_a_batch_first():
    """model.requires_grad_(False) on an unbuilt model is refused with torch's advice, as for torch.nn's lazy layers
    (it used to pass over the layer, which then built trainable weights: a "frozen" model that trained)."""
    model = nn.Sequential(nn.Linear(4, 3), BatchNormalization())
    with pytest.raises(ValueError, match="uninitialized parameter.*Call `forward` with a dummy batch"):
        model.requires_grad_(False)
    model(torch.randn(5, 4))
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())


def test_an_unbuilt_models_state_dict_loads_strictly_into_an_unbuilt_model():
    """An unbuilt layer's state_dict is empty, so loading it back (strictly, as torch.nn's lazy layers' own
    state_dict loads) misses nothing; the pending parameters stay the optimizer's. (Strict loading reported
    "_pending_gamma" and "_pending_beta" missing: an unbuilt model could not take its own state_dict.)"""
    lazy_source, lazy_target = nn.Sequential(nn.Linear(4, 3), nn.LazyBatchNorm1d()), nn.Sequential(
        nn.Linear(4, 3), nn.LazyBatchNorm1d())
    assert not lazy_target.load_state_dict(lazy_source.state_dict()).missing_keys  # (the oracle: torch.nn's lazy)
    source, target = nn.Sequential(nn.Linear(4, 3), BatchNormalization()), nn.Sequential(nn.Linear(4, 3),
                                                                                         BatchNormalization())
    pending = list(target[1].parameters())
    result = target.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert not target[1].load_state_dict({}, strict=False).missing_keys
    assert not target[1].built and list(target[1].parameters()) == pending
    target(torch.randn(6, 4))
    assert [id(p) for p in target[1].parameters()] == [id(p) for p in pending]


@pytest.mark.parametrize("center, scale", [(True, True), (True, False), (False, True), (False, False)])
def test_center_and_scale_changed_before_the_build_set_the_pending_parameters(center, scale):
    """center/scale set after construction but before the build: the pending parameters are those the build
    makes, so an optimizer made then trains them as torch.nn's BatchNorm1d trains its weight and bias. (They
    kept the constructor's: gamma switched on was left out of the optimizer; switched off, it lingered.)"""
    torch.manual_seed(0)
    layer = BatchNormalization(momentum=0.9, center=not center, scale=not scale).double()
    layer.center, layer.scale = center, scale
    assert len(list(layer.parameters())) == center + scale
    theirs = nn.BatchNorm1d(5, eps=1e-3, momentum=0.1, affine=center or scale).double()
    ours_opt = torch.optim.SGD(layer.parameters(), lr=0.3) if center or scale else None
    theirs_opt = torch.optim.SGD(theirs.parameters(), lr=0.3) if center or scale else None
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(16, 5, generator=generator, dtype=torch.float64) * 3 + 1
        target = torch.randn(16, 5, generator=generator, dtype=torch.float64)
        for model, opt in ((layer, ours_opt), (theirs, theirs_opt)):
            loss = (model(x) - target).square().mean()
            if opt is not None:
                opt.zero_grad()
                loss.backward()
                opt.step()
    if scale:
        assert_close(layer.gamma.detach(), theirs.weight.detach())
    if center:
        assert_close(layer.beta.detach(), theirs.bias.detach())
    assert sorted(name for name, _ in layer.named_parameters()) == sorted(
        name for name, present in (("bn.weight", scale), ("bn.bias", center)) if present)
