"""What a training step keeps for backward: normkit's layers and options vs torch.nn, in input-sized buffers.

    python benchmarks/bench_memory.py [--fused] [--only TEXT] [--device cuda]

(about 30 s; ``--fused`` builds the kernels first.)

A layer's activation memory in a model is what autograd keeps from its forward until its backward:
every tensor saved for backward (``torch.autograd.graph.saved_tensors_hooks`` sees each one, the
fused kernels' included). The input is not counted (the layer before holds it anyway); the rest,
each storage once, is reported in units of the input's size, so 1.00 means one extra input-sized
buffer alive per layer through the forward of the whole model (per-feature statistics show as small
fractions at small shapes). Rows "at 1e4" feed data whose mean is 1e4 standard deviations from zero,
where normkit recenters float32 statistics (docs/decisions.md, "Numerics"). These are counts of
bytes, not timings: the numbers are exact and the same on every machine. With ``--device cuda`` the
peak of allocated memory over a forward and backward, above what was allocated before (the input and
the layer; so the output and the input's gradient count), is reported too, in the same units
(``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_device_argument, check_device, fmt_ratio, machine_line, padding_mask,  # noqa: E402
                    set_threads)

import normkit  # noqa: E402
import normkit.kernels  # noqa: E402

EPS, MOMENTUM = 1e-5, 0.1


def kept_for_backward(call, x: torch.Tensor, *args) -> int:
    """Bytes of the storages ``call(x)`` saves for backward, other than x's."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call(x, *args)
    storages.pop(x.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def peak_above(call, x: torch.Tensor, *args) -> int:
    """CUDA only: the peak allocated over forward + backward, minus what was allocated before (x, the layer)."""
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    y = call(x, *args)
    torch.autograd.grad(y, [x], torch.ones_like(y))  # (a fresh gradient each time: nothing accumulates in .grad)
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) - before


def rows_spec(device):
    """(label, shape, builder); builder() -> {contender: (call, x, extra args)} with "torch.nn" the baseline."""

    def data(shape, offset=0.5):
        torch.manual_seed(1)
        return (torch.randn(shape, device=device) + offset).requires_grad_()

    def torch_bn(channels, rank):
        return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[rank](channels).to(device)

    def nchw(shape, options, offset=0.5):
        def build():
            x = data(shape, offset)
            ours = normkit.BatchNorm(shape[1], eps=EPS, momentum=MOMENTUM, device=device, **options)
            return {"torch.nn": (torch_bn(shape[1], len(shape)), x, ()), "normkit": (ours, x, ())}
        return build

    def channels_last(shape, masked):
        def build():
            x = data(shape)
            channels = shape[-1]
            ours = normkit.BatchNorm(channels, axis=-1, device=device)
            if len(shape) == 4:
                baseline = (torch_bn(channels, 4), x.detach().permute(0, 3, 1, 2).requires_grad_(), ())
            else:
                baseline = (torch_bn(channels, 2), x.detach().reshape(-1, channels).requires_grad_(), ())
            if not masked:
                return {"torch.nn": baseline, "normkit": (ours, x, ())}
            mask = padding_mask(shape[0], shape[1]).to(device)
            return {"torch.nn": baseline, "normkit": (lambda t, m: ours(t, mask=m), x, (mask,))}
        return build

    def same_layer(name, args, shape):
        def build():
            x = data(shape)
            return {"torch.nn": (getattr(torch.nn, name)(*args).to(device), x, ()),
                    "normkit": (getattr(normkit, name)(*args, device=device), x, ())}
        return build

    return [
        ("BatchNorm2d", (64, 16, 8, 8), nchw((64, 16, 8, 8), {})),
        ("BatchNorm2d", (32, 64, 56, 56), nchw((32, 64, 56, 56), {})),
        ("BatchNorm1d", (64, 120), nchw((64, 120), {})),
        ("renorm", (64, 16, 8, 8), nchw((64, 16, 8, 8), {"renorm": True})),
        ("renorm", (32, 64, 56, 56), nchw((32, 64, 56, 56), {"renorm": True})),
        ("ghost vbs=16", (64, 16, 8, 8), nchw((64, 16, 8, 8), {"virtual_batch_size": 16})),
        ("ghost vbs=16", (32, 64, 56, 56), nchw((32, 64, 56, 56), {"virtual_batch_size": 16})),
        ("renorm + ghost vbs=16", (64, 16, 8, 8), nchw((64, 16, 8, 8), {"renorm": True, "virtual_batch_size": 16})),
        ("BatchNorm2d at 1e4", (64, 16, 8, 8), nchw((64, 16, 8, 8), {}, offset=1e4)),
        ("renorm at 1e4", (64, 16, 8, 8), nchw((64, 16, 8, 8), {"renorm": True}, offset=1e4)),
        ("axis=-1", (64, 8, 8, 16), channels_last((64, 8, 8, 16), False)),
        ("axis=-1", (64, 50, 120), channels_last((64, 50, 120), False)),
        ("mask (N,T,C), axis=-1", (64, 50, 120), channels_last((64, 50, 120), True)),
        ("LayerNorm(120)", (64, 50, 120), same_layer("LayerNorm", (120,), (64, 50, 120))),
        ("GroupNorm(4,16)", (64, 16, 8, 8), same_layer("GroupNorm", (4, 16), (64, 16, 8, 8))),
        ("InstanceNorm2d(16)", (64, 16, 8, 8), same_layer("InstanceNorm2d", (16,), (64, 16, 8, 8))),
    ]


def measure(contender, cuda: bool) -> dict:
    call, x, args = contender
    kept = kept_for_backward(call, x, *args)
    result = {"kept": kept / x.untyped_storage().nbytes()}
    if cuda:
        result["peak"] = peak_above(call, x, *args) / x.untyped_storage().nbytes()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fused", action="store_true", help="add normkit with normkit.kernels on (builds them)")
    parser.add_argument("--only", default="", help="run only rows whose label contains this text")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    check_device(args.device)
    set_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    if args.fused:
        normkit.kernels.build()
    print(machine_line(args.threads, args.device))
    print()
    columns = ["torch.nn", "normkit"] + (["normkit + kernels"] if args.fused else [])
    header = "| layer | shape | " + " | ".join(f"{name}: kept" for name in columns)
    header += " | " + " | ".join(f"{name}: peak" for name in columns) if cuda else ""
    print(header + " |")
    print("|" + "---|" * (header.count("|")))
    for label, shape, build in rows_spec(args.device):
        if args.only and args.only.replace(" ", "") not in f"{label} {shape}".replace(" ", ""):
            continue
        contenders = build()
        results = {"torch.nn": measure(contenders["torch.nn"], cuda)}
        with normkit.kernels.switched(False):
            results["normkit"] = measure(contenders["normkit"], cuda)
        if args.fused:
            with normkit.kernels.switched(True):
                results["normkit + kernels"] = measure(contenders["normkit"], cuda)
        cells = [fmt_ratio(results[name]["kept"]) for name in columns]
        if cuda:
            cells += [fmt_ratio(results[name]["peak"]) for name in columns]
        print(f"| {label} | {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
