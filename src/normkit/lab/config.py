"""A lab run's settings: ``TrainConfig``, the checks that refuse bad ones up front, and which make a run's identity."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from normkit.registry import NORM_NAMES, create_norm

from .data import DATASETS, data_folder
from .models import ACTIVATIONS, INITS, MODELS, build_model
from .optim import DEFAULT_LR, OPTIMIZERS


@dataclass
class TrainConfig:
    # data
    """Every setting of a lab run (the `normkit train` flags are its fields); ``resolved()`` validates them."""
    dataset: str = "digits"          # digits (embedded, no download), mnist, fashion-mnist, kmnist
    data_dir: str | None = None      # folder with the IDX files (DIR/<dataset>/ or DIR/); None: $NORMKIT_DATA's,
                                     # which resolved() records (digits read no folder: None stays None)
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
    batch_classes: int | None = None  # each training batch holds batch_size / K images of each of K classes only
                                      # (the renorm paper's non-i.i.d. minibatches); None: shuffled batches
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
        # NumPy numbers from a sweep (np.arange's np.int64, a float32 array's np.float32) are plain numbers here, as
        # np.float64 (a float) always was: the checks below refused them with messages such as "--epochs=3 must be
        # at least 1". (np.bool_ is no NumPy number: the switches stay True or False.)
        self = dataclasses.replace(self, **{f.name: getattr(self, f.name).item() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), (np.integer, np.floating))})
        if isinstance(self.norm_options, dict):  # (their values are JSON: a NumPy bool is true/false there)
            self = dataclasses.replace(self, norm_options=_plain_json(self.norm_options))
        choices = dict(dataset=DATASETS, model=MODELS, norm=NORM_NAMES, activation=tuple(ACTIVATIONS), init=INITS,
                       optimizer=OPTIMIZERS, device=("cpu", "cuda"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{flag_of(name)} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        # The switches (True/False flags on the command line) as the checkpoint loader reads them: a 0 or "no" from
        # Python would train a whole run whose checkpoint its own loader then refuses as edited.
        for name in ("resume", "overwrite", "tensorboard", "dry_run", "quiet", "compile", "drop_last"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "drop_last" and value is None):
                raise ValueError(f"{flag_of(name)}={value!r} must be True or False"
                                 + (" (or None: automatic)" if name == "drop_last" else ""))
        if not _is_number(self.val_split) or not 0.0 <= self.val_split < 1.0:
            raise ValueError(f"--val-split={self.val_split!r} must be in [0, 1) (0: no validation split)")
        for name in ("batch_size", "epochs"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{flag_of(name)}={getattr(self, name)!r} must be a whole number >= 1")
        if self.train_limit is not None and (not _is_int(self.train_limit) or self.train_limit < 2):
            raise ValueError(f"--train-limit={self.train_limit!r} must be a whole number >= 2 (batch statistics need "
                             "2 images)")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            # NumPy's global generator, seeded alongside torch's, takes 0 .. 2**32 - 1.
            raise ValueError(f"--seed={self.seed!r} must be an integer from 0 to {MAX_SEED}")
        # (> 0 in float32 too: the weights' arithmetic makes 1e-50 a 0, and every step then leaves them as they are)
        if self.lr is not None and (not _is_number(self.lr) or not math.isfinite(self.lr) or not np.float32(self.lr) > 0):
            raise ValueError(f"--lr={self.lr!r} must be a finite number > 0, also in float32 (1e-45 or more; 0 would "
                             "train nothing); omit it for "
                             f"Keras' default ({', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items())})")
        if not _is_number(self.rho) or not 0.0 <= self.rho < 1.0:
            raise ValueError(f"--rho={self.rho!r} must be in [0, 1) (RMSprop's decay; default 0.9)")
        if not _is_number(self.eps) or not math.isfinite(self.eps) or not np.float32(self.eps) > 0:
            # 0 is refused as --lr 0 is: RMSprop's g / sqrt(v + eps) and Adam's m / (sqrt(v) + eps) are then 0 / 0 = NaN
            # wherever a gradient is exactly 0, as in the biases before BN. The weights are float32, where 1e-50 is 0.
            raise ValueError(f"--eps={self.eps!r} must be a finite number > 0, also in float32 (1e-45 or more): 0 "
                             "divides 0 by 0 wherever a gradient is exactly 0, e.g. the biases before BN, giving NaN "
                             "weights; default 1e-7")
        if not _is_number(self.momentum) or not 0.0 <= self.momentum <= 1.0:
            # Keras' SGD accepts momentum in [0, 1]; more makes the velocity grow without bound.
            raise ValueError(f"--momentum={self.momentum!r} must be in [0, 1] (SGD momentum; default 0)")
        if self.model == "mlp" and self.norm == "instance":
            raise ValueError("--norm instance needs spatial axes and the mlp has none; use --model lenet, or "
                             "layer/batch for the mlp")
        check_norm_options(self.norm, self.norm_options, self.model)
        virtual = virtual_batch_size(self.norm, self.norm_options)
        if virtual is not None and self.batch_size % virtual:
            raise ValueError(f"--norm {self.norm} normalizes virtual batches of {virtual}; --batch-size={self.batch_size} "
                             f"must be a multiple of {virtual}")
        if self.batch_classes is not None:
            if not _is_int(self.batch_classes) or not 1 <= self.batch_classes <= NUM_CLASSES:
                raise ValueError(f"--batch-classes={self.batch_classes!r} must be a number of classes from 1 to "
                                 f"{NUM_CLASSES} (omit it for shuffled batches)")
            if self.batch_size % self.batch_classes:
                raise ValueError(f"--batch-classes={self.batch_classes}: each batch holds --batch-size / K images of "
                                 f"each of its K classes, and --batch-size={self.batch_size} is not a multiple of "
                                 f"{self.batch_classes}")
        if self.batch_size < 2 and _has_batch_norm(self.norm):
            raise ValueError(f"--batch-size=1: --norm {self.norm} normalizes with batch statistics, which need at "
                             "least 2 images per batch; use --batch-size 2 or more, or a norm without batch "
                             "statistics (none, layer, instance, group)")
        if isinstance(self.recalibrate, bool) or not isinstance(self.recalibrate, int) or self.recalibrate < -1:
            raise ValueError(f"--recalibrate={self.recalibrate!r} must be 0 (off), a positive number of batches or -1 (all)")
        if self.recalibrate and not _has_batch_norm(self.norm):
            raise ValueError(f"--recalibrate={self.recalibrate} recomputes batch-normalization running statistics, and "
                             f"norm {self.norm!r} has none; use it with batch, torch, renorm, ghost or keras")
        if self.recalibrate and not _keeps_running_stats(self.norm, self.norm_options):
            # (checked now, not after the whole training when recalibrate_running_stats would refuse it)
            raise ValueError(f"--recalibrate={self.recalibrate} recomputes running statistics, and --norm {self.norm} "
                             f"with --norm-option {_options_text(self.norm_options)} keeps none; drop --recalibrate "
                             "or that option")
        if not _is_int(self.threads) or self.threads < 0:
            raise ValueError(f"--threads={self.threads!r} must be 0 (torch's default) or a positive count")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it; pass only one")
        check_folder_option("--out", self.out)
        check_folder_option("--data-dir", self.data_dir, omitted="$NORMKIT_DATA")
        check_device(self.device)
        # Plain Python floats and JSON values: NumPy's float64 passes the checks above as a float (np.logspace sweeps),
        # but a checkpoint holding one is refused by torch.load(weights_only=True) (NumPy scalars are not plain data).
        updates = {name: float(getattr(self, name)) for name in ("val_split", "rho", "eps", "momentum")}
        updates["norm_options"] = json.loads(json.dumps(self.norm_options))
        updates["lr"] = DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)
        # Stored absolute (and ~ expanded): config.json and the checkpoint name the same folders from any
        # working directory, so `normkit evaluate` elsewhere still finds the run's data.
        updates["out"] = self.out_folder()
        # The data folder is resolved once, here (--data-dir, else $NORMKIT_DATA): config.json and the checkpoint
        # then name the folder the run trained on, which evaluate and --resume read whatever NORMKIT_DATA says
        # later. The embedded digits read no folder: without --data-dir they record none (null).
        data_dir = self.data_dir if self.dataset == "digits" else data_folder(self.data_dir)
        if data_dir is not None:
            updates["data_dir"] = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
        if self.drop_last is None:
            updates["drop_last"] = virtual is not None
        return dataclasses.replace(self, **updates)

    def out_folder(self) -> str:
        """The run's folder, absolute: --out, else runs/<model>-<norm>-<dataset>-seed<seed> in the working directory."""
        out = self.out if self.out is not None else Path("runs") / f"{self.model}-{self.norm}-{self.dataset}-seed{self.seed}"
        return os.path.abspath(os.path.expanduser(os.fspath(out)))

    def to_dict(self) -> dict:
        settings = dataclasses.asdict(self)
        settings.pop("stop_after_steps")  # a test hook, not a setting of the run
        settings.pop("overwrite")  # how this invocation treats an earlier run, not a setting of the run
        return settings


MAX_SEED = 2**32 - 1
NUM_CLASSES = 10  # every dataset of the lab (digits, MNIST, Fashion-MNIST, KMNIST) has labels 0..9


def _plain_json(value):
    """``value`` with the NumPy numbers and bools in it, at any depth of dicts and lists, as Python's: --norm-option
    values from a sweep (np.int64 virtual batch sizes) were refused as not JSON."""
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(item) for item in value]
    return value


def check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} is not one of cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here (torch.cuda.is_available() is False); "
                         "use --device cpu")


def check_folder_option(flag: str, value, omitted: str = "") -> None:
    """Refuse a folder option that is not a path, or is empty: "" would mean the current folder by accident.
    ``omitted`` says what leaving the option out means, for the error's remedy."""
    if value is not None and (not isinstance(value, (str, os.PathLike)) or not os.fspath(value)):
        raise ValueError(f"{flag} {value!r}: give a folder path (an empty one would mean the current folder by "
                         f"accident){f'; omit it for {omitted}' if omitted else ''}")


def flag_of(name: str) -> str:
    """The command-line flag that sets the TrainConfig field ``name`` (error messages name flags)."""
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
    placement = sorted({"device", "dtype"} & set(options))
    if placement:
        # (the run places the whole model: a layer made elsewhere met its input with torch's traceback, or with
        # "Torch not compiled with CUDA enabled" before anything was checked)
        raise ValueError(f"--norm-option {', '.join(placement)}: the run puts every layer where --device says, in "
                         "float32; leave it out (use --device cuda for a GPU)")
    # LeNet has conv (rank 4) and dense (rank 2) norm layers; the MLP only dense ones; instance only conv ones.
    ranks = (2,) if model == "mlp" else (4,) if norm == "instance" else (4, 2)
    for rank in ranks:
        # A switch (affine, track_running_stats, ...) takes true or false. The layers read any value's truth, so
        # Python's spelling `affine=False`, not JSON and so the text "False", kept gamma and beta, silently.
        switches = {key for key, value in vars(create_norm(norm, 6, rank)).items() if isinstance(value, bool)}
        for key in sorted(switches & set(options)):
            if not isinstance(options[key], bool):
                raise ValueError(f"--norm-option {key}={options[key]!r}: {key} is a switch, give true or false "
                                 "(JSON's spelling: any other value, even the text 'False', would read as true)")
    # Python's spellings of null, true and false are not JSON either, so they arrive as text, and a layer's refusal
    # ("... or None (cumulative average), got 'None'") then named the very value the user meant
    python_spellings = "".join(f"; {key}={value} is read as the text {value!r} (not JSON): for Python's {value} give "
                               f"{value.lower() if value != 'None' else 'null'}"
                               for key, value in options.items() if value in ("None", "True", "False"))
    for rank in ranks:
        try:
            create_norm(norm, 6, rank, **options)
        except (TypeError, ValueError, RuntimeError) as error:
            where = "conv" if rank == 4 else "dense"
            raise ValueError(f"--norm-option for --norm {norm} ({where} layers): {error}{python_spellings}") from None
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


def _keeps_running_stats(norm: str, options: dict) -> bool:
    """Whether the norm's layers, built with ``options``, have running statistics."""
    return not options or bool(create_norm(norm, 4, rank=2, **options).track_running_stats)


def _options_text(options: dict) -> str:
    return " ".join(f"{key}={json.dumps(value)}" for key, value in options.items())


def _has_batch_norm(norm: str) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    from normkit import BatchNorm
    # A conv layer's norm (rank 4): every name builds one, `instance` included (it has no dense form).
    return isinstance(create_norm(norm, 4, rank=4), (BatchNorm, _BatchNorm))


# Settings a resumed run may change; every other one must match the checkpoint's (the run's identity).
RESUME_OVERRIDABLE = {"epochs", "out", "resume", "overwrite", "device", "tensorboard", "dry_run", "quiet",
                      "stop_after_steps", "data_dir", "threads", "recalibrate", "compile"}


PER_INVOCATION = {"out", "resume", "overwrite", "dry_run", "quiet", "stop_after_steps"}

# Settings that do not change what a run computes (where and how it runs, what it prints): a fresh run whose
# other settings equal a finished run's reproduces it, so it may replace that run without --overwrite.
NOT_IDENTITY = {"out", "resume", "quiet", "tensorboard", "device", "threads", "compile", "data_dir"}
