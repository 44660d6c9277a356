"""A run's folder (--out): checked before anything is written, what a run may replace or resume there, its JSON files.

Safety: ``plan_run`` validates the settings, the output folder, the checkpoint to resume or replace, the
data and its batches before anything is written, so a failed run leaves ``out`` as it was. A fresh run
replaces an earlier run in ``out`` only when that was a dry run, a finished run with the same settings and
data (``data_sha256``, a fingerprint of the prepared splits) or a run stopped before its first checkpoint with
the same settings (``overwrite=True`` replaces any); docs/lab.md, "Output directory", has the rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .batches import Prepared, check_batches, prepare_data
from .checkpoint import CheckpointError, config_from_checkpoint, load_checkpoint
from .config import NOT_IDENTITY, PER_INVOCATION, RESUME_OVERRIDABLE, TrainConfig, flag_of
from .data import DataError, Splits, atomic_write_bytes


# What to do when --resume meets a checkpoint it cannot continue from (a damaged or foreign file, weights or states that
# do not fit): the file's own error said what is wrong with it, not how to go on.
RESUME_REMEDY = ("--resume cannot continue from it: restore checkpoint.pt from a copy, or start the run over with "
                 "--overwrite instead of --resume, or choose another --out")


class UnfinishedRunError(ValueError):
    """A fresh run into a folder that holds an unfinished run (``--resume`` continues it); the caller
    (``normkit train`` or ``normkit compare``) knows which command continues it."""

    def __init__(self, out: Path, epoch: int, epochs: int, how: str = ""):
        self.out, self.epoch, self.epochs = out, epoch, epochs
        how = how or f"continue it with `normkit train --out {out} --resume`"
        super().__init__(f"--out {out} holds an unfinished run (checkpoint.pt after epoch {epoch} of {epochs}): "
                         f"{how}, or pass --overwrite to start over, or choose another --out")


class LongerRunError(ValueError):
    """A fresh run into a folder that holds a finished run whose settings differ from this one's in ``--epochs`` alone,
    more now: ``--resume`` trains it longer. The caller (``normkit train`` or ``normkit compare``) knows which command
    does that for it."""

    def __init__(self, out: Path, differences: list[str], epochs: int, how: str = ""):
        self.out, self.differences, self.epochs = out, differences, epochs
        how = how or f"`normkit train --out {out} --resume --epochs {epochs}`"
        super().__init__(f"--out {out} holds a finished run with other settings ({'; '.join(differences)}); pass "
                         f"--overwrite to replace it, or choose another --out to keep both (or train it longer: {how})")


def json_safe(value):
    """``value`` with every NaN or infinity replaced by None: strict JSON parsers refuse NaN, and an absent
    measurement (no validation images with --val-split 0) is null, not a number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def json_bytes(payload) -> bytes:
    """``payload`` as strict JSON (non-finite numbers as null), UTF-8, for the run's .json files."""
    return (json.dumps(json_safe(payload), indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def write_json(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, json_bytes(payload))


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """Refuse a path that cannot become a writable folder, before anything is created or loaded."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: is a file, not a folder; choose a folder path (created if missing)")
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"{flag} {out}: {parent} is a file, not a folder; choose a folder path")
            break


def make_out_folder(out: Path, flag: str = "--out") -> None:
    """mkdir -p, and a probe file: both fail here, with the flag named, rather than as a traceback later."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=out, prefix=".normkit-write-probe.")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{flag} {out}: cannot write there ({error.strerror or error}); choose a folder you can "
                         "write to") from None


# The files a run writes in its folder (besides TensorBoard's event files).
RUN_FILES = ("checkpoint.pt", "metrics.json", "config.json", "curves.png")


class FolderBusyError(ValueError):
    """Another process (``normkit train``, ``compare``, or Python's ``run``) is writing to this run folder."""


@contextlib.contextmanager
def folder_lock(out: Path, flag: str = "--out"):
    """Hold an exclusive lock on the folder ``out`` (an advisory ``flock`` on the directory itself, so no lock file is
    left behind, and the kernel releases it when the process ends, killed or not) for a run's lifetime. A second run
    into the same folder meanwhile deleted the first's temporaries mid-write, or its checkpoint as a "fresh run":
    it is refused instead, before it reads or touches anything. Where ``fcntl`` is missing (Windows) nothing is
    locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        handle = os.open(out, os.O_RDONLY)
    except OSError:
        yield  # (a folder that cannot be opened for reading cannot be locked; the run's own checks name it)
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusyError(f"{flag} {out}: another normkit run is writing to this folder now (a train or "
                                  "compare still running); wait for it to end, or choose another folder") from None
        yield
    finally:
        os.close(handle)  # (releases the lock)


def _resume_config(cfg: TrainConfig, saved: dict, given: set[str], source: str = "checkpoint",
                   remedy: str = "Start a new run with another --out instead.") -> TrainConfig:
    """The settings of a resumed run: ``saved``'s, except how this invocation runs; a given option that differs from
    ``saved`` (one a resumed run may not change) is refused, naming its flag."""
    conflicts = [f"{flag_of(k)} {getattr(cfg, k)!r} ({source}: {saved[k]!r})" for k in sorted(given)
                 if k not in RESUME_OVERRIDABLE and k in saved and getattr(cfg, k) != saved[k]]
    if conflicts:
        raise ValueError(f"a resumed run keeps its settings; these differ from the {source}'s: " + ", ".join(conflicts)
                         + f". {remedy}")
    # How this invocation runs (where, how loudly, whether to simulate a kill) is never inherited.
    overrides = {k: getattr(cfg, k) for k in RESUME_OVERRIDABLE if k in given or k in PER_INVOCATION}
    return dataclasses.replace(TrainConfig(**saved), **overrides)


@dataclass
class RunPlan:
    """A validated run: its resolved settings, the checkpoint it resumes (or None), its data, and what it
    replaces in ``out`` (None: nothing). Making one reads files but writes nothing."""
    cfg: TrainConfig
    checkpoint: dict | None
    data: Prepared
    notes: list[str]


def _identity_differences(saved: dict, mine: dict) -> list[str]:
    """The settings that make two runs compute different things (all but NOT_IDENTITY), as "--flag A there, B here"."""
    return [f"{flag_of(k)} {saved.get(k)!r} there, {mine[k]!r} here" for k in mine
            if k not in NOT_IDENTITY and saved.get(k) != mine[k]]


def _replacement_note(cfg: TrainConfig, checkpoint_path: Path) -> tuple[str, str | None]:
    """Whether a fresh run may replace the run whose checkpoint is in ``out``; raises when it would lose work.

    Returns the note to print and, for a finished run with the same settings, its data fingerprint (None when it
    has none): the caller compares it with this run's once the data is loaded."""
    out = checkpoint_path.parent
    try:
        payload = load_checkpoint(checkpoint_path)
        saved = config_from_checkpoint(payload, checkpoint_path).to_dict()
    except CheckpointError as error:
        raise ValueError(f"--out {out} holds a checkpoint.pt that cannot be read ({error}); pass --overwrite to "
                         "replace it, or choose another --out") from None
    if saved["dry_run"]:
        return f"replacing the dry run in {out}", None
    if payload["epoch"] < saved["epochs"]:
        raise UnfinishedRunError(out, payload["epoch"], saved["epochs"])
    differences = _identity_differences(saved, cfg.to_dict())
    if differences:
        if len(differences) == 1 and differences[0].startswith("--epochs ") and cfg.epochs > saved["epochs"]:
            raise LongerRunError(out, differences, cfg.epochs)
        raise ValueError(f"--out {out} holds a finished run with other settings ({'; '.join(differences)}); pass "
                         "--overwrite to replace it, or choose another --out to keep both")
    return (f"replacing the finished run in {out} (same settings: this run repeats it)",
            payload.get("data_sha256") or None)


def _run_config_json(path: Path, remedy: str) -> dict:
    """The settings in a run's config.json, each one known (as a checkpoint's config); one line when unreadable."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return config_from_checkpoint({"config": saved}, path).to_dict()
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as error:  # JSONDecodeError, CheckpointError
        reason = str(error).removeprefix(f"{path}: ")
        raise ValueError(f"--out {path.parent}: its config.json cannot be read ({reason}); {remedy}") from None


def _refuse_leftover_results(out: Path, situation: str, remedy: str) -> None:
    """Refuse to start in ``out`` when it holds a run's results (metrics.json, curves.png) but no checkpoint.pt, or
    TensorBoard event files without config.json (not a run of this lab): a fresh start would delete them."""
    leftovers = [name for name in ("metrics.json", "curves.png") if (out / name).exists()]
    if not leftovers and not (out / "config.json").exists() and any(out.glob("events.out.tfevents.*")):
        leftovers = ["TensorBoard event files (no config.json: not a run of this lab)"]
    if leftovers:
        raise ValueError(f"{situation} {out} holds {' and '.join(leftovers)} but no checkpoint.pt{remedy}")


def _fresh_run_without_checkpoint(cfg: TrainConfig, out: Path) -> str | None:
    """Whether a fresh run may start in ``out``, which has no checkpoint.pt; the note to print, or None when
    the folder holds no run. Raises when starting would delete files worth keeping."""
    _refuse_leftover_results(out, "--out", " (a run whose checkpoint was deleted, or files of your own), which this "
                             "run would delete; pass --overwrite to replace them, or choose another --out")
    config_path = out / "config.json"
    if not config_path.exists():
        return None
    # config.json alone (and event files): a run stopped in epoch 1, before its first checkpoint.
    saved = _run_config_json(config_path, "pass --overwrite to replace it, or choose another --out")
    if saved["dry_run"]:
        return f"replacing the dry run stopped before its checkpoint in {out}"
    differences = _identity_differences(saved, cfg.to_dict())
    if differences:
        raise ValueError(f"--out {out} holds a run stopped in epoch 1, before its first checkpoint (config.json, no "
                         f"checkpoint.pt), with other settings ({'; '.join(differences)}); pass --overwrite to "
                         "replace it, or choose another --out to keep both, or restart it with its own settings: "
                         f"`normkit train --out {out} --resume`")
    return f"replacing the run stopped in epoch 1 in {out} (same settings: this run starts it over)"


def _resume_without_checkpoint(cfg: TrainConfig, out: Path, given: set[str], notes: list[str]) -> TrainConfig:
    """--resume where there is no checkpoint yet: start from the beginning, with the settings of the run that
    stopped in epoch 1 (its config.json) for those the user did not give."""
    _refuse_leftover_results(out, "--resume:", ", so there is nothing to continue, and starting over would delete "
                             "them; pass --overwrite instead of --resume to replace them, or choose another --out")
    config_path = out / "config.json"
    if not config_path.exists():
        notes.append(f"--resume: no checkpoint in {out} yet, starting from the beginning")
        return cfg
    saved = _run_config_json(config_path, "pass --overwrite instead of --resume to start over, or choose another --out")
    resumed = _resume_config(cfg, saved, given, source="config.json")
    try:
        cfg = resumed.resolved()
    except ValueError as error:
        raise ValueError(f"{config_path}: its settings are not valid here: {error}") from None
    notes.append(f"--resume: no checkpoint in {out} yet (the run stopped in epoch 1); starting from the beginning "
                 f"with the settings in {config_path}")
    return cfg


def _resolved_from(resumed: TrainConfig, checkpoint_path: Path) -> TrainConfig:
    """The settings a run resumed from ``checkpoint_path`` takes, resolved; one naming the file when they do not
    hold here (e.g. its --device cuda on a machine without CUDA)."""
    try:
        return resumed.resolved()
    except ValueError as error:
        # (the resumed settings are the checkpoint's with the options given now: either may be what fails)
        raise CheckpointError(f"{checkpoint_path}: resumed with the options given now, its settings are not valid "
                              f"here: {error}") from None


def _other_data(theirs: str, mine: str) -> str:
    return f"its data's sha256 {theirs[:12]}..., this data's {mine[:12]}..."


# The optimizers that read each optimizer setting (optim.build_optimizer); the others ignore it.
OPTIMIZER_SETTINGS = {"rho": ("rmsprop",), "eps": ("rmsprop", "adam"), "momentum": ("sgd",)}


def _refuse_unused_optimizer_options(cfg: TrainConfig, given: set[str]) -> None:
    """A given --rho, --eps or --momentum other than its default that the run's optimizer never reads (--momentum
    0.9 with adam) would be silently ignored, and the run saved as if it had used it: refused, naming both flags."""
    defaults = TrainConfig()
    for name, users in OPTIMIZER_SETTINGS.items():
        if name in given and cfg.optimizer not in users and getattr(cfg, name) != getattr(defaults, name):
            raise ValueError(f"{flag_of(name)} {getattr(cfg, name)!r}: --optimizer {cfg.optimizer} does not use it (only "
                             f"{' and '.join(users)} do{'es' if len(users) == 1 else ''}); drop {flag_of(name)} or "
                             f"choose --optimizer {users[0]}")


# The lab extras (pip install "normkit[lab]") a run imports only when it gets to them: TensorBoard with the first epoch,
# matplotlib after the last (curves.png), tqdm for a terminal's progress bar. (module, what needs it, the way around it)
LAB_EXTRAS = {"tensorboard": ("torch.utils.tensorboard", "--tensorboard (TensorBoard event files, on by default)",
                              ", or pass --no-tensorboard"),
              "matplotlib": ("matplotlib", "curves.png (every run draws it)", ""),
              "tqdm": ("tqdm", "the progress bar (shown on a terminal)", ", or pass --quiet")}


def check_lab_extras(cfg: TrainConfig) -> None:
    """Refuse a run whose lab extras are not installed, before anything is written: a missing one would otherwise
    end the run with a traceback where it is first imported, matplotlib's after the whole training."""
    needed = ["matplotlib"] + (["tensorboard"] if cfg.tensorboard else []) + (
        ["tqdm"] if not cfg.quiet and sys.stderr.isatty() else [])  # (train._progress draws a bar only there)
    for package in needed:
        module, purpose, alternative = LAB_EXTRAS[package]
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"{purpose} needs the {package} package, which cannot be imported here ({error}); "
                             f"install the lab extras: pip install \"normkit[lab]\"{alternative}") from None


def check_compile(cfg: TrainConfig) -> None:
    """--compile: torch.compile works on this machine (a C++ compiler for the CPU, Triton for CUDA), tried on a tiny
    function before anything is written. It failed at the first step otherwise, in a traceback, after a fresh run had
    deleted the finished run with the same settings that it replaces (``--compile`` is not one of a run's settings)."""
    if not cfg.compile:
        return
    import torch

    from .train import _interrupts_held  # (at call time: train imports this module)

    try:
        with _interrupts_held():  # (the first torch.compile imports torch._dynamo: a Ctrl-C inside aborts the process)
            torch.compile(lambda x: torch.sigmoid(x * 2.0) + 1.0)(torch.ones(4, device=cfg.device))
    except Exception as error:  # (whatever stops torch.compile here would stop it on the model)
        detail = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"--compile: torch.compile does not work on {cfg.device} here ({type(error).__name__}: "
                         f"{detail.strip()}); install what it needs (a C++ compiler for the CPU), or drop --compile") \
            from None


def _refuse_single_image_evaluation(cfg: TrainConfig, data: Prepared) -> None:
    """BN without running statistics (--norm-option track_running_stats=false) evaluates with each batch's statistics,
    which a split of one image does not have: the run stopped at its first validation, its epoch unsaved."""
    from .config import _has_batch_norm, _keeps_running_stats

    if not _has_batch_norm(cfg.norm) or _keeps_running_stats(cfg.norm, cfg.norm_options):
        return
    for split, flags in (("validation", "--val-split or --train-limit"), ("test", "--dataset or --data-dir")):
        if len(getattr(data, "val" if split == "validation" else "test")[1]) == 1:
            raise ValueError(f"the {split} split holds 1 image, and --norm {cfg.norm} with --norm-option "
                             "track_running_stats=false normalizes evaluation batches with their own statistics, "
                             f"which need 2 images; change {flags}, or keep running statistics")


def set_settings(cfg: TrainConfig) -> set[str]:
    """The fields of ``cfg`` whose values differ from ``TrainConfig``'s defaults: what its caller set."""
    defaults = TrainConfig()

    def differs(value, default) -> bool:
        try:
            return bool(value != default)
        except (TypeError, ValueError, RuntimeError):  # (a value resolved() then refuses, e.g. an array)
            return True
    return {f.name for f in dataclasses.fields(TrainConfig) if differs(getattr(cfg, f.name), getattr(defaults, f.name))}


def plan_run(cfg: TrainConfig, given: set[str] | None = None, splits: Splits | None = None) -> RunPlan:
    """Validate everything a run needs (settings, --out, the checkpoint it resumes or replaces, the data and
    its batches) without writing anything: a failed run leaves ``out`` as it found it.

    ``given=None`` (a call from Python, where no flag was typed): the settings that differ from their defaults."""
    if given is None:
        # Without this a Python resume dropped them silently: run(TrainConfig(out=o, resume=True, epochs=10)) kept the
        # checkpoint's epochs, and a conflicting lr, or adam with momentum 0.9, went through instead of being refused.
        given = set_settings(cfg)
    cfg = cfg.resolved()
    out = Path(cfg.out)
    check_out_folder(out)
    checkpoint_path = out / "checkpoint.pt"
    checkpoint, notes, replaced_data = None, [], None
    # Where the data folder came from when it was not typed: a data error says so (the folder in it is not one the
    # user gave, and after a move the remedy is --data-dir).
    data_origin = "NORMKIT_DATA's value (no --data-dir was given)" if os.environ.get("NORMKIT_DATA") else None
    if cfg.resume and checkpoint_path.is_file():
        try:
            payload = load_checkpoint(checkpoint_path, map_location=cfg.device)
            saved = config_from_checkpoint(payload, checkpoint_path).to_dict()
        except CheckpointError as error:
            raise CheckpointError(f"{error}; {RESUME_REMEDY}") from None
        if saved["data_dir"] is not None:  # (None: a run of an earlier normkit, which read NORMKIT_DATA's)
            data_origin = f"the one the run trained on, recorded in {checkpoint_path}"
        if saved["dry_run"] and not cfg.dry_run:
            # A dry run's one batch is a smoke test, not a start worth continuing: the real run starts over, but
            # with the dry run's settings (as a run stopped before its first checkpoint restarts with its config.json's).
            resumed = _resume_config(cfg, saved, given, source="dry run",
                                     remedy="Drop --resume to replace the dry run with a run of these settings, "
                                            "or choose another --out.")
            cfg = _resolved_from(resumed, checkpoint_path)
            notes.append(f"--resume: {checkpoint_path} is a dry run's (one batch); starting the real run from the "
                         "beginning with its settings (all but --dry-run)")
        elif cfg.dry_run and not saved["dry_run"]:
            raise ValueError(f"--dry-run --resume: {checkpoint_path} is a real run's, and a dry run would replace its "
                             "metrics with one-batch estimates; drop --dry-run to continue it, or smoke-test in "
                             "another --out")
        else:
            cfg = _resolved_from(_resume_config(cfg, saved, given), checkpoint_path)  # conflicts name the flags
            if cfg.epochs < payload["epoch"]:
                raise ValueError(f"--epochs {cfg.epochs}: {checkpoint_path} has already trained {payload['epoch']} "
                                 f"epochs; a resumed run can train longer (--epochs {payload['epoch']} or more) but "
                                 "not undo epochs; train a shorter run in another --out")
            checkpoint = payload
            notes.append(f"resuming {checkpoint_path} after epoch {payload['epoch']} (step {payload['step']})")
    elif cfg.resume:
        if (out / "config.json").is_file():
            data_origin = f"the one the run trained on, recorded in {out / 'config.json'}"
        cfg = _resume_without_checkpoint(cfg, out, given, notes)
    elif cfg.overwrite:
        if out.is_dir() and (any((out / name).exists() for name in RUN_FILES)
                             or any(out.glob("events.out.tfevents.*"))):
            notes.append(f"--overwrite: replacing the run in {out}")
    elif checkpoint_path.is_file():
        note, replaced_data = _replacement_note(cfg, checkpoint_path)
        notes.append(note)
    elif out.is_dir():
        note = _fresh_run_without_checkpoint(cfg, out)
        if note is not None:
            notes.append(note)
    _refuse_unused_optimizer_options(cfg, given)
    check_lab_extras(cfg)
    check_compile(cfg)
    try:
        data = prepare_data(cfg, splits)
    except DataError as error:
        if "data_dir" in given or data_origin is None or splits is not None or cfg.dataset == "digits":
            raise
        raise DataError(f"{error}; that folder is {data_origin}") from None
    available = len(data.train[1]) + len(data.val[1])
    if cfg.train_limit is not None and cfg.train_limit > available:
        # (a limit is a ceiling, as `head -n`: one above the count is not an error, but the run says what it took)
        notes.append(f"--train-limit {cfg.train_limit}: --dataset {cfg.dataset} has {available} training images; "
                     "using all of them")
    check_batches(cfg, len(data.train[1]), data.train[1])
    _refuse_single_image_evaluation(cfg, data)
    # The same settings on other files are another run: compared by the data's fingerprint, not by --data-dir
    # (a moved dataset is the same data). Checkpoints written before fingerprints existed have none to compare.
    resumed_data = checkpoint.get("data_sha256") if checkpoint is not None else None
    if resumed_data and resumed_data != data.fingerprint:
        where = cfg.data_dir if cfg.data_dir is not None else "$NORMKIT_DATA"
        raise ValueError(f"--resume: {checkpoint_path} was trained on other data than {where} holds "
                         f"({_other_data(resumed_data, data.fingerprint)}); point --data-dir at that run's data, or "
                         "start a new run in another --out")
    if replaced_data and replaced_data != data.fingerprint:
        raise ValueError(f"--out {out} holds a finished run with the same settings but trained on other data "
                         f"({_other_data(replaced_data, data.fingerprint)}: another --data-dir, or changed files); "
                         "pass --overwrite to replace it, or choose another --out to keep both")
    return RunPlan(cfg=cfg, checkpoint=checkpoint, data=data, notes=notes)
