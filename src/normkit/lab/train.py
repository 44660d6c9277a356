"""Train and evaluate the lab's models: one config dataclass, one loop, resumable bit for bit on CPU.

``run(TrainConfig(...))`` trains, writes the run directory and returns the metrics dict. A run
directory holds config.json, metrics.json, checkpoint.pt (after every epoch, atomically), TensorBoard
event files and curves.png. The checkpoint holds only tensors, dicts, lists and primitives, so it
loads with ``torch.load(weights_only=True)``. With ``recalibrate`` (``--recalibrate N``) the BN running
statistics are recomputed after the last epoch (``normkit.recalibrate_running_stats``, "precise BN") and
the checkpoint is rewritten with them: the final checkpoint is the model the reported test accuracy measures.

Safety: ``plan_run`` validates the settings, the output folder, the checkpoint to resume or replace, the
data and its batches before anything is written, so a failed run leaves ``out`` as it was. A fresh run
replaces an earlier run in ``out`` only when that was a dry run, a finished run with the same settings and
data (``data_sha256``, a fingerprint of the prepared splits) or a run stopped before its first checkpoint with
the same settings (``overwrite=True`` replaces any); docs/lab.md, "Output directory", has the rules.

Determinism: batches are shuffled by a dedicated ``torch.Generator`` seeded with ``seed``; its state,
and torch's, NumPy's and Python's global RNG states, are saved with each checkpoint. A resumed run
restarts the interrupted epoch from its beginning with those states, so it repeats exactly the steps
an uninterrupted run takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import random
import signal
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normkit.options import apply_constraints, regularization_loss
from normkit.registry import NORM_NAMES, create_norm, is_norm_layer
from normkit.tools import recalibrate_running_stats

from .data import DATASETS, Splits, atomic_write_bytes, leftover_temporaries, load_dataset
from .models import ACTIVATIONS, INITS, MODELS, build_model
from .optim import DEFAULT_LR, OPTIMIZERS, build_optimizer

CHECKPOINT_FORMAT = "normkit-lab-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    # data
    """Every setting of a lab run (the `normkit train` flags are its fields); ``resolved()`` validates them."""
    dataset: str = "digits"          # digits (embedded, no download), mnist, fashion-mnist, kmnist
    data_dir: str | None = None      # folder with the IDX files (DIR/<dataset>/ or DIR/); None: $NORMKIT_DATA
    train_limit: int | None = None   # use only the first N training images (before the validation split)
    val_split: float = 0.2           # the LAST fraction of the training images, as Keras' validation_split
    # model
    model: str = "lenet"             # lenet (conv) or mlp (3 x 100, the BN paper's MNIST network)
    norm: str = "batch"              # a name from normkit.registry.NORM_NAMES
    norm_options: dict = field(default_factory=dict)  # keywords for every norm layer (--norm-option KEY=VALUE)
    activation: str = "sigmoid"      # sigmoid (the classic experiment) or relu
    init: str = "keras"              # keras: Glorot-uniform weights, zero biases (as published); torch: torch's defaults
    # optimization
    optimizer: str = "rmsprop"       # rmsprop (Keras' rule: eps inside the sqrt), sgd, adam
    lr: float | None = None          # None: Keras' default for the optimizer (rmsprop/adam 1e-3, sgd 1e-2)
    rho: float = 0.9                 # RMSprop's decay of the squared-gradient average (Keras 0.9)
    eps: float = 1e-7                # RMSprop/Adam epsilon (Keras 1e-7)
    momentum: float = 0.0            # SGD momentum
    batch_size: int = 64
    epochs: int = 5
    drop_last: bool | None = None    # None: drop the last partial batch only where BN cannot use it (see docs/lab.md)
    seed: int = 0
    recalibrate: int = 0             # after the last epoch, recompute BN running stats over N training batches (-1: all)
    # run
    out: str | None = None           # run directory; None: runs/<model>-<norm>-<dataset>-seed<seed>
    resume: bool = False             # continue from out/checkpoint.pt
    overwrite: bool = False          # replace a finished or unfinished run in out (see docs/lab.md, "Output directory")
    device: str = "cpu"              # cpu or cuda
    compile: bool = False            # train through torch.compile(model) (evaluation stays eager)
    threads: int = 1                 # CPU threads for torch ops; 0 = torch's default (see docs/lab.md: why 1)
    tensorboard: bool = True         # write TensorBoard event files (scalars, histograms)
    dry_run: bool = False            # one training batch, one evaluation batch: a smoke test of the whole pipeline
    quiet: bool = False              # no progress bar, no per-epoch lines (the library API, benchmarks)
    stop_after_steps: int | None = field(default=None, repr=False)  # tests: die (os._exit) after N steps, like a kill

    def resolved(self) -> "TrainConfig":
        """Validate every setting and fill the derived ones (lr, out, drop_last).

        Nothing is touched before this passes: errors name the command-line flag (``--batch-size`` is
        ``batch_size``) and say what to do."""
        choices = dict(dataset=DATASETS, model=MODELS, norm=NORM_NAMES, activation=tuple(ACTIVATIONS), init=INITS,
                       optimizer=OPTIMIZERS, device=("cpu", "cuda"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_flag(name)} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not _is_number(self.val_split) or not 0.0 <= self.val_split < 1.0:
            raise ValueError(f"--val-split={self.val_split} must be in [0, 1) (0: no validation split)")
        for name in ("batch_size", "epochs"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)}={getattr(self, name)} must be at least 1")
        if self.train_limit is not None and (not _is_int(self.train_limit) or self.train_limit < 2):
            raise ValueError(f"--train-limit={self.train_limit} must be at least 2 (batch statistics need 2 images)")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            # NumPy's global generator, seeded alongside torch's, takes 0 .. 2**32 - 1.
            raise ValueError(f"--seed={self.seed} must be an integer from 0 to {MAX_SEED}")
        if self.lr is not None and (not _is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0):
            raise ValueError(f"--lr={self.lr} must be a finite number > 0 (0 would train nothing); omit it for "
                             f"Keras' default ({', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items())})")
        if not _is_number(self.rho) or not 0.0 <= self.rho < 1.0:
            raise ValueError(f"--rho={self.rho} must be in [0, 1) (RMSprop's decay; default 0.9)")
        if not _is_number(self.eps) or not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"--eps={self.eps} must be a finite number >= 0 (default 1e-7)")
        if not _is_number(self.momentum) or not 0.0 <= self.momentum <= 1.0:
            # Keras' SGD accepts momentum in [0, 1]; more makes the velocity grow without bound.
            raise ValueError(f"--momentum={self.momentum} must be in [0, 1] (SGD momentum; default 0)")
        if self.model == "mlp" and self.norm == "instance":
            raise ValueError("--norm instance needs spatial axes and the mlp has none; use --model lenet, or "
                             "layer/batch for the mlp")
        check_norm_options(self.norm, self.norm_options, self.model)
        virtual = virtual_batch_size(self.norm, self.norm_options)
        if virtual is not None and self.batch_size % virtual:
            raise ValueError(f"--norm {self.norm} normalizes virtual batches of {virtual}; --batch-size={self.batch_size} "
                             f"must be a multiple of {virtual}")
        if self.batch_size < 2 and _has_batch_norm(self.norm):
            raise ValueError(f"--batch-size=1: --norm {self.norm} normalizes with batch statistics, which need at "
                             "least 2 images per batch; use --batch-size 2 or more, or a norm without batch "
                             "statistics (none, layer, instance, group)")
        if isinstance(self.recalibrate, bool) or not isinstance(self.recalibrate, int) or self.recalibrate < -1:
            raise ValueError(f"--recalibrate={self.recalibrate!r} must be 0 (off), a positive number of batches or -1 (all)")
        if self.recalibrate and not _has_batch_norm(self.norm):
            raise ValueError(f"--recalibrate={self.recalibrate} recomputes batch-normalization running statistics, and "
                             f"norm {self.norm!r} has none; use it with batch, torch, renorm, ghost or keras")
        if not _is_int(self.threads) or self.threads < 0:
            raise ValueError(f"--threads={self.threads} must be 0 (torch's default) or a positive count")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it; pass only one")
        for name in ("out", "data_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not os.fspath(value)):
                raise ValueError(f"{_flag(name)} {value!r}: give a folder path (an empty one would mean the current "
                                 f"folder by accident){'; omit it for $NORMKIT_DATA' if name == 'data_dir' else ''}")
        _check_device(self.device)
        updates = {}
        if self.lr is None:
            updates["lr"] = DEFAULT_LR[self.optimizer]
        # Stored absolute (and ~ expanded): config.json and the checkpoint name the same folders from any
        # working directory, so `normkit evaluate` elsewhere still finds the run's data.
        out = self.out if self.out is not None else Path("runs") / f"{self.model}-{self.norm}-{self.dataset}-seed{self.seed}"
        updates["out"] = os.path.abspath(os.path.expanduser(os.fspath(out)))
        if self.data_dir is not None:
            updates["data_dir"] = os.path.abspath(os.path.expanduser(os.fspath(self.data_dir)))
        if self.drop_last is None:
            updates["drop_last"] = virtual is not None
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict:
        settings = dataclasses.asdict(self)
        settings.pop("stop_after_steps")  # a test hook, not a setting of the run
        settings.pop("overwrite")  # how this invocation treats an earlier run, not a setting of the run
        return settings


MAX_SEED = 2**32 - 1


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} is not one of cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here (torch.cuda.is_available() is False); "
                         "use --device cpu")


def _flag(name: str) -> str:
    return "--norm-option" if name == "norm_options" else "--" + name.replace("_", "-")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_norm_options(norm: str, options, model: str) -> None:
    """``--norm-option`` keywords: JSON-like values that every norm layer of ``model`` accepts."""
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise ValueError(f"--norm-option: expected keyword=value pairs (a dict with str keys), got {options!r}")
    if not options:
        return
    try:
        json.dumps(options, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError(f"--norm-option {options!r}: values must be numbers, strings, true/false, null, lists or "
                         "objects (they are saved in config.json)") from None
    if norm == "none":
        raise ValueError(f"--norm-option {', '.join(options)}: --norm none has no layer to take them")
    # LeNet has conv (rank 4) and dense (rank 2) norm layers; the MLP only dense ones; instance only conv ones.
    ranks = (2,) if model == "mlp" else (4,) if norm == "instance" else (4, 2)
    for rank in ranks:
        try:
            create_norm(norm, 6, rank, **options)
        except (TypeError, ValueError) as error:
            where = "conv" if rank == 4 else "dense"
            raise ValueError(f"--norm-option for --norm {norm} ({where} layers): {error}") from None
    # Layers that build may still not fit the network (axis=-1 on a conv's output): one training step of a
    # throwaway model on a few blank images finds out before anything is written.
    try:
        with torch.random.fork_rng(devices=[]):  # (the probe's initialization must not move the run's generators)
            probe = build_model(model, norm, norm_options=options)
            probe(torch.rand(virtual_batch_size(norm, options) or 4, 1, 28, 28)).sum().backward()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"--norm-option {', '.join(options)}: the {model} with --norm {norm} cannot train with "
                         f"them: {str(error).splitlines()[0]}") from None


def virtual_batch_size(norm: str, options: dict | None = None) -> int | None:
    """The ghost-batch size the norm layers normalize in training (None: the whole batch)."""
    if norm == "none":
        return None
    return getattr(create_norm(norm, 6, rank=4, **(options or {})), "virtual_batch_size", None)


def _has_batch_norm(norm: str) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    from normkit import BatchNorm
    return isinstance(create_norm(norm, 4, rank=2), (BatchNorm, _BatchNorm))


# Settings a resumed run may change; every other one must match the checkpoint's (the run's identity).
RESUME_OVERRIDABLE = {"epochs", "out", "resume", "overwrite", "device", "tensorboard", "dry_run", "quiet",
                      "stop_after_steps", "data_dir", "threads", "recalibrate", "compile"}


PER_INVOCATION = {"out", "resume", "overwrite", "dry_run", "quiet", "stop_after_steps"}

# Settings that do not change what a run computes (where and how it runs, what it prints): a fresh run whose
# other settings equal a finished run's reproduces it, so it may replace that run without --overwrite.
NOT_IDENTITY = {"out", "resume", "quiet", "tensorboard", "device", "threads", "compile", "data_dir"}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, damaged or not a normkit lab checkpoint."""


class UnfinishedRunError(ValueError):
    """A fresh run into a folder that holds an unfinished run (``--resume`` continues it); the caller
    (``normkit train`` or ``normkit compare``) knows which command continues it."""

    def __init__(self, out: Path, epoch: int, epochs: int, how: str = ""):
        self.out, self.epoch, self.epochs = out, epoch, epochs
        how = how or f"continue it with `normkit train --out {out} --resume`"
        super().__init__(f"--out {out} holds an unfinished run (checkpoint.pt after epoch {epoch} of {epochs}): "
                         f"{how}, or pass --overwrite to start over, or choose another --out")


# ------------------------------------------------------------------------------------------ data plumbing

@dataclass
class Prepared:
    """A run's train/validation/test tensors on its device, and the fingerprint of that data."""
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    fingerprint: str = ""  # data_fingerprint of the three splits: which data a run was trained on


def data_fingerprint(parts: dict[str, tuple]) -> str:
    """sha256 over each split's arrays (dtype, shape and bytes): equal exactly when the prepared data is.

    ``parts`` maps a split's name to its arrays (NumPy or CPU tensors). It tells a run's data apart from other
    files (another --data-dir) whatever folder they are in, so a moved dataset is still the same data."""
    digest = hashlib.sha256()
    for name, arrays in parts.items():
        digest.update(name.encode())
        for array in arrays:
            array = np.ascontiguousarray(array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.reshape(-1).view(np.uint8))  # the bytes, not a copy (empty: the val split with 0)
    return digest.hexdigest()


def prepare_data(cfg: TrainConfig, splits: Splits | None = None) -> Prepared:
    """The run's splits as tensors: --train-limit, then Keras' validation split (the last fraction)."""
    splits = splits if splits is not None else load_dataset(cfg.dataset, cfg.data_dir)
    images, labels = splits.train
    # The integer images the tensors came from (a quarter of the bytes to hash); else the tensors themselves.
    sources = splits.sources if splits.sources is not None else (images, splits.test[0])
    source = sources[0]
    if cfg.train_limit is not None:
        images, labels, source = images[:cfg.train_limit], labels[:cfg.train_limit], source[:cfg.train_limit]
    # Keras' validation_split: the last fraction, taken before any shuffling.
    cut = int(len(labels) * (1.0 - cfg.val_split))
    if cut < 2:
        raise ValueError(f"only {cut} training images after the {cfg.val_split:.0%} validation split; "
                         "raise --train-limit or lower --val-split")
    fingerprint = data_fingerprint({"train": (source[:cut], labels[:cut]), "val": (source[cut:], labels[cut:]),
                                    "test": (sources[1], splits.test[1])})
    device = torch.device(cfg.device)
    move = lambda pair: (pair[0].to(device), pair[1].to(device))  # noqa: E731
    return Prepared(train=move((images[:cut], labels[:cut])), val=move((images[cut:], labels[cut:])),
                    test=move(splits.test), fingerprint=fingerprint)


def _drops_last(size: int, cfg: TrainConfig) -> bool:
    # A one-image batch has no batch variance (BN refuses it); ghost BN needs whole virtual batches.
    return size < 2 or bool(cfg.drop_last and size < cfg.batch_size)


def training_batch_sizes(count: int, cfg: TrainConfig) -> list[int]:
    """The sizes of one epoch's batches of ``count`` images (what ``training_batches`` makes), without data."""
    sizes = [cfg.batch_size] * (count // cfg.batch_size) + ([count % cfg.batch_size] if count % cfg.batch_size else [])
    if sizes and _drops_last(sizes[-1], cfg):
        sizes.pop()
    return sizes


def check_batches(cfg: TrainConfig, count: int) -> None:
    """Refuse, before training, settings that make no training step or a batch the norm cannot take."""
    sizes = training_batch_sizes(count, cfg)
    virtual = virtual_batch_size(cfg.norm, cfg.norm_options)
    if not sizes:
        limit = f"--train-limit {cfg.train_limit} and " if cfg.train_limit is not None else ""
        raise ValueError(f"no training step: the {count} training images (after {limit}--val-split "
                         f"{cfg.val_split:g}) are fewer than --batch-size {cfg.batch_size}, and --drop-last"
                         f"{' (automatic with ghost batches)' if virtual is not None else ''} drops that partial "
                         "batch; lower --batch-size or raise --train-limit")
    if virtual is not None and sizes[-1] % virtual:
        raise ValueError(f"--no-drop-last with --norm {cfg.norm}: each epoch's last batch would hold {sizes[-1]} of "
                         f"the {count} training images, not a multiple of the ghost batch {virtual}; drop "
                         "--no-drop-last (ghost batches drop partial batches by default) or change "
                         "--batch-size/--train-limit")


def training_batches(count: int, cfg: TrainConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches of indices, shuffled by ``generator`` (a partial last batch per ``drop_last``)."""
    order = torch.randperm(count, generator=generator)
    batches = list(order.split(cfg.batch_size))
    if batches and _drops_last(len(batches[-1]), cfg):
        batches.pop()
    return batches


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
             max_batches: int | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (running statistics)."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for index, start in enumerate(range(0, len(labels), batch_size)):
        if max_batches is not None and index >= max_batches:
            break
        logits = model(images[start:start + batch_size])
        target = labels[start:start + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
        seen += len(target)
    model.train(was_training)
    if seen == 0:
        return math.nan, math.nan
    return total_loss / seen, correct / seen


def recalibration_batches(images: torch.Tensor, cfg: "TrainConfig", count: int) -> list[torch.Tensor]:
    """The first ``count`` batches (all when -1) of ``cfg.batch_size`` training images, in the split's order.

    Not shuffled: the result depends only on the weights and the split, and the training shuffle's
    generator is not touched. A last batch is dropped where training would drop it (one image; a
    partial batch with drop_last, as ghost BN needs whole virtual batches)."""
    batches = list(images.split(cfg.batch_size))
    if batches and _drops_last(len(batches[-1]), cfg):
        batches.pop()
    return batches if count < 0 else batches[:count]


def first_norm_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the model's first normalization layer, or None (what the summary prints)."""
    return next(((name, module) for name, module in model.named_modules() if is_norm_layer(module)), None)


# ------------------------------------------------------------------------------------------ checkpoints

def _rng_states(shuffle: torch.Generator) -> dict:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "shuffle": shuffle.get_state(),
        "torch": torch.get_rng_state(),
        # weights_only loading admits tensors and primitives, not NumPy arrays or tuples of them.
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore_rng_states(states: dict, shuffle: torch.Generator) -> None:
    shuffle.set_state(states["shuffle"])
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached"]))
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step: int,
                    cfg: TrainConfig, history: list[dict], shuffle: torch.Generator, data_sha256: str = "") -> None:
    """Write the run's state (model, optimizer, epoch, RNG states, config, history) atomically to ``path``."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch, "step": step,
               "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "history": history, "rng": _rng_states(shuffle)}
    if data_sha256:
        # Optional, so version 1 stays: checkpoints written before it load as before (nothing to compare).
        payload["data_sha256"] = data_sha256
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a lab checkpoint with ``weights_only=True``; CheckpointError says what is wrong with a bad file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04":
        # torch.save writes a zip archive; anything else (an old pickle, text, an empty file) is foreign.
        raise CheckpointError(f"{path}: not a torch checkpoint ({size} bytes, no zip archive header); "
                              "`normkit train --out DIR` writes DIR/checkpoint.pt")
    # torch.load does not check the archive's CRC-32s: flipped bits in a tensor would load as other weights.
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({size} bytes): {error}") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged: the bytes of {damaged} do not match their CRC-32 (the file "
                              "changed after it was written: a disk or copy error); restore it from a copy or "
                              "train again")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).split(" In PyTorch")[0].strip()
        raise CheckpointError(f"{path}: holds objects other than tensors and plain data, refused by "
                              f"torch.load(weights_only=True): {reason}") from None
    except Exception as error:  # torch raises RuntimeError, EOFError... depending on where the file was cut
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({size} bytes): {first_line.split('. ')[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = type(payload).__name__ if not isinstance(payload, dict) else f"a dict with keys {sorted(payload)[:6]}"
        raise CheckpointError(f"{path}: a torch file but not a normkit lab checkpoint (found {found}); "
                              "`normkit train --out DIR` writes DIR/checkpoint.pt")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')}, this normkit reads "
                              f"version {CHECKPOINT_VERSION}")
    missing = {"epoch", "step", "config", "model", "optimizer", "history", "rng"} - set(payload)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {sorted(missing)}")
    return payload


def config_from_checkpoint(payload: dict, path: str | os.PathLike | None = None) -> TrainConfig:
    """The checkpoint's TrainConfig (not resolved); CheckpointError names the file when it cannot be one."""
    where = str(path) if path is not None else "checkpoint"
    saved = payload["config"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: its config is a {type(saved).__name__}, not a dict of settings")
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise CheckpointError(f"{where}: its config has settings this normkit does not know ({', '.join(unknown)}); "
                              "it was written by another version of normkit or edited")
    cfg = TrainConfig(**saved)
    for name, allowed in dict(model=MODELS, norm=NORM_NAMES, activation=tuple(ACTIVATIONS), init=INITS).items():
        if getattr(cfg, name) not in allowed:
            raise CheckpointError(f"{where}: its config has {name} {getattr(cfg, name)!r}, not one of {', '.join(allowed)}")
    return cfg


def load_weights(model: nn.Module, state: dict, path: str | os.PathLike | None, cfg: TrainConfig) -> None:
    """``model.load_state_dict(state)``, with a one-line CheckpointError naming the file when they do not fit
    (torch's own message lists every tensor over many lines)."""
    where = str(path) if path is not None else "checkpoint"
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
                  if key in state and isinstance(state[key], torch.Tensor) and state[key].shape != value.shape]
    problems = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
                if items]
    if not problems:
        try:
            model.load_state_dict(state)
            return
        except (RuntimeError, TypeError, KeyError) as error:
            problems = [str(error).splitlines()[0]]
    raise CheckpointError(f"{where}: its weights do not fit the model its config describes ({cfg.model} + "
                          f"{cfg.norm}, {cfg.activation}): {'; '.join(problems)}")


def model_from_checkpoint(payload: dict, path: str | os.PathLike | None = None) -> tuple[nn.Module, TrainConfig]:
    """The model a checkpoint describes (rebuilt from its config), with its weights, and that config."""
    cfg = config_from_checkpoint(payload, path)
    model = build_model(cfg.model, cfg.norm, cfg.activation, cfg.init, cfg.norm_options)
    load_weights(model, payload["model"], path, cfg)
    return model, cfg


# ------------------------------------------------------------------------------------------ TensorBoard

class Board:
    """TensorBoard scalars per step and per epoch, histograms of norm layers and pre-activations per epoch."""

    def __init__(self, out: Path, enabled: bool, purge_step: int | None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is a lab extra
            self.writer = SummaryWriter(log_dir=str(out), purge_step=purge_step)

    def step(self, step: int, loss: float, accuracy: float) -> None:
        if self.writer:
            self.writer.add_scalar("step/loss", loss, step)
            self.writer.add_scalar("step/accuracy", accuracy, step)

    def epoch(self, step: int, record: dict, model: nn.Module, probe: torch.Tensor) -> None:
        # Logged at the global step that ends the epoch, not at the epoch number: one monotonic x-axis per
        # file is what lets TensorBoard purge a killed run's extra steps and not take epochs for restarts.
        if not self.writer:
            return
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if record[key] is not None and math.isfinite(record[key]):
                self.writer.add_scalar(f"epoch/{key}", record[key], step)
        for name, module in model.named_modules():
            if is_norm_layer(module):
                for tensor_name in ("weight", "bias", "running_mean", "running_var"):
                    tensor = getattr(module, tensor_name, None)
                    if isinstance(tensor, torch.Tensor):
                        self._histogram(f"norm/{name}.{tensor_name}", tensor.detach().float().cpu(), step)
        for name, values in preactivations(model, probe).items():
            self._histogram(f"preactivation/{name}", values, step)
        self.writer.flush()

    def _histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        # TensorBoard cannot bin NaN or infinity ("The histogram is empty"): a diverged run's weights are drawn
        # from their finite values, and a tensor with none is left out of that epoch.
        values = values[torch.isfinite(values)]
        if values.numel():
            self.writer.add_histogram(tag, values, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


@torch.no_grad()
def preactivations(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of every activation (the normalized values BN feeds the nonlinearity), in eval mode."""
    captured, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, tuple(ACTIVATIONS.values())):
            hooks.append(module.register_forward_hook(
                lambda _module, inputs, _output, name=name: captured.__setitem__(name, inputs[0].detach().cpu())))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return captured


# ------------------------------------------------------------------------------------------ the run

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


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, json_bytes(payload))


def _say(cfg: TrainConfig, text: str) -> None:
    if not cfg.quiet:
        print(text, flush=True)


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """Refuse a path that cannot become a writable folder, before anything is created or loaded."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: is a file, not a folder; choose a folder path (created if missing)")
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"{flag} {out}: {parent} is a file, not a folder; choose a folder path")
            break


def _make_out_folder(out: Path, flag: str = "--out") -> None:
    """mkdir -p, and a probe file: both fail here, with the flag named, rather than as a traceback later."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=out, prefix=".normkit-write-probe.")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{flag} {out}: cannot write there ({error.strerror or error}); choose a folder you can "
                         "write to") from None


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what the run directory holds and how to continue."""


# The files a run writes in its folder (besides TensorBoard's event files).
RUN_FILES = ("checkpoint.pt", "metrics.json", "config.json", "curves.png")


def _resume_config(cfg: TrainConfig, saved: dict, given: set[str], source: str = "checkpoint") -> TrainConfig:
    conflicts = [f"{_flag(k)} {getattr(cfg, k)!r} ({source}: {saved[k]!r})" for k in sorted(given)
                 if k not in RESUME_OVERRIDABLE and k in saved and getattr(cfg, k) != saved[k]]
    if conflicts:
        raise ValueError(f"a resumed run keeps its settings; these differ from the {source}'s: " + ", ".join(conflicts)
                         + ". Start a new run with another --out instead.")
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
    return [f"{_flag(k)} {saved.get(k)!r} there, {mine[k]!r} here" for k in mine
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
        longer = (len(differences) == 1 and differences[0].startswith("--epochs ") and cfg.epochs > saved["epochs"])
        raise ValueError(f"--out {out} holds a finished run with other settings ({'; '.join(differences)}); pass "
                         "--overwrite to replace it, or choose another --out to keep both"
                         + (f" (or train it longer: `normkit train --out {out} --resume --epochs {cfg.epochs}`)"
                            if longer else ""))
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
    """Refuse to start in ``out`` when it holds a run's results (metrics.json, curves.png) but no checkpoint.pt:
    a fresh start would delete them."""
    leftovers = [name for name in ("metrics.json", "curves.png") if (out / name).exists()]
    if leftovers:
        raise ValueError(f"{situation} {out} holds {' and '.join(leftovers)} but no checkpoint.pt{remedy}")


def _fresh_run_without_checkpoint(cfg: TrainConfig, out: Path) -> str | None:
    """Whether a fresh run may start in ``out``, which has no checkpoint.pt; the note to print, or None when
    the folder holds no run. Raises when starting would delete files worth keeping."""
    _refuse_leftover_results(out, "--out", " (a run whose checkpoint was deleted, or files of your own), which this "
                             "run would delete; pass --overwrite to replace them, or choose another --out")
    config_path = out / "config.json"
    if not config_path.exists():
        if any(out.glob("events.out.tfevents.*")):
            raise ValueError(f"--out {out} holds TensorBoard event files but no config.json (not a run of this lab), "
                             "which this run would delete; pass --overwrite to replace them, or choose another --out")
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


def _other_data(theirs: str, mine: str) -> str:
    return f"its data's sha256 {theirs[:12]}..., this data's {mine[:12]}..."


def plan_run(cfg: TrainConfig, given: set[str] | None = None, splits: Splits | None = None) -> RunPlan:
    """Validate everything a run needs (settings, --out, the checkpoint it resumes or replaces, the data and
    its batches) without writing anything: a failed run leaves ``out`` as it found it."""
    cfg = cfg.resolved()
    given = given if given is not None else set()
    out = Path(cfg.out)
    check_out_folder(out)
    checkpoint_path = out / "checkpoint.pt"
    checkpoint, notes, replaced_data = None, [], None
    if cfg.resume and checkpoint_path.is_file():
        payload = load_checkpoint(checkpoint_path, map_location=cfg.device)
        saved = config_from_checkpoint(payload, checkpoint_path).to_dict()
        if saved["dry_run"] and not cfg.dry_run:
            # A dry run's one batch is a smoke test, not a start worth continuing: the real run starts over.
            notes.append(f"--resume: {checkpoint_path} is a dry run's (one batch); starting the real run from the "
                         "beginning")
        elif cfg.dry_run and not saved["dry_run"]:
            raise ValueError(f"--dry-run --resume: {checkpoint_path} is a real run's, and a dry run would replace its "
                             "metrics with one-batch estimates; drop --dry-run to continue it, or smoke-test in "
                             "another --out")
        else:
            resumed = _resume_config(cfg, saved, given)  # conflicts name the flags
            try:
                cfg = resumed.resolved()
            except ValueError as error:
                raise CheckpointError(f"{checkpoint_path}: its settings are not valid here: {error}") from None
            if cfg.epochs < payload["epoch"]:
                raise ValueError(f"--epochs {cfg.epochs}: {checkpoint_path} has already trained {payload['epoch']} "
                                 f"epochs; a resumed run can train longer (--epochs {payload['epoch']} or more) but "
                                 "not undo epochs; train a shorter run in another --out")
            checkpoint = payload
            notes.append(f"resuming {checkpoint_path} after epoch {payload['epoch']} (step {payload['step']})")
    elif cfg.resume:
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
    data = prepare_data(cfg, splits)
    check_batches(cfg, len(data.train[1]))
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


def run(cfg: TrainConfig, given: set[str] | None = None, splits: Splits | None = None,
        on_step: Callable[[int, nn.Module], None] | None = None) -> dict:
    """Train (or resume) one run; returns the metrics dict also written to out/metrics.json.

    ``given`` names the settings the user set explicitly (the CLI passes them): on --resume those must
    agree with the checkpoint, except the ones in RESUME_OVERRIDABLE (e.g. --epochs to train longer).
    ``splits`` lets callers (benchmarks, tests) pass data already in memory. ``on_step(step, model)`` is
    called after every optimizer step (step counts from 1), for measurements during training
    (tools/make_results.py traces activations with it); it must leave the model (weights, buffers, mode)
    and the random generators as it found them, or the run is no longer the one its config describes.

    Everything is validated (``plan_run``) before ``out`` is created or anything in it is touched. A run
    into an ``out`` that holds an earlier run replaces it only when that was a dry run or a finished run
    with the same settings, or with ``overwrite=True``; see docs/lab.md, "Output directory".
    """
    plan = plan_run(cfg, given, splits)
    previous_threads = torch.get_num_threads()
    if plan.cfg.threads:
        torch.set_num_threads(plan.cfg.threads)
    try:
        return _run(plan, on_step)
    finally:
        torch.set_num_threads(previous_threads)


def _run(plan: RunPlan, on_step: Callable[[int, nn.Module], None] | None) -> dict:
    cfg, checkpoint = plan.cfg, plan.checkpoint
    out = Path(cfg.out)
    progress = {"saved_epochs": checkpoint["epoch"] if checkpoint is not None else 0}  # what checkpoint.pt holds
    try:
        return _train(plan, on_step, progress)
    except KeyboardInterrupt:
        raise RunInterrupted(_interrupted_message(out, progress["saved_epochs"],
                                                  1 if cfg.dry_run else cfg.epochs)) from None


def _train(plan: RunPlan, on_step: Callable[[int, nn.Module], None] | None, progress: dict) -> dict:
    cfg, checkpoint, data = plan.cfg, plan.checkpoint, plan.data
    out = Path(cfg.out)
    checkpoint_path = out / "checkpoint.pt"
    for note in plan.notes:
        _say(cfg, note)
    _make_out_folder(out)
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
        load_weights(model, checkpoint["model"], checkpoint_path, cfg)
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{checkpoint_path}: its optimizer state does not fit the model: "
                                  f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        history, start_epoch, step = list(checkpoint["history"]), checkpoint["epoch"], checkpoint["step"]
        _restore_rng_states(checkpoint["rng"], shuffle)
    _write_json(out / "config.json", cfg.to_dict())

    # The checkpoint's last step is logged; a killed run may have logged later ones, which the resumed run redoes.
    board = Board(out, cfg.tensorboard, purge_step=step + 1 if checkpoint is not None else None)
    probe = data.val[0][:256] if len(data.val[1]) else data.train[0][:256]
    # --norm-option weight_regularizer=l2 / weight_constraint=non_neg: normkit layers' Keras-style options.
    regularized = any(getattr(m, f"{p}_regularizer", None) is not None for m in model.modules() for p in ("weight", "bias"))
    constrained = any(getattr(m, f"{p}_constraint", None) is not None for m in model.modules() for p in ("weight", "bias"))
    train_images, train_labels = data.train
    epochs = 1 if cfg.dry_run else cfg.epochs
    _say(cfg, f"{cfg.model} + {cfg.norm} on {cfg.dataset}: {len(train_labels)} train / {len(data.val[1])} validation / "
              f"{len(data.test[1])} test images, {cfg.optimizer} lr {cfg.lr}, batch {cfg.batch_size}, "
              f"{epochs} epochs -> {out}")
    try:
        for epoch in range(start_epoch, epochs):
            batches = training_batches(len(train_labels), cfg, shuffle)
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
            # The checkpoint first: whatever TensorBoard makes of this epoch, the epoch is saved.
            save_checkpoint(checkpoint_path, model, optimizer, epoch + 1, step, cfg, history, shuffle, data.fingerprint)
            progress["saved_epochs"] = epoch + 1
            _write_json(out / "metrics.json", {"history": history, "data_sha256": data.fingerprint})
            board.epoch(step, record, model, probe)
            speed = record["images_per_second"]
            _say(cfg, f"epoch {epoch + 1}/{epochs}  loss {record['loss']:.4f}  accuracy {record['accuracy']:.4f}  "
                      f"val_loss {_show(val_loss)}  val_accuracy {_show(val_accuracy)}  {seconds:.1f}s "
                      f"({'n/a' if speed is None else f'{speed:.0f}'} img/s)")
    finally:
        board.close()
    return _finish(cfg, out, checkpoint_path, model, optimizer, history, step, shuffle, data)


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C waits until the block ends: torch's first optimizer imports torch._dynamo and Triton (about a
    second), and a KeyboardInterrupt raised inside that import's native callbacks aborts the whole process
    (SIGABRT, no message). A Ctrl-C pressed meanwhile is recorded and raised right after, as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (only the main thread receives Python's signal handlers)
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        if callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


def _interrupted_message(out: Path, saved_epochs: int, epochs: int) -> str:
    if saved_epochs == 0:
        return (f"interrupted in epoch 1, before the first checkpoint: nothing to resume in {out}; run the same "
                "command again to start over")
    if saved_epochs >= epochs:
        return (f"interrupted after training: {out / 'checkpoint.pt'} holds all {epochs} epochs; "
                f"`normkit train --out {out} --resume` evaluates it again")
    return (f"interrupted in epoch {saved_epochs + 1}: {out / 'checkpoint.pt'} holds epoch {saved_epochs} of {epochs}; "
            f"continue with `normkit train --out {out} --resume`")


def _finish(cfg: TrainConfig, out: Path, checkpoint_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            history: list[dict], step: int, shuffle: torch.Generator, data: Prepared) -> dict:
    """After the last epoch: test evaluation, optional recalibration, metrics.json, curves.png, the summary."""
    train_images, train_labels = data.train
    test_batches = 1 if cfg.dry_run else None
    test_loss, test_accuracy = evaluate(model, *data.test, max_batches=test_batches)
    before = {"test_loss_before_recalibration": test_loss, "test_accuracy_before_recalibration": test_accuracy}
    recalibration = None
    if cfg.recalibrate:
        # Precise BN: the running statistics of the final weights; the checkpoint then holds the recalibrated model.
        batches = recalibration_batches(train_images, cfg, 1 if cfg.dry_run else cfg.recalibrate)
        recalibrate_running_stats(model, batches)
        recalibration = {"batches": len(batches), "images": sum(len(batch) for batch in batches)}
        save_checkpoint(checkpoint_path, model, optimizer, len(history), step, cfg, history, shuffle, data.fingerprint)
        test_loss, test_accuracy = evaluate(model, *data.test, max_batches=test_batches)
    metrics = {"history": history, "test_loss": test_loss, "test_accuracy": test_accuracy, **before,
               "recalibration": recalibration,
               "train_size": len(train_labels), "val_size": len(data.val[1]), "test_size": len(data.test[1]),
               "steps": step, "data_sha256": data.fingerprint}
    norm = first_norm_layer(model)
    if norm is not None:
        name, layer = norm
        metrics["first_norm_layer"] = {
            "name": name, "type": type(layer).__name__,
            "weight": layer.weight.detach().cpu().flatten().tolist() if getattr(layer, "weight", None) is not None else None,
            "bias": layer.bias.detach().cpu().flatten().tolist() if getattr(layer, "bias", None) is not None else None}
    metrics = json_safe(metrics)
    _write_json(out / "metrics.json", metrics)
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
    """Test loss and accuracy of a saved run, on its own dataset's test split or on ``dataset``'s."""
    # Checked first: torch.load onto a missing device would read as a corrupt checkpoint.
    _check_device(device)
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"--dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    if Path(path).is_dir():
        path = Path(path) / "checkpoint.pt"  # a run folder (`--out DIR`) stands for its checkpoint
    payload = load_checkpoint(path, map_location=device)
    model, cfg = model_from_checkpoint(payload, path)
    dataset = dataset or cfg.dataset
    splits = load_dataset(dataset, data_dir if data_dir is not None else cfg.data_dir)
    images, labels = splits.test
    test_loss, test_accuracy = evaluate(model.to(device), images.to(device), labels.to(device))
    return {"checkpoint": str(path), "dataset": dataset, "epoch": payload["epoch"], "test_size": len(labels),
            "test_loss": test_loss, "test_accuracy": test_accuracy}
