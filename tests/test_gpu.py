"""On a CUDA device normkit computes what it computes on the CPU and what torch.nn computes there (skipped without a GPU).

The CPU results these tests compare with are themselves checked against the float64 NumPy
reference by the rest of the suite; here the question is only whether moving a layer, its data
and its mask to a GPU changes anything: values, gradients, buffers, dtypes, memory formats.
Tests with ``fused`` in their name run twice on the GPU: on ATen's paths, and with
``normkit.kernels`` on (the Triton kernels, compiled for this GPU).
"""

import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import normkit
import normkit.keras
import normkit.kernels

from oracle import TOLERANCE, assert_close, to_numpy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")

CLIP = {"rmax": 1.1, "rmin": 0.9, "dmax": 0.2}


def _adjust(shape):
    channels = shape[1]
    return torch.linspace(0.5, 1.5, channels).view(1, channels, 1, 1), torch.linspace(-0.2, 0.2, channels).view(
        1, channels, 1, 1)


# name: (layer factory, input shape, mask shape or None)
CASES = {
    "plain 2d": (lambda: normkit.BatchNorm2d(4), (8, 4, 5, 5), None),
    "plain 1d (N,C,L)": (lambda: normkit.BatchNorm1d(6), (7, 6, 9), None),
    "plain 3d": (lambda: normkit.BatchNorm3d(3), (4, 3, 3, 4, 5), None),
    "momentum None": (lambda: normkit.BatchNorm2d(4, momentum=None), (8, 4, 5, 5), None),
    "no running stats": (lambda: normkit.BatchNorm2d(4, track_running_stats=False), (8, 4, 5, 5), None),
    "features-last": (lambda: normkit.BatchNorm(4, axis=-1), (8, 5, 5, 4), None),
    "tuple axis": (lambda: normkit.BatchNorm((3, 4), axis=(1, -1)), (6, 3, 5, 4), None),
    "renorm": (lambda: normkit.BatchNorm(4, renorm=True, renorm_clipping=CLIP), (8, 4, 5, 5), None),
    "ghost strided": (lambda: normkit.BatchNorm(4, virtual_batch_size=4), (8, 4, 5, 5), None),
    "ghost contiguous": (lambda: normkit.BatchNorm(4, virtual_batch_size=2, ghost_layout="contiguous"),
                         (8, 4, 5, 5), None),
    "ghost renorm large": (lambda: normkit.BatchNorm(8, virtual_batch_size=8, renorm=True), (32, 8, 8, 8), None),
    "adjustment": (lambda: normkit.BatchNorm(4, adjustment=_adjust), (8, 4, 5, 5), None),
    "mask (N,T,C)": (lambda: normkit.BatchNorm(4, axis=-1), (6, 7, 4), (6, 7)),
    "mask renorm": (lambda: normkit.BatchNorm(4, axis=-1, renorm=True), (6, 7, 4), (6, 7)),
    "layer norm": (lambda: normkit.LayerNorm((4, 5, 5)), (8, 4, 5, 5), None),
    "group norm": (lambda: normkit.GroupNorm(2, 4), (8, 4, 5, 5), None),
    "instance norm with stats": (lambda: normkit.InstanceNorm2d(4, affine=True, track_running_stats=True),
                                 (8, 4, 5, 5), None),
}


def _step(layer, x, g, mask, device):
    """Output, gradients (input, then every parameter) and buffers of one training step on ``device``."""
    leaf = x.to(device).requires_grad_(True)
    kwargs = {} if mask is None else {"mask": mask.to(device)}
    y = layer(leaf, **kwargs)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [leaf, *params], g.to(device))
    return [y, *grads, *layer.buffers()]


@pytest.fixture(params=[False, True], ids=["aten", "fused"])
def fused(request):
    """Whether the GPU layer runs with normkit.kernels on (Triton) or off (ATen); the CPU one keeps ATen."""
    if request.param:
        normkit.kernels.build()
    return request.param


def _gpu_step(layer, x, g, mask, fused):
    with normkit.kernels.switched(fused):
        return _step(layer, x, g, mask, "cuda")


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_float64_matches_cpu(name, fused, rng):
    build, shape, mask_shape = CASES[name]
    torch.manual_seed(0)
    layers = {device: build().double().to(device) for device in ("cpu", "cuda")}
    layers["cuda"].load_state_dict(layers["cpu"].state_dict())
    for step in range(3):
        x = torch.as_tensor(rng.normal(size=shape) * (step + 1) + step)
        g = torch.as_tensor(rng.normal(size=shape))
        mask = None if mask_shape is None else torch.as_tensor(rng.uniform(size=mask_shape) > 0.3)
        results = {"cpu": _step(layers["cpu"], x, g, mask, "cpu"), "cuda": _gpu_step(layers["cuda"], x, g, mask, fused)}
        assert len(results["cpu"]) == len(results["cuda"])
        for on_cpu, on_gpu in zip(results["cpu"], results["cuda"]):
            assert on_gpu.device.type == "cuda"
            assert_close(on_gpu, to_numpy(on_cpu), rtol=1e-7, atol=1e-9)
    for layer in layers.values():
        layer.eval()
    x = torch.as_tensor(rng.normal(size=shape))
    with torch.no_grad():
        assert_close(layers["cuda"](x.cuda()), to_numpy(layers["cpu"](x)), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["plain 2d", "features-last", "renorm", "ghost strided", "mask (N,T,C)",
                                  "group norm", "layer norm"])
def test_cuda_low_precision_against_cpu_float64(name, dtype, fused, rng):
    """float32 parameters and statistics, input and output in ``dtype``, within that dtype's tolerance."""
    build, shape, mask_shape = CASES[name]
    torch.manual_seed(0)
    exact, on_gpu = build().double(), build().cuda()
    on_gpu.load_state_dict(exact.state_dict())
    x = torch.as_tensor(rng.normal(size=shape) * 2 + 1).to(dtype)
    g = torch.as_tensor(rng.normal(size=shape)).to(dtype)
    mask = None if mask_shape is None else torch.as_tensor(rng.uniform(size=mask_shape) > 0.3)
    expected = _step(exact, x.double(), g.double(), mask, "cpu")
    actual = _gpu_step(on_gpu, x, g, mask, fused)
    assert actual[0].dtype == dtype and actual[1].dtype == dtype
    assert all(p.dtype == torch.float32 for p in on_gpu.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in on_gpu.buffers())
    for index, (value, reference) in enumerate(zip(actual, expected)):
        # Output and gradients carry the input's precision (the upstream gradient is in that dtype too).
        # Buffers hold float32 statistics of the (exactly representable) low-precision inputs.
        is_buffer = index >= len(actual) - len(list(on_gpu.buffers()))
        assert_close(value, to_numpy(reference), torch.float32 if is_buffer else dtype, err_msg=f"item {index}")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_batchnorm2d_equals_torch_nn(memory_format, dtype):
    """Drop-in on the GPU: same outputs, gradients, buffers and output memory format as torch.nn.BatchNorm2d."""
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(16).cuda()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours = normkit.BatchNorm2d(16).cuda()
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = (torch.randn(12, 16, 7, 7, device="cuda") * 3 + step).to(dtype).contiguous(memory_format=memory_format)
        g = torch.randn_like(x)
        results = []
        for layer in (ours, theirs):
            leaf = x.clone().requires_grad_(True)
            y = layer(leaf)
            grads = torch.autograd.grad(y, [leaf, layer.weight, layer.bias], g)
            results.append((y, grads))
        (y_ours, grads_ours), (y_theirs, grads_theirs) = results
        assert y_ours.dtype == y_theirs.dtype
        assert y_ours.is_contiguous(memory_format=memory_format) == y_theirs.is_contiguous(memory_format=memory_format)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(y_ours, y_theirs, **tol)
        for a, b in zip(grads_ours, grads_theirs):
            torch.testing.assert_close(a, b, **tol)
        for name, buffer in theirs.named_buffers():
            torch.testing.assert_close(getattr(ours, name), buffer, rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    x = torch.randn(5, 16, 7, 7, device="cuda").to(dtype).contiguous(memory_format=memory_format)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TOLERANCE[dtype])


def test_cuda_autocast_conv_then_batchnorm_equals_torch_nn():
    """Under autocast a conv gives float16; the BN after it behaves as torch.nn's does."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).cuda()
    theirs, ours = torch.nn.BatchNorm2d(8).cuda(), normkit.BatchNorm2d(8).cuda()
    x = torch.randn(16, 3, 12, 12, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        hidden = conv(x)
        y_theirs, y_ours = theirs(hidden), ours(hidden)
    assert hidden.dtype == torch.float16 and y_ours.dtype == y_theirs.dtype
    torch.testing.assert_close(y_ours, y_theirs, **TOLERANCE[torch.float16])
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_cuda_variance_is_robust_for_large_means():
    """float32 values with mean 1e4 and std 1e-2: batch variance within 1e-3 of float64's, never negative."""
    generator = np.random.default_rng(0)
    values = 1e4 + 1e-2 * generator.standard_normal((256, 3, 8, 8))
    x = torch.as_tensor(values, dtype=torch.float32)
    exact = x.double().var(dim=(0, 2, 3), unbiased=True)  # the float32 values, variance in float64
    layer = normkit.BatchNorm2d(3, momentum=1.0).cuda()
    layer(x.cuda())
    variance = layer.running_var.cpu().double()
    assert (variance >= 0).all()
    np.testing.assert_allclose(variance.numpy(), exact.numpy(), rtol=1e-3)


def test_cuda_keras_layer_builds_on_its_first_input_device(rng):
    """A lazily built Keras-vocabulary layer takes its weights to the device of the data it first sees."""
    shape = (8, 5, 4)
    x = torch.as_tensor(rng.normal(size=shape), dtype=torch.float32)
    mask = torch.as_tensor(rng.uniform(size=shape[:-1]) > 0.2)
    on_cpu = normkit.keras.BatchNormalization(renorm=True, virtual_batch_size=4)
    on_gpu = normkit.keras.BatchNormalization(renorm=True, virtual_batch_size=4)
    expected = on_cpu(x, training=True)
    actual = on_gpu(x.cuda(), training=True)
    assert all(p.device.type == "cuda" for p in on_gpu.parameters())
    assert_close(actual, to_numpy(expected), torch.float32)
    for a, b in zip(on_gpu.get_weights(), on_cpu.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    masked_cpu, masked_gpu = normkit.keras.BatchNormalization(), normkit.keras.BatchNormalization()
    assert_close(masked_gpu(x.cuda(), training=True, mask=mask.cuda()),
                 to_numpy(masked_cpu(x, training=True, mask=mask)), torch.float32)


def test_cuda_state_dict_moves_between_devices_and_libraries():
    torch.manual_seed(0)
    ours = normkit.BatchNorm2d(4).cuda()
    ours(torch.randn(8, 4, 3, 3, device="cuda") * 2 + 1)
    theirs = torch.nn.BatchNorm2d(4)
    theirs.load_state_dict(ours.state_dict())  # CUDA tensors into a CPU torch.nn layer
    ours.eval(), theirs.eval()
    x = torch.randn(3, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x.cuda()).cpu(), theirs(x))


def test_cuda_fold_and_recalibrate():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), normkit.BatchNorm2d(6), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(6 * 6 * 6, 5), normkit.BatchNorm1d(5)).cuda()
    batches = [torch.randn(16, 3, 8, 8, device="cuda") * 2 + 1 for _ in range(4)]
    normkit.recalibrate_running_stats(model, batches)
    # Recalibrated running statistics are the cumulative statistics of the first BN's inputs.
    conv_out = torch.cat([model[0](b) for b in batches]).detach()
    torch.testing.assert_close(model[1].running_mean, conv_out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    model.eval()
    folded, removed = normkit.fold_batch_norm(model)
    assert len(removed) == 2
    x = torch.randn(7, 3, 8, 8, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(p.device.type == "cuda" for p in folded.parameters())


@pytest.mark.parametrize("name", ["renorm", "ghost strided", "ghost contiguous", "ghost renorm large",
                                  "mask (N,T,C)", "mask renorm"])
def test_cuda_options_take_the_triton_kernels_when_enabled(name, monkeypatch, rng):
    """With normkit.kernels on, each option's CUDA training step is one Triton call (not ATen's composite)."""
    triton_kernels = pytest.importorskip("normkit.kernels.triton_batch_norm")
    calls = []
    original = triton_kernels._FusedBatchNorm.apply
    monkeypatch.setattr(triton_kernels._FusedBatchNorm, "apply",
                        lambda *args: calls.append(args[0].shape) or original(*args))
    build, shape, mask_shape = CASES[name]
    layer = build().cuda()
    x = torch.as_tensor(rng.normal(size=shape), dtype=torch.float32, device="cuda")
    mask = None if mask_shape is None else torch.as_tensor(rng.uniform(size=mask_shape) > 0.3, device="cuda")
    with normkit.kernels.switched(True):
        _step(layer, x, torch.randn_like(x), mask, "cuda")
        assert len(calls) == 1, f"{name}: the Triton kernels were not called"
        plain = normkit.BatchNorm2d(4).cuda()
        plain(torch.randn(8, 4, 3, 3, device="cuda"))
        assert len(calls) == 1, "plain BatchNorm on a GPU must keep torch.nn's CUDA kernels"


def test_cuda_fused_gradient_penalty_equals_aten_s():
    """create_graph=True through the Triton kernels: the same second derivatives as ATen's path (graph_backward)."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, device="cuda", dtype=torch.float64) * 3 + 2
    results = []
    for on in (True, False):
        layer = normkit.BatchNorm(3, renorm=True, renorm_clipping={"rmax": 1.1, "rmin": 0.9, "dmax": 0.05})
        layer = layer.to("cuda", torch.float64)
        x_ = x.clone().requires_grad_()
        with normkit.kernels.switched(on):
            y = layer(x_)
        gradient, = torch.autograd.grad(y.pow(3).sum(), x_, create_graph=True)
        results.append([gradient, *torch.autograd.grad(gradient.pow(2).sum(), (x_, layer.weight))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cuda_fused_variance_is_exact_far_from_zero():
    torch.manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(64, 3, 8, device="cuda")).float()
    layer = normkit.BatchNorm(3, virtual_batch_size=32, momentum=1.0).cuda()
    with normkit.kernels.switched(True):
        layer(x)
    ghosts = x.double().view(32, 2, 3, 8).transpose(0, 1)  # Keras' strided ghost batches
    expected = ghosts.var(dim=(1, 3), unbiased=True).mean(0)
    relative = ((layer.running_var.double() - expected).abs() / expected).max().item()
    assert relative < 1e-3 and (layer.running_var >= 0).all()


def _nccl_worker(rank, init_file, out_dir):
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=1)
    try:
        torch.manual_seed(0)
        x = (torch.randn(6, 4, 3, 3) * 2 + 1).cuda().requires_grad_(True)
        synced = normkit.BatchNorm(4, synchronized=True).cuda()
        y = synced(x)
        (grad,) = torch.autograd.grad(y, [x], torch.ones_like(y) * torch.arange(4.0, device="cuda").view(1, 4, 1, 1))
        torch.save({"x": x.detach().cpu(), "y": y.detach().cpu(), "grad": grad.cpu(),
                    "running_var": synced.running_var.cpu()}, os.path.join(out_dir, "nccl.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(), reason="no NCCL in this build")
@pytest.mark.skipif(sys.platform == "win32", reason="file store test runs on POSIX")
def test_cuda_synchronized_over_nccl_equals_local(tmp_path):
    """The NCCL collectives of synchronized=True run on CUDA tensors; one rank equals local statistics."""
    torch.multiprocessing.spawn(_nccl_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=1, join=True)
    saved = torch.load(tmp_path / "nccl.pt", weights_only=True)
    x = saved["x"].requires_grad_(True)
    local = normkit.BatchNorm(4)
    y = local(x)
    (grad,) = torch.autograd.grad(y, [x], torch.ones_like(y) * torch.arange(4.0).view(1, 4, 1, 1))
    torch.testing.assert_close(saved["y"], y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(saved["grad"], grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(saved["running_var"], local.running_var)


def test_cuda_lab_trains_and_its_checkpoint_evaluates_anywhere(tmp_path):
    from normkit.lab.config import TrainConfig
    from normkit.lab.train import evaluate_checkpoint, run

    out = tmp_path / "run"
    cfg = TrainConfig(device="cuda", epochs=1, train_limit=512, out=str(out), tensorboard=False, quiet=True)
    metrics = run(cfg)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and np.isfinite(metrics["test_loss"])
    on_cpu = evaluate_checkpoint(out / "checkpoint.pt", device="cpu")
    on_gpu = evaluate_checkpoint(out / "checkpoint.pt", device="cuda")
    assert on_cpu["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert on_gpu["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert on_cpu["test_loss"] == pytest.approx(on_gpu["test_loss"], rel=1e-4)


def test_cuda_run_resumes_from_its_checkpoint(tmp_path):
    """A CUDA run's checkpoint (its CUDA RNG states, NumPy's keys, mapped to the GPU on loading) resumes on the GPU
    and ends where an uninterrupted run ends (cuDNN's sums may differ in the last bits, hence the tolerance)."""
    from normkit.lab.checkpoint import load_checkpoint
    from normkit.lab.config import TrainConfig
    from normkit.lab.train import run

    settings = dict(device="cuda", train_limit=256, batch_size=32, epochs=2, quiet=True, tensorboard=False)
    run(TrainConfig(out=str(tmp_path / "a"), **settings))
    run(TrainConfig(out=str(tmp_path / "b"), **{**settings, "epochs": 1}))
    run(TrainConfig(out=str(tmp_path / "b"), resume=True, **settings), given={"epochs"})
    expected, actual = (load_checkpoint(tmp_path / p / "checkpoint.pt")["model"] for p in ("a", "b"))
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_cuda_layer_takes_a_mask_from_the_cpu(rng):
    """A padding mask built on the CPU is moved to the input's device, as the Keras layer does."""
    layer = normkit.BatchNorm(4, axis=-1).cuda()
    x = torch.as_tensor(rng.normal(size=(3, 5, 4)), dtype=torch.float32, device="cuda")
    mask = torch.as_tensor(rng.uniform(size=(3, 5)) > 0.3)
    on_host = layer(x, mask=mask)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.load_state_dict(normkit.BatchNorm(4, axis=-1).state_dict())
    on_device = layer(x, mask=mask.cuda())
    torch.testing.assert_close(on_host, on_device)
    for name, value in layer.state_dict().items():
        torch.testing.assert_close(value, state[name])


@pytest.mark.parametrize("name", ["plain 2d", "renorm", "ghost renorm large", "mask renorm"])
def test_cuda_compiled_layer_equals_eager(name, rng):
    """torch.compile on the GPU (inductor's Triton kernels) computes what the eager layer computes."""
    build, shape, mask_shape = CASES[name]
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, compiled_layer = build().cuda(), build().cuda()
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, fullgraph=True)
    for step in range(2):
        x = torch.as_tensor(rng.normal(size=shape) * (step + 1) + step, dtype=torch.float32)
        g = torch.as_tensor(rng.normal(size=shape), dtype=torch.float32)
        mask = None if mask_shape is None else torch.as_tensor(rng.uniform(size=mask_shape) > 0.3)
        for got, want in zip(_step(compiled, x, g, mask, "cuda"), _step(eager, x, g, mask, "cuda"), strict=True):
            assert_close(got, to_numpy(want), torch.float32)


@pytest.mark.parametrize("name,args,shape", [("LayerNorm", (7,), (6, 9, 7)), ("GroupNorm", (3, 9), (6, 9, 4, 4))])
def test_cuda_autocast_layer_and_group_norm_as_torch_nn(name, args, shape):
    """CUDA autocast runs layer_norm and group_norm in float32 and returns float32: normkit's layers too."""
    torch.manual_seed(0)
    ours, theirs = getattr(normkit, name)(*args).cuda(), getattr(torch.nn, name)(*args).cuda()
    x = torch.randn(shape, device="cuda").half()
    with torch.autocast("cuda", dtype=torch.float16):
        y_ours, y_theirs = ours(x), theirs(x)
    assert y_theirs.dtype == torch.float32 and y_ours.dtype == y_theirs.dtype
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=0)
