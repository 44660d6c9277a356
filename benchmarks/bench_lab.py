"""Lab training throughput: LeNet with normkit.BatchNorm vs the same LeNet with torch.nn.BatchNorm, one process.

    python benchmarks/bench_lab.py [--rounds 7] [--steps 100] [--threads 1,2] [--device cuda]

Both models train on the same batches (the MNIST sample's 8,000-image split where ../shared/datasets/mnist
exists, else the embedded digits) with the lab's training step: forward, cross-entropy, backward, Keras
RMSprop. Rounds alternate which norm goes first so drift in the machine's load hits both; the table gives
the median images per second and the ratio normkit / torch.nn (>= 0.95 is the bar).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_device_argument, check_device, machine_line, synchronizer  # noqa: E402

from normkit.lab.data import load_dataset, split_test_set  # noqa: E402
from normkit.lab.models import build_model  # noqa: E402
from normkit.lab.optim import build_optimizer  # noqa: E402

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"


def load_images():
    if (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        with tempfile.TemporaryDirectory() as directory:
            split_test_set(SHARED_MNIST, Path(directory) / "mnist")
            return "MNIST sample (8,000 train)", load_dataset("mnist", directory).train
    return "digits (1,437 train)", load_dataset("digits").train


def trainer(norm: str, device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("lenet", norm, "sigmoid").to(device)
    optimizer = build_optimizer("rmsprop", model.parameters())

    def step(images, labels):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def images_per_second(step, batches, sync) -> float:
    sync()
    started = time.perf_counter()
    for images, labels in batches:
        step(images, labels)
    sync()
    return sum(len(labels) for _, labels in batches) / (time.perf_counter() - started)


def interleaved_rates(steps, batches, rounds: int, sync) -> dict:
    """Images per second of every step, one measurement each per round, the order alternating from round to round."""
    names = list(steps)
    rates = {name: [] for name in names}
    for round_index in range(rounds):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            rates[name].append(images_per_second(steps[name], batches, sync))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100, help="training steps of batch 64 per measurement")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to measure")
    add_device_argument(parser)
    args = parser.parse_args()
    device = check_device(args.device)
    sync = synchronizer(device)

    source, (images, labels) = load_images()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    batches = [(images[i].to(device), labels[i].to(device)) for i in order.split(64)[:args.steps] if len(i) == 64]
    print(machine_line(int(args.threads.split(",")[0]), device))
    print(f"data: {source}; {len(batches)} steps of batch 64 per measurement; {args.rounds} rounds (median)")
    print("| threads | normkit BN (img/s) | torch.nn BN (img/s) | ratio normkit / torch.nn |")
    print("|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        steps = {"batch": trainer("batch", device), "torch": trainer("torch", device)}
        for step in steps.values():  # warm-up: first calls allocate and pick kernels
            images_per_second(step, batches[:5], sync)
        rates = interleaved_rates(steps, batches, args.rounds, sync)
        normkit_rate, torch_rate = statistics.median(rates["batch"]), statistics.median(rates["torch"])
        print(f"| {threads} | {normkit_rate:,.0f} | {torch_rate:,.0f} | {normkit_rate / torch_rate:.3f} |", flush=True)


if __name__ == "__main__":
    main()
