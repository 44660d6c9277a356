"""Where a small training step's time goes on the host, by Python function: cProfile over fwd+bwd steps of an option.

On a GPU a small BatchNorm step is bound by the host (launches, Python, autograd), not by the
device: the wall time per step and cProfile's table say which calls cost what, for normkit with
``normkit.kernels`` off and on, beside torch.nn's plain layer on the same tensor. A tool for
finding overhead, not a benchmark (cProfile slows Python itself; benchmarks/ holds the ratios).

    python tools/profile_step.py --device cuda --variants renorm,ghost,mask --top 25
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch

import normkit
import normkit.kernels

# name: (layer factory of the feature count, input shape, features last, masked)
VARIANTS = {
    "plain": (lambda c: normkit.BatchNorm2d(c), (64, 16, 8, 8), False, False),
    "renorm": (lambda c: normkit.BatchNorm(c, renorm=True), (64, 16, 8, 8), False, False),
    "ghost": (lambda c: normkit.BatchNorm(c, virtual_batch_size=16), (64, 16, 8, 8), False, False),
    "mask": (lambda c: normkit.BatchNorm(c, axis=-1), (64, 50, 120), True, True),
}


def _steps(step, count: int, device: str) -> float:
    """Seconds per step of ``count`` steps, the device waited for once at the end."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / count


def _training_step(layer, x, g, mask):
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        y = layer(x) if mask is None else layer(x, mask=mask)
        torch.autograd.grad(y, [x, *params], g)
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=300, help="steps timed (and as many profiled); default 300")
    parser.add_argument("--top", type=int, default=20, help="rows of cProfile's table (by own time); default 20")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    device = args.device
    torch.manual_seed(0)
    for name in names:
        build, shape, features_last, masked = VARIANTS[name]
        channels = shape[-1] if features_last else shape[1]
        x = torch.randn(shape, device=device, requires_grad=True)
        g = torch.randn(shape, device=device)
        mask = None
        if masked:
            lengths = torch.randint(shape[1] // 2, shape[1] + 1, (shape[0],), device=device)
            mask = torch.arange(shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)
        reference = torch.nn.BatchNorm1d(channels).to(device) if features_last else \
            torch.nn.BatchNorm2d(channels).to(device)
        plain_x = x.detach().reshape(-1, channels).requires_grad_(True) if features_last else x
        plain_g = g.reshape(-1, channels) if features_last else g
        timings = {"torch.nn plain": _training_step(reference, plain_x, plain_g, None)}
        layer = build(channels).to(device)
        timings["normkit"] = _training_step(layer, x, g, mask)
        print(f"\n=== {name} {tuple(shape)} on {device}")
        for kernels_on in (False, True):
            with normkit.kernels.switched(kernels_on):
                for label, step in timings.items():
                    if label.startswith("torch.nn") and kernels_on:
                        continue
                    _steps(step, 20, device)  # warm-up: compiles, caches, allocator
                    per_step = _steps(step, args.steps, device)
                    shown = label if label.startswith("torch.nn") else f"{label} (kernels {'on' if kernels_on else 'off'})"
                    print(f"{shown:28s} {per_step * 1e6:9.1f} µs per step")
        with normkit.kernels.switched(True):
            profiler = cProfile.Profile()
            profiler.enable()
            _steps(timings["normkit"], args.steps, device)
            profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime")
        stats.print_stats(args.top)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-6000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
