"""Initializers, regularizers and constraints by name or callable, with Keras' meanings and defaults.

Keras lets each BN parameter and statistic have an initializer, gamma/beta a
regularizer (a term added to the training loss) and a constraint (a projection
applied after each optimizer step). PyTorch has no such slots; these small
registries give normkit.BatchNorm and normkit.keras.BatchNormalization the same
vocabulary, and ``regularization_loss``/``apply_constraints`` collect them over a model.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Callable

import numpy as np
import torch
from torch import nn

EPSILON = 1e-7  # Keras' backend.epsilon(), used by its norm constraints


def check_process_group(process_group, name: str = "process_group"):
    """``process_group`` as given: None (the default group) or a torch.distributed group, an opaque handle. Refused:
    the two usual mistakes, a backend name (``"nccl"``) or the ranks themselves (``[0, 1]``), which were taken
    unchecked and failed inside torch.distributed at the first synchronized training step. (An int is refused but
    for torch.distributed's own ``GroupMember.NON_GROUP_MEMBER``, -100, which ``dist.new_group`` returns to the
    processes outside the group, and which a layer takes to mean it normalizes alone.)"""
    outsider = getattr(getattr(torch.distributed, "GroupMember", None), "NON_GROUP_MEMBER", None)
    if (isinstance(process_group, (str, bytes, numbers.Number, tuple, list))
            and not (type(process_group) is int and process_group == outsider)):
        raise TypeError(f"{name} must be None (the default group) or a torch.distributed process group, got "
                        f"{type(process_group).__name__} {process_group!r}; the backend is chosen by "
                        "dist.init_process_group(backend), a group of ranks is dist.new_group(ranks)")
    return process_group


# ----------------------------------------------------------------------------- initializers


def _within_range(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``; finite values beyond its range are a ValueError (the cast made them inf without a
    word, and an inf gamma or variance is NaN at the first step)."""
    cast = values.to(dtype)
    if cast.is_floating_point() and values.is_floating_point() and bool(
            torch.isfinite(values).all()) and not bool(torch.isfinite(cast).all()):
        raise ValueError(f"values beyond {dtype}'s range (largest {torch.finfo(dtype).max:.4g}); give values "
                         "within it")
    return cast


class Constant:
    """Initializer that fills with ``value`` (Keras' ``Constant``): a number, or values that broadcast to the
    weight's shape (one per feature), as Keras' ``value * ones(shape)`` takes them: a list, a NumPy array, or
    Keras' serialized array ``{"class_name": "__numpy__", ...}`` (kept as given, for ``keras_config``)."""

    def __init__(self, value=0.0):
        # (a Keras layer with Constant([...]) failed to port: "float() argument must be ... not 'list'")
        self._values = None
        if isinstance(value, dict) and value.get("class_name") == "__numpy__" and isinstance(value.get("config"), dict):
            self._values = torch.as_tensor(np.asarray(value["config"].get("value"), dtype=np.float64))
            self.value = value
        elif isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            values = torch.as_tensor(array.astype(np.float64))
            if values.dim() == 0:
                self.value = float(values)
            else:
                self._values = values
                # (as Keras serializes it: a list as a list, an array as its "__numpy__" dict)
                self.value = values.tolist() if isinstance(value, (list, tuple)) else {
                    "class_name": "__numpy__", "config": {"value": values.tolist(), "dtype": str(array.dtype)}}
        else:
            self.value = float(value)

    def __call__(self, shape, dtype=None):
        if self._values is None:
            # (float64 first, then checked: torch.full raised a RuntimeError for a value beyond the dtype's range)
            return _within_range(torch.full(tuple(shape), self.value, dtype=torch.float64), dtype or torch.float32)
        try:
            values = torch.broadcast_to(self._values, tuple(shape))
        except RuntimeError:
            raise ValueError(f"Constant's values of shape {tuple(self._values.shape)} do not broadcast to the "
                             f"weight's shape {tuple(shape)}") from None
        return _within_range(values, dtype or torch.float32).clone()

    def keras_config(self):
        return "Constant", {"value": self.value}

    def __repr__(self):
        return f"Constant({self.value})"


def _seed_of(seed):
    """The int seeding torch's generator for Keras' ``seed``: None, an int, or a ``keras.random.SeedGenerator`` as
    Keras 3 writes one (``{"class_name": "SeedGenerator", "config": {"seed": 3, ...}}``), which failed at the build
    ("int() argument must be ... not 'dict'"). Anything else is refused here, when the initializer is made."""
    if isinstance(seed, dict) and seed.get("class_name") == "SeedGenerator" and isinstance(seed.get("config"), dict):
        seed = seed["config"].get("seed")
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        return None if seed is None else int(seed)
    raise ValueError(f"seed must be None, an int or a Keras SeedGenerator's config, got {seed!r}")


class _SeededDraw:
    """A random initializer with Keras' parameters; ``seed`` seeds a torch generator (Keras' own
    random stream is not reproduced: ported models load their weights, not their initial draws)."""

    keras_name = ""

    def __init__(self, seed=None, **parameters):
        self.seed = seed  # (as given: keras_config writes it back)
        self._torch_seed = _seed_of(seed)
        self.parameters = {name: float(value) for name, value in parameters.items()}

    def __call__(self, shape, dtype=None):
        values = torch.empty(tuple(shape), dtype=torch.float64)
        generator = None if self._torch_seed is None else torch.Generator().manual_seed(self._torch_seed)
        self._fill(values, generator, **self.parameters)
        return values.to(dtype or torch.float32)

    def fill_(self, tensor):
        """Draw into ``tensor`` in place from torch's global generator (the unseeded named initializers)."""
        self._fill(tensor, None, **self.parameters)
        return tensor

    def _fill(self, values, generator, **parameters):
        raise NotImplementedError

    def keras_config(self):
        return self.keras_name, {**self.parameters, "seed": self.seed}

    def __repr__(self):
        items = ", ".join(f"{k}={v}" for k, v in {**self.parameters, "seed": self.seed}.items())
        return f"{type(self).__name__}({items})"


class RandomNormal(_SeededDraw):
    """Keras' RandomNormal: normal values with ``mean`` and ``stddev`` (torch's generator, seeded if given)."""
    keras_name = "RandomNormal"

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        super().__init__(seed, mean=mean, stddev=stddev)

    def _fill(self, values, generator, mean, stddev):
        values.normal_(mean, stddev, generator=generator)


class RandomUniform(_SeededDraw):
    """Keras' RandomUniform: uniform values in [minval, maxval) (torch's generator, seeded if given)."""
    keras_name = "RandomUniform"

    def __init__(self, minval=-0.05, maxval=0.05, seed=None):
        super().__init__(seed, minval=minval, maxval=maxval)

    def _fill(self, values, generator, minval, maxval):
        values.uniform_(minval, maxval, generator=generator)


class TruncatedNormal(_SeededDraw):
    """Normal values redrawn until within two standard deviations of the mean (Keras' TruncatedNormal)."""

    keras_name = "TruncatedNormal"

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        super().__init__(seed, mean=mean, stddev=stddev)

    def _fill(self, values, generator, mean, stddev):
        nn.init.trunc_normal_(values, mean, stddev, mean - 2 * stddev, mean + 2 * stddev, generator=generator)


def _fans(shape, input_axes=None, output_axes=None):
    """Keras' ``compute_fans``: (fan_in, fan_out) of a weight shape (a 1-D weight: its length, both ways)."""
    if input_axes is not None and output_axes is not None:
        return math.prod(shape[a] for a in input_axes), math.prod(shape[a] for a in output_axes)
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


class VarianceScaling(_SeededDraw):
    """Keras' ``VarianceScaling``: spread ``scale / n`` with n the fan of ``mode`` (fan_in, fan_out, fan_avg).

    truncated_normal: stddev ``sqrt(scale / n) / 0.8796...`` cut at two stddevs; untruncated_normal:
    stddev ``sqrt(scale / n)``; uniform: within ``+-sqrt(3 scale / n)``. Its presets (GlorotUniform,
    HeNormal, ...) are the subclasses below.
    """

    keras_name = "VarianceScaling"
    MODES = ("fan_in", "fan_out", "fan_avg")
    DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")

    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal", seed=None, input_axes=None,
                 output_axes=None):
        # Keras reads the distribution in any case and "normal" as its old name of "truncated_normal" (and writes
        # the name it settled on back to its config); both were refused here.
        if isinstance(distribution, str):
            distribution = distribution.lower()
            distribution = "truncated_normal" if distribution == "normal" else distribution
        if mode not in self.MODES or distribution not in self.DISTRIBUTIONS or not scale > 0:
            raise ValueError(f"VarianceScaling needs scale > 0, mode in {self.MODES} and distribution in "
                             f"{self.DISTRIBUTIONS}; got scale={scale!r}, mode={mode!r}, distribution={distribution!r}")
        super().__init__(seed, scale=scale)
        self.mode, self.distribution, self.input_axes, self.output_axes = mode, distribution, input_axes, output_axes

    def _fill(self, values, generator, scale):
        fan_in, fan_out = _fans(tuple(values.shape), self.input_axes, self.output_axes)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        scale = scale / max(1.0, fan)
        if self.distribution == "truncated_normal":
            stddev = math.sqrt(scale) / 0.87962566103423978  # the stddev of a unit normal cut at +-2
            nn.init.trunc_normal_(values, 0.0, stddev, -2 * stddev, 2 * stddev, generator=generator)
        elif self.distribution == "untruncated_normal":
            values.normal_(0.0, math.sqrt(scale), generator=generator)
        else:
            limit = math.sqrt(3.0 * scale)
            values.uniform_(-limit, limit, generator=generator)

    def keras_config(self):
        axes = {"input_axes": self.input_axes, "output_axes": self.output_axes}
        if type(self) is VarianceScaling:
            return self.keras_name, {"scale": self.parameters["scale"], "mode": self.mode,
                                     "distribution": self.distribution, "seed": self.seed, **axes}
        return self.keras_name, {"seed": self.seed, **axes}


def _preset(keras_name: str, scale: float, mode: str, distribution: str) -> type:
    def __init__(self, seed=None, input_axes=None, output_axes=None):
        VarianceScaling.__init__(self, scale, mode, distribution, seed, input_axes, output_axes)
    doc = f"Keras' ``{keras_name}``: VarianceScaling(scale={scale}, mode={mode!r}, distribution={distribution!r})."
    return type(keras_name, (VarianceScaling,), {"__init__": __init__, "keras_name": keras_name, "__doc__": doc})


GlorotUniform = _preset("GlorotUniform", 1.0, "fan_avg", "uniform")
GlorotNormal = _preset("GlorotNormal", 1.0, "fan_avg", "truncated_normal")
LecunUniform = _preset("LecunUniform", 1.0, "fan_in", "uniform")
LecunNormal = _preset("LecunNormal", 1.0, "fan_in", "truncated_normal")
HeUniform = _preset("HeUniform", 2.0, "fan_in", "uniform")
HeNormal = _preset("HeNormal", 2.0, "fan_in", "truncated_normal")

# The named initializers, Keras' defaults: in place on the parameter, from torch's global generator.
_DEFAULT_DRAWS = {"random_normal": RandomNormal(), "random_uniform": RandomUniform(),
                  "truncated_normal": TruncatedNormal(), "variance_scaling": VarianceScaling(),
                  "glorot_uniform": GlorotUniform(), "glorot_normal": GlorotNormal(),
                  "lecun_uniform": LecunUniform(), "lecun_normal": LecunNormal(),
                  "he_uniform": HeUniform(), "he_normal": HeNormal()}
# Keras 3's short aliases: "zero", "one", "uniform" (RandomUniform) and "normal" (RandomNormal).
_ALIASES = {"zero": "zeros", "one": "ones", "uniform": "random_uniform", "normal": "random_normal"}
INITIALIZERS: dict[str, Callable] = {
    "zeros": lambda t: t.zero_(),
    "ones": lambda t: t.fill_(1.0),
    **{name: draw.fill_ for name, draw in _DEFAULT_DRAWS.items()},
}
INITIALIZERS.update({alias: INITIALIZERS[name] for alias, name in _ALIASES.items()})


def _case_hint(value: str, names) -> str:
    """Names match exactly, as Keras' do ("zeros" or "Zeros", never "ZEROS"): say so where only the case is off."""
    close = [known for known in names if known.lower() == value.lower()]
    return f" (names are case-sensitive, as in Keras: {close[0]!r})" if close else ""


def resolve_initializer(initializer, *, name: str):
    """A name from INITIALIZERS, a number (constant), the values (an array or tensor, as Keras takes them; broadcast
    as Constant's), Keras' serialized dict, a class (made with no arguments, as Keras does), or a callable
    ``(shape, dtype) -> array``."""
    if isinstance(initializer, str):
        if initializer in KERAS_CLASSES["initializer"]:  # Keras also takes class names: "RandomNormal", "HeUniform"
            return KERAS_CLASSES["initializer"][initializer]()
        if initializer not in INITIALIZERS:
            raise ValueError(f"{name}={initializer!r} is not a known initializer; use one of "
                             f"{sorted(INITIALIZERS)}{_case_hint(initializer, INITIALIZERS)}, a Keras class name "
                             f"({', '.join(sorted(KERAS_CLASSES['initializer']))}), a number, or a "
                             "callable(shape, dtype)")
        return initializer
    if isinstance(initializer, (int, float)) and not isinstance(initializer, bool):
        return Constant(initializer)
    if isinstance(initializer, torch.Tensor):  # Keras takes a tensor or an array as the values themselves
        initializer = initializer.detach().cpu().numpy()
    if isinstance(initializer, (np.ndarray, np.generic)):
        return Constant(initializer)
    if isinstance(initializer, dict):
        return from_keras_object("initializer", initializer, name=name)
    if isinstance(initializer, type):
        return _instance_of(initializer, name=name)
    if callable(initializer):
        return initializer
    raise TypeError(f"{name} must be a name, a number, a Keras config dict or a callable(shape, dtype), "
                    f"got {initializer!r}")


def _instance_of(cls: type, *, name: str):
    """A class given for an initializer, regularizer or constraint: Keras' ``get`` makes one with no arguments
    (``gamma_constraint=NonNeg``). Taken as a callable, the class itself was called on the weight at the first
    step (``NonNeg(weight)``: "takes no arguments"; ``L2(weight)``: the weight as the factor)."""
    try:
        return cls()
    except TypeError as error:
        raise TypeError(f"{name}={cls.__name__}: a class is made with no arguments, as Keras does, and this one "
                        f"cannot be ({error}); pass an instance") from None


def apply_initializer(initializer, tensor: torch.Tensor, *, name: str = "initializer") -> None:
    """Fill ``tensor`` in place from a resolved initializer (``name``: the argument it came from, for errors)."""
    if isinstance(initializer, str):
        INITIALIZERS[initializer](tensor)
        return
    try:
        values = initializer(tuple(tensor.shape), tensor.dtype)
    except (ValueError, RuntimeError) as error:
        # (the initializer's own words, Constant's or torch's, named no argument)
        raise ValueError(f"{name}={initializer!r} failed for a weight of shape {tuple(tensor.shape)} and dtype "
                         f"{tensor.dtype}: {error}") from error
    except TypeError as error:
        # (a Keras-style callable, given a dtype name by Keras, failed on torch's with NumPy's "Cannot interpret
        # 'torch.float32' as a data type", naming neither the initializer nor its arguments)
        raise TypeError(f"initializer {getattr(initializer, '__name__', initializer)!r} failed when called as "
                        f"initializer(shape={tuple(tensor.shape)}, dtype={tensor.dtype}): {error}. The dtype is a "
                        "torch dtype (Keras passes a name: a Keras-style initializer can take "
                        "str(dtype).removeprefix('torch.'))") from error
    try:
        values = _within_range(torch.as_tensor(values), tensor.dtype).to(tensor.device)
    except ValueError as error:
        raise ValueError(f"{name}={initializer!r} gives {error}") from None
    if values.shape != tensor.shape:
        raise ValueError(f"initializer {initializer!r} returned shape {tuple(values.shape)}, "
                         f"expected {tuple(tensor.shape)}")
    tensor.copy_(values)


# ----------------------------------------------------------------------------- regularizers


def _widened(weight: torch.Tensor) -> torch.Tensor:
    """A float16/bfloat16 weight as float32 (a differentiable cast), others as they are: a half-precision layer's
    sum of squares overflowed float16 (4096 gammas of 4 pass 65504), so the L2 term was inf and a norm constraint
    wrote NaN or 0 into every weight. float32 and float64 weights are computed as before (same bits)."""
    return weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight


class L1L2:
    """``l1 * sum(|w|) + l2 * sum(w^2)``, Keras' L1L2 (``"l1"``/``"l2"`` use 0.01)."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        # None is Keras' "the default" (0 here; L1's and L2's own 0.01 there): a config may hold it.
        l1, l2 = 0.0 if l1 is None else l1, 0.0 if l2 is None else l2
        # (Keras' validate_float_arg: NaN fails every comparison, so `l1 < 0` alone let it through, and a NaN or
        # infinite factor made every loss NaN or inf; a factor that is no number is its ValueError too, not the
        # comparison's TypeError)
        if not all(isinstance(factor, numbers.Real) and 0 <= factor < math.inf for factor in (l1, l2)):
            raise ValueError(f"regularization factors must be finite numbers >= 0 (Keras' non-negative floats), "
                             f"got l1={l1}, l2={l2}")
        self.l1, self.l2 = float(l1), float(l2)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        weight = _widened(weight)  # (a half-precision weight's term in float32: see _widened)
        loss = weight.new_zeros(())
        if self.l1:
            loss = loss + self.l1 * weight.abs().sum()
        if self.l2:
            loss = loss + self.l2 * weight.square().sum()
        return loss

    def keras_config(self):
        # Keras writes back the class it was given (an L1L2 with one factor 0 stays L1L2), so each class here
        # writes its own; guessing the class from the factors turned L1L2(0.01, 0) into L1 and L2(0) into L1L2.
        return "L1L2", {"l1": self.l1, "l2": self.l2}

    def __repr__(self):
        kind, config = self.keras_config()
        return f"{kind}({', '.join(f'{key}={value}' for key, value in config.items())})"


class L1(L1L2):
    """``l1 * sum(|w|)`` (Keras' L1; its argument name)."""

    def __init__(self, l1: float = 0.01):
        super().__init__(l1=0.01 if l1 is None else l1)

    def keras_config(self):
        return "L1", {"l1": self.l1}


class L2(L1L2):
    """``l2 * sum(w^2)`` (Keras' L2; its argument name)."""

    def __init__(self, l2: float = 0.01):
        super().__init__(l2=0.01 if l2 is None else l2)

    def keras_config(self):
        return "L2", {"l2": self.l2}


# "l1_l2" is tf.keras' (both factors 0.01); "l1l2" is Keras 3's snake-case name of L1L2, whose factors default to 0.
REGULARIZERS = {"l1": lambda: L1(), "l2": lambda: L2(), "l1_l2": lambda: L1L2(0.01, 0.01), "l1l2": lambda: L1L2()}


def resolve_regularizer(regularizer, *, name: str):
    """None, ``"l1"``/``"l2"`` (factor 0.01, as Keras), ``"l1_l2"`` (tf.keras': 0.01 each; Keras 3 refuses the name), ``"l1l2"`` (Keras 3: factors 0), Keras' serialized dict, or a callable ``weight -> scalar``."""
    return _resolve("regularizer", regularizer, REGULARIZERS, "callable(weight) -> scalar tensor", name=name)


def _resolve(kind: str, value, registry: dict, signature: str, *, name: str):
    """None, a name of ``registry`` (a new object), Keras' serialized dict, or a callable, as given."""
    if value is None:
        return None
    if isinstance(value, str):
        if value in KERAS_CLASSES[kind]:  # Keras also takes class names: "NonNeg", "L1L2"
            return KERAS_CLASSES[kind][value]()
        if value not in registry:
            raise ValueError(f"{name}={value!r} is not a known {kind}; use one of {sorted(registry)}"
                             f"{_case_hint(value, registry)}, a Keras class name "
                             f"({', '.join(sorted(KERAS_CLASSES[kind]))}), Keras' serialized dict or a {signature}")
        return registry[value]()
    if isinstance(value, dict):
        return from_keras_object(kind, value, name=name)
    if isinstance(value, type):
        return _instance_of(value, name=name)
    if callable(value):
        return value
    raise TypeError(f"{name} must be None, a name, a Keras config dict or a {signature}, got {value!r}")


# ----------------------------------------------------------------------------- constraints


class NonNeg:
    """Clamp to >= 0 (Keras' ``NonNeg``)."""

    def __call__(self, w):
        return w.clamp(min=0.0)

    def keras_config(self):
        return "NonNeg", {}


class MinMaxNorm:
    """Rescale so the L2 norm over ``axis`` lies in [min_value, max_value] (Keras' MinMaxNorm/MaxNorm/UnitNorm).

    ``w * ((rate * clip(norm, min, max) + (1 - rate) * norm) / (eps + norm))``
    """

    def __init__(self, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis: int = 0):
        self.min_value, self.max_value, self.rate, self.axis = float(min_value), float(max_value), float(rate), axis

    def __call__(self, w):
        wide = _widened(w)  # (computed in float32 for a half-precision weight, given back in its dtype)
        norms = wide.square().sum(dim=self.axis, keepdim=True).sqrt()
        desired = self.rate * norms.clamp(self.min_value, self.max_value) + (1 - self.rate) * norms
        # Keras' grouping: the factor first, then one product (w * desired / (eps + norm) rounded twice on w,
        # and differed from Keras' projection in the last bits for most weights)
        return (wide * (desired / (EPSILON + norms))).to(w.dtype)

    def keras_config(self):
        return "MinMaxNorm", {"min_value": self.min_value, "max_value": self.max_value, "rate": self.rate,
                              "axis": self.axis}


class MaxNorm(MinMaxNorm):
    """Rescale so the L2 norm over ``axis`` is at most ``max_value`` (Keras' MaxNorm): MinMaxNorm(0, max, 1)."""

    def __init__(self, max_value: float = 2.0, axis: int = 0):
        super().__init__(0.0, max_value, 1.0, axis)

    def keras_config(self):
        return "MaxNorm", {"max_value": self.max_value, "axis": self.axis}


class UnitNorm:
    """Divide by the L2 norm over ``axis`` (Keras' ``UnitNorm``): ``w / (eps + ||w||)``."""

    def __init__(self, axis: int = 0):
        self.axis = axis

    def __call__(self, w):
        wide = _widened(w)  # (computed in float32 for a half-precision weight, given back in its dtype)
        return (wide / (EPSILON + wide.square().sum(dim=self.axis, keepdim=True).sqrt())).to(w.dtype)

    def keras_config(self):
        return "UnitNorm", {"axis": self.axis}


CONSTRAINTS = {"non_neg": NonNeg, "unit_norm": UnitNorm, "max_norm": MaxNorm, "min_max_norm": MinMaxNorm}


def resolve_constraint(constraint, *, name: str):
    """None, a name from CONSTRAINTS (Keras defaults), Keras' serialized dict, or a callable ``weight -> projected weight``."""
    return _resolve("constraint", constraint, CONSTRAINTS, "callable(weight) -> weight", name=name)


# ----------------------------------------------------------------------------- Keras' serialized form

# Keras writes these objects as {"module": ..., "class_name": ..., "config": {...}, "registered_name": None}.
KERAS_MODULES = {"initializer": "keras.initializers", "regularizer": "keras.regularizers",
                 "constraint": "keras.constraints"}
KERAS_CLASSES = {
    "initializer": {"Zeros": lambda: "zeros", "Ones": lambda: "ones", "Constant": Constant,
                    **{cls.keras_name: cls for cls in (RandomNormal, RandomUniform, TruncatedNormal, VarianceScaling,
                                                       GlorotUniform, GlorotNormal, LecunUniform, LecunNormal,
                                                       HeUniform, HeNormal)}},
    "regularizer": {"L1": L1, "L2": L2, "L1L2": L1L2},
    "constraint": {"NonNeg": NonNeg, "UnitNorm": UnitNorm, "MaxNorm": MaxNorm, "MinMaxNorm": MinMaxNorm},
}
# What each name of this module is, in Keras' terms.
_KERAS_NAMES = {
    "initializer": {"zeros": ("Zeros", {}), "ones": ("Ones", {}),
                    **{name: draw.keras_config() for name, draw in _DEFAULT_DRAWS.items()}},
}
_KERAS_NAMES["initializer"].update({alias: _KERAS_NAMES["initializer"][name] for alias, name in _ALIASES.items()})


def from_keras_object(kind: str, serialized: dict, *, name: str):
    """The normkit object for Keras' serialized ``{"class_name": ..., "config": {...}}`` of an initializer,
    regularizer or constraint (``kind``)."""
    class_name = serialized.get("class_name")
    classes = KERAS_CLASSES[kind]
    if class_name not in classes:
        raise ValueError(f"{name}: Keras {kind} {class_name!r} is not one normkit knows; use one of "
                         f"{sorted(classes)}, a name, or a callable")
    config = serialized.get("config") or {}
    try:
        return classes[class_name](**config)
    except (TypeError, ValueError) as error:
        # (a value the class refuses, "could not convert string to float: 'x'", named neither the argument nor
        # the class: a layer has eight such objects)
        raise ValueError(f"{name}: the config {config!r} of Keras' {class_name} does not fit ({error}); give "
                         f"the arguments Keras' {class_name} takes, with valid values") from None


def _keras_base(kind: str):
    """Keras' base class of ``kind`` objects where Keras is already imported (never imported here), else None."""
    keras = sys.modules.get("keras")
    module = getattr(keras, {"initializer": "initializers", "regularizer": "regularizers",
                             "constraint": "constraints"}[kind], None)
    return getattr(module, {"initializer": "Initializer", "regularizer": "Regularizer",
                            "constraint": "Constraint"}[kind], None)


def to_keras_object(kind: str, value, *, name: str):
    """``value`` (as given to a layer: None, a name, a number, a Keras dict or a normkit object) in Keras'
    serialized form, which ``keras.layers.BatchNormalization.from_config`` loads."""
    if value is None:
        return None
    resolved = {"initializer": resolve_initializer, "regularizer": resolve_regularizer,
                "constraint": resolve_constraint}[kind](value, name=name)
    if isinstance(resolved, str):  # an initializer's name
        class_name, config = _KERAS_NAMES[kind][resolved]
    elif type(resolved).__name__ in KERAS_CLASSES[kind] and callable(getattr(resolved, "get_config", None)):
        class_name, config = type(resolved).__name__, resolved.get_config()  # a Keras object, given as is
    elif _keras_base(kind) is not None and isinstance(resolved, _keras_base(kind)):
        # A Keras object of another class (a registered custom one, taken from a Keras layer by from_keras): Keras
        # serializes it, and loads it where its class is registered (it was refused as "a Python callable").
        import keras
        return keras.saving.serialize_keras_object(resolved)
    else:
        if not hasattr(resolved, "keras_config"):
            raise ValueError(f"{name}={value!r} is a Python callable, which Keras cannot load: give a name, "
                             f"a number or one of normkit.options' classes ({', '.join(sorted(KERAS_CLASSES[kind]))})")
        class_name, config = resolved.keras_config()
    return {"module": KERAS_MODULES[kind], "class_name": class_name, "config": dict(config), "registered_name": None}


# ----------------------------------------------------------------------------- model-wide helpers


def _check_model(model, caller: str) -> None:
    """As normkit.tools' functions check it ("'str' object has no attribute 'modules'" before)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every normkit layer's regularization terms in ``model``: add it to the training loss."""
    _check_model(model, "regularization_loss")
    terms = [m.regularization_loss() for m in model.modules() if hasattr(m, "weight_regularizer")]
    # (a Keras-vocabulary layer's activity regularizer: its latest call's term, which Keras' fit adds with model.losses)
    terms += [m._activity_loss for m in model.modules() if getattr(m, "_activity_loss", None) is not None]
    if not terms:
        return torch.zeros(())
    # Added, not stacked: a user's regularizer may return a term on another device (a CPU number), which a
    # 0-dim sum takes as a scalar where torch.stack refuses the mix.
    total = terms[0].reshape(())
    for term in terms[1:]:
        total = total + term.reshape(())
    return total


def apply_constraints(model: nn.Module) -> None:
    """Project every constrained normkit parameter in ``model`` (call after ``optimizer.step()``)."""
    _check_model(model, "apply_constraints")
    for module in model.modules():
        if hasattr(module, "weight_constraint"):
            module.apply_constraints()


def constrain_after_step(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Apply ``model``'s constraints after every ``optimizer.step()``; returns the hook handle (``.remove()``)."""
    # (checked now: a model that is no Module failed at the first step, an optimizer that is none with
    # "'str' object has no attribute 'register_step_post_hook'")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"constrain_after_step: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__} "
                        "(the arguments are (optimizer, model))")
    _check_model(model, "constrain_after_step")
    return optimizer.register_step_post_hook(lambda *_: _apply_constraints_after_step(optimizer, model))


def _apply_constraints_after_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Project what this step moved, as Keras' optimizer does after applying its gradients: the parameters of
    ``optimizer``'s groups that hold a gradient (read at each step, so groups added later count; a parameter
    without a gradient was skipped by the step, as Keras filters empty gradients)."""
    # (the whole model was projected: with one optimizer for the BN parameters and another for the rest, each hooked
    # to the model, every step of either projected every layer, so a MinMaxNorm with rate < 1, which is not
    # idempotent, was applied twice per iteration and to parameters neither step had moved)
    stepped = [parameter for group in optimizer.param_groups for parameter in group["params"]
               if parameter.grad is not None]
    stepped_ids = {id(parameter) for parameter in stepped}
    for module in model.modules():
        if not hasattr(module, "weight_constraint"):
            continue
        # (the Parameters that make weight and bias: a parametrized weight is not itself among the optimizer's;
        # a layer of another library with these options has its weight and bias)
        leaves = (module._affine_leaves() if hasattr(module, "_affine_leaves")
                  else [getattr(module, name, None) for name in ("weight", "bias")])
        if any(parameter is not None and id(parameter) in stepped_ids for parameter in leaves):
            module.apply_constraints(stepped)
