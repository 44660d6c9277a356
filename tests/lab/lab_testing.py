"""Helpers the lab's test modules share: tiny run settings, one-line error checks, folder snapshots, IDX data."""

import json
from pathlib import Path

import numpy as np

from normkit.lab import data
from normkit.lab.data import write_idx

# ../shared/datasets/mnist relative to the repository root: the 10,000-image MNIST test set, never copied here.
SHARED_MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "mnist"

TINY = ["--train-limit", "200", "--batch-size", "32", "--quiet", "--no-tensorboard"]  # 160 train images: 5 steps


def one_line_error(capsys, *phrases: str) -> str:
    """The stderr of a failed command: exactly one line, no traceback, holding every one of ``phrases``."""
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    for phrase in phrases:
        assert phrase in error, (phrase, error)
    return error


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def strict_json(path: Path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which strict JSON parsers refuse")
    return json.loads(path.read_text(), parse_constant=refuse)


def write_mnist(directory: Path, seed: int, train: int = 200, test: int = 40) -> Path:
    """An MNIST-format dataset (IDX files) of random images; another seed gives other images."""
    rng = np.random.default_rng(seed)
    for part, count in (("train", train), ("test", test)):
        write_idx(directory / (data.IDX_FILES[part][0] + ".gz"), rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(directory / (data.IDX_FILES[part][1] + ".gz"), rng.integers(0, 10, count, dtype=np.uint8))
    return directory
