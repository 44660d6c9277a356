"""Shared test helpers: tensor<->array conversion, tolerance per dtype for comparing with the reference, kernel routing."""

import contextlib
import math

import numpy as np
import torch

TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5),
             torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}


def to_numpy(tensor):
    # A copy: the reference updates running buffers in place and must never alias the module's.
    return None if tensor is None else tensor.detach().to(torch.float64).cpu().numpy().copy()


def assert_close(actual, expected, dtype=torch.float64, **overrides):
    tol = dict(TOLERANCE[dtype])
    tol.update(overrides)
    actual = to_numpy(actual) if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_allclose(actual, np.asarray(expected, dtype=np.float64), **tol)



def numeric_gradient(f, x, step=1e-6):
    """Central differences of the scalar function f at x, in float64 (the finite-difference oracle of a backward)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + step
        plus = f(x)
        flat[i] = old - step
        minus = f(x)
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * step)
    return grad


def assert_same_training_steps(first, second, shape, rng, steps=3, state=lambda layer: layer.state_dict()):
    """``steps`` training steps of two layers on the same float64 data: outputs, input and parameter gradients
    and every entry of ``state`` (the state_dict) equal to 1e-12 (one execution path against another)."""
    for step in range(steps):
        x = torch.tensor(rng.normal(size=shape) * (step + 2) + step)
        g = torch.tensor(rng.normal(size=shape))
        results = []
        for layer in (first, second):
            leaf = x.clone().requires_grad_()
            y = layer(leaf)
            results.append([y, *torch.autograd.grad(y, [leaf, *layer.parameters()], g)])
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for (name, got), want in zip(state(first).items(), state(second).values(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


def assert_same_config(ours, theirs, path="config"):
    """Equal dicts; numbers equal to float32 precision (Keras keeps regularization factors as float32)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and set(ours) == set(theirs), f"{path}: keys {sorted(ours)} vs {sorted(theirs)}"
        for key in theirs:
            assert_same_config(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, float) and not isinstance(ours, bool):
        assert isinstance(ours, (int, float)) and math.isclose(ours, theirs, rel_tol=1e-6), f"{path}: {ours} vs {theirs}"
    else:
        assert ours == theirs, f"{path}: {ours!r} vs {theirs!r}"


def assert_training_step(layer, y, x_grad, expected, expected_grads, expected_buffers, dtype=torch.float64):
    """One training step of ``layer`` against the reference: output, input/weight/bias gradients, buffers."""
    assert_close(y, expected, dtype)
    assert_close(x_grad, expected_grads[0], dtype)
    assert_close(layer.weight.grad, expected_grads[1], dtype)
    assert_close(layer.bias.grad, expected_grads[2], dtype)
    for name, value in expected_buffers.items():
        assert_close(getattr(layer, name), value, dtype, err_msg=name)


@contextlib.contextmanager
def routed_to_triton(kernels, on=True):
    """Within the block, CPU calls of the fused path go to the Triton kernels (interpreted)."""
    previous, kernels._triton_on_cpu = kernels._triton_on_cpu, on
    try:
        yield
    finally:
        kernels._triton_on_cpu = previous


def spawn_processes(worker, nprocs, args=(), deadline=180.0):
    """Run ``worker(rank, *args)`` in ``nprocs`` processes; fail (having ended them) if they are not done in time.

    torch.multiprocessing.spawn's join waits forever: a collective that one process never joins would
    hang the test run instead of failing it.
    """
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    end = time.monotonic() + deadline
    while not context.join(timeout=max(end - time.monotonic(), 0.1)):
        if time.monotonic() > end:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{nprocs} processes were not done after {deadline:.0f} s (a collective that hangs?)")


def errors_of(calls):
    """Each call's error as "Type: message" (None when it raised nothing), for a worker process to record and
    a test to check: a spawned process cannot raise into pytest."""
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except Exception as error:  # noqa: BLE001 (recorded; the test says what was expected)
            errors[name] = f"{type(error).__name__}: {error}"
    return errors


def keras_initial_weights(rng, names, shape):
    """Random Keras BN weights of the given names, in float32: positive variances and stddevs, gammas of both signs
    (the differential tests and tools/fuzz_keras.py draw alike)."""
    values = []
    for name in names:
        if name in ("moving_variance",):
            values.append(rng.uniform(0.3, 3.0, shape))
        elif name in ("moving_stddev", "renorm_stddev"):
            values.append(rng.uniform(0.5, 2.0, shape))
        elif name == "gamma":
            values.append(rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape))
        else:
            values.append(rng.normal(size=shape))
    return [value.astype(np.float32) for value in values]
