"""normkit.recalibrate_running_stats ("precise BN") against NumPy float64 averages of per-batch statistics."""

import numpy as np
import pytest
import torch
from torch import nn

import normkit
from normkit import recalibrate_running_stats


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
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        recalibrate_running_stats(lambda x: x, [torch.randn(4, 2)])


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
