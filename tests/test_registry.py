"""Norms chosen by name (normkit.registry), and the renorm paper's clipping schedule the `renorm` name uses."""

import math

import numpy as np
import pytest
import torch

import normkit
from normkit.registry import NORM_NAMES, create_norm, is_norm_layer
from normkit.stats import RenormClipping


@pytest.mark.parametrize("step,expected", [
    (0, (1.0, 1.0, 0.0)), (5000, (1.0, 1.0, 0.0)),                       # plain BN for 5,000 steps
    (15000, (1 / (1 + 2 * 10 / 35), 1 + 2 * 10 / 35, 5 * 10 / 20)),      # both relaxing linearly
    (25000, (1 / (1 + 2 * 20 / 35), 1 + 2 * 20 / 35, 5.0)),              # dmax 5 reached at 25,000
    (40000, (1 / 3, 3.0, 5.0)), (10 ** 6, (1 / 3, 3.0, 5.0)),            # rmax 3 at 40,000
])
def test_paper_schedule_is_ioffe_2017(step, expected):
    """(rmin, rmax, dmax) at a step, from the paper's numbers (section 4: 5k, 25k and 40k steps)."""
    for actual, wanted in zip(RenormClipping.paper_schedule().at(step), expected, strict=True):
        assert math.isclose(actual, wanted, rel_tol=1e-12)
    for actual, wanted in zip(RenormClipping.paper_schedule(0.02).at(step * 0.02), expected, strict=True):
        assert math.isclose(actual, wanted, rel_tol=1e-12)


def test_a_layer_with_the_paper_schedule_pickles():
    """The schedule is made of Ramp objects, not closures: torch.save(model) works."""
    import io
    import pickle

    layer = normkit.BatchNorm(3, renorm=True, renorm_clipping=RenormClipping.paper_schedule(0.02))
    torch.save(layer, io.BytesIO())
    copy = pickle.loads(pickle.dumps(layer))
    assert copy.renorm_clipping.at(300) == layer.renorm_clipping.at(300)


def test_paper_schedule_refuses_a_scale_that_is_not_positive():
    with pytest.raises(ValueError, match="scale must be positive"):
        RenormClipping.paper_schedule(0)


def test_registry_renorm_is_plain_bn_before_the_schedule_starts():
    """r clipped to 1 and d to 0: the first steps of `renorm` train exactly as BN (its running variance
    differs: renorm averages standard deviations, see docs/decisions.md)."""
    torch.manual_seed(0)
    renorm, plain = create_norm("renorm", 5, rank=2).double(), normkit.BatchNorm(5).double()
    # The renorm averages (Keras' initial 0 and 1) move at BN's momentum 0.1, not Keras' 0.01: r and d must
    # follow a short run's weights once the schedule starts.
    renorm_mean, renorm_stddev = np.zeros(5), np.ones(5)
    for _ in range(3):
        x = torch.randn(16, 5, dtype=torch.float64) * 3 + 1
        torch.testing.assert_close(renorm(x), plain(x))
        renorm_mean += 0.1 * (x.numpy().mean(axis=0) - renorm_mean)
        renorm_stddev += 0.1 * (np.sqrt(x.numpy().var(axis=0) + 1e-5) - renorm_stddev)
    torch.testing.assert_close(renorm.running_mean, plain.running_mean)
    np.testing.assert_allclose(renorm.renorm_mean.numpy(), renorm_mean, rtol=1e-12)
    np.testing.assert_allclose(renorm.renorm_stddev.numpy(), renorm_stddev, rtol=1e-12)


@pytest.mark.parametrize("name", NORM_NAMES)
def test_every_name_builds_a_layer_for_conv_inputs(name):
    layer = create_norm(name, 4, rank=4)
    y = layer(torch.randn(16, 4, 3, 3))  # (ghost batches of 16)
    assert y.shape == (16, 4, 3, 3)
    assert is_norm_layer(layer) == (name != "none")


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown normalization 'bach'; choose one of none, batch"):
        create_norm("bach", 4, rank=2)


@pytest.mark.parametrize("option", ["affine", "elementwise_affine"])
@pytest.mark.parametrize("shape,normalized", [((5, 6), (6,)), ((5, 6, 3), (6, 3)), ((5, 6, 3, 2), (6, 3, 2))])
def test_layer_takes_either_affine_switch_at_every_rank(option, shape, normalized, rng):
    """'layer' is LayerNorm (dense) or GroupNorm(1, C) (conv): one option set must fit both, as the lab's
    --norm-option does for LeNet's conv and dense layers."""
    layer = create_norm("layer", 6, len(shape), **{option: False}).double()
    assert list(layer.parameters()) == []
    x = rng.normal(size=shape) * 2 + 1
    np.testing.assert_allclose(layer(torch.tensor(x)).numpy(), normkit.reference.layer_norm(x, normalized),
                               rtol=1e-9, atol=1e-10)


def test_layer_refuses_conflicting_or_foreign_options():
    with pytest.raises(ValueError, match="affine or elementwise_affine"):
        create_norm("layer", 6, 4, affine=False, elementwise_affine=False)
    with pytest.raises(ValueError, match="use 'group'"):
        create_norm("layer", 6, 4, num_groups=2)


@pytest.mark.parametrize("name", ["group", "torch"])
@pytest.mark.parametrize("num_features,error", [(6.0, TypeError), ((6,), TypeError), (-2, ValueError)])
def test_bad_num_features_are_named(name, num_features, error):
    with pytest.raises(error, match="num_features must be a positive int"):
        create_norm(name, num_features, rank=4)


def test_the_registry_is_part_of_the_top_level_api():
    """`import normkit` gives the registry (normkit.registry, normkit.create_norm), as it gives the layers and tools:
    before, normkit.registry was an AttributeError until something imported it."""
    import subprocess
    import sys
    code = ("import normkit, torch; layer = normkit.create_norm('group', 8, rank=4); "
            "assert normkit.registry.create_norm is normkit.create_norm; "
            "assert isinstance(layer, normkit.GroupNorm) and layer.num_groups == 4; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("step,expected", [
    (0, (1.0, 1.0, 0.0)), (100, (1.0, 1.0, 0.0)),                        # plain BN for 100 steps
    (300, (1 / (1 + 2 * 10 / 35), 1 + 2 * 10 / 35, 5 * 10 / 20)),        # both relaxing linearly
    (500, (1 / (1 + 2 * 20 / 35), 1 + 2 * 20 / 35, 5.0)),                # dmax 5 reached at step 500
    (800, (1 / 3, 3.0, 5.0)), (10 ** 5, (1 / 3, 3.0, 5.0)),              # rmax 3 at step 800
])
def test_renorm_name_runs_the_paper_schedule_at_one_fiftieth(step, expected):
    """`renorm`'s clipping is the paper's (5k, 25k, 40k steps) at 1/50 of its step counts, as the registry says."""
    clipping = create_norm("renorm", 3, rank=2).renorm_clipping
    for actual, wanted in zip(clipping.at(step), expected, strict=True):
        assert math.isclose(actual, wanted, rel_tol=1e-12)


@pytest.mark.parametrize("rank,cls", [(2, torch.nn.BatchNorm1d), (3, torch.nn.BatchNorm1d), (4, torch.nn.BatchNorm2d),
                                      (5, torch.nn.BatchNorm3d)])
def test_torch_name_is_torch_s_class_for_the_rank(rank, cls):
    """`torch` is the torch.nn baseline: (N, C) and (N, C, L) are BatchNorm1d's inputs, (N, C, H, W) 2d's, 3d above."""
    torch.manual_seed(1)
    layer = create_norm("torch", 4, rank=rank, momentum=0.3)
    assert type(layer) is cls
    reference = cls(4, momentum=0.3)
    x = torch.randn(8, 4, *[3] * (rank - 2))
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=0, atol=0)


def test_instance_name_is_affine_unless_told_otherwise(rng):
    """`instance` has gamma and beta as BN's layers do (torch.nn's InstanceNorm has none by default); affine=False
    drops them. Either way it normalizes each sample's channel over its spatial positions."""
    layer, bare = create_norm("instance", 3, rank=4), create_norm("instance", 3, rank=4, affine=False)
    assert [p.shape for p in layer.parameters()] == [(3,), (3,)] and list(bare.parameters()) == []
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        layer.bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
    layer.double()
    x = rng.normal(size=(2, 3, 4, 5)) * 2 + 1
    x_hat = (x - x.mean(axis=(2, 3), keepdims=True)) / np.sqrt(x.var(axis=(2, 3), keepdims=True) + 1e-5)
    expected = x_hat * np.array([1.0, 2.0, 3.0])[:, None, None] + np.array([0.5, -1.0, 0.0])[:, None, None]
    np.testing.assert_allclose(layer(torch.tensor(x)).detach().numpy(), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("spelling,cls", [("Batch", normkit.BatchNorm), ("GROUP", normkit.GroupNorm),
                                          ("re-norm", normkit.BatchNorm), ("Instance", normkit.InstanceNorm2d)])
def test_names_ignore_case_dashes_and_underscores(spelling, cls):
    """create_norm matches a name whatever its case, dashes and underscores (a config's "ReNorm" or "re_norm")."""
    assert type(create_norm(spelling, 4, rank=4)) is cls


def test_a_name_that_is_no_str_is_refused():
    """create_norm read str(name): None became the name "none" and built no normalization at all, silently."""
    for name in (None, 1, ("batch",)):
        with pytest.raises(TypeError, match="name must be a str"):
            create_norm(name, 4, rank=2)


@pytest.mark.parametrize("spelling", ["Instance", "INSTANCE", "in-stance"])
def test_the_lab_s_models_take_every_spelling_create_norm_takes(spelling):
    """LeNet normalizes its conv blocks with 'instance' and leaves its dense blocks unnormalized (instance norm has
    no dense form); it compared the exact string, so a spelling create_norm accepts built InstanceNorm for the
    dense blocks and failed. The MLP refuses 'instance' in any spelling with the lab's own message."""
    from normkit.lab.models import LeNet, build_model
    model = LeNet(norm=spelling)
    kinds = [type(module) for module in model if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear,
                                                                          torch.nn.Sigmoid, torch.nn.MaxPool2d,
                                                                          torch.nn.Flatten))]
    assert kinds == [normkit.InstanceNorm2d, normkit.InstanceNorm2d, torch.nn.Identity, torch.nn.Identity]
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="the mlp has none"):
        build_model("mlp", spelling)
