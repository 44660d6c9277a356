"""Lazy layers, sized by their first input: the drop-ins for torch.nn's LazyBatchNorm*d and LazyInstanceNorm*d.

Each is its eager class behind torch's lazy-module protocol (``torch.nn.modules.lazy.LazyModuleMixin``):
built with a placeholder size, so every option is checked as the eager constructor checks it, and with its
feature-sized tensors (weight, bias, running statistics, renorm state) swapped for uninitialized ones. The
first forward sizes them from the input's feature axes and applies the initializers, then the layer becomes
its eager class (``cls_to_become``), as torch.nn's lazy layers do. A state_dict loaded before that sizes them
too. Where torch.nn's lazy layers go wrong (``num_features`` after a loaded state_dict, an unbatched
InstanceNorm input, partial checkpoints, dynamic shapes under torch.compile) these do what the eager layer
would: docs/decisions.md, "Lazy layers".
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from .axes import canonicalize_axes
from .functional import check_floating
from torch import nn

from .modules import (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d,
                      _check_input_device, _check_input_dtype, _instance_rank_refusal)

__all__ = ["LazyBatchNorm", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d", "LazyInstanceNorm1d",
           "LazyInstanceNorm2d", "LazyInstanceNorm3d"]


class _LazyNorm(LazyModuleMixin):
    """What the lazy layers share: the swap to uninitialized tensors and the sizing from an input or a state_dict."""

    cls_to_become: Optional[type] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The eager class a sized layer becomes: its first base that is a module and not lazy
        # (LazyBatchNorm2d(_LazyBatchNormBase, BatchNorm2d) -> BatchNorm2d).
        cls.cls_to_become = next((base for base in cls.__mro__[1:] if issubclass(base, nn.Module)
                                  and not issubclass(base, LazyModuleMixin)), None)

    def __init__(self, *args, **kwargs):
        # The eager constructor with a placeholder size (it checks every option), then the sized tensors swapped
        # for uninitialized ones. _placeholder is set before nn.Module.__init__ (which keeps it): the eager
        # constructor's resets must not draw from torch's generator for placeholder tensors, or building a lazy
        # layer would shift every later random draw.
        object.__setattr__(self, "_placeholder", True)
        super().__init__(self._placeholder_size(kwargs), *args, **kwargs)
        self._make_lazy()

    @staticmethod
    def _placeholder_size(options: dict):
        return 1

    def _make_lazy(self) -> None:
        # num_features 0 until sized, as torch.nn's lazy layers show it.
        del self.__dict__["_placeholder"]
        self.num_features = 0
        for name, tensor in self._parameters.items():
            if tensor is not None:
                self._parameters[name] = UninitializedParameter(tensor.requires_grad, device=tensor.device,
                                                                dtype=tensor.dtype)
        for name, tensor in self._buffers.items():
            if tensor is not None and name != "num_batches_tracked":  # (a count: it has no feature size)
                self._buffers[name] = UninitializedBuffer(device=tensor.device, dtype=tensor.dtype)

    def _sized_tensors(self):
        return [tensor for _, tensor in itertools.chain(self._parameters.items(), self._buffers.items())
                if tensor is not None and (is_lazy(tensor) or tensor.dim() > 0)]

    def _unsized(self) -> bool:
        return self.__dict__.get("_placeholder", False) or self.has_uninitialized_params()

    def reset_parameters(self) -> None:
        # (nothing to reset before the tensors have a size; the first forward applies the initializers)
        if not self._unsized():
            super().reset_parameters()

    def reset_running_stats(self) -> None:
        if not self._unsized():
            super().reset_running_stats()

    def _infer_parameters(self, module, args, kwargs=None):
        # Under torch.fx.symbolic_trace the input is a Proxy, which has no size: the layer stays lazy and its forward
        # records one call_module node (torch.nn's lazy layers, which fx takes as leaves, are recorded so), and the
        # traced module's first call sizes it. (Sizing from the Proxy refused the trace: "expects a tensor input".)
        if args and isinstance(args[0], torch.fx.Proxy):
            return None
        return super()._infer_parameters(module, args, kwargs)

    def initialize_parameters(self, input, *args, **kwargs) -> None:
        """Size every feature-sized tensor from ``input`` (torch's lazy protocol calls this before the first
        forward) and apply the initializers; a layer sized by a loaded state_dict keeps the loaded size."""
        try:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"{type(self).__name__} expects a tensor input, got {type(input).__name__}")
            self._check_input_rank(input)
            # The forward's own refusals of the input, before sizing: sized by an input it then refused, the layer
            # came out of the failed call changed (sized, initialized, no longer lazy).
            check_floating(input)
            tensors = self._sized_tensors()
            _check_input_device(input, *tensors)
            _check_input_dtype(input, *self._dtype_checked(tensors),
                               autocast_casts=not isinstance(self, BatchNorm))  # (see there)
            mask = kwargs.get("mask", args[0] if args else None)
            if mask is not None and hasattr(self, "_expand_mask"):  # (BatchNorm's mask: its shape is checked too)
                self._expand_mask(mask, input, canonicalize_axes(self.axis, input.dim()))
            # (plain ints: traced by torch.compile with dynamic shapes the sizes are symbolic, which materialize
            # refuses; int() specializes on them, as the sized layer's tensors are of one size anyway)
            shape = tuple(int(size) for size in self._feature_shape(input))
        except Exception:
            # A synchronized training call refused here, before the forward: its peers, sized by their own first
            # call, wait in the merge for this process. Told (BatchNorm._refuse_with_peers), they raise at once;
            # they waited for the group's timeout before, or paired with this process's next collective.
            refuse = getattr(self, "_refuse_with_peers", None)
            if refuse is not None:
                refuse(self.training, input if isinstance(input, torch.Tensor) else None)
            raise
        if self.has_uninitialized_params():
            # A partial state_dict (strict=False) sized some tensors: they keep their values and say the size (an
            # input of another size is then refused by the eager forward), the others are initialized, as in an
            # eager layer of that size that loaded the same state_dict.
            loaded = {id(tensor): tensor.detach().clone() for tensor in self._sized_tensors() if not is_lazy(tensor)}
            count = self._buffers.get("num_batches_tracked")
            count = None if count is None else count.clone()
            if loaded:
                shape = tuple(next(iter(loaded.values())).shape)
            with torch.no_grad():
                for tensor in self._sized_tensors():
                    if is_lazy(tensor):
                        tensor.materialize(shape)
                self.num_features = self._num_features_of(shape)
                self.reset_parameters()
                for tensor in self._sized_tensors():
                    if id(tensor) in loaded:
                        tensor.copy_(loaded[id(tensor)])
                if count is not None:
                    self._buffers["num_batches_tracked"].copy_(count)
        elif not self._size_from_loaded_tensors():
            # No feature-sized tensor at all (affine=False, no running statistics): the input says the size.
            self.num_features = self._num_features_of(shape)

    def _dtype_checked(self, tensors: list) -> list:
        """The tensors whose dtype the first input's must fit, as the eager forward checks it: all (BatchNorm's)."""
        return tensors

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # (a partial state_dict too: num_features is the loaded size at once; the rest is sized to it on the first call)
        self._size_from_loaded_tensors()

    def _lazy_load_hook(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs):
        # torch's hook sizes each tensor by the checkpoint's, whatever its rank and whether the others agree: a
        # BatchNorm(axis=(1, 2)) checkpoint loaded into a one-axis layer (or the reverse) gave a layer that failed on
        # every call, where the eager layer refuses the checkpoint. Refused here too, nothing sized.
        sizes = {tuple(tensor.shape) for tensor in self._sized_tensors() if not is_lazy(tensor)}
        found = {}
        for name, tensor in itertools.chain(self._parameters.items(), self._buffers.items()):
            given = state_dict.get(prefix + name)
            if tensor is not None and is_lazy(tensor) and isinstance(given, torch.Tensor) and not is_lazy(given):
                found[prefix + name] = tuple(given.shape)
        sizes |= set(found.values())
        if len(sizes) > 1 or any(len(shape) != self._feature_rank() for shape in sizes):
            error_msgs.append(f"size mismatch for {type(self).__name__}: its feature-sized tensors need one shape of "
                              f"{self._feature_rank()} dimension(s) (one size per feature axis), the checkpoint has "
                              + ", ".join(f"{key}: {list(shape)}" for key, shape in found.items()))
            for name, tensor in itertools.chain(self._parameters.items(), self._buffers.items()):
                if prefix + name in found:
                    state_dict[prefix + name] = tensor  # (the load's own copy: copying it into itself does nothing)
            return
        super()._lazy_load_hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _size_from_loaded_tensors(self) -> bool:
        sized = [tensor for tensor in self._sized_tensors() if not is_lazy(tensor)]
        if sized:
            self.num_features = self._num_features_of(tuple(sized[0].shape))
        return bool(sized)

    def _feature_rank(self) -> int:
        # (the dimensions of each feature-sized tensor)
        return 1

    # Each family says where its features are.
    def _check_input_rank(self, input: torch.Tensor) -> None:
        raise NotImplementedError

    def _feature_shape(self, input: torch.Tensor) -> tuple:
        raise NotImplementedError

    def _num_features_of(self, shape: tuple):
        raise NotImplementedError


class _LazyBatchNormBase(_LazyNorm):
    def __init__(self, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, **options):
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, **options)

    @staticmethod
    def _placeholder_size(options: dict):
        axis = options.get("axis", 1)  # (one size per feature axis)
        return (1,) * len(axis) if isinstance(axis, (tuple, list)) else 1

    def _check_input_rank(self, input: torch.Tensor) -> None:
        self._check_input_dim(input)

    def _feature_shape(self, input: torch.Tensor) -> tuple:
        return tuple(input.shape[axis] for axis in canonicalize_axes(self.axis, input.dim()))

    def _add_renorm_state(self) -> None:
        # renorm switched on before sizing: its state has no size yet either; the sizing derives it from the running
        # statistics then (reset_parameters), as an eager layer derives it when renorm is switched on.
        if is_lazy(self.running_var):
            for name in self.RENORM_STATE:
                if name not in self._buffers:
                    self.register_buffer(name, UninitializedBuffer(device=self.running_var.device,
                                                                   dtype=self.running_var.dtype))
            self.__dict__["_renorm_state_due"] = True
            return
        super()._add_renorm_state()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if not self._unsized() and self.__dict__.pop("_renorm_state_due", False):
            with torch.no_grad():
                for name, value in self._renorm_state_from(self.running_mean, self.running_var).items():
                    self._buffers[name].copy_(value)

    # Before sizing there is no weight to freeze, regularize or project: torch refuses any use of an uninitialized
    # parameter with a message that names neither the layer nor the way out (and freeze() had set frozen first).
    def _refuse_unsized(self, what: str) -> None:
        if self._unsized():
            raise ValueError(f"{type(self).__name__}.{what}: the layer has no size yet (a lazy layer's tensors are "
                             "sized by its first input or by a loaded state_dict): call it on a batch, or load a "
                             "state_dict, first")

    def freeze(self):
        self._refuse_unsized("freeze()")
        return super().freeze()

    def unfreeze(self):
        if not self._unsized():
            return super().unfreeze()
        # (nothing to unfreeze but the flag and requires_grad, which an uninitialized parameter keeps through sizing;
        # its requires_grad_() refuses, the attribute does not)
        self.frozen = False
        for parameter in (self.weight, self.bias):
            if parameter is not None:
                parameter.requires_grad = True
        return self

    def regularization_loss(self) -> torch.Tensor:
        if self.weight_regularizer is not None or self.bias_regularizer is not None:
            self._refuse_unsized("regularization_loss()")
        return super().regularization_loss()

    def apply_constraints(self, parameters=None) -> None:
        if self.weight_constraint is not None or self.bias_constraint is not None:
            self._refuse_unsized("apply_constraints()")
        super().apply_constraints(parameters)

    def _feature_rank(self) -> int:
        return len(self.axis) if isinstance(self.axis, tuple) else 1

    def _num_features_of(self, shape: tuple):
        # Several feature axes give one size per axis (BatchNorm's tuple num_features); one axis an int.
        return shape if isinstance(self.axis, tuple) else shape[0]


class LazyBatchNorm(_LazyBatchNormBase, BatchNorm):
    """``normkit.BatchNorm`` whose ``num_features`` is read from the first input's feature ``axis`` (one size per
    axis when ``axis`` is a tuple). Takes BatchNorm's arguments but ``num_features``; becomes a BatchNorm."""


class LazyBatchNorm1d(_LazyBatchNormBase, BatchNorm1d):
    """A drop-in for torch.nn.LazyBatchNorm1d: normkit.BatchNorm1d sized by its first input; becomes one."""


class LazyBatchNorm2d(_LazyBatchNormBase, BatchNorm2d):
    """A drop-in for torch.nn.LazyBatchNorm2d: normkit.BatchNorm2d sized by its first input; becomes one."""


class LazyBatchNorm3d(_LazyBatchNormBase, BatchNorm3d):
    """A drop-in for torch.nn.LazyBatchNorm3d: normkit.BatchNorm3d sized by its first input; becomes one."""


class _LazyInstanceNorm(_LazyNorm):
    # affine and track_running_stats default to True, as torch.nn's lazy instance norms' constructors have it
    # (their docstrings say False; the eager InstanceNorm*d's defaults are False): a drop-in keeps the behaviour.
    def __init__(self, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True):
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def _check_input_rank(self, input: torch.Tensor) -> None:
        batched = self._spatial_dims + 2
        if input.dim() not in (batched - 1, batched):
            raise _instance_rank_refusal(self, input)

    def _dtype_checked(self, tensors: list) -> list:
        # The weight alone, as the eager forward checks it: without one, float64 data goes with float32 running
        # statistics, as in torch.nn's lazy and eager layers (all the tensors were checked: a TypeError there).
        return [self.weight]

    def _feature_shape(self, input: torch.Tensor) -> tuple:
        # Channels are axis 1 of a batch (N, C, *S) and axis 0 of one unbatched sample (C, *S).
        return (input.shape[1 if input.dim() == self._spatial_dims + 2 else 0],)

    def _num_features_of(self, shape: tuple):
        return shape[0]


class LazyInstanceNorm1d(_LazyInstanceNorm, InstanceNorm1d):
    """A drop-in for torch.nn.LazyInstanceNorm1d: normkit.InstanceNorm1d sized by its first input; becomes one."""


class LazyInstanceNorm2d(_LazyInstanceNorm, InstanceNorm2d):
    """A drop-in for torch.nn.LazyInstanceNorm2d: normkit.InstanceNorm2d sized by its first input; becomes one."""


class LazyInstanceNorm3d(_LazyInstanceNorm, InstanceNorm3d):
    """A drop-in for torch.nn.LazyInstanceNorm3d: normkit.InstanceNorm3d sized by its first input; becomes one."""
