"""Deployment through ONNX: models with normkit's layers export with torch.onnx.export (the dynamo exporter and the
legacy TorchScript one), become the ONNX operators torch.nn's layers become, and run in onnxruntime with torch's
outputs; training-mode exports do what torch.nn's do or are refused by name (docs/decisions.md, "Deployment: ONNX")."""

import copy
import io
import warnings

import numpy as np
import pytest
import torch

import normkit
from normkit import reference as R
from normkit import tools
from normkit.keras import BatchNormalization

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# float32 tolerances: onnxruntime computes the same float32 normalization as torch, in another order of operations
RTOL, ATOL = 1e-4, 1e-5
EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]


def _needs_exporter(dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")


def _export(model, x, dynamo, *, dynamic_batch=False, training=None):
    """(ONNX ModelProto, the TracerWarnings and warnings of normkit's own code the export gave)."""
    _needs_exporter(dynamo)
    options = {}
    if dynamic_batch:
        if dynamo:
            options["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=2)},)
        else:
            options["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
    if training is not None:
        options["training"] = training
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.onnx.export(model, (x,), None if dynamo else buffer, dynamo=dynamo, input_names=["x"],
                                    output_names=["y"], verbose=False, **options)
    proto = program.model_proto if dynamo else onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    noise = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) or "normkit" in w.filename]
    return proto, noise


def _run(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.detach().numpy()})[0]


def _ops(proto):
    """The graph's operators, without the constants and shape plumbing the legacy exporter writes."""
    return [node.op_type for node in proto.graph.node if node.op_type not in ("Constant", "Shape", "Identity")]


def _trained(layer, x, steps=3):
    """A layer whose running statistics (and weights) are not their initial values."""
    layer.train()
    with torch.no_grad():
        for step in range(steps):
            layer(x * (1.5 + step) + 0.7)
        for parameter in layer.parameters():
            parameter.add_(torch.linspace(-0.3, 0.4, parameter.numel()).view(parameter.shape))
    return layer.eval()


def _input(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * 2 + 0.5


def _assert_exports_like(model, x, dynamo, ops=None, twin=None, **options):
    """The export runs in onnxruntime with the eager model's output (and the twin's, torch.nn's layer, where given:
    the same ONNX ops, the same outputs) and gives no TracerWarning or warning from normkit's code."""
    proto, noise = _export(model, x, dynamo, **options)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run(proto, x), expected, rtol=RTOL, atol=ATOL)
    assert not noise, [f"{w.filename}:{w.lineno}: {w.message}" for w in noise]
    if ops is not None:
        assert _ops(proto) == ops
    if twin is not None:
        twin_proto, _ = _export(twin, x, dynamo, **options)
        assert _ops(proto) == _ops(twin_proto)
        np.testing.assert_allclose(_run(proto, x), _run(twin_proto, x), rtol=RTOL, atol=ATOL)
    return proto


def _twin(layer, nn_class, *args, **kwargs):
    """torch.nn's layer with ``layer``'s state (the state_dict keys they share are the same)."""
    twin = nn_class(*args, **kwargs)
    state = layer.state_dict()  # (renorm's own buffers are normkit's: torch.nn's keys only)
    twin.load_state_dict({key: value for key, value in state.items() if key in twin.state_dict()})
    return twin.eval()


# -- BatchNorm in eval: one BatchNormalization node, as torch.nn's ------------------------------------------------

BATCH_NORMS = {
    "BatchNorm1d (N, C)": (normkit.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4)),
    "BatchNorm1d (N, C, L)": (normkit.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4, 7)),
    "BatchNorm2d": (normkit.BatchNorm2d, torch.nn.BatchNorm2d, (6, 4, 5, 3)),
    "BatchNorm3d": (normkit.BatchNorm3d, torch.nn.BatchNorm3d, (3, 4, 2, 5, 3)),
}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", BATCH_NORMS)
def test_batch_norm_in_eval_is_one_batch_normalization_node_like_torch_nn(name, dynamo):
    cls, nn_cls, shape = BATCH_NORMS[name]
    x = _input(shape)
    layer = _trained(cls(4), x)
    _assert_exports_like(layer, x, dynamo, ops=["BatchNormalization"], twin=_twin(layer, nn_cls, 4))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_batch_norm_in_eval_matches_the_numpy_reference(dynamo):
    x = _input((5, 3, 4, 4), seed=3)
    layer = _trained(normkit.BatchNorm2d(3, eps=1e-3), x)
    proto, _ = _export(layer, x, dynamo)
    as_numpy = {name: tensor.detach().double().numpy() for name, tensor in layer.state_dict().items()
                if name != "num_batches_tracked"}
    expected = R.batch_norm(x.double().numpy(), as_numpy["running_mean"], as_numpy["running_var"],
                                  as_numpy["weight"], as_numpy["bias"], training=False, momentum=0.1, eps=1e-3)
    np.testing.assert_allclose(_run(proto, x), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dynamic_batch_size(dynamo):
    x = _input((6, 4, 5, 3))
    layer = _trained(normkit.BatchNorm2d(4), x)
    proto = _assert_exports_like(layer, x, dynamo, ops=["BatchNormalization"], dynamic_batch=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # (a symbol, not 6)
    for batch in (2, 11):
        other = _input((batch, 4, 5, 3), seed=batch)
        with torch.no_grad():
            np.testing.assert_allclose(_run(proto, other), layer(other).numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("shape, ops", [((6, 5, 3, 4), ["Transpose", "BatchNormalization", "Transpose"]),
                                        ((6, 7, 4), ["Reshape", "BatchNormalization", "Reshape"])],
                         ids=["NHWC", "NLC"])
def test_features_last_is_batch_normalization_between_free_views(shape, ops, dynamo):
    """BatchNorm(C, axis=-1) on channels-last data: torch.nn's BatchNorm2d on the permuted (or flattened) data."""
    x = _input(shape)
    layer = _trained(normkit.BatchNorm(4, axis=-1), x)
    proto = _assert_exports_like(layer, x, dynamo, ops=ops)
    nn_layer = _twin(layer, torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d, 4)
    moved = x.movedim(-1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(_run(proto, x), nn_layer(moved).movedim(1, -1).numpy(), rtol=RTOL, atol=ATOL)


OPTIONS = {
    "renorm": dict(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}),
    "ghost batches": dict(virtual_batch_size=2),
    "ghost batches, contiguous layout": dict(virtual_batch_size=3, ghost_layout="contiguous"),
    "biased running variance": dict(unbiased_running_var=False),
}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", OPTIONS)
def test_training_options_infer_as_plain_batch_norm(name, dynamo):
    """renorm, ghost batches and the Keras running variance change training only: the eval graph is torch.nn's."""
    x = _input((6, 4, 5, 3))
    layer = _trained(normkit.BatchNorm2d(4, **OPTIONS[name]), x)
    twin = _twin(layer, torch.nn.BatchNorm2d, 4)
    _assert_exports_like(layer, x, dynamo, ops=["BatchNormalization"], twin=twin)


class _Masked(torch.nn.Module):
    """A layer called with a padding mask (which eval ignores: the running statistics normalize every position)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x, mask=x[:, 0] > -1.0)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_a_masked_call_in_eval_is_plain_batch_norm(dynamo):
    x = _input((6, 4, 7))
    layer = _trained(normkit.BatchNorm1d(4), x)
    _assert_exports_like(_Masked(layer).eval(), x, dynamo, ops=["BatchNormalization"],
                         twin=_twin(layer, torch.nn.BatchNorm1d, 4))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_a_frozen_layer_exports_as_eval_even_in_train_mode(dynamo):
    """A frozen layer normalizes with its running statistics whatever the mode: the graph of torch.nn's layer in eval
    (both exporters fold a BatchNormalization that follows a Conv into the Conv's weights)."""
    x = _input((6, 4, 5, 3))
    layer = _trained(normkit.BatchNorm2d(4), x)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), layer)
    twin = torch.nn.Sequential(copy.deepcopy(model[0]), _twin(layer, torch.nn.BatchNorm2d, 4)).eval()
    tools.freeze_batch_norm(model)
    model.train()
    _assert_exports_like(model, x, dynamo, twin=twin)
    alone = _twin(layer, normkit.BatchNorm2d, 4)
    tools.freeze_batch_norm(alone)
    _assert_exports_like(alone.train(), x, dynamo, ops=["BatchNormalization"],
                         twin=_twin(layer, torch.nn.BatchNorm2d, 4))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_a_folded_model_has_no_normalization_left(dynamo):
    x = _input((6, 3, 8, 8))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), normkit.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 5, 1), normkit.BatchNorm2d(5))
    for layer in (model[1], model[4]):
        _trained(layer, torch.randn(6, layer.num_features, 6, 6))
    model.eval()
    folded, names = tools.fold_batch_norm(model)
    assert names == ["1", "4"]
    proto = _assert_exports_like(folded, x, dynamo, ops=["Conv", "Relu", "Conv"])
    with torch.no_grad():  # (the folded graph computes the unfolded model)
        np.testing.assert_allclose(_run(proto, x), model(x).numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("axis, shape, ops", [(1, (6, 4, 5, 3), ["BatchNormalization"]),
                                              (-1, (6, 5, 3, 4), ["Transpose", "BatchNormalization", "Transpose"])],
                         ids=["axis=1", "axis=-1"])
def test_keras_layer_in_eval(axis, shape, ops, dynamo):
    x = _input(shape)
    layer = BatchNormalization(axis=axis, momentum=0.9, epsilon=1e-3)
    layer(x, training=True)  # (builds it)
    _trained(layer, x)
    _assert_exports_like(layer, x, dynamo, ops=ops)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_an_unbuilt_keras_layer_is_refused_naming_the_fix(dynamo):
    _needs_exporter(dynamo)
    # (torch.export refuses the unbuilt parameters before the call, in torch's words for its own lazy layers)
    with pytest.raises(Exception, match="call the layer once on an example input|Call `forward` with a dummy batch"):
        torch.onnx.export(BatchNormalization(axis=1).eval(), (_input((4, 3, 5)),),
                          None if dynamo else io.BytesIO(), dynamo=dynamo)


# -- the per-sample norms ------------------------------------------------------------------------------------------

SAMPLE_NORMS = {
    "LayerNorm": (lambda m: m.LayerNorm([5, 3]), (6, 4, 5, 3)),
    "LayerNorm without bias": (lambda m: m.LayerNorm(3, bias=False), (6, 4, 3)),
    "GroupNorm": (lambda m: m.GroupNorm(2, 4), (6, 4, 5, 3)),
    "InstanceNorm1d": (lambda m: m.InstanceNorm1d(4), (6, 4, 7)),
    "InstanceNorm2d affine": (lambda m: m.InstanceNorm2d(4, affine=True), (6, 4, 5, 3)),
    "InstanceNorm2d with running stats": (lambda m: m.InstanceNorm2d(4, affine=True, track_running_stats=True),
                                          (6, 4, 5, 3)),
}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", SAMPLE_NORMS)
def test_sample_norms_export_like_torch_nn(name, dynamo):
    make, shape = SAMPLE_NORMS[name]
    x = _input(shape)
    layer = make(normkit)
    if getattr(layer, "track_running_stats", False):
        _trained(layer, x)
    else:
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.add_(torch.linspace(-0.3, 0.4, parameter.numel()).view(parameter.shape))
    twin = make(torch.nn)
    twin.load_state_dict(layer.state_dict())
    proto, noise = _export(layer, x, dynamo)
    twin_proto, _ = _export(twin.eval(), x, dynamo)
    with torch.no_grad():
        expected = layer.eval()(x).numpy()
        np.testing.assert_allclose(expected, twin(x).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_run(proto, x), expected, rtol=RTOL, atol=ATOL)
    assert _ops(proto) == _ops(twin_proto)
    # torch.nn's own GroupNorm and InstanceNorm warn under the legacy exporter; normkit's layers do not
    assert not noise, [f"{w.filename}:{w.lineno}: {w.message}" for w in noise]


# -- the fused kernel ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_with_the_fused_kernel_on_the_graphs_are_the_same(cpp_kernel, dynamo):
    """The kernel serves eager training steps only: eval exports are unchanged, and a training-mode trace (the
    legacy exporter's) records ATen's operations, not the kernel's opaque call."""
    x = _input((6, 5, 3, 4))
    layer = _trained(normkit.BatchNorm(4, axis=-1, virtual_batch_size=3), x)  # (trained through the kernel)
    _assert_exports_like(layer, x, dynamo, ops=["Transpose", "BatchNormalization", "Transpose"])
    if not dynamo:
        layer = normkit.BatchNorm(4, axis=-1).train()
        expected_layer = copy.deepcopy(layer)
        proto, _ = _export(layer, x, dynamo, training=torch.onnx.TrainingMode.TRAINING)
        with torch.no_grad():
            expected = expected_layer(x).numpy()  # (batch statistics, through the kernel)
        np.testing.assert_allclose(_run(proto, x), expected, rtol=RTOL, atol=ATOL)


# -- training mode ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis, shape", [(1, (6, 4, 5, 3)), (-1, (6, 5, 3, 4))], ids=["axis=1", "axis=-1"])
def test_legacy_training_export_normalizes_by_the_batch_as_torch_nn(axis, shape):
    """training=TrainingMode.TRAINING: the graph normalizes with the batch's statistics, as torch.nn's."""
    x = _input(shape)
    layer = normkit.BatchNorm(4, axis=axis)
    twin = torch.nn.BatchNorm2d(4)
    moved = (lambda t: t) if axis == 1 else (lambda t: t.movedim(-1, 1))
    proto, _ = _export(copy.deepcopy(layer), x, False, training=torch.onnx.TrainingMode.TRAINING)
    twin_proto, _ = _export(twin, moved(x).contiguous(), False, training=torch.onnx.TrainingMode.TRAINING)
    with torch.no_grad():
        batch_normalized = twin.train()(moved(x)).numpy()
    got = _run(proto, x)
    np.testing.assert_allclose(moved(torch.from_numpy(got)).numpy(), batch_normalized, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_run(twin_proto, moved(x).contiguous()), batch_normalized, rtol=RTOL, atol=ATOL)
    assert "BatchNormalization" in _ops(proto)


def test_legacy_training_export_of_ghost_batches_normalizes_each_ghost_batch():
    x = _input((6, 4, 5, 3))
    layer = normkit.BatchNorm2d(4, virtual_batch_size=2)
    with torch.no_grad():
        expected = copy.deepcopy(layer).train()(x).numpy()
        ghosts = [R.batch_norm(x[g::3].double().numpy(), training=True) for g in range(3)]  # (Keras' strided groups)
    proto, _ = _export(layer.train(), x, False, training=torch.onnx.TrainingMode.TRAINING)
    got = _run(proto, x)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    for g in range(3):
        np.testing.assert_allclose(got[g::3], ghosts[g], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_a_train_mode_export_of_plain_batch_norm_gives_torch_nn_graph_and_outputs(dynamo):
    """Whatever an exporter makes of a model left in train mode, normkit's layer gives torch.nn's outputs (the dynamo
    exporter's graph normalizes with the running statistics, torch.nn's as normkit's)."""
    x = _input((6, 4, 5, 3))
    layer = _trained(normkit.BatchNorm2d(4), x).train()
    twin = _twin(layer, torch.nn.BatchNorm2d, 4).train()
    training = None if dynamo else torch.onnx.TrainingMode.PRESERVE
    proto, _ = _export(copy.deepcopy(layer), x, dynamo, training=training)
    twin_proto, _ = _export(copy.deepcopy(twin), x, dynamo, training=training)
    np.testing.assert_allclose(_run(proto, x), _run(twin_proto, x), rtol=RTOL, atol=ATOL)


def _keras_channels_first():
    layer = BatchNormalization(axis=1, momentum=0.9)
    layer.build((6, 4, 5, 3))
    return layer


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("make", [lambda: normkit.BatchNorm2d(4, unbiased_running_var=False),
                                  lambda: normkit.BatchNorm2d(4, momentum=None),
                                  lambda: normkit.BatchNorm2d(4, momentum=None, unbiased_running_var=False, affine=False),
                                  lambda: normkit.BatchNorm(4, axis=-1, unbiased_running_var=False),
                                  _keras_channels_first],
                         ids=["biased variance", "cumulative", "both, no affine", "features last", "keras"])
def test_a_train_mode_export_with_other_running_rules_gives_torch_nn_graph_and_outputs(make, dynamo):
    """Keras' biased running variance and the cumulative average move their buffers by rules ATen's kernel lacks, which
    ONNX graphs drop anyway: the step exports as torch.nn's plain one. Before, the dynamo exporter failed on the blend
    ("No ONNX function found for aten._foreach_mul"), and the legacy exporter's graph of zeroed statistics beside a
    zero bias came out of onnxruntime up to 4.9 off the batch-normalized output."""
    features_last = isinstance(make(), normkit.BatchNorm) and make().axis == -1
    x = _input((6, 4, 5, 3))
    layer = make()
    if not features_last:
        layer = _trained(layer, x)
        twin_state = layer.bn.state_dict() if isinstance(layer, BatchNormalization) else layer.state_dict()
        twin = torch.nn.BatchNorm2d(4, eps=1e-3 if isinstance(layer, BatchNormalization) else 1e-5,
                                    affine=any(key in twin_state for key in ("weight", "bias")))
        twin.load_state_dict({key: value for key, value in twin_state.items() if key in twin.state_dict()})
    else:
        x = x.movedim(1, -1).contiguous()
        twin = torch.nn.BatchNorm2d(4)
    moved = (lambda t: t.movedim(-1, 1)) if features_last else (lambda t: t)
    layer.train(), twin.train()
    training = None if dynamo else torch.onnx.TrainingMode.TRAINING
    proto, _ = _export(layer, x, dynamo, training=training)
    twin_proto, _ = _export(copy.deepcopy(twin), moved(x).contiguous(), dynamo, training=training)
    got = moved(torch.from_numpy(_run(proto, x))).numpy()
    np.testing.assert_allclose(got, _run(twin_proto, moved(x).contiguous()), rtol=RTOL, atol=ATOL)
    if not dynamo:  # (TrainingMode.TRAINING: normalized by the batch, as the eager step)
        with torch.no_grad():
            np.testing.assert_allclose(got, moved(copy.deepcopy(layer)(x)).numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("options, masked, named", [
    (dict(renorm=True), False, "renorm=True"),
    (dict(virtual_batch_size=2, ghost_layout="contiguous", momentum=None), True, "virtual_batch_size=2"),
    (dict(), True, "a mask"),
    (dict(adjustment=lambda shape: (torch.full((1, 4, 1), 1.1), torch.full((1, 4, 1), 0.1))), False, "adjustment"),
], ids=["renorm", "ghost batches", "mask", "adjustment"])
def test_training_mode_export_of_the_options_is_refused_naming_the_fix(options, masked, named, dynamo):
    _needs_exporter(dynamo)
    layer = normkit.BatchNorm1d(4, **options).train()
    model = _Masked(layer).train() if masked else layer
    training = {} if dynamo else {"training": torch.onnx.TrainingMode.TRAINING}
    with pytest.raises(Exception, match=f"with {named}.*cannot be exported to ONNX in training mode.*model.eval()"):
        torch.onnx.export(model, (_input((6, 4, 7)),), None if dynamo else io.BytesIO(), dynamo=dynamo, **training)
    assert int(layer.num_batches_tracked) == 0


def test_torch_export_of_the_options_in_training_still_works():
    """The refusal is ONNX's alone: torch.export (strict or not) of those training steps is unchanged."""
    import torch.onnx  # noqa: F401  (imported, as where users export to ONNX too)

    x = _input((6, 4, 7))
    for strict in (False, True):
        layer = normkit.BatchNorm1d(4, renorm=True, virtual_batch_size=2).train()
        program = torch.export.export(layer, (x,), strict=strict)
        expected = normkit.BatchNorm1d(4, renorm=True, virtual_batch_size=2).train()(x)
        torch.testing.assert_close(program.module()(x), expected)
