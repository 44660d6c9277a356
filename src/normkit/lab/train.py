"""Train and evaluate the lab's models: one loop, set up by one ``TrainConfig``, resumable bit for bit on CPU.

``run(TrainConfig(...))`` trains, writes the run directory and returns the metrics dict. A run
directory holds config.json, metrics.json, checkpoint.pt (after every epoch, atomically), TensorBoard
event files and curves.png. With ``recalibrate`` (``--recalibrate N``) the BN running statistics are
recomputed after the last epoch (``normkit.recalibrate_running_stats``, "precise BN") and the checkpoint
is rewritten with them: the final checkpoint is the model the reported test accuracy measures.

The loop's parts live beside it: config.py (``TrainConfig`` and its checks), batches.py (the prepared data
and each epoch's batches), checkpoint.py (save, load, RNG states), board.py (TensorBoard) and runfolder.py
(``plan_run``: what a run may write, replace or resume in ``out``, checked before anything is written).

Determinism: batches are shuffled by a dedicated ``torch.Generator`` seeded with ``seed``; its state,
and torch's, NumPy's and Python's global RNG states, are saved with each checkpoint. A resumed run
restarts the interrupted epoch from its beginning with those states, so it repeats exactly the steps
an uninterrupted run takes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normkit.options import apply_constraints, regularization_loss
from normkit.registry import is_norm_layer
from normkit.tools import recalibrate_running_stats

from .batches import Prepared, recalibration_batches, training_batches
from .board import Board
from .checkpoint import (CheckpointError, load_checkpoint, load_weights, model_from_checkpoint, restore_rng_states,
                         save_checkpoint)
from .config import TrainConfig, check_device, check_folder_option
from .data import DATASETS, DataError, Splits, leftover_temporaries, load_test_split
from .models import build_model
from .optim import build_optimizer
from .runfolder import (RESUME_REMEDY, RUN_FILES, FolderBusyError, RunPlan, folder_lock, json_safe, make_out_folder,
                        plan_run, write_json)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
             max_batches: int | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (running statistics)."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    starts = list(range(0, len(labels), batch_size))
    if len(starts) > 1 and len(labels) - starts[-1] == 1:
        # A last batch of one image joins the one before (1,001 images: one batch of 1,001). BN without running
        # statistics (--norm-option track_running_stats=false) normalizes evaluation batches with their own, which one
        # image does not have: the run stopped after its epoch's training, unsaved. Other models are per image here.
        starts.pop()
    ends = starts[1:] + [len(labels)]
    for index, (start, end) in enumerate(zip(starts, ends)):
        if max_batches is not None and index >= max_batches:
            break
        logits = model(images[start:end])
        target = labels[start:end]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
        seen += len(target)
    model.train(was_training)
    if seen == 0:
        return math.nan, math.nan
    return total_loss / seen, correct / seen


def first_norm_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the model's first normalization layer, or None (what the summary prints)."""
    return next(((name, module) for name, module in model.named_modules() if is_norm_layer(module)), None)


def _say(cfg: TrainConfig, text: str) -> None:
    if not cfg.quiet:
        print(text, flush=True)


def _show(value: float | None, missing: str = "n/a") -> str:
    """A measurement for the per-epoch line; ``missing`` where there is none (n/a: not measured, nan: diverged)."""
    return missing if value is None else f"{value:.4f}"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a run; the message says what the run directory holds and how to continue.
    ``exit_status``: the command's, 130 for Ctrl-C, 143 (128 + SIGTERM) for a termination."""
    exit_status = 130

    def __init__(self, message: str, terminated: bool = False):
        super().__init__(message)
        self.terminated = terminated
        self.exit_status = 128 + signal.SIGTERM if terminated else 130


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, `timeout`, `kill PID`) raised as Ctrl-C is, inside ``terminations_interrupt()``."""


# The signal that stopped the run (or command) in progress, while its interrupt unwinds: a second Ctrl-C then (during
# the checkpoint's write, the TensorBoard flush, the report, the interpreter's exit) raised a KeyboardInterrupt of
# its own, which replaced the report with "interrupted before training started: nothing was written" or a traceback.
# Cleared when the outermost block that installed the handlers ends.
_first_interrupt: list[int] = []
_installed_blocks = [0]


def _interrupt_once(signum, frame):
    """Ctrl-C (and SIGTERM, as Ctrl-C) raises once; a later one while that interrupt unwinds is ignored, so its
    report (what checkpoint.pt holds, the command that continues it) is the one the user gets."""
    if _first_interrupt:
        return
    _first_interrupt.append(signum)
    if signum == signal.SIGTERM:
        raise Terminated("terminated (SIGTERM)")
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupted_once(terminations: bool = True, keep_ignoring: bool = False):
    """Inside the block the first Ctrl-C raises KeyboardInterrupt as Python's own handler does (and with
    ``terminations``, SIGTERM raises ``Terminated`` in place of ending the process on the spot and silently); any
    later one, while that interrupt unwinds, is ignored. Only handlers still Python's defaults are replaced: a
    program's own SIGINT or SIGTERM handler stays, and so does an enclosing block's. When the block ends the
    defaults come back, except after an interrupt with ``keep_ignoring`` (the command line, whose process is ending:
    a Ctrl-C during the interpreter's exit printed a traceback), or in an enclosing block's interrupt, which ignores
    them until it ends."""
    installed = {}
    if threading.current_thread() is threading.main_thread():  # (only it receives Python's signal handlers)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            installed[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt_once)
        if terminations and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            installed[signal.SIGTERM] = signal.signal(signal.SIGTERM, _interrupt_once)
    if not installed:
        yield
        return
    _installed_blocks[0] += 1
    try:
        yield
    finally:
        _installed_blocks[0] -= 1
        outermost = _installed_blocks[0] == 0
        ignore = bool(_first_interrupt) and (keep_ignoring or not outermost)
        for signum, previous in installed.items():
            signal.signal(signum, signal.SIG_IGN if ignore else previous)
        if outermost:
            _first_interrupt.clear()


def terminations_interrupt():
    """SIGTERM stops a run as Ctrl-C does: the run directory's state and the command that continues it are reported,
    TensorBoard's events are flushed, exit status 143. (By default SIGTERM ended the process on the spot and silently.)
    A second signal while the first unwinds is ignored (``interrupted_once``)."""
    return interrupted_once(terminations=True)


def run(cfg: TrainConfig, given: set[str] | None = None, splits: Splits | None = None,
        on_step: Callable[[int, nn.Module], None] | None = None) -> dict:
    """Train (or resume) one run; returns the metrics dict also written to out/metrics.json.

    ``given`` names the settings the user set explicitly (the CLI passes them): on --resume those must
    agree with the checkpoint, except the ones in RESUME_OVERRIDABLE (e.g. --epochs to train longer); None (a
    call from Python) takes the settings that differ from TrainConfig's defaults as given.
    ``splits`` lets callers (benchmarks, tests) pass data already in memory. ``on_step(step, model)`` is
    called after every optimizer step (step counts from 1), for measurements during training
    (tools/make_results.py traces activations with it); it must leave the model (weights, buffers, mode)
    and the random generators as it found them, or the run is no longer the one its config describes.

    Everything is validated (``plan_run``) before ``out`` is created or anything in it is touched. A run
    into an ``out`` that holds an earlier run replaces it only when that was a dry run or a finished run
    with the same settings, or with ``overwrite=True``; see docs/lab.md, "Output directory".
    """
    with contextlib.ExitStack() as locks:
        # A folder that exists is locked before the plan reads it (its checkpoint, the run it would replace); a new
        # one once the run makes it (_train), before anything in it is written or deleted.
        try:
            out = Path(cfg.out_folder())
        except (TypeError, ValueError):
            out = None  # (settings the plan refuses by name)
        if out is not None and out.is_dir():
            locks.enter_context(folder_lock(out))
            lock_new_folder = None
        else:
            def lock_new_folder(folder: Path) -> None:
                locks.enter_context(folder_lock(folder))
        plan = plan_run(cfg, given, splits)
        previous_threads = torch.get_num_threads()
        if plan.cfg.threads:
            torch.set_num_threads(plan.cfg.threads)
        try:
            with terminations_interrupt():
                return _run(plan, on_step, lock_new_folder)
        finally:
            torch.set_num_threads(previous_threads)


def _run(plan: RunPlan, on_step: Callable[[int, nn.Module], None] | None,
         lock_new_folder: Callable[[Path], None] | None) -> dict:
    cfg, checkpoint = plan.cfg, plan.checkpoint
    out = Path(cfg.out)
    progress = {"saved_epochs": checkpoint["epoch"] if checkpoint is not None else 0}  # what checkpoint.pt holds
    try:
        return _train(plan, on_step, progress, lock_new_folder)
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        message = _interrupted_message(out, progress["saved_epochs"], 1 if cfg.dry_run else cfg.epochs)
        if terminated:
            message = "terminated (SIGTERM) " + message.removeprefix("interrupted ")
        raise RunInterrupted(message, terminated=terminated) from None


def _train(plan: RunPlan, on_step: Callable[[int, nn.Module], None] | None, progress: dict,
           lock_new_folder: Callable[[Path], None] | None) -> dict:
    """The run itself; ``lock_new_folder`` locks ``out`` once made, where run() could not lock it before the plan."""
    cfg, checkpoint, data = plan.cfg, plan.checkpoint, plan.data
    out = Path(cfg.out)
    checkpoint_path = out / "checkpoint.pt"
    for note in plan.notes:
        _say(cfg, note)
    make_out_folder(out)
    if lock_new_folder is not None:
        lock_new_folder(out)
        if any((out / name).exists() for name in RUN_FILES):
            # Another run made the folder and wrote in it between this run's plan (no folder) and now.
            raise FolderBusyError(f"--out {out}: another normkit run created this folder and wrote to it while this "
                                  "one was starting; nothing of it was changed. Run again to see what it holds (and "
                                  "resume or replace it), or choose another folder")
    # Temporaries of a process killed mid-write (SIGKILL skips atomic_write_bytes' cleanup): never read, only in the way.
    for leftover in leftover_temporaries(out, RUN_FILES):
        leftover.unlink(missing_ok=True)
    if checkpoint is None:
        # A fresh run owns its directory (plan_run allowed the replacement): stale event files would mix two
        # runs' curves in TensorBoard, and an old checkpoint would be "resumed" after a Ctrl-C in epoch 1.
        for stale in [*out.glob("events.out.tfevents.*"), checkpoint_path, out / "metrics.json", out / "curves.png"]:
            stale.unlink(missing_ok=True)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)

    model = build_model(cfg.model, cfg.norm, cfg.activation, cfg.init, cfg.norm_options).to(cfg.device)
    with _interrupts_held():
        optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, rho=cfg.rho, eps=cfg.eps,
                                    momentum=cfg.momentum)
    # The compiled module shares the model's parameters and buffers: checkpoints, evaluation and
    # the TensorBoard probes use the model itself (eager; evaluation would recompile for eval mode).
    train_model = torch.compile(model) if cfg.compile else model
    history: list[dict] = []
    start_epoch, step = 0, 0
    if checkpoint is not None:
        try:
            load_weights(model, checkpoint["model"], checkpoint_path, cfg)
        except CheckpointError as error:
            raise CheckpointError(f"{error}; {RESUME_REMEDY}") from None
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError) as error:
            raise CheckpointError(f"{checkpoint_path}: its optimizer state does not fit the model: "
                                  f"{str(error).splitlines()[0] if str(error) else type(error).__name__}; "
                                  f"{RESUME_REMEDY}") from None
        history, start_epoch, step = list(checkpoint["history"]), checkpoint["epoch"], checkpoint["step"]
        try:
            restore_rng_states(checkpoint["rng"], shuffle)
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as error:
            # load_checkpoint tried every state but CUDA's (trying those would start CUDA for a CPU run).
            raise CheckpointError(f"{checkpoint_path}: its RNG states cannot be restored: "
                                  f"{str(error).splitlines()[0] if str(error) else type(error).__name__}; "
                                  f"{RESUME_REMEDY}") from None
    write_json(out / "config.json", cfg.to_dict())

    # The checkpoint's last step is logged; a killed run may have logged later ones, which the resumed run redoes.
    board = Board(out, cfg.tensorboard, purge_step=step + 1 if checkpoint is not None else None)
    probe = data.val[0][:256] if len(data.val[1]) else data.train[0][:256]
    # --norm-option weight_regularizer=l2 / weight_constraint=non_neg: normkit layers' Keras-style options.
    regularized = any(getattr(m, f"{p}_regularizer", None) is not None for m in model.modules() for p in ("weight", "bias"))
    constrained = any(getattr(m, f"{p}_constraint", None) is not None for m in model.modules() for p in ("weight", "bias"))
    train_images, train_labels = data.train
    epochs = 1 if cfg.dry_run else cfg.epochs
    if checkpoint is not None and start_epoch >= epochs and checkpoint["config"].get("data_dir") != cfg.data_dir:
        # A finished run resumed from a moved data folder: the checkpoint (which evaluate and the next --resume
        # read) names the new folder, as config.json does; nothing else in it changes.
        save_checkpoint(checkpoint_path, model, optimizer, start_epoch, step, cfg, history, shuffle, data.fingerprint,
                        recalibration=checkpoint.get("recalibration"))
    _say(cfg, f"{cfg.model} + {cfg.norm} on {cfg.dataset}: {len(train_labels)} train / {len(data.val[1])} validation / "
              f"{len(data.test[1])} test images, {cfg.optimizer} lr {cfg.lr}, batch {cfg.batch_size}, "
              f"{epochs} epochs -> {out}")
    try:
        for epoch in range(start_epoch, epochs):
            batches = training_batches(len(train_labels), cfg, shuffle, train_labels)
            if cfg.dry_run:
                batches = batches[:1]
            model.train()
            loss_sum, correct, seen = torch.zeros((), device=cfg.device), torch.zeros((), device=cfg.device), 0
            started = time.perf_counter()
            bar = _progress(len(batches), f"epoch {epoch + 1}/{epochs}", cfg)
            for index in batches:
                index = index.to(cfg.device)
                images, labels = train_images[index], train_labels[index]
                logits = train_model(images)
                loss = F.cross_entropy(logits, labels)
                if regularized:
                    loss = loss + regularization_loss(model)  # as Keras: the reported training loss includes it
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if constrained:
                    apply_constraints(model)
                step += 1
                with torch.no_grad():
                    batch_loss, batch_correct = loss.detach(), (logits.argmax(1) == labels).sum()
                    loss_sum += batch_loss * len(labels)
                    correct += batch_correct
                    seen += len(labels)
                if board.writer:
                    board.step(step, batch_loss.item(), batch_correct.item() / len(labels))
                if bar is not None:
                    bar.update(1)
                if on_step is not None:
                    on_step(step, model)
                if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
                    # Tests simulate a kill: no cleanup, no checkpoint, nothing flushed.
                    os._exit(75)
            seconds = time.perf_counter() - started
            if bar is not None:
                bar.close()
            max_batches = 1 if cfg.dry_run else None
            val_loss, val_accuracy = json_safe(evaluate(model, *data.val, max_batches=max_batches))
            record = {"epoch": epoch + 1, "step": step, "loss": (loss_sum / max(seen, 1)).item(),
                      "accuracy": (correct / max(seen, 1)).item(), "val_loss": val_loss,
                      "val_accuracy": val_accuracy, "seconds": seconds,
                      "images_per_second": seen / seconds if seconds > 0 else None}
            history.append(record)

            def save_epoch(epoch=epoch):
                # A Ctrl-C during the save waits until checkpoint.pt, the count the report gives and metrics.json
                # agree (each file is written atomically either way): one landing after the checkpoint's rename
                # reported the epoch before as the one it holds.
                with _interrupts_held():
                    save_checkpoint(checkpoint_path, model, optimizer, epoch + 1, step, cfg, history, shuffle,
                                    data.fingerprint)
                    progress["saved_epochs"] = epoch + 1
                    write_json(out / "metrics.json", {"history": history, "data_sha256": data.fingerprint})

            # TensorBoard first (flushed): a resumed run keeps the events up to its checkpoint's step and logs after
            # it, so an epoch saved before its events were written would miss them for good. A kill before the
            # checkpoint only repeats the epoch, whose events the resumed run purges and logs again.
            try:
                board.epoch(step, record, model, probe)
            except Exception:
                save_epoch()  # whatever TensorBoard makes of this epoch, the epoch is saved
                raise
            save_epoch()
            speed = record["images_per_second"]
            # (metrics.json says null for both an absent validation split and a diverged model's NaN loss: the line
            # tells them apart, as the training loss beside it prints nan)
            missing = "n/a" if len(data.val[1]) == 0 else "nan"
            _say(cfg, f"epoch {epoch + 1}/{epochs}  loss {record['loss']:.4f}  accuracy {record['accuracy']:.4f}  "
                      f"val_loss {_show(val_loss, missing)}  val_accuracy {_show(val_accuracy)}  {seconds:.1f}s "
                      f"({'n/a' if speed is None else f'{speed:.0f}'} img/s)")
    finally:
        board.close()
    # A finished, recalibrated run resumed without training further: its checkpoint says what was measured before
    # (or, written before checkpoints recorded it, the run's metrics.json).
    recalibrated = None
    if checkpoint is not None and start_epoch >= epochs:
        recalibrated = checkpoint.get("recalibration") or _recalibration_in_metrics(out, checkpoint)
    return _finish(cfg, out, checkpoint_path, model, optimizer, history, step, shuffle, data, recalibrated)


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C waits until the block ends: torch's first optimizer imports torch._dynamo and Triton (about a
    second), and a KeyboardInterrupt raised inside that import's native callbacks aborts the whole process
    (SIGABRT, no message). A Ctrl-C pressed meanwhile is recorded and raised right after, as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (only the main thread receives Python's signal handlers)
        return
    pending = []
    held = (signal.SIGINT, signal.SIGTERM)  # (SIGTERM too: terminations_interrupt raises it as Ctrl-C is raised)
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum in held:
            signal.signal(signum, previous[signum])
    if pending:
        signum = pending[0]
        if callable(previous[signum]):
            previous[signum](signum, None)  # Python's default handler raises KeyboardInterrupt, _terminate Terminated
        elif previous[signum] == signal.SIG_DFL and signum == signal.SIGTERM:
            os.kill(os.getpid(), signum)  # (not inside terminations_interrupt: the default action, now)
        elif previous[signum] != signal.SIG_IGN:
            raise KeyboardInterrupt


def _recalibration_in_metrics(out: Path, checkpoint: dict) -> dict | None:
    """The recalibration record of a checkpoint written before checkpoints carried one (normkit before
    2026-11-30), from the metrics.json its run wrote right after it: that file, for the same epochs and data,
    names the recalibration and the test measurement before it, which the checkpoint no longer holds."""
    try:
        metrics = json.loads((out / "metrics.json").read_text())
        info, history = metrics["recalibration"], metrics["history"]
        record = {"recalibrate": checkpoint["config"]["recalibrate"], "batches": info["batches"],
                  "images": info["images"], **{key: metrics[key] for key in ("test_loss_before_recalibration",
                                                                            "test_accuracy_before_recalibration")}}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (len(history) != checkpoint["epoch"] or metrics.get("data_sha256") != checkpoint.get("data_sha256")
            or not isinstance(record["recalibrate"], int) or record["recalibrate"] == 0):
        return None
    return record


def _interrupted_message(out: Path, saved_epochs: int, epochs: int) -> str:
    if saved_epochs == 0:
        return (f"interrupted in epoch 1, before the first checkpoint: nothing to resume in {out}; run the same "
                "command again to start over")
    if saved_epochs >= epochs:
        return (f"interrupted after training: {out / 'checkpoint.pt'} holds all {epochs} epochs; "
                f"`normkit train --out {out} --resume` evaluates it again")
    # (--epochs in the command: a run resumed to train longer has a checkpoint whose settings still say fewer)
    return (f"interrupted in epoch {saved_epochs + 1}: {out / 'checkpoint.pt'} holds epoch {saved_epochs} of {epochs}; "
            f"continue with `normkit train --out {out} --resume --epochs {epochs}`")


def _finish(cfg: TrainConfig, out: Path, checkpoint_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            history: list[dict], step: int, shuffle: torch.Generator, data: Prepared,
            recalibrated: dict | None = None) -> dict:
    """After the last epoch: test evaluation, optional recalibration, metrics.json, curves.png, the summary.

    ``recalibrated``: the checkpoint's record when it holds an already recalibrated model and nothing was trained
    since. Its "before" measurement is reported (the statistics training ended with are gone from the model),
    and the recalibration is not redone, nor the checkpoint rewritten, when it used the same batch count.
    """
    train_images, train_labels = data.train
    test_batches = 1 if cfg.dry_run else None
    if recalibrated is not None:
        before = {key: recalibrated[key] for key in ("test_loss_before_recalibration",
                                                     "test_accuracy_before_recalibration")}
        recalibration = {"batches": recalibrated["batches"], "images": recalibrated["images"]}
    else:
        test_loss, test_accuracy = evaluate(model, *data.test, max_batches=test_batches)
        before = {"test_loss_before_recalibration": test_loss, "test_accuracy_before_recalibration": test_accuracy}
        recalibration = None
    if cfg.recalibrate and (recalibrated is None or recalibrated["recalibrate"] != cfg.recalibrate):
        # Precise BN: the running statistics of the final weights; the checkpoint then holds the recalibrated model.
        batches = recalibration_batches(train_images, cfg, 1 if cfg.dry_run else cfg.recalibrate)
        recalibrate_running_stats(model, batches)
        recalibration = {"batches": len(batches), "images": sum(len(batch) for batch in batches)}
        save_checkpoint(checkpoint_path, model, optimizer, len(history), step, cfg, history, shuffle, data.fingerprint,
                        recalibration={**recalibration, **before, "recalibrate": cfg.recalibrate})
    if recalibration is not None:
        test_loss, test_accuracy = evaluate(model, *data.test, max_batches=test_batches)
    metrics = {"history": history, "test_loss": test_loss, "test_accuracy": test_accuracy, **before,
               "recalibration": recalibration,
               "train_size": len(train_labels), "val_size": len(data.val[1]), "test_size": len(data.test[1]),
               "steps": step, "data_sha256": data.fingerprint}
    norm = first_norm_layer(model)
    metrics["first_norm_layer"] = None  # (--norm none: absent, hence null as every absent value)
    if norm is not None:
        name, layer = norm
        metrics["first_norm_layer"] = {
            "name": name, "type": type(layer).__name__,
            "weight": layer.weight.detach().cpu().flatten().tolist() if getattr(layer, "weight", None) is not None else None,
            "bias": layer.bias.detach().cpu().flatten().tolist() if getattr(layer, "bias", None) is not None else None}
    metrics = json_safe(metrics)
    write_json(out / "metrics.json", metrics)
    if history:
        from .plots import plot_curves
        plot_curves({cfg.norm: history}, out / "curves.png", title=f"{cfg.model} on {cfg.dataset}")
    if recalibration is not None:
        _say(cfg, f"recalibrated BN running statistics over {recalibration['batches']} training "
                  f"batch{'es' if recalibration['batches'] != 1 else ''} "
                  f"({recalibration['images']} images): test accuracy {before['test_accuracy_before_recalibration']:.4f}"
                  f" -> {test_accuracy:.4f}")
    _say(cfg, f"test accuracy {test_accuracy:.4f}  test loss {test_loss:.4f}")
    if norm is None:
        _say(cfg, "no normalization layer (--norm none)")
    else:
        _say(cfg, f"first norm layer ({norm[0]}, {type(norm[1]).__name__}):")
        _say(cfg, f"  weight (gamma) {_format(metrics['first_norm_layer']['weight'])}")
        _say(cfg, f"  bias   (beta)  {_format(metrics['first_norm_layer']['bias'])}")
    return metrics


def _format(values: list[float] | None) -> str:
    # A diverged run's NaN weights are None here (metrics.json's null).
    return "none (affine=False)" if values is None else "[" + ", ".join("nan" if v is None else f"{v:.4f}" for v in values) + "]"


def _progress(total: int, description: str, cfg: TrainConfig):
    if cfg.quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=description, unit="batch", leave=False, dynamic_ncols=True)


def evaluate_checkpoint(path: str | os.PathLike, dataset: str | None = None, data_dir: str | None = None,
                        device: str = "cpu") -> dict:
    """Test loss and accuracy of a saved run, on its own dataset's test split or on ``dataset``'s.

    The data folder is ``data_dir``, else the one the run trained on (its config's, resolved when it trained),
    else $NORMKIT_DATA (checkpoints that recorded none). Only the test split's files are read."""
    # Checked first: torch.load onto a missing device would read as a corrupt checkpoint.
    check_device(device)
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"--dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    check_folder_option("--data-dir", data_dir, omitted="the folder the run trained on")
    if isinstance(path, (str, os.PathLike)) and not os.fspath(path):
        raise ValueError("--checkpoint '': give a run's checkpoint.pt or its run folder (an empty path would mean "
                         "the current folder by accident)")
    if isinstance(path, (str, os.PathLike)):
        path = Path(path).expanduser()  # as train's --out: `--checkpoint=~/runs/a` (no shell expands it after `=`)
    if Path(path).is_dir():
        folder, path = Path(path), Path(path) / "checkpoint.pt"  # a run folder (`--out DIR`) stands for its checkpoint
        if not path.exists() and not (folder / "config.json").exists():  # e.g. runs/: name the run folders in it
            runs = sorted(str(run.parent) for run in folder.glob("*/checkpoint.pt"))
            raise CheckpointError(f"{path}: no such checkpoint file: {folder} is not a run folder" + (
                f"; run folders in it: {', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''}" if runs else
                "; pass a run's checkpoint.pt or its folder (`normkit train --out DIR` writes DIR/checkpoint.pt)"))
    payload = load_checkpoint(path, map_location=device)
    model, cfg = model_from_checkpoint(payload, path)
    dataset = dataset or cfg.dataset
    if (data_dir is None and dataset not in (cfg.dataset, "digits") and cfg.data_dir is not None
            and not (Path(cfg.data_dir).expanduser() / dataset).is_dir()):
        # The run's folder holds its own dataset's files, directly or in <its dataset>/, and every MNIST-format
        # dataset has the same file names: read as another dataset's, they would measure the run's own test split.
        raise DataError(f"--dataset {dataset}: the folder the run trained on ({cfg.data_dir}) holds its {cfg.dataset} "
                        f"files and no {dataset}/ folder; pass --data-dir with the {dataset} files")
    try:
        images, labels = load_test_split(dataset, data_dir if data_dir is not None else cfg.data_dir)
    except DataError as error:
        if data_dir is not None or cfg.data_dir is None or dataset == "digits":
            raise
        # (the folder is not one the user typed: after a move, --data-dir is the remedy)
        raise DataError(f"{error}; that folder is the one the run trained on, recorded in {path}") from None
    test_loss, test_accuracy = evaluate(model.to(device), images.to(device), labels.to(device))
    return {"checkpoint": str(path), "dataset": dataset, "epoch": payload["epoch"], "test_size": len(labels),
            "test_loss": test_loss, "test_accuracy": test_accuracy}
