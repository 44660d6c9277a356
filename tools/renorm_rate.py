#!/usr/bin/env python
"""Why the lab's `renorm` averages fast: LeNet + Batch Renormalization with renorm_momentum 0.01 vs 0.1.

    python tools/renorm_rate.py        # about 2 minutes on 2 CPU cores; needs ../shared/datasets/mnist

Batch renormalization corrects each batch's statistics toward moving averages (r = sigma_B / sigma,
d = (mu_B - mu) / sigma). The paper updated those averages at a rate chosen to keep up with the
weights over a 130k-step run; the lab's runs are a few hundred to a few thousand steps, with
weights that move at every one. This trains the classic recipe (MNIST split, sigmoid, RMSprop)
with the registry's `renorm` at both rates (`--norm renorm --norm-option renorm_momentum=0.01`), at batch 64 for 5 epochs and at batch 8 for one,
and prints test accuracies (seeds 0, 1, 2) next to plain BN's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from normkit import kernels
from normkit.lab.config import TrainConfig
from normkit.lab.data import load_dataset, split_test_set
from normkit.lab.train import run

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"
SEEDS = (0, 1, 2)
SETTINGS = ((64, 5), (8, 1))  # (batch size, epochs)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # (--help, not a 2-minute run)
    kernels.disable()  # ATen's paths, as tools/make_results.py: the numbers must not depend on a built kernel
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        print(f"the MNIST sample is not at {MNIST}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as data_dir, tempfile.TemporaryDirectory() as runs:
        split_test_set(MNIST, Path(data_dir) / "mnist", train_count=8000)
        splits = load_dataset("mnist", data_dir)
        rows = []
        for label, norm, options in (("batch", "batch", {}), ("renorm, renorm_momentum 0.1", "renorm", {}),
                                     ("renorm, renorm_momentum 0.01", "renorm", {"renorm_momentum": 0.01})):
            cells = []
            for batch_size, epochs in SETTINGS:
                accuracies = [run(TrainConfig(dataset="mnist", data_dir=data_dir, norm=norm, norm_options=options,
                                              seed=seed, batch_size=batch_size, epochs=epochs, quiet=True,
                                              tensorboard=False, overwrite=True, out=f"{runs}/{norm}-{seed}"),
                                  splits=splits)["test_accuracy"] for seed in SEEDS]
                cells.append(f"{statistics.fmean(accuracies):.4f} ({', '.join(f'{a:.4f}' for a in accuracies)})")
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    print("| norm | " + " | ".join(f"batch {b}, {e} epoch{'s' if e > 1 else ''}" for b, e in SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
