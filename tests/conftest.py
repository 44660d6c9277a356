"""Fixtures shared by the core tests (helpers live in oracle.py: conftest is not importable by name)."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
