"""A run's checkpoint.pt: written atomically, loaded (weights_only) and checked, turned back into its config and model.

The checkpoint holds only tensors, dicts, lists and primitives, so it loads with
``torch.load(weights_only=True)``. Besides the model and optimizer it holds the state of the run's shuffling
generator and torch's, NumPy's and Python's global RNG states, which a resumed run restores (train.py).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from normkit.registry import NORM_NAMES

from .config import TrainConfig
from .data import atomic_write_bytes
from .models import ACTIVATIONS, INITS, MODELS, build_model

CHECKPOINT_FORMAT = "normkit-lab-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, damaged or not a normkit lab checkpoint."""


# What to do about a checkpoint whose entries are of the wrong kind: nothing normkit writes looks like that.
EDITED = "the file was edited or damaged: restore it from a copy or train the run again"


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


def _numpy_state(numpy_state: dict) -> tuple:
    """The tuple ``np.random.set_state`` takes, from the checkpoint's dict of it."""
    return (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
            numpy_state["has_gauss"], numpy_state["cached"])


def _python_state(python_state: dict) -> tuple:
    """The tuple ``random.setstate`` takes, from the checkpoint's dict of it."""
    return python_state["version"], tuple(python_state["state"]), python_state["gauss"]


def restore_rng_states(states: dict, shuffle: torch.Generator) -> None:
    shuffle.set_state(states["shuffle"])
    torch.set_rng_state(states["torch"])
    np.random.set_state(_numpy_state(states["numpy"]))
    random.setstate(_python_state(states["python"]))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _shown(value) -> str:
    """``value`` as an error message shows it: its repr when short, else its type."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# A per-epoch record of the history (metrics.json's): what the curves, the comparison and a resumed run read.
HISTORY_KEYS = ("epoch", "step", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "images_per_second")


def _is_record(record) -> bool:
    """A history record as the training loop writes it: counts for epoch and step, numbers or None for the rest."""
    return (isinstance(record, dict) and all(key in record for key in HISTORY_KEYS)
            and _is_count(record["epoch"]) and _is_count(record["step"])
            and all(record[key] is None or (isinstance(record[key], (int, float)) and not isinstance(record[key], bool))
                    for key in HISTORY_KEYS[2:]))


def _on_cpu(value):
    """``value`` with every tensor in it, at any depth of dicts and lists, moved to the CPU (NumPy's key array sits
    inside the numpy entry's dict, and reading it with ``.numpy()`` needs it there)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_on_cpu(item) for item in value]
    return value


def _checked_rng_states(states, path: Path) -> dict:
    """The checkpoint's RNG states with their tensors on the CPU, each one tried on a throwaway generator first.

    Generators keep their state in CPU byte tensors whatever ``map_location`` moved them to, and a state that does
    not fit (a key missing, a wrong-sized tensor) is refused here, naming the file, rather than met as a traceback
    when a resumed run restores it."""
    if not isinstance(states, dict):
        raise CheckpointError(f"{path}: its rng entry is {_shown(states)}, not a dict of generator states; {EDITED}")
    missing = sorted({"shuffle", "torch", "numpy", "python", "cuda"} - set(states))
    if missing:
        raise CheckpointError(f"{path}: its rng entry lacks {missing}; {EDITED}")
    checked = _on_cpu(states)

    def cuda_states(cuda: list) -> None:
        # Not tried on a CUDA generator: that would start CUDA for a CPU run; restoring them reports a misfit.
        if not isinstance(cuda, list) or not all(isinstance(state, torch.Tensor) and state.dtype == torch.uint8
                                                 and state.dim() == 1 for state in cuda):
            raise TypeError(f"expected a list of byte tensors, got {_shown(cuda)}")

    trials = {"shuffle": lambda state: torch.Generator().set_state(state),
              "torch": lambda state: torch.Generator().set_state(state),  # the global generator's kind
              "numpy": lambda state: np.random.RandomState().set_state(_numpy_state(state)),
              "python": lambda state: random.Random().setstate(_python_state(state)),
              "cuda": cuda_states}
    for name, trial in trials.items():
        try:
            trial(checked[name])
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            if isinstance(error, KeyError):
                reason = f"no {reason}"
            raise CheckpointError(f"{path}: its rng entry {name!r} is not a valid generator state ({reason}); "
                                  f"{EDITED}") from None
    return checked


def _check_entries(payload: dict, path: Path) -> None:
    """Refuse entries of the wrong kind (a text epoch, no history) with one line naming the file, before a
    resumed run or an evaluation trips over them; the RNG states come back on the CPU (``_checked_rng_states``)."""
    for name in ("epoch", "step"):
        if not _is_count(payload[name]):
            raise CheckpointError(f"{path}: its {name} is {_shown(payload[name])}, not a whole number >= 0; {EDITED}")
    history = payload["history"]
    if not isinstance(history, list) or not all(_is_record(record) for record in history):
        raise CheckpointError(f"{path}: its history is {_shown(history)}, not a list of per-epoch records (dicts of "
                              f"{', '.join(HISTORY_KEYS)}); {EDITED}")
    if not isinstance(payload["config"], dict):
        raise CheckpointError(f"{path}: its config is {_shown(payload['config'])}, not a dict of settings; {EDITED}")
    model = payload["model"]
    if not isinstance(model, dict) or not all(isinstance(value, torch.Tensor) for value in model.values()):
        raise CheckpointError(f"{path}: its model is {_shown(model)}, not a state_dict (a dict of tensors); {EDITED}")
    optimizer = payload["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise CheckpointError(f"{path}: its optimizer is {_shown(optimizer)}, not an optimizer's state_dict (a dict "
                              f"with state and param_groups); {EDITED}")
    if not isinstance(payload.get("data_sha256", ""), str):
        raise CheckpointError(f"{path}: its data_sha256 is {_shown(payload['data_sha256'])}, not a hex digest; "
                              f"{EDITED}")
    recalibration = payload.get("recalibration")
    if recalibration is not None and not (
            isinstance(recalibration, dict) and set(recalibration) == set(RECALIBRATION_KEYS)
            and all(_is_count(recalibration[key]) for key in ("batches", "images"))
            and isinstance(recalibration["recalibrate"], int) and not isinstance(recalibration["recalibrate"], bool)
            and all(value is None or isinstance(value, float) for key, value in recalibration.items()
                    if key.startswith("test_"))):
        raise CheckpointError(f"{path}: its recalibration entry is {_shown(recalibration)}, not the record normkit "
                              f"writes ({', '.join(RECALIBRATION_KEYS)}); {EDITED}")
    payload["rng"] = _checked_rng_states(payload["rng"], path)


def _refused_objects(error: pickle.UnpicklingError) -> str:
    """What torch.load(weights_only=True) refused, in a few words: its message is a paragraph with ANSI codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    # "Unsupported global: GLOBAL torch.nn.Linear" (not allow-listed) or "unsupported GLOBAL posix.system whose
    # module posix is blocked" (a payload that would run code): both name what the file tried to load.
    unsupported = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", text, re.IGNORECASE)
    if unsupported:
        return f"unsupported global {unsupported.group(1)}"
    detail = text.split("WeightsUnpickler error:")[-1].strip()
    return detail.splitlines()[0].split(". ")[0] if detail else type(error).__name__


# A recalibrated checkpoint's record of it: the batch count asked for, what it used, and the test measurement of
# the running statistics training ended with (which the recalibrated checkpoint no longer holds).
RECALIBRATION_KEYS = ("recalibrate", "batches", "images", "test_loss_before_recalibration",
                      "test_accuracy_before_recalibration")


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step: int,
                    cfg: TrainConfig, history: list[dict], shuffle: torch.Generator, data_sha256: str = "",
                    recalibration: dict | None = None) -> None:
    """Write the run's state (model, optimizer, epoch, RNG states, config, history) atomically to ``path``;
    ``recalibration`` (RECALIBRATION_KEYS) when the model's running statistics were just recalibrated."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch, "step": step,
               "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "history": history, "rng": _rng_states(shuffle)}
    if data_sha256:
        # Optional, so version 1 stays: checkpoints written before it load as before (nothing to compare).
        payload["data_sha256"] = data_sha256
    if recalibration is not None:  # (optional too, for the same reason)
        payload["recalibration"] = {key: recalibration[key] for key in RECALIBRATION_KEYS}
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
            names = archive.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({size} bytes): {error}") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged: the bytes of {damaged} do not match their CRC-32 (the file "
                              "changed after it was written: a disk or copy error); restore it from a copy or "
                              "train again")
    if not any(name.endswith("/data.pkl") for name in names):
        # torch.save puts data.pkl in the archive's one folder; a zip without it is some other zip file.
        shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "") if names else "nothing"
        raise CheckpointError(f"{path}: a zip archive but not a torch checkpoint (no data.pkl; it holds {shown}); "
                              "`normkit train --out DIR` writes DIR/checkpoint.pt")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: not a normkit lab checkpoint: it holds objects other than tensors and plain "
                              f"data ({_refused_objects(error)}), which torch.load(weights_only=True) refuses to "
                              "unpickle; `normkit train --out DIR` writes DIR/checkpoint.pt") from None
    except Exception as error:  # torch raises RuntimeError, EOFError... depending on where the file was cut
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        # c10's "[enforce fail at inline_container.cc:180] . " says where in torch, not what is wrong with the file.
        first_line = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first_line)
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
    _check_entries(payload, path)
    return payload


def config_from_checkpoint(payload: dict, path: str | os.PathLike | None = None) -> TrainConfig:
    """The checkpoint's TrainConfig (not resolved, but every setting checked as a run's are before it starts);
    CheckpointError names the file when it cannot be one."""
    where = str(path) if path is not None else "checkpoint"
    saved = payload["config"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: its config is a {type(saved).__name__}, not a dict of settings")
    unknown = sorted(map(str, set(saved) - {f.name for f in dataclasses.fields(TrainConfig)}))
    if unknown:
        raise CheckpointError(f"{where}: its config has settings this normkit does not know ({', '.join(unknown)}); "
                              "it was written by another version of normkit or edited")
    cfg = TrainConfig(**saved)
    for name, allowed in dict(model=MODELS, norm=NORM_NAMES, activation=tuple(ACTIVATIONS), init=INITS).items():
        if getattr(cfg, name) not in allowed:
            raise CheckpointError(f"{where}: its config has {name} {getattr(cfg, name)!r}, not one of {', '.join(allowed)}")
    # resolved() leaves these switches alone, and a text "false" would read as true.
    switches = [name for name in ("resume", "tensorboard", "dry_run", "quiet", "compile", "drop_last")
                if not isinstance(getattr(cfg, name), bool) and not (name == "drop_last" and cfg.drop_last is None)]
    if switches:
        raise CheckpointError(f"{where}: its config has {switches[0]} {getattr(cfg, switches[0])!r}, not true or "
                              f"false; {EDITED}")
    # The checks every run passes before it starts, on the settings that describe the model and its data. How a
    # run went is not the file's to answer for: the device (a run trained on a GPU is evaluated on a CPU; a
    # resumed run checks the one it will use), recalibration and the resume flags (an older normkit wrote epoch
    # checkpoints of runs that a later check refuses to start).
    try:
        dataclasses.replace(cfg, device="cpu", recalibrate=0, resume=False, overwrite=False).resolved()
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: its stored settings are invalid ({error}); {EDITED}") from None
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
    try:
        model = build_model(cfg.model, cfg.norm, cfg.activation, cfg.init, cfg.norm_options)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path if path is not None else 'checkpoint'}: the model its config describes cannot "
                              f"be built ({cfg.model} + {cfg.norm}): {str(error).splitlines()[0]}; {EDITED}") from None
    load_weights(model, payload["model"], path, cfg)
    return model, cfg
