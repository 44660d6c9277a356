"""Mixed precision (statistics in float32, output in the input dtype) and a robust variance."""

import math

import numpy as np
import pytest
import torch

import normkit
from normkit import reference as R

from oracle import assert_close, to_numpy

LOW = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("make", [
    lambda: normkit.BatchNorm2d(3), lambda: normkit.BatchNorm(3, axis=-1), lambda: normkit.BatchNorm(3, renorm=True),
    lambda: normkit.BatchNorm(3, virtual_batch_size=2), lambda: normkit.BatchNorm(3, affine=False),
], ids=["bn2d", "axis-1", "renorm", "ghost", "no-affine"])
@pytest.mark.parametrize("training", [True, False])
def test_half_input_float32_state_matches_reference(dtype, make, training, rng):
    layer = make().train(training)
    axis = layer.axis
    x_np = rng.normal(size=(4, 3, 5, 3)) * 4 + 10
    x = torch.tensor(x_np).to(dtype)
    ref_mean, ref_var = to_numpy(layer.running_mean), to_numpy(layer.running_var)
    if not training:
        with torch.no_grad():
            layer.running_mean.fill_(10.0), layer.running_var.fill_(16.0)
        ref_mean, ref_var = to_numpy(layer.running_mean), to_numpy(layer.running_var)
    y = layer(x)
    assert y.dtype == dtype
    for tensor in list(layer.parameters()) + list(layer.buffers()):
        assert tensor.dtype in (torch.float32, torch.long)
    # The reference sees the same (rounded) input values, in float64.
    x64 = to_numpy(x)
    kwargs = {}
    if layer.renorm:
        kwargs = dict(renorm_mean=np.zeros(3), renorm_stddev=np.ones(3), moving_stddev=np.ones(3),
                      renorm_clipping=(0.0, np.inf, np.inf), renorm_momentum=0.01)
    if layer.virtual_batch_size and training:
        kwargs["virtual_batch_size"] = layer.virtual_batch_size
    expected = R.batch_norm(x64, ref_mean, ref_var, to_numpy(layer.weight), to_numpy(layer.bias), training, 0.1,
                            1e-5, axis=axis, **kwargs)
    assert_close(y, expected, dtype)
    assert_close(layer.running_mean, ref_mean, torch.float32, rtol=1e-5)
    assert_close(layer.running_var, ref_var, torch.float32, rtol=1e-5)


@pytest.mark.parametrize("dtype", LOW)
def test_half_inputs_for_the_other_norms(dtype, rng):
    x = torch.tensor(rng.normal(size=(4, 4, 5, 5)) * 3 + 7).to(dtype)
    x64 = to_numpy(x)
    for layer, expected in ((normkit.GroupNorm(2, 4), R.group_norm(x64, 2)),
                            (normkit.LayerNorm((4, 5, 5)), R.layer_norm(x64, (4, 5, 5))),
                            (normkit.InstanceNorm2d(4, affine=True), R.instance_norm(x64))):
        y = layer(x)
        assert y.dtype == dtype and layer.weight.dtype == torch.float32
        assert_close(y, expected, dtype)


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "cpu-autocast"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm1d-running"])
def test_half_inputs_without_affine_parameters_get_float32_statistics(dtype, name, autocast, rng):
    """No parameters to say float32: ATen alone keeps a half-precision call's mean and 1/std in half precision
    (instance_norm normalizes with that rounded mean; every backward reads them). Data far from zero shows it.
    The CPU's autocast casts none of the norms, so under it the same holds (it went to ATen's half kernel there,
    float32 running statistics or not: those do not make ATen's kernel compute in float32, a weight does)."""
    shape = (3, 8, 64)
    x = torch.tensor(rng.normal(size=shape) * 0.1 + 50).to(dtype).requires_grad_()
    g = torch.tensor(rng.normal(size=shape)).to(dtype)
    x64, g64 = to_numpy(x), to_numpy(g)
    layer, forward, backward = {
        "LayerNorm": (normkit.LayerNorm(64, elementwise_affine=False), R.layer_norm(x64, 64),
                      R.layer_norm_backward(g64, x64, 64)),
        "GroupNorm": (normkit.GroupNorm(2, 8, affine=False), R.group_norm(x64, 2), R.group_norm_backward(g64, x64, 2)),
        "InstanceNorm1d": (normkit.InstanceNorm1d(8), R.instance_norm(x64), R.instance_norm_backward(g64, x64)),
        "InstanceNorm1d-running": (normkit.InstanceNorm1d(8, track_running_stats=True), R.instance_norm(x64),
                                   R.instance_norm_backward(g64, x64)),
    }[name]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(g)
    assert y.dtype == x.grad.dtype == dtype
    assert_close(y, forward, dtype)
    assert_close(x.grad, backward[0], dtype)
    if getattr(layer, "running_mean", None) is not None:  # (float32 buffers: float32 statistics, not rounded means)
        running_mean, running_var = np.zeros(8), np.ones(8)
        R.instance_norm(x64, running_mean, running_var)
        assert_close(layer.running_mean, running_mean, torch.float32)
        assert_close(layer.running_var, running_var, torch.float32)


def test_large_half_values_do_not_overflow():
    """Keras' test: [-1000, 1000] in float16 normalizes to [-1, 1] (the variance 1e6 > float16 max)."""
    x = torch.tensor([[-1000.0], [1000.0]], dtype=torch.float16)
    for layer in (normkit.BatchNorm1d(1), normkit.BatchNorm(1, axis=-1, virtual_batch_size=2)):
        y = layer(x)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.float(), torch.tensor([[-1.0], [1.0]]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("make", [lambda: normkit.BatchNorm2d(4), lambda: normkit.BatchNorm(4, axis=-1),
                                  lambda: normkit.BatchNorm(4, virtual_batch_size=8, ghost_layout="contiguous")],
                         ids=["bn2d", "axis-1", "ghost"])
def test_variance_is_robust_for_large_mean_small_spread(make):
    """float32, per-channel mean 1e4 and std 1e-2: within 1e-3 relative of the float64 variance, never negative."""
    torch.manual_seed(0)
    layer = make()
    x = (torch.randn(32, 4, 8, 8, dtype=torch.float64) * 1e-2 + 1e4).float()
    if layer.axis == -1:
        x = x.permute(0, 2, 3, 1).contiguous()
    feature_axis = 1 if layer.axis == 1 else 3
    reduce = tuple(a for a in range(4) if a != feature_axis)
    layer.momentum = 1.0
    layer(x)
    if layer.virtual_batch_size:
        # Ghost batches: the running variance is the mean of the per-ghost unbiased variances.
        ghosts = x.double().reshape(4, 8, *x.shape[1:])
        exact = ghosts.var(dim=tuple(a + 1 for a in reduce), unbiased=True).mean(dim=0)
    else:
        exact = x.double().var(dim=reduce, unbiased=True)
    assert (layer.running_var >= 0).all()
    np.testing.assert_allclose(to_numpy(layer.running_var), to_numpy(exact), rtol=1e-3)
    # ...and the mean (ghost batches: the mean of equal-sized ghosts' means is the batch mean), to float32's
    # resolution: the shift that keeps the variance exact is added back.
    np.testing.assert_allclose(to_numpy(layer.running_mean), to_numpy(x.double().mean(dim=reduce)), rtol=1e-7)


def _shift_by_position(shape):
    return torch.full(shape, 0.5), torch.full(shape, 0.25)


@pytest.mark.parametrize("options, mask_shape", [
    ({"virtual_batch_size": 4}, (16, 1, 6)),
    ({"adjustment": _shift_by_position}, None),
    ({}, (16, 3, 6)),  # a mask that varies along the features
    ({"virtual_batch_size": 4, "renorm": True}, (16, 1, 6)),
], ids=["ghost + mask", "adjustment", "feature-varying mask", "ghost + renorm + mask"])
def test_composite_paths_stay_exact_far_from_zero(options, mask_shape):
    """float32 data with mean 1e4 and std 1e-2 through the composite pipeline: once the layer has seen such data
    it recenters, and the output and running variance match the float64 reference of the same values."""
    torch.manual_seed(0)
    layer = normkit.BatchNorm(3, momentum=1.0, **options)
    x = (torch.randn(16, 3, 6, dtype=torch.float64) * 1e-2 + 1e4).float()
    mask = None if mask_shape is None else torch.rand(mask_shape) > 0.3
    state = {name: to_numpy(getattr(layer, name)).copy() for name in ("running_mean", "running_var")}
    extra = {key: to_numpy(getattr(layer, key)).copy() for key in ("renorm_mean", "renorm_stddev", "moving_stddev")
             if options.get("renorm")}
    y = layer(x, mask=mask)
    assert layer._recenter
    expected = R.batch_norm(x.double().numpy(), state["running_mean"], state["running_var"], np.ones(3), np.zeros(3),
                            True, 1.0, layer.eps, axis=1, mask=None if mask is None else mask.numpy(),
                            virtual_batch_size=options.get("virtual_batch_size"),
                            adjustment=(lambda shape: tuple(t.double().numpy() for t in _shift_by_position(shape)))
                            if "adjustment" in options else None, **extra,
                            **({"renorm_clipping": (0.0, math.inf, math.inf), "renorm_momentum": layer.renorm_momentum}
                               if options.get("renorm") else {}))
    # Outputs of size ~1 to 1e-4 (the error was 6e-2 before recentering); renorm's, x * r + d with fresh renorm
    # statistics (d = 1e4), to float32's rounding of their size.
    np.testing.assert_allclose(to_numpy(y), expected, rtol=2e-7, atol=1e-4)
    np.testing.assert_allclose(to_numpy(layer.running_var), state["running_var"], rtol=1e-3)
    np.testing.assert_allclose(to_numpy(layer.running_mean), state["running_mean"], rtol=1e-7)


@pytest.mark.parametrize("options, mask_shape", [
    ({}, None), ({"virtual_batch_size": 4}, None), ({}, (16, 1, 6)), ({}, (16, 3, 6)),
    ({"virtual_batch_size": 4}, (16, 1, 6)), ({"virtual_batch_size": 4}, (16, 3, 6)),
], ids=["renorm", "ghost", "padding mask", "feature-varying mask", "ghost + mask", "ghost + mask, a feature unseen"])
def test_renorm_correction_stays_exact_far_from_zero_once_its_statistics_follow_the_data(options, mask_shape,
                                                                                          execution):
    """float32 data with mean 1e4 and std 1e-2, a step after renorm's averages have caught up with it: d =
    (batch mean - renorm mean) / renorm stddev is of order 1. The batch mean in float32 is known only to an ulp of
    the data (1e-3), which d carried into every output (1e-2 off at eps 1e-3) on ATen's paths; the fused kernel,
    computing in double, did not."""
    torch.manual_seed(0)
    layer = normkit.BatchNorm(3, eps=1e-3, renorm=True, renorm_momentum=1.0, **options)
    names = ("running_mean", "running_var", "renorm_mean", "renorm_stddev", "moving_stddev")
    for step in range(2):
        x = (torch.randn(16, 3, 6, dtype=torch.float64) * 1e-2 + 1e4).float()
        mask = None if mask_shape is None else torch.rand(mask_shape) > 0.3
        if step == 1 and mask_shape == (16, 3, 6) and "virtual_batch_size" in options:
            mask[:, 2] = False  # (its batch mean is 0: d = -renorm_mean / stddev, in every ghost batch)
        state = {name: to_numpy(getattr(layer, name)).copy() for name in names}
        y = layer(x, mask=mask)
    expected = R.batch_norm(x.double().numpy(), state.pop("running_mean"), state.pop("running_var"), np.ones(3),
                            np.zeros(3), True, 0.1, layer.eps, axis=1, mask=None if mask is None else mask.numpy(),
                            virtual_batch_size=options.get("virtual_batch_size"), renorm_momentum=1.0, **state)
    assert np.abs(expected[:, :2]).max() < 10  # (d of order 1: the renorm mean follows the data)
    np.testing.assert_allclose(to_numpy(y)[:, :2], expected[:, :2], rtol=1e-5, atol=1e-5)
    # An unseen feature's output is x_hat * r + d with x_hat = x / sqrt(eps) ~ 3e5 and d ~ -3e5: float32's
    # rounding of those terms (3e-2) is all its precision.
    np.testing.assert_allclose(to_numpy(y)[:, 2], expected[:, 2], rtol=1e-5, atol=1e-5 if mask is None or
                               mask[:, -1].any() else 0.1)


@pytest.mark.parametrize("mode", ["eval", "frozen"])
@pytest.mark.parametrize("options, mask_shape", [({}, None), ({"axis": -1}, None), ({}, (16, 1, 6)),
                                                 ({"axis": (1, 2)}, None)],
                         ids=["plain", "axis -1", "padding mask", "two axes"])
def test_batch_statistics_out_of_training_stay_exact_far_from_zero(options, mask_shape, mode, execution):
    """A layer without running statistics normalizes by the batch's in eval and frozen too, before it ever
    trained: float32 data with mean 1e4 and std 1e-2 lost its variance there (outputs 1e-1 off) because only
    training steps checked whether to recenter."""
    torch.manual_seed(0)
    shape = (16, 6, 3) if options.get("axis") == -1 else (16, 3, 6)
    features = (3, 6) if options.get("axis") == (1, 2) else 3
    layer = normkit.BatchNorm(features, track_running_stats=False, **options)
    layer.freeze() if mode == "frozen" else layer.eval()
    x = (torch.randn(shape, dtype=torch.float64) * 1e-2 + 1e4).float()
    mask = None if mask_shape is None else torch.rand(mask_shape) > 0.3
    y = layer(x, mask=mask)
    expected = R.batch_norm(x.double().numpy(), None, None, np.ones(features), np.zeros(features), True,
                            axis=options.get("axis", 1), mask=None if mask is None else mask.numpy())
    np.testing.assert_allclose(to_numpy(y), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", ["ghost batches + mask", "adjustment"])
def test_input_gradient_at_a_huge_spread_matches_the_reference(path):
    """float32 data with std 1e15 through the masked closed-form gradient (ghost batches with a mask) and
    through autograd's composite (an adjustment): no intermediate underflows (invstd^3 is ~1e-45 there), so
    the gradient is float32-accurate."""
    torch.manual_seed(0)
    x = (torch.randn(16, 3, dtype=torch.float64) * 1e15).float().requires_grad_()
    g = torch.randn(16, 3, dtype=torch.float64)
    mask = torch.ones(16, dtype=torch.bool)
    mask[::5] = False
    if path == "adjustment":
        layer, call, options = (normkit.BatchNorm1d(3, adjustment=lambda shape: (torch.ones(shape), torch.zeros(shape))),
                                {}, {"adjustment": lambda shape: (np.ones(shape), np.zeros(shape))})
    else:
        layer, call = normkit.BatchNorm1d(3, virtual_batch_size=4), {"mask": mask}
        options = {"virtual_batch_size": 4, "mask": mask.double().numpy()[:, None]}
    (layer(x, **call).double() * g).sum().backward()
    expected = R.batch_norm_backward(g.numpy(), x.detach().double().numpy(), np.zeros(3), np.ones(3), np.ones(3),
                                     np.zeros(3), True, 1e-5, **options)[0]
    assert np.abs(to_numpy(x.grad) - expected).max() <= 1e-6 * np.abs(expected).max()


def test_moments_are_robust_in_float32():
    x = (torch.randn(4096, dtype=torch.float64) * 1e-2 + 1e4).float()
    count, mean, var = normkit.functional.moments(x, (0,))
    exact = x.double().var(unbiased=False)
    assert var.item() >= 0
    np.testing.assert_allclose(var.item(), exact.item(), rtol=1e-3)


def _recentering_layer():
    """A layer that has seen float32 data far from zero, so it recenters from now on."""
    torch.manual_seed(1)
    layer = normkit.BatchNorm(3, axis=-1, momentum=1.0)
    layer((torch.randn(8, 5, 3, dtype=torch.float64) * 1e-2 + 1e4).float())
    assert layer._recenter
    return layer


@pytest.mark.parametrize("padded", ["first", "last"])
def test_recentering_never_takes_its_centre_from_padding(padded):
    """Padded positions are excluded from the statistics even when the layer recenters: a NaN or a zero in
    the first position, if padded, changes nothing (the variance stays within 1e-3 of the float64 value)."""
    layer = _recentering_layer()
    x = (torch.randn(4, 6, 3, dtype=torch.float64) * 1e-2 + 1e4).float()
    mask = torch.ones(4, 6, dtype=torch.bool)
    position = (0, 0) if padded == "first" else (3, 5)
    mask[position] = False
    x[position] = float("nan")
    y = layer(x, mask=mask)
    valid = x.double()[mask]
    assert torch.isfinite(y[mask]).all()
    np.testing.assert_allclose(to_numpy(layer.running_var), to_numpy(valid.var(dim=0, unbiased=True)), rtol=1e-3)
    np.testing.assert_allclose(to_numpy(layer.running_mean), to_numpy(valid.mean(dim=0)), rtol=1e-7)


@pytest.mark.parametrize("options", [{}, {"renorm": True}, {"virtual_batch_size": 4}],
                         ids=["padding", "padding + renorm", "ghost + padding"])
def test_zero_padding_does_not_hide_data_far_from_zero_on_the_first_step(options, execution):
    """A fresh layer's first step on padded float32 data with mean 1e4 and std 1e-2, padding zeros: the
    recentering check counts the valid positions only (with the zeros, the spread looked like 5e3 and the
    layer kept ATen's rounded mean: running variance 1e-2 off, input gradient 3e-2), so the variance stays
    within 1e-3 of the float64 value and output and gradients match the reference. On ATen's paths, then on the
    fused kernel (``execution``; fails in CI if it cannot build)."""
    torch.manual_seed(0)
    mask = torch.ones(16, 6, dtype=torch.bool)
    mask[:, 4:] = False
    data = (torch.randn(16, 6, 3, dtype=torch.float64) * 1e-2 + 1e4).float()
    x = torch.where(mask[..., None], data, torch.zeros(())).requires_grad_()
    g = torch.randn(16, 6, 3, dtype=torch.float64)
    layer = normkit.BatchNorm(3, axis=-1, momentum=1.0, **options)
    state = {name: to_numpy(buffer) for name, buffer in layer.named_buffers() if buffer.is_floating_point()}
    extra = ({key: state[key].copy() for key in ("renorm_mean", "renorm_stddev", "moving_stddev")}
             if options.get("renorm") else {})
    y = layer(x, mask=mask)
    (y.double() * g).sum().backward()
    x64, mask64 = x.detach().double().numpy(), mask.numpy()[..., None]
    ghost = {"virtual_batch_size": options["virtual_batch_size"]} if "virtual_batch_size" in options else {}
    renorm = ({"renorm_clipping": (0.0, math.inf, math.inf)} if options.get("renorm") else {})
    expected = R.batch_norm(x64, state["running_mean"], state["running_var"], np.ones(3), np.zeros(3), True, 1.0,
                            layer.eps, axis=-1, mask=mask64, **ghost, **renorm, **extra,
                            **({"renorm_momentum": layer.renorm_momentum} if options.get("renorm") else {}))
    grads = R.batch_norm_backward(g.numpy(), x64, None, None, np.ones(3), np.zeros(3), True, layer.eps, axis=-1,
                                  mask=mask64, **ghost, **renorm,
                                  **({"renorm_mean": np.zeros(3), "renorm_stddev": np.ones(3)}
                                     if options.get("renorm") else {}))
    valid = x.detach().double()[:, :4]  # (the first four positions of every row)
    if ghost:  # Keras' strided ghosts: ghost j holds rows j, j + 4, ...; the mean of their unbiased variances
        exact = valid.reshape(4, 4, 4, 3).var(dim=(0, 2), unbiased=True).mean(dim=0)
    else:
        exact = valid.reshape(-1, 3).var(dim=0, unbiased=True)
    assert (layer.running_var >= 0).all()
    np.testing.assert_allclose(to_numpy(layer.running_var), to_numpy(exact), rtol=1e-3)
    np.testing.assert_allclose(to_numpy(layer.running_var), state["running_var"], rtol=1e-3)
    # (renorm's output is x_hat * r + d with d = 1e4 from fresh renorm statistics: float32's rounding of its size)
    np.testing.assert_allclose(to_numpy(y)[:, :4], expected[:, :4], rtol=2e-7, atol=1e-4)
    assert np.abs(to_numpy(x.grad) - grads[0]).max() <= 1e-4 * np.abs(grads[0]).max()
    # The padded positions: zeros normalized by the valid positions' statistics, ~-1e6 without renorm, so their
    # relative error is the variance's. The fused kernel sums in double: float64's value to float32's rounding.
    # ATen's float32 statistics kernel sums the 64 valid rows one after another when it runs on one thread
    # (5e-7 seen; its two-thread split happened to stay under 2e-7): there the padded outputs are held to the
    # layer's own statistics as tightly, and those statistics to float64's within naive summation's bound, n * 2^-24.
    padded_y = to_numpy(y)[:, 4:]
    if options.get("renorm"):
        # x_hat * r + d at a zero: -1e6 * 1e-2 + 1e4, two float32 terms of size 1e4 that cancel to ~0, so the
        # result is exact to their rounding, one float32 step at 1e4 (seed 0 happened to land closer).
        np.testing.assert_allclose(padded_y, expected[:, 4:], rtol=0, atol=1e4 * 2.0 ** -23)
    elif execution == "fused" or ghost:
        np.testing.assert_allclose(padded_y, expected[:, 4:], rtol=2e-7, atol=1e-4)
    else:
        n = 64
        batch_var = to_numpy(layer.running_var) * (n - 1) / n  # (momentum 1: the batch's statistics themselves)
        own = (0.0 - to_numpy(layer.running_mean)) / np.sqrt(batch_var + layer.eps)
        np.testing.assert_allclose(padded_y, np.broadcast_to(own, padded_y.shape), rtol=2e-7)
        exact_biased = valid.reshape(-1, 3).var(dim=0, unbiased=False).numpy()
        np.testing.assert_allclose(batch_var, exact_biased, rtol=n * 2.0 ** -24)
        np.testing.assert_allclose(to_numpy(layer.running_mean), valid.reshape(-1, 3).mean(dim=0).numpy(), rtol=1e-7)


@pytest.mark.parametrize("spread, masked", [(30.0, False), (30.0, True), (1e4, True)],
                         ids=["30 apart", "30 apart + mask", "1e4 apart + mask"])
@pytest.mark.usefixtures("execution")
def test_ghost_batches_whose_means_lie_apart_stay_exact(spread, masked):
    """float32 ghost batches with std 1e-2 each, means 1e4, 1e4 + spread, ...: each ghost is normalized by its own
    statistics, so the recentering check measures each ghost's spread (the batch's, 30 here, hid them: running
    variance 1e-2 off) and the masked composite path recenters each ghost about its own mean (one centre per
    feature left residuals of 1.5e4: variance 3e-3 off). Variance within 1e-3 of float64's, output and input
    gradient as the reference's."""
    torch.manual_seed(0)
    apart = torch.arange(4, dtype=torch.float64).repeat_interleave(4)[:, None, None] * spread
    x = (torch.randn(16, 3, 6, dtype=torch.float64) * 1e-2 + 1e4 + apart).float().requires_grad_()
    g = torch.randn(16, 3, 6, dtype=torch.float64)
    mask = torch.rand(16, 6) > 0.3 if masked else None
    mask64 = None if mask is None else mask.numpy()[:, None, :]
    layer = normkit.BatchNorm(3, virtual_batch_size=4, ghost_layout="contiguous", momentum=1.0)
    state = {name: to_numpy(getattr(layer, name)) for name in ("running_mean", "running_var")}
    y = layer(x) if mask is None else layer(x, mask=mask)
    (y.double() * g).sum().backward()
    x64 = x.detach().double().numpy()
    ghost = {"virtual_batch_size": 4, "ghost_layout": "contiguous", "mask": mask64}
    expected = R.batch_norm(x64, state["running_mean"], state["running_var"], np.ones(3), np.zeros(3), True, 1.0,
                            layer.eps, **ghost)
    grads = R.batch_norm_backward(g.numpy(), x64, None, None, np.ones(3), np.zeros(3), True, layer.eps, **ghost)
    assert (layer.running_var >= 0).all()
    np.testing.assert_allclose(to_numpy(layer.running_var), state["running_var"], rtol=1e-3)
    np.testing.assert_allclose(to_numpy(layer.running_mean), state["running_mean"], rtol=1e-7)
    np.testing.assert_allclose(to_numpy(y), expected, rtol=2e-7, atol=1e-4)
    assert np.abs(to_numpy(x.grad) - grads[0]).max() <= 1e-4 * np.abs(grads[0]).max()


def test_recentering_with_everything_padded_matches_the_reference():
    """No valid position: mean 0 and variance 0 for the batch, output (x - 0) / sqrt(eps), buffers kept."""
    layer = _recentering_layer()
    before = layer.running_mean.clone()
    x = torch.randn(4, 6, 3) + 10
    y = layer(x, mask=torch.zeros(4, 6, dtype=torch.bool))
    expected = R.batch_norm(x.double().numpy(), to_numpy(before), to_numpy(layer.running_var), np.ones(3),
                            np.zeros(3), True, 1.0, layer.eps, axis=-1, mask=np.zeros((4, 6, 1), dtype=bool))
    assert_close(y, expected, torch.float32)
    torch.testing.assert_close(layer.running_mean, before)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("options,mask_shape", [
    ({}, (4, 6)), ({}, (4, 6, 3)), ({"virtual_batch_size": 2}, (4, 6)), ({"renorm": True}, (4, 6)),
], ids=["padding", "per-feature", "ghost", "renorm"])
def test_half_precision_layer_with_a_mask_matches_reference(dtype, options, mask_shape, rng):
    """A layer made half (``.half()``, a Keras float16 policy) trains with masks: statistics in float32,
    output and buffers in its dtype, as the float64 reference computes them from the same rounded values."""
    layer = normkit.BatchNorm(3, axis=-1, **options).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    x = torch.tensor(rng.normal(size=(4, 6, 3)) * 3 + 2).to(dtype).requires_grad_()
    mask = torch.tensor(rng.uniform(size=mask_shape) > 0.3)
    mask[0] = True  # every ghost batch and feature keeps valid positions
    running_mean, running_var = to_numpy(layer.running_mean), to_numpy(layer.running_var)
    y = layer(x, mask=mask)
    y.float().sum().backward()
    assert y.dtype == dtype and layer.weight.grad.dtype == dtype and layer.running_var.dtype == dtype
    kwargs = {}
    if layer.renorm:
        kwargs = dict(renorm_mean=np.zeros(3), renorm_stddev=np.ones(3), moving_stddev=np.ones(3),
                      renorm_clipping=(0.0, np.inf, np.inf), renorm_momentum=layer.renorm_momentum)
    reference_mask = to_numpy(mask).astype(bool)
    reference_mask = reference_mask[..., None] if reference_mask.ndim == 2 else reference_mask
    expected = R.batch_norm(to_numpy(x), running_mean, running_var, to_numpy(layer.weight), to_numpy(layer.bias),
                            True, 0.1, layer.eps, axis=-1, mask=reference_mask,
                            virtual_batch_size=layer.virtual_batch_size, **kwargs)
    assert_close(y, expected, dtype)
    assert_close(layer.running_mean, running_mean, dtype)
    assert_close(layer.running_var, running_var, dtype)


@pytest.mark.parametrize("options", [{}, {"virtual_batch_size": 4}, {"momentum": None}],
                         ids=["padding", "ghost", "cumulative"])
def test_a_float16_running_variance_past_its_range_stays_infinite(options):
    """A variance beyond float16's 65504 is inf in a half buffer. torch.nn's buffer then stays inf at later steps;
    so must a masked (composite) update's, rather than turn NaN (a blend b + w (t - b) gives inf - inf)."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 3, generator=generator) * 3e3).half()  # variance ~1e7, values within float16
    mask = torch.ones(8, dtype=torch.bool)
    mask[-1] = False
    layer = normkit.BatchNorm(3, **options).half()
    plain = torch.nn.BatchNorm1d(3, momentum=options.get("momentum", 0.1)).half()
    for step in range(3):
        batch = x if step == 0 else x / 1000
        layer(batch, mask=mask)
        plain(batch[:-1])
    assert torch.isinf(plain.running_var).all()  # the premise: torch.nn keeps inf
    assert torch.isinf(layer.running_var).all()
    assert_close(layer.running_mean, to_numpy(plain.running_mean.float()), torch.float16)


@pytest.mark.parametrize("options", [{"axis": -1}, {"axis": -1, "renorm": True}, {"axis": -1, "virtual_batch_size": 4},
                                     {"axis": -1, "unbiased_running_var": False}, {"axis": -1, "momentum": 0.7},
                                     {"axis": -1, "mask": True}],
                         ids=["features-last", "renorm", "ghost", "biased", "momentum-0.7", "padding"])
@pytest.mark.parametrize("route", ["aten", "fused"])
def test_a_float32_running_statistic_past_its_range_stays_infinite_on_every_route(options, route):
    """A float32 running statistic that overflowed (data at 1e20 for one step: its variance 1e40 is inf) stays inf at
    later steps, as torch.nn's does, and eval gives the channel's bias, torch.nn's 0 + beta. The fused kernel and
    the composite updates blended b + w (t - b), which made it inf - inf = NaN, and every eval output NaN."""
    from normkit import kernels
    options = dict(options)
    masked = options.pop("mask", False)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 5, 3, generator=generator) for _ in range(3)]
    batches[0][..., 0] *= 1e20
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[-1, 3:] = False
    layer = normkit.BatchNorm(3, **options)
    plain = torch.nn.BatchNorm1d(3, momentum=options.get("momentum", 0.1))
    with kernels.switched(route == "fused"):
        for batch in batches:
            layer(batch, mask=mask) if masked else layer(batch)
            plain(batch[mask] if masked else batch.reshape(-1, 3))
        assert torch.isinf(plain.running_var[0])  # the premise: torch.nn keeps inf
        assert torch.isfinite(layer.running_var[1:]).all() and torch.isfinite(layer.running_mean).all()
        layer.eval()
        if not options.get("renorm"):
            assert torch.isinf(layer.running_var[0]), layer.running_var
            assert torch.equal(layer(batches[1])[..., 0], torch.zeros(8, 5))
        else:
            # Renorm's running variance is moving_stddev^2, and 1e20's stddev fits float32: the kernel (float64
            # arithmetic) gets the finite 6.5e37, ATen's float32 variance is inf on the way; never NaN.
            assert not torch.isnan(layer.running_var[0]), layer.running_var
            assert torch.isfinite(layer(batches[1])).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, layout", [((64, 8, 8, 8), "contiguous"), ((32, 3, 16, 16, 2), "contiguous"),
                                           ((64, 4, 8, 8), "channels_last"), ((16, 4, 32, 32), "contiguous"),
                                           ((64, 512, 1), "contiguous")])
def test_channel_moments_on_every_route_equal_the_reference(shape, layout, dtype):
    # Large contiguous CPU inputs take per-position columns and a combine (functional._moments_by_position);
    # the others ATen's statistics kernel: both must give the float64 reference's moments.
    from normkit.functional import WIDE_MOMENTS_MIN_NUMEL, _channel_moments, _moments_by_position
    rng = np.random.default_rng(7)
    x_np = rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=(1, shape[1]) + (1,) * (len(shape) - 2)) + 2.0
    x = torch.tensor(x_np, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _, mean, var = R.moments(x_np, (0,) + tuple(range(2, len(shape))))
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, want in zip(_channel_moments(x), (mean, var), strict=True):
        np.testing.assert_allclose(got.double().numpy(), want.reshape(-1), **tolerance)
    if x.is_contiguous() and x.numel() > shape[0] * shape[1]:
        for got, want in zip(_moments_by_position(x), (mean, var), strict=True):
            np.testing.assert_allclose(got.double().numpy(), want.reshape(-1), **tolerance)
    assert WIDE_MOMENTS_MIN_NUMEL <= 64 * 8 * 8 * 8  # (the first case takes the per-position route)


def _adjust(shape):
    return torch.full(shape, 1.3), torch.full(shape, -0.2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [{"adjustment": _adjust}, {"adjustment": _adjust, "mask": True},
                                     {"virtual_batch_size": 4, "mask": True}, {"renorm": True}],
                         ids=["adjustment", "adjustment+mask", "ghost+mask", "renorm"])
def test_half_precision_input_gradient_is_rounded_once(options, dtype):
    # Statistics and normalization both depend on x; their gradients must add up in float32 and be rounded to
    # the input's dtype once, as the same computation on the float32 copy of the input rounded at the end.
    options = dict(options)
    masked = options.pop("mask", False)
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(1.0, 2.0, size=(8, 6, 4)), dtype=torch.float32).to(dtype)
    g = torch.tensor(rng.normal(size=(8, 6, 4)), dtype=torch.float32).to(dtype)
    mask = torch.tensor(rng.uniform(size=(8, 6)) > 0.3) if masked else None
    results = []
    for computed in (x, x.float()):
        leaf = computed.clone().requires_grad_()
        y = normkit.BatchNorm(4, axis=-1, **options)(leaf, mask=mask)
        y.backward(g.to(computed.dtype))
        results.append((y.to(dtype), leaf.grad.to(dtype)))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("first", ["constant", "fully masked", "empty"])
@pytest.mark.parametrize("options", [{}, {"renorm": True}, {"virtual_batch_size": 4}], ids=["plain", "renorm", "ghost"])
def test_a_first_batch_that_says_nothing_leaves_the_recenter_check_due(first, options):
    """A first training batch in which no channel varies (every value the same, every position padded, or no row at
    all) tells nothing about how far from zero the data is: the check is due again on the next batch, which recenters
    for float32 data at mean 1e4, std 1e-2 (the first batch's "no" was held for 1000 steps: variance 1e-2 off)."""
    torch.manual_seed(0)
    layer = normkit.BatchNorm(3, axis=-1, momentum=1.0, **options)
    if first == "constant":
        layer(torch.full((8, 5, 3), 1e4))
    elif first == "empty":  # (a synchronized process given no rows at its first step, say)
        layer(torch.empty(0, 5, 3))
    else:
        layer(torch.randn(8, 5, 3) + 1e4, mask=torch.zeros(8, 5, dtype=torch.bool))
    x = (torch.randn(8, 5, 3, dtype=torch.float64) * 1e-2 + 1e4).float()
    layer(x)
    assert layer._recenter
    values = x.double()
    if "virtual_batch_size" in options:  # (Keras' strided ghosts: the mean of the ghosts' unbiased variances)
        exact = values.reshape(4, 2, 5, 3).var(dim=(0, 2), unbiased=True).mean(dim=0)
    else:
        exact = values.reshape(-1, 3).var(dim=0, unbiased=True)
    np.testing.assert_allclose(to_numpy(layer.running_var), to_numpy(exact), rtol=1e-3)  # (renorm: derived from it)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (64, 4, 8, 8)], ids=["small", "folded"])  # below/above FOLDED_MIN_NUMEL
@pytest.mark.parametrize("data", ["near zero", "far from zero"])
def test_half_precision_layer_with_a_biased_running_variance_computes_in_float32(dtype, shape, data, rng):
    """A ``.half()`` layer with Keras' biased running variance takes the ATen pipeline's statistics path: its
    statistics in float32 with the parameters cast to float32, as every half-precision layer's (large inputs
    failed there, half-precision weights against float32 statistics in ATen's kernel: "expected scalar type Half
    but found Float"; small ones were normalized by ATen's half-precision kernel, whose mean rounded to bfloat16
    put 0.2 into outputs of data at mean 1e4, std 20)."""
    assert (math.prod(shape) >= normkit.functional.FOLDED_MIN_NUMEL) == (shape[0] == 64)
    layer = normkit.BatchNorm(4, momentum=0.5, unbiased_running_var=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0, 1.5]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 1.0, 0.5]))
    values = rng.normal(size=shape) * 20 + (1e4 if data == "far from zero" else 0.0)
    x = torch.tensor(values).to(dtype).requires_grad_()
    g = torch.tensor(rng.normal(size=shape)).to(dtype)
    running_mean, running_var = to_numpy(layer.running_mean), to_numpy(layer.running_var)
    y = layer(x)
    y.backward(g)
    assert y.dtype == x.grad.dtype == layer.weight.grad.dtype == layer.running_var.dtype == dtype
    x64, weight, bias = to_numpy(x), to_numpy(layer.weight), to_numpy(layer.bias)
    expected = R.batch_norm(x64, running_mean, running_var, weight, bias, True, 0.5, layer.eps,
                            unbiased_running_var=False)
    grads = R.batch_norm_backward(to_numpy(g), x64, None, None, weight, bias, True, layer.eps)
    assert_close(y, expected, dtype)
    assert_close(x.grad, grads[0], dtype)
    assert_close(layer.weight.grad, grads[1], dtype)
    assert_close(layer.bias.grad, grads[2], dtype)
    assert_close(layer.running_mean, running_mean, dtype)
    assert_close(layer.running_var, running_var, dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("options, shape", [
    ({}, (64, 8)), ({}, (16, 8, 4, 4)), ({"axis": -1}, (16, 4, 4, 8)), ({"axis": (1, 2)}, (64, 8, 2)),
    ({"virtual_batch_size": 4}, (16, 8, 5)), ({"unbiased_running_var": False}, (64, 8)),
    ({"unbiased_running_var": False, "axis": -1}, (16, 3, 8)),
], ids=["(N, C)", "axis 1", "axis -1", "two axes", "ghost", "biased", "biased, axis -1"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_inputs_to_a_batch_norm_without_parameters_or_buffers_get_float32_statistics(dtype, options, shape,
                                                                                           training, rng):
    """BatchNorm(affine=False, track_running_stats=False) holds no tensor to say float32, so ATen computed a
    half-precision input's call in half precision: its mean rounded to the input's dtype (as LayerNorm's, GroupNorm's
    and InstanceNorm's without parameters, above) put 5e-2 (float16) to 0.26 (bfloat16) into the outputs and 0.15
    into the input gradients of data at mean 1e4, std 20, where the same layer with float32 weights is within
    the input's rounding. The layer and the functional API (``functional.batch_norm`` without weights and buffers)."""
    features = (8, 2) if options.get("axis") == (1, 2) else 8
    values = rng.normal(size=shape) * 20 + 1e4
    g = torch.tensor(rng.normal(size=shape)).to(dtype)
    x = torch.tensor(values).to(dtype)
    reference_options = dict(options) if training else {k: v for k, v in options.items() if k != "virtual_batch_size"}
    expected = R.batch_norm(to_numpy(x), None, None, None, None, True, **reference_options)
    expected_grad = R.batch_norm_backward(to_numpy(g), to_numpy(x), None, None, None, None, True,
                                          **{k: v for k, v in reference_options.items()
                                             if k != "unbiased_running_var"})[0]
    layer = normkit.BatchNorm(features, affine=False, track_running_stats=False, **options).train(training)
    for normalize in (layer, lambda leaf: normkit.functional.batch_norm(leaf, training=training, **reference_options)):
        leaf = x.clone().requires_grad_()
        y = normalize(leaf)
        y.backward(g)
        assert y.dtype == leaf.grad.dtype == dtype
        assert_close(y, expected, dtype)
        assert_close(leaf.grad, expected_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numbers_as_cached_tensors_compute_the_numbers_bits(dtype, rng):
    """functional.number_for: a number beside an eager CPU tensor becomes a cached 0-dim tensor of the tensor's dtype
    (sparing ATen's cast of the wrapped number), with which every op the option paths use it in gives the bits the
    number gives; anything else (half precision, meta tensors, tracing) keeps the number."""
    from normkit.functional import number_for
    x = torch.tensor(rng.normal(size=(7, 5)) * 3 + 1, dtype=dtype)
    for value in (1e-5, 0.9, 1 - 0.1, 64 / 63, 1 / 3, 3, 2 ** 25 + 1, 1e-300):
        operand = number_for(value, x)
        assert isinstance(operand, torch.Tensor) and operand.dtype == dtype and operand.dim() == 0
        for op in (torch.add, torch.sub, torch.mul, torch.div):
            assert torch.equal(op(x, operand), op(x, value))
        assert torch.equal(x.clone().mul_(operand), x.clone().mul_(value))
        buffers = [x.clone(), x.clone() + 1]
        torch._foreach_mul_(buffers, operand)
        expected = [x.clone(), x.clone() + 1]
        torch._foreach_mul_(expected, value)
        assert all(torch.equal(got, want) for got, want in zip(buffers, expected))
    assert number_for(0.5, x.half()) == 0.5 and number_for(0.5, torch.empty(3, device="meta")) == 0.5
    with torch.inference_mode():
        fresh = number_for(0.123456, x)
    assert not fresh.is_inference()  # (a normal tensor even when first made in inference mode)
