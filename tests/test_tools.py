"""normkit's model tools: precise BN vs NumPy averages; conversion, folding, freezing vs torch.nn and float64."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import normkit
from normkit import (convert_batch_norm, fold_batch_norm, freeze_batch_norm, recalibrate_running_stats,
                     synchronize_batch_norm, unfreeze_batch_norm)


def as64(tensor):
    return tensor.detach().double().numpy()


def average_stats(inputs, axes, ddof=1):
    """NumPy oracle: the plain mean over batches of each batch's mean and variance (``ddof`` 1: unbiased)."""
    means = [x.mean(axis=axes) for x in inputs]
    variances = [x.var(axis=axes, ddof=ddof) for x in inputs]
    return np.mean(means, axis=0), np.mean(variances, axis=0)


def assert_stats(layer, mean, var):
    np.testing.assert_allclose(as64(layer.running_mean), mean, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(as64(layer.running_var), var, rtol=2e-5, atol=2e-6)


def scramble(layer, momentum=0.3, tracked=7):
    """Running statistics nothing could average back to (NaN), a momentum and a step count to restore."""
    with torch.no_grad():
        layer.running_mean.fill_(float("nan"))
        layer.running_var.fill_(float("nan"))
        layer.num_batches_tracked.fill_(tracked)
    layer.momentum = momentum


@pytest.mark.parametrize("make", [lambda: normkit.BatchNorm2d(4), lambda: nn.BatchNorm2d(4)],
                         ids=["normkit.BatchNorm2d", "torch.nn.BatchNorm2d"])
@pytest.mark.parametrize("training", [True, False])
def test_conv_layer_is_the_average_of_batch_statistics(make, training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), make())
    layer = model[1]
    scramble(layer)
    model.train(training)
    # Unequal batch sizes: precise BN averages per-batch statistics with equal weights.
    batches = [torch.randn(n, 3, 7, 7) * 3 + 1 for n in (8, 8, 5)]
    weights = {k: v.clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        inputs = [as64(model[0](x)) for x in batches]

    assert recalibrate_running_stats(model, batches) is model

    assert_stats(layer, *average_stats(inputs, (0, 2, 3)))
    assert layer.momentum == 0.3 and int(layer.num_batches_tracked) == 7
    assert model.training == training and layer.training == training and model[0].training == training
    assert all(torch.equal(p, weights[k]) for k, p in model.named_parameters())


def test_swa_utils_update_bn_is_the_oracle_and_skips_normkit_layers():
    """torch's own precise-BN tool, torch.optim.swa_utils.update_bn, on the torch.nn twin of a model (no dropout:
    the one difference, docs/tools.md) gives the statistics recalibrate_running_stats gives the normkit model, after
    a weight change (pruning) and with batches of different sizes; update_bn itself finds normkit's layers by
    torch.nn's base class, so on them it silently changes nothing (docs/decisions.md)."""
    from torch.optim.swa_utils import update_bn
    torch.manual_seed(0)
    twin = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=None), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4), nn.BatchNorm1d(4)).double()
    for _ in range(3):
        twin(torch.randn(8, 3, 6, 6, dtype=torch.float64) * 2 + 1)
    with torch.no_grad():
        twin[3].weight[twin[3].weight.abs() < 0.1] = 0.0
    batches = [(torch.randn(n, 3, 6, 6, dtype=torch.float64) * 3 + 1, torch.zeros(n)) for n in (16, 5, 16)]
    ours = convert_batch_norm(copy.deepcopy(twin), "normkit")
    before = copy.deepcopy(ours.state_dict())
    update_bn(batches, ours)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, before[name]), name
    update_bn(batches, twin)
    recalibrate_running_stats(ours, batches)
    for index in (1, 4, 9):
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(ours[index], name), getattr(twin[index], name), rtol=1e-12, atol=1e-12)


def test_features_last_layer_and_input_target_pairs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), normkit.BatchNorm(4, axis=-1))
    data = torch.utils.data.TensorDataset(torch.randn(40, 5, 3) * 2 - 1, torch.zeros(40, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=10)
    with torch.no_grad():
        inputs = [as64(model[0](x)) for x, _ in loader]
    recalibrate_running_stats(model, loader, num_batches=3)  # (input, target) pairs; the first 3 of 4 batches
    assert_stats(model[1], *average_stats(inputs[:3], (0, 1)))
    assert int(model[1].num_batches_tracked) == 0  # a fresh layer: the step count stays 0


def test_single_pass_generator_of_tensors():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), normkit.BatchNorm1d(4))
    batches = [torch.randn(6, 3) for _ in range(4)]
    with torch.no_grad():
        inputs = [as64(model[0](x)) for x in batches]
    recalibrate_running_stats(model, (x for x in batches))
    assert_stats(model[1], *average_stats(inputs, (0,)))


def test_takes_exactly_num_batches_from_an_iterator():
    """A shared iterator loses only the batches used: the next one is still there afterwards."""
    model = nn.Sequential(normkit.BatchNorm1d(3))
    batches = iter([torch.randn(6, 3) for _ in range(4)])
    recalibrate_running_stats(model, batches, num_batches=2)
    assert len(list(batches)) == 2


@pytest.mark.parametrize("make", [lambda: normkit.BatchNorm2d(4), lambda: nn.BatchNorm2d(4),
                                  lambda: normkit.BatchNorm(4, renorm=True)],
                         ids=["normkit.BatchNorm2d", "torch.nn.BatchNorm2d", "renorm"])
def test_a_layer_whose_step_count_was_set_to_none_is_recalibrated_and_keeps_no_count(make):
    """torch.nn's layers run with num_batches_tracked set to None (momentum alone moves the buffers). Recalibration
    failed on such a layer with an AttributeError ('NoneType' object has no attribute 'zero_'/'copy_') after it had
    reset the layer's statistics, and its restore stopped at that layer: statistics lost and the model left in eval,
    against the call's all-or-nothing promise. The average needs a count, so the layer gets one for the call and
    None again after it. Oracle: the NumPy average of the batch statistics; a refused batch restores everything."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), make(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    layer = model[1]
    scramble(layer)
    scramble(model[3])
    layer.num_batches_tracked = None
    model.train()
    batches = [torch.randn(n, 3, 7, 7) * 3 + 1 for n in (8, 8, 5)]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="batch 1"):
        recalibrate_running_stats(model, [batches[0], torch.randn(1, 3, 3, 3)])  # (one value per channel: refused)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert layer.num_batches_tracked is None and layer.momentum == 0.3 and all(m.training for m in model.modules())
    with torch.no_grad():
        inputs = [as64(model[0](x)) for x in batches]

    recalibrate_running_stats(model, batches)

    assert_stats(layer, *average_stats(inputs, (0, 2, 3)))
    assert layer.num_batches_tracked is None and "num_batches_tracked" not in model[1].state_dict()
    assert layer.momentum == 0.3 and int(model[3].num_batches_tracked) == 7
    assert not np.isnan(as64(model[3].running_mean)).any()


def test_keras_layers_are_recalibrated():
    """A normkit.keras layer runs its BN in its own mode: recalibration must put both in training mode."""
    torch.manual_seed(3)
    keras_layer = normkit.keras.BatchNormalization(momentum=0.9)
    model = nn.Sequential(nn.Linear(3, 4), keras_layer)
    model(torch.randn(5, 3))
    model.eval()
    batches = [torch.randn(6, 3) * 2 + 1 for _ in range(3)]
    with torch.no_grad():
        inputs = [as64(model[0](x)) for x in batches]
    recalibrate_running_stats(model, batches)
    assert_stats(keras_layer.bn, *average_stats(inputs, (0,), ddof=0))  # Keras' moving variance is biased
    assert not keras_layer.training and not keras_layer.bn.training
    assert keras_layer.momentum == 0.9 and keras_layer.bn.momentum == pytest.approx(0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", [lambda: nn.BatchNorm2d(4), lambda: normkit.BatchNorm2d(4),
                                  lambda: normkit.keras.BatchNormalization(axis=1)],
                         ids=["torch.nn.BatchNorm2d", "normkit.BatchNorm2d", "normkit.keras"])
def test_a_half_precision_layer_is_the_average_rounded_once(make, dtype):
    """A .half()/.bfloat16() model: the cumulative average rounded its buffers at every batch, so in bfloat16 an
    update (x_k - mean) / k under half a unit of the last place was lost; after a few dozen batches the average
    stopped moving (4% off in bfloat16, 0.3% in float16). The plain average, rounded once, is within one unit."""
    torch.manual_seed(21)
    model = nn.Sequential(make()).to(dtype)
    model(torch.randn(2, 4, 3, 3, dtype=dtype))  # (builds the Keras layer)
    model.eval()
    layer = normkit.tools._batch_norm_of(model[0])
    weight, running_mean = layer.weight, layer.running_mean
    centers = torch.tensor([3.0, 10.0, -1.0, 0.5]).view(1, 4, 1, 1)
    batches = [(torch.randn(64, 4, 4, 4) * 0.5 + centers).to(dtype) for _ in range(300)]
    ddof = 0 if isinstance(model[0], normkit.keras.BatchNormalization) else 1  # (Keras: biased variance)

    recalibrate_running_stats(model, batches)

    mean, var = average_stats([as64(x) for x in batches], (0, 2, 3), ddof=ddof)
    ulp = torch.finfo(dtype).eps  # (one unit in the last place, relative)
    np.testing.assert_allclose(as64(layer.running_mean), mean, rtol=ulp)
    np.testing.assert_allclose(as64(layer.running_var), var, rtol=ulp)
    # The layer keeps its dtype and its tensors (the same Parameter and buffer objects).
    assert layer.weight is weight and layer.running_mean is running_mean
    assert layer.weight.dtype == layer.running_mean.dtype == layer.running_var.dtype == dtype


def test_biased_running_variance_layer_averages_biased_variances():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), normkit.BatchNorm1d(4, momentum=0.01, eps=1e-3, unbiased_running_var=False))
    batches = [torch.randn(6, 3) for _ in range(3)]
    with torch.no_grad():
        inputs = [as64(model[0](x)) for x in batches]
    recalibrate_running_stats(model, batches)
    assert_stats(model[1], *average_stats(inputs, (0,), ddof=0))
    assert model[1].momentum == 0.01


def normalize(x, gamma, beta, eps):
    """NumPy: batch normalization with the batch's biased variance (what BN in training mode outputs)."""
    return (x - x.mean(0)) / np.sqrt(x.var(0) + eps) * gamma + beta


def test_downstream_layers_see_batch_normalized_inputs_and_dropout_is_off():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Sigmoid(), nn.Dropout(0.5), nn.Linear(5, 4),
                          normkit.BatchNorm1d(4))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
    model.train()
    batches = [torch.randn(16, 3) * 2 for _ in range(3)]
    w1, b1 = as64(model[0].weight), as64(model[0].bias)
    w2, b2 = as64(model[4].weight), as64(model[4].bias)
    gamma, beta = as64(model[1].weight), as64(model[1].bias)
    first, second = [], []
    for x in batches:
        z = as64(x) @ w1.T + b1
        first.append(z)
        h = 1 / (1 + np.exp(-normalize(z, gamma, beta, model[1].eps)))  # dropout: identity (eval mode)
        second.append(h @ w2.T + b2)
    recalibrate_running_stats(model, batches)
    assert_stats(model[1], *average_stats(first, (0,)))
    assert_stats(model[5], *average_stats(second, (0,)))
    assert all(module.training for module in model.modules())


def test_renorm_layer_runs_as_plain_bn_and_keeps_moving_stddev_consistent():
    torch.manual_seed(5)
    renorm = normkit.BatchNorm1d(4, renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 5.0})
    model = nn.Sequential(nn.Linear(3, 4), renorm, nn.Linear(4, 2), normkit.BatchNorm1d(2))
    for _ in range(5):  # some training steps: renorm state away from its initial values
        model(torch.randn(8, 3) * 2 + 1)
    saved = {name: getattr(renorm, name).clone() for name in ("renorm_mean", "renorm_stddev")}
    tracked = int(renorm.num_batches_tracked)
    batches = [torch.randn(8, 3) * 2 + 1 for _ in range(3)]
    w1, b1, w2, b2 = (as64(t) for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    first = [as64(x) @ w1.T + b1 for x in batches]
    # No r/d correction during recalibration: the next layer sees plain batch-normalized values.
    second = [normalize(z, as64(renorm.weight), as64(renorm.bias), renorm.eps) @ w2.T + b2 for z in first]

    recalibrate_running_stats(model, batches)

    mean, var = average_stats(first, (0,))
    assert_stats(renorm, mean, var)
    np.testing.assert_allclose(as64(renorm.moving_stddev), np.sqrt(var + renorm.eps), rtol=2e-5)
    assert_stats(model[3], *average_stats(second, (0,)))
    assert renorm.renorm is True and int(renorm.num_batches_tracked) == tracked
    assert all(torch.equal(getattr(renorm, name), value) for name, value in saved.items())


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
def test_ghost_layer_averages_ghost_batch_statistics(layout):
    """A ghost layer runs its own training path: its running statistics become the average, over every
    virtual batch of every batch, of the ghost means and of the ghost unbiased variances."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), normkit.BatchNorm1d(4, virtual_batch_size=4, ghost_layout=layout))
    batches = [torch.randn(12, 3) * 2 + 1 for _ in range(3)]
    ghosts = []
    for x in batches:
        z = as64(model[0](x))
        if layout == "strided":  # ghost j holds rows j, j + B/V, j + 2B/V, ...
            ghosts += [z[j::len(z) // 4] for j in range(len(z) // 4)]
        else:  # ghost g holds rows 4g ... 4g + 3
            ghosts += [z[g:g + 4] for g in range(0, len(z), 4)]
    recalibrate_running_stats(model, batches)
    assert_stats(model[1], *average_stats(ghosts, (0,)))
    # Pooling each whole batch would give another (larger) variance: the oracle tells them apart.
    pooled = average_stats([as64(model[0](x)) for x in batches], (0,))[1]
    assert not np.allclose(as64(model[1].running_var), pooled, rtol=1e-3)


def test_frozen_and_non_bn_layers_are_untouched():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv1d(3, 4, 3), normkit.BatchNorm1d(4), normkit.InstanceNorm1d(4, track_running_stats=True),
                          nn.Conv1d(4, 4, 1), normkit.BatchNorm1d(4))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 10))
    model[1].freeze()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(8, 3, 10) for _ in range(2)]
    recalibrate_running_stats(model, batches)
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("4.running"):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key  # frozen BN, instance norm, weights, every step count
    assert model[1].frozen and model[1].training


def test_errors():
    with pytest.raises(ValueError, match="no batch-normalization layer"):
        recalibrate_running_stats(nn.Sequential(nn.Linear(2, 2), normkit.LayerNorm(2)), [torch.randn(4, 2)])
    frozen = nn.Sequential(nn.Linear(2, 2), normkit.BatchNorm1d(2).freeze(), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="none of the 2 batch-normalization layers .* can be recalibrated"):
        recalibrate_running_stats(frozen, [torch.randn(4, 2)])
    model = nn.Sequential(nn.Linear(2, 3), normkit.BatchNorm1d(3), nn.BatchNorm1d(3))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_batches must be None"):
            recalibrate_running_stats(model, [torch.randn(4, 2)], num_batches=bad)
    with pytest.raises(TypeError, match="batch 1 is a str"):
        recalibrate_running_stats(model, [torch.randn(4, 2), "images"])
    with pytest.raises(TypeError, match=r"batch 0 is a dict.*a generator such as \(batch\['image'\] for batch in"):
        recalibrate_running_stats(model, [{"image": torch.randn(4, 2), "label": torch.zeros(4)}])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        recalibrate_running_stats(lambda x: x, [torch.randn(4, 2)])
    # An ((input, mask), target) pair: the message said "batch 0 is a tuple", which it was meant to be.
    with pytest.raises(TypeError, match=r"the first element of batch 0 \(a tuple, taken as \(input, target, \.\.\.\)\) "
                                        r"is a tuple;.*a model of several inputs"):
        recalibrate_running_stats(model, [((torch.randn(4, 2), torch.ones(4, dtype=torch.bool)), torch.zeros(4))])


def test_a_model_on_the_meta_device_is_refused_by_name():
    """Meta tensors hold no values: the recalibration failed as "Tensor.item() cannot be called on meta tensors"."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), normkit.BatchNorm2d(4)).to("meta")
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\), '2' \(BatchNorm2d\) are on the meta device"):
        recalibrate_running_stats(model, [torch.randn(2, 3, 4, 4, device="meta")])
    assert model.training and model[1].momentum == 0.1


@pytest.mark.parametrize("bn", [normkit.BatchNorm1d, nn.BatchNorm1d], ids=["normkit", "torch.nn"])
def test_a_one_row_last_batch_is_named_and_nothing_changes(bn):
    """A DataLoader without drop_last=True ends with a batch of one row here (9 rows, batches of 4): torch's message
    alone (use eval()) named no batch and gave no advice that helps a recalibration."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), bn(3)).eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(9, 2)), batch_size=4)
    with pytest.raises(ValueError, match=r"batch 2 \(input of shape \(1, 2\)\) was refused, and every running "
                                         r"statistic was left as it was\. .*one value per channel: pass a DataLoader with "
                                         r"drop_last=True"):
        recalibrate_running_stats(model, loader)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model.training and not model[1].training


def test_unbuilt_layers_are_refused_with_the_fix():
    """A lazy BN or an unbuilt Keras layer has no statistics yet: a clear error, not torch's deep-copy failure."""
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d())
    keras = nn.Sequential(nn.Linear(3, 4), normkit.keras.BatchNormalization(), nn.BatchNorm1d(4))
    for model, names in ((lazy, r"'0' \(LazyConv2d\), '1' \(LazyBatchNorm2d\)"),
                         (keras, r"'1' \(BatchNormalization\)")):
        with pytest.raises(ValueError, match="fold_batch_norm: not built yet: " + names + r".*model\(example_batch\)"):
            fold_batch_norm(model.eval())
    with pytest.raises(ValueError, match=r"recalibrate_running_stats: not built yet: '1' \(LazyBatchNorm2d\)"):
        recalibrate_running_stats(lazy, [torch.randn(4, 3, 6, 6)])
    with pytest.raises(ValueError, match=r"recalibrate_running_stats: not built yet: '1' \(BatchNormalization\)"):
        recalibrate_running_stats(keras, [torch.randn(4, 3)])  # (the torch.nn BN would have hidden it)
    # A lazy conv before a built BN builds on the first batch: recalibration works, against the NumPy average.
    torch.manual_seed(9)
    model = nn.Sequential(nn.LazyLinear(4), nn.BatchNorm1d(4))
    batches = [torch.randn(6, 3) * 2 + 1 for _ in range(3)]
    recalibrate_running_stats(model, batches)
    with torch.no_grad():
        assert_stats(model[1], *average_stats([as64(model[0](x)) for x in batches], (0,)))


@pytest.mark.parametrize("batches", [[], iter(()), [torch.randn(4, 2), torch.randn(4, 5)]], ids=["empty list",
                                                                                            "spent iterator", "bad shape"])
def test_a_failed_call_leaves_every_layer_as_it_was(batches):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(2, 3), normkit.BatchNorm1d(3, renorm=True), nn.BatchNorm1d(3))
    model(torch.randn(6, 2))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError)) as error:
        recalibrate_running_stats(model, batches)
    if not isinstance(batches, list) or not batches:
        assert "yielded no batch" in str(error.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(m.training for m in model.modules())
    assert model[1].momentum == 0.1 and model[1].renorm and model[2].momentum == 0.1


class AuxiliaryHead(nn.Module):
    """Inception's pattern: a head (with its own BN) that runs in training mode only."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(nn.Linear(3, 4), normkit.BatchNorm1d(4))
        self.aux = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))

    def forward(self, x):
        y = self.main(x)
        return y + self.aux(x) if self.training else y


def test_a_layer_no_batch_reaches_keeps_its_statistics_and_is_named():
    """Recalibration runs the model in eval mode, so a training-only branch is never called: its BN averaged
    nothing and kept the reset 0/1 statistics (silently replacing trained ones) before this was fixed."""
    torch.manual_seed(10)
    model = AuxiliaryHead()
    for _ in range(3):
        model(torch.randn(8, 3) * 2 + 1)
    aux = {k: v.clone() for k, v in model.aux[1].state_dict().items()}
    batches = [torch.randn(6, 3) * 2 + 1 for _ in range(3)]
    with pytest.warns(RuntimeWarning, match=r"no batch reached 'aux.1' \(BatchNorm1d\)"):
        recalibrate_running_stats(model, batches)
    assert all(torch.equal(model.aux[1].state_dict()[k], v) for k, v in aux.items())
    with torch.no_grad():
        assert_stats(model.main[1], *average_stats([as64(model.main[0](x)) for x in batches], (0,)))
    assert model.training and model.aux[1].training


class Padded(nn.Module):
    """A layer whose padding (NaN positions) is a mask computed from the input."""

    def __init__(self, make):
        super().__init__()
        self.bn = make()

    def forward(self, x):
        valid = ~torch.isnan(x[:, 0])
        return self.bn(torch.nan_to_num(x), mask=valid) if isinstance(self.bn, normkit.BatchNorm) else self.bn(x)


@pytest.mark.parametrize("make, padding", [
    (lambda: nn.BatchNorm1d(2), torch.randn(0, 2, 5)),
    (lambda: normkit.BatchNorm1d(2), torch.randn(0, 2, 5)),
    (lambda: normkit.BatchNorm1d(2), torch.full((4, 2, 5), float("nan"))),
], ids=["torch.nn, empty batch", "normkit, empty batch", "normkit, all padding"])
def test_a_batch_without_values_does_not_dilute_the_average(make, padding):
    """A batch that gives a layer no value leaves its statistics as they were but counted as a batch: the
    cumulative average then weighed each later batch by 1/(k + 1), so the result was no plain average."""
    torch.manual_seed(11)
    model = Padded(make)
    batches = [torch.randn(4, 2, 5) * 2 + 3, padding, torch.randn(6, 2, 5) - 1]
    recalibrate_running_stats(model, batches)
    assert_stats(model.bn, *average_stats([as64(batches[0]), as64(batches[2])], (0, 2)))
    assert int(model.bn.num_batches_tracked) == 0
    # Only batches without values: the layer averaged nothing and keeps its statistics.
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"no batch reached 'bn'"):
        recalibrate_running_stats(model, [padding, padding])
    assert all(torch.equal(model.bn.state_dict()[k], v) for k, v in before.items())


class KerasPadded(nn.Module):
    """A Keras-vocabulary layer given its padding mask positionally, after ``training``, as Keras models pass it."""

    def __init__(self):
        super().__init__()
        self.bn = normkit.keras.BatchNormalization()

    def forward(self, x):
        return self.bn(torch.nan_to_num(x), None, ~torch.isnan(x[..., 0]))


def test_an_all_padding_batch_of_a_keras_layer_does_not_dilute_the_average():
    torch.manual_seed(12)
    model = KerasPadded()
    model(torch.randn(2, 3, 4))  # (builds the layer)
    batches = [torch.randn(4, 5, 4) * 2 + 3, torch.full((2, 5, 4), float("nan")), torch.randn(3, 5, 4) - 1]
    recalibrate_running_stats(model, batches)
    mean, var = average_stats([as64(batches[0]), as64(batches[2])], (0, 1), ddof=0)  # (Keras: biased variance)
    gamma, beta, moving_mean, moving_variance = model.bn.get_weights()
    np.testing.assert_allclose(moving_mean, mean, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(moving_variance, var, rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------- convert_batch_norm


def torch_cnn():
    """A small float64 CNN with torch.nn BN of every rank and setting (momentum None, no affine, no tracking)."""
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False),
                         nn.BatchNorm2d(4, momentum=None, eps=1e-3), nn.Flatten())
    head = nn.ModuleDict({"fc": nn.Linear(36, 5), "bn": nn.BatchNorm1d(5, affine=False),
                          "out": nn.Linear(5, 3), "free": nn.BatchNorm1d(3, track_running_stats=False)})
    model = nn.ModuleDict({"body": body, "head": head}).double()
    with torch.no_grad():
        for layer in (body[1], body[4], head["free"]):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
    model.head.out.bias.requires_grad_(False)
    return model


def run(model, x):
    h = model["body"](x)
    h = model["head"]["bn"](model["head"]["fc"](h))
    return model["head"]["free"](model["head"]["out"](torch.tanh(h)))


def trajectory(model, inputs):
    """Outputs and parameter gradients of several training steps, then the eval output and state_dict."""
    model.train()
    steps = []
    for x in inputs:
        model.zero_grad()
        y = run(model, x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        steps.append((y.detach().clone(), {k: None if p.grad is None else p.grad.clone()
                                           for k, p in model.named_parameters()}))
    model.eval()
    return steps, run(model, inputs[0]).detach(), {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_trajectory(actual, expected):
    (steps, y, state), (steps0, y0, state0) = actual, expected
    assert len(steps) == len(steps0)
    for (out, grads), (out0, grads0) in zip(steps, steps0):
        torch.testing.assert_close(out, out0, rtol=1e-12, atol=1e-12)
        assert grads.keys() == grads0.keys()
        for key, grad in grads.items():
            assert (grad is None) == (grads0[key] is None), key
            if grad is not None:
                torch.testing.assert_close(grad, grads0[key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    assert list(state) == list(state0)
    for key, value in state.items():
        assert value.dtype == state0[key].dtype, key
        torch.testing.assert_close(value, state0[key], rtol=1e-12, atol=1e-12)


BN_NAMES = ["body.1", "body.4", "head.bn", "head.free"]


def test_convert_both_ways_keeps_outputs_gradients_and_state():
    torch.manual_seed(10)
    inputs = [torch.randn(6, 3, 7, 7, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    initial = torch_cnn()
    reference, model, back = (copy.deepcopy(initial) for _ in range(3))
    expected = trajectory(reference, inputs)

    model.train(False)  # the training flag is carried: eval before, eval after
    params = dict(model.named_parameters())
    assert convert_batch_norm(model, "normkit") is model
    layers = dict(model.named_modules())
    assert [type(layers[n]) for n in BN_NAMES] == [normkit.BatchNorm2d, normkit.BatchNorm2d, normkit.BatchNorm1d,
                                                   normkit.BatchNorm1d]
    assert not any(m.training for m in model.modules())
    assert layers["body.4"].momentum is None and layers["body.4"].eps == 1e-3 and not layers["head.bn"].affine
    assert not layers["head.free"].track_running_stats and layers["head.free"].running_mean is None
    # The same Parameter objects: requires_grad and any optimizer built before carry over.
    assert all(p is params[k] for k, p in model.named_parameters())
    assert not model.head.out.bias.requires_grad
    assert_same_trajectory(trajectory(model, inputs), expected)

    convert_batch_norm(back, "normkit")
    trajectory(back, inputs[:2])  # trained as normkit layers, then back to torch.nn
    assert convert_batch_norm(back, to="torch") is back
    layers = dict(back.named_modules())
    assert [type(layers[n]) for n in BN_NAMES] == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm1d]
    assert all(v.dtype == torch.float64 for v in back.state_dict().values() if v.is_floating_point())
    reference = copy.deepcopy(initial)
    trajectory(reference, inputs[:2])
    assert_same_trajectory(trajectory(back, inputs[2:]), trajectory(reference, inputs[2:]))


def test_convert_bare_layers_3d_bias_false_and_plain_batchnorm():
    torch.manual_seed(11)
    x = torch.randn(4, 3, 2, 3, 2)
    theirs = nn.BatchNorm3d(3, momentum=0.3)
    theirs(x * 2 + 1)
    ours = convert_batch_norm(copy.deepcopy(theirs), "normkit")
    assert type(ours) is normkit.BatchNorm3d and ours.training and ours.momentum == 0.3
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))

    weight_only = normkit.BatchNorm2d(3, bias=False)
    converted = convert_batch_norm(weight_only, "torch")
    assert type(converted) is nn.BatchNorm2d and converted.bias is None and converted.weight is weight_only.weight
    plain = nn.Sequential(nn.Conv2d(2, 3, 1), normkit.BatchNorm(3))
    convert_batch_norm(plain, "torch", plain_as=nn.BatchNorm2d)
    assert type(plain[1]) is nn.BatchNorm2d


def test_convert_to_torch_takes_an_unsized_plain_lazy_layer_as_plain_as_says():
    """normkit.LazyBatchNorm not sized yet is a plain BatchNorm to come (any rank): it was left a normkit layer without
    a word, while the same layer sized was refused without plain_as. Now it is refused the same way, or becomes
    plain_as's lazy class, which sizes itself and trains as the unconverted layer."""
    torch.manual_seed(22)
    with pytest.raises(ValueError, match=r"'1' is a plain normkit.LazyBatchNorm.*pass plain_as"):
        convert_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 1), normkit.LazyBatchNorm()), "torch")
    ours = nn.Sequential(nn.Conv2d(3, 4, 1), normkit.LazyBatchNorm(momentum=0.3)).double()
    theirs = nn.Sequential(nn.Conv2d(3, 4, 1), normkit.LazyBatchNorm(momentum=0.3)).double()
    theirs[0].load_state_dict(ours[0].state_dict())  # (an unsized lazy layer cannot be deep-copied)
    theirs = convert_batch_norm(theirs, "torch", plain_as=nn.BatchNorm2d)
    assert type(theirs[1]) is nn.LazyBatchNorm2d
    for _ in range(2):
        x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * 2 + 1
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-12, atol=1e-12)
    assert type(theirs[1]) is nn.BatchNorm2d and theirs[1].momentum == 0.3
    torch.testing.assert_close(theirs[1].running_var, ours[1].running_var, rtol=1e-12, atol=1e-12)

    # torch.nn has no lazy SyncBatchNorm: a synchronized layer not sized yet became a SyncBatchNorm of 0 features
    # holding uninitialized tensors that nothing would size.
    for layer in (normkit.LazyBatchNorm2d(synchronized=True), normkit.LazyBatchNorm(synchronized=True)):
        model = nn.Sequential(layer)
        with pytest.raises(ValueError, match=r"'0' \(LazyBatchNorm2?d?\) is synchronized and not sized yet"):
            convert_batch_norm(model, "torch", plain_as=nn.BatchNorm2d)
        assert model[0] is layer


def test_convert_leaves_other_modules_and_subclasses_alone():
    class Custom(nn.BatchNorm2d):
        pass

    model = nn.Sequential(Custom(2), normkit.LayerNorm(2), nn.InstanceNorm2d(2), nn.LazyInstanceNorm2d())
    kinds = [type(m) for m in model]
    convert_batch_norm(model, "normkit")
    assert [type(m) for m in model] == kinds
    shared = nn.BatchNorm1d(2)
    model = nn.Sequential(shared, nn.Linear(2, 2), shared)
    convert_batch_norm(model, "normkit")
    assert type(model[0]) is normkit.BatchNorm1d and model[0] is model[2]


def test_convert_carries_qconfig_and_non_persistent_buffers():
    """A layer's quantization setting (qconfig=None keeps it out of torch.ao's quantization, as
    convert_sync_batchnorm carries it) and which buffers its state_dict leaves out move with the layer, both ways;
    before, qconfig was lost (the layer inherited its parent's) and a non-persistent buffer came back in."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].qconfig = None
    model[1].register_buffer("running_mean", model[1].running_mean, persistent=False)
    keys = list(model.state_dict())
    for to in ("normkit", "torch"):
        convert_batch_norm(model, to)
        assert list(model.state_dict()) == keys and "qconfig" in vars(model[1]) and model[1].qconfig is None
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (torch's observers' deprecation notes)
        torch.ao.quantization.propagate_qconfig_(model)
    assert model[1].qconfig is None and model[0].qconfig is not None


def test_a_layer_whose_instance_has_its_own_forward_is_not_converted():
    """An instance given its own forward (a patch adding an activation) computes something else, as a subclass
    overriding forward does: converted, the patch was dropped and the output changed. It is left alone, and the
    tools that would convert it refuse it by name."""
    torch.manual_seed(24)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    bn = model[1]
    bn.forward = lambda input: torch.relu(nn.BatchNorm2d.forward(bn, input))
    x = torch.randn(4, 3, 5, 5)
    expected = model(x)
    convert_batch_norm(model, "normkit")
    assert model[1] is bn
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d, with its own forward\).*nothing was changed"):
        synchronize_batch_norm(model)
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\).*instances with their own forward.*nothing was frozen"):
        freeze_batch_norm(model)
    assert model[1] is bn and bn.weight.requires_grad

    ours = nn.Sequential(normkit.BatchNorm2d(4))
    layer = ours[0]
    layer.forward = lambda input: torch.relu(normkit.BatchNorm2d.forward(layer, input))
    assert convert_batch_norm(ours, "torch")[0] is layer


def test_convert_carries_hooks_and_their_handles():
    torch.manual_seed(12)
    calls = []
    layer = nn.BatchNorm2d(3)
    handle = layer.register_forward_hook(lambda module, args, output: calls.append(("forward", type(module))))
    layer.register_forward_pre_hook(lambda module, args: calls.append(("pre", type(module))))
    layer.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(("backward", type(module))))
    model = nn.Sequential(nn.Conv2d(2, 3, 1), layer)
    convert_batch_norm(model, "normkit")
    model(torch.randn(4, 2, 3, 3, requires_grad=True)).sum().backward()
    assert calls == [("pre", normkit.BatchNorm2d), ("forward", normkit.BatchNorm2d), ("backward", normkit.BatchNorm2d)]
    handle.remove()  # a handle taken on the old layer still removes its hook
    calls.clear()
    model(torch.randn(4, 2, 3, 3))
    assert calls == [("pre", normkit.BatchNorm2d)]
    convert_batch_norm(model, "torch")
    model(torch.randn(4, 2, 3, 3))
    assert calls[-1] == ("pre", nn.BatchNorm2d)


def _weight_by_a_hook(layer, how):
    """layer's weight recomputed before each call by a forward pre-hook of torch's, from Parameters named for it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch.nn.utils.weight_norm is deprecated)
        if how == "prune":
            torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=1)
            return layer
        if how == "weight_norm":
            return torch.nn.utils.weight_norm(layer, "weight", dim=0)
        return torch.nn.utils.spectral_norm(layer, "weight", dim=0)


@pytest.mark.parametrize("how", ["prune", "weight_norm", "spectral_norm"])
@pytest.mark.parametrize("to", ["normkit", "torch"])
def test_convert_carries_a_weight_a_hook_computes(how, to):
    """A BN whose weight torch's prune, weight_norm or spectral_norm computes (network slimming prunes BN gammas):
    the converted layer takes the Parameters and buffers the hook makes the weight from (weight_orig, weight_mask,
    weight_g, weight_v, weight_u) with the hook, and computes and trains as before. It took the missing weight as
    None: the model failed on every call ("no attribute 'weight_mask'")."""
    import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils does not import it)
    library = nn if to == "normkit" else normkit

    def make():  # (twice: a module holding a computed weight does not deepcopy, in torch)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 1), _weight_by_a_hook(library.BatchNorm2d(3), how))
        with torch.no_grad():
            model[1].bias.uniform_(-1, 1)
        return model

    model, twin = make(), make()
    convert_batch_norm(model, to)
    assert type(model[1]).__module__.startswith(to)
    x = torch.randn(4, 2, 3, 3)
    for module in (model, twin):
        module(x).pow(2).sum().backward()
    torch.testing.assert_close(model(x), twin(x))
    assert [key for key, _ in model.named_parameters()] == [key for key, _ in twin.named_parameters()]
    for (key, got), want in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(got.grad, want.grad, msg=key)
    assert list(model.state_dict()) == list(twin.state_dict())
    for key, want in twin.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], want, msg=key)


@pytest.mark.parametrize("tool", [lambda model: convert_batch_norm(model, "normkit"), synchronize_batch_norm],
                         ids=["convert_batch_norm", "synchronize_batch_norm"])
def test_a_setting_the_new_class_refuses_leaves_every_layer_as_it_was(tool):
    """torch.nn takes momentum=2, normkit does not: the refusal names the layer, and a lazy layer met before it keeps
    its sizing hook (it lost it, so it then failed on its second call and could not load a state_dict)."""
    lazy = nn.LazyBatchNorm1d()
    calls = []
    lazy.register_forward_hook(lambda module, args, output: calls.append(type(module)))
    model = nn.Sequential(lazy, nn.Sequential(nn.BatchNorm1d(3, momentum=2.0)))
    with pytest.raises(ValueError, match=r"'1\.0' \(BatchNorm1d\) cannot become a normkit\.BatchNorm1d: momentum "
                                         r".*nothing was changed"):
        tool(model)
    assert model[0] is lazy and type(model[1][0]) is nn.BatchNorm1d
    x = torch.randn(4, 3) * 2 + 1
    for _ in range(2):  # sized by its first call, then an eager torch.nn layer, as if never converted
        torch.testing.assert_close(model[0](x), nn.BatchNorm1d(3)(x))
    assert type(model[0]) is nn.BatchNorm1d and calls == [nn.BatchNorm1d, nn.BatchNorm1d]  # (its hook kept)
    unsized = nn.Sequential(nn.LazyBatchNorm1d(), nn.BatchNorm1d(3, momentum=2.0))
    with pytest.raises(ValueError, match="cannot become"):
        tool(unsized)
    unsized.load_state_dict(nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3)).state_dict())
    assert unsized[0].running_var.shape == (3,)


def without_weight(layer):
    """An affine layer holding beta only, as normkit.keras makes for scale=False."""
    del layer.weight
    layer.register_parameter("weight", None)
    return layer


@pytest.mark.parametrize("make,option", [
    (lambda: normkit.BatchNorm2d(3, renorm=True), "renorm=True"),
    (lambda: normkit.BatchNorm2d(3, virtual_batch_size=2), "virtual_batch_size=2"),
    (lambda: normkit.BatchNorm2d(3, adjustment=lambda shape: (1.0, 0.0)), "adjustment="),
    (lambda: normkit.BatchNorm(3, axis=-1), "axis=-1"),
    (lambda: normkit.BatchNorm2d(3).freeze(), "frozen=True"),
    (lambda: normkit.BatchNorm2d(3, unbiased_running_var=False), "unbiased_running_var=False"),
    (lambda: normkit.BatchNorm2d(3, weight_regularizer="l2"), "weight_regularizer="),
    (lambda: normkit.BatchNorm2d(3, bias_constraint=lambda w: w), "bias_constraint="),
    # (Keras' scale=False: beta without gamma; torch.nn's affine layer then fails in reset_parameters)
    (lambda: without_weight(normkit.BatchNorm2d(3)), "no weight"),
    (lambda: normkit.BatchNorm(3), "plain_as=torch.nn.BatchNorm1d"),
], ids=["renorm", "ghost", "adjustment", "axis", "frozen", "biased var", "regularizer", "constraint", "no weight",
        "plain"])
def test_convert_to_torch_refuses_options_torch_lacks(make, option):
    layer = make()
    model = nn.Sequential(nn.Conv2d(3, 3, 1), normkit.BatchNorm2d(3), nn.Sequential(nn.ReLU(), layer))
    with pytest.raises(ValueError, match=r"'2\.1' .*" + option) as error:
        convert_batch_norm(model, "torch")
    assert "nothing was converted" in str(error.value)
    # (a plain layer has no option to remove: plain_as is its fix)
    assert ("Remove the option" in str(error.value)) == (option != "plain_as=torch.nn.BatchNorm1d")
    assert type(model[1]) is normkit.BatchNorm2d and model[2][1] is layer  # atomic: the valid layer too


def test_convert_to_torch_names_a_keras_layer_as_itself():
    """A Keras-vocabulary layer's inner BatchNorm has unbiased_running_var=False, no option of the Keras layer: the
    refusal names the Keras layer, once, and why."""
    layer = normkit.keras.BatchNormalization()
    layer(torch.randn(4, 3))
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(layer))
    with pytest.raises(ValueError, match=r"'1\.0' is a Keras-vocabulary layer .*biased") as error:
        convert_batch_norm(model, "torch")
    assert "1.0.bn" not in str(error.value) and "unbiased_running_var" not in str(error.value)
    assert "Remove the option" not in str(error.value)  # (the biased variance is no option of the Keras layer)


def test_convert_to_torch_refuses_an_unbuilt_keras_layer():
    """An unbuilt Keras-vocabulary layer (no inner BatchNorm yet) gets a biased moving variance once built, as a built
    one has: it is refused as that one is, not left in the "converted" model without a word."""
    layer = normkit.keras.BatchNormalization(axis=1)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(layer))
    model = convert_batch_norm(model, "normkit")
    with pytest.raises(ValueError, match=r"'1\.0' is a Keras-vocabulary layer .*biased") as error:
        convert_batch_norm(model, "torch")
    assert "nothing was converted" in str(error.value)
    assert type(model[0]) is normkit.BatchNorm1d and model[1][0] is layer and layer.bn is None


def test_convert_argument_errors():
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="to must be 'normkit'"):
        convert_batch_norm(model, "keras")
    with pytest.raises(ValueError, match="plain_as must be torch.nn.BatchNorm1d"):
        convert_batch_norm(model, "torch", plain_as=normkit.BatchNorm1d)
    with pytest.raises(ValueError, match="with to='torch' only"):
        convert_batch_norm(model, "normkit", plain_as=nn.BatchNorm1d)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        convert_batch_norm(lambda x: x)


# ----------------------------------------------------------------------------- synchronize_batch_norm
# (tests/test_distributed.py trains a synchronized model over real gloo processes)


def test_synchronize_converts_torch_layers_keeping_their_tensors_and_sets_normkit_layers():
    import normkit.keras
    group = object()  # (stands for a process group: the tool only hands it on)
    sync = nn.SyncBatchNorm(3, momentum=0.3, process_group=group).double()
    torch_bn = nn.BatchNorm2d(3, eps=1e-3).double()
    ours = normkit.BatchNorm(3, renorm=True, axis=-1).double()
    keras_layer = normkit.keras.BatchNormalization(axis=1)
    model = nn.Sequential(torch_bn, nn.Sequential(sync, ours), keras_layer).eval()
    tensors = [torch_bn.weight, torch_bn.running_var, sync.bias, sync.num_batches_tracked]
    assert synchronize_batch_norm(model) is model
    assert type(model[0]) is normkit.BatchNorm2d and type(model[1][0]) is normkit.BatchNorm
    assert [model[0].weight, model[0].running_var, model[1][0].bias, model[1][0].num_batches_tracked] == tensors
    assert (model[0].eps, model[1][0].momentum, model[1][0].axis) == (1e-3, 0.3, 1) and not model[1][0].training
    assert model[1][0].process_group is group and model[0].process_group is None  # (None: each keeps its group)
    assert all(layer.synchronized for layer in (model[0], model[1][0], ours, keras_layer)) and model[1][1] is ours
    other = object()
    synchronize_batch_norm(model, other)
    assert all(layer.process_group is other for layer in (model[0], model[1][0], ours, keras_layer))
    keras_layer(torch.randn(4, 3, 2))  # (built after: the wrapper hands its options to its BatchNorm)
    assert keras_layer.bn.synchronized and keras_layer.bn.process_group is other
    bare = synchronize_batch_norm(nn.BatchNorm1d(2))  # (a model that is a layer: the new layer is returned)
    assert type(bare) is normkit.BatchNorm1d and bare.synchronized


def test_synchronized_without_a_process_group_is_the_local_layer_and_warns_once():
    theirs = nn.BatchNorm1d(3).double()
    model = synchronize_batch_norm(nn.Sequential(copy.deepcopy(theirs)))
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"synchronized=True\) runs without an initialized torch.distributed"):
        torch.testing.assert_close(model(x), theirs(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(model(x), theirs(x))
    torch.testing.assert_close(model[0].running_var, theirs.running_var)


def test_synchronized_layers_convert_to_torch_s_sync_batch_norm_and_back():
    group = object()
    ours = normkit.BatchNorm2d(3, momentum=None, synchronized=True, process_group=group).double()
    model = nn.Sequential(ours, normkit.BatchNorm(3, synchronized=True).double())  # (no plain_as needed)
    convert_batch_norm(model, "torch")
    assert [type(layer) for layer in model] == [nn.SyncBatchNorm, nn.SyncBatchNorm]
    back = convert_batch_norm(copy.deepcopy(model), "normkit")  # (SyncBatchNorm -> synchronized normkit.BatchNorm)
    assert [type(layer) for layer in back] == [normkit.BatchNorm] * 2 and all(layer.synchronized for layer in back)
    assert model[0].weight is ours.weight and model[0].process_group is group and model[0].momentum is None
    # Without a process group torch's SyncBatchNorm computes torch.nn's batch norm (also on the CPU): the oracle.
    plain = nn.BatchNorm2d(3, momentum=None).double()
    plain.load_state_dict(model[0].state_dict())
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(model[0](x), plain(x))
    torch.testing.assert_close(model[0].running_var, plain.running_var)
    synchronize_batch_norm(model)
    assert [type(layer) for layer in model] == [normkit.BatchNorm, normkit.BatchNorm] and model[0].weight is ours.weight
    assert model[0].process_group is group and model[0].synchronized and model[0].momentum is None
    with pytest.raises(ValueError, match="renorm=True"):
        convert_batch_norm(nn.Sequential(normkit.BatchNorm2d(3, renorm=True, synchronized=True)), "torch")


def test_synchronize_refuses_subclasses_and_models_without_bn():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.BatchNorm2d(2), MyBN(2), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match=r"'1' \(MyBN\) derive.*nothing was changed"):
        synchronize_batch_norm(model)
    assert type(model[0]) is nn.BatchNorm2d and type(model[2]) is nn.LazyBatchNorm1d
    with pytest.raises(ValueError, match="no batch-normalization layer"):
        synchronize_batch_norm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        synchronize_batch_norm(lambda x: x)


# ----------------------------------------------------------------------------- fold_batch_norm

BN_CLASSES = (nn.modules.batchnorm._BatchNorm, normkit.BatchNorm)


def randomize(model, shape, steps=3):
    """Non-trivial BN parameters and running statistics (a few training steps), then eval mode."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BN_CLASSES):
                for p in (module.weight, module.bias):
                    if p is not None:
                        p.uniform_(0.5, 1.5)
    model.train()
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        model(torch.randn(*shape, dtype=dtype) * 3 + 2)
    return model.eval()


class PlainSubclassConv(nn.Conv2d):
    """A subclass that only adds to the constructor computes what nn.Conv2d does: it folds."""


def fold_cases():
    tbn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
    nbn = {1: normkit.BatchNorm1d, 2: normkit.BatchNorm2d, 3: normkit.BatchNorm3d}
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    spatial = {1: (9,), 2: (6, 6), 3: (4, 4, 4)}
    cases = []
    for rank in (1, 2, 3):
        for family, bn in (("torch", tbn), ("normkit", nbn)):
            for bias in (True, False):
                def make(rank=rank, bn=bn, bias=bias):
                    return nn.Sequential(conv[rank](3, 4, 3, bias=bias), bn[rank](4), nn.ReLU(),
                                         conv[rank](4, 2, 1, bias=bias), bn[rank](2, affine=False, eps=1e-3))
                cases.append(pytest.param(make, (8, 3) + spatial[rank], 2, id=f"conv{rank}d-{family}-bias={bias}"))
    cases += [
        pytest.param(lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3, bias=False),
                                           normkit.BatchNorm1d(3, momentum=None)), (10, 5), 2, id="mlp"),
        pytest.param(lambda: nn.Sequential(nn.Linear(5, 6), normkit.BatchNorm1d(6, renorm=True),
                                           nn.Linear(6, 6), normkit.BatchNorm1d(6, virtual_batch_size=5),
                                           nn.Linear(6, 6), normkit.BatchNorm1d(6, unbiased_running_var=False,
                                                                                adjustment=lambda s: (1.5, 0.5))),
                     (10, 5), 3, id="renorm-ghost-adjustment"),
        pytest.param(lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2, padding_mode="reflect"),
                                           nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3, groups=6, bias=False),
                                           normkit.BatchNorm2d(6)), (4, 4, 8, 8), 2, id="grouped-dilated-reflect"),
        # A transposed conv's weight is (in, out / groups, *k): the scale goes on its second axis, per group.
        pytest.param(lambda: nn.Sequential(nn.ConvTranspose1d(4, 6, 3, groups=2, stride=2), nn.BatchNorm1d(6)),
                     (4, 4, 7), 1, id="conv-transpose1d-groups"),
        pytest.param(lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3, bias=False, output_padding=1, stride=2),
                                           normkit.BatchNorm2d(4), nn.ReLU(),
                                           nn.ConvTranspose2d(4, 4, 1, groups=4), nn.BatchNorm2d(4, affine=False)),
                     (4, 3, 5, 5), 2, id="conv-transpose2d"),
        pytest.param(lambda: nn.Sequential(nn.ConvTranspose3d(2, 6, 2, groups=2, dilation=2), normkit.BatchNorm3d(6)),
                     (4, 2, 3, 3, 3), 1, id="conv-transpose3d-groups"),
        pytest.param(lambda: nn.Sequential(PlainSubclassConv(3, 4, 3), nn.BatchNorm2d(4)), (4, 3, 6, 6), 1,
                     id="subclass-not-overriding-forward"),
        pytest.param(lambda: nn.Sequential(nn.Linear(5, 6), normkit.BatchNorm(6, axis=-1, bias=False)),
                     (4, 7, 5), 1, id="features-last-after-linear"),
        pytest.param(lambda: nn.Sequential(nn.Linear(5, 6),
                                           normkit.keras.BatchNormalization(momentum=0.5, dtype=torch.float64)),
                     (10, 5), 1, id="keras"),
        pytest.param(lambda: nn.Sequential(nn.Linear(5, 6),
                                           normkit.keras.BatchNormalization(momentum=0.5, dtype=torch.float64)),
                     (4, 7, 5), 1, id="keras-features-last-3d"),
        # A one-axis spec is the int's layer (Keras users write axis=[1]); a tuple is never == 1, so it stayed.
        pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), normkit.BatchNorm(4, axis=(1,)),
                                           nn.Conv2d(4, 4, 1), normkit.BatchNorm((4,), axis=[1])),
                     (4, 3, 6, 6), 2, id="one-axis-tuple"),
        pytest.param(lambda: nn.Sequential(nn.Linear(5, 6), normkit.BatchNorm(6, axis=(-1,))),
                     (4, 7, 5), 1, id="one-axis-tuple-features-last"),
    ]
    return cases


@pytest.mark.parametrize("make,shape,count", fold_cases())
def test_folded_model_computes_the_eval_output(make, shape, count):
    torch.manual_seed(12)
    model = randomize(make().double(), shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 2
    expected = model(x)

    folded, names = fold_batch_norm(model)

    assert len(names) == count and all(isinstance(folded.get_submodule(n), nn.Identity) for n in names)
    assert not any(isinstance(m, BN_CLASSES) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-10)
    # The input model is untouched: same layers, same tensors.
    assert not any(isinstance(m, nn.Identity) for m in model.modules())
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_fold_against_the_float64_formula():
    torch.manual_seed(13)
    model = randomize(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).double(), (4, 2, 5, 5))
    w, b = as64(model[0].weight).copy(), as64(model[0].bias).copy()  # (a float64 tensor's view otherwise)
    bn = model[1]
    s = as64(bn.weight) / np.sqrt(as64(bn.running_var) + bn.eps)
    folded, names = fold_batch_norm(model, inplace=True)
    assert folded is model and names == ["1"] and isinstance(model[1], nn.Identity)
    np.testing.assert_allclose(as64(model[0].weight), w * s[:, None, None, None], rtol=1e-14)
    np.testing.assert_allclose(as64(model[0].bias), (b - as64(bn.running_mean)) * s + as64(bn.bias), rtol=1e-14)


def test_fold_float32_model_and_nested_containers():
    torch.manual_seed(14)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), normkit.BatchNorm2d(4), nn.ReLU())
            self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))])

        def forward(self, x):
            return self.blocks[0](self.stem(x))

    model = randomize(Net(), (8, 3, 6, 6))
    x = torch.randn(8, 3, 6, 6) * 3 + 2
    folded, names = fold_batch_norm(model)
    assert names == ["stem.1", "blocks.0.1"]
    assert folded.stem[0].bias.dtype == torch.float32 and folded.stem[0].bias.requires_grad
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)

    # A frozen conv (requires_grad=False: a fine-tuned model's fixed backbone) gets a bias that is frozen as well.
    model.stem[0].requires_grad_(False)
    folded, _ = fold_batch_norm(model)
    assert folded.stem[0].bias is not None and not folded.stem[0].bias.requires_grad
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_bn_layers_that_cannot_fold_stay():
    shared = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(
        nn.BatchNorm2d(3),                                                 # first: nothing before it
        nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3),                  # after an activation
        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False),  # batch statistics in eval
        nn.Conv2d(3, 3, 1), normkit.BatchNorm(3, axis=-1),                 # normalizes the width, not channels
        shared, nn.BatchNorm2d(3), shared,                                 # the conv is used twice
        parametrizations.weight_norm(nn.Conv2d(3, 3, 1)), nn.BatchNorm2d(3),  # weight recomputed each call
        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3),                             # foldable
    ).double()
    model = randomize(model, (4, 3, 3, 3))
    x = torch.randn(2, 3, 3, 3).double()
    folded, names = fold_batch_norm(model)
    assert names == ["14"]
    assert [i for i, m in enumerate(folded) if isinstance(m, BN_CLASSES)] == [0, 3, 5, 7, 9, 12]
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-10)

    with pytest.warns(FutureWarning):  # old-style weight_norm: a pre-forward hook recomputes the weight
        model = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 3, 1)), nn.BatchNorm2d(3)).eval()
    model(x.float())  # (such a model cannot be deep-copied after a call: torch's limitation; inplace=True can)
    assert fold_batch_norm(model, inplace=True)[1] == []


def test_a_bn_over_another_axis_than_the_linear_outputs_stays():
    """Linear on (N, L, F) sequences, then BatchNorm1d(L): BN's axis 1 holds the L positions, not the
    Linear's outputs (its last axis); no weight can fold it (num_features 4 is not out_features 6)."""
    torch.manual_seed(18)
    model = randomize(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(4)).double(), (8, 4, 5))
    x = torch.randn(8, 4, 5, dtype=torch.float64)
    folded, names = fold_batch_norm(model)
    assert names == [] and isinstance(folded[1], nn.BatchNorm1d)
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm2d(4)), (8, 4, 3, 5)),
    (lambda: nn.Sequential(nn.Linear(5, 4), normkit.BatchNorm2d(4)), (8, 4, 3, 5)),
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm3d(4)), (8, 4, 2, 3, 5)),
    (lambda: nn.Sequential(nn.Linear(5, 4), normkit.BatchNorm3d(4)), (8, 4, 2, 3, 5)),
    # Unbatched convolutions: (C, H, W) in, (4, H, W) out, whose channels are axis 0, not the BN's axis 1.
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4)), (3, 4, 5)),
    (lambda: nn.Sequential(nn.Conv3d(3, 4, 1), normkit.BatchNorm2d(4)), (3, 4, 5, 6)),
], ids=["linear-bn2d", "linear-normkit-bn2d", "linear-bn3d", "linear-normkit-bn3d", "conv2d-bn1d", "conv3d-bn2d"])
def test_a_batch_norm_of_another_rank_than_the_layer_s_outputs_stays(make, shape):
    """A BatchNorm2d takes rank 4 only: after a Linear (whose outputs are (N, C) where they are a BN's channels)
    or a Conv3d (batched: rank 5) its channels are not the layer's outputs, even when the counts agree (4 and 4
    here); folded, the layer's outputs were scaled by the channels' factors and the output changed by O(1)."""
    torch.manual_seed(21)
    model = randomize(make().double(), shape)
    x = torch.randn(*shape, dtype=torch.float64)
    folded, names = fold_batch_norm(model)
    assert names == [] and type(folded[1]) is type(model[1])
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


def test_a_keras_layer_built_on_sequences_with_axis_1_after_a_linear_stays():
    """The Keras layer knows the rank it was built for: axis=1 of (N, L, F) Linear outputs is L, which folded into
    the Linear's F outputs (L == F) and changed the output before."""
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(3, 5), normkit.keras.BatchNormalization(axis=1, momentum=0.5)).double()
    for _ in range(3):
        model(torch.randn(8, 5, 3, dtype=torch.float64) * 2 + 1)
    model.eval()
    x = torch.randn(8, 5, 3, dtype=torch.float64)
    folded, names = fold_batch_norm(model)
    assert names == []
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("build", ["first call", "build()"])
def test_a_keras_layer_built_in_eval_mode_folds(build):
    """A Keras layer built while its model is in eval mode (a pretrained model's first call is often inference)
    is in eval mode throughout: its BatchNorm underneath was built in training mode, so fold_batch_norm refused the
    eval-mode model. Folded, it computes the float64 formula with the weights Keras' set_weights gave."""
    torch.manual_seed(20)
    model = nn.Sequential(nn.Linear(3, 4), normkit.keras.BatchNormalization(epsilon=0.25, dtype=torch.float64)).double().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    if build == "first call":
        model(x)
    else:
        model[1].build((None, 4))
    assert not any(module.training for module in model.modules())
    rng = np.random.default_rng(20)
    gamma, beta, mean, var = rng.uniform(0.5, 1.5, 4), rng.normal(0, 1, 4), rng.normal(0, 1, 4), rng.uniform(1, 2, 4)
    model[1].set_weights([gamma, beta, mean, var])
    linear = as64(x) @ as64(model[0].weight).T + as64(model[0].bias)
    expected = (linear - mean) / np.sqrt(var + 0.25) * gamma + beta
    folded, names = fold_batch_norm(model)
    assert names == ["1"]
    np.testing.assert_allclose(as64(folded(x)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("linear_dtype,policy,folds", [
    (torch.float32, "float32", True), (torch.float32, "float64", False), (torch.float32, "float16", False),
    (torch.float32, "bfloat16", False), (torch.float32, "mixed_float16", False), (torch.float32, "mixed_bfloat16", False),
    (torch.float16, "float32", True), (torch.float16, "mixed_float16", True), (torch.float16, "bfloat16", False),
])
def test_a_keras_layer_whose_policy_casts_the_outputs_stays(linear_dtype, policy, folds):
    """A Keras layer casts its input to its dtype policy (float64 after a float32 Linear, float16 under
    mixed_float16): folded into the Linear, the output kept the Linear's dtype, so the next layer got another dtype
    (a float16 one then refused it). Where the policy keeps the Linear's dtype it folds; the oracle is the unfolded
    model."""
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(3, 4).to(linear_dtype), normkit.keras.BatchNormalization(momentum=0.5,
                                                                                           dtype=policy))
    for _ in range(3):
        model(torch.randn(8, 3, dtype=linear_dtype) * 2 + 1)
    model.eval()
    x = torch.randn(6, 3, dtype=linear_dtype)
    folded, names = fold_batch_norm(model)
    assert names == (["1"] if folds else [])
    expected, got = model(x), folded(x)
    assert got.dtype == expected.dtype
    if folds:  # (one rounding of the folded weights in the Linear's dtype, against Keras' float32 math)
        tolerance = 1e-5 if linear_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_lazy_model_restored_by_load_state_dict_folds():
    """Lazy modules sized by a loaded state_dict (the usual way to restore a lazy model) keep their sizing hook, and
    torch.nn's lazy BN its num_features 0, until their first call: taken for a user's hook and a size mismatch,
    nothing folded. A hook of the user's still keeps its layer."""
    torch.manual_seed(22)

    def lazy_model():
        return nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5),
                             normkit.LazyBatchNorm1d(), nn.LazyLinear(3), nn.LazyBatchNorm1d()).double()

    trained = lazy_model()
    for _ in range(3):
        trained(torch.randn(8, 3, 6, 6, dtype=torch.float64) * 2 + 1)
    randomize(trained, (8, 3, 6, 6))
    restored = lazy_model()
    restored.load_state_dict(trained.state_dict())
    restored[6].register_forward_hook(lambda module, args, output: None)
    restored.eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    folded, names = fold_batch_norm(restored)
    assert names == ["1", "5"]
    for _ in range(2):  # (the first call turns the lazy layers into their eager classes)
        torch.testing.assert_close(folded(x), trained(x), rtol=1e-12, atol=1e-12)
    assert type(folded[0]) is nn.Conv2d and type(folded[4]) is nn.Linear


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: a torch.nn BN subclass whose forward adds an activation."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class StandardizedConv(nn.Conv2d):
    """A weight-standardized conv (BiT's StdConv2d pattern): it rescales its weight per output channel in forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class TappedSequential(nn.Sequential):
    """A Sequential whose own forward also uses the conv's output: the children's order proves nothing."""

    def forward(self, x):
        h = self[0](x)
        return self[1](h) + h


def double_output(module, args, output):
    return output * 2


def shift_input(module, args):
    return (args[0] + 1,)


def with_hook(index, register, hook):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    getattr(model[index], register)(hook)
    return model


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4)),
    lambda: nn.Sequential(StandardizedConv(3, 4, 3), nn.BatchNorm2d(4)),
    lambda: TappedSequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
    lambda: with_hook(0, "register_forward_hook", double_output),
    lambda: with_hook(1, "register_forward_pre_hook", shift_input),
], ids=["bn-subclass-forward", "conv-subclass-forward", "sequential-subclass-forward", "conv-hook", "bn-pre-hook"])
def test_layers_whose_computation_is_not_the_formulas_stay(make):
    """Folding assumes conv -> BN as torch.nn computes them, in Sequential's order: anything else must stay."""
    torch.manual_seed(17)
    model = randomize(make().double(), (4, 3, 6, 6))
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    folded, names = fold_batch_norm(model)
    assert names == []
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


def test_layers_whose_instance_has_its_own_forward_stay():
    """A forward given to one instance (a patch that adds an activation to a BN, or standardizes one conv's weight)
    computes something else, as a subclass's does: folded, the BN's activation was dropped."""
    torch.manual_seed(23)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double(), (4, 3, 5, 5))
    bn = model[1]
    bn.forward = lambda input: torch.relu(nn.BatchNorm2d.forward(bn, input))
    folded, names = fold_batch_norm(model, inplace=True)
    assert names == [] and folded[1] is bn

    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double(), (4, 3, 5, 5))
    conv = model[0]
    conv._conv_forward = lambda input, weight, bias: nn.Conv2d._conv_forward(
        conv, input, (weight - weight.mean((1, 2, 3), keepdim=True)) / weight.std((1, 2, 3), keepdim=True), bias)
    expected = model(x)
    folded, names = fold_batch_norm(model, inplace=True)
    assert names == []
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=0)


class BasicBlock(nn.Module):
    """A ResNet basic block: conv/BN pairs held as attributes, so only the downsample Sequential shows its order."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), normkit.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.downsample(x))


class Branches(nn.Module):
    """Calls no fold can keep: a conv feeding two BNs, a BN called twice, a conv whose weight the graph reads."""

    def __init__(self):
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.conv2, self.twice = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.conv3, self.read = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        y = self.twice(self.twice(self.conv2(self.a(y) + self.b(y))))
        return self.read(self.conv3(y)) + self.conv3.weight.sum()


def test_a_traced_model_folds_where_its_graph_shows_the_conv_feeds_the_bn_alone():
    """torch.fx tracing flattens Sequentials into plain modules, so a traced model folded nothing; its graph shows
    the data flow itself. Every pair of a ResNet's blocks folds there (attributes included), as in a traced model
    held by another; what the graph shows cannot fold stays. Oracle: the unfolded model's float64 eval output."""
    torch.manual_seed(25)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    model = randomize(nn.Sequential(BasicBlock(3, 8, 2), BasicBlock(8, 8, 1)).double(), (8, 3, 9, 9))
    traced = torch.fx.symbolic_trace(model).eval()
    folded, names = fold_batch_norm(traced)
    assert names == ["0.bn1", "0.bn2", "0.downsample.1", "1.bn1", "1.bn2", "1.downsample.1"]
    assert not any(isinstance(m, BN_CLASSES) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)  # (the copy was folded)

    outer = nn.Sequential(torch.fx.symbolic_trace(model), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)).double()
    outer = randomize(outer, (8, 3, 9, 9))
    folded, names = fold_batch_norm(outer)
    assert names == ["0.0.bn1", "0.0.bn2", "0.0.downsample.1", "0.1.bn1", "0.1.bn2", "0.1.downsample.1", "2"]
    torch.testing.assert_close(folded(x), outer(x), rtol=0, atol=1e-10)

    model = randomize(Branches().double(), (8, 3, 4, 4))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    folded, names = fold_batch_norm(torch.fx.symbolic_trace(model).eval())
    assert names == []
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)

    class SequentialLeaves(torch.fx.Tracer):  # (a Sequential called whole, whose BN is also called alone)
        def is_leaf_module(self, module, name):
            return isinstance(module, nn.Sequential) or super().is_leaf_module(module, name)

    class Whole(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.seq = nn.Conv2d(3, 3, 1), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))

        def forward(self, x):
            return self.seq(x) + self.seq[1](self.conv(x))

    model = randomize(Whole().double(), (8, 3, 4, 4))
    folded, names = fold_batch_norm(torch.fx.GraphModule(model, SequentialLeaves().trace(model)).eval())
    assert names == []
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


def test_a_conv_whose_weight_is_tied_to_another_layer_stays():
    """Folding scales the weight in place: a weight shared with another layer would change that layer too."""
    torch.manual_seed(16)
    first, second = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    second.weight = first.weight
    linear_a, linear_b = nn.Linear(4, 4), nn.Linear(4, 4)
    linear_b.bias = linear_a.bias
    model = nn.Sequential(first, nn.BatchNorm2d(4), nn.ReLU(), second, nn.Flatten(2), nn.AdaptiveAvgPool1d(1),
                          nn.Flatten(), linear_a, nn.BatchNorm1d(4), linear_b).double()
    model = randomize(model, (8, 4, 5, 5))
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    folded, names = fold_batch_norm(model)
    assert names == []
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


def test_fold_refuses_a_model_in_training_mode():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Dropout())
    with pytest.raises(ValueError, match=r"the model itself .* training mode.* model.eval\(\)"):
        fold_batch_norm(model)
    model.eval()
    model[2].train()
    with pytest.raises(ValueError, match=r"'2' \(Dropout\) is in training mode"):
        fold_batch_norm(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fold_batch_norm("model")


# ----------------------------------------------------------------------------- freeze_batch_norm


def test_frozen_layers_keep_running_statistics_after_train_and_get_no_gradient():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), normkit.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 5),
                          normkit.BatchNorm(5, axis=-1, renorm=True),
                          normkit.keras.BatchNormalization(dtype=torch.float64)).double()
    randomize(model, (6, 3, 7, 7))
    x = torch.randn(6, 3, 7, 7, dtype=torch.float64)
    expected = model(x)  # eval mode: running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}

    assert freeze_batch_norm(model) is model
    model.train()
    for _ in range(2):
        model.zero_grad()
        model(x * 1.5).square().sum().backward()  # other data: batch statistics would differ
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    for name, p in model.named_parameters():
        assert (p.grad is None) == name.startswith(("1.", "5.", "6.")), name
    assert model[6].trainable is False and model[1].frozen and model[5].frozen

    unfreeze_batch_norm(model)
    assert model[6].trainable and not model[1].frozen and all(p.requires_grad for p in model.parameters())
    model(x * 1.5)
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda params: torch.optim.AdamW(params, lr=0.1),
], ids=["sgd-momentum-decay", "adamw"])
def test_no_optimizer_moves_a_frozen_layer(make_optimizer):
    """Gradients from before freezing, zeroed but kept (zero_grad(set_to_none=False)), still feed weight decay and
    momentum: freezing drops them, so optimizers skip the layer."""
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(3, 4), normkit.BatchNorm1d(4), normkit.keras.BatchNormalization())
    optimizer = make_optimizer(model.parameters())
    model(torch.randn(8, 3)).square().sum().backward()
    optimizer.step()
    freeze_batch_norm(model)  # between a backward and the next step, with gradients present
    frozen = {name: p.clone() for name, p in model.named_parameters() if not name.startswith("0.")}
    linear = model[0].weight.clone()
    for _ in range(2):
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        model(torch.randn(8, 3)).square().sum().backward()
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert not torch.equal(model[0].weight, linear)  # the rest of the model trains


def test_freeze_refuses_torch_layers_and_models_without_normkit_bn():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), normkit.BatchNorm2d(3), nn.Sequential(nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match=r"'2\.0' are torch.nn BN layers.*convert_batch_norm\(model, 'normkit'\)"):
        freeze_batch_norm(model)
    assert not model[1].frozen  # nothing frozen
    freeze_batch_norm(convert_batch_norm(model, "normkit"))
    assert model[1].frozen and model[2][0].frozen
    with pytest.raises(ValueError, match="nothing to freeze"):
        freeze_batch_norm(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="nothing to unfreeze"):
        unfreeze_batch_norm(nn.Sequential(nn.BatchNorm1d(2)))


@pytest.mark.parametrize("compile_with", ["script", "trace"])
@pytest.mark.parametrize("tool", [
    lambda model: convert_batch_norm(model, "normkit"), lambda model: convert_batch_norm(model, "torch"),
    synchronize_batch_norm, fold_batch_norm, freeze_batch_norm, unfreeze_batch_norm,
    lambda model: recalibrate_running_stats(model, [torch.randn(4, 3, 6, 6)]),
    normkit.replace_all_batch_norm_modules_])
@pytest.mark.parametrize("where", ["model", "child"])
def test_tools_refuse_torchscript_modules_holding_batch_norm(tool, compile_with, where):
    """A TorchScript module's layers are compiled copies: fold and convert returned it unchanged without a word (fold
    said nothing could fold), the others said it had no BN layer. Each tool refuses it, saying what to do."""
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    scripted = (torch.jit.script(eager) if compile_with == "script"
                else torch.jit.trace(eager, torch.randn(2, 3, 6, 6)))
    model = scripted if where == "model" else nn.Sequential(scripted, nn.ReLU()).eval()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    label = "the model itself" if where == "model" else "'0'"
    with pytest.raises(TypeError, match=f"{label} is a TorchScript module.*on the eager model first, then script"):
        tool(model)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_tools_accept_a_torchscript_module_without_batch_norm():
    """A scripted activation in an eager model is no reason to refuse: the eager BN layers fold as before."""
    torch.manual_seed(19)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), torch.jit.script(nn.ReLU())).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    folded, names = fold_batch_norm(model)
    assert names == ["1"]
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-12)


class _Positive(nn.Module):
    """A parametrization a user puts on BN's scale to keep it positive (learned through ``original``)."""

    def forward(self, weight):
        return torch.nn.functional.softplus(weight)


def test_freeze_and_unfreeze_reach_parametrized_weight_and_bias():
    """A parametrized weight is computed from the parametrization's Parameters: freezing it raised RuntimeError
    ("only change requires_grad flags of leaf variables"), and its ``original`` would have trained on."""
    from torch.nn.utils import parametrize
    torch.manual_seed(20)
    bn = normkit.BatchNorm2d(4)
    parametrize.register_parametrization(bn, "weight", _Positive())
    parametrize.register_parametrization(bn, "bias", _Positive())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn)
    model(torch.randn(8, 3, 6, 6))  # running statistics of its own
    x = torch.randn(5, 3, 6, 6)
    expected = model.eval()(x).detach()
    buffers = {key: value.clone() for key, value in bn.named_buffers()}
    freeze_batch_norm(model)
    model.train()
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.square().sum().backward()
    originals = [bn.parametrizations.weight.original, bn.parametrizations.bias.original]
    assert all(not p.requires_grad and p.grad is None for p in originals)
    assert model[0].weight.grad is not None  # the rest of the model trains
    assert all(torch.equal(value, buffers[key]) for key, value in bn.named_buffers())
    unfreeze_batch_norm(model)
    assert all(p.requires_grad for p in originals)
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in originals)


def _prune(layer):
    prune.l1_unstructured(layer, "weight", amount=0.5)
    return ["weight_orig"]


def _old_weight_norm(layer):
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(layer, "weight", dim=0)
    return ["weight_g", "weight_v"]


@pytest.mark.parametrize("reparametrize", [_prune, _old_weight_norm], ids=["prune", "old-weight_norm"])
def test_freeze_reaches_the_parameters_a_hook_computes_the_weight_from(reparametrize):
    """torch.nn.utils.prune and the old-style weight_norm keep the weight as a tensor a pre-hook computes from
    weight_orig or weight_g/weight_v: those kept requires_grad=True in a frozen layer (counted as trainable, and
    DistributedDataParallel waits for their gradients)."""
    torch.manual_seed(26)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), normkit.BatchNorm2d(4))
    names = reparametrize(model[1])
    freeze_batch_norm(model)
    assert all(not getattr(model[1], name).requires_grad for name in names + ["bias"])
    unfreeze_batch_norm(model)
    assert all(getattr(model[1], name).requires_grad for name in names + ["bias"])


@pytest.mark.parametrize("reparametrize", [_prune, _old_weight_norm], ids=["prune", "old-weight_norm"])
@pytest.mark.parametrize("tool,bn", [
    (lambda m: convert_batch_norm(m, "normkit"), nn.BatchNorm2d), (lambda m: convert_batch_norm(m, "torch"),
                                                                   normkit.BatchNorm2d),
    (synchronize_batch_norm, nn.BatchNorm2d)], ids=["to-normkit", "to-torch", "synchronize"])
def test_a_layer_whose_weight_a_hook_computes_keeps_its_tensors(reparametrize, tool, bn):
    """The new layer held neither weight_orig (weight_g/weight_v) nor the mask: the carried pruning hook failed on
    the first call ("no attribute 'weight_mask'") and the state_dict lost them. They go with the layer, the same
    tensors, and the model computes as before (synchronize_batch_norm: local statistics without a process group)."""
    torch.manual_seed(27)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn(4))
    names = reparametrize(model[1])
    before = {key: value for key, value in model.state_dict(keep_vars=True).items()}
    x = torch.randn(4, 3, 5, 5)
    expected = model.eval()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (synchronized without a process group: said once)
        tool(model)
        got = model(x)
    assert type(model[1]) is not bn
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[key] is before[key] for key in before)
    assert all(getattr(model[1], name) is before["1." + name] for name in names)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm2d(4), lambda: normkit.BatchNorm2d(4)],
                         ids=["torch.nn.BatchNorm2d", "normkit.BatchNorm2d"])
def test_a_half_precision_layer_with_a_parametrized_weight_recalibrates(make):
    """The float32 copies covered the layer's own Parameters only: a parametrized weight, computed from its
    parametrization's bfloat16 ``original``, stayed bfloat16 beside float32 buffers and ATen refused the call."""
    from torch.nn.utils import parametrize
    torch.manual_seed(22)
    layer = make()
    parametrize.register_parametrization(layer, "weight", _Positive())
    model = nn.Sequential(layer).to(torch.bfloat16)
    original = layer.parametrizations.weight.original
    centers = torch.tensor([3.0, 10.0, -1.0, 0.5]).view(1, 4, 1, 1)
    batches = [(torch.randn(16, 4, 4, 4) * 0.5 + centers).to(torch.bfloat16) for _ in range(20)]

    recalibrate_running_stats(model, batches)

    mean, var = average_stats([as64(x) for x in batches], (0, 2, 3))
    ulp = torch.finfo(torch.bfloat16).eps
    np.testing.assert_allclose(as64(layer.running_mean), mean, rtol=ulp)
    np.testing.assert_allclose(as64(layer.running_var), var, rtol=ulp)
    assert layer.parametrizations.weight.original is original and original.dtype == torch.bfloat16
    assert layer.running_mean.dtype == torch.bfloat16


@pytest.mark.parametrize("axis,num_features", [((1,), 4), ([1], 4), ((1,), (4,))])
def test_a_one_axis_tuple_converts_to_torch(axis, num_features):
    """axis=(1,) is axis=1: converting to torch.nn was refused with "axis=(1,) (torch.nn normalizes axis 1 only)"."""
    torch.manual_seed(23)
    layer = normkit.BatchNorm(num_features, axis=axis, momentum=0.3).double()
    model = nn.Sequential(layer)
    reference = nn.BatchNorm2d(4, momentum=0.3).double()
    with torch.no_grad():
        for tensor in (layer.weight, layer.bias):
            tensor.uniform_(0.5, 2)
        reference.load_state_dict(layer.state_dict())
    convert_batch_norm(model, "torch", plain_as=nn.BatchNorm2d)
    assert type(model[0]) is nn.BatchNorm2d and model[0].num_features == 4 and model[0].weight is layer.weight
    for _ in range(2):  # training: outputs and running statistics as torch.nn's own layer
        x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 2 + 1
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in model[0].state_dict().items())


@pytest.mark.parametrize("group", ["nccl", "gloo", [0, 1], (0,), 0])
def test_synchronize_refuses_a_backend_name_or_ranks_as_process_group(group):
    """A backend name or a list of ranks was set on every layer unchecked, and failed inside torch.distributed at the
    first training step once a group was initialized. Refused before anything changes, with what to pass instead."""
    model = nn.Sequential(nn.BatchNorm1d(3), normkit.BatchNorm1d(3))
    with pytest.raises(TypeError, match=r"process_group must be None .*dist\.init_process_group\(backend\).*"
                                        r"dist\.new_group\(ranks\)"):
        synchronize_batch_norm(model, group)
    assert type(model[0]) is nn.BatchNorm1d and not model[1].synchronized and model[1].process_group is None


def test_tools_work_through_a_compiled_model():
    """docs/tools.md says a torch.compile'd model (OptimizedModule) works with every tool, its _orig_mod changed in
    place: folded, it computes the unfolded eval output; converted and frozen, its next compiled call uses the new
    frozen layer (no stale graph of the old one updating running statistics)."""
    torch.manual_seed(24)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double()
    compiled = torch.compile(model, backend="eager")
    for _ in range(2):
        compiled(torch.randn(4, 3, 6, 6, dtype=torch.float64) * 2 + 1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = compiled.eval()(x)
    folded, names = fold_batch_norm(compiled)
    assert names == ["_orig_mod.1"] and isinstance(model[1], nn.BatchNorm2d)  # (a copy: the input is untouched)
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-12)
    assert convert_batch_norm(compiled, "normkit") is compiled and type(model[1]) is normkit.BatchNorm2d
    freeze_batch_norm(compiled)
    buffers = {key: value.clone() for key, value in model[1].named_buffers()}
    torch.testing.assert_close(compiled.train()(x), expected, rtol=0, atol=1e-12)
    assert all(torch.equal(value, buffers[key]) for key, value in model[1].named_buffers())


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d as torchvision defines it (which cannot be installed here): BN's eval map in
    four buffers, no parameters, inference whatever the mode; a state_dict's num_batches_tracked is dropped."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


def frozen_from(bn):
    """A FrozenBatchNorm2d holding a trained torch.nn BatchNorm2d's statistics, as torchvision's detection models
    load a classification backbone's (torchvision.ops.misc.FrozenBatchNorm2d loads BatchNorm2d's state_dict)."""
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps).to(bn.running_mean.dtype)
    frozen.load_state_dict(bn.state_dict())
    return frozen


def frozen_cases():
    """Trained torch.nn layers whose BatchNorm2d becomes a FrozenBatchNorm2d (the unfolded model's output is the
    oracle, and torch.nn's eval BN the FrozenBatchNorm2d's)."""
    return [
        pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                           nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6, eps=1e-3)),
                     (6, 3, 7, 7), ["1", "4"], id="conv-with-and-without-bias"),
        pytest.param(lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.BatchNorm2d(6),
                                           nn.Conv2d(6, 6, 3, groups=6, padding=1, bias=False), nn.BatchNorm2d(6)),
                     (4, 4, 6, 6), ["1", "3"], id="grouped-depthwise"),
        pytest.param(lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2), nn.BatchNorm2d(6)),
                     (4, 4, 5, 5), ["1"], id="conv-transpose2d-groups"),
        # torchvision's Conv2dNormActivation: a Sequential subclass keeping Sequential's forward, inside another
        pytest.param(lambda: nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()),
                                           nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))),
                     (4, 3, 6, 6), ["0.1", "1.1"], id="nested"),
    ]


def _freeze_batch_norm_2d(model):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, frozen_from(child))
    return model


@pytest.mark.parametrize("make,shape,names", frozen_cases())
def test_torchvision_s_frozen_batch_norm_folds(make, shape, names):
    """torchvision's detection backbones (and detectron2's) hold FrozenBatchNorm2d, not BatchNorm2d: it did not fold."""
    torch.manual_seed(31)
    trained = randomize(make().double(), shape)
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 2
    expected = trained(x)  # torch.nn's eval BN: what the frozen layers compute too
    model = _freeze_batch_norm_2d(trained).eval()
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == len(names)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)

    folded, folded_names = fold_batch_norm(model)

    assert folded_names == names and all(isinstance(folded.get_submodule(n), nn.Identity) for n in names)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-10)


def test_frozen_batch_norm_folds_by_the_float64_formula_in_float32():
    torch.manual_seed(32)
    trained = randomize(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, eps=1e-3)), (4, 2, 5, 5))
    model = _freeze_batch_norm_2d(trained).eval()
    w, b = as64(model[0].weight).copy(), as64(model[0].bias).copy()
    frozen = model[1]
    s = as64(frozen.weight) / np.sqrt(as64(frozen.running_var) + 1e-3)
    x = torch.randn(4, 2, 5, 5)
    expected = model(x)
    folded, names = fold_batch_norm(model, inplace=True)
    assert names == ["1"] and folded[0].weight.dtype == torch.float32
    np.testing.assert_allclose(as64(folded[0].weight), w * s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(as64(folded[0].bias), (b - as64(frozen.running_mean)) * s + as64(frozen.bias),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


class LooksFrozen(nn.Module):
    """DETR's FrozenBatchNorm2d: the same buffers, but eps is a constant inside its forward, no attribute."""

    def __init__(self, n):
        super().__init__()
        for name, value in (("weight", torch.ones(n)), ("bias", torch.zeros(n)), ("running_mean", torch.zeros(n)),
                            ("running_var", torch.ones(n))):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale)


LooksFrozen.__name__ = "FrozenBatchNorm2d"  # (the name alone does not make it one)


def _with_own_forward(frozen):
    frozen.forward = lambda x: torch.relu(FrozenBatchNorm2d.forward(frozen, x))
    return frozen


def _hooked_frozen(frozen):
    frozen.register_forward_hook(lambda module, args, output: output * 2)
    return frozen


@pytest.mark.parametrize("make,shape", [
    # FrozenBatchNorm2d takes 4-D inputs only: after a Linear or a Conv1d its channels are not the layer's outputs.
    # (its (1, C, 1, 1) buffers broadcast over the Linear's (N, 4, 3, 4) outputs' axis 1, and over the Conv1d's
    # (4, 4, 5) outputs' batch axis: models that run, and whose scale is not per output channel)
    (lambda: nn.Sequential(nn.Linear(5, 4), frozen_from(nn.BatchNorm2d(4))), (2, 4, 3, 5)),
    (lambda: nn.Sequential(nn.Conv1d(3, 4, 1), frozen_from(nn.BatchNorm2d(4))), (4, 3, 5)),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), _with_own_forward(frozen_from(nn.BatchNorm2d(4)))), (2, 3, 4, 5)),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), _hooked_frozen(frozen_from(nn.BatchNorm2d(4)))), (2, 3, 4, 5)),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), LooksFrozen(4)), (2, 3, 4, 5)),
    # float32 buffers after a float16 conv: its arithmetic promotes, the output is float32 (folded, float16)
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1).half(), frozen_from(nn.BatchNorm2d(4))), (2, 3, 4, 5)),
], ids=["linear", "conv1d", "own-forward", "hooked", "detr-style-no-eps", "promoting-dtype"])
def test_frozen_batch_norm_that_cannot_fold_stays(make, shape):
    torch.manual_seed(33)
    model = make().eval()
    with torch.no_grad():
        for buffer in model[1].buffers():
            buffer.uniform_(0.5, 1.5)
    x = torch.randn(*shape, dtype=model[0].weight.dtype)
    try:
        expected = model(x)
    except RuntimeError:
        expected = None  # (float16 convolutions on a CPU without them: what folds is decided all the same)
    folded, names = fold_batch_norm(model)
    assert names == [] and type(folded[1]) is type(model[1])
    if expected is not None:
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=0)


def test_folded_names_come_in_the_model_s_order():
    """"The qualified names of the folded BN layers, in order": they came container by container, so a nested
    Sequential's BN (here first in the model) was listed after the outer Sequential's."""
    torch.manual_seed(25)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                          nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), normkit.BatchNorm2d(4)), nn.ReLU()),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).double()
    model(torch.randn(4, 3, 5, 5, dtype=torch.float64))
    model.eval()
    in_model_order = [name for name, module in model.named_modules() if isinstance(module, BN_CLASSES)]
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    folded, names = fold_batch_norm(model)
    assert names == in_model_order == ["0.1", "2", "3.0.1", "5"]
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-12)


def test_freeze_refuses_torch_subclasses_without_sending_the_user_to_convert():
    """A parametrized torch.nn BN is a subclass (ParametrizedBatchNorm2d), which convert_batch_norm leaves alone: the
    advice "convert them first" led back to the same refusal. The message says what works."""
    from torch.nn.utils import parametrize
    bn = nn.BatchNorm2d(4)
    parametrize.register_parametrization(bn, "weight", _Positive())
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn, normkit.BatchNorm2d(4))
    assert convert_batch_norm(model, "normkit")[1] is bn  # (left alone, as documented)
    with pytest.raises(ValueError, match=r"'1' \(ParametrizedBatchNorm2d\) derive from torch\.nn's BN classes.*"
                                         r"nothing was frozen.*remove_parametrizations"):
        freeze_batch_norm(model)
    assert not model[2].frozen
    parametrize.remove_parametrizations(bn, "weight")  # the advice, followed, works
    convert_batch_norm(model, "normkit")
    parametrize.register_parametrization(model[1], "weight", _Positive())
    freeze_batch_norm(model)
    assert model[1].frozen and model[2].frozen
