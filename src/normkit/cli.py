"""The `normkit` command: train, evaluate, compare normalizations and download datasets from a shell.

    normkit train                      LeNet + normkit BN on the embedded digits, 5 epochs (< 1 minute)
    normkit train --dataset mnist --data-dir ~/data --norm torch --epochs 5
    normkit evaluate --checkpoint runs/lenet-batch-digits-seed0/checkpoint.pt
    normkit compare --norms batch,none --seeds 0,1,2
    normkit download mnist --data-dir ~/data
    normkit kernels build              compile the fused CPU kernel once; later imports use it

Options build a ``normkit.lab.TrainConfig``; defaults live there (one place), not here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from normkit.registry import NORM_NAMES

SUPPRESS = argparse.SUPPRESS


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the project's rule for user errors) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def _batch_count(text: str) -> int:
    value = _integer(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be 0 (off), a positive number of batches or -1 (all), got {text}")
    return value


class _NormOption(argparse.Action):
    """``--norm-option KEY=VALUE``, repeatable, into one dict; VALUE is read as JSON when it parses (0.01, true,
    null, [1, 2], {"rmax": 3}), else taken as a string (l2, he_normal)."""

    def __call__(self, parser, namespace, text, option_string=None):
        key, equals, value = text.partition("=")
        if not equals or not key.strip().isidentifier():
            parser.error(f"{option_string} {text!r}: expected KEY=VALUE, e.g. momentum=0.01")
        options = dict(getattr(namespace, self.dest, None) or {})
        if key.strip() in options:
            parser.error(f"{option_string} {key.strip()} given twice")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
        setattr(namespace, self.dest, options)


def _add_training_options(parser: argparse.ArgumentParser, with_norm: bool = True) -> None:
    from normkit.lab.data import DATASETS
    from normkit.lab.models import ACTIVATIONS, INITS, MODELS
    from normkit.lab.optim import OPTIMIZERS

    # default=SUPPRESS: only options typed by the user reach TrainConfig, so --resume can tell them apart.
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=SUPPRESS, help="default: digits (embedded, no download)")
    data.add_argument("--data-dir", default=SUPPRESS, metavar="DIR",
                      help="folder with the IDX files, in DIR/<dataset>/ or DIR/ (default: $NORMKIT_DATA)")
    data.add_argument("--train-limit", type=_positive_int, default=SUPPRESS, metavar="N",
                      help="use only the first N training images")
    data.add_argument("--val-split", type=float, default=SUPPRESS, metavar="F",
                      help="validation fraction, the last F of the training images as in Keras (default: 0.2)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODELS, default=SUPPRESS, help="default: lenet")
    if with_norm:
        model.add_argument("--norm", choices=NORM_NAMES, default=SUPPRESS,
                           help="default: batch (normkit.BatchNorm); torch = torch.nn.BatchNorm; keras = normkit.BatchNorm "
                                "with Keras' defaults (Keras' momentum 0.99, i.e. 0.01 on the new batch; epsilon "
                                "1e-3; the biased running variance)")
    model.add_argument("--norm-option", dest="norm_options", action=_NormOption, default=SUPPRESS,
                       metavar="KEY=VALUE",
                       help="a keyword for every norm layer, repeatable: --norm-option momentum=0.01 "
                            "--norm-option eps=1e-3 (values are JSON: numbers, true/false, null, lists, objects; "
                            "anything else is a string); it overrides the norm's own setting, e.g. ghost's "
                            "virtual_batch_size=16 or renorm's renorm_momentum=0.1")
    model.add_argument("--activation", choices=tuple(ACTIVATIONS), default=SUPPRESS, help="default: sigmoid")
    model.add_argument("--init", choices=INITS, default=SUPPRESS,
                       help="weight initialization (default: keras = Glorot uniform, zero bias)")
    optimization = parser.add_argument_group("optimization")
    optimization.add_argument("--optimizer", choices=OPTIMIZERS, default=SUPPRESS,
                              help="default: rmsprop (Keras' rule: lr 1e-3, rho 0.9, eps 1e-7 inside the sqrt)")
    optimization.add_argument("--lr", type=float, default=SUPPRESS, help="default: Keras' default for the optimizer")
    optimization.add_argument("--rho", type=float, default=SUPPRESS, help="RMSprop decay (default: 0.9)")
    optimization.add_argument("--eps", type=float, default=SUPPRESS, help="RMSprop/Adam epsilon (default: 1e-7)")
    optimization.add_argument("--momentum", type=float, default=SUPPRESS, help="SGD momentum (default: 0)")
    optimization.add_argument("--batch-size", type=_positive_int, default=SUPPRESS, help="default: 64")
    optimization.add_argument("--epochs", type=_positive_int, default=SUPPRESS, help="default: 5")
    optimization.add_argument("--drop-last", action=argparse.BooleanOptionalAction, default=SUPPRESS,
                              help="drop the last partial batch (default: only with ghost batches, --norm ghost or a "
                                   "--norm-option virtual_batch_size; a last batch of 1 image is always dropped)")
    optimization.add_argument("--batch-classes", type=_positive_int, default=SUPPRESS, metavar="K",
                              help="non-i.i.d. batches: each holds --batch-size / K images of each of K classes only "
                                   "(the Batch Renormalization paper's experiment; default: shuffled batches)")
    optimization.add_argument("--seed", type=_integer, default=SUPPRESS, help="0 to 2**32 - 1 (default: 0)")
    optimization.add_argument("--recalibrate", type=_batch_count, default=SUPPRESS, metavar="N",
                              help="after the last epoch, recompute the BN running statistics with the final weights "
                                   "over the first N training batches (-1: all; \"precise BN\"), then evaluate; the "
                                   "saved checkpoint is the recalibrated model (default: 0 = off, the classic recipe)")
    running = parser.add_argument_group("run")
    running.add_argument("--device", choices=("cpu", "cuda"), default=SUPPRESS, help="default: cpu")
    running.add_argument("--threads", type=_non_negative_int, default=SUPPRESS,
                         help="CPU threads for torch (default: 1, fastest for these small models; 0 = torch's default)")
    running.add_argument("--compile", action=argparse.BooleanOptionalAction, default=SUPPRESS,
                         help="train through torch.compile (for GPUs; on these small CPU models it only adds "
                              "its compile time; default: off)")
    running.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=SUPPRESS,
                         help="write TensorBoard event files (default: on)")
    running.add_argument("--dry-run", action="store_true", default=SUPPRESS,
                         help="one training batch and one evaluation batch: a smoke test")
    running.add_argument("--quiet", action="store_true", default=SUPPRESS, help="print nothing on stdout (no progress bars, epoch lines or summary; errors still go to stderr)")
    running.add_argument("--overwrite", action="store_true", default=SUPPRESS,
                         help="replace an earlier run in the output folder even when that would lose work (an "
                              "unfinished run, or a finished one with other settings); without it such a run is "
                              "refused, while a dry run or a finished run with the same settings is replaced")


def build_parser() -> argparse.ArgumentParser:
    """The `normkit` argument parser: train, evaluate, compare, download and kernels."""
    from normkit.lab.data import DATASETS

    parser = _Parser(prog="normkit", description="normkit's lab: the classic batch-normalization "
                                     "experiments from one command.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = commands.choices  # name -> subparser: main reports a command's unknown options on it

    train = commands.add_parser("train", help="train one model (default: LeNet + BN on digits, under a minute)",
                                description="Train one model and write config.json, metrics.json, checkpoint.pt, "
                                            "TensorBoard events and curves.png to --out.")
    _add_training_options(train)
    train.add_argument("--out", default=SUPPRESS, metavar="DIR",
                       help="run directory (default: runs/<model>-<norm>-<dataset>-seed<seed>)")
    train.add_argument("--resume", action="store_true", default=SUPPRESS,
                       help="continue from DIR/checkpoint.pt (same settings and data; --epochs may grow, not "
                            "shrink); with a dry run's checkpoint, starts the real run from the beginning with the "
                            "dry run's settings; without a checkpoint, starts from the beginning (with the settings "
                            "of DIR/config.json when a run stopped there before its first checkpoint)")
    train.add_argument("--stop-after-steps", type=_positive_int, default=SUPPRESS, help=SUPPRESS)  # tests: a kill

    evaluate = commands.add_parser("evaluate", help="test accuracy and loss of a saved checkpoint",
                                   description="Rebuild the model of a checkpoint and print its test accuracy and loss.")
    evaluate.add_argument("--checkpoint", required=True, metavar="FILE",
                          help="a run's checkpoint.pt (written by `normkit train --out DIR` as DIR/checkpoint.pt), "
                               "or the run folder DIR itself")
    evaluate.add_argument("--dataset", choices=DATASETS, default=None,
                          help="test split to use (default: the dataset the model was trained on)")
    evaluate.add_argument("--data-dir", default=None, metavar="DIR",
                          help="folder with the test split's IDX files, the only ones read (default: the folder "
                               "the run trained on, saved in its config.json; else $NORMKIT_DATA)")
    evaluate.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")

    compare = commands.add_parser("compare", help="one run per normalization (same seeds, same data): plot and table",
                                  description="Train one run per --norms entry and seed into OUT/<norm>-seed<seed>/, "
                                              "then write comparison.md (table), comparison.json (test accuracy, "
                                              "test loss and history per norm and seed) and comparison.png "
                                              "(mean curves) to --out. Every run is validated before the first "
                                              "one trains.")
    compare.add_argument("--norms", default="batch,none",
                         help="comma-separated names, each once, from: " + ", ".join(NORM_NAMES) + " (default: batch,none)")
    compare.add_argument("--seeds", default=None, help="comma-separated seeds, each once (default: --seed)")
    compare.add_argument("--out", default=None, metavar="DIR", help="default: runs/compare-<model>-<dataset>")
    compare.add_argument("--resume", action="store_true", default=SUPPRESS,
                         help="continue an interrupted comparison: every run resumes from its checkpoint (finished "
                              "runs are only evaluated again, unfinished ones continue, missing ones start)")
    _add_training_options(compare, with_norm=False)

    download = commands.add_parser("download", help="fetch and verify the canonical IDX files")
    download.add_argument("dataset", choices=("mnist", "fashion-mnist", "kmnist"))
    download.add_argument("--data-dir", default=None, metavar="DIR", help="default: $NORMKIT_DATA")

    kernels = commands.add_parser("kernels", help="build or inspect the fused CPU kernel (normkit.kernels)",
                                  description="build: compile normkit's fused C++ kernel for this machine (about a "
                                              "minute; needs a C++ compiler, the Python headers and ninja). Every "
                                              "later `import normkit` on this machine then uses it for the options' "
                                              "training steps on CPU tensors (NORMKIT_FUSED_KERNELS=0 turns that "
                                              "off). status: what is built, where, and what is switched on.")
    kernels.add_argument("action", choices=("build", "status"))
    kernels.add_argument("--verbose", action="store_true", help="show the compiler's output (build)")
    return parser


def _train(args: argparse.Namespace) -> int:
    from normkit.lab.config import TrainConfig
    from normkit.lab.train import run

    given = {k: v for k, v in vars(args).items() if k != "command"}
    run(TrainConfig(**given), given=set(given))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from normkit.lab.runfolder import json_bytes
    from normkit.lab.train import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, device=args.device)
    if args.json:
        # Strict JSON, as metrics.json: a diverged model's NaN loss is null.
        print(json_bytes(result).decode(), end="")
    else:
        print(f"{result['checkpoint']} (epoch {result['epoch']}) on {result['dataset']} test "
              f"({result['test_size']} images): test accuracy {result['test_accuracy']:.4f}  "
              f"test loss {result['test_loss']:.4f}")
    return 0


def _split_list(text: str, convert, what: str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{what}: expected a comma-separated list, got {text!r}")
    values = []
    for item in items:
        try:
            values.append(convert(item))
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not {'an integer' if convert is int else 'valid'}; expected a "
                             "comma-separated list such as 0,1,2") from None
    return values


def _compare(args: argparse.Namespace) -> int:
    from normkit.lab.compare import compare

    options = {k: v for k, v in vars(args).items() if k not in {"command", "norms", "seeds", "out"}}
    norms = _split_list(args.norms, str, "--norms")
    unknown = [n for n in norms if n not in NORM_NAMES]
    if unknown:
        raise ValueError(f"--norms: unknown {', '.join(unknown)}; choose from {', '.join(NORM_NAMES)}")
    seeds = _split_list(args.seeds, int, "--seeds") if args.seeds is not None else [options.pop("seed", 0)]
    if args.seeds is not None and "seed" in options:
        raise ValueError("--seed and --seeds both given; pass the seeds as --seeds only")
    options.pop("seed", None)
    compare(norms, seeds, out=args.out, **options)
    return 0


def _download(args: argparse.Namespace) -> int:
    from normkit.lab.config import check_folder_option
    from normkit.lab.data import data_folder, download

    check_folder_option("--data-dir", args.data_dir, omitted="$NORMKIT_DATA")
    data_dir = data_folder(args.data_dir)
    if data_dir is None:
        raise ValueError("download: pass --data-dir DIR or set NORMKIT_DATA")
    target = download(args.dataset, data_dir)
    print(f"{args.dataset}: verified files in {target}; train with --dataset {args.dataset} --data-dir {data_dir}")
    return 0


def _kernels(args: argparse.Namespace) -> int:
    import time

    from normkit import kernels

    if args.action == "build":
        start, present = time.perf_counter(), kernels.cached()
        try:
            kernels.build(verbose=args.verbose)
        except RuntimeError as error:
            print(f"normkit kernels: error: {error}", file=sys.stderr)
            return 1
        done = "already built" if present else f"built in {time.perf_counter() - start:.0f} s"
        print(f"normkit kernels: {done} in {kernels.build_directory()}; every `import normkit` on this machine "
              "uses it (NORMKIT_FUSED_KERNELS=0 to turn it off)")
        return 0
    state = kernels.status()
    for key, value in state.items():
        print(f"{key}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the `normkit` command; returns the exit status (0 ok, 1 a refused write, 2 a user error, 130 Ctrl-C, 143
    SIGTERM during a run)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would blame `normkit` and point at its --help; the command's own help lists them
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    handlers = {"train": _train, "evaluate": _evaluate, "compare": _compare, "download": _download,
                "kernels": _kernels}
    from normkit.lab.train import interrupted_once

    try:
        # A second Ctrl-C while the first is reported (or the checkpoint written) is ignored: it replaced the report
        # by a wrong one or a traceback. Run as the command (argv from sys.argv), also while the interpreter exits,
        # where it printed a traceback; called from Python with argv, Ctrl-C works again once main returns.
        # (SIGTERM as Ctrl-C: runs and comparisons.)
        with interrupted_once(terminations=False, keep_ignoring=argv is None):
            return handlers[args.command](args)
    except (ValueError, TypeError) as error:
        # Users get the one-line reason, not a traceback; DataError and CheckpointError are ValueErrors.
        print(f"normkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Whoever read stdout has gone (`normkit train | head`): stop quietly, as Unix tools do on
        # SIGPIPE. Checkpoints written so far stay; the run resumes with --resume. stdout now points
        # at /dev/null so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except OSError as error:
        # A disk that is full or read-only, a path that cannot be written: the reason on one line.
        # Files are written atomically, so what the run directory held before stays intact.
        print(f"normkit {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        # normkit.lab.train.RunInterrupted says what the run directory holds; a bare Ctrl-C came before any run
        # (the checks, the data, the folder's plan: nothing written yet), so "finished runs" meant nothing to `train`.
        detail = str(interrupt) or ("interrupted before training started: nothing was written; run the same command "
                                    "again" if args.command in ("train", "compare") else "interrupted")
        print(f"normkit {args.command}: {detail}", file=sys.stderr)
        return getattr(interrupt, "exit_status", 130)  # (143 for SIGTERM: RunInterrupted says which)


if __name__ == "__main__":
    sys.exit(main())
