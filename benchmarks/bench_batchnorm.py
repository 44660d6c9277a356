"""normkit's drop-in BatchNorm vs torch.nn's, side by side in one process.

    python benchmarks/bench_batchnorm.py [--threads 1] [--budget 8] [--quick] [--only SUBSTRING] [--device cuda]

For every shape, memory format and mode (training forward + backward, inference forward) the two
layers run interleaved (see common.compare); the table gives the median time per call of each and
the median paired ratio normkit / torch.nn (target: <= 1.05), with its interquartile range.

Rows:
* ``contiguous`` / ``channels_last``: normkit.BatchNorm1d/2d vs torch.nn.BatchNorm1d/2d on the same tensor.
* ``NHWC axis=-1``: normkit.BatchNorm(C, axis=-1) on an (N, H, W, C) contiguous tensor vs
  torch.nn.BatchNorm2d on the same memory seen as an NCHW channels_last tensor (``x.permute(0, 3, 1, 2)``,
  made outside the timed call), and vs ``torch.nn + permutes``: the same layer with the permutes a
  torch.nn user writes around it for NHWC data, inside the call (the last column).
* ``frozen`` (the small shapes): a frozen normkit layer (``freeze()``, then ``train()``: it computes as in eval
  whatever the mode) vs torch.nn's in eval with ``requires_grad_(False)`` parameters, the torch.nn way to freeze;
  training rows take the gradient w.r.t. the input only (neither layer has trainable parameters).
* ``keras`` (the small shapes): normkit.keras.BatchNormalization(axis=1) vs torch.nn's layer with the same epsilon
  (1e-3) and momentum (0.01, Keras' 0.99 decay). Not a drop-in pair (Keras' moving variance is the biased one),
  the nearest torch.nn call: the cost of the Keras vocabulary.

Training: ``torch.autograd.grad`` of the output (with a fixed random upstream gradient) w.r.t. the
input, weight and bias. Inference: eval mode under ``torch.no_grad()``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (compare, fmt_ratio, fmt_us, inference_step,  # noqa: E402
                    parse_table_benchmark_arguments, report, table_benchmark_parser, training_step)

import normkit  # noqa: E402
import normkit.keras  # noqa: E402

SHAPES = [(64, 6, 24, 24), (64, 16, 8, 8), (64, 120), (32, 64, 56, 56), (128, 256, 14, 14)]
FROZEN_SHAPES = [(64, 16, 8, 8), (64, 120)]  # (a fixed cost of the call: the small shapes are where it shows; keras too)
TARGET = 1.05


def pair(shape, layout, device="cpu"):
    """(normkit module, torch.nn module, normkit's input, torch.nn's input, normkit's grad, torch.nn's grad)."""
    channels = shape[1]
    torch.manual_seed(0)
    if layout == "keras":
        theirs = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(channels, eps=1e-3, momentum=0.01)
        ours = normkit.keras.BatchNormalization(axis=1, epsilon=1e-3, momentum=0.99)
        ours.build(shape)
    elif len(shape) == 2:
        ours, theirs = normkit.BatchNorm1d(channels), torch.nn.BatchNorm1d(channels)
    elif layout == "NHWC axis=-1":
        ours, theirs = normkit.BatchNorm(channels, axis=-1), torch.nn.BatchNorm2d(channels)
    else:
        ours, theirs = normkit.BatchNorm2d(channels), torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    if layout == "keras":
        ours.set_weights([t.detach().numpy() for t in (theirs.weight, theirs.bias, theirs.running_mean,
                                                       theirs.running_var)])
    else:
        ours.load_state_dict(theirs.state_dict())
    ours.to(device), theirs.to(device)
    x = torch.randn(shape, device=device) * 2.0 + 0.5
    g = torch.randn(shape, device=device)
    if layout == "channels_last":
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
        return ours, theirs, x, x, g, g
    if layout == "frozen":
        ours.freeze()
        theirs.eval().requires_grad_(False)
    if layout == "NHWC axis=-1":
        x_nhwc = x.permute(0, 2, 3, 1).contiguous()
        g_nhwc = g.permute(0, 2, 3, 1).contiguous()
        # torch.nn sees the very same memory as a channels_last NCHW tensor.
        return ours, theirs, x_nhwc, x_nhwc.permute(0, 3, 1, 2), g_nhwc, g_nhwc.permute(0, 3, 1, 2)
    return ours, theirs, x, x, g, g


def cases():
    for shape in SHAPES:
        layouts = ["contiguous"] if len(shape) == 2 else ["contiguous", "channels_last", "NHWC axis=-1"]
        layouts += ["frozen", "keras"] if shape in FROZEN_SHAPES else []
        for layout in layouts:
            for mode in ("train", "infer"):
                yield shape, layout, mode


def run(args) -> list:
    rows = []
    for shape, layout, mode in cases():
        label = f"{shape} {layout} {mode}"
        if args.only and args.only.replace(" ", "") not in label.replace(" ", ""):  # tables print (64,120)
            continue
        ours, theirs, x_ours, x_theirs, g_ours, g_theirs = pair(shape, layout, args.device)
        # NHWC data in torch.nn's hands: the permutes a torch.nn user writes around the layer.
        permuted = (lambda t: theirs(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)) if layout == "NHWC axis=-1" else None
        if mode == "train":
            ours.train(), theirs.train(layout != "frozen")  # (frozen: normkit's in train(), torch.nn's in eval)
            contenders = {
                "normkit": training_step(ours, x_ours, g_ours, list(ours.parameters())),
                "torch.nn": training_step(theirs, x_theirs, g_theirs, [theirs.weight, theirs.bias]),
            }
            if permuted is not None:
                contenders["torch.nn + permutes"] = training_step(permuted, x_ours, g_ours,
                                                                  [theirs.weight, theirs.bias])
        else:
            ours.eval(), theirs.eval()
            contenders = {"normkit": inference_step(ours, x_ours), "torch.nn": inference_step(theirs, x_theirs)}
            if permuted is not None:
                contenders["torch.nn + permutes"] = inference_step(permuted, x_ours)
        result = compare(contenders, budget_s=args.budget, min_rounds=args.min_rounds, device=args.device)
        ratio = result.ratio("normkit", "torch.nn")
        q1, q3 = result.ratio_iqr("normkit", "torch.nn")
        row = {"shape": shape, "layout": layout, "mode": mode, "normkit": result.medians["normkit"],
               "torch.nn": result.medians["torch.nn"], "ratio": ratio, "q1": q1, "q3": q3,
               "rounds": result.rounds, "calls": result.calls_per_sample,
               "permuted_ratio": result.ratio("normkit", "torch.nn + permutes") if permuted else None}
        rows.append(row)
        print(f"  {label}: ratio {ratio:.3f} [{q1:.3f}, {q3:.3f}] ({result.rounds} rounds x {result.calls_per_sample})",
              file=sys.stderr, flush=True)
    return rows


def table(rows) -> str:
    lines = ["| shape | layout | mode | normkit | torch.nn | ratio normkit / torch.nn | IQR of ratio | <= 1.05 "
             "| NHWC: normkit / (torch.nn + permutes) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        shape = "(" + ",".join(map(str, row["shape"])) + ")"
        ok = "yes" if row["ratio"] <= TARGET else "**no**"
        permuted = "" if row.get("permuted_ratio") is None else fmt_ratio(row["permuted_ratio"])
        lines.append(f"| {shape} | {row['layout']} | {row['mode']} | {fmt_us(row['normkit'])} | "
                     f"{fmt_us(row['torch.nn'])} | {fmt_ratio(row['ratio'])} | "
                     f"{row['q1']:.3f}-{row['q3']:.3f} | {ok} | {permuted} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_table_benchmark_arguments(table_benchmark_parser(__doc__, budget=8.0), argv)
    report(args, lambda: table(run(args)))


if __name__ == "__main__":
    main()
