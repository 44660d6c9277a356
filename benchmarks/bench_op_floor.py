"""How fast can renorm and ghost batches be at small shapes? The bare ATen calls vs normkit vs torch.nn.

    python benchmarks/bench_op_floor.py [--threads 1] [--budget 6] [--shape 64,120]

``minimal_*`` are the fewest PyTorch calls that compute the same step as normkit's option (batch
statistics, ghost combine or renorm's r and d, the folded normalization, the running-statistics
update), written inline with no normkit code, no checks and no options: the floor that any Python
implementation built on ATen's kernels meets. The ratios to torch.nn show how much of normkit's
small-shape cost is that floor (kernel launches) and how much is its own Python; ``*_fused`` is
normkit with ``normkit.kernels`` on (one C++ call each way), which goes below that floor.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (compare, fmt_ratio, fmt_us, machine_line, set_threads, training_step,  # noqa: E402
                    with_kernels)

import normkit  # noqa: E402
import normkit.kernels  # noqa: E402

EPS, MOMENTUM, RENORM_MOMENTUM = 1e-5, 0.1, 0.01


def minimal_ghost(channels: int, virtual: int, weight, bias, running_mean, running_var):
    def call(x):
        groups = x.shape[0] // virtual
        view = x.reshape((virtual, groups * channels) + tuple(x.shape[2:]))
        with torch.no_grad():
            mean, var = torch.batch_norm_update_stats(view, None, None, 0.0)
            batch_mean, batch_var = torch.stack((mean, var)).view(2, groups, -1).mean(dim=1).unbind(0)
            count = view.numel() // view.shape[1]
            torch._foreach_lerp_([running_mean, running_var], [batch_mean, batch_var * (count / (count - 1))],
                                 MOMENTUM)
        y = torch.batch_norm(view, torch.cat([weight] * groups), torch.cat([bias] * groups), None, None, True, 0.0,
                             EPS, False)
        return y.reshape(x.shape)
    return call


def minimal_renorm(weight, bias, running_mean, running_var, renorm_mean, renorm_stddev, moving_stddev):
    def call(x):
        with torch.no_grad():
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
            std = torch.add(var, EPS).sqrt_()
            safe = renorm_stddev.clamp(min=math.sqrt(EPS))
            r = torch.div(std, safe)
            d = torch.sub(mean, renorm_mean).div_(safe)
        y = torch.batch_norm(x, r * weight, torch.addcmul(bias, d, weight), None, None, True, 0.0, EPS, False)
        with torch.no_grad():
            count = x.numel() // x.shape[1]
            torch._foreach_lerp_([renorm_mean, renorm_stddev], [mean, std], RENORM_MOMENTUM)
            unbiased_std = torch.add(var * (count / (count - 1)), EPS).sqrt_()
            torch._foreach_lerp_([running_mean, moving_stddev], [mean, unbiased_std], MOMENTUM)
            torch.mul(moving_stddev, moving_stddev, out=running_var).sub_(EPS).clamp_(min=0.0)
        return y
    return call


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing (default 6)")
    parser.add_argument("--shape", default="64,120", help="input shape, features on axis 1 (default 64,120)")
    parser.add_argument("--virtual", type=int, default=16, help="virtual batch size (default 16)")
    parser.add_argument("--no-fused", action="store_true", help="leave out normkit with its fused C++ kernel")
    return parser.parse_args(argv)


def build_contenders(args: argparse.Namespace) -> dict:
    """The table's training steps by name; ``normkit_*`` on ATen's paths, ``normkit_*_fused`` with the kernel."""
    shape = tuple(int(s) for s in args.shape.split(","))
    channels = shape[1]
    torch.manual_seed(0)
    x, g = torch.randn(shape) * 2 + 0.5, torch.randn(shape)
    params = [torch.ones(channels, requires_grad=True), torch.zeros(channels, requires_grad=True)]
    buffers = [torch.zeros(channels), torch.ones(channels)]
    renorm_buffers = [torch.zeros(channels), torch.ones(channels), torch.ones(channels)]
    reference = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(channels)
    ghost = normkit.BatchNorm(channels, virtual_batch_size=args.virtual)
    renorm = normkit.BatchNorm(channels, renorm=True)
    contenders = {
        "torch.nn": training_step(reference, x, g, [reference.weight, reference.bias]),
        "minimal_ghost": training_step(minimal_ghost(channels, args.virtual, *params, *buffers), x, g, params),
        "normkit_ghost": training_step(ghost, x, g, [ghost.weight, ghost.bias]),
        "minimal_renorm": training_step(minimal_renorm(*params, *buffers, *renorm_buffers), x, g, params),
        "normkit_renorm": training_step(renorm, x, g, [renorm.weight, renorm.bias]),
    }
    if not args.no_fused:
        normkit.kernels.build()
    # The normkit rows are the ATen paths whatever this process's default (a cached build is on from import).
    for name in ("normkit_ghost", "normkit_renorm"):
        if not args.no_fused:
            contenders[name + "_fused"] = with_kernels(contenders[name], True)
        contenders[name] = with_kernels(contenders[name], False)
    return contenders


def main(argv=None) -> None:
    args = parse_arguments(argv)
    set_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    contenders = build_contenders(args)
    print(machine_line(args.threads))
    result = compare(contenders, budget_s=args.budget)
    print(f"\nshape {shape}, training forward + backward, {result.rounds} rounds\n")
    print("| contender | median | ratio to torch.nn |")
    print("|---|---|---|")
    for name, seconds in result.medians.items():
        print(f"| {name} | {fmt_us(seconds)} | {fmt_ratio(result.ratio(name, 'torch.nn'))} |")


if __name__ == "__main__":
    main()
