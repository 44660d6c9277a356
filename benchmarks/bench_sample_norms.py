"""normkit's LayerNorm, GroupNorm and InstanceNorm vs torch.nn's, side by side in one process.

    python benchmarks/bench_sample_norms.py [--threads 1] [--budget 6] [--quick] [--only SUBSTRING] [--device cuda]

Each pair runs interleaved (see common.compare) on the same tensor, in training (forward, then
``torch.autograd.grad`` w.r.t. input and the affine parameters) and inference (eval, no_grad); the table
gives the median time per call of each and the median paired ratio normkit / torch.nn (target: <= 1.05,
the drop-in promise: never slower than torch.nn where they overlap), with its interquartile range.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (compare, fmt_ratio, fmt_us, inference_step,  # noqa: E402
                    parse_table_benchmark_arguments, report, table_benchmark_parser, training_step)

import normkit  # noqa: E402

TARGET = 1.05

# label: (the layer's class name in both libraries, constructor arguments, input shape[, memory format])
CASES = {
    "LayerNorm(120) (64,120)": ("LayerNorm", (120,), (64, 120)),
    "LayerNorm(768) (16,128,768)": ("LayerNorm", (768,), (16, 128, 768)),
    "LayerNorm([16,8,8]) (64,16,8,8)": ("LayerNorm", ([16, 8, 8],), (64, 16, 8, 8)),
    "GroupNorm(3,6) (64,6,24,24)": ("GroupNorm", (3, 6), (64, 6, 24, 24)),
    "GroupNorm(4,16) (64,16,8,8)": ("GroupNorm", (4, 16), (64, 16, 8, 8)),
    "GroupNorm(32,256) (32,256,14,14)": ("GroupNorm", (32, 256), (32, 256, 14, 14)),
    # channels-last data near zero (normkit's check of where the data sits keeps torch.nn's call there)
    "GroupNorm(4,16) (64,16,8,8) channels_last": ("GroupNorm", (4, 16), (64, 16, 8, 8), torch.channels_last),
    "GroupNorm(32,256) (32,256,14,14) channels_last": ("GroupNorm", (32, 256), (32, 256, 14, 14),
                                                       torch.channels_last),
    "InstanceNorm1d(16) (64,16,50)": ("InstanceNorm1d", (16,), (64, 16, 50)),
    "InstanceNorm1d(16) (8,16,20)": ("InstanceNorm1d", (16,), (8, 16, 20)),
    "InstanceNorm3d(16) (4,16,4,8,8)": ("InstanceNorm3d", (16,), (4, 16, 4, 8, 8)),
    "InstanceNorm2d(64, affine, stats) (32,64,8,8)": ("InstanceNorm2d", (64, 1e-5, 0.1, True, True), (32, 64, 8, 8)),
    "InstanceNorm2d(6, affine) (64,6,24,24)": ("InstanceNorm2d", (6, 1e-5, 0.1, True), (64, 6, 24, 24)),
    "InstanceNorm2d(64, stats) (8,64,56,56)": ("InstanceNorm2d", (64, 1e-5, 0.1, True, True), (8, 64, 56, 56)),
}


def pair(label, device="cpu"):
    """(normkit module, torch.nn module, input, upstream gradient), the same parameters in both."""
    name, arguments, shape, *memory = CASES[label]
    memory_format = memory[0] if memory else torch.contiguous_format
    torch.manual_seed(0)
    ours, theirs = getattr(normkit, name)(*arguments), getattr(torch.nn, name)(*arguments)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    ours.to(device), theirs.to(device)
    x, g = torch.randn(shape, device=device) * 2.0 + 0.5, torch.randn(shape, device=device)
    return ours, theirs, x.contiguous(memory_format=memory_format), g.contiguous(memory_format=memory_format)


def run(args):
    rows = []
    for label in CASES:
        if args.only.replace(" ", "") not in label.replace(" ", ""):  # "(64, 120)" as the other scripts take it
            continue
        ours, theirs, x, g = pair(label, args.device)
        for mode in ("train", "infer"):
            if mode == "train":
                ours.train(), theirs.train()
                contenders = {"normkit": training_step(ours, x, g, list(ours.parameters())),
                              "torch.nn": training_step(theirs, x, g, list(theirs.parameters()))}
            else:
                ours.eval(), theirs.eval()
                contenders = {"normkit": inference_step(ours, x), "torch.nn": inference_step(theirs, x)}
            result = compare(contenders, budget_s=args.budget, min_rounds=args.min_rounds, device=args.device)
            ratio = result.ratio("normkit", "torch.nn")
            q1, q3 = result.ratio_iqr("normkit", "torch.nn")
            rows.append({"label": label, "mode": mode, "normkit": result.medians["normkit"],
                         "torch.nn": result.medians["torch.nn"], "ratio": ratio, "q1": q1, "q3": q3})
            print(f"  {label} {mode}: ratio {ratio:.3f} [{q1:.3f}, {q3:.3f}] ({result.rounds} rounds x "
                  f"{result.calls_per_sample})", file=sys.stderr, flush=True)
    return rows


def table(rows) -> str:
    lines = ["| layer and input | mode | normkit | torch.nn | ratio normkit / torch.nn | IQR of ratio | <= 1.05 |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        ok = "yes" if row["ratio"] <= TARGET else "**no**"
        lines.append(f"| {row['label']} | {row['mode']} | {fmt_us(row['normkit'])} | {fmt_us(row['torch.nn'])} | "
                     f"{fmt_ratio(row['ratio'])} | {row['q1']:.3f}-{row['q3']:.3f} | {ok} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_table_benchmark_arguments(table_benchmark_parser(__doc__, budget=6.0), argv)
    report(args, lambda: table(run(args)))


if __name__ == "__main__":
    main()
