"""normkit.BatchNorm's options (renorm, ghost batches, masks, axis=-1) vs plain torch.nn and Keras 3.

    python benchmarks/bench_variants.py [--threads 1] [--budget 6] [--quick] [--only SUBSTRING] [--device cuda]
    KERAS_BACKEND=torch /work/bvenv/bin/python benchmarks/bench_variants.py    # with the Keras column

Training forward + backward only (``torch.autograd.grad`` of the output w.r.t. input, weight and
bias, as in bench_batchnorm.py). Every row runs its contenders interleaved (see common.compare):

* ``normkit``: the variant, e.g. ``normkit.BatchNorm(C, renorm=True)``;
* ``torch.nn``: plain ``torch.nn.BatchNorm1d/2d`` on the same memory (no option: the cost floor).
  For an (N, T, C) input both ``BatchNorm1d(x.transpose(1, 2))`` and ``BatchNorm1d(x.reshape(-1, C))``
  run and the faster one is the baseline (the table says which); for (N, H, W, C) it is
  ``BatchNorm2d(x.permute(0, 3, 1, 2))``, a channels_last view of the same memory;
* ``keras``: ``keras.layers.BatchNormalization`` (torch backend) with the same option, where Keras
  has it (renorm, mask, axis; not ghost batches, which Keras 3 dropped), called with training=True.
  The column is skipped when keras cannot be imported (it needs KERAS_BACKEND=torch).

* ``normkit + kernels`` (with ``--fused``): the same normkit step with ``normkit.kernels`` enabled
  (the fused C++ kernel where it applies, ATen's path elsewhere), the kernel built first if needed.

Targets: normkit / torch.nn <= 1.5 and Keras / normkit >= 3 (normkit at least 3x faster).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (compare, fmt_ratio, fmt_us, padding_mask,  # noqa: E402
                    parse_table_benchmark_arguments, report, table_benchmark_parser, training_step, with_kernels)

import normkit  # noqa: E402
import normkit.kernels  # noqa: E402

SHAPES = [(64, 6, 24, 24), (64, 16, 8, 8), (64, 120), (32, 64, 56, 56), (128, 256, 14, 14)]
SEQUENCES = [(64, 50, 120), (32, 200, 64)]
TARGET_TORCH = 1.5
TARGET_KERAS = 3.0
EPS, MOMENTUM = 1e-5, 0.1


def import_keras():
    """keras on the torch backend, or None (with the reason) when it cannot be used."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except Exception as error:  # not installed, or a backend that fails to import
        return None, f"keras not importable ({type(error).__name__})"
    if keras.backend.backend() != "torch":
        return None, f"keras backend is {keras.backend.backend()!r}, not torch (set KERAS_BACKEND=torch)"
    return keras, f"keras {keras.__version__} (torch backend)"


def keras_has_renorm(keras) -> bool:
    import inspect
    return "renorm" in inspect.signature(keras.layers.BatchNormalization.__init__).parameters


def torch_bn(channels, dims, device):
    torch.manual_seed(0)
    module = (torch.nn.BatchNorm1d if dims == 1 else torch.nn.BatchNorm2d)(channels, eps=EPS, momentum=MOMENTUM)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    return module.to(device)


def keras_step(keras, x, g, mask=None, **options):
    layer = keras.layers.BatchNormalization(epsilon=EPS, momentum=1 - MOMENTUM, **options)
    if mask is None:
        layer(x.detach(), training=True)  # builds the weights
        params = [v.value for v in layer.trainable_variables]
        return training_step(lambda t: layer(t, training=True), x, g, params)
    layer(x.detach(), training=True, mask=mask)
    params = [v.value for v in layer.trainable_variables]
    return training_step(lambda t: layer(t, training=True, mask=mask), x, g, params)


def rows_spec(keras, device="cpu"):
    """(variant, shape, builder) for every row; builder() -> (contenders, baseline name, note)."""
    renorm_ok = keras is not None and keras_has_renorm(keras)

    def nchw(shape, option_name, options, keras_options):
        def build():
            channels = shape[1]
            torch.manual_seed(1)
            x, g = torch.randn(shape, device=device) * 2.0 + 0.5, torch.randn(shape, device=device)
            theirs = torch_bn(channels, 1 if len(shape) == 2 else 2, device)
            ours = normkit.BatchNorm(channels, eps=EPS, momentum=MOMENTUM, device=device, **options)
            ours.load_state_dict(theirs.state_dict(), strict=False)
            contenders = {"normkit": training_step(ours, x, g, [ours.weight, ours.bias]),
                          "torch.nn": training_step(theirs, x, g, [theirs.weight, theirs.bias])}
            if keras_options is not None:
                contenders["keras"] = keras_step(keras, x, g, axis=1, **keras_options)
            return contenders, ["torch.nn"], f"BatchNorm{1 if len(shape) == 2 else 2}d, same NCHW tensor"
        return option_name, shape, build

    def channels_last(shape, masked):
        def build():
            channels = shape[-1]
            torch.manual_seed(1)
            x, g = torch.randn(shape, device=device) * 2.0 + 0.5, torch.randn(shape, device=device)
            ours = normkit.BatchNorm(channels, axis=-1, eps=EPS, momentum=MOMENTUM, device=device)
            mask = padding_mask(shape[0], shape[1]).to(device) if masked else None
            ours_call = ours if mask is None else (lambda t: ours(t, mask=mask))
            contenders = {"normkit": training_step(ours_call, x, g, [ours.weight, ours.bias])}
            if len(shape) == 4:
                theirs = torch_bn(channels, 2, device)
                contenders["torch.nn"] = training_step(theirs, x.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2),
                                                       [theirs.weight, theirs.bias])
                baselines = ["torch.nn"]
            else:
                n, t, c = shape
                t_bn, r_bn = torch_bn(c, 1, device), torch_bn(c, 1, device)
                contenders["torch.nn transpose"] = training_step(t_bn, x.transpose(1, 2), g.transpose(1, 2),
                                                                 [t_bn.weight, t_bn.bias])
                contenders["torch.nn reshape"] = training_step(r_bn, x.reshape(-1, c), g.reshape(-1, c),
                                                               [r_bn.weight, r_bn.bias])
                baselines = ["torch.nn transpose", "torch.nn reshape"]
            if keras is not None:
                contenders["keras"] = keras_step(keras, x, g, mask=mask, axis=-1)
            return contenders, baselines, None
        return ("mask (N,T,C), axis=-1" if masked else "axis=-1"), shape, build

    specs = []
    for shape in SHAPES:
        specs.append(nchw(shape, "renorm", {"renorm": True}, {"renorm": True} if renorm_ok else None))
    for shape in SHAPES:
        if shape[0] % 16 == 0:
            specs.append(nchw(shape, "ghost vbs=16", {"virtual_batch_size": 16}, None))
    for shape in SEQUENCES:
        specs.append(channels_last(shape, True))
    for shape in SHAPES:
        if len(shape) == 4:
            n, c, h, w = shape
            specs.append(channels_last((n, h, w, c), False))
    for shape in SEQUENCES:
        specs.append(channels_last(shape, False))
    return specs


def run(args, keras) -> list:
    rows = []
    for variant, shape, build in rows_spec(keras, args.device):
        label = f"{variant} {shape}"
        if args.only and args.only.replace(" ", "") not in label.replace(" ", ""):  # tables print (64,120)
            continue
        contenders, baselines, note = build()
        step = contenders["normkit"]
        contenders["normkit"] = with_kernels(step, False)
        if args.fused:
            contenders["normkit + kernels"] = with_kernels(step, True)
        result = compare(contenders, budget_s=args.budget, min_rounds=args.min_rounds, device=args.device)
        baseline = min(baselines, key=lambda name: result.medians[name])
        row = {"variant": variant, "shape": shape, "normkit": result.medians["normkit"], "baseline": baseline,
               "torch.nn": result.medians[baseline], "ratio": result.ratio("normkit", baseline),
               "iqr": result.ratio_iqr("normkit", baseline), "note": note,
               "keras": result.medians.get("keras"),
               "keras_ratio": result.ratio("keras", "normkit") if "keras" in contenders else None}
        if args.fused:
            row["fused"] = result.medians["normkit + kernels"]
            row["fused_ratio"] = result.ratio("normkit + kernels", baseline)
            row["fused_iqr"] = result.ratio_iqr("normkit + kernels", baseline)
            row["keras_fused_ratio"] = (result.ratio("keras", "normkit + kernels") if "keras" in contenders
                                        else None)
        if len(baselines) > 1:
            row["others"] = {name: result.medians[name] for name in baselines if name != baseline}
        rows.append(row)
        extra = "" if row["keras_ratio"] is None else f", keras/normkit {row['keras_ratio']:.2f}"
        if args.fused:
            extra += f", normkit+kernels/{baseline} {row['fused_ratio']:.3f}"
        print(f"  {label}: normkit/{baseline} {row['ratio']:.3f} [{row['iqr'][0]:.3f}, {row['iqr'][1]:.3f}]{extra} "
              f"({result.rounds} rounds x {result.calls_per_sample})", file=sys.stderr, flush=True)
    return rows


def table(rows, keras_line: str) -> str:
    fused = any("fused" in row for row in rows)
    header = "| variant | shape | torch.nn (baseline) | normkit | normkit / torch.nn | "
    rule = "|---|---|---|---|---|"
    if fused:
        header += "normkit + kernels | + kernels / torch.nn | "
        rule += "---|---|"
    header += "<= 1.5 | Keras 3 | Keras / normkit | " + ("Keras / + kernels | " if fused else "") + ">= 3 |"
    rule += "---|---|---|" + ("---|" if fused else "") + "---|"
    lines = [header, rule]
    for row in rows:
        shape = "(" + ",".join(map(str, row["shape"])) + ")"
        base = row["baseline"].replace("torch.nn", "").strip() or ("NCHW" if "axis=-1" not in row["variant"]
                                                                    else "channels_last view")
        if "others" in row:
            base += "; " + ", ".join(f"{name.replace('torch.nn', '').strip()} {fmt_us(t)}"
                                     for name, t in row["others"].items())
        best = min(row["ratio"], row.get("fused_ratio", row["ratio"]))
        ok = "yes" if best <= TARGET_TORCH else "**no**"
        cells = [row["variant"], shape, f"{fmt_us(row['torch.nn'])} ({base})", fmt_us(row["normkit"]),
                 fmt_ratio(row["ratio"])]
        if fused:
            cells += [fmt_us(row["fused"]), fmt_ratio(row["fused_ratio"])]
        cells.append(ok)
        if row["keras"] is None:
            cells += ["n/a", "n/a"] + (["n/a"] if fused else []) + [""]
        else:
            keras_best = max(row["keras_ratio"], row.get("keras_fused_ratio") or 0.0)
            cells += [fmt_us(row["keras"]), f"{row['keras_ratio']:.2f}x"]
            if fused:
                cells.append(f"{row['keras_fused_ratio']:.2f}x")
            cells.append("yes" if keras_best >= TARGET_KERAS else "**no**")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Keras column: {keras_line}.")
    if fused:
        lines.append("The target columns (<= 1.5, >= 3) take the better of normkit without and with its kernels.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = table_benchmark_parser(__doc__, budget=6.0)
    parser.add_argument("--no-keras", action="store_true", help="leave the Keras column out")
    parser.add_argument("--fused", action="store_true",
                        help="also time normkit with normkit.kernels enabled (builds the C++ kernel once)")
    args = parse_table_benchmark_arguments(parser, argv)
    keras, keras_line = (None, "left out (--no-keras)") if args.no_keras else import_keras()
    if args.fused:
        normkit.kernels.build()
    report(args, lambda: table(run(args, keras), keras_line))


if __name__ == "__main__":
    main()
