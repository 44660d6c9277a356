"""normkit under torch.compile vs torch.nn under torch.compile, side by side in one process.

    python benchmarks/bench_compile.py [--threads 1] [--budget 4] [--device cuda] [--shapes 64,120 64,16,8,8]

Training forward + backward (``torch.autograd.grad`` w.r.t. input, weight and bias) of layers
compiled with ``torch.compile`` (inductor, default options), interleaved (see common.compare).
Contenders per shape: torch.nn eager (the reference point), torch.nn compiled, and normkit
compiled: plain (the drop-in class), renorm, ghost batches (virtual_batch_size=16). The ratios
are to torch.nn compiled. Compiled normkit graphs always recenter the statistics (exact variance
far from zero; see docs/decisions.md, "torch.compile"), which is one fused subtraction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_device_argument, check_device, compare, fmt_ratio, fmt_us, machine_line,  # noqa: E402
                    set_threads, training_step)

import normkit  # noqa: E402


def torch_bn(channels, rank, device):
    return (torch.nn.BatchNorm1d if rank <= 3 else torch.nn.BatchNorm2d)(channels).to(device)


def contenders(shape, device):
    channels = shape[1]
    torch.manual_seed(0)
    x, g = torch.randn(shape, device=device) * 2 + 0.5, torch.randn(shape, device=device)
    layers = {"torch.nn": torch_bn(channels, len(shape), device),
              "torch.nn compiled": torch_bn(channels, len(shape), device),
              "normkit compiled": (normkit.BatchNorm1d if len(shape) <= 3 else normkit.BatchNorm2d)(channels),
              "normkit renorm compiled": normkit.BatchNorm(channels, renorm=True),
              "normkit ghost compiled": normkit.BatchNorm(channels, virtual_batch_size=16)}
    steps = {}
    for name, layer in layers.items():
        layer.to(device)
        call = layer if name == "torch.nn" else torch.compile(layer)
        steps[name] = training_step(call, x, g, [layer.weight, layer.bias])
    return steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timing per shape (default 4)")
    parser.add_argument("--shapes", nargs="+", default=["64,120", "64,16,8,8", "64,6,24,24"])
    add_device_argument(parser)
    args = parser.parse_args(argv)
    check_device(args.device)
    set_threads(args.threads)
    # Every layer here is its own compiled instance of the same forward: one graph each.
    torch._dynamo.config.cache_size_limit = 64
    print(machine_line(args.threads, args.device))
    print()
    names = ["torch.nn", "torch.nn compiled", "normkit compiled", "normkit renorm compiled", "normkit ghost compiled"]
    print("| shape | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split(","))
        result = compare(contenders(shape, args.device), budget_s=args.budget, device=args.device)
        cells = [f"{fmt_us(result.medians[n])} ({fmt_ratio(result.ratio(n, 'torch.nn compiled'))})" for n in names]
        print(f"| ({','.join(map(str, shape))}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
