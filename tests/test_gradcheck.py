"""torch.autograd.gradcheck (float64) through every layer and option, in training and eval."""

import pytest
import torch
from torch.autograd import gradcheck

import normkit


def _check(layer, shape, **forward_kwargs):
    layer = layer.double()
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    params = [p for p in layer.parameters() if p.requires_grad]

    def run(x, *params):
        return layer(x, **forward_kwargs)

    assert gradcheck(run, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


LAYERS = {
    "bn1d": (lambda: normkit.BatchNorm1d(3), (5, 3)),
    "bn1d-seq": (lambda: normkit.BatchNorm1d(3), (3, 3, 4)),
    "bn2d": (lambda: normkit.BatchNorm2d(3), (3, 3, 2, 2)),
    "bn3d": (lambda: normkit.BatchNorm3d(2), (2, 2, 2, 2, 2)),
    "bn-axis-last": (lambda: normkit.BatchNorm(3, axis=-1), (3, 2, 3)),
    "bn-axis-tuple": (lambda: normkit.BatchNorm((2, 3), axis=(1, 3)), (3, 2, 2, 3)),
    "bn-no-affine": (lambda: normkit.BatchNorm1d(3, affine=False), (5, 3)),
    # r and d carry no gradient by design, so gradcheck holds only where clipping makes them
    # constant (r = 1.5, d = 0); test_reference checks the unclipped algebra against the oracle.
    "bn-renorm": (lambda: normkit.BatchNorm(3, renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 1.5, "dmax": 0.0}),
                  (6, 3)),
    "bn-ghost": (lambda: normkit.BatchNorm(3, virtual_batch_size=3), (6, 3, 2)),
    "bn-ghost-contiguous": (lambda: normkit.BatchNorm(3, virtual_batch_size=3, ghost_layout="contiguous"), (6, 3)),
    "bn-adjustment": (lambda: normkit.BatchNorm(3, adjustment=lambda s: (torch.full((3,), 1.2), torch.full((3,), .1))),
                      (4, 3)),
    "layer": (lambda: normkit.LayerNorm((3, 2)), (3, 3, 2)),
    "group": (lambda: normkit.GroupNorm(2, 4), (2, 4, 3)),
    "instance": (lambda: normkit.InstanceNorm1d(3, affine=True, track_running_stats=True), (2, 3, 4)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(name, training):
    make, shape = LAYERS[name]
    layer = make().train(training)
    _check(layer, shape)


def test_gradcheck_with_mask():
    layer = normkit.BatchNorm(3, axis=-1)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1]], dtype=torch.bool)
    _check(layer, (2, 4, 3), mask=mask)


def test_gradcheck_frozen_stops_parameter_gradients():
    layer = normkit.BatchNorm1d(3).double().freeze()
    layer.train()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda v: layer(v), (x,))
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
