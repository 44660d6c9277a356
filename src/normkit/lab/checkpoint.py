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


def restore_rng_states(states: dict, shuffle: torch.Generator) -> None:
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
