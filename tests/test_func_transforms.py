"""normkit's layers inside torch.func's transforms and their kin (ensembles by stack_module_state + vmap, functionalize,
jvp/jacfwd/hessian, torch.autograd.functional, parametrize, stateless), in training and eval, with normkit's options
and the Keras layer: what tests/test_ecosystem.py (functional_call, grad/jacrev/vmap in eval) does not cover. Oracles:
torch.nn's layer where it overlaps, the NumPy reference (float64) otherwise."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, functionalize, stack_module_state, vmap

import normkit
from normkit import reference
from normkit.keras import BatchNormalization

RENORM_BUFFERS = ("renorm_mean", "renorm_stddev", "moving_stddev")

# (name, factory, input shape, mask shape or None); each layer's normkit.BatchNorm is ``_bn(layer)``
OPTIONS = {
    "plain": (lambda: normkit.BatchNorm(3), (4, 3, 5), None),
    "axis=-1": (lambda: normkit.BatchNorm(3, axis=-1), (4, 5, 3), None),
    "renorm": (lambda: normkit.BatchNorm(3, renorm=True), (4, 3, 5), None),
    "ghost-strided": (lambda: normkit.BatchNorm(3, virtual_batch_size=2), (4, 3, 5), None),
    "ghost-contiguous": (lambda: normkit.BatchNorm(3, virtual_batch_size=2, ghost_layout="contiguous"), (4, 3, 5),
                         None),
    "mask": (lambda: normkit.BatchNorm(3, axis=-1), (4, 5, 3), (4, 5)),
    "momentum=None": (lambda: normkit.BatchNorm(3, momentum=None), (4, 3, 5), None),
    "momentum=None-ghost": (lambda: normkit.BatchNorm(3, momentum=None, virtual_batch_size=2), (4, 3, 5), None),
    "biased-variance": (lambda: normkit.BatchNorm(3, unbiased_running_var=False), (4, 3, 5), None),
    "keras": (lambda: BatchNormalization(), (4, 5, 3), None),
    "keras-renorm": (lambda: BatchNormalization(renorm=True), (4, 5, 3), None),
}


def _bn(layer):
    return layer.bn if isinstance(layer, BatchNormalization) else layer


def _built(name, seed):
    """A float64 layer of OPTIONS[name] with random parameters and running statistics of its own (one eager training
    step on random data, and a step count of its own)."""
    factory, shape, _ = OPTIONS[name]
    generator = torch.Generator().manual_seed(seed)
    layer = factory().double()
    layer(torch.zeros(shape, dtype=torch.float64))  # (builds the Keras layer; one step)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator, dtype=torch.float64) + 0.5)
        layer.train()(torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + seed)
        if _bn(layer).num_batches_tracked is not None:
            _bn(layer).num_batches_tracked.fill_(seed + 1)
    return layer


def _data(name, seed, models=None):
    _, shape, mask_shape = OPTIONS[name]
    generator = torch.Generator().manual_seed(100 + seed)
    lead = () if models is None else (models,)
    x = torch.randn(lead + shape, generator=generator, dtype=torch.float64) * 2 + 1
    mask = None if mask_shape is None else torch.rand(lead + mask_shape, generator=generator) > 0.3
    return x, mask


def _reference_step(layer, x, mask, training):
    """The reference's output of ``layer`` on ``x`` and the state it leaves (a dict of arrays by state_dict key)."""
    bn = _bn(layer)
    prefix = "bn." if bn is not layer else ""
    state = {key: value.detach().numpy().copy() for key, value in layer.state_dict().items()}
    renorm = bn.renorm and training
    mask_array = None
    if mask is not None:
        mask_array = (mask.unsqueeze(-1) if isinstance(layer, BatchNormalization) or mask.dim() < x.dim()
                      else mask).numpy()
    count = int(state[prefix + "num_batches_tracked"]) + 1 if training else None
    momentum = (1.0 / count if bn.momentum is None else bn.momentum) if training else 0.0
    y = reference.batch_norm(
        x.numpy(), state[prefix + "running_mean"], state[prefix + "running_var"],
        None if bn.weight is None else bn.weight.detach().numpy(), None if bn.bias is None else bn.bias.detach().numpy(),
        training, momentum, bn.eps, axis=bn.axis, mask=mask_array,
        virtual_batch_size=bn.virtual_batch_size if training else None, ghost_layout=bn.ghost_layout,
        unbiased_running_var=bn.unbiased_running_var,
        **({name: state[prefix + name] for name in RENORM_BUFFERS} if renorm else {}),
        **({"renorm_momentum": bn.renorm_momentum} if renorm else {}))
    if training:
        state[prefix + "num_batches_tracked"] = np.asarray(count)
    return y, state


def _assert_state(got: dict, want: dict):
    assert list(got) == list(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key].detach().double().numpy(), value, rtol=1e-10, atol=1e-12, err_msg=key)


# ------------------------------------------------------------------------------ ensembles: stack_module_state + vmap

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_an_ensemble_by_stack_module_state_and_vmap_steps_each_model_as_the_reference(name, training):
    """Model ensembling (torch.func.stack_module_state, then vmap over functional_call): every model's buffers are
    stacked, so each member updates its own running statistics in training, as torch.nn's BatchNorm does. normkit's
    option paths failed there: vmap has no batching rule for the running statistics' _foreach_lerp_ (renorm, masks,
    ghost batches, Keras' biased variance) or for mean(out=) (ghost batches), and the cumulative average
    (momentum=None) read each member's count as a number (vmap's .item() error, torch.nn's layer too)."""
    models = [_built(name, seed).train(training) for seed in range(3)]
    x, mask = _data(name, 0, models=3)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    kwargs = (lambda m: {}) if mask is None else (lambda m: {"mask": m})

    def call(p, b, x, m):
        return functional_call(base, (p, b), (x,), kwargs(m))

    y = vmap(call, in_dims=(0, 0, 0, None if mask is None else 0))(params, buffers, x, mask)
    for member, model in enumerate(models):
        want, state = _reference_step(model, x[member], None if mask is None else mask[member], training)
        np.testing.assert_allclose(y[member].detach().numpy(), want, rtol=1e-10, atol=1e-12)
        _assert_state({key: (params | buffers)[key][member] for key in model.state_dict()}, state)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,args,shape", [("BatchNorm2d", (3,), (4, 3, 2, 2)), ("BatchNorm1d", (3,), (5, 3)),
                                             ("InstanceNorm1d", (3,), (2, 3, 4))])
def test_an_ensemble_of_drop_in_layers_as_torch_nn_s(name, args, shape, training):
    results = []
    for library in (normkit, nn):
        torch.manual_seed(0)
        kwargs = {"affine": True, "track_running_stats": True} if name.startswith("Instance") else {}
        models = [getattr(library, name)(*args, **kwargs).double().train(training) for _ in range(3)]
        for model in models:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.uniform_(0.5, 1.5)
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        x = torch.randn((3,) + shape, dtype=torch.float64)
        y = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, x)
        results.append([y, *params.values(), *buffers.values()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ functionalize

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_functionalize_updates_the_captured_layer_s_buffers_as_the_reference(name, training):
    """torch.func.functionalize over a layer the function captures: torch.nn's layer updates its buffers there;
    normkit's renorm, masked, contiguous-ghost and Keras training steps failed with ATen's "INTERNAL ASSERT FAILED
    ... mutating a non-functional tensor with a functional tensor" (the running statistics' lerp)."""
    layer = _built(name, 0).train(training)
    x, mask = _data(name, 0)
    kwargs = {} if mask is None else {"mask": mask}
    want, state = _reference_step(layer, x, mask, training)
    y = functionalize(lambda x: layer(x, **kwargs))(x)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-10, atol=1e-12)
    _assert_state(layer.state_dict(), state)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functionalize_drop_in_as_torch_nn(training):
    results = []
    for library in (normkit, nn):
        torch.manual_seed(0)
        layer = library.BatchNorm2d(3).double().train(training)
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        results.append([functionalize(layer)(x), *layer.state_dict().values()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
