"""Keras' BatchNormalization vocabulary on a torch module: the one place Keras conventions live.

Conversions done here and nowhere else:

    Keras                          normkit / PyTorch
    momentum=0.99 (decay)          momentum = 1 - 0.99 (weight of the new batch)
    renorm_momentum=0.99           renorm_momentum = 1 - 0.99
    epsilon=1e-3                   eps
    moving_variance (biased)       running_var with unbiased_running_var=False
    gamma, beta                    weight, bias
    moving_mean, moving_variance   running_mean, running_var
    center=False / scale=False     bias / weight absent
    trainable=False                freeze(): inference mode, nothing updated or trained
    axis=-1 (channels last)        BatchNorm(axis=-1)

The number of features is inferred on the first call (or ``build(input_shape)``), as
Keras does; until then gamma and beta are uninitialized parameters (as in torch.nn's lazy
layers), so an optimizer made before the first call trains them.

Porting: ``from_keras(keras_layer)`` (or ``from_keras_config(config, build_config, weights)``
with what a Keras layer's ``get_config()``, ``get_build_config()`` and ``get_weights()`` return)
gives the same layer here; ``layer.keras_config()`` is this layer as Keras' ``get_config()``
writes it, and ``to_keras(layer)`` builds the Keras layer (Keras needed for that one only).
``load_batch_norms("model.keras")`` takes every BN layer of a saved Keras model (Keras 3 or tf.keras 2, ``.keras``
or legacy ``.h5``), without Keras.
"""

from __future__ import annotations

import contextlib
import decimal
import inspect
import itertools
import json
import math
import numbers
import re
import sys
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .axes import broadcasts_to, canonicalize_axes, check_feature_axes
from .functional import LOW_PRECISION, _tracing_state, check_floating
from .modules import (BatchNorm, _deepcopy_sharing_group, _fx_call_module, _refuse_torchscript, check_adjustment,
                      check_ghost_layout, check_virtual_batch_size, warn_group_without_synchronized)
from .options import (check_process_group, resolve_constraint, resolve_initializer, resolve_regularizer,
                      to_keras_object)
from .stats import RenormClipping

__all__ = ["BatchNormalization", "from_keras", "from_keras_config", "load_batch_norms", "to_keras"]

# Keras dtype policies -> (dtype of the variables, dtype inputs are cast to and outputs come in).
# A mixed policy keeps float32 variables and casts inputs to half precision; the math is float32 either way (as Keras).
_POLICIES = {"float32": (torch.float32, torch.float32), "float64": (torch.float64, torch.float64),
             "float16": (torch.float16, torch.float16), "bfloat16": (torch.bfloat16, torch.bfloat16),
             "mixed_float16": (torch.float32, torch.float16), "mixed_bfloat16": (torch.float32, torch.bfloat16)}


def _policy_name(dtype) -> Optional[str]:
    """Keras' policy name for a ``dtype`` argument: a policy name or DTypePolicy, a torch or NumPy dtype, or None."""
    if dtype is None:
        return None
    if isinstance(dtype, dict):  # Keras 3 writes {"class_name": "DTypePolicy", "config": {"name": "float32"}}
        config = dtype.get("config")
        dtype = config.get("name") if isinstance(config, dict) else config
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    elif isinstance(getattr(dtype, "name", None), str) and not isinstance(dtype, str):
        # A Keras DTypePolicy object (keras.DTypePolicy("mixed_float16")), which Keras' layers take as their dtype:
        # its name is the policy's. (Looked up as it was, it failed with "unhashable type: 'DTypePolicy'".)
        dtype = dtype.name
    elif isinstance(dtype, type) and issubclass(dtype, np.generic):
        dtype = np.dtype(dtype).name  # (np.float64, which Keras takes as it takes "float64")
    if not isinstance(dtype, str) or dtype not in _POLICIES:
        raise ValueError(f"dtype must be a torch floating dtype or a Keras dtype policy name, one of "
                         f"{sorted(_POLICIES)}; got {dtype!r}")
    return dtype


def _from_numpy(value) -> np.ndarray:
    """An array torch can read: Keras' bfloat16 arrays (ml_dtypes' type, unknown to torch) as float32, exactly. A
    tensor (another layer's ``weights``, as Keras' set_weights takes variables) is read detached, on the CPU, a
    bfloat16 one as float32: NumPy refused one that requires grad, lives on a GPU, or is bfloat16."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.float() if value.dtype == torch.bfloat16 else value
    value = np.asarray(value)
    if value.dtype.kind == "V" or value.dtype.type.__module__.startswith("ml_dtypes"):
        return value.astype(np.float32)
    return value


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A weight as Keras returns it: bfloat16 as ml_dtypes' bfloat16 (Keras' own type) when installed, else float32."""
    tensor = tensor.detach().cpu()
    if tensor.dtype != torch.bfloat16:
        return tensor.numpy().copy()
    values = tensor.float().numpy()
    try:
        import ml_dtypes
    except ImportError:
        return values  # (float32 holds every bfloat16 value exactly)
    return values.astype(ml_dtypes.bfloat16)


_NAME_UIDS: dict = {}


def _unique_name(base: str) -> str:
    """Keras' automatic layer names: ``base``, then ``base_1``, ``base_2``, ... in this process. One shared
    name made every unnamed layer's to_keras()/keras_config() clash in a Keras model ("unique names")."""
    count = _NAME_UIDS.get(base, 0)
    _NAME_UIDS[base] = count + 1
    return f"{base}_{count}" if count else base


def _keras_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        # (a config with "center": "no" must not load as center=True)
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _keras_decay(value, name):
    # numbers.Real: NumPy scalars (np.float32(0.9)) are numbers too, and Keras takes them (float(momentum)).
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (Keras: the decay of the moving average), got {value!r}")
    return float(value)


def _keras_epsilon(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _keras_axis(value, name):
    axis = check_feature_axes(value)
    return axis if isinstance(axis, int) else list(axis)


def _keras_name(value, name):
    # Keras' rule for every layer's name (its Operation): a string without "/" (the separator of the weights' paths in
    # its files, and of nested layers' names). Unchecked, a number or None-like name reached the error messages and
    # get_config(), and load_batch_norms' lookups by name.
    if not isinstance(value, str) or "/" in value:
        raise ValueError(f"{name} must be a string and cannot contain the character '/' (Keras' rule), got {value!r} "
                         f"({type(value).__name__})")
    return value


def _keras_clipping(value, name):
    RenormClipping.from_dict(value, name=name)  # validate keys and values now, as Keras does
    return value


def _resolvable(resolve):
    """A check that the option resolves (by name or callable) and keeps it as given (get_config writes it back)."""
    def check(value, name):
        resolve(value, name=name)
        return value
    return check


# normkit.BatchNorm's initializer arguments by the Keras names this layer takes them as.
_INITIALIZER_NAMES = {"weight_initializer": "gamma_initializer", "bias_initializer": "beta_initializer",
                      "running_mean_initializer": "moving_mean_initializer",
                      "running_var_initializer": "moving_variance_initializer"}


# The check of each of the Keras layer's options, for the constructor's value and any later change.
_OPTION_CHECKS = {
    "axis": _keras_axis, "momentum": _keras_decay, "renorm_momentum": _keras_decay, "epsilon": _keras_epsilon,
    **{flag: _keras_flag for flag in ("center", "scale", "synchronized", "renorm", "trainable")},
    "renorm_clipping": _keras_clipping, "virtual_batch_size": check_virtual_batch_size, "name": _keras_name,
    "dtype_policy": lambda value, name: _policy_name(value),
    "ghost_layout": check_ghost_layout, "adjustment": check_adjustment, "process_group": check_process_group,
    **{name: _resolvable(resolve_initializer) for name in ("beta_initializer", "gamma_initializer",
                                                           "moving_mean_initializer", "moving_variance_initializer")},
    **{name: _resolvable(resolve_regularizer) for name in ("beta_regularizer", "gamma_regularizer",
                                                           "activity_regularizer")},
    **{name: _resolvable(resolve_constraint) for name in ("beta_constraint", "gamma_constraint")},
}


def _new_value_weight(decay: float) -> float:
    """PyTorch's momentum (the weight of the new value) for Keras' ``decay``: 1 - decay, taken in decimal so
    that 0.99 gives 0.01, not 0.010000000000000009 (9e-16 apart, relatively; repr and config show what was
    meant). Where the two differ by more than 1e-12 relatively (decays within ~1e-4 of 1, whose shortest decimal
    form is coarse next to the float: 1 - 2**-53 would give 1e-16, not 1.1e-16), the float difference, which
    is what Keras multiplies by."""
    try:
        exact = 1.0 - float(decay)
        written = float(decimal.Decimal(1) - decimal.Decimal(repr(float(decay))))
    except (TypeError, ValueError, decimal.InvalidOperation, OverflowError):
        return 1.0 - decay  # (the layer's own checks name a value that is not a number)
    return written if abs(written - exact) <= 1e-12 * abs(exact) else exact


class BatchNormalization(nn.Module):
    """Keras 3's ``BatchNormalization`` (and tf.keras' extra options) as a torch module.

    Arguments and defaults are Keras' verbatim. ``forward(x, training=None, mask=None)``:
    ``training=None`` follows ``module.train()``/``eval()``; ``mask`` has one dimension
    fewer than ``x`` and is expanded at the last axis, as in Keras. Moving statistics move
    only when training and trainable:

        moving_mean     <- moving_mean * momentum + mean * (1 - momentum)
        moving_variance <- moving_variance * momentum + var * (1 - momentum)   (biased var)

    ``get_weights()``/``set_weights()`` exchange NumPy arrays in Keras' order: gamma, beta,
    moving_mean, moving_variance (then moving_stddev, renorm_mean, renorm_stddev with
    renorm); absent ones (scale/center False) are skipped, as Keras does.
    """

    def __init__(self, axis=-1, momentum: float = 0.99, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, beta_constraint=None, gamma_constraint=None, synchronized: bool = False,
                 renorm: bool = False, renorm_clipping: Optional[dict] = None, renorm_momentum: float = 0.99,
                 virtual_batch_size: Optional[int] = None, adjustment=None, fused: Optional[bool] = None,
                 trainable: bool = True, name: Optional[str] = None, *, ghost_layout: str = "strided",
                 process_group=None, dtype=None, device=None, activity_regularizer=None):
        super().__init__()
        if fused:
            # tf.keras refuses the fused kernel with these options; normkit keeps the same contract.
            for option, value in (("renorm", renorm), ("virtual_batch_size", virtual_batch_size),
                                  ("adjustment", adjustment)):
                if value:
                    raise ValueError(f"fused=True is not supported with {option}; leave fused=None")
        # Every option goes through __setattr__'s checks (the same ones guard a change later).
        self.axis = axis
        self.momentum, self.epsilon = momentum, epsilon
        self.center, self.scale = center, scale
        self.beta_initializer, self.gamma_initializer = beta_initializer, gamma_initializer
        self.moving_mean_initializer, self.moving_variance_initializer = moving_mean_initializer, moving_variance_initializer
        self.beta_regularizer, self.gamma_regularizer = beta_regularizer, gamma_regularizer
        self.beta_constraint, self.gamma_constraint = beta_constraint, gamma_constraint
        self.synchronized = synchronized
        self.renorm = renorm
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = renorm_momentum
        self.virtual_batch_size = virtual_batch_size
        self.adjustment = adjustment
        self.fused = fused
        self.ghost_layout = ghost_layout
        self.name = _unique_name("batch_normalization") if name is None else name  # (Keras: only None is auto-named)
        self.process_group = process_group
        warn_group_without_synchronized(self, process_group, synchronized)
        self.activity_regularizer = activity_regularizer
        self._factory = {"dtype": None, "device": device}
        self.dtype_policy = dtype  # (the compute dtype, and the variables' dtype for the build)
        self.bn: Optional[BatchNorm] = None
        self._build_shape: Optional[tuple] = None
        self._add_pending_parameters()
        self.trainable = trainable

    __prepare_scriptable__ = _refuse_torchscript

    def __deepcopy__(self, memo):
        return _deepcopy_sharing_group(self, memo)  # (its process_group is shared by the copy, not copied)

    def __getstate__(self):
        # The last call's activity term belongs to that call's graph: a copy or pickle has made no call yet (and torch
        # refuses to deepcopy or pickle a tensor computed with autograd).
        state = super().__getstate__()
        state["_activity_loss"] = None
        return state

    # -- options ----------------------------------------------------------------------------------

    # Keras reads these on every call, so a change on a built layer takes effect: it reaches the
    # BatchNorm underneath as (its name there, the conversion to PyTorch's convention).
    _LIVE_OPTIONS = {
        "momentum": ("momentum", lambda decay: _new_value_weight(decay)), "epsilon": ("eps", None),
        "renorm_momentum": ("renorm_momentum", lambda decay: _new_value_weight(decay)),
        "virtual_batch_size": ("virtual_batch_size", None), "ghost_layout": ("ghost_layout", None),
        "adjustment": ("adjustment", None), "synchronized": ("synchronized", None),
        "process_group": ("process_group", None),
        "gamma_initializer": ("weight_initializer", None), "beta_initializer": ("bias_initializer", None),
        "moving_mean_initializer": ("running_mean_initializer", None),
        "moving_variance_initializer": ("running_var_initializer", None),
        "gamma_regularizer": ("weight_regularizer", None), "beta_regularizer": ("bias_regularizer", None),
        "gamma_constraint": ("weight_constraint", None), "beta_constraint": ("bias_constraint", None),
    }
    # These shape the weights, so they are fixed once the layer is built.
    _BUILD_OPTIONS = frozenset({"axis", "center", "scale"})

    def __setattr__(self, name, value):
        check = _OPTION_CHECKS.get(name)
        if check is not None:
            value = check(value, name)
        inner = self.__dict__.get("_modules", {}).get("bn")
        if inner is not None and name in self._BUILD_OPTIONS and value != getattr(self, name):
            raise ValueError(f"{self.name} is built: {name} is fixed by its weights' shapes (set it before the first "
                             "call or build(), or make a new layer)")
        super().__setattr__(name, value)
        if name == "activity_regularizer":
            # (the callable each call applies to its output; the term of a call made before the change is dropped)
            self.__dict__["_activity"] = resolve_regularizer(value, name=name)
            self.__dict__["_activity_loss"] = None
        if name in ("center", "scale") and inner is None and "_factory" in self.__dict__:
            self._add_pending_parameters()  # (the constructor adds them once both are set)
        if name == "dtype_policy":
            # As Keras' dtype_policy setter: the compute dtype changes at once; variables keep the dtype they
            # were built with (an unbuilt layer builds them in the new policy's).
            variables, self._compute_dtype = _POLICIES[value] if value else (None, None)
            if inner is None:
                self._factory["dtype"] = variables
        if inner is None:
            return
        if name in self._LIVE_OPTIONS:
            target, convert = self._LIVE_OPTIONS[name]
            setattr(inner, target, value if convert is None else convert(value))
        elif name in ("renorm", "renorm_clipping"):
            # Keras keeps renorm_clipping without renorm (and ignores it); normkit.BatchNorm takes it with renorm only.
            if self.renorm:
                inner.renorm = True
                inner.renorm_clipping = self.renorm_clipping
                self._note_clipping_handed()
            else:
                inner.renorm_clipping = None  # (first: BatchNorm takes clipping only with renorm)
                inner.renorm = False

    # -- build ------------------------------------------------------------------------------------

    # Until the build, gamma and beta are torch's uninitialized parameters (as in torch.nn's lazy modules): an
    # optimizer made before the first call holds them, and the build turns these same objects into the weights,
    # so it trains them (without them it silently left the layer out); DistributedDataParallel refuses them
    # with torch's message to run a batch through the model first.
    _PENDING = (("_pending_gamma", "scale", "weight"), ("_pending_beta", "center", "bias"))

    def _add_pending_parameters(self) -> None:
        # Also on a change of center/scale before the build: the pending weights are those the build will make
        # (one set True after construction was left out of an optimizer made then; one set False lingered).
        for attribute, option, _ in self._PENDING:
            if getattr(self, option) and attribute not in self._parameters:
                self.register_parameter(attribute, nn.parameter.UninitializedParameter(
                    device=self._factory["device"], dtype=self._factory["dtype"]))
            elif not getattr(self, option):
                self._parameters.pop(attribute, None)

    def _adopt_pending_parameters(self) -> None:
        """The built layer's weight and bias become the pending parameters, materialized with their values."""
        for attribute, _, target in self._PENDING:
            pending, built = self._parameters.pop(attribute, None), getattr(self.bn, target)
            if built is None or not isinstance(pending, nn.parameter.UninitializedParameter):
                continue  # (torch's .to("meta") replaces one by a plain empty Parameter, as on its lazy layers)
            pending.materialize(built.shape, device=built.device, dtype=built.dtype)
            with torch.no_grad():
                pending.copy_(built)
            pending.requires_grad_(built.requires_grad)
            setattr(self.bn, target, pending)

    def _apply(self, fn, *args, **kwargs):
        # .double(), .half(), .to(dtype or device) on an unbuilt layer set what the build makes, as they do for
        # torch.nn's lazy modules (the weights came out float32 in a model made float64 before its first call);
        # a conversion that keeps the device leaves an unset one to follow the first input.
        if self.bn is None:
            dtype = self._factory["dtype"] or torch.get_default_dtype()
            device = torch.device(self._factory["device"] or "cpu")
            probe = fn(torch.empty(0, dtype=dtype, device=device))
            if probe.dtype != dtype:
                self._factory["dtype"] = probe.dtype
            if probe.device != device:
                self._factory["device"] = probe.device
        else:
            dtype = _variables_dtype(self.bn)
            devices = [tensor.device for tensor in (*self.bn.parameters(), *self.bn.buffers())]
            probe = fn(torch.empty(0, dtype=dtype, device=devices[0] if devices else "cpu"))
        result = super()._apply(fn, *args, **kwargs)
        name = str(probe.dtype).replace("torch.", "")
        if probe.dtype != dtype and self.dtype_policy is not None and name in _POLICIES:
            # A torch conversion (.double(), .half(), .to(dtype)) states the layer's dtype, as for torch.nn's layers:
            # the policy follows the variables. Kept, a ported layer (Keras writes "float32" into every config) held
            # float64 weights but computed and returned float32, which the next layer of a .double() model refused.
            self.dtype_policy = name
        return result

    @contextlib.contextmanager
    def _pending_set_aside(self):
        """The pending parameters out of ``_parameters`` for the duration: they hold nothing to save or load."""
        pending = {attribute: self._parameters.pop(attribute) for attribute, _, _ in self._PENDING
                   if attribute in self._parameters}
        try:
            yield
        finally:
            self._parameters.update(pending)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        with self._pending_set_aside():  # (an unbuilt layer's state_dict is empty, as before)
            super()._save_to_state_dict(destination, prefix, keep_vars)

    @property
    def built(self) -> bool:
        """Whether the weights exist (after the first call or ``build``), as Keras' ``layer.built``."""
        return self.bn is not None

    def build(self, input_shape: Sequence[int], device=None) -> None:
        """Create the weights for inputs of ``input_shape`` (the batch size may be None).

        They live on the constructor's ``device`` if one was given, else on ``device`` (the first
        input's, when the first call builds the layer, so a lazily built layer follows its data to a GPU).

        A layer built from a state_dict (input rank unknown) takes the shape and keeps its weights; any
        other built layer refuses, as Keras does (new weights would silently replace the trained ones).
        """
        rank = len(input_shape)
        if rank < 2:
            # Before the axis check, whose range for rank 0 or 1 would point at axes the layer then refuses.
            raise ValueError(f"{self.name} expects an input of rank >= 2 (batch, features, ...), got input_shape "
                             f"{tuple(input_shape)} of rank {rank}: give the batch on its own axis")
        axes = canonicalize_axes(self.axis, rank)
        shape = tuple(None if size is None else int(size) for size in input_shape)
        sizes = tuple(input_shape[a] for a in axes)
        if any(size is None for size in sizes):
            raise ValueError(f"axis {self.axis} of input_shape {tuple(input_shape)} must have a known size")
        axis = axes[0] if len(axes) == 1 else axes
        if self.bn is not None:
            features = self.bn.num_features if isinstance(self.bn.num_features, tuple) else (self.bn.num_features,)
            if self._build_shape is not None or sizes != features:
                raise ValueError(f"{self.name} is already built (input shape {self._build_shape}, features "
                                 f"{features}): build({tuple(input_shape)}) would replace its weights; make a new "
                                 "layer for other inputs")
            self._build_shape = shape  # (loaded from a state_dict: the rank was the one thing unknown)
            self.bn.axis = axis
            return
        self._build_shape = shape
        self._create(sizes, axis, device)

    @torch.compiler.disable
    def _build_on_first_call(self, inputs: torch.Tensor) -> None:
        # Eager even inside torch.compile: creating modules and parameters cannot be traced (torch.compile
        # special-cases torch's own lazy modules; this layer gets the same by building outside the graph).
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            # torch.export and torch.jit.trace (both ONNX exporters) cannot create parameters mid-trace: export said
            # "Attempted to use an uninitialized parameter", the trace "num_features must be a positive int, got
            # tensor(3)" (its sizes are tensors). torch.nn's lazy layers are refused the same way.
            raise RuntimeError(f"{self.name} is not built yet, and torch.export, torch.jit.trace and torch.onnx.export "
                               "cannot build it while tracing: call the layer once on an example input (or "
                               "layer.build(input_shape)) before exporting it")
        self.build(tuple(inputs.shape), device=inputs.device)

    def _create(self, sizes: tuple, axis, device=None) -> None:
        """The normkit.BatchNorm underneath, for features of ``sizes`` on ``axis``."""
        try:
            self._create_inner(sizes, axis, device)
        except ValueError as error:
            # An initializer refused at the build (values beyond the dtype's range) by its Keras name.
            message = str(error)
            for torch_name, keras_name in _INITIALIZER_NAMES.items():
                if message.startswith(torch_name + "="):
                    raise ValueError(f"{self.name}: {keras_name}{message[len(torch_name):]}") from None
            raise

    def _create_inner(self, sizes: tuple, axis, device=None) -> None:
        self.bn = BatchNorm(
            sizes[0] if len(sizes) == 1 else sizes, eps=self.epsilon, momentum=_new_value_weight(self.momentum),
            affine=self.scale or self.center, bias=self.center, track_running_stats=True,
            axis=axis,
            # Keras keeps renorm_clipping without renorm and ignores it; normkit.BatchNorm refuses that.
            renorm=self.renorm, renorm_clipping=self.renorm_clipping if self.renorm else None,
            renorm_momentum=_new_value_weight(self.renorm_momentum),
            virtual_batch_size=self.virtual_batch_size, ghost_layout=self.ghost_layout, adjustment=self.adjustment,
            weight_initializer=self.gamma_initializer, bias_initializer=self.beta_initializer,
            running_mean_initializer=self.moving_mean_initializer,
            running_var_initializer=self.moving_variance_initializer,
            weight_regularizer=self.gamma_regularizer, bias_regularizer=self.beta_regularizer,
            weight_constraint=self.gamma_constraint, bias_constraint=self.beta_constraint,
            unbiased_running_var=False, synchronized=self.synchronized,
            # (the group set after: the constructor's warning about a group without synchronized=True was given by
            # this layer's own, at the user's line)
            dtype=self._factory["dtype"], device=self._factory["device"] or device)
        self.bn.process_group = self.process_group
        self.bn._built_by = type(self).__name__  # (what its messages name: the layer the user made)
        self._note_clipping_handed()
        if not self.scale and self.bn.weight is not None:
            # Keras' scale=False has beta but no gamma; torch.nn has no such layer, so drop weight here.
            del self.bn.weight
            self.bn.register_parameter("weight", None)
        self._adopt_pending_parameters()
        self.bn.train(self.training)
        if not self._trainable:
            self.bn.freeze()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # An unbuilt layer takes its feature sizes from the state it loads (as torch's lazy modules do).
        # The input rank is unknown then, so the axis stays as given (a negative axis keeps counting
        # from the end) and get_build_config() stays None until a call or build().
        key = f"{prefix}bn.running_mean"
        if self.bn is None and key in state_dict:
            refusal = self._refusal_to_build_from(state_dict, prefix)
            if refusal is not None:
                # Refused before building, as the lazy layers refuse such a checkpoint: built at one size and then
                # failing on another, the layer stayed built (its optimizer's pending weights sized) with initial
                # values; a rank the axis does not fit raised the constructor's ValueError, naming no key. The
                # bn.* keys are reported here, so not again as unexpected.
                error_msgs.append(refusal)
                for name in [name for name in state_dict if name.startswith(f"{prefix}bn.")]:
                    state_dict.pop(name)
                return
            self._create(tuple(state_dict[key].shape), self.axis if isinstance(self.axis, int) else tuple(self.axis),
                         state_dict[key].device)
        elif self.bn is None and any(name.startswith(f"{prefix}bn.") for name in state_dict):
            # A built layer's state without the key an unbuilt one builds from: reported missing (the other bn.* keys
            # then say "unexpected"; alone, they said only that, and strict=False loaded nothing without a word).
            missing_keys.append(key)
        # Still unbuilt: the pending parameters are not in any state_dict (_save_to_state_dict leaves them out), so
        # they are not missing from one either (an unbuilt model's own state_dict failed to load strictly).
        with self._pending_set_aside():
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)

    _FEATURE_SIZED = ("weight", "bias", "running_mean", "running_var") + BatchNorm.RENORM_STATE

    def _refusal_to_build_from(self, state_dict, prefix) -> Optional[str]:
        """Why an unbuilt layer cannot take its feature sizes from this checkpoint, or None if it can: they must be
        tensors of one shape, one size per feature axis."""
        axes = 1 if isinstance(self.axis, int) else len(self.axis)
        given = {f"{prefix}bn.{name}": state_dict[f"{prefix}bn.{name}"] for name in self._FEATURE_SIZED
                 if f"{prefix}bn.{name}" in state_dict}
        shapes = {tuple(value.shape) if isinstance(value, torch.Tensor) else None for value in given.values()}
        if len(shapes) == 1 and None not in shapes and len(next(iter(shapes))) == axes:
            return None
        found = ", ".join(f"{key}: {list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
                          for key, value in given.items())
        return (f"size mismatch for {prefix.rstrip('.') or type(self).__name__}, an unbuilt "
                f"{type(self).__name__}(axis={self.axis!r}): it builds "
                f"from the checkpoint's feature-sized tensors, which need one shape of {axes} dimension(s) (one size "
                f"per feature axis); the checkpoint has {found}. Nothing was built: load a checkpoint saved with "
                f"this axis, or make the layer with the axis the checkpoint was saved with")

    # -- Keras vocabulary ---------------------------------------------------------------------------

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value)
        if self.bn is not None:
            self.bn.freeze() if not self._trainable else self.bn.unfreeze()

    def _built_layer(self) -> BatchNorm:
        if self.bn is None:
            raise RuntimeError(f"{self.name} is not built yet: call it on an input or call build(input_shape) first")
        return self.bn

    gamma = property(lambda self: self._built_layer().weight)
    beta = property(lambda self: self._built_layer().bias)
    moving_mean = property(lambda self: self._built_layer().running_mean)
    moving_variance = property(lambda self: self._built_layer().running_var)
    moving_stddev = property(lambda self: getattr(self._built_layer(), "moving_stddev", None))
    renorm_mean = property(lambda self: getattr(self._built_layer(), "renorm_mean", None))
    renorm_stddev = property(lambda self: getattr(self._built_layer(), "renorm_stddev", None))

    def _weight_tensors(self):
        if self.bn is None:
            return []  # Keras: an unbuilt layer has no weights yet
        names = ["gamma", "beta", "moving_mean", "moving_variance"]
        if self.renorm:
            names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
        return [(name, getattr(self, name)) for name in names if getattr(self, name) is not None]

    @property
    def weights(self):
        """Every weight tensor in Keras' order (gamma, beta, moving_mean, moving_variance, renorm state)."""
        return [tensor for _, tensor in self._weight_tensors()]

    @property
    def trainable_weights(self):
        """gamma and beta (those present), unless the layer is frozen (trainable=False): then none."""
        if not self._trainable:
            return []
        return [tensor for name, tensor in self._weight_tensors() if name in ("gamma", "beta")]

    @property
    def non_trainable_weights(self):
        trainable = {id(t) for t in self.trainable_weights}
        return [tensor for tensor in self.weights if id(tensor) not in trainable]

    def get_weights(self):
        """The weights as NumPy arrays, in Keras' order (gamma, beta, moving_mean, moving_variance, ...)."""
        return [_to_numpy(tensor) for tensor in self.weights]

    def set_weights(self, weights) -> None:
        """Load NumPy arrays given in Keras' order; the count and each shape must match."""
        weights = list(weights)
        if self.bn is None and weights:
            # (it said "expects 0 weights ()", as if the layer had none)
            raise ValueError(f"{self.name} is not built yet, so it has no weights to set (got {len(weights)} arrays): "
                             "call it on an input or call build(input_shape) first, as in Keras")
        targets = self._weight_tensors()
        if len(weights) != len(targets):
            raise ValueError(f"{self.name} expects {len(targets)} weights ({', '.join(n for n, _ in targets)}), "
                             f"got {len(weights)}")
        arrays = [_from_numpy(value) for value in weights]
        values = []
        for (name, tensor), value in zip(targets, arrays):
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r} of {self.name} has shape {tuple(tensor.shape)}, "
                                 f"got an array of shape {tuple(value.shape)}")
            if value.dtype.kind not in "biuf":
                # (converted in the copy loop, a text array after good ones left those loaded: half a weight list)
                raise TypeError(f"weight {name!r} of {self.name}: got an array of {value.dtype}, not numbers")
            values.append(torch.as_tensor(value, dtype=tensor.dtype))
        with torch.no_grad():  # (every array checked and converted first: a bad list changes nothing)
            for (name, tensor), value in zip(targets, values):
                tensor.copy_(value)

    @property
    def losses(self):
        """The regularization terms (Keras' ``layer.losses``): the activity regularizer's term of the latest call, as
        Keras records it (``regularizer(output) / batch size``, in any mode, frozen too), then one scalar per
        regularized trainable weight."""
        terms = [] if self.__dict__.get("_activity_loss") is None else [self._activity_loss]
        if self.bn is None or not self._trainable:
            return terms
        for regularizer, parameter in ((self.bn.weight_regularizer, self.bn.weight),
                                       (self.bn.bias_regularizer, self.bn.bias)):
            if regularizer is not None and parameter is not None:
                terms.append(regularizer(parameter))
        return terms

    def get_config(self) -> dict:
        """Every constructor argument (Keras' ``get_config``), the dtype policy's name included; ``adjustment`` is
        not serializable and is dropped."""
        return {"name": self.name, "axis": self.axis, "momentum": self.momentum, "epsilon": self.epsilon,
                "center": self.center, "scale": self.scale, "beta_initializer": self.beta_initializer,
                "gamma_initializer": self.gamma_initializer,
                "moving_mean_initializer": self.moving_mean_initializer,
                "moving_variance_initializer": self.moving_variance_initializer,
                "beta_regularizer": self.beta_regularizer, "gamma_regularizer": self.gamma_regularizer,
                "beta_constraint": self.beta_constraint, "gamma_constraint": self.gamma_constraint,
                "synchronized": self.synchronized, "renorm": self.renorm, "renorm_clipping": self.renorm_clipping,
                "renorm_momentum": self.renorm_momentum, "virtual_batch_size": self.virtual_batch_size,
                "fused": self.fused, "trainable": self._trainable, "ghost_layout": self.ghost_layout,
                "activity_regularizer": self.activity_regularizer,
                # (as Keras' config: without it a mixed_float16 layer came back float32 from from_config)
                "dtype": self._policy_or_made_dtype()}

    def _policy_or_made_dtype(self) -> Optional[str]:
        """The policy's name; without one, the dtype of the weights (built, or set by .double()/.half() before the
        build) where it is not torch's default: a .double() layer's config made a float32 layer in from_config."""
        if self.dtype_policy is not None:
            return self.dtype_policy
        made = _variables_dtype(self.bn) if self.bn is not None else self._factory["dtype"]
        name = str(made).replace("torch.", "")
        return name if made is not None and made != torch.get_default_dtype() and name in _POLICIES else None

    @classmethod
    def from_config(cls, config: dict) -> "BatchNormalization":
        """A layer from ``get_config()``: this class's, or Keras' own (its ``dtype`` policy and its
        serialized initializers, regularizers and constraints included)."""
        config = dict(config)
        for key in _INPUT_SHAPE_KEYS:
            # tf.keras writes input_shape=... given to a Sequential's first layer into the layer's config as
            # "batch_input_shape" (Keras' Layer takes these four keys): they describe the model's input, not an
            # option of the layer. Refused, every such tf.keras model failed to load.
            config.pop(key, None)
        try:
            dtype = _policy_name(config.pop("dtype", None))
        except ValueError as error:
            raise ValueError(f"from_config: {error}") from None
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(config) - accepted)
        if unknown and isinstance(config.get("config"), dict) and "class_name" in config:
            # (the serialized layer, as a model's config lists it or keras.saving.serialize_keras_object writes it)
            raise ValueError(f"from_config: this is a serialized layer ({{'class_name': {config['class_name']!r}, "
                             "'config': {...}}): pass its 'config' entry, from_config(serialized['config'])")
        if unknown:
            raise ValueError(f"from_config: {unknown} are not BatchNormalization arguments "
                             f"(accepted: {sorted(accepted)})")
        return cls(**config, dtype=dtype)

    def keras_config(self) -> dict:
        """This layer as Keras 3's ``BatchNormalization.get_config()`` writes it.

        ``keras.layers.BatchNormalization.from_config(layer.keras_config())`` is the same layer in
        Keras. Options Keras 3 does not have (``virtual_batch_size``, ``adjustment``, an axis list of several
        features; a one-element list is written as its int), Python
        callables among the initializers, regularizers and constraints, and clipping schedules
        (callables) cannot be written, and raise a ValueError naming them.
        """
        missing = [option for option, value in (("virtual_batch_size", self.virtual_batch_size),
                                                ("adjustment", self.adjustment)) if value is not None]
        axis = self.axis
        if isinstance(axis, (list, tuple)) and len(axis) == 1:
            axis = axis[0]  # (a built tf.keras layer's config holds [3]: one axis, which Keras 3 writes as 3)
        if not isinstance(axis, int):
            missing.append("list axis of several features (tf.keras only)")
        clipping = self.renorm_clipping
        if isinstance(clipping, RenormClipping):
            # (the layer takes one, e.g. RenormClipping.paper_schedule(), as it takes Keras' dict: the dict of its
            # bounds that differ from the defaults, which mean no bound as a missing key does in Keras)
            unset = RenormClipping()
            clipping = {key: getattr(clipping, key) for key in RenormClipping.KEYS
                        if callable(getattr(clipping, key)) or getattr(clipping, key) != getattr(unset, key)}
        if clipping is not None and any(callable(v) for v in clipping.values()):
            missing.append("renorm_clipping schedules (callables)")
        if missing:
            raise ValueError(f"{self.name}: Keras 3's BatchNormalization has no {', '.join(missing)}; "
                             "this layer cannot be written as a Keras config")
        # (unbuilt: the dtype its build will make, which .double()/.half() set; the default dtype said float32 for a
        # layer that then built float64 weights, and to_keras made a float32 Keras layer of it)
        dtype = self.dtype_policy or str(_variables_dtype(self.bn) if self.bn is not None
                                         else self._factory["dtype"] or torch.get_default_dtype()).replace("torch.", "")
        serialized = {}
        for key in ("beta_initializer", "gamma_initializer", "moving_mean_initializer",
                    "moving_variance_initializer", "beta_regularizer", "gamma_regularizer", "beta_constraint",
                    "gamma_constraint"):
            kind = key.rsplit("_", 1)[1]
            serialized[key] = to_keras_object(kind, getattr(self, key), name=key)
        # (Keras' Layer writes activity_regularizer only when one is set)
        activity = {} if self.activity_regularizer is None else {"activity_regularizer": to_keras_object(
            "regularizer", self.activity_regularizer, name="activity_regularizer")}
        return {"name": self.name, "trainable": self._trainable,
                "dtype": {"module": "keras", "class_name": "DTypePolicy",
                          "config": {"name": dtype}, "registered_name": None}, **activity,
                "axis": axis, "momentum": self.momentum, "epsilon": self.epsilon, "center": self.center,
                "scale": self.scale, **serialized, "synchronized": self.synchronized, "renorm": self.renorm,
                # (Keras 3 writes {} for renorm without clipping, and keeps None without renorm)
                "renorm_clipping": ({} if self.renorm else None) if clipping is None
                else {k: None if v is None else float(v) for k, v in clipping.items()},  # (None: no bound)
                "renorm_momentum": self.renorm_momentum}

    def get_build_config(self) -> Optional[dict]:
        """``{"input_shape": [...]}`` of the build, as Keras' ``get_build_config()``; None before it."""
        return None if self._build_shape is None else {"input_shape": list(self._build_shape)}

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, inputs: torch.Tensor, training: Optional[bool] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(inputs, torch.fx.Proxy):
            # torch.fx.symbolic_trace: one call_module node, as torch.nn's layers give (an unbuilt layer builds on
            # the traced module's first call, as a torch.nn.LazyBatchNorm does)
            kwargs = {name: value for name, value in (("training", training), ("mask", mask)) if value is not None}
            return _fx_call_module(self, inputs, **kwargs)
        outputs = self._normalize(inputs, training, mask)
        if self._activity is not None:
            # Keras' Layer.__call__: the regularizer of the output, divided by the batch size (0 for an empty batch:
            # its divide_no_nan), recorded by every call, whatever the mode. Not inside a torch.func transform (vmap,
            # grad), whose tensors cannot leave it: kept, layer.losses and regularization_loss raised "escaped vmap".
            term = None
            if not torch._C._are_functorch_transforms_active():
                term = self._activity(outputs)
                if outputs.dim() > 0:
                    term = term / outputs.shape[0] if outputs.shape[0] else torch.zeros_like(term)
            self.__dict__["_activity_loss"] = term
        return outputs

    def _normalize(self, inputs, training: Optional[bool], mask) -> torch.Tensor:
        try:
            inputs, mask, bn, mode, stored = self._keras_inputs(inputs, training, mask)
        except Exception:
            # Every refusal of the input (no array, a layer that cannot build, the wrong rank, a mask that does not
            # fit) comes before the merge that a synchronized training call's peers wait in: told, they raise at
            # once instead of waiting for the group's timeout (after which gloo had closed the group's connections).
            # The inner layer's call refuses its own inputs the same way (BatchNorm._refuse_with_peers).
            self._refuse_with_peers(training, inputs)
            raise
        previous = bn.training
        switched = previous != mode  # (nn.Module.__setattr__ twice a call where the mode is already the one)
        if switched:
            bn.training = mode
        try:
            if stored in LOW_PRECISION:
                return self._forward_widened(inputs, mask, torch.float32)
            compute = self._compute_dtype
            if compute is not None and compute != stored and compute not in LOW_PRECISION:
                # dtype_policy set after build to the other full precision (float32 <-> float64): Keras computes
                # in the policy's dtype with the variables cast to it (the inner layer refused the mix).
                return self._forward_widened(inputs, mask, compute)
            if inputs.dtype in LOW_PRECISION:
                # Keras computes in float32 and rounds the output once. ATen's half-precision kernels round
                # intermediates (in half throughout without a float32 weight and bias), which few values per
                # channel amplify: ten times Keras' error in the input gradient. A float64 layer computes in
                # float64 (inputs.float() met its float64 weights with a TypeError).
                return bn(inputs.to(stored), mask=mask).to(inputs.dtype)
            # The mask by keyword, and only when there is one: a forward pre-hook on bn that returns the input alone
            # (torch's single-value form) replaces the positional arguments, which silently dropped a positional mask.
            # (in inference too: the mask names no statistic there, but the padding whose NaN or inf values the padding
            # rule keeps out of gamma's gradient)
            y = bn(inputs) if mask is None else bn(inputs, mask=mask)
            if compute is not None and compute != stored:
                # integer inputs under a mixed policy: float32 math, the output in the compute dtype (as Keras)
                return y.to(compute)
            return y
        except ValueError as error:
            self._refuse_other_features(inputs, bn, error)
            raise
        finally:
            if switched:
                bn.training = previous

    def _keras_inputs(self, inputs, training: Optional[bool], mask):
        """The call's input and mask as Keras reads them (arrays converted, the layer built on its first call, the
        rank checked, Keras' dtype rules, the mask expanded at the last axis and checked), with the inner layer, the
        call's mode and the variables' dtype. Raises on every input Keras refuses; ``forward`` tells a synchronized
        call's peers."""
        if not isinstance(inputs, torch.Tensor):
            # Keras converts array inputs to the layer's compute dtype: a float64 layer's NumPy data stays
            # float64 (rounded to float32 first, it lost ~1e-7 relative that float64 is asked to keep).
            built = self.bn.running_mean if self.bn is not None else None
            if built is None and self.bn is not None:  # (statistics switched off: replace_all_batch_norm_modules_)
                built = next(iter(self.bn.parameters()), None)
            dtype = self._compute_dtype or (built.dtype if built is not None else self._factory["dtype"])
            array = _from_numpy(inputs)
            if array.dtype.kind in "biuc":
                # (integers stay integers here: the cast below gives them Keras' float32 math; complex numbers stay
                # complex, for the refusal below, where the cast dropped the imaginary part)
                dtype = None
            elif dtype is None:
                dtype = torch.get_default_dtype()
            inputs = torch.as_tensor(array, dtype=dtype,
                                     device=built.device if built is not None else self._factory["device"])
        if inputs.is_complex():  # (before a first call builds on it; Keras' cast to float drops the imaginary part)
            check_floating(inputs, name="inputs")
        bn = self._modules.get("bn")  # (Module.__getattr__ costs: a small call notices every one)
        if bn is None:
            self._build_on_first_call(inputs)
            bn = self._modules["bn"]
        elif self._build_shape is not None and inputs.dim() != len(self._build_shape):
            # Keras' InputSpec: the rank is fixed at build (a negative axis would now name another axis).
            raise ValueError(f"{self.name} was built for inputs of rank {len(self._build_shape)} "
                             f"(shape {self._build_shape}), got an input of rank {inputs.dim()} "
                             f"(shape {tuple(inputs.shape)}): expected ndim={len(self._build_shape)}, found "
                             f"ndim={inputs.dim()}")
        running_mean = bn._buffers.get("running_mean")
        stored = running_mean.dtype if running_mean is not None else _variables_dtype(bn)
        if not inputs.is_floating_point():
            # Keras computes integer and bool inputs in float32 (its result_type with float32) whatever the policy;
            # cast to a half-precision compute dtype first, every integer above 256 (bfloat16) or 2048 (float16)
            # was rounded before the statistics. A float64 layer takes them in float64, as its float inputs.
            inputs = inputs.to(torch.float64 if torch.float64 in (stored, self._compute_dtype) else torch.float32)
        elif self._compute_dtype is not None and self._compute_dtype != stored:
            # A mixed policy (Keras' autocast): inputs in half precision; the statistics stay float32
            # and the output comes in the compute dtype, as in Keras.
            inputs = inputs.to(self._compute_dtype)
        elif inputs.dtype != stored and inputs.dtype not in LOW_PRECISION:
            # Keras casts inputs (integers too) to the layer's dtype (float32 unless built otherwise);
            # half-precision inputs keep normkit's rule (float32 statistics, output in their dtype).
            inputs = inputs.to(stored)
        if mask is not None:
            mask = torch.as_tensor(mask, device=inputs.device)
            if mask.dim() != inputs.dim() - 1:
                raise ValueError(f"The mask provided should be one dimension less than the inputs: mask has shape "
                                 f"{tuple(mask.shape)}, inputs {tuple(inputs.shape)}")
            # Keras expands the mask at the last axis, whatever the feature axis is.
            mask = mask.unsqueeze(-1)
        mode = self.training if training is None else bool(training)
        if mode and self.renorm and self.renorm_clipping != self.__dict__.get("_clipping_handed"):
            # Keras reads renorm_clipping at every call, so a dict changed in place (layer.renorm_clipping["rmax"]
            # = 3) bounds this step; the inner layer holds the values it was handed, validated, until told again.
            self.renorm_clipping = self.renorm_clipping
        if mask is not None and mode and self._trainable:
            self._check_mask(mask, inputs)
        elif mask is not None and not broadcasts_to(mask.shape, inputs.shape):
            mask = None  # (inference ignores a mask, as Keras does; one that fits still names the padding, below)
        if mask is not None and bn.axis in (-1, inputs.dim() - 1):
            # Features last: the inner layer's padding mask as given, the input's shape without its features ((N, T)
            # for (N, T, C)), which it expands at that axis itself; the shape its kernel takes straight from the module
            mask = mask.squeeze(-1)
        return inputs, mask, bn, mode, stored

    def _note_clipping_handed(self) -> None:
        """Remember the renorm_clipping values the inner layer holds (a copy: the dict itself may change)."""
        clipping = self.renorm_clipping
        self.__dict__["_clipping_handed"] = dict(clipping) if isinstance(clipping, dict) else clipping

    def _refuse_other_features(self, inputs: torch.Tensor, bn: BatchNorm, error: ValueError) -> None:
        """Keras' InputSpec: the feature sizes are fixed at build. Where the inner layer refused an input for them
        (and told a synchronized call's peers), its message advised "build the layer with num_features=5", an
        argument this layer does not have, and named no layer of the model: this one says it as Keras does. (Asked
        after the refusal only: a check before every call cost 2-3% of a small layer's step.)"""
        if self._build_shape is None or _tracing_state() is not None or inputs.dim() != len(self._build_shape):
            return
        for axis in (bn.axis,) if isinstance(bn.axis, int) else bn.axis:
            if inputs.shape[axis] != self._build_shape[axis]:
                raise ValueError(f"{self.name} was built for inputs of shape {self._build_shape} ("
                                 f"{self._build_shape[axis]} features on axis {axis}), got an input of shape "
                                 f"{tuple(inputs.shape)}: make a new layer for such inputs, or give the layer "
                                 "the axis its features are on") from error

    def _check_mask(self, mask: torch.Tensor, inputs: torch.Tensor) -> None:
        # Keras' rule, which the inner layer's message (the input without its feature axes) contradicts when the
        # features are not last: given (N, T) for (N, C, T) data it said "give a mask of shape (N, T)".
        if broadcasts_to(mask.shape, inputs.shape):  # (the mask has the input's rank here)
            return
        message = (f"{self.name}: a mask of shape {tuple(mask.shape[:-1])} does not fit inputs of shape "
                   f"{tuple(inputs.shape)}: Keras expands the mask at the last axis, so it is the input's shape "
                   f"without its last axis, {tuple(inputs.shape[:-1])}, or broadcastable to it")
        if self.bn.axis not in (-1, inputs.dim() - 1):
            message += (f". This layer's features are on axis {self.bn.axis}, not last (a channels-last Keras layer "
                        "moved by load_batch_norms(axis=...) too): to mask positions along the other axes, call "
                        "layer.bn(x, mask=m), normkit's BatchNorm underneath, with m of the input's shape without "
                        "the feature axis")
        raise ValueError(message)

    def _refuse_with_peers(self, training: Optional[bool], inputs=None) -> None:
        """Before refusing an input: a synchronized training call's peers are told (BatchNorm._refuse_with_peers)."""
        mode = self.training if training is None else bool(training)
        if self.bn is not None:
            self.bn._refuse_with_peers(mode)
        elif self.synchronized and mode and self._trainable:
            # (a first call that could not build: no inner layer yet, whose training call would have merged)
            from . import distributed
            device = inputs.device if isinstance(inputs, torch.Tensor) else self._factory["device"] or "cpu"
            distributed.refuse_with_peers(self.process_group, torch.device(device))

    def _forward_widened(self, inputs: torch.Tensor, mask: Optional[torch.Tensor], math: torch.dtype) -> torch.Tensor:
        """A call whose math runs in ``math`` rather than the variables' dtype, as Keras computes it: a layer with
        half-precision variables ("float16"/"bfloat16" policy; ``math`` float32), or one whose policy was set
        after build to the other full precision (``math`` the policy's dtype).

        Keras casts the input and the variables to that dtype, computes there, rounds the output to the
        compute dtype and each updated statistic once as it is assigned. ATen's half-precision kernels
        round along the way instead (ten times Keras' error on outputs and gradients), so the inner layer
        runs on copies in ``math`` (gradients still reach the parameters through the casts) and the
        buffers take the copies' new values back.
        """
        stored = _variables_dtype(self.bn)
        compute = self._compute_dtype or stored  # (Keras rounds the input to the compute dtype, then widens it)
        widened = {name: tensor.to(math) for name, tensor in (*self.bn.named_parameters(), *self.bn.named_buffers())
                   if tensor.dtype == stored}
        # (an input already in ``math`` is an integer one, which Keras computes in float32 unrounded)
        seen = inputs if inputs.dtype == math else inputs.to(compute).to(math)
        y = torch.func.functional_call(self.bn, widened, (seen,), {"mask": mask})
        with torch.no_grad():
            for name, buffer in self.bn.named_buffers():
                if name in widened:
                    buffer.copy_(widened[name])
        return y.to(compute)

    def extra_repr(self) -> str:
        return (f"axis={self.axis}, momentum={self.momentum}, epsilon={self.epsilon}, center={self.center}, "
                f"scale={self.scale}" + (", renorm=True" if self.renorm else "")
                + (f", virtual_batch_size={self.virtual_batch_size}" if self.virtual_batch_size else "")
                + ("" if self._trainable else ", trainable=False"))


# The input-shape arguments every Keras layer takes (tf.keras writes "batch_input_shape" into a layer's config).
_INPUT_SHAPE_KEYS = ("batch_input_shape", "input_shape", "input_dim", "batch_size")


def _variables_dtype(bn) -> torch.dtype:
    """The dtype the layer's variables are stored in: its moving mean's, or, where the statistics were switched off
    (``normkit.replace_all_batch_norm_modules_``, for torch.func.vmap in training), its parameters'."""
    for tensor in (bn._buffers.get("running_mean"), bn._parameters.get("weight"), bn._parameters.get("bias")):
        if tensor is not None:
            return tensor.dtype
    return torch.get_default_dtype()


def from_keras_config(config: dict, build_config: Optional[dict] = None, weights=None) -> BatchNormalization:
    """A normkit layer from what a Keras BatchNormalization layer's ``get_config()``,
    ``get_build_config()`` and ``get_weights()`` return (Keras 3 or tf.keras; plain dicts and NumPy
    arrays, so the Keras side can be saved to JSON/NPZ and loaded where Keras is not installed)."""
    if build_config is not None and weights is not None and isinstance(config, dict) and "ghost_layout" not in config:
        # A built Keras layer's (Keras writes no ghost_layout; normkit's get_config does, and shifts nothing): tf.keras
        # writes a ghost-batch layer's axis shifted past the ghost dimension and its ghost-batch or multi-axis weights
        # in the inputs' broadcast shape, (1, 1, C). Read as Keras 3's, every such layer failed to port ("axis=[2] is
        # out of range"); these forms are undone as for a saved model's layers.
        shape = build_config.get("input_shape") if isinstance(build_config, dict) else None
        if isinstance(shape, (tuple, list)):
            # (a live layer's get_build_config() gives a tuple, maybe of NumPy ints; a saved one a list of ints)
            build_config = {**build_config, "input_shape": [
                int(size) if isinstance(size, numbers.Integral) and not isinstance(size, bool) else size
                for size in shape]}
        try:
            return _batch_norm_from_saved(config, build_config, list(weights), None)
        except ValueError as error:  # (its messages speak of "it": the layer of this config)
            raise ValueError(f"from_keras_config: layer {config.get('name')!r}: {error}") from None
    if build_config is not None and isinstance(config, dict) and "ghost_layout" not in config:
        config = _built_keras_axis(config)  # (a built tf.keras ghost-batch layer's shifted axis, without weights too)
    layer = BatchNormalization.from_config(config)
    if build_config is not None:
        layer.build(build_config["input_shape"])
    if weights is not None:
        if not layer.built:
            raise ValueError("from_keras_config: weights need the layer built: pass build_config "
                             "(the Keras layer's get_build_config())")
        layer.set_weights(weights)
    return layer


def from_keras(keras_layer) -> BatchNormalization:
    """The same layer as normkit's: options, build and weights of a Keras BatchNormalization layer."""
    for method in ("get_config", "get_weights"):
        if not callable(getattr(keras_layer, method, None)):
            raise TypeError(f"from_keras expects a Keras BatchNormalization layer, got {type(keras_layer).__name__} "
                            f"(no {method}())")
    _refuse_other_computations(keras_layer)
    if getattr(keras_layer, "_USE_V2_BEHAVIOR", True) is False and getattr(keras_layer, "trainable", True) is False:
        # tf.keras' V1 class (tf.compat.v1.keras.layers.BatchNormalization): frozen, it still normalizes training calls
        # by the batch's statistics, which the port (frozen as Keras 2/3's layer) does not; as load_batch_norms says.
        warnings.warn(f"from_keras: {getattr(keras_layer, 'name', type(keras_layer).__name__)!r} is a frozen "
                      "BatchNormalization of tf.keras' V1 class: it normalizes training calls by the batch's "
                      "statistics without updating the moving ones; the port (trainable=False) uses its moving "
                      "statistics in every call, as Keras 2/3's frozen layer does. For V1's rule: layer.trainable = "
                      "True, layer.momentum = 1.0 (no update) and requires_grad_(False) on layer.gamma and layer.beta",
                      UserWarning, stacklevel=2)
    build_config = None
    if getattr(keras_layer, "built", False):
        if callable(getattr(keras_layer, "get_build_config", None)):
            build_config = keras_layer.get_build_config()
        if build_config is None:
            # tf.keras records no build config for a layer built by layer.build(shape) rather than a call (nor has
            # tf.keras <= 2.12 get_build_config at all): the layer came back unbuilt, its weights dropped without a
            # word. The input_spec its build set holds the input's rank and feature sizes.
            build_config = _build_config_of_input_spec(keras_layer)
        if build_config is None:
            raise ValueError("from_keras: this built Keras layer gives no input shape (get_build_config() is None and "
                             "it has no input_spec): use from_keras_config(layer.get_config(), {'input_shape': [...]}, "
                             "layer.get_weights()) with the shape it was built for")
    weights = keras_layer.get_weights() if build_config is not None else None
    return from_keras_config(_with_live_custom_objects(keras_layer), build_config, weights)


# Where Keras' classes live (Keras 3 and the Keras 2 bundled with TensorFlow 2.13-2.15: keras.src, tf_keras, TF's own
# older copy), and the names of its batch-normalization classes there (tf.keras' V1/V2, base and synchronized ones).
_KERAS_MODULES = ("keras.", "tf_keras.", "tensorflow.python.keras.", "tensorflow.keras.")
_KERAS_BATCH_NORMS = {"BatchNormalization", "BatchNormalizationBase", "BatchNormalizationV1", "BatchNormalizationV2",
                      "SyncBatchNormalization"}
# What a subclass may define and still compute what its Keras base does (its port reads the config and weights).
_SUBCLASS_KEEPS = {"__init__", "get_config", "from_config", "build", "__module__", "__qualname__", "__doc__",
                   "__dict__", "__weakref__", "__annotations__", "__firstlineno__", "__static_attributes__"}


def _refuse_other_computations(keras_layer) -> None:
    """A real Keras layer (a class of Keras' own in its MRO) must be a BatchNormalization, and the user's classes above
    it must override nothing it computes with: a port takes the options and weights, never such a subclass's own
    ``call`` (a BatchNormalization then an activation, as model zoos write: ported silently as a plain one, computing
    something else) or another Keras layer (its config then refused with a message about its build). Objects of
    other classes (a recording of a layer's answers) are read as they answer."""
    mro = type(keras_layer).__mro__
    first = next((index for index, cls in enumerate(mro) if cls.__module__.startswith(_KERAS_MODULES)), None)
    if first is None:
        return
    if mro[first].__name__ not in _KERAS_BATCH_NORMS:
        raise TypeError(f"from_keras expects a Keras BatchNormalization layer, got {type(keras_layer).__name__} "
                        f"(a {mro[first].__module__}.{mro[first].__name__})")
    overridden = sorted({name for cls in mro[:first] for name in vars(cls)
                         if name not in _SUBCLASS_KEEPS and any(hasattr(base, name) for base in mro[first:])})
    if overridden:
        raise ValueError(f"from_keras: {type(keras_layer).__name__} subclasses Keras' {mro[first].__name__} and "
                         f"overrides {', '.join(overridden)}: it may compute something else, which a port of its options "
                         "and weights would not. Port it by hand: from_keras_config(layer.get_config(), "
                         "layer.get_build_config(), layer.get_weights()) gives the plain BatchNormalization, around which "
                         "the subclass's own computation is to be written in torch")


_KERAS_OBJECT_OPTIONS = ("beta_initializer", "gamma_initializer", "moving_mean_initializer",
                         "moving_variance_initializer", "beta_regularizer", "gamma_regularizer", "beta_constraint",
                         "gamma_constraint", "activity_regularizer")


def _with_live_custom_objects(keras_layer) -> dict:
    """The Keras layer's config, where an initializer, regularizer or constraint is not one of Keras' built-ins that
    normkit reads (a registered custom class, a lambda) replaced by the layer's own object, a callable on torch
    tensors under Keras 3's torch backend. (from_keras refused such a layer, saying to give "a callable", which
    from_keras has no way to take.) Elsewhere (tf.keras, another backend) the objects compute on other tensors:
    the config is left, and refused by name."""
    config = keras_layer.get_config()
    keras = sys.modules.get("keras")
    try:
        torch_backend = keras is not None and keras.backend.backend() == "torch"
    except AttributeError:
        torch_backend = False
    if not torch_backend or not type(keras_layer).__module__.startswith("keras."):
        return config
    for option in _KERAS_OBJECT_OPTIONS:
        live = getattr(keras_layer, option, None)
        if config.get(option) is None or not callable(live):
            continue
        try:
            _OPTION_CHECKS[option](config[option], option)
        except ValueError:
            config[option] = live
    return config


def _build_config_of_input_spec(keras_layer) -> Optional[dict]:
    """``{"input_shape": [...]}`` from the ``InputSpec(ndim, axes)`` a Keras BatchNormalization's build sets: the rank,
    the feature sizes on their axes (tf.keras: before a ghost-batch layer's shift), None elsewhere; None without one."""
    spec = getattr(keras_layer, "input_spec", None)
    spec = spec[0] if isinstance(spec, (list, tuple)) and len(spec) == 1 else spec
    ndim, axes = getattr(spec, "ndim", None), getattr(spec, "axes", None)
    if not isinstance(ndim, int) or not isinstance(axes, dict) or not axes:
        return None
    shape = [None] * ndim
    for axis, size in axes.items():
        shape[int(axis)] = None if size is None else int(size)
    return {"input_shape": shape}


def to_keras(layer: BatchNormalization):
    """Keras 3's BatchNormalization with ``layer``'s options and, if built, its build and weights (needs Keras)."""
    if layer.built and layer.get_build_config() is None:
        raise ValueError(f"to_keras: {layer.name} was built from a state_dict, which does not hold the input rank "
                         "Keras builds with: call layer.build(input_shape) (it keeps the loaded weights) or call "
                         "the layer once first")
    try:
        import keras
    except ImportError as error:
        raise ImportError("to_keras needs Keras 3 (pip install keras); layer.keras_config() and "
                          "layer.get_weights() give the same without it") from error
    ported = keras.layers.BatchNormalization.from_config(layer.keras_config())
    if layer.built:
        ported.build(tuple(layer.get_build_config()["input_shape"]))
        ported.set_weights(layer.get_weights())
    return ported


# ----------------------------------------------------------------------------- saved Keras models

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def load_batch_norms(path, *, axis: Optional[int] = None) -> dict:
    """The BatchNormalization layers of a Keras model saved with ``model.save(...)``, without Keras.

    Read: Keras 3's ``.keras`` archives, tf.keras 2.13-2.15's (TensorFlow's bundled Keras 2, whose weights file is
    laid out by path), and legacy HDF5 models (``model.save("x.h5")``) of tf.keras 2 and Keras 3. A weights-only
    HDF5 file (``model.save_weights``) holds no layer options and is refused (a ValueError saying what to do).

    Returns ``{path: BatchNormalization}``, built and holding the saved weights (moving statistics
    included; tf.keras' options Keras 3 lacks too: ``virtual_batch_size``, a list ``axis``), in the order of the
    model's config. A layer the file gives no input shape for (legacy HDF5 files save none, except Keras 3's for
    a functional model's layers) is built from its weights alone, as one loading a state_dict: any input rank is
    taken, and ``get_build_config()`` is None until ``layer.build(input_shape)`` (which keeps the weights). A
    layer inside a nested model is found under
    ``"outer/inner"`` (``"block/bn_inner"``), one wrapped in ``TimeDistributed`` under ``"wrapper/layer"``
    (built on one time step, as Keras built it; Keras 3's wrapper calls it once per step). Each is
    ``from_keras_config`` of the layer's saved config, build config and weights, so it computes what
    the Keras layer computed.

    ``axis`` moves the feature axis: a channels-last Keras layer (``axis=-1`` on NHWC data) taken with
    ``axis=1`` normalizes the same channels of an NCHW PyTorch model (its build shape is permuted
    to match, where the file gives it; only layers with a single feature axis).

    Only data is read: the archive's JSON and the HDF5 arrays (h5py needed: ``pip install h5py``).
    Nothing in the file is imported or executed; initializers, regularizers and constraints are
    rebuilt from normkit's own table of Keras' built-in ones, and anything else is a ValueError.
    The file may be untrusted: sizes are checked before anything is read into memory (a
    compressed member that would inflate beyond reason, a variable larger than any BN layer's),
    HDF5 links are not followed, and whatever is malformed is a ValueError naming the file and,
    where there is one, the layer.
    """
    import zipfile
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            # (Keras 3's model.save(folder, zipped=False) writes the archive's members into a folder)
            raise ValueError(f"load_batch_norms: {path} is a folder; it reads a .keras archive: save the model with "
                             "model.save('model.keras'), or zip the folder's members (config.json, model.weights.h5) "
                             "into one file")
        raise FileNotFoundError(f"load_batch_norms: no such file {path}")
    with path.open("rb") as handle:
        signature = handle.read(len(_HDF5_SIGNATURE))
    if signature == _HDF5_SIGNATURE:
        return _load_legacy_h5(path, axis)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise ValueError(f"load_batch_norms: {path} is not a Keras model archive (.keras, a zip file written "
                         "by model.save) nor a legacy HDF5 model (.h5); it may be truncated or another format"
                         ) from None
    with archive:
        h5py = _import_h5py()
        members = {info.filename: info for info in archive.infolist()}
        missing = [name for name in ("config.json", "model.weights.h5") if name not in members]
        if missing:
            raise ValueError(f"load_batch_norms: {path} lacks {' and '.join(missing)}: not a Keras model "
                             "archive (model.save('model.keras') writes both)")
        for name, info in members.items():
            _check_member_size(path, info, _MAX_CONFIG_BYTES if name == "config.json" else None)
        config = _parse_config(path, "config.json", lambda: archive.read("config.json"), zipfile.BadZipFile)
        layers = _model_layers(config, path, "config.json")
        found: dict = {}
        # Read in place (Keras stores the member uncompressed; a compressed one is decompressed as read).
        with archive.open("model.weights.h5") as stream:
            try:
                weights = h5py.File(stream, "r")
            except (OSError, ValueError) as error:
                raise ValueError(f"load_batch_norms: the weights in {path} cannot be read ({error})") from None
            with weights:
                _collect_batch_norms(layers, weights, "", found, path, axis, h5py)
    return found


_MAX_CONFIG_BYTES = 64 << 20        # a model's config.json is kilobytes; more is not a Keras file
_MAX_COMPRESSION_RATIO = 100        # float weights barely compress; a bomb inflates by thousands
_MAX_VARIABLE_VALUES = 1 << 24      # a BN variable holds one value per feature


def _import_h5py():
    try:
        import h5py
    except ImportError as error:
        raise ImportError("load_batch_norms reads the HDF5 weights of Keras files: pip install h5py") from error
    return h5py


def _parse_config(path, what: str, read, *errors) -> object:
    """The JSON of a model's config (``what``: the member or attribute it is read from), a ValueError naming it
    when it cannot be read or parsed."""
    try:
        text = read()
        return json.loads(text.decode() if isinstance(text, bytes) else text)
    except (ValueError, OSError, RecursionError, UnicodeDecodeError, *errors) as error:  # (a CRC mismatch: BadZipFile)
        raise ValueError(f"load_batch_norms: {path}: {what} cannot be read ({type(error).__name__}: "
                         f"{str(error)[:200]})") from None


def _model_layers(config, path, what: str) -> list:
    """The list of layer configs of a saved model's config (``{"class_name": ..., "config": {"layers": [...]}}``,
    as Keras 3 and tf.keras write it in both formats)."""
    root = config.get("config") if isinstance(config, dict) else None
    if isinstance(root, list) and config.get("class_name") == "Sequential":
        return root  # (Keras <= 2.2.4 wrote a Sequential's config as its layers' list; tf.keras still reads it)
    if isinstance(root, dict) and not isinstance(root.get("layers"), list) and isinstance(config.get("class_name"), str):
        # A subclassed model: Keras saves its constructor's arguments, not its layers' options (this is a
        # saved Keras model all the same, which the message below would deny).
        raise ValueError(f"load_batch_norms: {path} holds a subclassed model ({config['class_name'][:80]!r}): "
                         "Keras saves its constructor's arguments, not its layers' options, so its "
                         "BatchNormalization layers cannot be rebuilt from the file; load the model in Keras "
                         "and take each layer with normkit.keras.from_keras(model.<attribute>), or save a "
                         "Functional or Sequential model")
    if not isinstance(root, dict) or not isinstance(root.get("layers"), list):
        raise ValueError(f"load_batch_norms: {path}'s {what} has no list of layers (config.layers): "
                         "not a saved Keras model")
    return root["layers"]


def _load_legacy_h5(path, axis) -> dict:
    """``load_batch_norms`` of an HDF5 file: a legacy ``model.save("x.h5")`` model of tf.keras 2 or Keras 3 (the
    model's JSON in the root's ``model_config`` attribute, each top-level layer's weights in
    ``model_weights/<layer name>``, named by its ``weight_names`` attribute); a weights-only file is refused."""
    h5py = _import_h5py()
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as error:
        raise ValueError(f"load_batch_norms: {path} is an HDF5 file that cannot be read ({str(error)[:200]}); it "
                         "may be truncated") from None
    with handle:
        if "model_config" not in handle.attrs:
            # A decision (docs/keras.md): the options are not in the file, and guessing them (Keras' defaults) would
            # give layers that compute something else without a word.
            raise ValueError(f"load_batch_norms: {path} is an HDF5 weights file (model.save_weights('x.h5') or "
                             "'.weights.h5'): it holds no layer options (axis, momentum, epsilon, center, scale, "
                             "renorm...), only arrays. Where Keras is installed, build the model, load_weights() this "
                             "file and save the model with model.save('model.keras') (or 'model.h5'), and pass that "
                             "file; without Keras, read the arrays with h5py and pass each layer's config, build "
                             "config and arrays to normkit.keras.from_keras_config")
        config = _parse_config(path, "its model_config attribute",
                               lambda: _read_attribute(handle, "model_config", h5py))
        layers = _model_layers(config, path, "model_config")
        weights = _subgroup(handle, "model_weights", h5py)
        if weights is None:
            raise ValueError(f"load_batch_norms: {path} holds a model's config but no model_weights group of this "
                             "file: it was saved without weights, or is damaged")
        found: dict = {}
        _collect_batch_norms(layers, _LegacyEntry(weights, ()), "", found, path, axis, h5py)
    return found


_MAX_NAMES = 1 << 16                 # a layer's weight_names: a few per inner layer


def _read_attribute(group, name: str, h5py, limit: int = _MAX_CONFIG_BYTES):
    """An HDF5 attribute of text (a string or an array of strings), its declared size checked before it is read.
    A variable-length string is stored in the file itself, uncompressed: it is never larger than the file."""
    try:
        attribute = group.attrs.get_id(name)
        size, shape, kind = attribute.get_storage_size(), attribute.shape, attribute.dtype
    except (KeyError, OSError, ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"attribute {name!r} of {group.name} cannot be read ({str(error)[:200]})") from None
    count = math.prod(shape) if shape else 1
    if size > limit or count > _MAX_NAMES or len(shape) > 1:
        raise ValueError(f"attribute {name!r} of {group.name} declares {size} bytes, shape {shape}: not a Keras "
                         "file's")
    text = h5py.check_string_dtype(kind) is not None or kind.kind in "SU"
    if not text and count:
        raise ValueError(f"attribute {name!r} of {group.name} holds {kind} values, not text")
    try:
        value = group.attrs[name]
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"attribute {name!r} of {group.name} cannot be read ({str(error)[:200]})") from None
    if np.ndim(value) == 0:
        return _keras_name(value.item() if isinstance(value, np.ndarray) else value)
    return [_keras_name(item) for item in np.asarray(value).tolist()]


def _weight_names(group, h5py) -> list:
    """A legacy layer group's ``weight_names``; Keras splits a list over HDF5's 64 KB header into ``weight_names0``,
    ``weight_names1``, ...."""
    if "weight_names" in group.attrs:
        chunks = [_read_attribute(group, "weight_names", h5py)]
    else:
        chunks = []
        while f"weight_names{len(chunks)}" in group.attrs and len(chunks) < _MAX_NAMES:
            chunks.append(_read_attribute(group, f"weight_names{len(chunks)}", h5py))
    names = [name for chunk in chunks for name in ([chunk] if isinstance(chunk, str) else chunk)]
    if len(names) > _MAX_NAMES:
        raise ValueError(f"{group.name} names {len(names)} weights: not a Keras file's")
    return names


class _LegacyEntry:
    """A layer's place in a legacy HDF5 model: the group of the top-level layer it belongs to
    (``model_weights/<name>``) and its path of layer names from there. Layers of a nested model have no group of
    their own: their weights are the top-level layer's, named in its ``weight_names``. ``wrapped``: the layer of a
    wrapper (TimeDistributed), whose weights tf.keras names by the wrapper's path (``steps/gamma:0``)."""

    __slots__ = ("group", "names", "wrapped")

    def __init__(self, group, names: tuple, wrapped: bool = False):
        self.group, self.names, self.wrapped = group, names, wrapped

    def child(self, name: str, h5py, wrapped: bool = False) -> Optional["_LegacyEntry"]:
        if self.names:
            return _LegacyEntry(self.group, self.names + (name,), wrapped)
        group = _subgroup(self.group, name, h5py)  # (a top-level layer: its own group, or no weights)
        return None if group is None else _LegacyEntry(group, (name,), wrapped)


# A BatchNormalization's variables in Keras' order (tf.keras and Keras 3 name them alike).
_KERAS_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


def _ends_alike(owner: tuple, path: tuple) -> bool:
    """Whether two paths of layer names, neither empty, end alike: the shorter is the longer's end (tf.keras names a
    nested layer's weights by the layer's own name, Keras 3 by its whole path)."""
    common = min(len(owner), len(path))
    return common > 0 and owner[-common:] == path[-common:]


def _raw_bfloat16(config: dict) -> bool:
    """Whether a saved layer's variables are bfloat16 by its policy: Keras 3's legacy HDF5 writer stores them as raw
    2-byte values without the dtype attribute the .keras format adds."""
    try:
        return _policy_name(config.get("dtype")) == "bfloat16"
    except (ValueError, TypeError, AttributeError):
        return False  # (from_config names a policy it cannot read)


def _read_legacy_variables(entry: _LegacyEntry, h5py, raw_bfloat16: bool = False) -> list:
    """The variables of the BN layer at ``entry``, in Keras' order, each checked before it is read.

    Keras reads a top-level layer's group positionally: all its weights are the layer's. A nested model's group
    lists every inner layer's weights, trainable ones first, so a BN's are picked by name: tf.keras names them
    ``bn/gamma:0``, Keras 3 by their whole path (``outer/inner/bn/gamma``); either path ends where the other does. A
    wrapper holds one layer: a top-level wrapper's group is its layer's weights alone, as a top-level layer's."""
    mine: dict = {}
    paths = [entry.names] + ([entry.names[:-1]] if entry.wrapped else [])
    whole_group = len(entry.names) == 1 or (entry.wrapped and len(entry.names) == 2)
    for name in _weight_names(entry.group, h5py):
        parts = name.split("/")
        owner, variable = tuple(parts[:-1]), parts[-1].split(":")[0]  # (tf.keras appends the output index, ":0")
        if not whole_group and not any(_ends_alike(owner, path) for path in paths):
            continue
        if variable in mine:
            raise ValueError(f"its weights are ambiguous in {entry.group.name}: {mine[variable]!r} and {name!r} are "
                             f"both its {variable} by name")
        mine[variable] = name
    if not mine:
        raise ValueError(f"{entry.group.name}'s weight_names name none of its variables: the weights do not match "
                         "the config")
    unknown = sorted(set(mine) - set(_KERAS_VARIABLES))
    if unknown:
        raise ValueError(f"its weights {[mine[v] for v in unknown][:8]} are not a BatchNormalization's "
                         f"({', '.join(_KERAS_VARIABLES)})")
    arrays = []
    for variable in sorted(mine, key=_KERAS_VARIABLES.index):
        member = entry.group
        for part in mine[variable].split("/"):  # (no link followed at any level)
            member = _hard_member(member, part, h5py) if isinstance(member, h5py.Group) else None
        arrays.append(_read_dataset(member, mine[variable], h5py, raw_bfloat16))
    return arrays


def _check_member_size(path, info, limit: Optional[int]) -> None:
    if limit is not None and info.file_size > limit:
        raise ValueError(f"load_batch_norms: {path}: {info.filename} would be {info.file_size} bytes (more than "
                         f"{limit}): not a Keras model's")
    if info.compress_size and info.file_size > _MAX_COMPRESSION_RATIO * info.compress_size + (1 << 20):
        raise ValueError(f"load_batch_norms: {path}: {info.filename} would inflate from {info.compress_size} to "
                         f"{info.file_size} bytes: refused (a Keras model's weights barely compress)")


def _keras_name(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hard_member(group, key, h5py):
    """``group[key]`` when it is a plain member (a group or dataset of this file), else None: soft and
    external links are not followed (they may point outside the file, or in a loop)."""
    try:
        link = group.get(key, getlink=True)
    except (KeyError, TypeError, ValueError, OSError, RuntimeError):
        return None
    return group[key] if isinstance(link, h5py.HardLink) else None


def _subgroup(group, key, h5py):
    member = None if group is None or not isinstance(group, h5py.Group) else _hard_member(group, key, h5py)
    return member if isinstance(member, h5py.Group) else None


def _collect_batch_norms(layers: list, group, prefix: str, found: dict, path, axis, h5py,
                         shared: Optional[dict] = None) -> None:
    """Walk a model's layer configs beside its HDF5 group (``layers/<key>/vars`` carries each layer's name).

    One layer object in two places (a layer of a nested model also called in the outer one, one layer in two
    nested models, or wrapped in TimeDistributed and called directly) is in the config at each place, but Keras
    writes its weights once, at the first place in this same order: ``shared`` maps each loaded layer's name and
    configs to its path, and a later place without weights gets that same loaded layer (as in Keras, one layer)."""
    shared = {} if shared is None else shared
    by_name = {}
    legacy = isinstance(group, _LegacyEntry)  # (a legacy HDF5 model's: layers found by name, in all Kerases)
    members = None if legacy else _subgroup(group, "layers", h5py)
    if members is not None:
        for key in members:
            entry = _subgroup(members, key, h5py)
            variables = _subgroup(entry, "vars", h5py)
            if variables is not None and "name" in variables.attrs:
                by_name[_keras_name(variables.attrs["name"])] = entry
    # Keras 3.0-3.5 and tf.keras 2.13-2.15 write no names: there a layer's group is found as Keras finds it, by its
    # path, the snake_case class name counted in the model's order (batch_normalization, batch_normalization_1, ...).
    # Without this every BN of such a file "had no weights".
    by_path = not legacy and not by_name
    counts: dict = {}
    for layer in layers:
        if (isinstance(layer, dict) and layer.get("class_name") == "Sequential" and isinstance(layer.get("config"), list)
                and isinstance(layer.get("name"), str)):
            # A nested Sequential as Keras <= 2.2.4 wrote it (its layers' list, its name beside it in a functional model)
            layer = {**layer, "config": {"name": layer["name"], "layers": layer["config"]}}
        if not isinstance(layer, dict) or not isinstance(layer.get("config"), dict):
            continue
        layer_config = layer["config"]
        # (a functional model names each layer beside its config too; tf.keras writes a config it could not get as {})
        name = str(layer_config.get("name", layer.get("name")))
        where = prefix + name
        if legacy:
            by_name[name] = group.child(name, h5py)
        elif by_path:
            key = _keras_path_key(str(layer.get("class_name")), counts)
            by_name[name] = None if members is None else _subgroup(members, key, h5py)
        wrapped = layer_config.get("layer")
        if layer.get("class_name") in _BATCH_NORM_CLASSES:
            _load_saved_batch_norm(_batch_norm_config(layer, where, path), _saved_build_config(layer), by_name.get(name), where,
                                   found, path, axis, h5py, shared)
        elif layer.get("class_name") == "TimeDistributed" and not (
                isinstance(wrapped, dict) and isinstance(wrapped.get("class_name"), str)
                and isinstance(wrapped.get("config"), dict)):
            # A wrapper always holds one layer's config; without it this file's TimeDistributed layer (whose weights
            # may be a BN's) was skipped silently, and its BN missing from the result.
            raise ValueError(f"load_batch_norms: {path}: layer {where!r}: TimeDistributed's wrapped layer "
                             f"{str(wrapped)[:80]} is not a layer config (a dict with a class_name and a config)")
        elif layer.get("class_name") == "TimeDistributed" and wrapped["class_name"] in _BATCH_NORM_CLASSES:
            # The wrapped layer as Keras built it, on one time step's shape: Keras 3's wrapper calls it once per
            # step (statistics of each step in training), which the loaded layer does when called per step too.
            where = f"{where}/{wrapped['config'].get('name')}"
            entry = by_name.get(name)
            # (legacy HDF5: the wrapper's weights, the wrapped layer's named under it; else its "layer" group)
            entry = (entry.child(str(wrapped["config"].get("name")), h5py, wrapped=True) if legacy and entry is not None
                     else _subgroup(entry, "layer", h5py))
            _load_saved_batch_norm(_batch_norm_config(wrapped, where, path), _saved_build_config(wrapped), entry, where,
                                   found,
                                   path, axis, h5py, shared)
        elif isinstance(layer_config.get("layers"), list):  # a nested model (Sequential, Functional)
            _collect_batch_norms(layer_config["layers"], by_name.get(name), where + "/", found, path, axis, h5py,
                                 shared)
        elif _holds_batch_norm_variables(by_name.get(name), h5py):
            # A custom layer saves its constructor's arguments, not its sublayers' options: a BN inside cannot be
            # rebuilt, and was left out of the result without a word.
            warnings.warn(f"load_batch_norms: {path}: layer {where!r} ({str(layer.get('class_name'))[:80]}) holds "
                          "BatchNormalization-like variables in sublayers, which are not loaded: a custom layer's file "
                          "saves its constructor's arguments, not its sublayers' options (and wrappers other than "
                          "TimeDistributed(BatchNormalization) are not searched). Load the model in Keras and take "
                          "each with normkit.keras.from_keras(layer.<attribute>)", UserWarning, stacklevel=2)


# The saved class names of Keras' BatchNormalization: tf.keras 2.2-2.15's SyncBatchNormalization is the layer with
# synchronized=True (tf.keras builds it so), saved under its own name; TensorFlow 1.13 wrote BatchNormalizationV1 and
# BatchNormalizationV2, which tf.keras reads as BatchNormalization. Passed over, their layers were missing silently.
_BATCH_NORM_CLASSES = {"BatchNormalization": {}, "SyncBatchNormalization": {"synchronized": True},
                       "BatchNormalizationV1": {}, "BatchNormalizationV2": {}}


def _batch_norm_config(layer: dict, where: str, path) -> dict:
    """A saved BN layer's config, with what its class implies (SyncBatchNormalization: synchronized=True)."""
    if layer["class_name"] == "BatchNormalizationV1" and layer["config"].get("trainable") is False:
        # tf.keras reads this name as its V1 class (batch_normalization_v1, _USE_V2_BEHAVIOR=False), whose frozen layer
        # still normalizes a training call by the batch's statistics (updating nothing); loaded without a word, the
        # layer runs such calls in inference mode, as Keras 2/3's frozen layer does.
        warnings.warn(f"load_batch_norms: {path}: layer {where!r} is a frozen BatchNormalizationV1 (TensorFlow 1.x): "
                      "tf.keras normalizes its training calls by the batch's statistics without updating the moving "
                      "ones; the loaded layer (trainable=False) uses its moving statistics in every call, as Keras 2/3's "
                      "frozen layer does. For V1's rule: layer.trainable = True, layer.momentum = 1.0 (no update) and "
                      "requires_grad_(False) on layer.gamma and layer.beta", UserWarning, stacklevel=2)
    return {**layer["config"], **_BATCH_NORM_CLASSES[layer["class_name"]]}


_BATCH_NORM_STATISTICS = ("moving_mean", "moving_variance")


def _holds_batch_norm_variables(entry, h5py) -> bool:
    """Whether the HDF5 place of a layer the walk does not enter (not a BN, wrapper or model) holds a sublayer's
    variables that look like a BatchNormalization's: in a legacy file, a weight named moving_mean or moving_variance
    (its own group's names, for a top-level layer); in a .keras file, a sublayer group whose ``vars`` are two to
    seven 1-D arrays of one length (its own ``vars`` aside). Only metadata is read, a few levels deep."""
    if isinstance(entry, _LegacyEntry):
        if len(entry.names) != 1:
            return False  # (a nested layer's names are in its model's group, among every other layer's)
        try:
            names = _weight_names(entry.group, h5py)
        except ValueError:
            return False  # (not read here: nothing of it is loaded)
        return any(name.split("/")[-1].split(":")[0] in _BATCH_NORM_STATISTICS for name in names)
    if entry is None or not isinstance(entry, h5py.Group):
        return False
    # Breadth-first, a bounded number of groups in all: an untrusted file may hold millions of members, or hard links
    # back up its tree (a cycle), which a walk bounded by depth alone would visit without end.
    pending, visited = [(entry, 0)], 0
    while pending and visited < 1024:
        group, depth = pending.pop(0)
        for key in itertools.islice(group, 256):
            child = None if key == "vars" else _subgroup(group, key, h5py)
            visited += 1
            if child is None:
                continue
            variables = _subgroup(child, "vars", h5py)
            if variables is not None:
                arrays = [_hard_member(variables, name, h5py) for name in itertools.islice(variables, 8)]
                shapes = {array.shape for array in arrays if isinstance(array, h5py.Dataset)}
                if 2 <= len(arrays) <= 7 and len(shapes) == 1 and len(next(iter(shapes))) == 1:
                    return True
            if depth < 4:
                pending.append((child, depth + 1))
    return False


def _keras_path_key(class_name: str, counts: dict) -> str:
    """The key Keras' saving gives a layer of class ``class_name`` in a model's ``layers`` group: its
    ``naming.to_snake_case``, then ``_1``, ``_2``, ... for the later layers of that class (``_get_unique_name``)."""
    key = re.sub(r"\W+", "", class_name)
    key = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", key)
    key = re.sub("([a-z])([A-Z])", r"\1_\2", key).lower()
    if key in counts:
        counts[key] += 1
        return f"{key}_{counts[key]}"
    counts[key] = 0
    return key


def _without_sharing_ids(value):
    """A config without the ``shared_object_id`` keys Keras adds to an object it serializes twice (not to the first
    time, at times): the same layer's two configs differ by them alone."""
    if isinstance(value, dict):
        return {key: _without_sharing_ids(item) for key, item in value.items() if key != "shared_object_id"}
    if isinstance(value, list):
        return [_without_sharing_ids(item) for item in value]
    return value


def _load_saved_batch_norm(config: dict, build_config, entry, where: str, found: dict, path, axis, h5py,
                           shared: dict) -> None:
    """``found[where]``: the BN layer of ``config`` with the weights of HDF5 group ``entry`` (``entry/vars``)."""
    try:
        key = json.dumps(_without_sharing_ids([config, build_config]), sort_keys=True, default=repr)
    except (ValueError, RecursionError):  # (a config too deep to write back: never taken for another place's)
        key = None
    if entry is None and key in shared:
        found[where] = found[shared[key]]  # (the same Keras layer, met again: its weights were written once)
        return
    if entry is None:
        raise ValueError(f"load_batch_norms: {path} has no weights for BatchNormalization layer "
                         f"{where!r} (the weights file does not match the config)")
    variables = entry if isinstance(entry, _LegacyEntry) else _subgroup(entry, "vars", h5py)
    if variables is None:
        # (a TimeDistributed wrapper's group without layer/vars, or with a dataset or link there: the walk found
        # the wrapper's group, not the layer's variables, and reading None failed as "'NoneType' object is not
        # iterable")
        raise ValueError(f"load_batch_norms: {path} has no weights for BatchNormalization layer "
                         f"{where!r} (no vars group of this file for it: the weights file does not match the config)")
    try:
        arrays = (_read_legacy_variables(variables, h5py, _raw_bfloat16(config)) if isinstance(variables, _LegacyEntry)
                  else _read_variables(variables, h5py))
        found[where] = _batch_norm_from_saved(config, build_config, arrays, axis)
    except Exception as error:  # an untrusted file: whatever is malformed, say where
        raise ValueError(f"load_batch_norms: {path}: layer {where!r}: {error}") from None
    if key is not None:
        shared.setdefault(key, where)


def _read_variables(variables, h5py) -> list:
    """A layer's saved variables ("0", "1", ...) as float arrays, each checked before it is read."""
    keys = list(itertools.islice(variables, len(_KERAS_VARIABLES) + 1))
    if len(keys) > len(_KERAS_VARIABLES):
        # (before anything is read: each may declare 2**24 values, and every one was read before the count was
        # compared with the layer's)
        raise ValueError(f"its vars group holds {len(variables)} variables: a BatchNormalization has at most "
                         f"{len(_KERAS_VARIABLES)} ({', '.join(_KERAS_VARIABLES)})")
    if not all(key.isdigit() for key in keys) or sorted(map(int, keys)) != list(range(len(keys))):
        raise ValueError(f"its variables are named {keys[:8]}, not 0, 1, ...")
    return [_read_dataset(_hard_member(variables, key, h5py), key, h5py) for key in sorted(keys, key=int)]


def _read_dataset(dataset, key: str, h5py, raw_bfloat16: bool = False) -> np.ndarray:
    """A saved variable (HDF5 dataset ``key``, None when it is not one of this file) as a float array, its declared
    size checked before it is read. ``raw_bfloat16``: the layer's policy is bfloat16, so 2-byte raw values without a
    dtype attribute are its bfloat16 variables (Keras 3's legacy HDF5 writer)."""
    if not isinstance(dataset, h5py.Dataset):
        raise ValueError(f"variable {key} is not an array of this file")
    if dataset.ndim > 8 or dataset.size > _MAX_VARIABLE_VALUES:
        raise ValueError(f"variable {key} has shape {dataset.shape}: too large for a BN variable")
    kind, declared = dataset.dtype, _keras_name(dataset.attrs.get("dtype", ""))
    if kind.kind == "V" and kind.itemsize == 2 and (declared == "bfloat16" or (raw_bfloat16 and not declared)):
        # Keras writes bfloat16 as raw 2-byte values: the high half of a float32, exactly.
        raw = np.asarray(dataset[()]).view("<u2").astype("<u4")
        return (raw << 16).view("<f4")
    if kind.kind == "f":
        return np.asarray(dataset[()], dtype=kind)
    raise ValueError(f"variable {key} holds {kind} values, not floating-point numbers")


def _saved_build_config(layer: dict):
    """A saved layer's build config. Keras 3's legacy HDF5 writer saves none, but in a functional model the layer's
    call names its input tensor and that tensor's shape, which is the same; tf.keras' Sequential gives its first layer
    the ``batch_input_shape`` written in that layer's config; elsewhere (a Sequential's layers, tf.keras'
    HDF5 files) there is none, and the layer is built from its weights (the input rank unknown)."""
    if layer.get("build_config") is not None:
        return layer["build_config"]
    shape = layer.get("config", {}).get("batch_input_shape") if isinstance(layer.get("config"), dict) else None
    if shape is not None:
        # (tf.keras' Sequential built its first layer on the input shape it was given, written in the layer's config)
        return {"input_shape": shape}
    try:
        tensor = layer["inbound_nodes"][0]["args"][0]
        if tensor["class_name"] == "__keras_tensor__":
            return {"input_shape": tensor["config"]["shape"]}
    except (KeyError, IndexError, TypeError):
        pass
    return None


def _built_keras_axis(config: dict) -> dict:
    """A built Keras layer's config with its axis as normkit reads it: tf.keras writes a list of positive axes
    (``[3]``: the int 3), shifted by one past the dimension a ghost-batch layer adds."""
    config = dict(config)
    saved_axis = config.get("axis", -1)
    if isinstance(saved_axis, list) and saved_axis and all(type(a) is int for a in saved_axis):
        saved_axis = [a - 1 for a in saved_axis] if config.get("virtual_batch_size") is not None else saved_axis
        config["axis"] = saved_axis[0] if len(saved_axis) == 1 else saved_axis
    return config


def _batch_norm_from_saved(config: dict, build_config, arrays: list, axis) -> BatchNormalization:
    """The layer of a saved config and its variables' arrays, tf.keras 2's ways of saving undone: a built layer's
    axis as a list of positive axes (``[3]``), shifted by one past the dimension a ghost-batch layer adds, and
    ghost-batch or multi-axis weights in the broadcast shape of its inputs (``(1, 1, C)``)."""
    if not arrays:
        raise ValueError("it was saved unbuilt: it has no weights")
    config = _built_keras_axis(config)
    ghost = config.get("virtual_batch_size") is not None
    if axis is not None and not isinstance(config.get("axis"), int):
        raise ValueError(f"load_batch_norms(axis={axis}): it normalizes over axes {config.get('axis')}; "
                         "only a single feature axis can be moved")
    if build_config is None:
        build_config = _build_config_from_weights(config, arrays, ghost)
    if build_config is None:
        return _built_from_weights(config, arrays, axis)
    if not isinstance(build_config, dict) or "input_shape" not in build_config:
        raise ValueError(f"its build_config {str(build_config)[:80]} has no input_shape")
    shape = build_config["input_shape"]
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 8
            or not all(size is None or (type(size) is int and 0 <= size <= _MAX_VARIABLE_VALUES) for size in shape)):
        raise ValueError(f"its build_config input_shape {str(shape)[:80]} is not a shape")
    if isinstance(config.get("axis", -1), (int, list)):
        features = math.prod(shape[a] or 0 for a in canonicalize_axes(config.get("axis", -1), len(shape)))
        if features > _MAX_VARIABLE_VALUES:
            raise ValueError(f"its build_config input_shape {shape} gives {features} features: too many")
    if axis is not None:
        shape = list(shape)
        rank = len(shape)
        (old,), (new,) = canonicalize_axes(config["axis"], rank), canonicalize_axes(axis, rank, name="axis")
        shape.insert(new, shape.pop(old))
        config, build_config = {**config, "axis": axis}, {**build_config, "input_shape": shape}
    layer = from_keras_config(config, build_config)
    layer.set_weights(_feature_shaped(arrays, layer))
    return layer


def _build_config_from_weights(config: dict, arrays: list, ghost: bool) -> Optional[dict]:
    """A build config for a layer saved without one, where its weights tell the input rank: tf.keras' ghost-batch and
    multi-axis weights have the inputs' broadcast shape (one more dimension for the ghost batches, first). None
    where they do not (one value per feature: any rank)."""
    widest = max(arrays, key=np.ndim)
    axes = config.get("axis")
    axes = [axes] if isinstance(axes, int) else axes
    rank = widest.ndim - ghost
    if widest.ndim <= 1 or not isinstance(axes, list) or not all(type(a) is int and 0 < a < rank for a in axes):
        return None
    shape = [None] * rank
    for a in axes:
        shape[a] = int(widest.shape[a + ghost])
    return {"input_shape": shape}


def _built_from_weights(config: dict, arrays: list, axis) -> BatchNormalization:
    """The layer built on its weights' feature count alone, as a layer loading a state_dict is: the input rank is
    unknown, so its axis stays as saved (a negative one counting from the end) and ``get_build_config()`` is None
    until ``build(input_shape)``."""
    layer = BatchNormalization.from_config(config if axis is None else {**config, "axis": axis})
    if not isinstance(layer.axis, int) or arrays[0].ndim != 1:
        raise ValueError(f"its axis {layer.axis} and weights of shape {arrays[0].shape} do not tell its input's rank "
                         "(no build_config)")
    layer._create(tuple(arrays[0].shape), layer.axis)
    layer.set_weights(arrays)
    return layer


def _feature_shaped(arrays: list, layer: BatchNormalization) -> list:
    """Saved arrays in the layer's weights' shapes where they differ only by size-1 dimensions (tf.keras' broadcast
    shapes); any other shape is left for ``set_weights`` to refuse."""
    shaped = list(arrays)
    for index, (array, target) in enumerate(zip(arrays, (tuple(w.shape) for w in layer.weights))):
        if (array.ndim > len(target) and array.size == math.prod(target)
                and [d for d in array.shape if d != 1] == [d for d in target if d != 1]):
            shaped[index] = array.reshape(target)
    return shaped
