"""Fixtures for the lab's tests: the real MNIST sample split into train/test IDX files."""

import pytest

from normkit.lab.data import split_test_set

from lab_testing import SHARED_MNIST


@pytest.fixture(scope="session")
def mnist_split_dir(tmp_path_factory):
    """DIR/mnist with train-* = the first 8,000 shared images and t10k-* = the last 2,000."""
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST sample not found at {SHARED_MNIST} (expected t10k-images-idx3-ubyte.gz and "
                    "t10k-labels-idx1-ubyte.gz); these tests need it")
    root = tmp_path_factory.mktemp("data")
    split_test_set(SHARED_MNIST, root / "mnist", train_count=8000)
    return root
