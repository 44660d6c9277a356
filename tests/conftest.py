"""Fixtures shared by the core tests (helpers live in oracle.py: conftest is not importable by name)."""

import os

import numpy as np
import pytest


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


@pytest.fixture
def fused_kernels():
    """The fused kernel switched on for one test."""
    kernels = _fused_kernel_or_skip()
    with kernels.switched(True):
        yield kernels


@pytest.fixture(scope="session")
def built_kernels():
    """normkit.kernels with its kernel built (not switched on): for hypothesis tests, which refuse
    function-scoped fixtures."""
    return _fused_kernel_or_skip()
