"""Shared timing helper for the benchmark scripts: interleaved contenders, paired medians.

Every contender is a zero-argument callable doing one unit of work (a training step's forward and
backward, or an inference forward). ``compare`` warms them up, picks a number of calls per sample
(so a sample lasts at least ``sample_s``, which keeps timer and scheduling noise small for
microsecond calls), then runs rounds in which every contender takes one sample back to back, the
order changing from round to round (A, B / B, A / ...; for more contenders a balanced sequence in which each
goes first equally often and follows every other equally often), so drift in the machine's load (other
processes) hits every contender alike, and so does a contender that leaves the caches or the allocator
cold for the next one (Keras' 80 ms step before a 15 ms one made that one read 20% slower when it always came
next). Results are the median per-call time of each contender and
the median over rounds of the paired ratio ``t[name] / t[baseline]`` with its interquartile range.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (else platform's guess)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(threads: int, device: str = "cpu") -> str:
    gpu = ""
    if torch.device(device).type == "cuda":
        gpu = f"GPU: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); "
    return (f"{gpu}CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__}, "
            f"torch.set_num_threads({threads}); Python {platform.python_version()}; {kernels_line()}; "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}")


def kernels_line() -> str:
    """Which execution normkit's default columns ran: a cached build of the fused kernel is used by every import."""
    import normkit.kernels

    on = [kind for kind in ("cpu", "cuda") if normkit.kernels.enabled(kind)]
    return f"normkit.kernels at import: {', '.join(on) + ' on' if on else 'off'} ({normkit.kernels.status()['mode']})"


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="where tensors and modules live: cpu (default) or cuda[:N]; GPU timings wait for "
                             "the device (torch.cuda.synchronize) at the end of every sample")


def table_benchmark_parser(doc: str, budget: float) -> argparse.ArgumentParser:
    """The options of the table benchmarks (--threads, --budget, --min-rounds, --quick, --only, --device);
    a script adds its own, then calls ``parse_table_benchmark_arguments``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--budget", type=float, default=budget, help=f"seconds of timing per row (default {budget:g})")
    parser.add_argument("--min-rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.3 s per row, 3 rounds minimum")
    parser.add_argument("--only", default="", help="run only rows whose label contains this text")
    add_device_argument(parser)
    return parser


def parse_table_benchmark_arguments(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parsed options with --quick applied and the device checked; the thread count set."""
    args = parser.parse_args(argv)
    if args.quick:
        args.budget, args.min_rounds = 0.3, 3
    check_device(args.device)
    set_threads(args.threads)
    return args


def report(args: argparse.Namespace, rows: Callable[[], str]) -> None:
    """Print the machine line, then the table ``rows()`` times and formats (the line first: a run's context)."""
    print(machine_line(args.threads, args.device))
    print()
    print(rows())


def check_device(device: str) -> str:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch.cuda.is_available() is False on this machine; use --device cpu")
    return device


def synchronizer(device: str) -> Callable[[], None]:
    """What a timer calls before reading the clock: waits for queued GPU work; nothing on the CPU."""
    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (interop threads can be set once per process)
        pass


def quantile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Comparison:
    medians: Dict[str, float]                       # seconds per call
    samples: Dict[str, List[float]] = field(repr=False)
    rounds: int = 0
    calls_per_sample: int = 1

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of t[name] / t[baseline] (paired: the two ran back to back)."""
        return statistics.median(self.paired(name, baseline))

    def ratio_iqr(self, name: str, baseline: str):
        paired = self.paired(name, baseline)
        return quantile(paired, 0.25), quantile(paired, 0.75)

    def paired(self, name: str, baseline: str) -> List[float]:
        return [a / b for a, b in zip(self.samples[name], self.samples[baseline])]


def _time_calls(fn: Callable[[], None], calls: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def round_orders(count: int) -> List[List[int]]:
    """Orders of ``count`` contenders for successive rounds, in which each goes first equally often and directly
    follows every other equally often (a Williams design: the sequence 0, 1, n-1, 2, n-2, ... shifted by each
    offset; for an odd count also each of those reversed). A plain rotation keeps every contender behind the same
    one, so one that leaves the machine's caches cold always billed the same neighbour."""
    first, low, high = [0], 1, count - 1
    while low <= high:
        first.append(low)
        low += 1
        if low <= high:
            first.append(high)
            high -= 1
    orders = [[(position + shift) % count for position in first] for shift in range(count)]
    return orders + [order[::-1] for order in orders] if count % 2 else orders


def compare(contenders: Dict[str, Callable[[], None]], *, budget_s: float = 8.0, min_rounds: int = 15,
            max_rounds: int = 301, sample_s: float = 0.004, warmup: int = 5, device: str = "cpu") -> Comparison:
    """Time ``contenders`` interleaved; about ``budget_s`` seconds in all (at least ``min_rounds`` rounds).

    On a GPU every sample ends when the device has finished its queued work (``device``), so a
    sample measures kernels, not only their launches.
    """
    sync = synchronizer(device)
    names = list(contenders)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(warmup):
            for name in names:
                contenders[name]()
        # One call of each, three times: the fastest sets the calls per sample (its sample >= sample_s), the slowest caps them.
        single = {name: statistics.median(_time_calls(contenders[name], 1, sync) for _ in range(3)) for name in names}
        calls = max(1, int(math.ceil(sample_s / max(min(single.values()), 1e-9))))
        # Keep one sample of the slowest contender within a few sample_s (large shapes: 1 call).
        calls = max(1, min(calls, int(math.ceil(4 * sample_s / max(max(single.values()), 1e-9)))))
        per_round = calls * sum(single.values())
        rounds = int(min(max_rounds, max(min_rounds, budget_s / max(per_round, 1e-9))))
        samples: Dict[str, List[float]] = {name: [] for name in names}
        orders = round_orders(len(names))
        for index in range(rounds):
            for position in orders[index % len(orders)]:
                name = names[position]
                samples[name].append(_time_calls(contenders[name], calls, sync))
    finally:
        if gc_was_enabled:
            gc.enable()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return Comparison(medians, samples, rounds, calls)


def training_step(module_call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor,
                  params: List[torch.Tensor]) -> Callable[[], None]:
    """One training step of a layer: forward, then the gradient w.r.t. the input and the parameters.

    ``torch.autograd.grad`` (not ``.backward()``) so no ``.grad`` accumulates between calls and
    every contender does exactly the same autograd work around its own kernels.
    """
    leaf = x.detach().requires_grad_(True) if not x.requires_grad else x
    inputs = [leaf] + [p for p in params if p is not None and p.requires_grad]

    def step() -> None:
        y = module_call(leaf)
        torch.autograd.grad(y, inputs, grad)
    return step


def inference_step(module_call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    x = x.detach()

    def step() -> None:
        with torch.no_grad():
            module_call(x)
    return step


def padding_mask(n, t, seed=0):
    """(N, T) bool mask of right-padded sequences with lengths uniform in [0.6 T, T] (about 20% padding)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.6 * t), t + 1, (n,), generator=generator)
    return torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    if us >= 10000:
        return f"{us / 1000:,.1f} ms"
    if us >= 1000:
        return f"{us / 1000:,.2f} ms"
    return f"{us:,.0f} µs"


def fmt_ratio(value: Optional[float]) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def with_kernels(step, on: bool):
    """``step`` with normkit.kernels switched on or off for its duration (built first if on)."""
    import normkit.kernels

    def call():
        with normkit.kernels.switched(on):
            step()
    return call

