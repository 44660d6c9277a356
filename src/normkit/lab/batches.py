"""A run's data as the loop sees it: the splits as tensors on the device, their fingerprint, each epoch's batches."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .config import NUM_CLASSES, TrainConfig, virtual_batch_size
from .data import Splits, load_dataset


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
        # (the value as given: a percentage rounds 0.995 to "100%", a split that leaves no room at all)
        raise ValueError(f"only {cut} training images after --val-split {cfg.val_split} of {len(labels)}; "
                         "raise --train-limit or lower --val-split")
    fingerprint = data_fingerprint({"train": (source[:cut], labels[:cut]), "val": (source[cut:], labels[cut:]),
                                    "test": (sources[1], splits.test[1])})
    device = torch.device(cfg.device)
    move = lambda pair: (pair[0].to(device), pair[1].to(device))  # noqa: E731
    return Prepared(train=move((images[:cut], labels[:cut])), val=move((images[cut:], labels[cut:])),
                    test=move(splits.test), fingerprint=fingerprint)


def _drops_last(size: int, cfg: TrainConfig) -> bool:
    # A one-image partial batch has no batch variance (BN refuses it); ghost BN needs whole virtual batches. With
    # --batch-size 1 (norms without batch statistics only) every batch is whole, and dropping one would lose an image.
    return (size < 2 and cfg.batch_size > 1) or bool(cfg.drop_last and size < cfg.batch_size)


def training_batch_sizes(count: int, cfg: TrainConfig, labels: torch.Tensor | None = None) -> list[int]:
    """The sizes of one epoch's batches of ``count`` images (what ``training_batches`` makes), without shuffling
    (``labels``: the training labels, which ``--batch-classes`` batches depend on)."""
    if cfg.batch_classes is not None:
        return [cfg.batch_size] * len(_class_pure_plan(_chunk_counts(labels, cfg), cfg.batch_classes, None))
    sizes = [cfg.batch_size] * (count // cfg.batch_size) + ([count % cfg.batch_size] if count % cfg.batch_size else [])
    if sizes and _drops_last(sizes[-1], cfg):
        sizes.pop()
    return sizes


def check_batches(cfg: TrainConfig, count: int, labels: torch.Tensor | None = None) -> None:
    """Refuse, before training, settings that make no training step or a batch the norm cannot take."""
    sizes = training_batch_sizes(count, cfg, labels)
    virtual = virtual_batch_size(cfg.norm, cfg.norm_options)
    if not sizes and cfg.batch_classes is not None:
        per_class = cfg.batch_size // cfg.batch_classes
        raise ValueError(f"no training step: --batch-classes {cfg.batch_classes} with --batch-size {cfg.batch_size} "
                         f"needs {cfg.batch_classes} classes with at least {per_class} training images each, and "
                         f"these {count} have {int((torch.bincount(labels) >= per_class).sum())}; lower "
                         "--batch-size or --batch-classes, or raise --train-limit")
    if not sizes:
        limit = f"--train-limit {cfg.train_limit} and " if cfg.train_limit is not None else ""
        raise ValueError(f"no training step: the {count} training images (after {limit}--val-split "
                         f"{cfg.val_split}) are fewer than --batch-size {cfg.batch_size}, and --drop-last"
                         f"{' (automatic with ghost batches)' if virtual is not None else ''} drops that partial "
                         "batch; lower --batch-size or raise --train-limit")
    if virtual is not None and sizes[-1] % virtual:
        raise ValueError(f"--no-drop-last with --norm {cfg.norm}: each epoch's last batch would hold {sizes[-1]} of "
                         f"the {count} training images, not a multiple of the ghost batch {virtual}; drop "
                         "--no-drop-last (ghost batches drop partial batches by default) or change "
                         "--batch-size/--train-limit")


def training_batches(count: int, cfg: TrainConfig, generator: torch.Generator,
                     labels: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One epoch's batches of indices, shuffled by ``generator`` (a partial last batch per ``drop_last``), or with
    ``--batch-classes K`` batches of K classes each (``labels``: the training labels)."""
    if cfg.batch_classes is not None:
        return _class_pure_batches(labels, cfg, generator)
    order = torch.randperm(count, generator=generator)
    batches = list(order.split(cfg.batch_size))
    if batches and _drops_last(len(batches[-1]), cfg):
        batches.pop()
    return batches


def _chunk_counts(labels: torch.Tensor, cfg: TrainConfig) -> list[int]:
    """How many whole groups of ``batch_size / K`` images each class has."""
    per_class = cfg.batch_size // cfg.batch_classes
    return [int(n) // per_class for n in torch.bincount(labels.cpu(), minlength=NUM_CLASSES)]


def _class_pure_plan(chunks: list[int], k: int, generator: torch.Generator | None) -> list[tuple[int, ...]]:
    """The classes of each batch: every batch takes one chunk from each of the K classes with the most chunks left
    (ties in ``generator``'s random order; None: by class), until fewer than K classes have any. Taking from the
    fullest classes makes the most batches, and how many does not depend on the ties."""
    left = list(chunks)
    plan = []
    while sum(1 for n in left if n) >= k:
        ties = torch.randperm(len(left), generator=generator).tolist() if generator is not None else range(len(left))
        chosen = sorted(ties, key=lambda c: -left[c])[:k]
        for c in chosen:
            left[c] -= 1
        plan.append(tuple(chosen))
    return plan


def _class_pure_batches(labels: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """The renorm paper's non-i.i.d. minibatches: each batch holds ``batch_size / K`` images of each of K classes.

    Each class's images are shuffled and cut into chunks of ``batch_size / K`` (a last partial chunk sits the
    epoch out); batches take one chunk from each of K classes (``_class_pure_plan``) and come in shuffled order.
    Images of classes left without K partners sit the epoch out too; which ones changes from epoch to epoch."""
    per_class = cfg.batch_size // cfg.batch_classes
    labels = labels.cpu()
    chunks = []
    for c in range(NUM_CLASSES):
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        chunks.append([part for part in members.split(per_class) if len(part) == per_class])
    plan = _class_pure_plan([len(parts) for parts in chunks], cfg.batch_classes, generator)
    batches = [torch.cat([chunks[c].pop() for c in classes]) for classes in plan]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def recalibration_batches(images: torch.Tensor, cfg: "TrainConfig", count: int) -> list[torch.Tensor]:
    """The first ``count`` batches (all when -1) of ``cfg.batch_size`` training images, in the split's order.

    Not shuffled: the result depends only on the weights and the split, and the training shuffle's
    generator is not touched. A last batch is dropped where training would drop it (one image; a
    partial batch with drop_last, as ghost BN needs whole virtual batches)."""
    batches = list(images.split(cfg.batch_size))
    if batches and _drops_last(len(batches[-1]), cfg):
        batches.pop()
    return batches if count < 0 else batches[:count]
