"""Initializers, regularizers and constraints by name or callable, with Keras' meanings and defaults.

Keras lets each BN parameter and statistic have an initializer, gamma/beta a
regularizer (a term added to the training loss) and a constraint (a projection
applied after each optimizer step). PyTorch has no such slots; these small
registries give normkit.BatchNorm and normkit.keras.BatchNormalization the same
vocabulary, and ``regularization_loss``/``apply_constraints`` collect them over a model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

EPSILON = 1e-7  # Keras' backend.epsilon(), used by its norm constraints

# ----------------------------------------------------------------------------- initializers


def _normal(tensor, stddev=0.05):
    return tensor.normal_(0.0, stddev)


def _uniform(tensor, limit=0.05):
    return tensor.uniform_(-limit, limit)


def _truncated_normal(tensor, stddev=0.05):
    return nn.init.trunc_normal_(tensor, 0.0, stddev, -2 * stddev, 2 * stddev)


INITIALIZERS: dict[str, Callable] = {
    "zeros": lambda t: t.zero_(),
    "ones": lambda t: t.fill_(1.0),
    "random_normal": _normal,
    "random_uniform": _uniform,
    "truncated_normal": _truncated_normal,
}


class Constant:
    """Initializer that fills with ``value`` (Keras' ``Constant``)."""

    def __init__(self, value: float):
        self.value = float(value)

    def __call__(self, shape, dtype=None):
        return torch.full(tuple(shape), self.value, dtype=dtype or torch.float32)

    def __repr__(self):
        return f"Constant({self.value})"


def resolve_initializer(initializer, *, name: str):
    """A name from INITIALIZERS, a number (constant), or a callable ``(shape, dtype) -> array``."""
    if isinstance(initializer, str):
        key = initializer.lower()
        if key not in INITIALIZERS:
            raise ValueError(f"{name}={initializer!r} is not a known initializer; use one of "
                             f"{sorted(INITIALIZERS)}, a number, or a callable(shape, dtype)")
        return key
    if isinstance(initializer, (int, float)) and not isinstance(initializer, bool):
        return Constant(initializer)
    if callable(initializer):
        return initializer
    raise TypeError(f"{name} must be a name, a number or a callable(shape, dtype), got {initializer!r}")


def apply_initializer(initializer, tensor: torch.Tensor) -> None:
    """Fill ``tensor`` in place from a resolved initializer."""
    if isinstance(initializer, str):
        INITIALIZERS[initializer](tensor)
        return
    values = initializer(tuple(tensor.shape), tensor.dtype)
    values = torch.as_tensor(values, dtype=tensor.dtype, device=tensor.device)
    if values.shape != tensor.shape:
        raise ValueError(f"initializer {initializer!r} returned shape {tuple(values.shape)}, "
                         f"expected {tuple(tensor.shape)}")
    tensor.copy_(values)


# ----------------------------------------------------------------------------- regularizers


class L1L2:
    """``l1 * sum(|w|) + l2 * sum(w^2)``, Keras' L1L2 (``"l1"``/``"l2"`` use 0.01)."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        if l1 < 0 or l2 < 0:
            raise ValueError(f"regularization factors must be >= 0, got l1={l1}, l2={l2}")
        self.l1, self.l2 = float(l1), float(l2)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        loss = weight.new_zeros(())
        if self.l1:
            loss = loss + self.l1 * weight.abs().sum()
        if self.l2:
            loss = loss + self.l2 * weight.square().sum()
        return loss

    def __repr__(self):
        return f"L1L2(l1={self.l1}, l2={self.l2})"


def L1(factor: float = 0.01) -> L1L2:
    return L1L2(l1=factor)


def L2(factor: float = 0.01) -> L1L2:
    return L1L2(l2=factor)


REGULARIZERS = {"l1": lambda: L1(), "l2": lambda: L2(), "l1_l2": lambda: L1L2(0.01, 0.01)}


def resolve_regularizer(regularizer, *, name: str):
    """None, ``"l1"``/``"l2"``/``"l1_l2"`` (factor 0.01, as Keras) or a callable ``weight -> scalar``."""
    if regularizer is None:
        return None
    if isinstance(regularizer, str):
        key = regularizer.lower()
        if key not in REGULARIZERS:
            raise ValueError(f"{name}={regularizer!r} is not a known regularizer; use one of "
                             f"{sorted(REGULARIZERS)} or a callable(weight) -> scalar tensor")
        return REGULARIZERS[key]()
    if callable(regularizer):
        return regularizer
    raise TypeError(f"{name} must be None, a name or a callable(weight) -> scalar tensor, got {regularizer!r}")


# ----------------------------------------------------------------------------- constraints


class NonNeg:
    """Clamp to >= 0 (Keras' ``NonNeg``)."""

    def __call__(self, w):
        return w.clamp(min=0.0)


class MinMaxNorm:
    """Rescale so the L2 norm over ``axis`` lies in [min_value, max_value] (Keras' MinMaxNorm/MaxNorm/UnitNorm).

    ``w * (rate * clip(norm, min, max) + (1 - rate) * norm) / (eps + norm)``
    """

    def __init__(self, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis: int = 0):
        self.min_value, self.max_value, self.rate, self.axis = float(min_value), float(max_value), float(rate), axis

    def __call__(self, w):
        norms = w.square().sum(dim=self.axis, keepdim=True).sqrt()
        desired = self.rate * norms.clamp(self.min_value, self.max_value) + (1 - self.rate) * norms
        return w * desired / (EPSILON + norms)


def MaxNorm(max_value: float = 2.0, axis: int = 0) -> MinMaxNorm:
    return MinMaxNorm(0.0, max_value, 1.0, axis)


class UnitNorm:
    """Divide by the L2 norm over ``axis`` (Keras' ``UnitNorm``): ``w / (eps + ||w||)``."""

    def __init__(self, axis: int = 0):
        self.axis = axis

    def __call__(self, w):
        return w / (EPSILON + w.square().sum(dim=self.axis, keepdim=True).sqrt())


CONSTRAINTS = {"non_neg": NonNeg, "unit_norm": UnitNorm, "max_norm": MaxNorm, "min_max_norm": MinMaxNorm}


def resolve_constraint(constraint, *, name: str):
    """None, a name from CONSTRAINTS (Keras defaults) or a callable ``weight -> projected weight``."""
    if constraint is None:
        return None
    if isinstance(constraint, str):
        key = constraint.lower()
        if key not in CONSTRAINTS:
            raise ValueError(f"{name}={constraint!r} is not a known constraint; use one of {sorted(CONSTRAINTS)} "
                             "or a callable(weight) -> weight")
        return CONSTRAINTS[key]()
    if callable(constraint):
        return constraint
    raise TypeError(f"{name} must be None, a name or a callable(weight) -> weight, got {constraint!r}")


# ----------------------------------------------------------------------------- model-wide helpers


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every normkit layer's regularization terms in ``model``: add it to the training loss."""
    terms = [m.regularization_loss() for m in model.modules() if hasattr(m, "weight_regularizer")]
    if not terms:
        return torch.zeros(())
    return torch.stack([t.reshape(()) for t in terms]).sum()


def apply_constraints(model: nn.Module) -> None:
    """Project every constrained normkit parameter in ``model`` (call after ``optimizer.step()``)."""
    for module in model.modules():
        if hasattr(module, "weight_constraint"):
            module.apply_constraints()


def constrain_after_step(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Apply ``model``'s constraints after every ``optimizer.step()``; returns the hook handle (``.remove()``)."""
    return optimizer.register_step_post_hook(lambda *_: apply_constraints(model))
