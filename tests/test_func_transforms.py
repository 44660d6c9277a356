"""normkit's layers inside torch.func's transforms and their kin (ensembles by stack_module_state + vmap, functionalize,
jvp/jacfwd/hessian, torch.autograd.functional, parametrize, stateless), in training and eval, with normkit's options
and the Keras layer: what tests/test_ecosystem.py (functional_call, grad/jacrev/vmap in eval) does not cover. Oracles:
torch.nn's layer where it overlaps, the NumPy reference (float64) otherwise."""

import copy
import warnings

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
    "renorm-mask": (lambda: normkit.BatchNorm(3, axis=-1, renorm=True), (4, 5, 3), (4, 5)),  # (renorm's masked update)
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
        None if bn.weight is None else bn.weight.detach().numpy(),
        None if bn.bias is None else bn.bias.detach().numpy(),
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

    with warnings.catch_warnings():
        # (vmap's one-sample-at-a-time fallback warns "performance drop": the statistics take var_mean there)
        warnings.filterwarnings("error", message=".*performance drop.*")
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


# ------------------------------------------------------------------------------ per-sample gradients in training

def _per_sample_case(name, samples=3):
    """A float64 layer of OPTIONS[name] (random parameters), ``samples`` batches of its input shape, masks and
    cotangents."""
    layer = _built(name, 0)
    x, mask = _data(name, 1, models=samples)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return layer, x, mask, g


@pytest.mark.parametrize("name", list(OPTIONS))
def test_replace_all_batch_norm_modules_gives_per_sample_gradients_in_training(name):
    """torch.func.replace_all_batch_norm_modules_ tests isinstance against torch.nn's _BatchNorm and leaves normkit's
    layers tracking (vmap then refuses them); normkit.replace_all_batch_norm_modules_ switches their statistics off
    as torch's does torch.nn's: vmap(grad(loss)) over samples, each one batch normalized by its own statistics.
    The Keras layer failed after the recipe's three lines by hand (its forward read the moving mean's dtype).
    Oracle: the reference's gradient of each sample's batch."""
    layer, x, mask, g = _per_sample_case(name)
    model = nn.Sequential(layer) if name == "plain" else layer  # (a container too)
    assert normkit.replace_all_batch_norm_modules_(model) is model
    bn = _bn(layer)
    assert bn.running_mean is None and bn.num_batches_tracked is None and not bn.track_running_stats and not bn.renorm
    params = {key: value.detach() for key, value in model.named_parameters()}
    kwargs = (lambda m: {}) if mask is None else (lambda m: {"mask": m})

    def loss(p, x, m, g):
        return (functional_call(model, p, (x,), kwargs(m)) * g).sum()

    grads = vmap(torch.func.grad(loss), in_dims=(None, 0, None if mask is None else 0, 0))(params, x, mask, g)
    for sample in range(x.shape[0]):
        m = None if mask is None else mask[sample]
        full_mask = None if m is None else (m.unsqueeze(-1) if m.dim() < x.dim() - 1 else m).numpy()
        want = reference.batch_norm_backward(
            g[sample].numpy(), x[sample].numpy(), None, None, bn.weight.detach().numpy(), bn.bias.detach().numpy(),
            True, bn.eps, axis=bn.axis, mask=full_mask, virtual_batch_size=bn.virtual_batch_size,
            ghost_layout=bn.ghost_layout)
        for key, expected in zip(("weight", "bias"), want[1:], strict=True):
            got = grads[next(k for k in grads if k.endswith(key))][sample]
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-10, err_msg=key)


def test_replace_all_batch_norm_modules_on_a_mixed_model_as_torch_s_on_torch_nn_s():
    """torch.nn's layers of the same model get torch's recipe; normkit's drop-in layers then compute as torch.nn's
    patched ones, InstanceNorm with running statistics included (which torch's recipe leaves, and vmap refuses)."""
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.InstanceNorm1d(4, affine=True),
                           nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)).double()
    ours = normkit.convert_batch_norm(copy.deepcopy(theirs))
    ours[2] = normkit.InstanceNorm1d(4, affine=True, track_running_stats=True).double()
    ours[4] = copy.deepcopy(theirs[4])  # (torch.nn's, beside normkit's: torch's recipe reaches it)
    normkit.replace_all_batch_norm_modules_(ours)
    torch.func.replace_all_batch_norm_modules_(theirs)
    assert ours[2].running_mean is None and ours[4].running_mean is None
    samples = torch.randn(3, 5, 3, 6, dtype=torch.float64)
    results = []
    for model in (ours, theirs):
        params = {key: value.detach() for key, value in model.named_parameters()}
        loss = (lambda p, x, model=model: functional_call(model, p, (x,)).pow(3).sum())
        grads = vmap(torch.func.grad(loss), in_dims=(None, 0))(params, samples)
        results.append([vmap(model)(samples), *grads.values()])
        model.eval()
        results[-1].append(vmap(model)(samples))  # (eval: batch statistics too, without running ones)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_replace_all_batch_norm_modules_refuses_unbuilt_layers():
    for model in (nn.Sequential(BatchNormalization()), nn.Sequential(normkit.LazyBatchNorm1d())):
        with pytest.raises(ValueError, match="not built yet"):
            normkit.replace_all_batch_norm_modules_(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        normkit.replace_all_batch_norm_modules_(normkit.BatchNorm1d(3).state_dict())


# ------------------------------------------------------------------------------ training with running statistics

def _state(layer):
    return {key: value.clone() for key, value in layer.state_dict().items()}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_training_with_running_statistics_under_a_transform_is_refused_by_name_and_fix(name):
    """vmap cannot update one set of running statistics from a batch of samples, and grad/jvp/jacrev refuse to change
    a tensor the function captured: torch.nn's layer fails there too, with functorch's errors, which name neither
    the layer nor a fix that reaches normkit's (vmap's points to torch's recipe, which does not see them); normkit's
    options failed with "aten::lerp_ ... use out-of-place operators". The layer is left as it was."""
    layer, x, mask, g = _per_sample_case(name)
    kwargs = {} if mask is None else {"mask": mask[0]}
    before = _state(layer)
    calls = {"vmap": lambda: vmap(lambda x: layer(x, **kwargs))(x),
             "jvp": lambda: torch.func.jvp(lambda x: layer(x, **kwargs), (x[0],), (g[0],)),
             "jacrev": lambda: torch.func.jacrev(lambda x: layer(x, **kwargs))(x[0]),
             "vmap(grad)": lambda: vmap(torch.func.grad(lambda x: layer(x, **kwargs).sum()))(x)}
    for transform, call in calls.items():
        fix = "replace_all_batch_norm_modules_" if transform == "vmap" else "functional_call"
        named = "BatchNormalization" if name.startswith("keras") else "BatchNorm"  # (the layer the user made)
        with pytest.raises(RuntimeError, match=f"^{named}: a training call (under|inside a) torch.func.*{fix}"):
            call()
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[key]), (transform, key)
    theirs = nn.BatchNorm1d(3).double()
    for call in (lambda: vmap(theirs)(torch.randn(2, 4, 3, dtype=torch.float64)),
                 lambda: torch.func.jacrev(theirs)(torch.randn(4, 3, dtype=torch.float64))):
        with pytest.raises(RuntimeError):  # (torch.nn's refuses the same calls)
            call()


# (vmap over a batch of batches; and vmap(layer)(x), which hands each sample to the layer unbatched, (C, *S): that
# path raised torch's message, "Batch norm got a batched tensor ...", pointing to torch's recipe, which does not see
# normkit's layers)
@pytest.mark.parametrize("name, shape", [("InstanceNorm1d", (2, 4, 3, 5)), ("BatchNorm2d", (2, 4, 3, 2, 2)),
                                         ("InstanceNorm1d", (4, 3, 5)), ("InstanceNorm2d", (4, 3, 2, 3))],
                         ids=["InstanceNorm1d", "BatchNorm2d", "InstanceNorm1d unbatched", "InstanceNorm2d unbatched"])
def test_vmap_refusal_of_drop_in_layers_names_normkit_s_fix(name, shape):
    kwargs = {"track_running_stats": True} if name.startswith("Instance") else {}
    ours, theirs = getattr(normkit, name)(3, **kwargs), getattr(nn, name)(3, **kwargs)
    x = torch.randn(shape)
    with pytest.raises(RuntimeError, match="were not batched"):
        vmap(theirs)(x)
    before = _state(ours)
    with pytest.raises(RuntimeError, match=f"{name}: a training call under torch.func.vmap.*replace_all_batch_norm"):
        vmap(ours)(x)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key
    torch.testing.assert_close(vmap(ours.eval())(x), vmap(theirs.eval())(x))  # (eval: the running statistics, read)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_the_fix_the_refusal_names_buffers_as_arguments_of_grad_steps_as_the_reference(name):
    """grad over functional_call with the buffers an argument of the transformed function: the training step
    computes and moves the given buffers (torch.nn's layer does the same). Oracle: the reference's step."""
    layer, x, mask, g = _per_sample_case(name, samples=1)
    x, mask, g = x[0], None if mask is None else mask[0], g[0]
    kwargs = {} if mask is None else {"mask": mask}
    params = {key: value.detach() for key, value in layer.named_parameters()}
    buffers = {key: value.clone() for key, value in layer.named_buffers()}
    want, state = _reference_step(layer, x, mask, True)
    before = _state(layer)

    def loss(p, b, x):
        return (functional_call(layer, (p, b), (x,), kwargs) * g).sum()

    grads = torch.func.grad(loss, argnums=(0, 2))(params, buffers, x)
    bn = _bn(layer)
    full_mask = None if mask is None else (mask.unsqueeze(-1) if mask.dim() < x.dim() else mask).numpy()
    renorm = {key: before[("bn." if bn is not layer else "") + key].numpy().copy()
              for key in RENORM_BUFFERS[:2]} if bn.renorm else {}
    expected = reference.batch_norm_backward(
        g.numpy(), x.numpy(), None, None, bn.weight.detach().numpy(), bn.bias.detach().numpy(), True, bn.eps,
        axis=bn.axis, mask=full_mask, virtual_batch_size=bn.virtual_batch_size, ghost_layout=bn.ghost_layout,
        **renorm)
    np.testing.assert_allclose(grads[1].numpy(), expected[0], rtol=1e-9, atol=1e-10)
    for key, value in zip(("weight", "bias"), expected[1:], strict=True):
        got = grads[0][next(k for k in grads[0] if k.endswith(key))]
        np.testing.assert_allclose(got.numpy(), value, rtol=1e-9, atol=1e-10, err_msg=key)
    _assert_state(params | buffers, state)
    for key, value in layer.state_dict().items():  # (the layer's own buffers stay)
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------------ forward mode, Jacobians, Hessians

DROP_IN = [  # (name, args, kwargs, input shape): no running statistics to update in training
    ("BatchNorm2d", (3,), {}, (4, 3, 2, 2)),
    ("BatchNorm1d", (3,), {"track_running_stats": False}, (5, 3)),
    ("InstanceNorm1d", (3,), {"affine": True}, (2, 3, 4)),
    ("LayerNorm", ((3, 4),), {}, (2, 3, 4)),
    ("GroupNorm", (2, 4), {}, (2, 4, 3)),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,args,kwargs,shape", DROP_IN, ids=[spec[0] for spec in DROP_IN])
def test_forward_mode_jacobians_and_hessians_as_torch_nn_s(name, args, kwargs, shape, training):
    """jvp, jacfwd, hessian (forward over reverse) and torch.autograd.functional's jacobian (vectorized too), hvp and
    jvp, side by side with torch.nn's layer. (A BatchNorm2d with running statistics trains under none of them, as
    torch.nn's: see the refusal above; here it is in eval only.)"""
    if training and name == "BatchNorm2d":
        kwargs = {"track_running_stats": False}
    results = []
    for library in (normkit, nn):
        torch.manual_seed(0)
        layer = getattr(library, name)(*args, **kwargs).double().train(training)
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.uniform_(0.5, 1.5)
        x, v = torch.randn(shape, dtype=torch.float64) * 2 + 1, torch.randn(shape, dtype=torch.float64)
        cubic = (lambda x, layer=layer: layer(x).pow(3).sum())
        functional = torch.autograd.functional
        results.append([*torch.func.jvp(layer, (x,), (v,)), torch.func.jacfwd(layer)(x),
                        torch.func.hessian(cubic)(x), functional.jacobian(layer, x),
                        functional.jacobian(layer, x, vectorize=True), *functional.hvp(cubic, x, v),
                        *functional.jvp(layer, x, v), *layer.state_dict().values()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["train-no-statistics", "eval"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_jvp_and_jacfwd_through_the_options_match_the_reference_vjp(name, training):
    """<g, J v> = <J^T g, v>: jvp's tangent and jacfwd's Jacobian against the reference's vector-Jacobian product
    (in training without running statistics: renorm, which needs them, in eval only)."""
    layer, x, mask, g = _per_sample_case(name, samples=1)
    if training:
        if _bn(layer).renorm:
            pytest.skip("renorm needs running statistics")
        normkit.replace_all_batch_norm_modules_(layer)
    layer.train(training)
    x, mask, g = x[0], None if mask is None else mask[0], g[0]
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    kwargs = {} if mask is None else {"mask": mask}
    bn = _bn(layer)
    full_mask = None if mask is None or not training else (mask.unsqueeze(-1) if mask.dim() < x.dim() else mask).numpy()
    stats = [None, None] if training else [bn.running_mean.numpy(), bn.running_var.numpy()]
    vjp = reference.batch_norm_backward(g.numpy(), x.numpy(), *stats, bn.weight.detach().numpy(),
                                        bn.bias.detach().numpy(), training, bn.eps, axis=bn.axis, mask=full_mask,
                                        virtual_batch_size=bn.virtual_batch_size if training else None,
                                        ghost_layout=bn.ghost_layout)[0]
    want = (torch.from_numpy(vjp) * v).sum()
    _, tangent = torch.func.jvp(lambda x: layer(x, **kwargs), (x,), (v,))
    torch.testing.assert_close((g * tangent).sum(), want, rtol=1e-9, atol=1e-9)
    jacobian = torch.func.jacfwd(lambda x: layer(x, **kwargs))(x).reshape(x.numel(), x.numel())
    torch.testing.assert_close(g.reshape(-1) @ jacobian @ v.reshape(-1), want, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------ parametrize, stateless

PARAMETRIZED = DROP_IN[:1] + DROP_IN[2:]


class _Exp(nn.Module):
    def forward(self, value):
        return value.exp()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,args,kwargs,shape", PARAMETRIZED, ids=[spec[0] for spec in PARAMETRIZED])
def test_a_parametrized_weight_as_torch_nn_s(name, args, kwargs, shape, training):
    """torch.nn.utils.parametrize on the weight (a positive scale, exp): the layers read it through the
    parametrization, on their short paths too; output, gradients of the input and of the original, buffers."""
    results = []
    for library in (normkit, nn):
        torch.manual_seed(0)
        layer = getattr(library, name)(*args, **kwargs).double().train(training)
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Exp())
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        y.pow(3).sum().backward()
        results.append([y, x.grad, layer.parametrizations.weight.original.grad, *layer.buffers()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["renorm", "mask", "keras"])
def test_a_parametrized_weight_through_the_options_as_the_reference(name):
    layer, x, mask, g = _per_sample_case(name, samples=1)
    x, mask = x[0], None if mask is None else mask[0]
    bn = _bn(layer)
    original = bn.weight.detach().clone()
    torch.nn.utils.parametrize.register_parametrization(bn, "weight", _Exp())
    with torch.no_grad():
        bn.parametrizations.weight.original.copy_(original.log())  # (the same weight, through exp)
    want, state = _reference_step(layer, x, mask, True)
    y = layer(x, **({} if mask is None else {"mask": mask}))
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-10, atol=1e-12)
    _assert_state({key: value for key, value in layer.state_dict().items()}, state)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_nn_utils_stateless_as_torch_nn_s(training):
    results = []
    for library in (normkit, nn):
        layer = library.BatchNorm2d(4).double().train(training)
        generator = torch.Generator().manual_seed(5)
        given = {"weight": torch.rand(4, generator=generator, dtype=torch.float64) + 0.5,
                 "bias": torch.randn(4, generator=generator, dtype=torch.float64),
                 "running_mean": torch.randn(4, generator=generator, dtype=torch.float64),
                 "running_var": torch.rand(4, generator=generator, dtype=torch.float64) + 0.5,
                 "num_batches_tracked": torch.tensor(3)}
        x = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)
        with torch.nn.utils.stateless._reparametrize_module(layer, given):
            y = layer(x)
        results.append([y, *given.values(), *layer.state_dict().values()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
