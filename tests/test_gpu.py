"""On a CUDA device normkit computes what it computes on the CPU (skipped cleanly where there is no GPU)."""

import pytest
import torch

import normkit

from oracle import assert_close, to_numpy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")

CASES = {
    "plain": (lambda: normkit.BatchNorm2d(4), (8, 4, 5, 5), None),
    "features-last": (lambda: normkit.BatchNorm(4, axis=-1), (8, 5, 5, 4), None),
    "renorm": (lambda: normkit.BatchNorm(4, renorm=True, renorm_clipping={"rmax": 1.1, "rmin": 0.9, "dmax": 0.2}),
               (8, 4, 5, 5), None),
    "ghost": (lambda: normkit.BatchNorm(4, virtual_batch_size=4), (8, 4, 5, 5), None),
    "ghost-large": (lambda: normkit.BatchNorm(8, virtual_batch_size=8, renorm=True), (32, 8, 8, 8), None),
    "mask": (lambda: normkit.BatchNorm(4, axis=-1), (6, 7, 4), (6, 7)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_cpu(name, rng):
    build, shape, mask_shape = CASES[name]
    torch.manual_seed(0)
    layers = {device: build().double().to(device) for device in ("cpu", "cuda")}
    layers["cuda"].load_state_dict(layers["cpu"].state_dict())
    for step in range(2):
        x = torch.as_tensor(rng.normal(size=shape) * (step + 1) + step)
        g = torch.as_tensor(rng.normal(size=shape))
        mask = None if mask_shape is None else torch.as_tensor(rng.uniform(size=mask_shape) > 0.3)
        results = {}
        for device, layer in layers.items():
            leaf = x.to(device).requires_grad_(True)
            y = layer(leaf, mask=None if mask is None else mask.to(device))
            grads = torch.autograd.grad(y, [leaf, layer.weight, layer.bias], g.to(device))
            results[device] = [y, *grads, *layer.state_dict().values()]
        for on_cpu, on_gpu in zip(results["cpu"], results["cuda"]):
            assert_close(on_gpu, to_numpy(on_cpu), rtol=1e-7, atol=1e-9)


def test_cuda_half_precision_keeps_float32_state():
    layer = normkit.BatchNorm2d(4).cuda()
    y = layer(torch.randn(8, 4, 5, 5, device="cuda", dtype=torch.float16))
    assert y.dtype == torch.float16 and layer.running_mean.dtype == torch.float32
    assert torch.isfinite(y).all()
