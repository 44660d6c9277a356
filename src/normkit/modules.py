"""nn.Module layers: thin holders of parameters and buffers that validate and call functional.py.

Every layer is the same pipeline configured differently (the design in ../shared/DESIGN.md,
beside the repository): which axes are reduced, which carry weight and bias, and where the
statistics come from. The math of each is written once, in its docstring; the arithmetic lives
in functional.py.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import sys
import warnings
from collections.abc import Iterable
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import functional as F
from . import kernels
from .axes import broadcasts_to, canonicalize_axes, check_feature_axes
from .options import (apply_initializer, check_process_group, resolve_constraint, resolve_initializer,
                      resolve_regularizer)
from .stats import (RenormClipping, check_adjustment, check_ghost_batch, check_ghost_layout,  # noqa: F401
                    check_virtual_batch_size, group_counts, momentum_factor)  # (the checks: keras.py imports them from here)
from .stats import check_num_groups, integer_size

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


def _check_num_features(num_features, *, name="num_features", tuples=True):
    """A positive int, or (``tuples``) a non-empty tuple of them; NumPy integers count as ints (returned as
    Python ints). Not an integer: TypeError; not positive: ValueError."""
    what = "a positive int (or a tuple of them)" if tuples else "a positive int"
    num_features = integer_size(num_features)  # (a 0-dim integer tensor is a size to torch.nn)
    single = isinstance(num_features, numbers.Integral)
    try:
        entries = (num_features,) if single or not tuples else tuple(integer_size(entry) for entry in num_features)
    except TypeError:
        entries = (num_features,)
    if not entries:
        raise ValueError(f"{name} must be {what}, got an empty {type(num_features).__name__}")
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, numbers.Integral):
            raise TypeError(f"{name} must be {what}, got {num_features!r} of type {type(num_features).__name__}")
        if entry <= 0:
            raise ValueError(f"{name} must be {what}, got {num_features!r}")
    return int(num_features) if single else tuple(int(entry) for entry in entries)


def _as_given(number: float):
    """eps/momentum kept as the caller wrote them when they are plain Python numbers (the repr then reads
    as torch.nn's: eps=1, not eps=1.0); other real numbers (NumPy scalars) become floats."""
    return number if type(number) in (int, float) else float(number)


def _eps_as_given(eps, name="eps"):
    """An eps checked as the constructors check it, kept as given (``_as_given``)."""
    F.check_eps(eps, name=name)
    return _as_given(eps)


def _check_momentum(momentum, *, name="momentum"):
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (the weight of the new batch) or None "
                         f"(cumulative average), got {momentum!r}")
    return _as_given(momentum)


_FULL_PRECISION = (torch.float32, torch.float64)
_FEATURES_FIRST, _FEATURES_LAST = F._FEATURES_FIRST, F._FEATURES_LAST  # (rank 4/5: NHWC <-> NCHW views)

_tracing_state = F._tracing_state  # (sizes unchecked while a trace records: see functional._tracing_state)


def _onnx_exporting() -> bool:
    """Whether torch.onnx.export is running, by either exporter (read only while a trace or torch.export runs, and
    only where torch.onnx is imported: torch.onnx.is_in_onnx_export costs ~2 us)."""
    if (_tracing_state() is None and not torch.compiler.is_exporting()) or "torch.onnx" not in sys.modules:
        return False
    # The dynamo exporter retries a failed torch.export(strict=False) with strict=True, where Dynamo folds
    # torch.onnx.is_in_onnx_export() to False: its flag is read as well.
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:  # (another torch's layout: the public flag alone)
        _flags = None
    return torch.onnx.is_in_onnx_export() or bool(getattr(_flags, "_is_onnx_exporting", False))


# (The checks of the options that BatchNorm, the Keras-vocabulary layer and the functional twins share,
# check_virtual_batch_size, check_ghost_layout and check_adjustment, are in stats.py.)

# What gives a BN layer statistics to use out of training, where without running statistics (track_running_stats=False,
# or its buffers set to None) it normalizes by the batch's, as torch.nn's layer does.
_NO_RUNNING_STATISTICS_HINT = ("give the layer a larger batch, running statistics (it has track_running_stats=False or "
                               "its buffers set to None: build it with track_running_stats=True and train it), or use "
                               "GroupNorm/LayerNorm")


def _buffer_of(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """A buffer read from the module's dict where it is there (cheaper than Module.__getattr__), else the attribute
    (a parametrized buffer, or one replaced by a plain attribute)."""
    buffers = module._buffers
    return buffers[name] if name in buffers else getattr(module, name, None)


def _device_of(module: nn.Module, input) -> torch.device:
    """The device of the layer's tensors (the one its collectives use), else of the input, else the CPU."""
    for tensor in (*module._parameters.values(), *module._buffers.values(), input):
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return torch.device("cpu")


def _deepcopy_sharing_group(module: nn.Module, memo: dict) -> nn.Module:
    """copy.deepcopy of a module whose ``process_group`` the copy shares: a group is a handle on the processes'
    communicator, not data, and torch's ProcessGroup cannot be copied (a TypeError, 'cannot pickle ProcessGroup', for
    a layer synchronized over a dist.new_group: EMA copies, fold_batch_norm's copy). Otherwise the default copy."""
    group = module.__dict__.get("process_group")
    if group is not None:
        memo.setdefault(id(group), group)
    copied = type(module).__new__(type(module))
    memo[id(module)] = copied
    # A parametrized module's class (torch.nn.utils.parametrize) refuses __getstate__ to block pickling and
    # leaves deepcopy to the class's own __deepcopy__ (this one): there the dict, as parametrize's own copy
    # takes it. Elsewhere __getstate__, which drops what must not be copied (module.compile()'s compiled call,
    # bound to the original: the copy's calls would have trained the original).
    parametrized = torch.nn.utils.parametrize.is_parametrized(module)
    state = module.__dict__ if parametrized else module.__getstate__()
    copied.__setstate__(copy.deepcopy(state, memo))
    return copied


def _full_precision_buffers(layer) -> bool:
    """Whether the running statistics, where there are any, are float32 or float64."""
    running_mean = _buffer_of(layer, "running_mean")
    return running_mean is None or running_mean.dtype in _FULL_PRECISION


def _affine_of(module: nn.Module) -> tuple:
    """(weight, bias), read from the parameter dict where they are there: Module.__getattr__ costs more than
    a small layer's op. (A parametrization or a weight-computing hook moves them out of it.)"""
    params = module._parameters
    if "weight" in params and "bias" in params:
        return params["weight"], params["bias"]
    return module.weight, module.bias


def _dtype_fits(dtype: torch.dtype, reference: Optional[torch.Tensor]) -> bool:
    """Whether ATen takes input of ``dtype`` with the layer's tensors: the same dtype, or float16/bfloat16 input
    with float32 parameters and buffers (mixed precision)."""
    return (reference is None or dtype == reference.dtype
            or (dtype in F.LOW_PRECISION and reference.dtype == torch.float32))


_under_vmap = F._under_vmap


def _shown_name(layer: nn.Module) -> str:
    """The layer's name in messages: the one the user built (keras.py's layer around its normkit.BatchNorm sets
    ``_built_by``), else its class."""
    return getattr(layer, "_built_by", None) or type(layer).__name__


def warn_group_without_synchronized(layer: nn.Module, process_group, synchronized: bool) -> None:
    """Warn at construction where a process group comes without the flag that uses it: torch.nn.SyncBatchNorm
    synchronizes by its class, so ``BatchNorm(C, process_group=group)`` is a likely port of it, and it computed local
    statistics without a word (the group is kept: setting the flag later uses it)."""
    if process_group is not None and not synchronized:
        from .distributed import _stacklevel_of_caller  # (at the user's line, below a subclass's constructor too)
        warnings.warn(f"{type(layer).__name__}: process_group was given but synchronized=False, so each process "
                      "computes its statistics alone and the group is unused; pass synchronized=True to share them "
                      "over the group (torch.nn.SyncBatchNorm's behaviour)", UserWarning,
                      stacklevel=_stacklevel_of_caller())


def _transform_refusal(layer: nn.Module, error: RuntimeError, input=None) -> Optional[RuntimeError]:
    """The error to raise instead of ``error`` where a torch.func transform refused a training call's update of
    the running statistics (None elsewhere). torch's own errors name neither the layer nor a fix that reaches
    normkit's layers (vmap's points to torch.func.replace_all_batch_norm_modules_, which does not see them)."""
    if not torch._C._are_functorch_transforms_active():
        return None
    name = _shown_name(layer)
    fixes = ("switch the running statistics off with normkit.replace_all_batch_norm_modules_(model) (torch.func's "
             "own does not see normkit's layers) or track_running_stats=False, or call the model in eval mode "
             "(model.eval())")
    if "captured Tensor" in str(error):
        return RuntimeError(
            f"{name}: a training call inside a torch.func transform (grad, vjp, jvp, jacrev, jacfwd, hessian) updates "
            f"the running statistics in place, and the transform refuses to change tensors the function captured. "
            f"Pass the buffers in as an argument of the transformed function (torch.func.functional_call(model, "
            f"(params, buffers), (x,))), {fixes}")
    running_mean = _buffer_of(layer, "running_mean")
    if (isinstance(input, torch.Tensor) and _under_vmap(input) and isinstance(running_mean, torch.Tensor)
            and not _under_vmap(running_mean)):
        return RuntimeError(
            f"{name}: a training call under torch.func.vmap updates the running statistics in place, but they are "
            f"not batched (one set for every vmapped sample). For per-sample gradients, {fixes}; for an ensemble, "
            f"give each member its own buffers (torch.func.stack_module_state, and functional_call with the buffers "
            f"vmapped)")
    return None


def _autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type; False for types autocast does not know ("meta" raises there)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def _check_tensor_counts(layer: nn.Module, count: int, names) -> None:
    """A sample norm's weight, bias or running buffer replaced by a tensor of another size (``layer.weight =
    nn.Parameter(...)``): the ValueError naming it, as BatchNorm and the functional twins give, where ATen raised a
    RuntimeError. Asked only after ATen refused a call, so the common path pays nothing."""
    for name in names:
        tensor = getattr(layer, name, None)
        if tensor is not None and tensor.numel() != count:
            raise ValueError(f"{type(layer).__name__} has a {name} of {tensor.numel()} values (shape "
                             f"{tuple(tensor.shape)}): a tensor of another size was assigned to it; give it {count} "
                             "values, or build the layer for that size")


def _check_input_device(input: torch.Tensor, *tensors) -> None:
    """The input must be on the device of the layer's tensors. (ATen says "Tensor on device cpu is not on the
    expected device meta!" or "Expected all tensors to be on the same device", naming neither the input nor the
    layer.) A RuntimeError, as torch's, so code that catches torch's device errors keeps catching this one."""
    reference = next((t for t in tensors if t is not None), None)
    if reference is None or input.device == reference.device or reference.is_meta and input.is_meta:
        return
    raise RuntimeError(f"input is on device {input.device} but the layer's parameters/buffers are on "
                       f"{reference.device}: move the input (input.to({str(reference.device)!r})) or the layer "
                       f"(layer.to({str(input.device)!r}))")


def _check_input_dtype(input: torch.Tensor, *tensors, autocast_casts: bool = True) -> None:
    """The input's dtype must be the layer's (see ``_dtype_fits``), but where autocast casts it for the op.

    CUDA's autocast casts layer_norm's and group_norm's half-precision arguments to float32 (its float32 list);
    the CPU's casts none of the norms, and batch_norm is in no list on any device (BatchNorm passes
    ``autocast_casts=False``): there ATen refuses the mix under autocast as without it ("mixed dtype", torch.nn's
    layers included), and so does this check, before normkit's option paths compute such a batch."""
    reference = next((t for t in tensors if t is not None), None)
    if _dtype_fits(input.dtype, reference):
        return
    autocast = _autocast_on(input.device)
    if autocast and autocast_casts and input.dtype != torch.float64 and input.device.type != "cpu":
        return  # autocast casts these for the op (float64 it leaves alone, and ATen refuses the mix)
    # (torch.nn fails inside ATen with "mixed dtype"; some of normkit's option paths would silently compute
    # in the wider dtype instead)
    raise TypeError(f"input has dtype {input.dtype} but the layer's parameters/buffers are {reference.dtype}: cast "
                    f"the input (input.to({reference.dtype})) or the layer (layer.to({input.dtype}))"
                    + (" (autocast leaves this layer's input as it is)" if autocast else ""))


def _register_affine(module: nn.Module, shape, affine: bool, bias: bool, factory: dict) -> None:
    """weight = 1 and bias = 0 over ``shape`` (each optional), registered as None when absent (torch.nn's way)."""
    module.register_parameter("weight", nn.Parameter(torch.ones(shape, **factory)) if affine else None)
    module.register_parameter("bias", nn.Parameter(torch.zeros(shape, **factory)) if affine and bias else None)


def _reset_affine(module: nn.Module) -> None:
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _refuse_torchscript(module: nn.Module):
    """``__prepare_scriptable__`` of every normkit layer: torch.jit.script's own error would point into normkit's code."""
    raise TypeError(f"torch.jit.script cannot compile {type(module).__name__}: TorchScript (deprecated in PyTorch) "
                    "takes a subset of Python that normkit's layers are not written in. Use torch.export.export(model, "
                    "(example_input,)) or torch.compile(model) (both trace normkit's layers, training included), or "
                    "torch.jit.trace(model.eval(), example_input) for an inference TorchScript module")


def _fx_call_module(module: nn.Module, input, *args, **kwargs):
    """Under ``torch.fx.symbolic_trace`` (``input`` is a Proxy): the layer as one ``call_module`` node.

    fx treats torch.nn's modules as leaves and records a call of them; normkit's are not in torch.nn, so
    fx would run their forward on Proxies, whose shape checks and option branches cannot be decided
    (a TypeError deep in normkit, where torch.nn's model traces). The node calls the layer itself, so
    the traced GraphModule computes exactly what the eager layer does (options, masks, modes).
    """
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if path == "":  # (the traced root: a node calling the root would call itself)
        raise TypeError(f"torch.fx.symbolic_trace cannot trace {type(module).__name__} itself (its forward branches "
                        "on the input's shape and the layer's options); trace a model that holds it, where it "
                        "becomes one call_module node as torch.nn's layers do, or use torch.export.export")
    if type(module).forward is not _library_forward(module):
        # A subclass whose forward adds its own code around normkit's (an activation after the norm): that code is
        # traced into the graph already, so the node must compute normkit's forward alone. A call_module node ran
        # the subclass's whole forward, and the graph applied its additions a second time (silently wrong outputs).
        layer = tracer.create_proxy("get_attr", path, (), {})
        return tracer.create_proxy("call_function", _fx_library_forward, (layer, input, *args), kwargs)
    return tracer.create_proxy("call_module", path, (input, *args), kwargs)


def _library_forward(module: nn.Module):
    """The forward of the normkit class ``module`` derives from (BatchNorm's, LayerNorm's, the Keras layer's...)."""
    for cls in type(module).__mro__:
        if "forward" in cls.__dict__ and cls.__module__ in ("normkit.modules", "normkit.keras"):
            return cls.__dict__["forward"]
    return None


def _fx_library_forward(module: nn.Module, input, *args, **kwargs):
    """What a traced graph calls for a normkit layer whose subclass overrides ``forward``: normkit's forward alone
    (the subclass's own code around it is in the graph)."""
    return _library_forward(module)(module, input, *args, **kwargs)


class _NormBase(nn.Module):
    """Parameters ``weight``/``bias`` and buffers ``running_mean``/``running_var``/``num_batches_tracked``.

    Names, shapes, dtypes and state_dict keys are torch.nn's, so state_dicts load in
    both directions. Parameters and buffers are float32 by default whatever the input
    dtype (statistics of half-precision inputs are computed in float32).
    """

    _version = 2
    __prepare_scriptable__ = _refuse_torchscript

    def __init__(self, num_features, eps=1e-5, momentum: Optional[float] = 0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias: bool = True):
        super().__init__()
        self.eps = eps  # (checked by __setattr__, as every change later)
        self.num_features = _check_num_features(num_features)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        factory = {"device": device, "dtype": dtype}
        shape = (self.num_features,) if isinstance(self.num_features, int) else self.num_features
        _register_affine(self, shape, self.affine, bias, factory)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_var", torch.ones(shape, **factory))
            # The count is an integer whatever the dtype asked for (as in torch.nn).
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # Each option's check (a method name): the constructor's values and later changes both pass it.
    _OPTION_CHECKS = {"eps": "_checked_eps", "momentum": "_checked_momentum"}

    def __setattr__(self, name, value):
        # Options may change on a built layer, as torch.nn's momentum and eps may: the change is checked as the
        # constructor checks it (unchecked, an instance norm took a NaN, negative or 1e12 momentum and moved its
        # running statistics silently, and a string failed inside ATen, naming its argument position).
        check = self._OPTION_CHECKS.get(name)
        if check is None:
            return super().__setattr__(name, value)
        value = getattr(self, check)(value, name)
        self._option_changing(name, value)
        super().__setattr__(name, value)
        self._option_changed(name)

    def _option_changing(self, name: str, value) -> None:
        """Before a checked option takes ``value`` (subclasses add the state it needs)."""

    def _option_changed(self, name: str) -> None:
        """After a checked option changed (subclasses redo what was chosen from it)."""

    def _checked_eps(self, eps, name):
        return _eps_as_given(eps, name)

    def _checked_momentum(self, momentum, name):
        return _check_momentum(momentum, name=name)

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batch tracked."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset, weight 1 and bias 0."""
        self.reset_running_stats()
        _reset_affine(self)

    def extra_repr(self) -> str:
        return ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}, bias={use_bias}, "
                "track_running_stats={track_running_stats}".format(**self.__dict__, use_bias=self.bias is not None))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            # Checkpoints written before num_batches_tracked existed start counting from 0.
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (self.num_batches_tracked if self.num_batches_tracked is not None
                                   and self.num_batches_tracked.device != torch.device("meta")
                                   else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _tracking_factor(self) -> float:
        """Count this training batch and return the weight of its statistics in the running average."""
        count = _buffer_of(self, "num_batches_tracked")
        if count is None:
            # No count to keep (a buffer set to None): torch.nn's rule still moves the running statistics by
            # momentum, and only the cumulative average, which needs the count, leaves them as they are.
            return self.momentum if self.momentum is not None else 0.0
        try:
            count.add_(1)
        except RuntimeError as error:
            refusal = _transform_refusal(self, error)
            if refusal is not None:
                raise refusal from error
            raise
        if self.momentum is None:
            if not torch.compiler.is_compiling():
                # Reading the count costs a host sync on GPUs; only the cumulative average needs it.
                try:
                    return momentum_factor(None, int(count))
                except RuntimeError:
                    if not _under_vmap(count):
                        raise
                    # vmapped counts (an ensemble's stacked buffers, torch.func.stack_module_state): no number to
                    # read (torch.nn's layer fails there), so 1/t per member, a tensor as when compiled
            # Traced, the count stays a tensor: the graph needs no break (torch.nn's layer breaks here, and
            # torch.export refuses it) and the running average's weight 1/t is computed on the device.
            # (in float32 at least: a float16 count would overflow at 65504 steps). Running buffers set to None
            # (torch.nn's layer then normalizes by the batch and moves nothing) leave float32: reading their
            # dtype failed the compiled and exported calls that the eager layer takes.
            running_mean = _buffer_of(self, "running_mean")
            dtype = torch.float32 if running_mean is None else torch.promote_types(running_mean.dtype, torch.float32)
            return torch.reciprocal(count.to(dtype))
        return self.momentum


class BatchNorm(_NormBase):
    r"""Batch normalization over every axis but the feature ``axis``, for inputs of any rank >= 2.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    reduces:     every axis except ``axis`` (an int or a tuple of ints, negative allowed)
    parameters:  ``weight`` (gamma) and ``bias`` (beta) over ``axis``
    statistics:  the batch's in training, ``running_mean``/``running_var`` in eval; the
                 batch's always when ``track_running_stats=False``

    The variance that normalizes is the biased batch variance; ``running_var`` stores the
    unbiased one ``Var[x] * n / (n - 1)``, as torch.nn does. ``momentum`` is the weight of
    the new value:

    .. math::
        \hat{x}_\text{new} = (1 - \text{momentum}) \times \hat{x} + \text{momentum} \times x_t

    and ``momentum=None`` is the cumulative average of all tracked batches.

    Options beyond torch.nn (keyword-only; each is one stage of the statistics pipeline,
    so they combine):

    * ``renorm``, ``renorm_clipping`` (``{"rmax", "rmin", "dmax"}``, numbers or callables
      of the step), ``renorm_momentum`` (weight of the new value, default 0.01): batch
      renormalization, ``y = (x_hat * r + d) * gamma + beta`` with r and d from the
      renorm statistics before this step, without gradient.
    * ``virtual_batch_size``: ghost batch normalization; ``ghost_layout`` ``"strided"``
      (Keras: ghost j holds rows j, j + B/V, ...) or ``"contiguous"``.
    * ``adjustment``: ``callable(input_shape) -> (scale, bias)`` applied in training after
      renorm and before gamma/beta.
    * ``forward(x, mask=...)``: mask 0 marks padding, left out of every statistic.
    * initializers, regularizers and constraints for ``weight``/``bias``; ``freeze()``.
    * ``synchronized``: statistics over all processes of ``process_group``.

    Shape: input ``(N, ...)`` of rank >= 2, output the same shape.

    Example::

        >>> bn = BatchNorm(3, axis=-1)            # channels-last
        >>> y = bn(torch.randn(8, 5, 5, 3))
    """

    def __init__(self, num_features, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 axis: Union[int, Sequence[int]] = 1,
                 renorm: bool = False, renorm_clipping=None, renorm_momentum: float = 0.01,
                 virtual_batch_size: Optional[int] = None, ghost_layout: str = "strided",
                 adjustment: Optional[Callable] = None,
                 weight_initializer="ones", bias_initializer="zeros",
                 running_mean_initializer="zeros", running_var_initializer="ones",
                 weight_regularizer=None, bias_regularizer=None,
                 weight_constraint=None, bias_constraint=None,
                 unbiased_running_var: bool = True,
                 synchronized: bool = False, process_group=None):
        # Every option goes through __setattr__'s checks (the same ones guard a change on a built layer).
        self.axis = axis
        self.weight_initializer, self.bias_initializer = weight_initializer, bias_initializer
        self.running_mean_initializer, self.running_var_initializer = running_mean_initializer, running_var_initializer
        self.renorm = renorm
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._check_axis_fits_features(self.axis)
        if self.renorm and not self.track_running_stats:
            raise ValueError("renorm=True needs running statistics: pass track_running_stats=True")
        if renorm_clipping is not None and not self.renorm:
            raise ValueError("renorm_clipping was given but renorm=False: pass renorm=True to use batch renormalization")
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = renorm_momentum
        self.virtual_batch_size = virtual_batch_size
        self.ghost_layout = ghost_layout
        self.adjustment = adjustment
        self.weight_regularizer, self.bias_regularizer = weight_regularizer, bias_regularizer
        self.weight_constraint, self.bias_constraint = weight_constraint, bias_constraint
        self.unbiased_running_var = unbiased_running_var
        self.synchronized = synchronized
        self.process_group = process_group
        warn_group_without_synchronized(self, process_group, synchronized)
        self.frozen = False
        self._recenter = False
        self._steps_to_recenter_check = 0
        if self.renorm:
            for name in self.RENORM_STATE:
                self.register_buffer(name, torch.empty_like(self.running_var))
            self.reset_running_stats()  # (Keras' initial renorm state)
        self._choose_routes()

    # -- options --------------------------------------------------------------------------------

    # Each option's check (a method name); the constructor's values and later changes both pass it.
    _OPTION_CHECKS = {
        **_NormBase._OPTION_CHECKS, "axis": "_checked_axis", "renorm": "_checked_renorm",
        "renorm_clipping": "_checked_renorm_clipping", "renorm_momentum": "_checked_renorm_momentum",
        "virtual_batch_size": "_checked_virtual_batch_size", "ghost_layout": "_checked_ghost_layout",
        "adjustment": "_checked_adjustment", "unbiased_running_var": "_checked_flag", "synchronized": "_checked_flag",
        "process_group": "_checked_process_group",
        **{name: "_checked_initializer" for name in ("weight_initializer", "bias_initializer",
                                                      "running_mean_initializer", "running_var_initializer")},
        **{name: "_checked_regularizer" for name in ("weight_regularizer", "bias_regularizer")},
        **{name: "_checked_constraint" for name in ("weight_constraint", "bias_constraint")},
    }
    # The options that choose how a call executes (the short paths of forward).
    _ROUTING_OPTIONS = frozenset({"axis", "renorm", "virtual_batch_size", "ghost_layout", "adjustment",
                                  "synchronized", "unbiased_running_var"})

    def _option_changing(self, name: str, value) -> None:
        if name == "renorm" and value and self._constructed() and not self.renorm:
            self._add_renorm_state()

    def _option_changed(self, name: str) -> None:
        # The short paths chosen from the options are chosen again (a cached choice would silently ignore, say,
        # a virtual_batch_size set after construction).
        if name in self._ROUTING_OPTIONS and self._constructed():
            self._choose_routes()

    def _constructed(self) -> bool:
        """Whether the constructor has finished (its last step chooses the routes): checks that relate an option
        to others, and the route choice, apply to changes made after it."""
        return "_plain" in self.__dict__

    def _choose_routes(self) -> None:
        # The plain case takes torch.nn's short path.
        self._plain = self._is_plain()
        # Keras' biased running variance and nothing else (normkit.keras' layer): ATen's training kernel too, its
        # running variance moved by normkit (_batch_norm_with_biased_update), where the fused kernel declines.
        self._plain_biased = self._is_plain(unbiased_running_var=False)
        # Out of training (eval, or frozen) every option but the axis is inert (_forward_options computes torch.nn's
        # eval call for them), so inference takes the short path too when the features are first or last.
        self._plain_eval = self.axis in (1, -1)
        # Ghost batches alone, Keras' strided groups on features at axis 1: ATen's kernel on a free view.
        self._plain_ghost = (self.axis == 1 and self.virtual_batch_size is not None
                             and self.ghost_layout == "strided" and not self.renorm and self.adjustment is None
                             and not self.synchronized and self.unbiased_running_var)
        # Options the fused kernel computes whole (normkit.kernels), reachable without the general path's plumbing.
        self._fusable = (isinstance(self.axis, int) and self.adjustment is None and not self.synchronized
                         and not self._plain)
        # With a padding mask too (the kernel takes no ghost batches with one), plain layers included.
        self._mask_fusable = (isinstance(self.axis, int) and self.adjustment is None and not self.synchronized
                              and self.virtual_batch_size is None)
        # Without the kernel: renorm, or a padding mask (with or without renorm), features first or last, straight to
        # the functional pipeline that computes it (_forward_composite_direct).
        self._composite_direct = self._mask_fusable

    def _checked_axis(self, axis, name):
        axis = check_feature_axes(axis)
        if "num_features" in self.__dict__:  # (a change on a built layer; the constructor checks after sizing)
            self._check_axis_fits_features(axis)
        if self.__dict__.get("virtual_batch_size") is not None:
            self._check_ghost_axes(axis)
        return axis

    def _check_axis_fits_features(self, axis) -> None:
        if isinstance(self.num_features, tuple) and (isinstance(axis, int) or len(axis) != len(self.num_features)):
            raise ValueError(f"num_features={self.num_features!r} gives one size per feature axis, so axis must be "
                             f"a tuple of {len(self.num_features)} axes, got axis={axis!r}")

    @staticmethod
    def _check_ghost_axes(axis) -> None:
        if 0 in ((axis,) if isinstance(axis, int) else axis):
            raise ValueError(f"virtual_batch_size splits the batch axis 0, so axis may not contain 0; got axis={axis!r}")

    def _checked_renorm(self, renorm, name):
        renorm = bool(renorm)
        if renorm and self._constructed() and not self.track_running_stats:
            raise ValueError("renorm=True needs running statistics: this layer has track_running_stats=False")
        if (renorm and self._constructed() and not self.renorm
                and (_buffer_of(self, "running_mean") is None or _buffer_of(self, "running_var") is None)):
            # (its state is derived from them: an AttributeError on None, "no attribute 'double'", said nothing)
            raise ValueError("renorm=True needs running statistics: this layer's running_mean and running_var were "
                             "set to None; assign them first (layer.running_mean = torch.zeros(num_features), "
                             "layer.running_var = torch.ones(num_features), or a checkpoint's)")
        return renorm

    def _add_renorm_state(self) -> None:
        """Renorm switched on for a built layer (say, to fine-tune with it): its state follows from the running
        statistics (moving_stddev = sqrt(running_var + eps)), as when a plain checkpoint loads into a renorm
        layer. Buffers kept from an earlier renorm phase: moving_stddev is brought back in line with the
        running variance, which plain steps have moved since; renorm_mean and renorm_stddev (renorm's own
        averages, which r and d are measured against) keep the values they had."""
        with torch.no_grad():
            state = self._renorm_state_from(self.running_mean, self.running_var)
            if "moving_stddev" in self._buffers:
                self.moving_stddev.copy_(state["moving_stddev"])
                return
            for name, value in state.items():
                self.register_buffer(name, value)

    def _renorm_state_from(self, mean: torch.Tensor, var: torch.Tensor, dtype: Optional[torch.dtype] = None) -> dict:
        """Renorm's buffers implied by running statistics: moving_stddev = renorm_stddev = sqrt(var + eps),
        renorm_mean = mean (so the running variance derived back from moving_stddev is var). ``dtype``: the one
        the buffers are kept in (default: var's), which the float64 root is rounded to once."""
        stddev = (var.double() + self.eps).sqrt().to(dtype or var.dtype)
        return {"moving_stddev": stddev, "renorm_mean": mean.clone(), "renorm_stddev": stddev.clone()}

    def _checked_renorm_clipping(self, clipping, name):
        if clipping is not None and self._constructed() and not self.renorm:
            raise ValueError("renorm_clipping was set but renorm=False: set renorm=True to use batch renormalization")
        return RenormClipping.from_dict(clipping)

    def _checked_renorm_momentum(self, momentum, name):
        if momentum is None:
            raise ValueError(f"{name} must be a number in [0, 1], got None")
        return _check_momentum(momentum, name=name)

    def _checked_virtual_batch_size(self, virtual, name):
        virtual = check_virtual_batch_size(virtual, name)
        if virtual is not None and "axis" in self.__dict__:  # (a subclass may set it before the constructor's axis)
            self._check_ghost_axes(self.axis)
        return virtual

    def _checked_ghost_layout(self, layout, name):
        return check_ghost_layout(layout, name)

    def _checked_adjustment(self, adjustment, name):
        return check_adjustment(adjustment, name)

    def _checked_flag(self, value, name):
        return bool(value)

    def _checked_process_group(self, process_group, name):
        return check_process_group(process_group, name)

    def _checked_initializer(self, initializer, name):
        return resolve_initializer(initializer, name=name)

    def _checked_regularizer(self, regularizer, name):
        return resolve_regularizer(regularizer, name=name)

    def _checked_constraint(self, constraint, name):
        return resolve_constraint(constraint, name=name)

    # -- state ----------------------------------------------------------------------------------

    RENORM_STATE = ("moving_stddev", "renorm_mean", "renorm_stddev")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Any layer holding renorm state: one with renorm switched off keeps its buffers (to switch it on again), and
        # a plain checkpoint loaded into it replaces the model they belonged to, so they are derived as for a renorm
        # layer (kept, a strict load failed on them as missing, and a loose one left the old model's renorm averages).
        if ("moving_stddev" in self._buffers and self.track_running_stats
                and not any(prefix + name in state_dict for name in self.RENORM_STATE)
                and all(prefix + name in state_dict for name in ("running_mean", "running_var"))):
            # A plain BN checkpoint (torch.nn's, say) for a renorm layer, e.g. to fine-tune with renorm: its
            # renorm state follows from the running statistics (moving_stddev = sqrt(running_var + eps), so
            # running_var stays as loaded), as torch.nn fills num_batches_tracked for old checkpoints.
            mean, var = state_dict[prefix + "running_mean"], state_dict[prefix + "running_var"]
            if nn.parameter.is_lazy(var):
                # A lazy layer's checkpoint before it was sized (normkit's or torch.nn's): no statistics to derive
                # from; the renorm state is as unsized as they are (a lazy layer keeps its own; a sized one refuses
                # the unsized statistics, as torch.nn does).
                derived = {name: nn.parameter.UninitializedBuffer(device=var.device, dtype=var.dtype)
                           for name in self.RENORM_STATE}
            elif self._statistics_load(mean, var):
                # (rounded to the layer's own dtype: via a float16 checkpoint's, a float32 layer's stddev was
                # float16-rounded; a float32 one into a float16 layer was rounded twice)
                own = self._buffers["moving_stddev"]
                derived = self._renorm_state_from(mean, var, None if own is None else own.dtype)
            else:
                # Statistics that cannot load (another size, not a tensor): the load reports them as torch.nn does,
                # and the renorm state, which is not in the checkpoint, stays as it is (derived, it was reported
                # as a 'size mismatch for moving_stddev ... from checkpoint', or failed as an AttributeError).
                derived = {name: self._buffers[name] for name in self.RENORM_STATE}
            state_dict.update({prefix + name: value for name, value in derived.items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _statistics_load(self, mean, var) -> bool:
        """Whether a checkpoint's running statistics fit this layer's (an unsized lazy layer's: each other)."""
        if not all(isinstance(given, torch.Tensor) and not nn.parameter.is_lazy(given) for given in (mean, var)):
            return False
        if self.running_mean is None or self.running_var is None:
            # (set to None, as test-time adaptation code does: nothing to load them into; torch.nn's load reports
            # them as unexpected keys, which the derivation failed before, on None's shape)
            return False
        return mean.shape == var.shape and all(nn.parameter.is_lazy(own) or own.shape == given.shape
                                               for own, given in ((self.running_mean, mean), (self.running_var, var)))

    def reset_running_stats(self) -> None:
        """Running statistics from their initializers (0 and 1 by default); renorm state to match."""
        if not self.track_running_stats:
            return
        with torch.no_grad():
            apply_initializer(self.running_mean_initializer, self.running_mean, name="running_mean_initializer")
            apply_initializer(self.running_var_initializer, self.running_var, name="running_var_initializer")
        self.num_batches_tracked.zero_()
        if "moving_stddev" in self._buffers:  # (also while renorm is switched off: it may come back on)
            with torch.no_grad():
                # sqrt of the variance initializer, as Keras does (moving_stddev = renorm_stddev = 1).
                self.moving_stddev.copy_(self.running_var.clamp(min=0).sqrt())
                self.renorm_stddev.copy_(self.moving_stddev)
                self.renorm_mean.copy_(self.running_mean)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            if self.weight is not None:
                apply_initializer(self.weight_initializer, self.weight, name="weight_initializer")
            if self.bias is not None:
                apply_initializer(self.bias_initializer, self.bias, name="bias_initializer")

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.axis != 1:
            text += f", axis={self.axis}"
        for name, default in (("renorm", False), ("virtual_batch_size", None), ("synchronized", False),
                              ("unbiased_running_var", True)):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        if self.virtual_batch_size is not None and self.ghost_layout != "strided":
            text += f", ghost_layout={self.ghost_layout!r}"
        if self.adjustment is not None:
            text += f", adjustment={getattr(self.adjustment, '__name__', type(self.adjustment).__name__)}"
        if self.frozen:
            text += ", frozen=True"
        return text

    # -- frozen mode ----------------------------------------------------------------------------

    def __deepcopy__(self, memo):
        return _deepcopy_sharing_group(self, memo)

    def __getstate__(self):
        # Without the mark that the local-statistics warning was given (synchronized=True, no group of processes): a
        # layer restored from torch.save of the whole model runs in a process of its own, often a job that forgot
        # init_process_group, and kept, the mark silenced the warning there (local statistics without a word).
        state = super().__getstate__()
        state.pop("_warned_local", None)
        return state

    def freeze(self) -> "BatchNorm":
        """Use running statistics, update nothing and train nothing, even after ``model.train()``.

        torch.nn's BN goes back to batch statistics when the model is put in train()
        again (a fine-tuning trap); a frozen normkit layer does not. Parameters lose any
        gradient they hold, so optimizers skip them (weight decay and momentum included).
        ``unfreeze()`` undoes it.
        """
        self.frozen = True
        for parameter in self._affine_leaves():
            if parameter is not None:
                parameter.requires_grad_(False)
                # A gradient left from before (or zeroed by zero_grad(set_to_none=False)) would still let an
                # optimizer with weight decay or momentum move the layer; without one, optimizers skip it.
                parameter.grad = None
        return self

    def unfreeze(self) -> "BatchNorm":
        """Leave frozen mode: the layer trains and updates its running statistics again in train().

        ``weight`` and ``bias`` get ``requires_grad=True``, whatever they had before ``freeze()``
        (as Keras' ``trainable = True`` makes every variable of the layer trainable).
        """
        self.frozen = False
        for parameter in self._affine_leaves():
            if parameter is not None:
                parameter.requires_grad_(True)
        return self

    def _leaves_of(self, name: str) -> list:
        """The Parameters that make ``weight`` or ``bias`` (``name``): itself; when it is parametrized
        (``torch.nn.utils.parametrize``: a positivity or weight_norm parametrization), the parametrization's own
        Parameters (``original``, ``original0``...), since ``self.weight`` is then a tensor computed from them; and
        when a forward pre-hook computes it as a plain tensor (``torch.nn.utils.prune``'s ``weight_orig``, the
        deprecated ``torch.nn.utils.weight_norm``'s ``weight_g``/``weight_v``), the Parameters named after it,
        as those hooks name them (read as ``weight`` alone, a pruned layer's freeze() left ``weight_orig`` trainable
        with its old gradient, which a weight-decaying optimizer went on moving)."""
        parametrizations = getattr(self, "parametrizations", None)
        if parametrizations is not None and name in parametrizations:
            return list(parametrizations[name].parameters())
        if name in self._parameters:
            return [] if self._parameters[name] is None else [self._parameters[name]]
        return [parameter for key, parameter in self._parameters.items()
                if key.startswith(name + "_") and parameter is not None]

    def _affine_leaves(self) -> list:
        """The Parameters that make ``weight`` and ``bias`` (``_leaves_of`` each)."""
        return self._leaves_of("weight") + self._leaves_of("bias")

    # -- regularization and constraints -----------------------------------------------------------

    def regularization_loss(self) -> torch.Tensor:
        """Sum of the weight/bias regularizers (0 when none, or when frozen, as in Keras)."""
        # (on the layer's device, buffers or not: normkit.regularization_loss stacks every layer's total)
        total = torch.zeros((), device=_device_of(self, None))
        if self.frozen:
            return total
        for regularizer, name in ((self.weight_regularizer, "weight"), (self.bias_regularizer, "bias")):
            # (trainable as its Parameters are: a parametrized weight computed under no_grad requires no gradient,
            # and a validation loop's logged loss left its term out)
            if regularizer is not None and any(leaf.requires_grad for leaf in self._leaves_of(name)):
                total = total + regularizer(getattr(self, name))
        return total

    def apply_constraints(self, parameters=None) -> None:
        """Project weight/bias onto their constraints (call after each optimizer step).

        As in Keras, which constrains only the variables it trains: a frozen layer, or a parameter
        with ``requires_grad=False``, keeps its values (a pretrained gamma is not projected while
        the layer is frozen for fine-tuning). ``parameters``, when given, limits the projection to
        those of weight/bias among them (``constrain_after_step`` passes the ones its optimizer's step
        moved, as Keras' optimizer constrains only the variables it updated). A parametrized weight
        (``torch.nn.utils.parametrize``) is projected through its parametrization's ``right_inverse``,
        as assigning it is; one a forward pre-hook computes (``torch.nn.utils.prune``, the deprecated
        ``torch.nn.utils.weight_norm``) cannot be, and is refused.
        """
        if self.frozen:
            return
        chosen = None if parameters is None else {id(parameter) for parameter in parameters}
        with torch.no_grad():
            for constraint, name in ((self.weight_constraint, "weight"), (self.bias_constraint, "bias")):
                leaves = self._leaves_of(name)
                if constraint is None or not any(leaf.requires_grad and (chosen is None or id(leaf) in chosen)
                                                 for leaf in leaves):
                    continue
                if name in self._parameters:
                    self._parameters[name].copy_(constraint(self._parameters[name]))
                elif torch.nn.utils.parametrize.is_parametrized(self, name):
                    # (copied into the computed tensor, the projection was dropped at the next read)
                    setattr(self, name, constraint(getattr(self, name)))
                else:
                    # (the projection of the hook's plain tensor was recomputed away by the next call, silently)
                    raise RuntimeError(
                        f"{type(self).__name__}.apply_constraints(): {name} is computed from "
                        f"{', '.join(key for key in self._parameters if key.startswith(name + '_'))} by a forward "
                        f"pre-hook (torch.nn.utils.prune or torch.nn.utils.weight_norm), so {name}_constraint cannot "
                        f"be applied to it: make it a Parameter again (torch.nn.utils.prune.remove(layer, '{name}'), "
                        f"torch.nn.utils.remove_weight_norm(layer, '{name}')), or use torch.nn.utils.parametrize "
                        "(torch.nn.utils.parametrizations.weight_norm, or a parametrization with right_inverse), "
                        "through which constraints are projected")

    # -- forward --------------------------------------------------------------------------------

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of rank >= 2 (batch, features, ...), got {input.dim()}D input")

    def _feature_axes(self, input: torch.Tensor, training: Optional[bool] = None) -> tuple:
        """The input's feature axes; another number of features than the layer's is refused, but (``training``
        given) where the call reads nothing sized by it, as torch.nn's layer accepts it there."""
        axes = canonicalize_axes(self.axis, input.dim())
        if _tracing_state() is not None:
            return axes  # (sizes unchecked while tracing: see _tracing_state)
        sizes = tuple(input.shape[a] for a in axes)
        expected = (self.num_features,) if isinstance(self.num_features, int) else self.num_features
        matches = math.prod(sizes) == self.num_features if isinstance(self.num_features, int) else sizes == expected
        if not matches and (training is None or self._reads_sized_tensors(training)):
            raise ValueError(
                f"num_features={self.num_features} but the input of shape {tuple(input.shape)} has "
                f"{sizes if len(sizes) > 1 else sizes[0]} features on axis {self.axis}: build the layer with "
                f"num_features={sizes[0] if len(sizes) == 1 else sizes}{self._other_axis_hint(input)}"
            )
        return axes

    def _reads_sized_tensors(self, training: bool) -> bool:
        """Whether a call reads a tensor of ``num_features`` values: weight, bias, or the running buffers (used in
        eval, and in training when tracking). Without any (affine=False, and track_running_stats=False in training
        or the buffers set to None) torch.nn's layer normalizes any number of channels, so normkit's does too."""
        weight, bias = _affine_of(self)
        if weight is not None or bias is not None or (self.renorm and training):
            return True  # (renorm's own statistics are read in training whatever the running ones are)
        uses_buffers = not training or self.track_running_stats
        return uses_buffers and (_buffer_of(self, "running_mean") is not None
                                 or _buffer_of(self, "running_var") is not None)

    def _check_own_sizes(self, training: bool) -> None:
        """Each tensor the call reads holds num_features values: one replaced by a tensor of another size
        (``layer.weight = nn.Parameter(...)``, ``layer.running_var = ...``) is refused by name before the step is
        counted. (The option paths took it silently or failed deep inside after moving buffers: ghost batches
        normalized with the first values of a 4-value weight repeated across the groups; renorm said "The size of
        tensor a (3) must match the size of tensor b (4)" with the count moved.)"""
        if _tracing_state() is not None:
            return  # (a traced tensor's numel is a tensor: see _tracing_state; ATen checks the sizes it reads)
        features = self.num_features if isinstance(self.num_features, int) else math.prod(self.num_features)
        weight, bias = _affine_of(self)
        named = [("weight", weight), ("bias", bias)]
        if not training or self.track_running_stats:  # (torch.nn's rule for when the buffers are read)
            # (the dict read: Module.__getattr__ costs more, and every option call runs this)
            named += [("running_mean", _buffer_of(self, "running_mean")), ("running_var", _buffer_of(self, "running_var"))]
        if self.renorm and training:
            named += [(name, _buffer_of(self, name)) for name in self.RENORM_STATE]
        for name, tensor in named:
            if tensor is not None and tensor.numel() != features:
                raise ValueError(f"{type(self).__name__}(num_features={self.num_features}) has a {name} of "
                                 f"{tensor.numel()} values (shape {tuple(tensor.shape)}): a tensor of another size was "
                                 f"assigned to it; give it {features} values, or build the layer for that size")

    def _other_axis_hint(self, input: torch.Tensor) -> str:
        """The remedy for features on another axis than the layer's, in the error above."""
        return " or pass the right axis"

    def _expand_mask(self, mask, input, feature_axes):
        """A mask over the non-feature axes, as a tensor of the input's rank (size 1 on feature axes)."""
        if not isinstance(mask, torch.Tensor):
            try:
                mask = torch.as_tensor(mask)
            except (TypeError, ValueError, RuntimeError) as error:  # (torch's own says "new(): invalid data type")
                raise TypeError(f"mask must be a tensor (or an array or nested list of 0/1 or booleans), got "
                                f"{type(mask).__name__}: {error}") from None
        if mask.is_meta and not input.is_meta:
            # (moving it to the input's device failed with "Cannot copy out of meta tensor; no data!")
            raise ValueError(f"mask is a meta tensor (no values) but the input is on {input.device}: give a mask with "
                             "values, on the input's device")
        given = tuple(mask.shape)
        expected = tuple(s for i, s in enumerate(input.shape) if i not in feature_axes)
        if mask.dim() == input.dim() - len(feature_axes):
            for axis in feature_axes:
                mask = mask.unsqueeze(axis)
        elif mask.dim() != input.dim():
            raise ValueError(
                f"mask of shape {given} does not fit an input of shape {tuple(input.shape)}: give a mask "
                f"of shape {expected} (the input without its feature axes), or one broadcastable to it"
            )
        if _tracing_state() is None and not broadcasts_to(mask.shape, input.shape):  # (see _tracing_state)
            raise ValueError(f"mask of shape {given} cannot broadcast to the input's shape {tuple(input.shape)}: give "
                             f"a mask of shape {expected} (the input without its feature axes), or one broadcastable "
                             "to it")
        return mask.to(device=input.device, dtype=torch.bool)

    RECENTER_CHECK_EVERY = 1000
    RECENTER_RATIO = 1e3

    def _update_recenter(self, input: torch.Tensor, feature_axes, mask: Optional[torch.Tensor] = None) -> None:
        """Decide (on the first batch-statistics call, then every 1000; again on the next call when the batch is
        empty or no channel of it varies) whether the data sits far from zero.

        ATen's CPU kernel loses the variance of float32 data whose |mean| exceeds ~1e5 std; such
        data is a property of the source, so a periodic check costs nothing per step and lets
        the layer recenter (see functional._aten_batch_norm) only where it matters.
        ``mask`` (the expanded one, or None): only valid positions count, as in the statistics.
        """
        self._steps_to_recenter_check = self.RECENTER_CHECK_EVERY - 1
        if input.numel() == 0:
            # An empty batch says nothing about the data, as a constant one (below): the check is due again next
            # call. Held for 1000, a first empty batch (a synchronized process given no rows at the first step)
            # kept the layer off the recentered path for the data at 1e4, std 1e-2 after it: outputs 5e-2 off.
            self._steps_to_recenter_check = 0
            return
        if input.is_cuda or input.dtype == torch.float64 or _under_vmap(input) or F.without_data(input):
            return  # (under vmap a data-dependent branch cannot run; meta and fake tensors have no data)
        with torch.no_grad():
            values = input.float()
            if mask is None:
                # Data that is one value throughout (zeros, a constant batch) varies in no channel, so the check
                # stays due and ran on every such call (the statistics and both extremes below); one vectorized pass
                # (aminmax) finds it first, to the same answer.
                low, high = torch.aminmax(values)
                if low.item() == high.item():  # (NaN anywhere: not equal, the statistics decide as before)
                    self._steps_to_recenter_check = 0
                    return
            reduce_axes = tuple(a for a in range(input.dim()) if a not in feature_axes)
            virtual = self.virtual_batch_size
            if virtual is not None and input.shape[0] > virtual and input.shape[0] % virtual == 0:
                # Ghost batches: each is normalized by its own statistics, so each ghost's spread is the measure
                # (ghosts whose means lie apart gave the batch a wide spread while every ghost sat far from zero).
                values, mask, reduce_axes, _ = F.batch_statistics_view(values, feature_axes, mask, virtual,
                                                                       self.ghost_layout)
            if mask is None:
                var, mean = torch.var_mean(values, dim=reduce_axes, correction=0)
                high = low = values
            else:
                # Padding (zeros, anything) must not count: zeros beside data at 1e4 made the spread look
                # wide and the layer skipped recentering where its statistics then lost the variance.
                valid = mask.expand(values.shape)
                _, mean, var = F.moments(torch.where(valid, values, 0.0), reduce_axes, valid)
                mean, var = mean.squeeze(reduce_axes), var.squeeze(reduce_axes)
                high = torch.where(valid, values, -math.inf)
                low = torch.where(valid, values, math.inf)
            # A constant channel is far from zero by this measure but loses nothing in ATen's kernel (its
            # variance is 0 either way): only channels that vary call for the recentered path.
            varies = high.amax(dim=reduce_axes) > low.amin(dim=reduce_axes)  # (fully masked: -inf > inf, no)
            if not bool(varies.any()):
                # Nothing here varies (constant or fully masked channels): the batch says nothing about the data,
                # so the check is due again next call (held for 1000, a first constant batch kept the layer off
                # the recentered path for the varying data after it: variance 1e-2 off at mean 1e4, std 1e-2).
                self._steps_to_recenter_check = 0
                return
            far = (mean.abs() > self.RECENTER_RATIO * var.sqrt()) & varies
            self._recenter = bool(far.any())

    def _is_plain(self, unbiased_running_var: bool = True) -> bool:
        """No option beyond torch.nn's (with ``unbiased_running_var=False``: but the biased running variance of
        Keras): the call can go straight to ATen like torch.nn's does."""
        return (self.axis in (1, -1) and not self.renorm and self.virtual_batch_size is None
                and self.adjustment is None and not self.synchronized
                and self.unbiased_running_var == unbiased_running_var)

    def _forward_plain(self, input: torch.Tensor) -> torch.Tensor:
        """torch.nn's forward, no more: the common case pays no Python overhead for normkit's options.

        Features last (``axis=-1``) on a contiguous input takes the free view of
        ``functional._channels_view``: channels_last NCHW (NCDHW) for rank 4 (5), whose kernels
        torch.nn uses for such data, and an (M, C) matrix otherwise.
        """
        if not isinstance(input, torch.Tensor) or not input.is_floating_point():
            F.check_floating(input)
        self._check_input_dim(input)
        # A frozen layer (forward's other way here) computes as in eval whatever train() says, without
        # gradient for weight and bias (as _forward_options does).
        frozen = self.frozen
        training = self.training and not frozen
        channels, restore, back = input, None, None
        if self.axis == -1 and input.dim() > 2:
            sized = _tracing_state() is None  # (traced sizes are tensors: see _tracing_state)
            if sized and input.shape[-1] != self.num_features:
                self._feature_axes(input, training)  # raises the explanatory error where the size matters
            if not input.is_contiguous() or (training and input.dim() >= 4 and input.is_cpu
                                             and kernels.takes(input)):
                # (with normkit.kernels on, features-last training of rank 4/5 on the CPU takes the fused
                # kernel, faster than ATen's channels-last kernels: docs/benchmarks.md; larger inputs, which
                # the kernel leaves to ATen, keep this path)
                y = self._forward_fused_plain(input) if input.is_contiguous() else None
                return y if y is not None else self._forward_options(input, None)
            back = _FEATURES_LAST.get(input.dim())
            if back is not None:  # rank 4/5: the channels_last view, inline (a call costs as much as the view)
                # (torch.permute: Tensor.permute parses a tuple of dims a third of a µs slower, 2% of a small call)
                channels = torch.permute(input, _FEATURES_FIRST[input.dim()])
                if sized and 1 in input.shape and F.eager_cpu_layouts_matter(channels):
                    channels = F.canonical_channels_last(channels)  # (a contiguous input's odd size-1 strides)
            else:
                channels, restore = F._channels_view(input, (input.dim() - 1,))
        elif _tracing_state() is None and input.shape[1] != self.num_features:
            self._feature_axes(input, training)  # raises the explanatory error where the size matters
        factor = 0.0
        if training:
            if self._recenter_check_due():
                self._update_recenter(channels, (1,))
                if self._recenter:
                    return self._forward_options(input, None)
            if self.track_running_stats:  # read per call, as torch.nn does: users switch it off on a built layer
                if self.momentum is None and torch._C._are_functorch_transforms_active() and self._counts_batched():
                    return self._forward_options(input, None)  # (1 / count is a batched tensor there: not ATen's)
                factor = self._tracking_factor()
        use_buffers = not training or self.track_running_stats
        # (read through the dicts: Module.__getattr__ is a measurable share of a small step)
        running_mean = _buffer_of(self, "running_mean") if use_buffers else None
        running_var = _buffer_of(self, "running_var") if use_buffers else None
        weight, bias = _affine_of(self)
        if frozen:
            weight = None if weight is None else weight.detach()
            bias = None if bias is None else bias.detach()
        batch_stats = training or running_mean is None
        if batch_stats and not training and not self._plain:
            return self._forward_options(input, None)  # (options' batch statistics out of training: their path)
        if batch_stats and not training and self._recenter_check_due():
            # Batch statistics out of training (no running statistics) lose float32 variance far from zero as
            # training's do: the same check, so a layer that has not trained yet (or is frozen) recenters too.
            self._update_recenter(channels, (1,))
            if self._recenter:
                return self._forward_options(input, None)
        if batch_stats and channels.numel() <= channels.shape[1]:  # (the input's channels: see _feature_axes)
            # One value per channel (refused, naming the input's own shape) or an empty batch (an empty
            # output; buffers left alone).
            try:
                F.check_enough_values(channels.numel() // max(channels.shape[1], 1), input.shape, training=training,
                                      hint=None if training else _NO_RUNNING_STATISTICS_HINT)
            except ValueError:
                self._uncount(training)  # (refused: the count this step took is given back)
                raise
            y = F.batch_norm(channels, None, None, weight, bias, True, factor, self.eps)
        else:
            try:
                if training and running_mean is not None and not self.unbiased_running_var:
                    y = self._batch_norm_with_biased_update(channels, weight, bias, running_mean, running_var, factor)
                elif weight is None and F.without_float32_tensors(channels, weight, bias, running_mean):
                    # (no tensor to say float32: ATen would compute the call in half precision, see there)
                    y = torch.batch_norm(channels.float(), None, None, None, None, batch_stats, factor, self.eps,
                                         torch.backends.cudnn.enabled).to(channels.dtype)
                else:
                    # (cudnn_enabled chooses between CUDA kernels only; reading the flag costs 1% of a small CPU call)
                    y = torch.batch_norm(channels, weight, bias, running_mean, running_var, batch_stats, factor,
                                         self.eps, channels.is_cuda and torch.backends.cudnn.enabled)
            except RuntimeError as error:
                # ATen refused the call before computing (another dtype or device): nothing moved but the count
                # this step added above, which is taken back (a call that raised leaves the layer as it was).
                self._uncount(training)
                _check_input_device(input, self.weight, self.running_mean)
                _check_input_dtype(input, self.weight, self.running_mean, autocast_casts=False)  # ATen's "mixed dtype"
                self._check_own_sizes(training)  # ATen's "weight should contain 3 elements not 4", explained
                refusal = _transform_refusal(self, error, input) if training else None
                if refusal is not None:
                    raise refusal from error
                raise
            if y.requires_grad and _tracing_state() is None and 1 in channels.shape:  # (traced sizes: tensors)
                F.guard_gradient_layout(channels, y)  # (odd gradient strides mislead ATen's backward: see there)
        if back is not None:
            return torch.permute(y, back)
        return y if restore is None else restore(y)

    def _forward_fused_plain(self, input: torch.Tensor) -> Optional[torch.Tensor]:
        """A plain training step of contiguous features-last data (``BatchNorm(axis=-1)`` of rank >= 4, or with Keras'
        biased running variance alone any rank: ``_forward_fused``; within the kernel's limit: ``kernels.takes`` said
        so), straight to the fused kernel: the call ``_forward_options`` reaches through its
        checks and arguments, which cost a tenth of a small step. Returns None, having changed nothing, where the kernel
        declines (dtypes, devices, parameters or buffers of another size or memory) or the call is not simply
        valid: the general path then handles or refuses it. No recentering check: the kernel's statistics are
        exact far from zero (as ``_forward_fused``). Kept apart from ``_forward_fused_contiguous``, which computes
        these steps too: its reads of the options cost 3-5% of a (64, 120) Keras step and a (64, 8, 8, 16) one
        (timed in the same rounds, 2026-12-02)."""
        count = _buffer_of(self, "num_batches_tracked")
        running_mean, running_var = _buffer_of(self, "running_mean"), _buffer_of(self, "running_var")
        shape = input.shape
        n, channels = shape[0], shape[-1]
        if (count is None or running_mean is None or running_var is None or not self.track_running_stats
                or channels != self.num_features or n == 0 or channels == 0):
            return None
        rows = input.numel() // (n * channels)
        if n * rows <= 1:  # (one value per feature, or none: refused, by name, on the general path)
            return None
        momentum = self.momentum
        factor = momentum if momentum is not None else momentum_factor(None, int(count) + 1)
        weight, bias = _affine_of(self)
        # (settings: momentum, renorm_momentum, rmin, rmax, dmax, eps, unbiased running variance, training;
        # dims: N, R, C, S, ghost groups, strided: functional._fused_batch_norm's, for one features-last axis)
        count.add_(1)  # (counted before the kernel moves the buffers: see _forward_fused_contiguous)
        y = kernels.fused_direct(input, weight, bias, running_mean, running_var, [n, rows, channels, 1, 1, 1],
                                 [float(factor), 0.0, 0.0, math.inf, math.inf, float(self.eps),
                                  1.0 if self.unbiased_running_var else 0.0, 1.0])
        if y is None:
            count.sub_(1)  # (declined: nothing changed)
        return y

    def _batch_norm_with_biased_update(self, channels, weight, bias, running_mean, running_var, factor):
        """A training step whose running variance moves toward the biased batch variance (Keras' moving variance).

        ATen's kernel moves its running variance toward the unbiased one, so it gets zeroed copies with momentum
        1 instead: it writes the batch's mean and unbiased variance there (the statistics of the pass it
        normalizes with, no second pass), and the running buffers move toward the mean and ``var * (n - 1) / n``::

            running_mean <- running_mean + factor * (mean - running_mean)
            running_var  <- running_var + factor * (var_biased - running_var)
        """
        if _tracing_state() is not None and _onnx_exporting():  # (the legacy exporter's trace: Dynamo's takes
            return self._onnx_training_step(channels, weight, bias)  # _forward_options, see there)
        batch_mean, batch_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
        y = torch.batch_norm(channels, weight, bias, batch_mean, batch_var, True, 1.0, self.eps,
                             torch.backends.cudnn.enabled)
        count = channels.numel() // channels.shape[1]
        # (out of place: autograd keeps the scratch buffers, ATen's arguments, for the backward)
        F._move_running_stats(running_mean, running_var, batch_mean, batch_var * ((count - 1) / count), factor,
                              self.eps)
        return y

    def _onnx_training_step(self, channels, weight, bias) -> torch.Tensor:
        """A training step recorded by an ONNX exporter whose running statistics move by a rule ATen's kernel lacks
        (Keras' biased variance; the cumulative average, whose 1/t the dynamo exporter traces as a tensor). ONNX graphs
        keep no buffer update (torch.nn's exports drop it), so the step exports as torch.nn's plain one: ATen's kernel
        on the running buffers, here with momentum 0 (nothing moves). Before, the dynamo exporter failed on the blend
        ("No ONNX function found for aten._foreach_mul") and the legacy exporter's graph of zeroed statistics beside a
        zero bias came out wrong from onnxruntime (up to 4.9 off)."""
        running_mean, running_var = _buffer_of(self, "running_mean"), _buffer_of(self, "running_var")
        return torch.batch_norm(channels, weight, bias, None if running_mean is None else running_mean.reshape(-1),
                                None if running_var is None else running_var.reshape(-1), True, 0.0, self.eps, False)

    def _counts_batched(self) -> bool:
        """Whether torch.func.vmap batches the step count (``stack_module_state``'s ensemble of layers): the
        cumulative average's weight 1/t is then a batched tensor, which ATen's kernel cannot take as its momentum
        (and reading it as a number fails: torch.nn's layer fails there, with vmap's error about .item())."""
        count = _buffer_of(self, "num_batches_tracked")
        return isinstance(count, torch.Tensor) and _under_vmap(count)

    def _recenter_check_due(self) -> bool:
        """Count a training step down to the next recenter check (True: check now).

        A plain int in ``__dict__``: ``nn.Module.__setattr__`` would cost more than the check.
        """
        if torch.compiler.is_compiling():
            # Under torch.compile the check would read data on the host (a graph break) and the
            # countdown would be a guard that recompiles every step; compiled graphs recenter always.
            return False
        steps = self.__dict__["_steps_to_recenter_check"]
        if steps == 0:
            return True
        self.__dict__["_steps_to_recenter_check"] = steps - 1
        return False

    def forward(self, input: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(input, torch.Tensor) and isinstance(input, torch.fx.Proxy):
            return _fx_call_module(self, input, **({} if mask is None else {"mask": mask}))
        if (isinstance(input, torch.Tensor) and input.dim() >= 4 and not input.is_contiguous()
                and F.canonical_input_wanted(input)):
            # ATen's backward mistakes channels_last data whose size-1 dims carry odd strides: wrong gradients.
            # (The first two checks keep the call off contiguous steps; found by tools/fuzz_batch_norm.py --family
            # compile: the compiled repair failed, so where it runs is canonical_input_wanted's.)
            input = F.canonical_channels_last(input)
        if ((self._plain or (self._plain_eval and (not self.training or self.frozen))) and mask is None
                and not self._recenter and not torch.compiler.is_compiling()):  # (compiled graphs: recentered path)
            return self._forward_plain(input)
        if (self.renorm and self.training and not self.frozen and not torch.compiler.is_compiling()
                and torch._C._current_graph_task_id() != -1):
            # A training forward inside a backward pass is activation checkpointing's recomputation
            # (torch.utils.checkpoint, either mode). torch.nn's BN recomputes its output from the same batch
            # (and updates its running statistics a second time, pytorch/pytorch#96136; normkit does as it
            # does), but renorm's r and d would come from the renorm statistics this step already moved: a
            # different function of the batch than the forward's, so silently wrong gradients.
            raise RuntimeError(f"{type(self).__name__} with renorm=True was recomputed in the backward pass "
                               "(activation checkpointing, torch.utils.checkpoint): its r and d would be taken from "
                               "the renorm statistics this step already updated, giving wrong gradients. Keep the "
                               "renorm layer outside the checkpointed block")
        if (self._fusable and mask is None and self.training and not self.frozen
                and kernels.takes(input)):  # (which answers False under torch.compile)
            y = self._forward_fused(input)
            if y is not None:
                return y
        if (mask is not None and self._mask_fusable and self.training and not self.frozen and kernels.takes(input)
                and input.is_cpu and input.is_contiguous()):
            y = self._forward_fused_contiguous(input, mask)
            if y is not None:
                return y
        if ((mask is not None or self.renorm) and self._composite_direct and self.training and not self.frozen
                and not torch.compiler.is_compiling()):  # (recentered data too: it passes the flag on)
            y = self._forward_composite_direct(input, mask)
            if y is not None:
                return y
        if (self._plain_ghost and mask is None and self.training and not self.frozen and not self._recenter
                and not torch.compiler.is_compiling()):
            y = self._forward_plain_ghost(input)
            if y is not None:
                return y
        if (self._plain_biased and mask is None and not self._recenter and not torch.compiler.is_compiling()
                and _full_precision_buffers(self)):  # (half-precision buffers: blended in float32 on the general path)
            return self._forward_plain(input)
        return self._forward_options(input, mask)

    def _forward_fused(self, input: torch.Tensor) -> Optional[torch.Tensor]:
        """A training step of the options normkit.kernels computes whole, straight to the kernel.

        The general path reaches the same call (functional._fused_batch_norm) through checks and
        arguments that cost more than the kernel itself on small inputs. Returns None, having changed
        nothing, where the kernel declines or the input is not simply valid (the general path then
        handles or refuses it). No recentering check: the kernel's statistics are exact far from zero.
        """
        if input.is_cpu and input.is_contiguous():  # (CUDA steps: the Triton kernels, by the general route below)
            if (self._plain_biased and (self.axis == -1 or input.dim() == 2) and input.dim() >= 2
                    and input.is_floating_point()):
                # Keras' biased running variance alone on features-last data (a matrix, (N, T, C), NHWC): the plain
                # route's kernel call, first, without functional._fused_batch_norm's plumbing (a quarter of a
                # (64, 120) step) nor the general checks below (a tenth of it; _forward_fused_plain makes its own)
                self._check_input_dim(input)  # (BatchNorm1d/2d/3d's ranks)
                y = self._forward_fused_plain(input)
            else:
                y = self._forward_fused_contiguous(input)
            if y is not None:
                return y
        if (not isinstance(input, torch.Tensor) or not input.is_floating_point() or input.dim() < 2
                or not self.track_running_stats or self.num_batches_tracked is None):  # (both read per call)
            return None
        self._check_input_dim(input)  # (BatchNorm1d/2d/3d's ranks)
        if not -input.dim() <= self.axis < input.dim():
            return None
        axis = self.axis % input.dim()  # (the kernel takes axis 1 or the last one, and declines the rest)
        if input.shape[axis] != self.num_features or input.numel() == 0 or not kernels.enabled(input.device):
            return None
        renorm = self.renorm and self.running_mean is not None  # (no running statistics: none, see _forward_options)
        # The count is read (a host sync on GPUs) only where a rule needs it; this step is count + 1.
        count = (int(self.num_batches_tracked) if self.momentum is None or (renorm and self.renorm_clipping.scheduled)
                 else None)
        factor = self.momentum if self.momentum is not None else momentum_factor(None, count + 1)
        clipping = self.renorm_clipping.at_step(lambda: count) if renorm else (0.0, math.inf, math.inf)
        self.num_batches_tracked.add_(1)  # (counted before the kernel moves the buffers: see _forward_fused_contiguous)
        try:
            y = F._fused_batch_norm(input, (axis,), None, self.virtual_batch_size, self.ghost_layout,
                                    self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps,
                                    self.unbiased_running_var, self.renorm_mean if renorm else None,
                                    self.renorm_stddev if renorm else None, self.moving_stddev if renorm else None,
                                    clipping, self.renorm_momentum)
        except ValueError:  # (one value per feature, refused by name before the kernel: nothing changed)
            self.num_batches_tracked.sub_(1)
            raise
        if y is None:
            self.num_batches_tracked.sub_(1)  # (declined: nothing changed)
        return y

    def _forward_fused_contiguous(self, input: torch.Tensor, mask=None) -> Optional[torch.Tensor]:
        """Renorm and ghost batches (alone or together, either grouping, either running variance), or a padding mask
        (with or without renorm; boolean, on the input's device, contiguous, of the input's shape without its feature
        axis), in a training step of contiguous CPU data with the features on dim 1 or last, straight to the fused
        C++ kernel: the call ``functional._fused_batch_norm`` makes, without its layout and mask plumbing nor the
        general checks (together a quarter of a (64, 120) renorm step, an eighth of a (64, 50, 120) masked one).
        Returns None, having changed nothing, where the call is not that simple or the kernel declines: the general
        route then decides (and refuses what it refuses, by name)."""
        ndim = input.dim()
        if ndim < 2 or not input.is_floating_point() or not self.track_running_stats:
            return None
        self._check_input_dim(input)  # (BatchNorm1d/2d/3d's ranks)
        axis, shape = self.axis, input.shape
        if axis in (1, 1 - ndim):  # (N, C, *): (N, 1, C, positions) in the kernel's terms
            rows, channels, positions = 1, shape[1], math.prod(shape[2:])
            kept = shape[:1] + shape[2:]
        elif axis in (-1, ndim - 1):  # (N, *, C): (N, rows, C, 1)
            rows, channels, positions = math.prod(shape[1:-1]), shape[-1], 1
            kept = shape[:-1]
        else:
            return None
        valid = None
        if mask is not None:  # (the valid positions in the kernel's order: the mask's own memory)
            if (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != kept
                    or mask.device != input.device or not mask.is_contiguous()):
                return None
            valid = mask.reshape(-1)
        count = _buffer_of(self, "num_batches_tracked")
        running_mean, running_var = _buffer_of(self, "running_mean"), _buffer_of(self, "running_var")
        n, virtual, renorm = shape[0], self.virtual_batch_size, self.renorm
        groups = n // virtual if virtual is not None else 1
        renorm_state = ((_buffer_of(self, "renorm_mean"), _buffer_of(self, "renorm_stddev"),
                         _buffer_of(self, "moving_stddev")) if renorm else (None, None, None))
        if (count is None or running_mean is None or running_var is None or channels != self.num_features
                or n == 0 or channels == 0 or (virtual is not None and (n != groups * virtual or mask is not None))
                or (mask is None and (n // groups) * rows * positions <= 1)  # (one value per feature and ghost:
                or (renorm and any(buffer is None for buffer in renorm_state))):  # refused, by name, there)
            return None
        momentum = self.momentum
        step = int(count) if momentum is None or (renorm and self.renorm_clipping.scheduled) else None
        factor = momentum if momentum is not None else momentum_factor(None, step + 1)
        rmin, rmax, dmax = self.renorm_clipping.at_step(lambda: step) if renorm else (0.0, math.inf, math.inf)
        weight, bias = _affine_of(self)
        # (dims and settings: functional._fused_batch_norm's, for one axis, first or last, of contiguous data)
        # Counted before the kernel moves the buffers, as torch.nn counts before its kernel: checkpointing's
        # recomputation (torch.utils.checkpoint, use_reentrant=False) stops as soon as the kernel has saved its
        # tensors, when nothing after the layer saves any, so a count after the call was skipped there (the buffers
        # of two forwards and a count of one, where torch.nn's has two).
        count.add_(1)
        y = kernels.fused_direct(input, weight, bias, running_mean, running_var,
                                 [n, rows, channels, positions, groups, 1 if self.ghost_layout == "strided" else 0],
                                 [float(factor), float(self.renorm_momentum), float(rmin), float(rmax), float(dmax),
                                  float(self.eps), 1.0 if self.unbiased_running_var else 0.0, 1.0], *renorm_state,
                                 valid=valid)
        if y is None:
            count.sub_(1)  # (declined: nothing changed)
        return y

    def _forward_plain_ghost(self, input: torch.Tensor) -> Optional[torch.Tensor]:
        """Ghost batches with nothing else, in training: one ATen training call, buffers included.

        Keras' strided groups of an (N, C, *) input are the free view (V, G*C, *) (ghost batch g holds
        rows g, g + G, ...): ATen's kernel normalizes each of its G*C channels over its own V rows with
        weight and bias repeated G times, and updates G copies of each running buffer; their mean over
        the copies is the update of the running statistics by the mean of the per-ghost statistics
        (every copy starts from the same value), which is the rule (functional.combine_ghost_statistics).
        A dozen small operations fewer than the general path, which is what small inputs pay for.
        Returns None, having changed nothing, for anything else (the general path then handles or refuses it).
        """
        if not isinstance(input, torch.Tensor) or not input.is_floating_point() or input.dim() < 2:
            return None
        self._check_input_dim(input)  # (BatchNorm1d/2d/3d's ranks)
        # (tensors read from the module's dicts: on small inputs Module.__getattr__ is a measurable share)
        weight, bias = _affine_of(self)
        running_mean = _buffer_of(self, "running_mean") if self.track_running_stats else None
        running_var = _buffer_of(self, "running_var") if running_mean is not None else None
        virtual, (n, channels) = self.virtual_batch_size, input.shape[:2]
        if (channels != self.num_features or n % virtual or n == virtual or input.numel() == 0
                or virtual * math.prod(input.shape[2:]) <= 1  # (one value per ghost and feature: refused there)
                or kernels.takes(input)
                # (large channels_last batches: the general path normalizes them as features-last data, keeping their
                # memory format without the copies this (V, G*C, *) view needs, in and out)
                or (input.numel() >= F.CHANNELS_LAST_PERMUTE_MIN_NUMEL and F.is_channels_last(input))
                or (self.momentum is None and torch._C._are_functorch_transforms_active() and self._counts_batched())
                or (running_mean is not None and (running_mean.dtype not in _FULL_PRECISION
                                                  or (weight is not None and running_mean.dtype != weight.dtype)))
                or not _dtype_fits(input.dtype, weight if weight is not None else running_mean)
                or (weight is None and F.without_float32_tensors(input, weight, running_mean))):  # (the general path widens those)
            return None
        if self._recenter_check_due():
            self._update_recenter(input, (1,))
            if self._recenter:
                return None
        groups = n // virtual
        factor = self._tracking_factor() if running_mean is not None else 0.0
        wide_mean, wide_var, wide_weight, wide_bias = (None if t is None else torch.cat([t] * groups)
                                                       for t in (running_mean, running_var, weight, bias))
        ghosts = input.reshape((virtual, groups * channels) + tuple(input.shape[2:]))
        if 1 in ghosts.shape and F.canonical_input_wanted(ghosts):
            # (a permuted (2, 1, 4, 1) input at strides (1, 8, 2, 1), ghosts of one row, is a (1, 2, 4, 1) view
            # with odd size-1 strides: ATen's CPU backward gave gamma a wrong gradient on it; see there)
            ghosts = F.canonical_channels_last(ghosts)
        try:
            y = torch.batch_norm(ghosts, wide_weight,
                                 wide_bias, wide_mean, wide_var, True, factor, self.eps, torch.backends.cudnn.enabled)
        except RuntimeError:
            # ATen refused the call (an input on another device): the count taken above is given back and the
            # general path, which checks before counting, refuses it by name.
            self._uncount(True)
            return None
        if y.requires_grad and _tracing_state() is None and 1 in input.shape:  # (traced sizes are tensors)
            F.guard_gradient_layout(input, y)  # (odd gradient strides mislead ATen's backward: see there)
        if running_mean is not None and not torch._C._are_functorch_transforms_active():
            torch.mean(wide_mean.view(groups, channels), 0, out=running_mean)
            torch.mean(wide_var.view(groups, channels), 0, out=running_var)
        elif running_mean is not None:  # (vmap, an ensemble's stacked buffers: no batching rule for out=)
            running_mean.copy_(wide_mean.view(groups, channels).mean(0))
            running_var.copy_(wide_var.view(groups, channels).mean(0))
        y = y.reshape(input.shape)
        if not input.is_contiguous():
            # (a channels_last batch: (V, G*C, *) is a copy, whose output came back contiguous where torch.nn's
            # BatchNorm2d/3d keep channels_last; one copy back costs less than normalizing without the reshape)
            y = F.keep_channels_last(input, y)
        return y

    def _forward_composite_direct(self, input: torch.Tensor, mask=None) -> Optional[torch.Tensor]:
        """Renorm without ghost batches, or a boolean padding mask of the input's shape without its feature axis (with
        or without renorm), in a training step of contiguous float32/float64 CPU data with the features on dim 1 or
        last, where the fused kernel is off (or the input beyond its size limit): straight to the functional pipeline
        the general route reaches (``functional._aten_pipeline``, ``functional._masked_rows_batch_norm``), with the
        same arguments, so the same operations and bits. Skipped are the general route's checks that such a call
        passes by construction, answered here by the few reads below (at (64, 120) the module and
        ``functional.batch_norm`` checked dtypes, devices, sizes, the mask and the renorm state twice: a third of a
        renorm step without the kernel). Returns None, having changed nothing, for anything else (other dtypes, devices,
        layouts, masks, tensors of other sizes, traces, transforms): the general route then computes or refuses it."""
        if (type(input) is not torch.Tensor or not input.is_cpu or input.dtype not in _FULL_PRECISION
                or not self.track_running_stats or _tracing_state() is not None or torch.compiler.is_exporting()
                or kernels.transforms_active()):
            return None
        ndim = input.dim()
        if ndim < 2 or not input.is_contiguous() or (kernels.enabled()  # (either device's: the cheaper read)
                                                     and input.numel() <= kernels.fused_max_numel()):
            return None  # (the kernel's domain: its routes, then the general one, decide)
        self._check_input_dim(input)  # (BatchNorm1d/2d/3d's ranks, refused by name as on the general route)
        axis, shape = self.axis, input.shape
        if axis in (1, 1 - ndim):
            feature = 1
        elif axis in (-1, ndim - 1):
            feature = ndim - 1
        else:
            return None
        channels, values = shape[feature], input.numel()
        if channels != self.num_features or values == 0:
            return None
        if mask is not None:
            # (the general route's _expand_mask gives this mask the feature axis back, a view; F.batch_norm then
            # takes it as it is)
            if (type(mask) is not torch.Tensor or mask.dtype != torch.bool or mask.device != input.device
                    or mask.shape != shape[:feature] + shape[feature + 1:]):
                return None
            mask = mask.unsqueeze(feature)
        elif values // channels <= 1:  # (one value per feature: refused, by name, on the general route)
            return None
        renorm = self.renorm
        running_mean, running_var = _buffer_of(self, "running_mean"), _buffer_of(self, "running_var")
        renorm_state = ((_buffer_of(self, "renorm_mean"), _buffer_of(self, "renorm_stddev"),
                         _buffer_of(self, "moving_stddev")) if renorm else (None, None, None))
        weight, bias = _affine_of(self)
        dtype = input.dtype
        # The layer's tensors as the general route's checks pass them, without a cast anywhere: the input's dtype,
        # on the CPU, one value per feature (weight and bias optional).
        for tensor, needed in ((running_mean, True), (running_var, True), (renorm_state[0], renorm),
                               (renorm_state[1], renorm), (renorm_state[2], renorm), (weight, False), (bias, False)):
            if tensor is None:
                if needed:
                    return None
            elif (not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or not tensor.is_cpu
                  or tensor.numel() != channels):
                return None
        if _buffer_of(self, "num_batches_tracked") is None:
            return None
        if self._recenter_check_due():  # (as the general route: before the count)
            self._update_recenter(input, (feature,), mask)
        # From here on the general route's own steps, in its order, with its handling of what they raise.
        factor = self._tracking_factor()
        try:
            clipping = self.renorm_clipping.at_step(self._renorm_step) if renorm else (0.0, math.inf, math.inf)
        except Exception:
            self._uncount(True)
            raise
        try:  # (the bounds need no check: RenormClipping validates what at_step gives)
            if mask is None:
                return F._aten_pipeline(input, (feature,), None, self.ghost_layout, running_mean, running_var, weight,
                                        bias, True, factor, self.eps, self.unbiased_running_var, *renorm_state,
                                        clipping, self.renorm_momentum, self._recenter)
            return F._masked_rows_batch_norm(input, (feature,), mask, running_mean, running_var, weight, bias, True,
                                             factor, self.eps, self.unbiased_running_var, *renorm_state, clipping,
                                             self.renorm_momentum, self._recenter)
        except ValueError:
            self._uncount(True)
            raise
        except RuntimeError as error:
            refusal = _transform_refusal(self, error, input)
            if refusal is None:
                raise
            self._uncount(True)
            raise refusal from error

    def _forward_options(self, input: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        training = self.training and not self.frozen
        if training and (self.renorm or self.virtual_batch_size is not None or mask is not None
                         or self.adjustment is not None) and _onnx_exporting():
            self._refuse_onnx_training(mask)
        if (training and (self.momentum is None or not self.unbiased_running_var) and self.track_running_stats
                and _onnx_exporting()):
            channels, restore = F._channels_view(input, self._feature_axes(input, training))
            y = self._onnx_training_step(channels, *(None if t is None else t.reshape(-1) for t in _affine_of(self)))
            return y if restore is None else restore(y)
        try:
            F.check_floating(input)
            _check_input_device(input, self.weight, self.running_mean)  # (before the count: ATen would refuse after)
            _check_input_dtype(input, self.weight, self.running_mean, autocast_casts=False)
            self._check_input_dim(input)
            feature_axes = self._feature_axes(input, training)
            self._check_own_sizes(training)
            if mask is not None:
                mask = self._expand_mask(mask, input, feature_axes)
            if (training or self.running_mean is None) and self._recenter_check_due():  # (batch statistics)
                self._update_recenter(input, feature_axes, mask)
            virtual = self.virtual_batch_size if training else None
            if virtual is not None:
                check_ghost_batch(input.shape[0], virtual)
        except Exception:
            self._refuse_with_peers(training, input)
            raise
        factor = 0.0
        if training and self.track_running_stats:
            factor = self._tracking_factor()
        # torch.nn's rule: buffers are used when not training, or when tracking in training.
        use_buffers = not training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        weight, bias = self.weight, self.bias
        if self.frozen:
            weight = None if weight is None else weight.detach()
            bias = None if bias is None else bias.detach()
        batch_stats = training or running_mean is None
        # Renorm corrects the batch's statistics toward the ones inference will use, and its averages move with the
        # running statistics. A training call without them (track_running_stats switched off on the built layer, or
        # the buffers set to None, as test-time adaptation does) has nothing to correct toward and moves nothing:
        # r and d came from renorm averages frozen there, the output normalized by the statistics of old data.
        # It normalizes by the batch, as torch.nn's layer does there (and replace_all_batch_norm_modules_ makes it).
        renorm = self.renorm and training and running_mean is not None
        try:
            clipping = self.renorm_clipping.at_step(self._renorm_step) if renorm else (0.0, math.inf, math.inf)
        except Exception:
            # A schedule that raises, or gives values refused at this step, refuses the call before the merge: its
            # peers are told (raised inside the call's arguments, they waited in the merge and paired with this
            # process's next collective: another layer's statistics, or a wrong error, and a hang further on)
            self._uncount(training)
            self._refuse_with_peers(training, input)
            raise
        if batch_stats and not training and mask is None and input.numel() > 0:
            # (out of training, batch statistics because there are none to use: one value per channel is refused by
            # the functional twin too, which says "when training" and "use eval()", where the layer already is)
            features = math.prod([input.shape[a] for a in feature_axes])
            F.check_enough_values(input.numel() // features, input.shape, training=False,
                                  hint=_NO_RUNNING_STATISTICS_HINT)
        normalize = F.batch_norm
        if self.synchronized and training:  # (eval never synchronizes: the statistics are this process's input's)
            from . import distributed
            if distributed.is_active(self.process_group):
                normalize = functools.partial(distributed.sync_batch_norm, process_group=self.process_group)
            elif torch.compiler.is_compiling():
                if not getattr(self, "_warned_local", False):  # (read while tracing: no call once warned)
                    distributed.warn_local_once_while_tracing(self, _shown_name(self))
            else:
                distributed.warn_local_once(self, _shown_name(self))
        try:  # (free when nothing is raised)
            return normalize(
                input, running_mean, running_var, weight, bias, batch_stats, factor, self.eps,
                # (the mask in eval too: it names no statistic there, but the padding rule's positions)
                axis=feature_axes, mask=mask,
                virtual_batch_size=virtual if batch_stats else None,
                ghost_layout=self.ghost_layout, unbiased_running_var=self.unbiased_running_var,
                renorm_mean=self.renorm_mean if renorm else None,
                renorm_stddev=self.renorm_stddev if renorm else None,
                moving_stddev=self.moving_stddev if renorm else None,
                renorm_clipping=clipping,
                renorm_momentum=self.renorm_momentum,
                adjustment=self.adjustment if training else None,
                # Compiled graphs always recenter: the check reads data on the host, and inductor's
                # statistics lose float32 variance far from zero as ATen's CPU kernel does; the shift is
                # one subtraction the compiler fuses into the statistics pass.
                recenter=self._recenter or torch.compiler.is_compiling(),
            )
        except ValueError:
            # An input refused by the functional checks after the count (one value per channel or per ghost batch, an
            # adjustment's terms that do not fit): nothing moved but the count, which is given back.
            self._uncount(training)
            raise
        except RuntimeError as error:
            refusal = _transform_refusal(self, error, input) if training else None
            if refusal is None:
                raise
            self._uncount(training)  # (the count this step took: the call changed nothing)
            raise refusal from error

    def _uncount(self, training: bool) -> None:
        """Give back the count a refused training call took (a call that raised leaves the layer as it was)."""
        if training and self.track_running_stats and _buffer_of(self, "num_batches_tracked") is not None:
            _buffer_of(self, "num_batches_tracked").sub_(1)

    def _refuse_onnx_training(self, mask) -> None:
        """ONNX has no training form of renorm, ghost batches, masks or adjustment: both exporters failed on the
        training step's operations (normkit's renorm_factors, aten._foreach_mul_, aten::batch_norm_update_stats),
        naming none of the layer's options. Their inference is plain batch normalization, which exports."""
        options = [name for name, on in (("renorm=True", self.renorm),
                                         (f"virtual_batch_size={self.virtual_batch_size}",
                                          self.virtual_batch_size is not None),
                                         ("a mask", mask is not None), ("adjustment", self.adjustment is not None))
                   if on]
        raise RuntimeError(f"{_shown_name(self)} with {' and '.join(options)} cannot be exported to ONNX in training "
                           "mode: ONNX has no operators for that training step. Export the model in eval mode "
                           "(model.eval() before torch.onnx.export; with dynamo=False, "
                           "training=torch.onnx.TrainingMode.EVAL, its default), where the layer normalizes with its "
                           "running statistics: one BatchNormalization node")

    def _refuse_with_peers(self, training: bool, input=None) -> None:
        """Before this process refuses its input to a synchronized training step: the peers are (or will be)
        waiting in the merge for it; told (distributed.refuse_with_peers), they raise at once instead of waiting
        for the group's timeout or pairing with its next collective and merging garbage."""
        if self.synchronized and training and not self.frozen:
            from . import distributed
            distributed.refuse_with_peers(self.process_group, _device_of(self, input))

    def _renorm_step(self):
        """The training step a clipping schedule is evaluated at: the batches tracked before this one."""
        if torch.compiler.is_exporting():
            raise RuntimeError(f"{type(self).__name__}: torch.export cannot trace a renorm_clipping schedule in "
                               "training mode (its values depend on the step count, a buffer, and a Python "
                               "callable of it cannot become part of the program); export in eval mode, or give "
                               "fixed rmax/rmin/dmax values for the exported training step")
        if self.num_batches_tracked is None:  # (int(None) would fail with a TypeError that names nothing here)
            raise ValueError(f"{type(self).__name__}: a renorm_clipping schedule is a function of the step count, "
                             "num_batches_tracked, which this layer has set to None; register it again "
                             "(layer.num_batches_tracked = torch.tensor(0)) or give fixed rmax/rmin/dmax values")
        step = int(self.num_batches_tracked) - 1
        # Compiled, the step is a symbol; as a float, schedules like ``1 + t / 10`` trace as float division
        # (Dynamo fails on a symbolic integer's true division). Same values as the eager int.
        return torch.sym_float(step) if torch.compiler.is_compiling() else step


class _BatchNormNd(BatchNorm):
    """torch.nn's BatchNorm1d/2d/3d contract: constructor, defaults, rank checks; feature axis 1."""

    _accepted_ranks: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, **options):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         axis=options.pop("axis", 1), **options)

    def _checked_axis(self, axis, name):
        if isinstance(axis, bool) or axis != 1:
            raise ValueError(f"{type(self).__name__} normalizes over axis 1 (channels), got {name}={axis!r}; use "
                             "normkit.BatchNorm(axis=...) for another feature axis")
        return super()._checked_axis(axis, name)

    def _other_axis_hint(self, input: torch.Tensor) -> str:
        # (these classes refuse any axis but 1: "pass the right axis" would send the user to another error)
        last = input.dim() - 1
        where = "the last axis" if input.shape[last] == self.num_features else "another axis"
        axis = -1 if where == "the last axis" else "..."
        return (f"; {type(self).__name__} normalizes axis 1 only, so for features on {where} use "
                f"normkit.BatchNorm({self.num_features}, axis={axis}) (or move them to axis 1)")

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in self._accepted_ranks:
            expected = " or ".join(f"{r}D" for r in self._accepted_ranks)
            # (what takes the input: normkit.BatchNorm, which was named for every rank, refuses rank 0 and 1 too)
            name = type(self).__name__
            lazy = "Lazy" if name.startswith("Lazy") else ""
            size = "" if lazy else str(self.num_features)
            dims = {2: 1, 3: 1, 4: 2, 5: 3}.get(input.dim())
            if input.dim() < 2:
                fix = ("batch normalization needs a batch: give it (N, C, *) input (x.unsqueeze(0) for a single "
                       "sample, in eval)")
            elif dims is not None:
                fix = f"use normkit.{lazy}BatchNorm{dims}d({size}) for {input.dim()}D input"
            else:
                fix = f"use normkit.{lazy}BatchNorm({size}) for inputs of any rank"
            raise ValueError(f"expected {expected} input (got {input.dim()}D input) for {name}; {fix}")


class BatchNorm1d(_BatchNormNd):
    """BatchNorm over (N, C) or (N, C, L) inputs: a drop-in for torch.nn.BatchNorm1d (see BatchNorm)."""

    _accepted_ranks = (2, 3)


class BatchNorm2d(_BatchNormNd):
    """BatchNorm over (N, C, H, W) inputs: a drop-in for torch.nn.BatchNorm2d (see BatchNorm)."""

    _accepted_ranks = (4,)


class BatchNorm3d(_BatchNormNd):
    """BatchNorm over (N, C, D, H, W) inputs: a drop-in for torch.nn.BatchNorm3d (see BatchNorm)."""

    _accepted_ranks = (5,)


# Where GroupNorm's, InstanceNorm's and LayerNorm's CPU data sits. ATen's group and layer norms take each group's
# (row's) variance from sums in the input's precision: group norm's kernel for channels-last input as E[x^2] - E[x]^2,
# which loses it where the group's mean lies a few standard deviations from zero (outputs 1e-4 off at mean 10 and std
# 1, 0.04 at 100, O(1) at 1e3, the gradients likewise), its contiguous kernel more slowly (2e-6, 2e-5, 1e-4, 2e-3 at
# 1e4: twice instance_norm's error there), layer norm's 0.17 off at mean 1e4 and std 1e-2. Such data is a property of
# its source, so a check on the first call and every LAYOUT_CHECK_EVERY after it (as BatchNorm's recentering check)
# marks a layer whose CPU data lies far from zero, and its calls subtract each group's (row's) mean first
# (F.recentered, F.recentered_rows: the normalization is the same function of the input, gradients included; the
# difference of values that close is exact), which ATen's kernels then see near zero: 3e-7 at 1e4. Everything else
# (half precision, other devices, traces, shapes the groups do not fit: _recenterable) keeps torch.nn's call and bits;
# the countdown costs about 0.16 us a call.
LAYOUT_CHECK_EVERY = 1000
FAR_FROM_ZERO = 4.0  # |group mean| / group std beyond which the data is recentered


def _recenterable(input: torch.Tensor, groups: Optional[int]) -> bool:
    """Whether recentering may change this call: float32/float64 CPU data with values, eagerly (not in a trace, whose
    graph would depend on the layer's history, nor under vmap), of a shape the groups fit (else ATen's refusal, or the
    layer's, names the problem). Half precision keeps torch's call: its kernels compute in float32 anyway, and the
    difference of a value and a mean of the opposite sign can overflow float16."""
    return (_tracing_state() is None and input.is_cpu and input.dtype in _FULL_PRECISION and input.numel() > 0
            and not F.without_data(input) and not _under_vmap(input)
            and (groups is None or (input.dim() >= 2 and input.shape[1] % groups == 0)))


def _far_from_zero(layer: nn.Module, input: torch.Tensor, groups: Optional[int] = None) -> bool:
    """Whether to recenter this call's data: ``layer``'s data lies far from zero (see FAR_FROM_ZERO), checked on this
    call when the check is due, per (sample, group of channels) for ``groups``, else per row over LayerNorm's
    normalized dims; and this input can be (``_recenterable``, asked of every call the answer would recenter). The
    answer and the countdown live in the layer's ``__dict__`` (Module.__setattr__ costs more than the check)."""
    if torch.compiler.is_dynamo_compiling():  # (21 ns eagerly, where is_compiling() costs 60)
        return False  # (first: Dynamo guarded on the countdown and compiled the layer again at every call)
    state = layer.__dict__
    steps = state.get("_steps_to_layout_check", 0)
    if steps > 0:
        state["_steps_to_layout_check"] = steps - 1
        return state["_far_from_zero_data"] and _recenterable(input, groups)
    if not _recenterable(input, groups):
        return False  # (the check is due again next call)
    with torch.no_grad():
        # (float64 data in float64: rounded to float32, data at 1e10 with std 1 looked constant, checked every call)
        values = input.detach() if input.dtype == torch.float64 else input.detach().float()
        # Data that is one value throughout (zeros, a constant batch) says nothing, so the check stays due and ran on
        # every such call: Welford's statistics below, per row or channel, cost 4-20x the layer's own call. One
        # vectorized pass (aminmax) finds such data first. ATen's var_mean of equal values is exactly 0 with that
        # value as the mean, so the statistics are known without it: a row's variance 0 (nothing varies), a
        # channel's (0, value), combined below as before, to the same answer.
        low, high = torch.aminmax(values)
        level = low.item()
        constant = level == high.item()  # (NaN anywhere: not equal, the statistics decide as before)
        if constant and groups is None:
            return False  # (every row constant: nothing varies, checked again next call)
        key = (level, values.dtype, tuple(input.shape[:2]), groups)
        if constant and state.get("_constant_says_nothing") == key:
            return False  # (the same constant as the last call, whose statistics showed nothing varying)
        if groups is None:
            var, mean = torch.var_mean(values, dim=tuple(range(-len(layer.normalized_shape), 0)), correction=0)
        else:
            # per channel, over the positions (any layout, no copy), then per group by the law of total variance;
            # (N, C) data has one position (var_mean over no dims would reduce them all)
            if constant:
                mean = values.new_full(tuple(input.shape[:2]), level)  # (var_mean's (N, C) answer, exactly)
                var = torch.zeros_like(mean)
            elif input.dim() == 2:
                mean = values.contiguous()  # (for the views below)
                var = torch.zeros_like(mean)
            else:
                var, mean = torch.var_mean(values, dim=tuple(range(2, input.dim())), correction=0)
            var, mean = var.view(input.shape[0], groups, -1), mean.view(input.shape[0], groups, -1)
            channel_mean, mean = mean, mean.mean(2)
            var = var.mean(2) + (channel_mean - mean.unsqueeze(2)).square().mean(2)
        varies = var > 0
        if not bool(varies.any()):
            if constant:
                state["_constant_says_nothing"] = key
            return False  # (constant groups lose nothing and say nothing about the data: checked again next call)
        far = bool(((mean.abs() > FAR_FROM_ZERO * var.sqrt()) & varies).any())
    state["_far_from_zero_data"] = far
    state["_steps_to_layout_check"] = LAYOUT_CHECK_EVERY - 1
    return far


class _SampleNorm(nn.Module):
    """What LayerNorm and GroupNorm share: the sample's own statistics, an optional affine, torch.nn's init order."""

    __prepare_scriptable__ = _refuse_torchscript

    # Settings changed on a built layer are checked as the constructor checks them: eps (the short path's
    # `self.eps > 0` failed on a string with "'>' not supported between instances of 'str' and 'int'", and took inf,
    # every output the bias, and True silently), LayerNorm's normalized_shape (an int failed with "object of type
    # 'int' has no len()"), GroupNorm's num_groups (a string or 0 failed inside ATen).
    _SETTING_CHECKS = {"eps": _eps_as_given}

    def __setattr__(self, name, value):
        check = self._SETTING_CHECKS.get(name)
        super().__setattr__(name, value if check is None else check(value))

    def _init_affine(self, eps, shape, affine: bool, bias: bool, device, dtype) -> None:
        self.eps = eps  # (checked by __setattr__)
        _register_affine(self, shape, affine, bias, {"device": device, "dtype": dtype})
        self.reset_parameters()  # as torch.nn: a subclass's own initialization runs

    def reset_parameters(self) -> None:
        _reset_affine(self)

    def _check_input(self, input: torch.Tensor) -> None:
        F.check_floating(input)
        _check_input_device(input, self.weight)
        _check_input_dtype(input, self.weight)

    def _fx_trace(self, input, functional, size):
        """torch.fx.symbolic_trace: a call_module node inside a model (as torch.nn's layer gives); traced as the
        root, torch.nn's forward, the functional op, which fx records (torch.nn's root traces to that too)."""
        if input.tracer.path_of_module(self) == "":
            return functional(input, size, self.weight, self.bias, self.eps)
        return _fx_call_module(self, input)


def _normalized_shape_as_given(normalized_shape) -> tuple:
    """LayerNorm's normalized_shape as torch.nn stores it: a tuple of sizes (an int is one size)."""
    normalized_shape = integer_size(normalized_shape)
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    elif not isinstance(normalized_shape, Iterable) or isinstance(normalized_shape, (str, bytes)):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints (the trailing dims to "
                        f"normalize), got {normalized_shape!r}")
    return _check_num_features(tuple(normalized_shape), name="normalized_shape")


class LayerNorm(_SampleNorm):
    r"""Normalize each sample over its trailing ``normalized_shape`` axes: a drop-in for torch.nn.LayerNorm.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    reduces:     the trailing ``len(normalized_shape)`` axes of each sample
    parameters:  ``weight``/``bias`` of shape ``normalized_shape`` (``elementwise_affine``; ``bias=False`` drops beta)
    statistics:  always the sample's own, in training and eval

    Over (C, H, W) it equals ``GroupNorm(1, C)`` without affine parameters.
    """

    _SETTING_CHECKS = {**_SampleNorm._SETTING_CHECKS, "normalized_shape": _normalized_shape_as_given}

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        F.check_eps(eps)
        self.normalized_shape = shape = _normalized_shape_as_given(normalized_shape)
        self.elementwise_affine = bool(elementwise_affine)
        self._init_affine(eps, shape, self.elementwise_affine, bias, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The common case straight to ATen as torch.nn's layer calls it: on small inputs the general path's
        # checks cost as much as the op.
        shape, (weight, bias) = self.normalized_shape, _affine_of(self)
        if not isinstance(input, torch.Tensor) and isinstance(input, torch.fx.Proxy):
            return self._fx_trace(input, torch.nn.functional.layer_norm, shape)
        if isinstance(input, torch.Tensor) and input.is_nested:
            # Nested tensors (variable-length sequences, torch.nested): torch.nn's call, whose op has their kernels.
            # The checks and the recentering below read sizes and statistics that a nested tensor does not have:
            # they failed ("NestedTensorImpl doesn't support sizes", or var_mean not implemented for jagged ones).
            return torch.nn.functional.layer_norm(input, shape, weight, bias, self.eps)
        if (isinstance(input, torch.Tensor) and input.dtype in _FULL_PRECISION
                and (weight is None or weight.dtype == input.dtype)
                and (_tracing_state() is not None or input.shape[-len(shape):] == shape)  # (see _tracing_state)
                and self.eps > 0):  # (else the general path refuses the eps)
            if _far_from_zero(self, input):
                input = F.recentered_rows(input, len(shape))  # (see _far_from_zero)
            try:  # (free when nothing is raised: the device and sizes are checked only when ATen refuses)
                return torch.layer_norm(input, shape, weight, bias, self.eps, torch.backends.cudnn.enabled)
            except RuntimeError:
                _check_input_device(input, weight)
                _check_tensor_counts(self, math.prod(shape), ("weight", "bias"))
                raise
        self._check_input(input)
        k = len(self.normalized_shape)
        if input.dim() < k or tuple(input.shape[-k:]) != self.normalized_shape:
            # (the fix too, as BatchNorm's and InstanceNorm's refusals say it: the expected shape alone left the user
            # to work out that LayerNorm normalizes the last dims, where a conv's channels sit at dim 1)
            given = tuple(input.shape[-k:]) if input.dim() >= k else tuple(input.shape)
            fix = f"build the layer with normalized_shape={given} to normalize the input's last dims"
            if k == 1 and input.dim() >= 3 and input.shape[1] == self.normalized_shape[0]:
                fix += (f", or move the input's features (dim 1 holds {input.shape[1]}) last: x.movedim(1, -1), "
                        "as LayerNorm normalizes the last dims")
            raise ValueError(f"LayerNorm(normalized_shape={self.normalized_shape}) needs an input whose last {k} "
                             f"dims are {self.normalized_shape}, got shape {tuple(input.shape)}: {fix}")
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return ("{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}, "
                "bias={use_bias}".format(**self.__dict__, use_bias=self.bias is not None))


class GroupNorm(_SampleNorm):
    r"""Normalize each sample over groups of channels: a drop-in for torch.nn.GroupNorm.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    reduces:     the C/G channels of each group and every spatial position, per sample
    parameters:  ``weight``/``bias`` per channel (``affine``)
    statistics:  always the sample's own; independent of the batch size

    ``GroupNorm(1, C)`` is LayerNorm over (C, *S); ``GroupNorm(C, C)`` is InstanceNorm.
    """

    # (a positive int; whether it divides the channels is ATen's check at the next call, as in torch.nn: a model's
    # surgery may change num_groups before num_channels)
    _SETTING_CHECKS = {**_SampleNorm._SETTING_CHECKS,
                       "num_groups": lambda value: _check_num_features(value, name="num_groups", tuples=False)}

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True):
        super().__init__()
        F.check_eps(eps)
        num_groups = _check_num_features(num_groups, name="num_groups", tuples=False)
        num_channels = _check_num_features(num_channels, name="num_channels", tuples=False)
        if num_channels % num_groups != 0:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}; "
                             f"choose one of {group_counts(num_channels)}")
        self.num_groups, self.num_channels = num_groups, num_channels
        self.affine = bool(affine)
        self._init_affine(eps, num_channels, self.affine, bias, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The common case straight to ATen, as in LayerNorm.forward.
        weight, bias = _affine_of(self)
        if not isinstance(input, torch.Tensor) and isinstance(input, torch.fx.Proxy):
            return self._fx_trace(input, torch.nn.functional.group_norm, self.num_groups)
        if (isinstance(input, torch.Tensor) and input.dtype in _FULL_PRECISION
                and (weight is None or weight.dtype == input.dtype) and input.dim() >= 2
                and (_tracing_state() is not None  # (sizes unchecked while tracing: see _tracing_state)
                     or (input.shape[1] == self.num_channels and input.numel() != self.num_groups))
                and self.eps > 0):  # (else the general path refuses the eps)
            if _far_from_zero(self, input, self.num_groups):
                input = F.recentered(input, self.num_groups)  # (see _far_from_zero)
            try:  # (free when nothing is raised: the device and groups are checked only when ATen refuses)
                return F.aten_group_norm(input, self.num_groups, weight, bias, self.eps)
            except RuntimeError:
                _check_input_device(input, weight)
                _check_tensor_counts(self, self.num_channels, ("weight", "bias"))
                # (num_groups set on a built layer to one that does not divide the channels: the ValueError of the
                # general path and of functional.group_norm, not ATen's RuntimeError)
                check_num_groups(self.num_groups, tuple(input.shape))
                raise
        self._check_input(input)
        # (without weight and bias torch.nn's layer takes any number of channels that the groups divide)
        if input.dim() < 2 or (input.shape[1] != self.num_channels and (weight is not None or bias is not None)):
            fix = "give it a batch (N, C, *), channels at dim 1"
            if input.dim() >= 2:
                # (the fix too, as BatchNorm's and InstanceNorm's refusals say it)
                fix = (f"build the layer with num_channels={input.shape[1]} (and num_groups one of "
                       f"{group_counts(input.shape[1])})" if input.shape[1] > 0 else "give it channels")
                if input.dim() >= 3 and input.shape[-1] == self.num_channels:
                    fix += ", or, if its channels are last: x.movedim(-1, 1) (GroupNorm takes them at dim 1)"
            raise ValueError(f"GroupNorm(num_channels={self.num_channels}) needs an input (N, {self.num_channels}, *), "
                             f"got shape {tuple(input.shape)}: {fix}")
        # torch.nn's rule: refused only when the whole input is one value per group. With one value per group
        # and a larger batch every group normalizes to 0 (the output is the bias), as in torch.nn.
        if input.numel() == self.num_groups:
            raise ValueError(f"GroupNorm with num_groups={self.num_groups} sees a single value per group for input "
                             f"{tuple(input.shape)}: the variance is 0; use fewer groups or a larger input")
        if _far_from_zero(self, input, self.num_groups):
            input = F.recentered(input, self.num_groups)  # (see _far_from_zero)
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return ("{num_groups}, {num_channels}, eps={eps}, affine={affine}, "
                "bias={use_bias}".format(**self.__dict__, use_bias=self.bias is not None))


def _instance_rank_refusal(layer: nn.Module, input: torch.Tensor) -> ValueError:
    """An instance norm's (eager or lazy) refusal of an input of another rank, naming what takes it, as the BN classes'
    refusals do: the instance norm of its rank (batched; InstanceNorm1d for unbatched 2D input), else GroupNorm(C, C),
    the same normalization for any rank."""
    name = type(layer).__name__
    batched = layer._spatial_dims + 2
    lazy = "Lazy" if name.startswith("Lazy") else ""
    size = "" if lazy else str(layer.num_features)
    dims = input.dim() - 2
    if 1 <= dims <= 3:
        fix = f"use normkit.{lazy}InstanceNorm{dims}d({size}) for batched {input.dim()}D input"
    elif dims == 0:
        fix = f"use normkit.{lazy}InstanceNorm1d({size}) for unbatched (C, L) input"
    else:
        channels = size or "C"
        fix = (f"use normkit.GroupNorm({channels}, {channels}) (one group per channel: instance normalization) for "
               "(N, C, *) input of any rank")
    return ValueError(f"expected {batched - 1}D (unbatched) or {batched}D (batched) input (got {input.dim()}D input) "
                      f"for {name}; {fix}")


class _InstanceNorm(_NormBase):
    r"""Normalize each sample and channel over its spatial positions: drop-in for torch.nn.InstanceNorm*d.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    reduces:     the spatial axes of each (sample, channel)
    parameters:  ``weight``/``bias`` per channel when ``affine`` (default False)
    statistics:  the instance's own; with ``track_running_stats=True`` running averages of
                 them are kept and used in eval (torch.nn's rule)

    Unbatched input (C, *S) is accepted. Equals ``GroupNorm(C, C)``.
    """

    _spatial_dims = 0

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, *, bias: bool = True):
        # One channel count: a tuple (which BatchNorm takes for several feature axes) never matched an input's
        # channels, and only the first call said so, as "build the layer with num_features=C".
        _check_num_features(num_features, tuples=False)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version is None and not self.track_running_stats:
            stray = [prefix + name for name in ("running_mean", "running_var") if prefix + name in state_dict]
            if stray:
                error_msgs.append(f"Unexpected running stats buffer(s) {stray} for {type(self).__name__} with "
                                  "track_running_stats=False; they are ignored (drop them from the state_dict, or "
                                  "build the layer with track_running_stats=True to use them)")
                for key in stray:
                    state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The common case straight to ATen, as in LayerNorm.forward: a batched full-precision input of the layer's
        # dtype and channels with more than one value per instance (what the general path below checks, then
        # passes to the same call); on small inputs those checks and Module.__getattr__ cost 5-15% of the op.
        weight, bias = _affine_of(self)
        batched_rank = self._spatial_dims + 2
        traced = _tracing_state() is not None  # (sizes unchecked while tracing: see _tracing_state)
        if (isinstance(input, torch.Tensor) and input.dtype in _FULL_PRECISION
                and (weight is None or weight.dtype == input.dtype) and input.dim() == batched_rank
                and (traced or (input.shape[1] == self.num_features and input.numel() != 0))
                and type(self.eps) is float and 0.0 < self.eps < math.inf):
            use_input_stats = self.training or not self.track_running_stats
            if not use_input_stats or traced or math.prod(input.shape[2:]) > 1:
                if (use_input_stats and _buffer_of(self, "running_mean") is None
                        and _far_from_zero(self, input, input.shape[1])):
                    # (nothing to track: the statistics of recentered data would have to be shifted back)
                    input = F.recentered(input, input.shape[1])
                try:  # (free when nothing is raised: the device is checked only when ATen refuses)
                    return F.aten_instance_norm(input, weight, bias, _buffer_of(self, "running_mean"),
                                                _buffer_of(self, "running_var"), use_input_stats,
                                                self.momentum if self.momentum is not None else 0.0, self.eps)
                except RuntimeError as error:
                    _check_input_device(input, weight, _buffer_of(self, "running_mean"))
                    _check_tensor_counts(self, self.num_features, ("weight", "bias", "running_mean", "running_var"))
                    refusal = _transform_refusal(self, error, input) if self.training else None
                    if refusal is not None:
                        raise refusal from error
                    raise
        if not isinstance(input, torch.Tensor) and isinstance(input, torch.fx.Proxy):
            return _fx_call_module(self, input)
        F.check_floating(input)
        _check_input_device(input, self.weight, self.running_mean)
        _check_input_dtype(input, self.weight)  # (torch.nn takes float64 input with float32 running buffers)
        if input.dim() not in (batched_rank - 1, batched_rank):
            raise _instance_rank_refusal(self, input)
        unbatched = input.dim() == batched_rank - 1
        x = input.unsqueeze(0) if unbatched else input
        if x.shape[1] != self.num_features:
            if self.affine or self.running_mean is not None:
                # (torch.nn fails inside ATen here, on the size of the weight or the running buffers)
                raise ValueError(f"num_features={self.num_features} but the input of shape {tuple(input.shape)} has "
                                 f"{x.shape[1]} channels: build the layer with num_features={x.shape[1]}")
            warnings.warn(f"input has {x.shape[1]} channels but num_features={self.num_features}; without affine "
                          "parameters or running stats this is harmless, but probably not what you meant")
        # torch.nn's rule: no batch count, and momentum=None means the running statistics stay as they are.
        use_input_stats = self.training or not self.track_running_stats
        if not use_input_stats and (self.running_mean is None or self.running_var is None):
            # ATen's own check (torch.nn raises it for any batch, the short path above through ATen), made here
            # since an empty batch never reaches ATen; functional.instance_norm raises the reference's ValueError
            raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false "
                               "(eval with track_running_stats=True normalizes with the running statistics, which "
                               "were set to None)")
        factor = self.momentum if self.momentum is not None else 0.0
        if use_input_stats and self.running_mean is None and _far_from_zero(self, x, x.shape[1]):
            # (as on the short path: an unbatched input (C, *S) kept torch's error far from zero, 0.1 at 1e4)
            x = F.recentered(x, x.shape[1])
        try:
            y = F.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_input_stats,
                                factor, self.eps)
        except RuntimeError as error:
            # (as on the short path: vmap(layer)(x) hands each sample here unbatched, and torch's refusal of the
            # update names neither the layer nor a fix that reaches it)
            refusal = _transform_refusal(self, error, input) if self.training else None
            if refusal is not None:
                raise refusal from error
            raise
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    """InstanceNorm over (N, C, L) or (C, L): a drop-in for torch.nn.InstanceNorm1d."""

    _spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):
    """InstanceNorm over (N, C, H, W) or (C, H, W): a drop-in for torch.nn.InstanceNorm2d."""

    _spatial_dims = 2


class InstanceNorm3d(_InstanceNorm):
    """InstanceNorm over (N, C, D, H, W) or (C, D, H, W): a drop-in for torch.nn.InstanceNorm3d."""

    _spatial_dims = 3
