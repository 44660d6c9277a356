"""Fixtures shared by the core tests (helpers live in oracle.py: conftest is not importable by name)."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from hypothesis import settings

from oracle import routed_to_triton

# The property tests draw the same examples on every run (derandomized): CI is reproducible, and a failure is the
# code's change, not a new draw's. (Fresh random draws failed one CI run of several on 2026-11-30: a finite-difference
# oracle too coarse, mended; a reference fed unrounded inputs, mended; and float32's own rounding of a masked
# batch's mean, amplified by padding's gradient: docs/decisions.md, "On CUDA, Triton".)
settings.register_profile("normkit", derandomize=True)
settings.load_profile("normkit")

# Without a GPU, normkit.kernels' Triton kernels run in Triton's interpreter (NumPy on the CPU); the
# switch is read when a kernel is defined, so it is set before anything imports them.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A build of normkit.kernels cached on this machine would otherwise be loaded by every `import normkit`
# (NORMKIT_FUSED_KERNELS=auto), in this process and in the ones tests start: tests choose the
# execution they check (the ``execution`` fixture, ``switched``); subprocesses inherit the setting.
os.environ["NORMKIT_FUSED_KERNELS"] = "0"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _fused_kernel_or_skip():
    """Build normkit.kernels' C++ kernel, or skip (fail when NORMKIT_REQUIRE_KERNELS=1, as CI sets)."""
    from normkit import kernels

    try:
        kernels.build()
    except RuntimeError as error:
        if os.environ.get("NORMKIT_REQUIRE_KERNELS") == "1":
            raise
        pytest.skip(f"the fused kernel cannot be built here: {error}")
    return kernels


@pytest.fixture(params=["aten", "fused"])
def execution(request):
    """Run a test twice: on ATen's paths, and with normkit.kernels' fused C++ kernel switched on.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("execution")``.
    """
    from normkit import kernels

    if request.param == "fused":
        _fused_kernel_or_skip()
    with kernels.switched(request.param == "fused"):
        yield request.param


def _triton_kernels_or_skip():
    """normkit.kernels with its Triton kernels importable in interpreter mode, or skip (fail in CI)."""
    kernels = _fused_kernel_or_skip()
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run interpreted only on a machine without a GPU; with one, "
                    "tests/test_gpu.py runs them compiled")
    if kernels._triton_kernels() is None:
        if os.environ.get("NORMKIT_REQUIRE_KERNELS") == "1":
            raise RuntimeError(f"Triton is needed for normkit.kernels' CUDA kernels: {kernels._triton_failure}")
        pytest.skip(f"Triton is not importable here ({kernels._triton_failure}); pip install triton")
    return kernels


@pytest.fixture(params=["cpp", "triton"])
def fused_kernels(request):
    """The fused path switched on for one test: the C++ kernel, then the Triton kernels (interpreted)."""
    kernels = _triton_kernels_or_skip() if request.param == "triton" else _fused_kernel_or_skip()
    with kernels.switched(True), routed_to_triton(kernels, request.param == "triton"):
        yield kernels


@pytest.fixture
def cpp_kernel():
    """The fused C++ kernel switched on for one test (for what only it does: CPU dtypes and limits)."""
    kernels = _fused_kernel_or_skip()
    with kernels.switched(True):
        yield kernels


@pytest.fixture(scope="session")
def built_kernels():
    """normkit.kernels with its kernel built (not switched on): for hypothesis tests, which refuse
    function-scoped fixtures."""
    return _fused_kernel_or_skip()


@pytest.fixture(scope="session")
def built_triton_kernels():
    """normkit.kernels with its Triton kernels ready to run interpreted (not switched on); for hypothesis."""
    return _triton_kernels_or_skip()
