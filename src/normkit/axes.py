"""Resolve axis specifications against an input rank, with errors that say what to do."""

from __future__ import annotations

import functools
import numbers
from typing import Iterable, Sequence, Union

import torch

AxisSpec = Union[int, Sequence[int]]


def canonicalize_axes(axis: AxisSpec, ndim: int, *, name: str = "axis") -> tuple[int, ...]:
    """Return ``axis`` as a sorted tuple of non-negative ints for an ``ndim``-rank input.

    Negative entries count from the end, as in NumPy. Out-of-range or repeated
    entries are a ``ValueError`` naming ``name``; non-integers a ``TypeError``.
    """
    # Layers ask the same question every step: cache it for exact ints (True == 1 and 1.0 == 1
    # as dictionary keys, so anything else takes the checked path every time).
    if torch.compiler.is_compiling():  # torch.compile traces the plain function (it cannot trace the cache)
        return _canonical(axis, ndim, name)
    if type(axis) is int or (type(axis) is tuple and all(type(entry) is int for entry in axis)):
        return _canonical_cached(axis, ndim, name)
    return _canonical(axis, ndim, name)


@functools.lru_cache(maxsize=256)
def _canonical_cached(axis, ndim: int, name: str) -> tuple[int, ...]:
    return _canonical(axis, ndim, name)


def _canonical(axis: AxisSpec, ndim: int, name: str) -> tuple[int, ...]:
    entries = _entries(axis, name)
    if len(entries) == 0:
        raise ValueError(f"{name} must name at least one axis, got an empty sequence")
    resolved = []
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, int):
            raise TypeError(f"{name} entries must be ints, got {entry!r} of type {type(entry).__name__}")
        if not -ndim <= entry < ndim:
            raise ValueError(
                f"{name}={axis!r} is out of range for an input of rank {ndim}: "
                f"use an axis in [{-ndim}, {ndim - 1}]"
            )
        resolved.append(entry % ndim)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"{name}={axis!r} names the same axis twice (rank {ndim}); list each axis once")
    return tuple(sorted(resolved))


def complement(axes: Iterable[int], ndim: int) -> tuple[int, ...]:
    """The axes of an ``ndim``-rank input that are not in ``axes`` (the reduction axes of BN)."""
    kept = set(axes)
    return tuple(i for i in range(ndim) if i not in kept)


def broadcast_shape(feature_axes: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """Shape that makes a parameter over ``feature_axes`` broadcast against ``shape``."""
    return tuple(shape[i] if i in feature_axes else 1 for i in range(len(shape)))


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a shape of ``target``'s rank broadcasts to it: each size 1 or the target's.

    What ``torch.broadcast_shapes`` answers for equal ranks, at a fraction of its cost: masks are
    checked on every call, and a small step on a GPU is bound by such host time.
    """
    # (``size == 1 or size == wanted``, not ``size in (1, wanted)``: traced by torch.compile with dynamic=True, the
    # containment test of a symbolic batch size came out False for a mask that fits, whenever the feature count
    # equalled another size of the input (a ValueError from every masked call; found by tools/fuzz_batch_norm.py
    # --family compile). The same cost eagerly.)
    return len(shape) == len(target) and all(size == 1 or size == wanted for size, wanted in zip(shape, target))


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _entries(axis, name):
    """The entries of an axis spec, NumPy integers made Python ints (anything else left for the caller to refuse)."""
    if _is_integer(axis):
        return (int(axis),)
    try:
        return tuple(int(entry) if _is_integer(entry) else entry for entry in axis)
    except TypeError:
        raise TypeError(f"{name} entries must be ints: give an int or a tuple of ints, got {axis!r}") from None


def check_feature_axes(axis: AxisSpec, *, name: str = "axis") -> Union[int, tuple[int, ...]]:
    """Validate an axis spec before the input rank is known (types and duplicates of equal sign); returns
    it as an int or a tuple of Python ints."""
    entries = _entries(axis, name)
    if len(entries) == 0:
        raise ValueError(f"{name} must name at least one axis, got an empty sequence")
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, int):
            raise TypeError(f"{name} entries must be ints, got {entry!r} of type {type(entry).__name__}")
    if len(set(entries)) != len(entries):
        raise ValueError(f"{name}={axis!r} names the same axis twice; list each axis once")
    return entries[0] if _is_integer(axis) else entries
