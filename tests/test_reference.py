"""The NumPy reference against finite differences and closed forms: the oracle must itself be right."""

import math

import numpy as np
import pytest

from normkit import reference as R

from oracle import numeric_gradient


def check_backward(forward, backward, x, weight, bias, rng):
    g = rng.normal(size=forward(x, weight, bias).shape)
    dx, dw, db = backward(g, x, weight, bias)
    np.testing.assert_allclose(dx, numeric_gradient(lambda v: (forward(v, weight, bias) * g).sum(), x.copy()),
                               rtol=1e-6, atol=1e-7)
    if weight is not None:
        np.testing.assert_allclose(dw, numeric_gradient(lambda v: (forward(x, v, bias) * g).sum(), weight.copy()),
                                   rtol=1e-6, atol=1e-7)
    if bias is not None:
        np.testing.assert_allclose(db, numeric_gradient(lambda v: (forward(x, weight, v) * g).sum(), bias.copy()),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((4, 3, 2), 1), ((3, 2, 2, 3), -1), ((3, 2, 3, 2), (1, 3))])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_backward_matches_finite_differences(shape, axis, training, rng):
    x = rng.normal(size=shape) * 2 + 1
    feature_shape = tuple(shape[a] for a in ((axis,) if isinstance(axis, int) else axis))
    weight, bias = rng.normal(size=feature_shape), rng.normal(size=feature_shape)
    running_mean, running_var = rng.normal(size=feature_shape), rng.uniform(0.5, 2, size=feature_shape)
    forward = lambda v, w, b: R.batch_norm(v, running_mean.copy(), running_var.copy(), w, b, training, 0.1, 1e-3,
                                           axis=axis)
    backward = lambda g, v, w, b: R.batch_norm_backward(g, v, running_mean, running_var, w, b, training, 1e-3,
                                                        axis=axis)
    check_backward(forward, backward, x, weight, bias, rng)


@pytest.mark.parametrize("option", ["mask", "ghost_strided", "ghost_contiguous", "renorm", "adjustment"])
def test_batch_norm_option_backward_matches_finite_differences(option, rng):
    x = rng.normal(size=(6, 3, 2)) * 3 - 1
    weight, bias = rng.normal(size=3), rng.normal(size=3)
    kwargs = {}
    if option == "mask":
        mask = (rng.uniform(size=(6, 1, 2)) > 0.3).astype(float)
        mask[0, 0, 0] = 1.0
        kwargs["mask"] = mask
    elif option.startswith("ghost"):
        kwargs.update(virtual_batch_size=3, ghost_layout=option.split("_")[1])
    elif option == "renorm":
        # r and d carry no gradient (Keras' stop_gradient); finite differences agree with that only
        # where both are clipped, i.e. locally constant: a tiny renorm stddev saturates r at rmax
        # and a far renorm mean saturates d at dmax.
        kwargs.update(renorm_mean=np.full(3, -100.0), renorm_stddev=np.full(3, 1e-2),
                      renorm_clipping=(0.5, 2.0, 0.7))
    else:
        scale, shift = rng.uniform(0.5, 1.5, size=3), rng.uniform(-0.2, 0.2, size=3)
        kwargs["adjustment"] = lambda shape: (scale.reshape(1, 3, 1), shift.reshape(1, 3, 1))
    forward = lambda v, w, b: R.batch_norm(v, None, None, w, b, True, 0.1, 1e-3, **kwargs)
    backward = lambda g, v, w, b: R.batch_norm_backward(g, v, None, None, w, b, True, 1e-3, **kwargs)
    check_backward(forward, backward, x, weight, bias, rng)


@pytest.mark.parametrize("affine", ["weight only", "bias only", "neither"])
def test_batch_norm_backward_without_weight_or_bias(affine, rng):
    """Keras' scale=False / center=False: the parameter left is differentiated alone."""
    x = rng.normal(size=(5, 3, 2)) * 2 + 1
    weight = rng.normal(size=3) if affine == "weight only" else None
    bias = rng.normal(size=3) if affine == "bias only" else None
    g = rng.normal(size=x.shape)
    forward = lambda v, w, b: R.batch_norm(v, None, None, w, b, True, 0.1, 1e-3)
    dx, dw, db = R.batch_norm_backward(g, x, None, None, weight, bias, True, 1e-3)
    np.testing.assert_allclose(dx, numeric_gradient(lambda v: (forward(v, weight, bias) * g).sum(), x.copy()),
                               rtol=1e-6, atol=1e-7)
    assert (dw is None) == (weight is None) and (db is None) == (bias is None)
    if weight is not None:
        np.testing.assert_allclose(dw, numeric_gradient(lambda v: (forward(x, v, None) * g).sum(), weight.copy()),
                                   rtol=1e-6, atol=1e-7)
    if bias is not None:
        assert db.shape == bias.shape
        np.testing.assert_allclose(db, numeric_gradient(lambda v: (forward(x, None, v) * g).sum(), bias.copy()),
                                   rtol=1e-6, atol=1e-7)


def test_layer_group_instance_backward_match_finite_differences(rng):
    x = rng.normal(size=(3, 4, 5))
    w, b = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    check_backward(lambda v, w, b: R.layer_norm(v, (4, 5), w, b),
                   lambda g, v, w, b: R.layer_norm_backward(g, v, (4, 5), w, b), x, w, b, rng)
    w, b = rng.normal(size=4), rng.normal(size=4)
    check_backward(lambda v, w, b: R.group_norm(v, 2, w, b),
                   lambda g, v, w, b: R.group_norm_backward(g, v, 2, w, b), x, w, b, rng)
    check_backward(lambda v, w, b: R.instance_norm(v, None, None, w, b),
                   lambda g, v, w, b: R.instance_norm_backward(g, v, None, None, w, b), x, w, b, rng)


@pytest.mark.parametrize("case", ["one sample in eval", "one valid value", "one valid value, a channel empty",
                                  "ghosts with one valid value", "eps large", "eps large, masked ghosts"])
def test_batch_norm_backward_at_the_edges_matches_finite_differences(case, rng):
    # Where the statistics degenerate: a batch of one normalized with running statistics, a channel whose only
    # valid value makes its variance 0 (the padded positions, normalized by sqrt(eps) alone, still depend on that
    # value through the mean), a channel with no valid value, and an eps as large as the variance, where the
    # projection picture of docs/learn.md holds only approximately but the formula still exactly.
    x = rng.normal(size=(4, 3, 2)) * 2 + 1
    weight, bias = rng.normal(size=3), rng.normal(size=3)
    running, training, eps, options = (None, None), True, 1e-3, {}
    if case == "one sample in eval":
        x, running, training = x[:1, :, 0].copy(), (rng.normal(size=3), rng.uniform(0.5, 2, size=3)), False
    elif case.startswith("one valid value"):
        mask = np.zeros((4, 3, 2) if "empty" in case else (4, 1, 2))
        mask[2, 0, 1] = 1.0
        if "empty" in case:
            mask[1, 1, 0] = 1.0  # channels 0 and 1: one valid value each; channel 2: none
        options["mask"] = mask
    elif case == "ghosts with one valid value":
        mask = np.ones((4, 1, 2))
        mask[1] = 0.0
        mask[3, 0, 1] = 0.0  # strided ghosts of 2 rows: rows (1, 3) hold one valid value
        options.update(mask=mask, virtual_batch_size=2)
    else:
        eps = 10.0
        if "ghosts" in case:
            options.update(mask=(rng.uniform(size=(4, 1, 2)) > 0.4).astype(float), virtual_batch_size=2,
                           ghost_layout="contiguous")
    forward = lambda v, w, b: R.batch_norm(v, *[None if r is None else r.copy() for r in running], w, b, training,
                                           0.1, eps, **options)
    backward = lambda g, v, w, b: R.batch_norm_backward(g, v, *running, w, b, training, eps, **options)
    check_backward(forward, backward, x, weight, bias, rng)


@pytest.mark.parametrize("eps", [1e-5, 10.0])
def test_per_sample_norms_with_groups_of_one_value_or_large_eps_match_finite_differences(eps, rng):
    # GroupNorm with one channel per group and no spatial axis normalizes single values: the output is beta
    # whatever x is, so dx must be exactly 0 (the formula's two terms cancel); a large eps keeps every term.
    x = rng.normal(size=(3, 4)) * 2 + 1
    w, b = rng.normal(size=4), rng.normal(size=4)
    dx, _, _ = R.group_norm_backward(rng.normal(size=x.shape), x, 4, w, b, eps)
    assert np.all(dx == 0.0)
    check_backward(lambda v, w, b: R.group_norm(v, 4, w, b, eps),
                   lambda g, v, w, b: R.group_norm_backward(g, v, 4, w, b, eps), x, w, b, rng)
    x = rng.normal(size=(2, 4, 3)) * 2 + 1
    for groups in (1, 2, 4):
        check_backward(lambda v, w, b: R.group_norm(v, groups, w, b, eps),
                       lambda g, v, w, b: R.group_norm_backward(g, v, groups, w, b, eps), x, w, b, rng)
    one_position = x[:, :, :1].copy()  # InstanceNorm over a single position: the same degenerate groups
    check_backward(lambda v, w, b: R.instance_norm(v, None, None, w, b, eps=eps),
                   lambda g, v, w, b: R.instance_norm_backward(g, v, None, None, w, b, eps=eps), one_position, w, b,
                   rng)


def test_classic_example():
    """X = arange(27) as (1, 3, 3, 3) through BN in training: the published numbers and buffers."""
    x = np.arange(27.0).reshape(1, 3, 3, 3)
    running_mean, running_var = np.zeros(3), np.ones(3)
    y = R.batch_norm(x, running_mean, running_var, np.ones(3), np.zeros(3), True, 0.1, 1e-5)
    expected = [-1.5492, -1.1619, -0.7746, -0.3873, 0.0, 0.3873, 0.7746, 1.1619, 1.5492]
    for channel in range(3):
        np.testing.assert_allclose(y[0, channel].reshape(-1), expected, atol=5e-5)
    np.testing.assert_allclose(running_mean, [0.4, 1.3, 2.2])
    np.testing.assert_allclose(running_var, [1.65, 1.65, 1.65])


def test_moments_are_numpy_mean_and_biased_var():
    x = np.array([0, 1, 2, 3, 4, 100, -200], dtype=float)
    count, mean, var = R.moments(x, (0,))
    assert count.item() == 7
    np.testing.assert_allclose(mean.item(), np.mean(x))
    np.testing.assert_allclose(var.item(), np.var(x))


def test_masked_moments_ignore_masked_values_and_empty_groups_are_zero():
    x = np.array([[1.0, 5.0], [2.0, 5.0], [9.0, 9.0]])
    mask = np.array([[1.0], [1.0], [0.0]])
    count, mean, var = R.moments(x, (0,), mask)
    np.testing.assert_allclose(mean.ravel(), [1.5, 5.0])
    np.testing.assert_allclose(var.ravel(), [0.25, 0.0])
    count, mean, var = R.moments(x, (0,), np.zeros((3, 1)))
    assert np.all(count == 0) and np.all(mean == 0) and np.all(var == 0)


def test_cumulative_and_unbiased_running_rules():
    x = np.array([[1.0], [3.0]])  # mean 2, biased var 1, unbiased 2
    running_mean, running_var = np.zeros(1), np.ones(1)
    R.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    np.testing.assert_allclose([running_mean[0], running_var[0]], [2.0, 2.0])
    running_mean, running_var = np.zeros(1), np.ones(1)
    R.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, unbiased_running_var=False)
    np.testing.assert_allclose([running_mean[0], running_var[0]], [2.0, 1.0])


@pytest.mark.parametrize("unbiased, expected_var", [(False, 14 / 3), (True, 64 / 9)])
def test_masked_ghost_batches_weight_each_ghost_by_its_valid_count(unbiased, expected_var):
    """docs/decisions.md: with a mask, the running statistics move toward the count-weighted mean of the
    per-ghost statistics (Keras' plain average when every ghost holds as many values). By hand: strided
    ghosts of 4 rows, ghost 0 = rows 0, 2, 4, 6 = [0, 2, 4, 6] (mean 3, var 5, unbiased 20/3), ghost 1 =
    rows 1, 3 = [10, 14] (mean 12, var 4, unbiased 8; rows 5 and 7 masked). Weighted 4:2, the mean is 6 and
    the variance (4 * 5 + 2 * 4) / 6 = 14/3, unbiased (4 * 20/3 + 2 * 8) / 6 = 64/9 (plain averages: 7.5, 4.5, 22/3)."""
    x = np.array([0.0, 10.0, 2.0, 14.0, 4.0, 100.0, 6.0, -100.0]).reshape(8, 1)
    mask = np.array([1, 1, 1, 1, 1, 0, 1, 0], dtype=bool).reshape(8, 1)
    running_mean, running_var = np.zeros(1), np.ones(1)
    y = R.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, eps=1e-5, mask=mask,
                     virtual_batch_size=4, unbiased_running_var=unbiased)
    np.testing.assert_allclose([running_mean[0], running_var[0]], [6.0, expected_var])
    ghost = np.arange(8) % 2  # (padded rows too are normalized with their ghost's statistics)
    mean, var = np.where(ghost, 12.0, 3.0), np.where(ghost, 4.0, 5.0)
    np.testing.assert_allclose(y.ravel(), (x.ravel() - mean) / np.sqrt(var + 1e-5))


def test_renorm_running_variance_is_derived_from_moving_stddev(rng):
    x = rng.normal(size=(8, 2)) * 3
    running_mean, running_var = np.zeros(2), np.ones(2)
    moving_stddev, renorm_mean, renorm_stddev = np.ones(2), np.zeros(2), np.ones(2)
    R.batch_norm(x, running_mean, running_var, training=True, momentum=0.1, eps=1e-3, renorm_mean=renorm_mean,
                 renorm_stddev=renorm_stddev, moving_stddev=moving_stddev, renorm_momentum=0.2,
                 unbiased_running_var=False)
    s = np.sqrt(x.var(0) + 1e-3)
    np.testing.assert_allclose(renorm_stddev, 0.8 + 0.2 * s)
    np.testing.assert_allclose(moving_stddev, 0.9 + 0.1 * s)
    np.testing.assert_allclose(running_var, np.maximum(moving_stddev ** 2 - 1e-3, 0))
    np.testing.assert_allclose(renorm_mean, 0.2 * x.mean(0))
    assert math.isclose(running_mean[0], 0.1 * x.mean(0)[0])


def test_renorm_running_buffers_with_torch_s_unbiased_running_variance():
    """docs/decisions.md: in the PyTorch vocabulary moving_stddev tracks sqrt(unbiased var + eps) (so running_var
    keeps torch.nn's unbiased meaning), renorm_stddev the biased batch stddev that r divides by."""
    x = np.array([[1.0], [3.0]])  # mean 2, biased var 1, unbiased 2
    running_mean, running_var = np.zeros(1), np.ones(1)
    moving_stddev, renorm_mean, renorm_stddev = np.ones(1), np.zeros(1), np.ones(1)
    R.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, eps=0.25, renorm_mean=renorm_mean,
                 renorm_stddev=renorm_stddev, moving_stddev=moving_stddev, renorm_momentum=1.0)
    np.testing.assert_allclose([renorm_mean[0], renorm_stddev[0]], [2.0, math.sqrt(1.25)])
    np.testing.assert_allclose([running_mean[0], moving_stddev[0], running_var[0]], [2.0, 1.5, 2.0])


def test_renorm_correction_by_hand():
    """r = s / max(renorm_stddev, sqrt(eps)) clipped to [rmin, rmax], d = (mean - renorm_mean) / that, clipped
    to [-dmax, dmax]; s = sqrt(var + eps). Channels: r 2 -> rmax 1.5, r 0.5 -> rmin 0.8, r 1.25 unclipped (the
    floor sqrt(eps) = 0.2 replaces the renorm stddev 0.01)."""
    eps = 0.04
    mean, var = np.array([3.0, -3.0, 0.1]), np.array([4.0, 0.25, 0.0625]) - eps  # s = 2, 0.5, 0.25
    r, d = R.renorm_correction(mean, var, eps, np.zeros(3), np.array([1.0, 1.0, 0.01]), (0.8, 1.5, 1.0))
    np.testing.assert_allclose(r, [1.5, 0.8, 1.25])
    np.testing.assert_allclose(d, [1.0, -1.0, 0.5])


def test_instance_norm_without_input_stats_needs_running_statistics():
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    for call in (lambda: R.instance_norm(x, use_input_stats=False),
                 lambda: R.instance_norm_backward(np.ones_like(x), x, use_input_stats=False)):
        with pytest.raises(ValueError, match="use_input_stats=False normalizes with running_mean and running_var"):
            call()


def test_layer_and_group_norm_refuse_shapes_they_do_not_fit():
    """As functional.py's twins (ATen) do: without weights a mismatched normalized_shape was silently another
    normalization (over the last axes whatever their sizes)."""
    x = np.arange(40, dtype=np.float64).reshape(2, 4, 5)
    for call in (lambda: R.layer_norm(x, 4), lambda: R.layer_norm(x, (2, 4, 5, 1)),
                 lambda: R.layer_norm_backward(np.ones_like(x), x, (5, 4))):
        with pytest.raises(ValueError, match="normalized_shape=.* must be the input's last"):
            call()
    for call in (lambda: R.group_norm(x, 3), lambda: R.group_norm_backward(np.ones_like(x), x, 3)):
        with pytest.raises(ValueError, match="num_groups=3 must divide the channels"):
            call()


@pytest.mark.parametrize("name,shape,args", [
    ("layer_norm", (0, 4), ((4,),)), ("layer_norm", (0, 3, 4), ((3, 4),)), ("group_norm", (0, 4, 3), (2,)),
    ("instance_norm", (0, 4, 3), ()),
])
def test_per_sample_norms_of_an_empty_batch_give_empty_outputs_and_zero_parameter_gradients(name, shape, args):
    """No sample, no group of statistics: the output is empty and gamma/beta's gradients are empty sums, 0 (torch.nn's
    LayerNorm and GroupNorm give both). moments divided the element count by the number of groups, 0 here, and the
    oracle failed with a ZeroDivisionError."""
    x = np.empty(shape)
    param_shape = args[0] if name == "layer_norm" else (shape[1],)
    weight, bias = np.full(param_shape, 2.0), np.full(param_shape, 0.5)
    forward, backward = getattr(R, name), getattr(R, name + "_backward")
    if name == "instance_norm":
        y = forward(x, weight=weight, bias=bias)
        dx, dw, db = backward(np.empty(shape), x, weight=weight, bias=bias)
    else:
        y = forward(x, *args, weight, bias)
        dx, dw, db = backward(np.empty(shape), x, *args, weight, bias)
    assert y.shape == shape and dx.shape == shape
    np.testing.assert_array_equal(dw, np.zeros(param_shape))
    np.testing.assert_array_equal(db, np.zeros(param_shape))


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_an_empty_training_batch_leaves_the_buffers_alone(renorm, rng):
    """An empty batch carries no statistics: the buffers stay as they were (docs/decisions.md, as the layers do),
    not the NaN mean of nothing."""
    buffers = {name: rng.uniform(0.5, 1.5, 3) for name in ("running_mean", "running_var")}
    if renorm:
        buffers.update({name: rng.uniform(0.5, 1.5, 3) for name in ("renorm_mean", "renorm_stddev", "moving_stddev")})
    before = {name: value.copy() for name, value in buffers.items()}
    options = {"renorm_clipping": (0.0, math.inf, math.inf)} if renorm else {}
    y = R.batch_norm(np.empty((0, 3)), training=True, weight=np.ones(3), bias=np.zeros(3), **buffers, **options)
    assert y.shape == (0, 3)
    for name, value in buffers.items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def _spec_training_step(x, mask, rows_of_ghosts, weight, bias, eps, momentum, buffers, clipping, renorm_momentum,
                        adjustment, unbiased):
    """One training step of (N, C) batch norm with every option, written from the spec (Keras' formulas, normkit's
    decisions) and not from reference.py: explicit ghost row lists, torch autograd in float64 for the gradients.
    ``buffers`` (NumPy) move in place. Returns y and a function of the upstream gradient giving (dx, dweight,
    dbias)."""
    import torch

    xt, w, b = (torch.tensor(v, requires_grad=True) for v in (x, weight, bias))
    m = torch.tensor(mask, dtype=torch.float64)
    stats = []  # (count, mean, biased var) per ghost and channel
    y = torch.empty_like(xt)
    for rows in rows_of_ghosts:
        n = m[rows].sum(0)
        mean = (m[rows] * xt[rows]).sum(0) / n
        var = (m[rows] * (xt[rows] - mean) ** 2).sum(0) / n
        stats.append((n, mean, var))
        y = y.index_put((torch.tensor(rows),), (xt[rows] - mean) / torch.sqrt(var + eps))
    total = sum(n for n, _, _ in stats)
    batch_mean = sum(n * mu for n, mu, _ in stats) / total  # count-weighted over ghosts (docs/decisions.md)
    batch_var = sum(n * v for n, _, v in stats) / total
    s = torch.sqrt(batch_var.detach() + eps)
    renorm_stddev = torch.clamp(torch.tensor(buffers["renorm_stddev"]), min=math.sqrt(eps))
    r = torch.clamp(s / renorm_stddev, clipping[0], clipping[1])  # r, d: constants for the gradient
    d = torch.clamp((batch_mean.detach() - torch.tensor(buffers["renorm_mean"])) / renorm_stddev, -clipping[2],
                    clipping[2])
    scale, shift = adjustment
    y = ((y * r + d) * torch.tensor(scale) + torch.tensor(shift)) * w + b  # renorm, then adjustment, then affine
    with torch.no_grad():
        if unbiased:  # PyTorch's vocabulary: n / (n - 1) per ghost, before the count-weighted mean
            estimate = (sum(n * v * n / (n - 1) for n, _, v in stats) / total).numpy()
        else:
            estimate = batch_var.numpy()
        new = lambda old, value, rate: (1 - rate) * old + rate * value
        buffers["renorm_mean"][:] = new(buffers["renorm_mean"], batch_mean.numpy(), renorm_momentum)
        buffers["renorm_stddev"][:] = new(buffers["renorm_stddev"], s.numpy(), renorm_momentum)
        buffers["running_mean"][:] = new(buffers["running_mean"], batch_mean.numpy(), momentum)
        buffers["moving_stddev"][:] = new(buffers["moving_stddev"], np.sqrt(estimate + eps), momentum)
        buffers["running_var"][:] = np.maximum(buffers["moving_stddev"] ** 2 - eps, 0.0)

    def gradients(grad):
        return tuple(g.numpy() for g in torch.autograd.grad(y, (xt, w, b), torch.tensor(grad)))

    return y.detach().numpy(), gradients


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
@pytest.mark.parametrize("unbiased", [True, False], ids=["torch_var", "keras_var"])
def test_every_option_at_once_against_an_implementation_from_the_spec(layout, unbiased, rng):
    """Ghost batches + mask + renorm (r and d unsaturated on some channels, clipped on others) + adjustment: the
    forward pass, all three gradients and the five buffers against _spec_training_step, for two steps (the second
    uses the renorm statistics the first moved). Finite differences cannot check renorm's gradient where r and d
    are not clipped (they carry none by design), so this is the independent check of that case."""
    x_steps = [rng.normal(size=(8, 4)) * [1.0, 3.0, 0.2, 5.0] + [0.0, 2.0, -1.0, 4.0] for _ in range(2)]
    mask = rng.uniform(size=(8, 4)) > 0.25
    mask[:2] = True  # every ghost keeps at least two valid values per channel in both layouts
    mask[4:6] = True
    # virtual_batch_size 4 of 8 rows: Keras' ghost j holds rows j, j + 2, ...; contiguous ones are chunks
    rows = [[j, j + 2, j + 4, j + 6] for j in range(2)] if layout == "strided" else [[0, 1, 2, 3], [4, 5, 6, 7]]
    weight, bias = rng.uniform(0.5, 2.0, 4), rng.normal(size=4)
    scale, shift = rng.uniform(0.5, 1.5, (8, 4)), rng.uniform(-0.2, 0.2, (8, 4))
    clipping = (0.7, 1.4, 0.5)
    ours = {"running_mean": rng.normal(size=4), "running_var": rng.uniform(0.5, 2, 4),
            "renorm_mean": rng.normal(size=4), "renorm_stddev": rng.uniform(0.5, 3, 4),
            "moving_stddev": rng.uniform(0.5, 2, 4)}
    spec = {name: value.copy() for name, value in ours.items()}
    for x in x_steps:
        g = rng.normal(size=x.shape)
        expected, gradients = _spec_training_step(x, mask, rows, weight, bias, 1e-3, 0.2, spec, clipping, 0.3,
                                                  (scale, shift), unbiased)
        options = dict(mask=mask, virtual_batch_size=4, ghost_layout=layout, adjustment=lambda shape: (scale, shift))
        grads = R.batch_norm_backward(g, x, ours["running_mean"], ours["running_var"], weight, bias, True, 1e-3,
                                      renorm_mean=ours["renorm_mean"], renorm_stddev=ours["renorm_stddev"],
                                      renorm_clipping=clipping, **options)
        y = R.batch_norm(x, weight=weight, bias=bias, training=True, momentum=0.2, eps=1e-3, renorm_clipping=clipping,
                         renorm_momentum=0.3, unbiased_running_var=unbiased, **ours, **options)
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, gradients(g)):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        for name in ours:
            np.testing.assert_allclose(ours[name], spec[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_a_ghost_with_a_single_valid_value_stores_its_biased_variance():
    """stats.bessel_factor: n / (n - 1) has no value for n = 1; the biased variance (0) is stored, not inf * 0 = NaN.
    By hand: strided ghosts of 4 rows, ghost 0 = rows 0, 2, 4, 6 = [0, 2, 4, 6] (mean 3, unbiased var 20/3),
    ghost 1 = row 1 = [10] alone (rows 3, 5, 7 masked: mean 10, var 0, stored as 0). Weighted 4:1, the running
    mean is 22/5 and the unbiased running variance (4 * 20/3 + 1 * 0) / 5 = 16/3."""
    x = np.array([0.0, 10.0, 2.0, 50.0, 4.0, 100.0, 6.0, -100.0]).reshape(8, 1)
    mask = np.array([1, 1, 1, 0, 1, 0, 1, 0], dtype=bool).reshape(8, 1)
    running_mean, running_var = np.zeros(1), np.ones(1)
    R.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, mask=mask, virtual_batch_size=4)
    np.testing.assert_allclose([running_mean[0], running_var[0]], [22 / 5, 16 / 3])
    # The rule itself, elementwise on arrays as on numbers: 1 for n <= 1, n / (n - 1) above.
    from normkit.stats import bessel_factor
    np.testing.assert_allclose(bessel_factor(np.array([0.0, 1.0, 2.0, 5.0])), [1.0, 1.0, 2.0, 1.25])
    assert [bessel_factor(n) for n in (0, 1, 2, 5)] == [1.0, 1.0, 2.0, 1.25]


@pytest.mark.parametrize("virtual_batch_size", [None, 3], ids=["whole_batch", "ghost"])
def test_masked_positions_holding_nan_or_inf_do_not_reach_the_statistics(virtual_batch_size, rng):
    """Padding may hold anything (NaN, inf): a masked position must not count, as Keras' where(mask, x, 0).

    The statistics were taken as sum(mask * x) and sum(mask * (x - mean)^2), and 0 * NaN (or 0 * inf) is NaN:
    one NaN pad made the whole channel's statistics, the valid outputs and the running buffers NaN.
    """
    x = rng.normal(size=(6, 3, 5)) * 2 + 1
    mask = (rng.uniform(size=(6, 1, 5)) < 0.7).astype(float)
    mask[:, :, 0] = 1.0  # every ghost batch sees a valid value
    mask[0, 0, 1] = mask[1, 0, 2] = mask[2, 0, 3] = 0.0
    padded = x.copy()
    padded[0, :, 1], padded[1, :, 2], padded[2, :, 3] = np.nan, np.inf, -np.inf
    valid = np.broadcast_to(mask, x.shape) > 0
    results = []
    for data in (padded, np.where(valid, x, 0.0)):
        running_mean, running_var = np.zeros(3), np.ones(3)
        y = R.batch_norm(data, running_mean, running_var, None, None, True, 0.1, 1e-3, axis=1, mask=mask,
                         virtual_batch_size=virtual_batch_size)
        assert np.isfinite(y[valid]).all() and np.isfinite(running_mean).all() and np.isfinite(running_var).all()
        results.append((y[valid], running_mean, running_var))
    for ours, clean in zip(results[0], results[1]):
        np.testing.assert_allclose(ours, clean, rtol=1e-12, atol=1e-12)
    if virtual_batch_size is None:
        # closed form on the valid values alone
        values = [x[:, c][valid[:, c]] for c in range(3)]
        mean, var = np.array([v.mean() for v in values]), np.array([v.var() for v in values])
        counts = np.array([v.size for v in values])
        np.testing.assert_allclose(results[0][1], 0.1 * mean, rtol=1e-12)
        np.testing.assert_allclose(results[0][2], 0.9 + 0.1 * var * counts / (counts - 1), rtol=1e-12)
        expected = ((x - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-3))[valid]
        np.testing.assert_allclose(results[0][0], expected, rtol=1e-12)


def test_a_mask_is_boolean_any_nonzero_value_marks_a_valid_position():
    """docs/decisions.md ("Masks"): a mask marks valid positions, it does not weight them. By hand, rows 0, 1, 3
    valid (mask 1, 0.5, 2): values [1, 3, 8], mean 4, biased variance 26/3 (unbiased 13); row 2 (mask 0) is
    padding. As weights, 0.5 and 2 would give mean (1 + 1.5 + 16) / 3.5, another number."""
    x = np.array([[1.0], [3.0], [100.0], [8.0]])
    mask = np.array([[1.0], [0.5], [0.0], [2.0]])
    count, mean, var = R.moments(x, (0,), mask)
    np.testing.assert_allclose([count.item(), mean.item(), var.item()], [3.0, 4.0, 26 / 3])
    running_mean, running_var = np.zeros(1), np.ones(1)
    y = R.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, eps=1e-5, mask=mask)
    np.testing.assert_allclose(y.ravel(), (x.ravel() - 4.0) / np.sqrt(26 / 3 + 1e-5))
    np.testing.assert_allclose([running_mean[0], running_var[0]], [4.0, 13.0])
    # The backward's statistics term too: d/dx of sum(g * y), g = 1 on row 1 alone, by central differences.
    g = np.array([[0.0], [1.0], [0.0], [0.0]])
    dx = R.batch_norm_backward(g, x, None, None, training=True, eps=1e-5, mask=mask)[0]
    valid = mask != 0
    np.testing.assert_allclose(dx, numeric_gradient(
        lambda v: (R.batch_norm(v, training=True, eps=1e-5, mask=valid) * g).sum(), x.copy()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.0, 0.1])
def test_a_running_buffer_that_overflowed_stays_infinite_as_torch_nn_s(momentum, rng):
    """torch.nn blends (1 - m) b + m t: an inf buffer stays inf (and with m = 0 does not change). The reference's
    b + m (t - b) made it inf - inf = NaN, also with m = 0 and for a masked channel that saw nothing."""
    import torch
    x = rng.normal(size=(8, 2))
    running_mean, running_var = np.zeros(2), np.array([np.inf, 1.0])
    plain_mean, plain_var = torch.zeros(2, dtype=torch.float64), torch.tensor([math.inf, 1.0], dtype=torch.float64)
    R.batch_norm(x, running_mean, running_var, training=True, momentum=momentum)
    torch.nn.functional.batch_norm(torch.from_numpy(x), plain_mean, plain_var, training=True, momentum=momentum)
    np.testing.assert_allclose(running_var, plain_var.numpy(), rtol=1e-12)
    assert np.isinf(running_var[0])
    unseen = np.array([np.inf, 1.0])
    mask = np.ones((8, 2), dtype=bool)
    mask[:, 0] = False
    R.batch_norm(x, np.zeros(2), unseen, training=True, momentum=0.1, mask=mask)
    assert np.isinf(unseen[0])


def test_renorm_state_in_other_shapes_than_running_mean_s_moves_as_the_vectors_do(rng):
    """Per-feature tensors may come in any shape (one value per feature), in both twins: a renorm state of (1, C)
    or (C, 1) beside (C,) running statistics gave a running_var resized in place (functional), a (C, C) broadcast,
    or an error after running_mean had moved (both twins)."""
    import torch
    from normkit import functional as F
    x = rng.normal(size=(8, 4)) + 1
    mask = rng.random((8, 4)) > 0.2
    values = dict(running_mean=np.full(4, 0.1), running_var=np.full(4, 1.2), renorm_mean=np.full(4, 0.2),
                  renorm_stddev=np.full(4, 1.1), moving_stddev=np.full(4, 1.3))
    vectors = {name: value.copy() for name, value in values.items()}
    expected = R.batch_norm(x, training=True, mask=mask, renorm_momentum=0.5, **vectors)
    for shapes in [((4,), (4,), (1, 4), (4, 1), (1, 4)), ((4, 1), (1, 4), (4,), (4,), (4, 1))]:
        mixed = {name: value.reshape(shape) for (name, value), shape in zip(values.items(), shapes)}
        reference = {name: value.copy() for name, value in mixed.items()}
        np.testing.assert_allclose(R.batch_norm(x, training=True, mask=mask, renorm_momentum=0.5, **reference),
                                   expected, rtol=1e-12, atol=1e-12)
        twin = {name: torch.tensor(value) for name, value in mixed.items()}
        y = F.batch_norm(torch.from_numpy(x), training=True, mask=torch.from_numpy(mask), renorm_momentum=0.5,
                         **twin)
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)
        for name, shape in zip(values, shapes):
            assert reference[name].shape == shape and tuple(twin[name].shape) == shape, name
            np.testing.assert_allclose(reference[name].ravel(), vectors[name], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(twin[name].numpy().ravel(), vectors[name], rtol=1e-12, atol=1e-14)
