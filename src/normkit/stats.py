"""Running-statistics rules, written once as arithmetic that works on NumPy arrays and torch tensors.

Conventions (PyTorch's vocabulary, used everywhere in normkit):

    momentum   weight of the NEW batch value (0.1 by default).
               running <- (1 - momentum) * running + momentum * batch
    None       cumulative average: momentum_t = 1 / t at the t-th tracked batch.

Keras' ``momentum=0.99`` is a decay (the weight of the OLD value); keras.py turns
it into ``1 - 0.99`` at the boundary, so nothing below knows about it.

Running variance: PyTorch stores the unbiased batch variance ``var * n / (n - 1)``
while normalizing with the biased one; Keras stores the biased one. Both are one
flag, ``unbiased_running_var`` (of the layers and of ``update_batch_norm_running_stats``,
which applies ``bessel_factor`` below), never a separate code path.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


def momentum_factor(momentum: float | None, num_batches_tracked: int) -> float:
    """The weight of the new batch value for this step.

    ``momentum=None`` is the cumulative (equal-weight) average over all tracked
    batches, so the factor for the ``t``-th batch (``num_batches_tracked`` already
    incremented) is ``1 / t``.
    """
    if momentum is None:
        return 1.0 / float(max(num_batches_tracked, 1))
    return float(momentum)


def bessel_factor(count):
    """``n / (n - 1)``, the factor that turns a biased variance into an unbiased one.

    With ``n <= 1`` there is no unbiased estimate; the factor is then 1 (the
    biased value is stored) rather than inf/NaN, which would poison the buffer.
    Works elementwise on NumPy arrays, torch tensors and Python numbers.
    """
    if isinstance(count, (int, float)):
        return count / (count - 1) if count > 1 else 1.0
    denominator = count - 1
    safe = denominator * (denominator > 0) + 1 * (denominator <= 0)
    return count / safe * (denominator > 0) + 1 * (denominator <= 0)


def check_eps(eps, *, name="eps"):
    """Refuse an eps that is not a positive finite number (it keeps 1/sqrt(var + eps) finite): the layers, both
    twins (functional and reference) and their backward functions share this one check and its message."""
    if type(eps) is float and 0.0 < eps < math.inf:
        return  # the common case, checked per call: without the ABC lookup numbers.Real costs
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"{name} must be a positive number (it keeps 1/sqrt(var + {name}) finite), got {eps!r}")


def check_momentum_given(momentum, *, name="momentum"):
    """Refuse ``momentum=None`` in the functional twins (functional and reference batch_norm/instance_norm), as
    torch.nn.functional.batch_norm refuses it (a TypeError): None is the layers' cumulative average, which they turn
    into the number ``1 / t`` for the t-th tracked batch (``momentum_factor``) before calling a twin. (Both twins
    failed deep inside with unrelated TypeErrors: "unsupported operand type(s) for *: 'NoneType' and ...".)"""
    if momentum is None:
        raise TypeError(f"{name}=None is the layers' cumulative average, not a value the functional batch_norm and "
                        f"instance_norm take: pass the weight of the new batch value as a number (0.1, torch.nn's "
                        f"default; 1 / t at the t-th batch for the cumulative average: "
                        f"normkit.stats.momentum_factor(None, t))")
    if type(momentum) is not float and not isinstance(momentum, _MOMENTUM_TYPES):
        # (a string or a list failed deep inside, naming nothing: "expected Tensor as element 0 in argument 2, but got
        # str" on the option paths, the reference's "ufunc 'multiply' did not contain a loop")
        raise TypeError(f"{name} must be a number (the weight of the new batch value), got {type(momentum).__name__}: "
                        f"{momentum!r}")


# (a 0-d tensor: compiled layers pass the cumulative average 1 / t as one; SymFloat/SymInt: traced numbers)
_MOMENTUM_TYPES = (numbers.Number, torch.Tensor, torch.SymFloat, torch.SymInt)


PER_FEATURE_NAMES = ("running_mean", "running_var", "weight", "bias", "renorm_mean", "renorm_stddev", "moving_stddev")


def check_per_feature_sizes(tensors, size_of, features, axis, shape, unit="features") -> None:
    """Every per-feature tensor (``tensors``, in the order of ``PER_FEATURE_NAMES``; None where absent) holds one
    value per feature, in any shape: the twins' one check and message (batch_norm's features, instance_norm's
    channels), ``size_of`` counting a value (``np.size``, ``torch.Tensor.numel``). (The option paths took another
    size silently or failed deep inside: ghost batches normalized with a weight or bias of 4 or 1 values for 3
    features, the first values repeated across the groups; a running_var of 2 values was resized in place under
    renorm; elsewhere "The size of tensor a (2) must match the size of tensor b (3)" after running_mean had moved;
    ATen's instance norm "weight should contain 12 elements not 16".) Lean: the layers' option calls run it on every
    step, the message is built only on failure."""
    for name, tensor in zip(PER_FEATURE_NAMES, tensors):
        if tensor is not None and size_of(tensor) != features:
            raise ValueError(f"{name} has {size_of(tensor)} values but the input has {features} {unit} on axis "
                             f"{axis} (input shape {tuple(shape)})")


def check_affine_size(name, size, expected):
    """layer_norm/group_norm's weight and bias hold one value per parameter position, in any layout (both twins
    reshape them): the same ValueError in both, naming the argument (numpy's reshape error, ATen's RuntimeError)."""
    if size != expected:
        raise ValueError(f"{name} has {size} values but this normalization takes {expected}: one per channel "
                         "(group_norm, instance_norm) or per position of normalized_shape (layer_norm)")


def check_normalized_shape(normalized_shape, input_shape):
    """layer_norm's normalized_shape, a tuple of sizes, must be the input's last dims, and at least one: the same
    ValueError in both twins (ATen's RuntimeError in functional; over no dim at all the reference gave the bias)."""
    k = len(normalized_shape)
    if k == 0:
        raise ValueError(f"normalized_shape must name at least one trailing dim to normalize over, got (): "
                         f"over none every value is its own group and normalizes to 0 (input shape {input_shape})")
    if len(input_shape) < k or tuple(input_shape[len(input_shape) - k:]) != normalized_shape:
        # (else the last k axes were reduced whatever their sizes: a silently different normalization)
        raise ValueError(f"normalized_shape={normalized_shape} must be the input's last {k} dims, "
                         f"got input shape {input_shape}")


def check_virtual_batch_size(virtual, name="virtual_batch_size"):
    if virtual is None:
        return None
    if isinstance(virtual, bool) or not isinstance(virtual, numbers.Integral) or virtual <= 0:
        raise ValueError(f"{name} must be a positive int, got {virtual!r}")
    return int(virtual)


def check_ghost_layout(layout, name="ghost_layout"):
    if layout not in ("strided", "contiguous"):
        raise ValueError(f"{name} must be 'strided' or 'contiguous', got {layout!r}")
    return layout


def check_adjustment(adjustment, name="adjustment"):
    if adjustment is not None and not callable(adjustment):
        raise TypeError(f"{name} must be a callable(input_shape) -> (scale, bias), got {adjustment!r}")
    return adjustment


def check_renorm_clipping_bounds(clipping, name="renorm_clipping") -> None:
    """The functional twins' renorm bounds: a sequence (rmin, rmax, dmax) of numbers (the layers resolve their
    ``renorm_clipping`` dict, see ``RenormClipping``, to it)."""
    if not (isinstance(clipping, (tuple, list)) and len(clipping) == 3):
        raise TypeError(f"{name} must be the bounds (rmin, rmax, dmax) for this step, got {clipping!r} (the layers' "
                        "dict {'rmax': ..., 'rmin': ..., 'dmax': ...} resolves to them with "
                        "normkit.stats.RenormClipping.from_dict(clipping).at_step(lambda: step))")
    if any(callable(bound) for bound in clipping):
        raise TypeError(f"{name} must hold numbers, this step's bounds (rmin, rmax, dmax), got {clipping!r}: resolve a "
                        "schedule first, with normkit.stats.RenormClipping.from_dict(clipping).at(step)")
    if not torch.compiler.is_compiling():
        # The layers' checks of the values (NaN, rmax < rmin, a negative dmax or rmin were taken silently: a NaN
        # bound never clips), without building a RenormClipping (which validates on construction: twice a call)
        checked_bounds(clipping, name)


def check_renorm_state(renorm_mean, renorm_stddev, moving_stddev, updating) -> None:
    """The batch_norm twins' renorm state: ``renorm_mean`` (which turns renorm on) needs ``renorm_stddev`` (r and d
    are taken against both), and a step that updates running statistics (``updating``: training with them) needs
    ``moving_stddev`` too, which ``running_var`` follows. (Without them the reference moved ``running_mean``, then
    failed with "unsupported operand type(s) for -: 'float' and 'NoneType'"; the functional twin with
    "expected Tensor as element 1 in argument 0, but got NoneType" or clamp()'s list of signatures.)"""
    missing = [name for name, value in (("renorm_stddev", renorm_stddev), ("moving_stddev", moving_stddev))
               if value is None and (updating or name == "renorm_stddev")]
    if renorm_mean is not None and missing:
        raise ValueError(f"renorm_mean is given (batch renormalization) but {' and '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} None: renorm needs renorm_mean and renorm_stddev, "
                         "and, in a training step with running statistics, moving_stddev (the layers' buffers of "
                         "those names); pass them, or renorm_mean=None for plain batch norm")


def integer_size(value):
    """``value`` as the Python int it holds where it is a 0-dim integer tensor, else unchanged: torch.nn's
    constructors (and ``torch.nn.functional.group_norm``'s ``num_groups``) take such a tensor as a size, by its
    ``__index__``, so the drop-ins do. Floating-point and bool tensors stay tensors, refused as sizes by the checks."""
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point
            and not value.dtype.is_complex and value.dtype != torch.bool):
        return int(value)
    return value


def check_num_groups(num_groups, shape, name="num_groups") -> None:
    """The group_norm twins' group count: a positive int that divides the channels of an (N, C, *) input. (The
    functional one said IndexError "Dimension out of range" for a 1-D input and ATen's "argument 'num_groups'
    (position 2) must be int, not str"; the reference "integer modulo by zero" for 0 and "unsupported operand
    type(s) for %" for a string.)"""
    if type(num_groups) is not int and (isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral)):
        raise TypeError(f"{name} must be a positive int, got {num_groups!r} of type {type(num_groups).__name__}")
    if num_groups <= 0:
        raise ValueError(f"{name} must be a positive int, got {num_groups!r}")
    if len(shape) < 2:
        raise ValueError(f"group_norm needs an (N, C, *) input, got shape {tuple(shape)}")
    channels = shape[1]
    if channels % num_groups:
        raise ValueError(f"{name}={num_groups} must divide the channels of an (N, C, *) input, got shape "
                         f"{tuple(shape)}; choose one of {group_counts(channels)}")


def group_counts(channels: int) -> list:
    """The group counts that divide ``channels`` (what GroupNorm's errors offer instead)."""
    return [g for g in range(1, channels + 1) if channels % g == 0]


def check_ghost_batch(batch_size, virtual_batch_size) -> None:
    """Ghost batches need a batch that ``virtual_batch_size`` divides (in training; inference is plain BN)."""
    if batch_size % virtual_batch_size:
        raise ValueError(f"virtual_batch_size={virtual_batch_size} must divide the batch size in training, got a "
                         f"batch of {batch_size}: use a batch size that is a multiple of {virtual_batch_size} (or "
                         "drop_last=True in the DataLoader); inference works for any batch size")


def ema_update(running, batch_value, factor):
    """Move ``running`` toward ``batch_value`` by ``factor`` in place; returns ``running``.

    ``running <- (1 - factor) * running + factor * batch_value``, torch.nn's form: written as a step,
    ``running + factor * (batch_value - running)``, a buffer that overflowed to inf became inf - inf = NaN
    at the next update, even with ``factor`` 0. ``factor`` may be a number or an array (per channel: 0
    leaves a channel untouched, used for channels that saw no valid value under a mask). Per-feature
    values may come in any shape: ``batch_value`` and ``factor`` are taken in ``running``'s.
    """
    shape = running.shape
    if getattr(batch_value, "ndim", 0):
        batch_value = batch_value.reshape(shape)
    if getattr(factor, "ndim", 0):
        factor = factor.reshape(shape)
    running[...] = (1 - factor) * running + factor * batch_value
    return running


@dataclass(frozen=True)
class Ramp:
    """A clipping value of the step: ``low`` until ``start``, linear to ``high`` at ``end``, then ``high``
    (its reciprocal with ``inverse``). An object rather than a closure, so layers using it can be pickled."""

    start: float
    end: float
    low: float
    high: float
    inverse: bool = False

    def __call__(self, step) -> float:
        progress = min(max((step - self.start) / (self.end - self.start), 0.0), 1.0)
        value = self.low + (self.high - self.low) * progress
        return 1.0 / value if self.inverse else value


@dataclass(frozen=True)
class RenormClipping:
    """Clipping of batch renormalization's correction, ``r`` in [rmin, rmax], ``|d| <= dmax``.

    Missing keys mean no clipping on that side (rmax=inf, rmin=0, dmax=inf), as in
    Keras. Values may be callables of the training step (the number of tracked
    batches before this one), so the usual schedule is one line::

        RenormClipping.from_dict({"rmax": lambda t: min(3.0, 1 + 2 * t / 5000), "dmax": ...})
    """

    rmax: object = math.inf
    rmin: object = 0.0
    dmax: object = math.inf

    KEYS = ("rmax", "rmin", "dmax")

    def __post_init__(self):
        # Fixed numbers are validated once; only schedules are evaluated (and need the step) per call.
        scheduled = any(callable(getattr(self, key)) for key in self.KEYS)
        object.__setattr__(self, "scheduled", scheduled)
        object.__setattr__(self, "_fixed", None if scheduled else self.at(0))

    def at_step(self, step) -> tuple[float, float, float]:
        """``at(step())``, calling ``step`` (which may read a tensor) only for schedules."""
        return self.at(step()) if self.scheduled else self._fixed

    @classmethod
    def paper_schedule(cls, scale: float = 1.0) -> "RenormClipping":
        """Ioffe (2017), section 4: plain BN (rmax 1, dmax 0) for the first 5,000 steps, then relaxed linearly
        to rmax 3 at step 40,000 and dmax 5 at step 25,000, with rmin = 1 / rmax. ``scale`` multiplies
        every step count (0.02: BN for 100 steps, dmax 5 at 500, rmax 3 at 800), for shorter runs."""
        if not scale > 0:
            raise ValueError(f"scale must be positive (it multiplies the paper's step counts), got {scale!r}")
        start = 5000 * scale
        return cls(rmax=Ramp(start, 40000 * scale, 1.0, 3.0), rmin=Ramp(start, 40000 * scale, 1.0, 3.0, inverse=True),
                   dmax=Ramp(start, 25000 * scale, 0.0, 5.0))

    @classmethod
    def from_dict(cls, clipping, *, name: str = "renorm_clipping") -> "RenormClipping":
        """Keras' renorm_clipping dict (keys rmax, rmin, dmax; values numbers or callables of the step), validated."""
        if clipping is None:
            return cls()
        if isinstance(clipping, RenormClipping):
            return clipping
        if not isinstance(clipping, dict):
            raise TypeError(f"{name} must be a dict with keys rmax, rmin, dmax, got {type(clipping).__name__}")
        invalid = sorted(set(clipping) - set(cls.KEYS))
        if invalid:
            raise ValueError(
                f"{name} received invalid keys {invalid}; allowed keys are 'rmax', 'rmin' and 'dmax'"
            )
        # Numbers are validated on construction; schedules are checked at step 0 now, not mid-training.
        resolved = cls(**{key: clipping[key] for key in clipping if clipping[key] is not None})
        if resolved.scheduled:
            resolved.at(0, name=name)
        return resolved

    def at(self, step: int, *, name: str = "renorm_clipping") -> tuple[float, float, float]:
        """(rmin, rmax, dmax) as numbers for training step ``step``, validated."""
        values = [value(step) if callable(value) else value for value in (self.rmin, self.rmax, self.dmax)]
        if torch.compiler.is_compiling() and self.scheduled:
            # Traced with the step count as a symbol: the checks become assertions of the compiled graph
            # (a RuntimeError when a schedule's values break them at run time).
            rmin, rmax, dmax = _numbers(values, name)
            torch._check(rmax >= rmin, lambda: f"{name}: rmax should be greater than or equal to rmin")
            torch._check(dmax >= 0, lambda: f"{name}: dmax should be non-negative")
            torch._check(rmin >= 0, lambda: f"{name}: rmin should be non-negative")
            return rmin, rmax, dmax
        return checked_bounds(values, name)


def _numbers(values, name: str) -> list:
    """(rmin, rmax, dmax) as floats; anything else named by its key."""
    numbers = []
    for key, value in zip(("rmin", "rmax", "dmax"), values):
        if isinstance(value, (str, bytes, bool)):
            # (float() took "2" and True: a typo'd config loaded silently, where momentum="0.1" is refused)
            raise TypeError(f"{name}[{key!r}] must be a number or a callable of the step, got {value!r}")
        try:
            numbers.append(float(value))
        except (TypeError, ValueError):
            raise TypeError(f"{name}[{key!r}] must be a number or a callable of the step, got {value!r}") from None
    return numbers


def checked_bounds(values, name: str = "renorm_clipping") -> tuple[float, float, float]:
    """One step's renorm bounds (rmin, rmax, dmax) as floats, validated: numbers, no NaN, rmax >= rmin,
    dmax >= 0, rmin >= 0."""
    values = _numbers(values, name)
    for key, value in zip(("rmin", "rmax", "dmax"), values):
        if math.isnan(value):  # (every comparison below is False for NaN: the bound would silently not clip)
            raise ValueError(f"{name}: {key} is NaN; give a number (or leave the key out for no bound)")
    rmin, rmax, dmax = values
    if rmax < rmin:
        raise ValueError(f"{name}: rmax should be greater than or equal to rmin, got rmax={rmax}, rmin={rmin}")
    if dmax < 0:
        raise ValueError(f"{name}: dmax should be non-negative, got dmax={dmax}")
    if rmin < 0:
        raise ValueError(f"{name}: rmin should be non-negative, got rmin={rmin}")
    return rmin, rmax, dmax
