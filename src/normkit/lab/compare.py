"""Compare normalizations: one run per (norm, seed) on the same data, then a markdown table and a combined plot."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

from .config import NOT_IDENTITY, TrainConfig, check_folder_option, flag_of, virtual_batch_size
from .data import atomic_write_bytes, load_dataset
from .plots import plot_curves
from .runfolder import LongerRunError, UnfinishedRunError, check_out_folder, json_bytes, plan_run
from .train import RunInterrupted, Terminated, run, terminations_interrupt

CURVE_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


def _mean(values: list[float | None]) -> float | None:
    # An absent measurement (no validation split: None) stays absent rather than becoming NaN.
    return None if any(value is None for value in values) else statistics.fmean(values)


def _mean_history(histories: list[list[dict]]) -> list[dict]:
    """Per-epoch mean over seeds (runs of one norm have the same number of epochs)."""
    epochs = min(len(history) for history in histories)
    return [{"epoch": index + 1, **{key: _mean([h[index][key] for h in histories]) for key in CURVE_KEYS}}
            for index in range(epochs)]


def _number(value: float | None) -> str:
    # A diverged run's NaN loss is None in metrics.json: the table says n/a, as for an absent validation split.
    return "n/a" if value is None else f"{value:.4f}"


def _spread(values: list[float | None]) -> str:
    if any(value is None for value in values):
        return "n/a"  # (one diverged seed leaves the mean undefined; the per-seed columns show which)
    if len(values) == 1:
        return _number(values[0])
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def comparison_table(results: dict[str, dict[int, dict]]) -> str:
    """Markdown: final test accuracy per norm (mean ± sample std over seeds, then each seed) and the
    mean validation accuracy after each epoch ("n/a" without a validation split)."""
    seeds = sorted({seed for by_seed in results.values() for seed in by_seed})
    epochs = max(len(m["history"]) for by_seed in results.values() for m in by_seed.values())
    header = (["norm", "test accuracy"] + ([f"seed {s}" for s in seeds] if len(seeds) > 1 else [])
              + ["test loss"] + [f"val acc e{e}" for e in range(1, epochs + 1)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for norm, by_seed in results.items():
        runs = [by_seed[s] for s in seeds if s in by_seed]
        curve = _mean_history([m["history"] for m in runs])
        row = [norm, _spread([m["test_accuracy"] for m in runs])]
        if len(seeds) > 1:
            row += [_number(by_seed[s]["test_accuracy"]) if s in by_seed else "" for s in seeds]
        row += [_spread([m["test_loss"] for m in runs])]
        row += [_number(record["val_accuracy"]) for record in curve]
        row += [""] * (epochs - len(curve))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _recorded_data_dir(configs) -> str | None:
    """The data folder the comparison's runs recorded (config.json of the first run that has one), or None."""
    for cfg in configs:
        try:
            recorded = json.loads((Path(cfg.out) / "config.json").read_text()).get("data_dir")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded:
            return recorded
    return None


def _refuse_duplicates(items: list, flag: str) -> None:
    repeated = sorted({str(item) for item in items if items.count(item) > 1})
    if repeated:
        raise ValueError(f"{flag}: {', '.join(repeated)} listed more than once; list each once")


# What continues an interrupted comparison: the same command, every run resumed (finished ones only evaluated).
CONTINUE = "re-run the same compare command with --resume (finished runs are evaluated again, not retrained)"


def _check(norm: str, seed: int, validate):
    try:
        return validate()
    except UnfinishedRunError as error:
        # `normkit train --resume` would continue this run alone; the comparison continues with compare --resume.
        unfinished = UnfinishedRunError(error.out, error.epoch, error.epochs, how=CONTINUE)
        raise ValueError(f"run {norm}, seed {seed}: {unfinished}") from None
    except LongerRunError as error:
        # As above: `normkit train --resume --epochs N` would train this run alone, and the next compare (without
        # --resume) would then replace the runs so trained, which have its settings, by training them again.
        longer = LongerRunError(error.out, error.differences, error.epochs,
                                how=f"re-run the same compare command with --resume, which trains every run to "
                                    f"--epochs {error.epochs}")
        raise ValueError(f"run {norm}, seed {seed}: {longer}") from None
    except ValueError as error:
        raise ValueError(f"run {norm}, seed {seed}: {error}") from None


def _refuse_mixed_settings(plans: dict) -> None:
    """The runs of a comparison differ in norm and seed only. A resumed run keeps its checkpoint's settings (as
    `normkit train --resume`), so `compare --resume` without the interrupted command's options (its --lr, say)
    would resume some runs with them and start the others without: refused, naming the setting."""
    seen: dict = {}
    for (norm, seed), plan in plans.items():
        cfg = plan.cfg
        # drop_last's default depends on the norm (ghost batches drop partial ones): compared within each kind.
        ghost = virtual_batch_size(cfg.norm, cfg.norm_options) is not None
        for name, value in cfg.to_dict().items():
            if name in NOT_IDENTITY or name in ("norm", "seed"):
                continue
            other_norm, other_seed, other = seen.setdefault((name, ghost if name == "drop_last" else None),
                                                            (norm, seed, value))
            if other != value:
                raise ValueError(f"run {norm}, seed {seed} has {flag_of(name)} {value!r} and run {other_norm}, seed "
                                 f"{other_seed} has {other!r}: a comparison's runs differ only in norm and seed, and "
                                 "a resumed run keeps its checkpoint's settings; give --resume the options of the "
                                 "interrupted compare command")


def _run_all(configs: dict, given: set[str], splits, results: dict[str, dict[int, dict]]) -> None:
    """Train every run of the comparison in turn into ``results``; a run's interruption names the run."""
    for (norm, seed), cfg in configs.items():
        try:
            results.setdefault(norm, {})[seed] = run(cfg, given=given, splits=splits)
        except RunInterrupted as interrupt:
            raise RunInterrupted(f"run {norm}, seed {seed}: {interrupt}; to continue the whole comparison, "
                                 f"{CONTINUE}", terminated=interrupt.terminated) from None


def compare(norms: list[str], seeds: list[int], out: str | None = None, **options) -> dict[str, dict[int, dict]]:
    """Train every (norm, seed) with the same other ``options`` (TrainConfig fields); write to ``out``:
    <norm>-seed<seed>/ run directories, comparison.md, comparison.json and comparison.png.

    Every run is validated (settings, its folder, the data and its batches) before the first one trains. With
    ``resume=True`` every run is resumed as ``normkit train --resume`` does: a finished run is only evaluated
    again, an unfinished one continues from its checkpoint, one without a checkpoint starts."""
    if not norms or not seeds:
        raise ValueError("--norms and --seeds each need at least one entry")
    _refuse_duplicates(list(norms), "--norms")
    _refuse_duplicates(list(seeds), "--seeds")
    check_folder_option("--out", out)
    base = TrainConfig(**options)
    out_dir = Path(out if out is not None else Path("runs") / f"compare-{base.model}-{base.dataset}")
    # As train's --out (TrainConfig.resolved): absolute, ~ expanded, so comparison.* land beside the run folders.
    out_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(out_dir))))
    check_out_folder(out_dir)
    configs = {(norm, seed): TrainConfig(**{**options, "norm": norm, "seed": seed,
                                            "out": str(out_dir / f"{norm}-seed{seed}")})
               for norm in norms for seed in seeds}
    given = set(options) | {"norm", "seed", "out"}
    # Settings first (a bad option fails before the data is loaded), then each run's folder, data and batches.
    for (norm, seed), cfg in configs.items():
        _check(norm, seed, cfg.resolved)
    data_dir = base.data_dir
    if base.resume and data_dir is None:
        # Resumed runs read the folder they trained on, as `normkit train --resume` does, whatever NORMKIT_DATA
        # says now (their checkpoints' fingerprints still check the data).
        data_dir = _recorded_data_dir(configs.values())
        if data_dir is not None:
            # A run that starts now (never started) trains on that folder's data, so its config.json and checkpoint
            # must name it, not NORMKIT_DATA's (or null): evaluate and train --resume read the folder recorded.
            # Runs that have a checkpoint or config.json keep their own (data_dir is not in ``given``).
            configs = {key: dataclasses.replace(cfg, data_dir=data_dir) for key, cfg in configs.items()}
    splits = load_dataset(base.dataset, data_dir)  # loaded once: every run sees the same tensors
    plans = {(norm, seed): _check(norm, seed, lambda cfg=cfg: plan_run(cfg, given=given, splits=splits))
             for (norm, seed), cfg in configs.items()}
    _refuse_mixed_settings(plans)
    results: dict[str, dict[int, dict]] = {}
    # An earlier comparison's table (a dry run's, or one of runs --overwrite now replaces) would otherwise stay
    # beside runs that no longer hold its numbers when this one stops before writing its own: none is better.
    for name in ("comparison.md", "comparison.json", "comparison.png"):
        (out_dir / name).unlink(missing_ok=True)
    try:
        with terminations_interrupt():  # (between runs too: SIGTERM is reported as Ctrl-C is)
            _run_all(configs, given, splits, results)
            table = comparison_table(results)
            atomic_write_bytes(out_dir / "comparison.md", table.encode())
            summary = {norm: {str(seed): {k: m[k] for k in ("test_accuracy", "test_loss", "history")}
                              for seed, m in by_seed.items()} for norm, by_seed in results.items()}
            atomic_write_bytes(out_dir / "comparison.json", json_bytes(summary))
            plot_curves({norm: _mean_history([m["history"] for m in by_seed.values()])
                         for norm, by_seed in results.items()}, out_dir / "comparison.png",
                        title=f"{base.model} on {base.dataset}, mean of seeds {', '.join(map(str, seeds))}")
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, RunInterrupted):
            raise
        # Between two runs (the next one's checks) or while the comparison's own files are written: no run is
        # training, and the finished ones are saved; the hint is the same as for a Ctrl-C inside a run.
        finished = sum(len(by_seed) for by_seed in results.values())
        how = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        raise RunInterrupted(f"{how} after {finished} of {len(configs)} runs finished (their run folders are "
                             f"complete); to continue the whole comparison, {CONTINUE}",
                             terminated=isinstance(interrupt, Terminated)) from None
    if not options.get("quiet"):
        print(f"\n{table}\nwrote {out_dir / 'comparison.md'}, comparison.json and comparison.png")
    return results
