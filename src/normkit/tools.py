"""Model surgery around batch normalization: convert to/from torch.nn, synchronize, fold, freeze, recalibrate.

* ``convert_batch_norm(model, to)``: swap torch.nn's ``BatchNorm1d/2d/3d`` for normkit's and
  back, in place, keeping every tensor (the same Parameter objects) and setting.
* ``synchronize_batch_norm(model, process_group)``: every BN layer computes its training statistics over
  all processes of the group (torch.nn's layers, SyncBatchNorm included, become normkit's).
* ``fold_batch_norm(model)``: for inference, fold each eval-mode BN that directly follows a
  conv/linear layer into that layer's weight and bias.
* ``freeze_batch_norm(model)`` / ``unfreeze_batch_norm(model)``: normkit's frozen mode
  (running statistics, nothing updated or trained, even after ``model.train()``) on every layer.
* ``replace_all_batch_norm_modules_(model)``: torch.func's recipe for BN under ``vmap`` in training (no running
  statistics), for normkit's layers as for torch.nn's.
* ``recalibrate_running_stats(model, batches)`` ("precise BN"): replaces the running mean and
  variance of every batch-normalization layer by the plain average of the batch statistics the
  layer computes on ``batches`` with the model's current weights (Wu & Johnson 2021, "Rethinking
  'Batch' in BatchNorm", section 3: precise BN). No parameter changes. The running averages a BN
  layer keeps during training weight the last ~1/momentum steps, each computed with the weights
  of its own step; when the weights still move at the end of training (e.g. RMSprop, a short
  run) they lag the final weights, and eval-mode accuracy suffers. See docs/results.md.

docs/tools.md says what each does, its math and the decisions taken.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import sys
import warnings
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from .functional import LOW_PRECISION
from .lazy import LazyBatchNorm, LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, _InstanceNorm
from .options import check_process_group

__all__ = ["convert_batch_norm", "synchronize_batch_norm", "fold_batch_norm", "freeze_batch_norm",
           "unfreeze_batch_norm", "recalibrate_running_stats", "replace_all_batch_norm_modules_"]

_BN_TYPES = (BatchNorm, _BatchNorm)


def _input_of(item, index: int) -> torch.Tensor:
    what = f"batch {index}"
    if isinstance(item, (tuple, list)):
        if not item:
            raise TypeError(f"recalibrate_running_stats: batch {index} is an empty {type(item).__name__}; "
                            "expected an input tensor or an (input, target) pair")
        what = f"the first element of batch {index} (a {type(item).__name__}, taken as (input, target, ...))"
        item = item[0]
    if not isinstance(item, torch.Tensor):
        hint = (" (a dict's input key is the caller's to name: pass a generator such as "
                "(batch['image'] for batch in loader))" if isinstance(item, dict) else "")
        if isinstance(item, (tuple, list)):  # (a model of several inputs: one module that takes them as one)
            hint = (" (the model is called with that one tensor: for a model of several inputs, recalibrate a "
                    "module whose forward takes one tensor and calls the model with the rest)")
        raise TypeError(f"recalibrate_running_stats: {what} is a {type(item).__name__}; expected an input "
                        f"tensor or an (input, target) pair whose first element is the input tensor{hint}")
    return item


def _refuse_scripted(model: nn.Module, caller: str) -> None:
    """A TorchScript module (torch.jit.script or trace) holds compiled copies of its layers, which no tool can see
    as BN layers or change: unchecked, fold and convert returned it unchanged without a word, and the others said
    the model had no BN layer. Refused when it holds a BN (by the class name TorchScript keeps), so an eager model
    with, say, a scripted activation still works."""
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule) and any(
                "BatchNorm" in str(getattr(inner, "original_name", "")) for inner in module.modules()):
            raise TypeError(f"{caller}: {_label(name)} is a TorchScript module (made by torch.jit.script or "
                            f"torch.jit.trace), whose batch-normalization layers are compiled copies this function "
                            f"cannot change; call {caller} on the eager model first, then script or trace the result")


def _keras_module():
    """normkit.keras if it was imported (else no Keras-vocabulary layer can exist, and it need not be imported)."""
    return sys.modules.get(__package__ + ".keras")


def _refuse_unbuilt(model: nn.Module, caller: str, norms_only: bool) -> None:
    """Lazy modules before their first call and unbuilt Keras-style layers hold no tensors to work on."""
    keras = _keras_module()
    unbuilt = []
    for name, module in model.named_modules():
        lazy = (isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()
                and (isinstance(module, _BN_TYPES) or not norms_only))
        if lazy or (keras is not None and isinstance(module, keras.BatchNormalization) and module.bn is None):
            unbuilt.append(f"{_label(name)} ({type(module).__name__})")
    if unbuilt:
        raise ValueError(f"{caller}: not built yet: {', '.join(unbuilt)} (lazy and Keras-style layers get their "
                         "tensors on their first call); call model(example_batch) once first")


def _uncount_empty(layer, args, kwargs, output) -> None:
    """Forward hook: a call that gave the layer no value (an empty batch, or all padding) leaves its statistics
    as they were, yet counts in num_batches_tracked, as in training; the cumulative rule would then weigh every
    later batch by 1/(k + 1) instead of 1/k. A synchronized layer's batch is the group's: it is left uncounted
    only when every process of the group gave it no value (one all_reduce, which every process's hook joins)."""
    try:  # (by name: the Keras layer's mask comes third, after training, and its input is called inputs)
        bound = inspect.signature(layer.forward).bind(*args, **kwargs).arguments
        x = next(iter(bound.values()), None)
        mask = bound.get("mask")
        empty = isinstance(x, torch.Tensor) and (x.numel() == 0
                                                 or (isinstance(mask, torch.Tensor) and not bool(mask.any())))
    except TypeError:
        empty = False
    if getattr(layer, "synchronized", False):
        from . import distributed
        if distributed.is_active(layer.process_group):
            # The peers' batches may hold values; left out on this process's word alone, a batch empty on every
            # process still counted, and its reset statistics (0/1) were averaged in as one more batch.
            flag = torch.tensor([int(empty)], device=layer.num_batches_tracked.device)
            distributed.dist.all_reduce(flag, op=distributed.dist.ReduceOp.MIN, group=layer.process_group)
            empty = bool(flag)
    if empty:
        layer.num_batches_tracked.sub_(1)


def _widen(layer: nn.Module) -> list:
    """Give ``layer`` float32 copies of its half-precision parameters and buffers for the recalibration; returns
    what ``_narrow`` needs to put the originals back (the same objects, holding the results).

    The cumulative average rounds its buffers at every step: in bfloat16 an update (x_k - mean) / k smaller than
    half a unit of the last place is lost, so after a few dozen batches the average stopped moving and came out
    about 4% off (0.3% in float16), ten times the format's own precision. In float32 the average is rounded once,
    at the end. (ATen and normkit take half-precision inputs with float32 weights and buffers, as under autocast.)
    """
    widened = []
    # Parameters at any depth: a parametrized weight (torch.nn.utils.parametrize) is computed from its
    # parametrization's Parameters, and computed from half-precision ones it stayed half precision beside the
    # float32 buffers, which ATen refused ("expected scalar type BFloat16 but found Float").
    for tensor in layer.parameters():
        if tensor.dtype in LOW_PRECISION:
            widened.append(("_parameters", None, tensor, tensor.data))
            tensor.data = tensor.data.float()  # (the same Parameter: optimizers and hooks keep holding it)
    for name, tensor in layer._buffers.items():
        if tensor is not None and tensor.dtype in LOW_PRECISION:
            widened.append(("_buffers", name, tensor, tensor.data))
            layer._buffers[name] = tensor.float()
    return widened


def _narrow(layer: nn.Module, widened: list) -> None:
    """Undo ``_widen``: the original tensors back in place, buffers holding the float32 values rounded once."""
    for kind, name, tensor, data in widened:
        if kind == "_parameters":
            tensor.data = data
        else:
            tensor.copy_(layer._buffers[name])
            layer._buffers[name] = tensor


def _check_num_batches(num_batches) -> None:
    if num_batches is None:
        return
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"recalibrate_running_stats: num_batches must be None (every batch) or a positive int, "
                         f"got {num_batches!r}")


@torch.no_grad()
def recalibrate_running_stats(model: nn.Module, batches: Iterable, *, num_batches: Optional[int] = None) -> nn.Module:
    """Replace every BN layer's running statistics by the average of its batch statistics over ``batches``.

    Args:
        model: any module holding batch-normalization layers: ``normkit.BatchNorm`` and its
            subclasses (renorm, ghost, Keras-style biased variance included), built
            ``normkit.keras.BatchNormalization`` layers, and torch.nn's
            ``BatchNorm1d/2d/3d``/``SyncBatchNorm`` (``torch.nn.modules.batchnorm._BatchNorm``).
        batches: an iterable of input tensors, or of ``(input, target, ...)`` tuples/lists
            (the first element is the input), e.g. a ``DataLoader``. Inputs are passed to
            ``model`` as they are (move them to the model's device yourself).
        num_batches: use at most this many batches (``None``: all of them).

    Returns ``model`` (changed in place).

    What happens, for each recalibrated layer (a BN layer that tracks running statistics and,
    for normkit layers, is not frozen):

    * its running mean/variance are reset to 0/1 and its ``momentum`` set to ``None``
      (cumulative average); the batches then run through the model without gradient, with the
      recalibrated layers in training mode and **every other module in eval mode** (dropout
      off, other layers' running statistics untouched): the statistics of the network as it
      runs at inference, except that BN layers upstream normalize with batch statistics, as in
      training. So ``running_mean`` is the mean of the K per-batch means and ``running_var``
      the mean of the K per-batch unbiased variances (biased ones for a layer with
      ``unbiased_running_var=False``), each per-batch statistic computed by the layer's own
      training path:
    * a ghost layer (``virtual_batch_size``) computes statistics per virtual batch, so its
      running statistics become the average over all ghost batches of the ghost means and of
      the ghost (unbiased) variances (each batch weighs the same, as for every layer: with
      batches of different sizes, a ghost batch of a smaller batch weighs more); every batch
      must then hold a multiple of ``virtual_batch_size`` rows, as in training;
    * a renorm layer runs as plain BN during recalibration (no r/d correction, which would
      average standard deviations rather than variances); afterwards ``moving_stddev =
      sqrt(running_var + eps)``, so its two views of the variance agree. Its ``renorm_mean``
      and ``renorm_stddev`` (the averages that set r and d in training) are left as they were;
    * afterwards ``momentum``, every module's ``training`` flag, and ``num_batches_tracked``
      are restored: ``num_batches_tracked`` counts training steps (a renorm clipping schedule
      reads it), and recalibration is not training. A layer with ``momentum=None`` that trains
      further continues its cumulative average, weighting the recalibrated statistics as the
      average of all the steps tracked before.

    A half-precision layer (float16/bfloat16 buffers) averages in float32 copies and its buffers
    get the average rounded once (rounded at every batch, a bfloat16 average stopped moving).

    A batch that gives a layer no value (empty, or all padding under its mask) is not counted in
    its average. A layer that no batch reaches (a branch run in training mode only, such as an
    auxiliary head) keeps its statistics, with a RuntimeWarning naming it.

    Frozen normkit layers, layers with ``track_running_stats=False`` and non-BN modules are not
    changed. If anything fails (an empty iterable, a batch the model refuses), every layer's
    statistics and every setting are restored as they were before the call.

    Raises:
        ValueError: ``model`` holds no BN layer, none that can be recalibrated (all frozen or
            without running statistics), a lazy BN or Keras-style layer not built yet (call the
            model once first), ``batches`` yields nothing, or ``num_batches`` is not None or a
            positive int.
        TypeError: a batch is neither a tensor nor a tuple/list starting with one (a dict is
            refused: pass a generator of its input, ``(b["image"] for b in loader)``).
    """
    _check_num_batches(num_batches)
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate_running_stats: model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_scripted(model, "recalibrate_running_stats")
    # (None failed as "'NoneType' object is not iterable"; one tensor was iterated row by row, each row a "batch" of
    # one rank less, refused by the first layer's rank check)
    if isinstance(batches, torch.Tensor):
        raise TypeError("recalibrate_running_stats: batches is one tensor; pass an iterable of batches, such as "
                        "[batch] or a DataLoader")
    if not isinstance(batches, Iterable):
        raise TypeError(f"recalibrate_running_stats: batches must be an iterable of input batches (a list, a "
                        f"DataLoader, a generator), got {type(batches).__name__}")
    _refuse_unbuilt(model, "recalibrate_running_stats", norms_only=True)
    norms = [m for m in model.modules() if isinstance(m, _BN_TYPES)]
    if not norms:
        raise ValueError(f"recalibrate_running_stats: {type(model).__name__} has no batch-normalization layer "
                         "(normkit.BatchNorm or torch.nn.BatchNorm1d/2d/3d): nothing to recalibrate")
    layers = [m for m in norms if m.track_running_stats and m.running_mean is not None
              and not getattr(m, "frozen", False)]
    if not layers:
        raise ValueError(f"recalibrate_running_stats: none of the {len(norms)} batch-normalization layers of "
                         f"{type(model).__name__} can be recalibrated: each is frozen or has no running statistics "
                         "(track_running_stats=False)")

    # (tensors without values: the count of batches seen failed as "Tensor.item() cannot be called on meta tensors")
    meta = [f"{_label(name)} ({type(module).__name__})" for name, module in model.named_modules()
            if module in layers and module.running_mean.is_meta]
    if meta:
        raise ValueError(f"recalibrate_running_stats: {', '.join(meta)} are on the meta device (tensors "
                         "without values): nothing to average; materialize the model first "
                         "(model.to_empty(device=...) and load_state_dict)")

    modes = [(module, module.training) for module in model.modules()]
    # A Keras-vocabulary layer runs its inner BN in its own mode: it must be in training mode too.
    wrappers = [module for module in model.modules() if module not in layers and _batch_norm_of(module) in layers]
    saved = []
    for layer in layers:
        buffers = {name: getattr(layer, name).clone() for name in ("running_mean", "running_var", "num_batches_tracked",
                                                                    "moving_stddev")
                   if isinstance(getattr(layer, name, None), torch.Tensor)}
        saved.append((layer, layer.momentum, getattr(layer, "renorm", None), buffers))

    count = 0
    succeeded = False
    hooks = [layer.register_forward_hook(_uncount_empty, with_kwargs=True) for layer in layers]
    widened = []
    try:
        model.eval()
        widened = [(layer, _widen(layer)) for layer in layers]
        for layer in layers:
            if layer.num_batches_tracked is None:
                # (set to None by its user, as torch.nn's layers allow: the cumulative average needs a count, so one
                # for this call, None again after it; the reset below failed on None, and the restore with it)
                layer.num_batches_tracked = torch.zeros((), dtype=torch.long, device=layer.running_mean.device)
            layer.running_mean.zero_()
            layer.running_var.fill_(1.0)
            layer.num_batches_tracked.zero_()
            layer.momentum = None
            if getattr(layer, "renorm", False):
                layer.renorm = False
            layer.train()
        for wrapper in wrappers:
            wrapper.training = True
        # islice: an iterator shared with other code loses exactly the batches used, not one more.
        for item in itertools.islice(batches, num_batches):
            inputs = _input_of(item, count)
            try:
                model(inputs)
            except ValueError as error:
                # (torch's message alone named no batch, and its advice, eval(), is no advice here: the last batch of
                # a DataLoader without drop_last=True, one row, gives a BatchNorm1d one value per channel)
                hint = (" A batch of one row gives a BN layer on (N, C) features one value per channel: pass a "
                        "DataLoader with drop_last=True, or stop before that batch (num_batches=...)."
                        if inputs.dim() > 0 and inputs.shape[0] == 1 else "")
                raise ValueError(f"recalibrate_running_stats: batch {count} (input of shape {tuple(inputs.shape)}) "
                                 f"was refused, and every running statistic was left as it was.{hint} The model "
                                 f"said: {error}") from error
            count += 1
        if count == 0:
            raise ValueError("recalibrate_running_stats: batches yielded no batch; pass a non-empty iterable of "
                             "training inputs (a re-iterable such as a list or a DataLoader, not a spent generator)")
        succeeded = True
    finally:
        for hook in hooks:
            hook.remove()
        for layer, tensors in widened:
            _narrow(layer, tensors)
        # A layer no batch reached (a branch that runs in training only, such as Inception's auxiliary head, or
        # batches that were all empty for it) has averaged nothing: its reset 0/1 would replace its statistics.
        unreached = {id(layer) for layer, *_ in saved if succeeded and int(layer.num_batches_tracked) == 0}
        for layer, momentum, renorm, buffers in saved:
            layer.momentum = momentum
            if renorm is not None:
                layer.renorm = renorm  # (switched back on, its moving_stddev follows the new running_var)
            if "num_batches_tracked" in buffers:
                layer.num_batches_tracked.copy_(buffers["num_batches_tracked"])
            else:
                layer.num_batches_tracked = None  # (as it was: the count above was this call's)
            if not succeeded or id(layer) in unreached:
                for name, value in buffers.items():
                    getattr(layer, name).copy_(value)
        for module, training in modes:
            module.training = training
    if unreached:
        names = [f"{_label(name)} ({type(module).__name__})" for name, module in model.named_modules()
                 if id(module) in unreached]
        warnings.warn(f"recalibrate_running_stats: no batch reached {', '.join(names)} (not called on these inputs, "
                      "or only on empty or all-padding batches): their running statistics were left as they were",
                      RuntimeWarning, stacklevel=3)  # (3: the caller's line, past torch.no_grad's wrapper)
    return model


# ----------------------------------------------------------------------------- conversion

# Exact classes: a user's subclass may override forward, so it is never swapped silently.
# Lazy layers not yet sized convert to their lazy counterparts (they are sized by their first input as before).
_TO_NORMKIT = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
               nn.LazyBatchNorm1d: LazyBatchNorm1d, nn.LazyBatchNorm2d: LazyBatchNorm2d,
               nn.LazyBatchNorm3d: LazyBatchNorm3d}
_TO_TORCH = {normkit: torch_class for torch_class, normkit in _TO_NORMKIT.items()}
# plain_as's lazy form, for a normkit.LazyBatchNorm not sized yet (any rank, as a plain normkit.BatchNorm)
_LAZY_TORCH = {nn.BatchNorm1d: nn.LazyBatchNorm1d, nn.BatchNorm2d: nn.LazyBatchNorm2d,
               nn.BatchNorm3d: nn.LazyBatchNorm3d}
_TORCH_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _label(name: str) -> str:
    return f"'{name}'" if name else "the model itself"


def _options_torch_lacks(layer: BatchNorm) -> List[str]:
    """The settings of a normkit layer that a torch.nn BatchNorm*d cannot hold (empty: it converts exactly)."""
    found = []
    if _one_axis(layer.axis) != 1:
        found.append(f"axis={layer.axis!r} (torch.nn normalizes axis 1 only)")
    for option, default in (("renorm", False), ("virtual_batch_size", None), ("adjustment", None),
                            ("weight_regularizer", None), ("bias_regularizer", None),
                            ("weight_constraint", None), ("bias_constraint", None)):
        value = getattr(layer, option)
        if value != default:
            found.append(f"{option}={value!r}")
    if not layer.unbiased_running_var:
        found.append("unbiased_running_var=False (torch.nn stores the unbiased variance)")
    if layer.frozen:
        found.append("frozen=True (call unfreeze() or unfreeze_batch_norm(model) first)")
    if layer.affine and layer.weight is None:
        found.append("no weight (Keras' scale=False; torch.nn's affine layers always have a weight)")
    return found


def _factory(layer: nn.Module) -> dict:
    for tensor in (layer.weight, layer.running_mean):
        if tensor is not None:
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _construct(layer: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` layer with ``layer``'s settings (its constructor checks them) and tensors of its own for now."""
    # (_one_axis: num_features=(C,) goes with axis=(1,), and torch.nn's layer takes the int)
    size = () if issubclass(cls, LazyModuleMixin) else (_one_axis(layer.num_features),)
    return cls(*size, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
               track_running_stats=layer.track_running_stats, bias=layer.bias is not None or not layer.affine,
               **_factory(layer))


def _adopt(layer: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` takes ``layer``'s own tensors, hooks and mode (as convert_sync_batchnorm does); this changes
    ``layer`` too (a lazy layer loses its sizing hook), so it runs only once every new layer is constructed."""
    lazy = isinstance(new, LazyModuleMixin)
    if lazy:
        # The old layer's sizing hook would size it, not the new one: it goes, and the new layer's own hook runs
        # before the carried ones (a lazy layer sizes itself before any hook sees it).
        layer._initialize_hook.remove()
        layer._load_hook.remove()
        new._initialize_hook.remove()
    with torch.no_grad():
        for name in ("weight", "bias"):
            if name in layer._parameters:
                new.register_parameter(name, layer._parameters[name])
                continue
            # Computed by a forward pre-hook of torch's (torch.nn.utils.prune, weight_norm, spectral_norm): it is the
            # layer's plain attribute, and the tensors it is made from are named after it (weight_orig, weight_mask,
            # weight_g, weight_v, weight_u), as those hooks name them. They go with the hooks; carried as a None
            # Parameter instead, the layer normalized without them and the hook failed on every call.
            del new._parameters[name]
            if name in layer.__dict__:
                setattr(new, name, layer.__dict__[name])
            for key, parameter in layer._parameters.items():
                if key.startswith(name + "_"):
                    new.register_parameter(key, parameter)
            for key, buffer in layer._buffers.items():
                if key.startswith(name + "_"):
                    new.register_buffer(key, buffer, persistent=key not in layer._non_persistent_buffers_set)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            # (a buffer the user made non-persistent stays out of the state_dict: it came back in, a key more)
            new.register_buffer(name, layer._buffers.get(name),
                                persistent=name not in layer._non_persistent_buffers_set)
    # The same hook dicts (not copies): hooks run on the new layer and their handles still remove them.
    for name, value in vars(layer).items():
        if (name.startswith(("_forward_", "_backward_")) and "hook" in name) or name == "_is_full_backward_hook":
            setattr(new, name, value)
    if "qconfig" in vars(layer):
        # torch.ao.quantization's per-layer setting, which convert_sync_batchnorm carries too (qconfig=None keeps a
        # layer out of quantization; lost, the layer inherited its parent's and was quantized)
        new.qconfig = layer.qconfig
    if lazy:
        new._initialize_hook = new.register_forward_pre_hook(new._infer_parameters, with_kwargs=True, prepend=True)
        if hasattr(new, "_size_from_loaded_tensors"):
            # normkit's: tensors sized by a state_dict loaded before the conversion say num_features at once, as
            # when it is loaded into normkit's layer (torch.nn's keeps 0).
            new._size_from_loaded_tensors()
    return new.train(layer.training)


def convert_batch_norm(model: nn.Module, to: str = "normkit", *, plain_as: Optional[type] = None) -> nn.Module:
    """Swap every torch.nn BatchNorm1d/2d/3d for normkit's (``to="normkit"``), or back (``to="torch"``), in place.

    Args:
        model: any module; its children are replaced in place, at any depth, as
            ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does. A model that is itself a BN
            layer cannot replace itself: the new layer is returned instead.
        to: ``"normkit"``: each ``torch.nn.BatchNorm1d/2d/3d`` becomes ``normkit.BatchNorm1d/2d/3d``,
            each ``torch.nn.SyncBatchNorm`` a ``normkit.BatchNorm`` with ``synchronized=True`` and its
            ``process_group``.
            ``"torch"``: each ``normkit.BatchNorm1d/2d/3d`` becomes torch.nn's of the same rank,
            each plain ``normkit.BatchNorm`` (any rank) becomes ``plain_as`` (an unsized
            ``normkit.LazyBatchNorm`` its lazy class), and each layer with
            ``synchronized=True`` a ``torch.nn.SyncBatchNorm`` with its ``process_group``.
        plain_as: with ``to="torch"``, the torch.nn class (``BatchNorm1d``, ``2d`` or ``3d``) for
            plain ``normkit.BatchNorm`` layers: such a layer accepts every input rank and cannot
            know which one it gets, while torch.nn has one class per rank.

    Returns ``model`` (or the new layer when ``model`` is a BN layer).

    The new layer has the old one's ``num_features``, ``eps``, ``momentum``, ``affine``, ``bias``
    (``bias=False``: weight only), ``track_running_stats`` and ``training`` flag, and holds **the
    old layer's tensors**: the same ``weight``/``bias`` Parameter objects (so ``requires_grad``,
    an optimizer built before the conversion and its state keep working) and the same buffers
    (``running_mean``, ``running_var``, ``num_batches_tracked``), hence the same device, dtype
    and state_dict. A layer shared by several parents is converted once and stays shared. Its
    forward, forward-pre and backward hooks move with it (the same hook dicts: a handle taken
    before the conversion still removes its hook); state_dict hooks are not carried. A weight that
    such a hook computes (``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``) goes with the
    Parameters and buffers it is made from (``weight_orig``, ``weight_mask``, ``weight_g``...). Its
    ``qconfig`` (torch.ao.quantization) and its buffers' persistence carry over.

    Only these exact classes are converted, and torch.nn's ``LazyBatchNorm1d/2d/3d`` to and from
    normkit's (a layer not sized yet stays lazy, sized by its first input); subclasses (which may
    override ``forward``), instances given their own ``forward`` and every other module are left as they are. normkit's
    initializers act at construction and ``reset_parameters()`` only, so they are not carried.

    Raises:
        ValueError: ``to`` is neither ``"normkit"`` nor ``"torch"``; ``plain_as`` is not a torch.nn
            BatchNorm1d/2d/3d class, or is given with ``to="normkit"``, or is missing while the
            model holds a plain ``normkit.BatchNorm`` or ``LazyBatchNorm``; with ``to="torch"``, a synchronized
            lazy layer is not sized yet (torch.nn has no lazy SyncBatchNorm), or a normkit layer uses an
            option torch.nn lacks (``axis`` other than 1, ``renorm``, ``virtual_batch_size``,
            ``adjustment``, regularizers, constraints,
            ``unbiased_running_var=False``, frozen, an affine layer without weight), or the model holds a
            ``normkit.keras.BatchNormalization`` (biased moving variance; built or not). The message
            names the layer (its qualified name in ``model``) and the option. Nothing is converted
            when any layer is refused.
        TypeError: ``model`` is not a torch.nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_batch_norm: model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_scripted(model, "convert_batch_norm")
    if to not in ("normkit", "torch"):
        raise ValueError(f"convert_batch_norm: to must be 'normkit' (torch.nn -> normkit) or 'torch' "
                         f"(normkit -> torch.nn), got {to!r}")
    if plain_as is not None:
        if to != "torch":
            raise ValueError("convert_batch_norm: plain_as picks the torch.nn class for plain normkit.BatchNorm "
                             "layers, so it goes with to='torch' only; drop it")
        if plain_as not in _TORCH_CLASSES:
            raise ValueError(f"convert_batch_norm: plain_as must be torch.nn.BatchNorm1d, BatchNorm2d or BatchNorm3d "
                             f"(the class for the layer's input rank), got {plain_as!r}")
    targets = {}
    refusals = []
    optioned = False  # whether a refusal names options (the others are fixed by plain_as or by keeping the layer)
    # A Keras-vocabulary layer is refused as itself, built or not, whose options the user knows (its inner layer's
    # unbiased_running_var=False is no option a Keras user can remove); its inner BatchNorm is then passed over.
    keras = _keras_module()
    keras_layers = [] if keras is None else [module for module in model.modules()
                                             if isinstance(module, keras.BatchNormalization)]
    keras_ids = {id(module) for module in keras_layers}
    keras_inner = {id(module.bn) for module in keras_layers if module.bn is not None}
    for name, module in model.named_modules():
        kind = type(module)
        if "forward" in vars(module):
            continue  # (an instance given its own forward, as a subclass overriding it, may compute anything)
        if to == "normkit" and (kind in _TO_NORMKIT or kind is nn.SyncBatchNorm):
            targets[id(module)] = (name, module, _TO_NORMKIT.get(kind, BatchNorm))
        elif to == "torch" and id(module) in keras_ids:
            refusals.append(f"{_label(name)} is a Keras-vocabulary layer "
                            "(normkit.keras.BatchNormalization): its moving variance is the biased one, which "
                            "torch.nn's running_var is not")
        elif to == "torch" and id(module) in keras_inner:
            continue
        elif to == "torch" and (kind in _TO_TORCH or kind in (BatchNorm, LazyBatchNorm)):
            # (a LazyBatchNorm not sized yet is a plain BatchNorm to come: it was left alone without a word, and
            # refused once sized)
            lacking = _options_torch_lacks(module)
            if lacking:
                optioned = True
                refusals.append(f"{_label(name)} ({kind.__name__}) has {', '.join(lacking)}")
            elif module.synchronized and isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
                # (it became a SyncBatchNorm of 0 features holding uninitialized tensors, with no hook to size them)
                refusals.append(f"{_label(name)} ({kind.__name__}) is synchronized and not sized yet, and torch.nn has "
                                "no lazy SyncBatchNorm: call model(example_batch) once (or load a state_dict) first")
            elif module.synchronized:
                targets[id(module)] = (name, module, nn.SyncBatchNorm)
            elif kind in (BatchNorm, LazyBatchNorm) and plain_as is None:
                refusals.append(f"{_label(name)} is a plain normkit.{kind.__name__}, which takes inputs of any rank "
                                "while torch.nn has one class per rank: pass plain_as=torch.nn.BatchNorm1d "
                                "((N, C) or (N, C, L) inputs), BatchNorm2d (N, C, H, W) or BatchNorm3d (N, C, D, H, W)")
            else:
                targets[id(module)] = (name, module, plain_as if kind is BatchNorm else
                                       _LAZY_TORCH[plain_as] if kind is LazyBatchNorm else _TO_TORCH[kind])
    if refusals:
        raise ValueError("convert_batch_norm: cannot convert to torch.nn (nothing was converted): "
                         + "; ".join(refusals)
                         + (". Remove the option from the layer, or keep it a normkit layer" if optioned else ""))
    return _replace(model, _rebuilt(targets, "convert_batch_norm"))


def _rebuilt(targets: dict, caller: str) -> dict:
    """Each ``targets[key] = (name, layer, cls)`` as a ``cls`` layer holding ``layer``'s tensors (``_adopt``);
    SyncBatchNorm and synchronized layers stay synchronized.

    Every new layer is constructed before any old one is touched: a setting the new class refuses (torch.nn takes
    eps=0 or momentum=2, normkit does not) fails naming the layer, with the model as it was (adopting first
    removed an earlier lazy layer's sizing hook, which left it unable to size itself or load a state_dict)."""
    constructed = {}
    for key, (name, module, cls) in targets.items():
        try:
            constructed[key] = _construct(module, cls)
        except (ValueError, TypeError) as error:
            library = "normkit" if cls.__module__.startswith("normkit") else "torch.nn"
            raise type(error)(f"{caller}: {_label(name)} ({type(module).__name__}) cannot become a {library}."
                              f"{cls.__name__}: {error}; nothing was changed. Set a value {library} accepts on the "
                              "layer first") from None
    new = {}
    for key, (name, module, cls) in targets.items():
        new[key] = layer = _adopt(module, constructed[key])
        if isinstance(module, nn.SyncBatchNorm) or getattr(module, "synchronized", False):
            if isinstance(layer, BatchNorm):
                layer.synchronized = True
            layer.process_group = module.process_group
    return new


def _replace(model: nn.Module, new: dict) -> nn.Module:
    """Put ``new[id(old)]`` wherever ``old`` is a child in ``model`` (shared layers stay shared); returns the model."""
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None and id(child) in new:
                parent._modules[name] = new[id(child)]
    return new.get(id(model), model)


# ----------------------------------------------------------------------------- synchronizing


def synchronize_batch_norm(model: nn.Module, process_group=None) -> nn.Module:
    """Make every batch-normalization layer of ``model`` train on statistics of all processes: normkit's
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, in place.

    * ``normkit.BatchNorm`` layers (``1d/2d/3d`` and subclasses included) and
      ``normkit.keras.BatchNormalization`` layers get ``synchronized=True``; every option they
      have combines with it (renorm, ghost batches, masks, adjustment).
    * ``torch.nn.BatchNorm1d/2d/3d`` become normkit's ``BatchNorm1d/2d/3d``, synchronized, as
      ``convert_batch_norm`` makes them: the same Parameter and buffer objects, settings, mode and
      hooks, so optimizers built before and state_dicts keep working.
    * ``torch.nn.SyncBatchNorm`` (whose kernels exist on GPUs only) becomes a synchronized
      ``normkit.BatchNorm`` (features on axis 1, any rank) the same way, which also runs on the
      CPU over gloo.

    ``process_group``: the group whose processes share statistics; ``None`` keeps each layer's own
    group (a SyncBatchNorm's or normkit layer's ``process_group``), the default group where it had
    none. The statistics are merged in training only (docs/decisions.md, "``fused`` and
    ``synchronized``"); without an initialized group of several processes a layer computes local
    statistics and warns once. Returns ``model`` (or the new layer when ``model`` is itself a
    torch.nn BN layer).

    Raises:
        ValueError: ``model`` has no batch-normalization layer, or a subclass of a torch.nn BN class
            (it may override ``forward``: replace it by hand). The message names the layers; nothing
            is changed. (torch.nn's lazy BN layers become normkit's, synchronized, as convert_batch_norm
            makes them.)
        TypeError: ``model`` is not a torch.nn.Module.
    """
    layers, _ = _normkit_layers(model, "synchronize_batch_norm")  # (a Keras wrapper passes the options on)
    check_process_group(process_group, "synchronize_batch_norm: process_group")  # (before any layer changes)
    targets, refused = {}, []
    for name, module in model.named_modules():
        if (type(module) in _TO_NORMKIT or type(module) is nn.SyncBatchNorm) and "forward" not in vars(module):
            targets[id(module)] = (name, module, _TO_NORMKIT.get(type(module), BatchNorm))
        elif isinstance(module, _BatchNorm):
            own = ", with its own forward" if "forward" in vars(module) else ""
            refused.append(f"{_label(name)} ({type(module).__name__}{own})")
    if refused:
        raise ValueError("synchronize_batch_norm: " + ", ".join(refused) + " derive from torch.nn's batch norm but are "
                         "not torch.nn's own classes or forward (a subclass or a patched forward may compute something "
                         "else, which the conversion would drop): nothing was changed. Replace them with normkit "
                         "layers (synchronized=True)")
    if not layers and not targets:
        raise ValueError(f"synchronize_batch_norm: {type(model).__name__} has no batch-normalization layer: nothing "
                         "to synchronize")
    new = _rebuilt(targets, "synchronize_batch_norm")
    for layer in layers + list(new.values()):
        layer.synchronized = True
        if process_group is not None:
            layer.process_group = process_group
    return _replace(model, new)


# ----------------------------------------------------------------------------- folding

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLD_INTO = _CONV + _CONV_TRANSPOSE + (nn.Linear,)
# The input ranks BN classes of one rank take (their lazy forms included; the others take any rank >= 2).
_RANKS = (((nn.BatchNorm1d, nn.LazyBatchNorm1d, BatchNorm1d), (2, 3)),
          ((nn.BatchNorm2d, nn.LazyBatchNorm2d, BatchNorm2d), (4,)),
          ((nn.BatchNorm3d, nn.LazyBatchNorm3d, BatchNorm3d), (5,)))
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _runs_as_its_base(module: nn.Module, bases: tuple) -> bool:
    """Whether ``module`` computes what its base class does: a subclass overriding ``forward`` (timm's
    BatchNormAct2d adds an activation, a weight-standardized conv rescales its weight) may compute anything. So
    may one whose instance was given its own (``module.forward = ...``: a patch adding an activation to one layer,
    which the Identity replacing the BN dropped)."""
    kind = type(module)
    base = next((b for b in kind.__mro__ if b in bases), None)
    return base is not None and all(getattr(kind, name, None) is getattr(base, name, None) and name not in vars(module)
                                    for name in ("forward", "_conv_forward"))


def _hooked(module: nn.Module) -> bool:
    """A hook may change the module's input or output, or watch it: folding would change what it sees.

    A lazy module's own sizing hook does neither (sized by a loaded state_dict, it is still there until the first
    call, which only turns the module into its eager class): counted, a lazy model restored with load_state_dict
    folded nothing."""
    sizing = getattr(module, "_initialize_hook", None) if isinstance(module, LazyModuleMixin) else None
    return any(key != getattr(sizing, "id", None) for name in _HOOKS for key in (getattr(module, name, None) or {}))


_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _frozen_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a FrozenBatchNorm2d as torchvision (``torchvision.ops.FrozenBatchNorm2d``, its detection
    backbones') and detectron2 define it: BN's eval map held in four buffers (no parameters), always inference,
    ``x * (weight * rsqrt(running_var + eps)) + (bias - running_mean * scale)`` per channel of a 4-D input.

    Neither library can be imported to check the class, so it is recognized by what it is: the class name exactly
    (a subclass may compute something else), the four 1-D buffers of one size, an ``eps`` number, no parameters,
    no children and no ``forward`` of the instance's own. A module that only looks like one (DETR's copy, whose eps
    is a constant inside its forward and no attribute) is left alone: what it computes is not known."""
    if type(module).__name__ != "FrozenBatchNorm2d" or module._parameters or module._modules:
        return False
    eps = getattr(module, "eps", None)
    buffers = [module._buffers.get(name) for name in _FROZEN_BUFFERS]
    return (isinstance(eps, (int, float)) and not isinstance(eps, bool) and "forward" not in vars(module)
            and all(isinstance(b, torch.Tensor) and b.dim() == 1 and b.is_floating_point() for b in buffers)
            and len({b.shape for b in buffers}) == 1)


def _batch_norm_of(module: nn.Module):
    """The BN layer that computes ``module``'s eval output: itself, a built Keras layer's ``bn``, or None."""
    if isinstance(module, (BatchNorm, _BatchNorm)) or _frozen_batch_norm(module):
        return module
    keras = _keras_module()
    if keras is not None and isinstance(module, keras.BatchNormalization):
        return module.bn
    return None


def _one_axis(axis):
    """An axis spec naming one axis as that int: ``axis=(1,)`` or ``[1]`` is ``axis=1`` (the same layer), which fold
    and convert refused or left alone (a tuple is never == 1); a spec of several axes comes back unchanged."""
    if isinstance(axis, (tuple, list)) and len(axis) == 1 and isinstance(axis[0], int):
        return axis[0]
    return axis


def _feature_axis(module: nn.Module, bn) -> int:
    """``bn``'s feature axis, -1 for a Keras layer built with its features last (it stores them counted from 0)."""
    axis = _one_axis(getattr(bn, "axis", 1))
    build_shape = getattr(module, "_build_shape", None) if module is not bn else None
    return -1 if build_shape is not None and axis == len(build_shape) - 1 else axis


def _output_dtype(module: nn.Module, bn, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``module`` (a BN, or a Keras layer around ``bn``) returns in eval for a ``dtype`` input. A BN keeps
    its input's dtype (or refuses it); a Keras layer casts as Keras does (its ``forward``): to its policy's compute
    dtype, and full-precision inputs to its variables' dtype."""
    if module is bn:
        return dtype
    stored, compute = bn.running_mean.dtype, getattr(module, "_compute_dtype", None)
    if stored in LOW_PRECISION or (compute is not None and compute != stored):
        return compute or stored
    return dtype if dtype in LOW_PRECISION else stored


def _can_fold(layer: nn.Module, module: nn.Module, uses: dict) -> bool:
    """Whether ``module`` (a BN) in eval mode is an affine map per output channel of ``layer`` (conv or linear)."""
    bn = _batch_norm_of(module)
    if bn is None or not isinstance(layer, _FOLD_INTO) or bn.running_mean is None:
        return False
    keras = _keras_module()
    norm_bases = (_BatchNorm, nn.SyncBatchNorm, BatchNorm) + ((keras.BatchNormalization,) if keras else ())
    frozen = _frozen_batch_norm(module)  # (its own class: checked by _frozen_batch_norm instead of by its base)
    if (not _runs_as_its_base(layer, _FOLD_INTO)
            or not (frozen or all(_runs_as_its_base(m, norm_bases) for m in (module, bn)))
            or any(_hooked(m) for m in (layer, module, bn))):
        return False
    weight = layer._parameters.get("weight")
    if (parametrize.is_parametrized(layer) or not isinstance(weight, nn.Parameter)
            or isinstance(weight, nn.parameter.UninitializedParameter)):
        # A parametrized or hook-computed weight (weight_norm, spectral_norm) is recomputed each call.
        return False
    if any(uses.get(id(shared), 0) > 1 for shared in (layer, module, bn, weight, layer.bias) if shared is not None):
        return False  # shared elsewhere (the module, or its weight tied to another layer's): folding would change it
    axis = _feature_axis(module, bn)
    # Conv output channels are axis 1; Linear's are the last axis (= 1 for (N, C) activations).
    if not (axis == 1 or (axis == -1 and isinstance(layer, nn.Linear))):
        return False
    build_shape = getattr(module, "_build_shape", None) if module is not bn else None
    if isinstance(layer, nn.Linear) and axis == 1 and build_shape is not None and len(build_shape) > 2:
        return False  # a Keras layer built on (N, L, F) Linear outputs normalizes L, not the Linear's F outputs
    # (a FrozenBatchNorm2d reshapes its buffers to (1, C, 1, 1): 4-D inputs only, where they are the channels)
    ranks = (4,) if frozen else next((ranks for classes, ranks in _RANKS if isinstance(bn, classes)), None)
    # The rank the layer's batched outputs have, where they are the BN's channels (a Linear's: (N, C) only).
    batched = 2 if isinstance(layer, nn.Linear) else layer.weight.dim()
    if ranks is not None and axis == 1 and batched not in ranks:
        # A BatchNorm2d after a Linear or a Conv3d (or a BatchNorm1d after a Conv2d on an unbatched input) sees
        # another rank, where its channels are not the layer's outputs even when the counts agree (folded, the
        # layer's outputs were scaled by the channels' factors).
        return False
    if _output_dtype(module, bn, weight.dtype) != weight.dtype:
        return False  # a Keras layer whose policy casts (float64, float16, mixed_float16 after a float32 Linear)
    if frozen and any(torch.promote_types(weight.dtype, bn._buffers[name].dtype) != weight.dtype
                      for name in _FROZEN_BUFFERS):
        return False  # its arithmetic promotes (float32 buffers after a float16 conv): the output was float32
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    # (the statistics' size: torch.nn's lazy layer sized by a loaded state_dict keeps num_features 0 until its first
    # call)
    # (torchvision's FrozenBatchNorm2d has no num_features: its buffers' size is its count)
    num_features = _one_axis(getattr(bn, "num_features", bn.running_mean.numel()))
    return isinstance(num_features, int) and tuple(bn.running_mean.shape) == (channels,)


@torch.no_grad()
def _fold(layer: nn.Module, bn) -> None:
    """w' = w * gamma / sqrt(var + eps) per output channel, b' = (b - mean) * gamma / sqrt(var + eps) + beta."""
    weight = layer.weight
    dtype = torch.float64 if weight.device.type != "mps" else torch.float32
    mean = bn.running_mean.to(weight.device, dtype)
    scale = torch.rsqrt(bn.running_var.to(weight.device, dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(weight.device, dtype)
    bias = layer.bias.to(dtype) if layer.bias is not None else torch.zeros_like(mean)
    bias = (bias - mean) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(weight.device, dtype)
    if isinstance(layer, _CONV_TRANSPOSE):  # weight (in, out / groups, *k): output channel g * out / groups + j
        grouped = weight.view(layer.groups, -1, *weight.shape[1:])
        grouped.copy_(grouped.to(dtype) * scale.view(layer.groups, 1, -1, *([1] * (weight.dim() - 2))))
    else:  # weight (out, ...)
        weight.copy_(weight.to(dtype) * scale.view(-1, *([1] * (weight.dim() - 1))))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_(bias)


def _fold_traced(graph_module: "torch.fx.GraphModule", prefix: str, uses: dict) -> List[str]:
    """Fold the BN calls of a torch.fx GraphModule whose one input is a conv/linear call used by nothing else.

    Tracing flattens the model's Sequentials into plain modules (so the Sequential rule found nothing there, and a
    traced model folded nothing), but its graph shows the data flow itself: which call's output each call takes, and
    who else takes it. A module the graph refers to anywhere else stays: called twice, its tensors read (a get_attr
    node), or inside a module the graph calls as a whole."""
    graph = graph_module.graph
    counts, inner = {}, set()  # (targets the graph refers to, how often; the paths of modules holding them)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            counts[node.target] = counts.get(node.target, 0) + 1
            parts = node.target.split(".")
            inner.update(".".join(parts[:i]) for i in range(1, len(parts)))

    def alone(target: str) -> bool:  # referred to by its one call only
        parts = target.split(".")
        return (counts[target] == 1 and target not in inner
                and not any(".".join(parts[:i]) in counts for i in range(1, len(parts))))

    folded = []
    for node in list(graph.nodes):
        source = node.args[0] if node.op == "call_module" and len(node.args) == 1 and not node.kwargs else None
        if (not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1
                or not alone(node.target) or not alone(source.target)):
            continue
        layer, module = graph_module.get_submodule(source.target), graph_module.get_submodule(node.target)
        if _can_fold(layer, module, uses):
            _fold(layer, _batch_norm_of(module))
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            parent, _, name = node.target.rpartition(".")
            graph_module.get_submodule(parent)._modules[name] = nn.Identity().train(False)  # (as in a Sequential)
            folded.append(f"{prefix}.{node.target}" if prefix else node.target)
    if folded:
        graph_module.recompile()
    return folded


def fold_batch_norm(model: nn.Module, *, inplace: bool = False) -> Tuple[nn.Module, List[str]]:
    r"""Fold every eval-mode BN that directly follows a conv or linear layer into it, for inference.

    In eval mode a BN layer is an affine map per channel, so after a ``Conv1d/2d/3d``,
    ``ConvTranspose1d/2d/3d`` or ``Linear`` whose output channels it normalizes it merges into
    that layer's weight and bias (per output channel ``c``, with the BN's running statistics):

    .. math::
        s_c = \frac{\gamma_c}{\sqrt{\mathrm{running\_var}_c + \epsilon}}, \quad
        w'_c = w_c s_c, \quad b'_c = (b_c - \mathrm{running\_mean}_c) s_c + \beta_c

    (``gamma = 1``, ``beta = 0`` without affine parameters; ``b = 0`` for a layer without bias,
    which then gets one). The arithmetic is float64, then cast to the layer's dtype. The BN is
    replaced by ``nn.Identity``.

    Args:
        model: a model in eval mode (``model.eval()``). Pairs are looked for inside every
            ``nn.Sequential`` of the model (at any depth, the model itself included) that runs
            Sequential's own ``forward``: a BN is folded when the child just before it in the
            same Sequential is a conv/linear layer. (Code elsewhere that calls such a Sequential's
            children one by one is not visible in the module tree: don't fold such a model.)
            In a ``torch.fx.GraphModule`` (tracing flattens Sequentials) the graph shows the data flow: a BN
            call folds when its one argument is a conv/linear call whose output nothing else takes, each called
            once.
        inplace: change ``model`` itself instead of a deep copy.

    Returns ``(folded_model, names)``: the model with the BNs folded (a deep copy unless
    ``inplace``; the input model is then untouched) and the qualified names of the BN layers
    folded, in the model's order (``named_modules()``'s; ``len(names)`` is the count; an empty list means
    nothing was foldable).

    Folded: ``torch.nn`` BN layers (``_BatchNorm``: BatchNorm1d/2d/3d, SyncBatchNorm) and
    ``normkit.BatchNorm`` layers with running statistics, whatever their training options
    (renorm, ghost batches, adjustment, biased running variance, frozen: inference is plain BN
    with ``running_mean``/``running_var``), and built ``normkit.keras.BatchNormalization``
    layers; ``num_features`` must equal the layer's output channels, on axis 1, or on the last
    axis (normkit ``axis=-1``) after a ``Linear``. A ``Linear`` followed by an axis-1 BN is taken
    to produce ``(N, C)`` activations, the only shape where its outputs are BN's channels.

    Left as they are: a BN with no running statistics (``track_running_stats=False``: it
    normalizes with batch statistics in eval too), one not directly after a conv/linear layer,
    a layer whose weight is parametrized or computed by a hook (weight_norm, spectral_norm), a
    layer or BN used at more than one place in the model or whose weight or bias is tied to
    another layer's, a Keras layer whose dtype policy casts the layer's outputs to another dtype
    (folded, the next layer would get the layer's dtype), a layer or BN whose class overrides its
    torch.nn/normkit base's ``forward`` or whose instance has its own
    (timm's BatchNormAct2d, weight-standardized convs: they compute something else), a layer or
    BN with forward or backward hooks (a hook may change or watch the activation that folding
    removes), and BNs outside ``nn.Sequential`` containers and fx graphs or inside a Sequential subclass with
    its own ``forward`` (their order of calls is the code's, not the module tree's).

    Raises:
        ValueError: ``model`` or one of its submodules is in training mode: a training-mode BN
            normalizes with batch statistics, which no fixed weight can reproduce; call
            ``model.eval()`` first. Or the model holds an unbuilt lazy module or Keras-style layer
            (no running statistics yet, and no deep copy): call it once on an example batch.
        TypeError: ``model`` is not a torch.nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batch_norm: model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_scripted(model, "fold_batch_norm")
    training = [name for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(f"fold_batch_norm: {_label(training[0])} ({type(model.get_submodule(training[0])).__name__}) "
                         "is in training mode; folding uses running statistics, which a BN in training mode does "
                         "not: call model.eval() before fold_batch_norm(model)")
    _refuse_unbuilt(model, "fold_batch_norm", norms_only=False)
    if not inplace:
        model = copy.deepcopy(model)
    uses = {}  # how many places hold each module and each parameter (tied weights count twice)
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    folded = []
    # The names come in the model's order (named_modules'): found container by container, a nested Sequential's BN
    # (a ResNet block's downsample) came after every BN of the outer Sequential, wherever it sat.
    position = {name: index for index, (name, _) in enumerate(model.named_modules())}
    for prefix, container in model.named_modules():
        if isinstance(container, torch.fx.GraphModule):
            folded += _fold_traced(container, prefix, uses)
        # Only Sequential's own forward proves that each child's output is the next child's input, and only there.
        if not isinstance(container, nn.Sequential) or type(container).forward is not nn.Sequential.forward:
            continue
        names = list(container._modules)
        for before, name in zip(names, names[1:]):
            layer, module = container._modules[before], container._modules[name]
            if _can_fold(layer, module, uses):
                _fold(layer, _batch_norm_of(module))
                container._modules[name] = nn.Identity().train(False)
                folded.append(f"{prefix}.{name}" if prefix else name)
    return model, sorted(folded, key=position.__getitem__)


# ----------------------------------------------------------------------------- freezing


def _normkit_layers(model: nn.Module, caller: str):
    """(normkit layers and Keras wrappers, a wrapped BatchNorm only via its wrapper; names of torch.nn BN layers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_scripted(model, caller)
    keras = _keras_module()
    wrapped = set()
    layers, foreign = [], []
    for name, module in model.named_modules():
        if keras is not None and isinstance(module, keras.BatchNormalization):
            layers.append(module)
            if module.bn is not None:
                wrapped.add(id(module.bn))
        elif isinstance(module, BatchNorm) and id(module) not in wrapped:
            layers.append(module)
        elif isinstance(module, _BatchNorm):
            foreign.append(name or type(module).__name__)
    return layers, foreign


def _nothing_to(caller: str, model: nn.Module) -> ValueError:
    return ValueError(f"{caller}: {type(model).__name__} has no normkit batch-normalization layer: nothing to "
                      f"{caller.split('_')[0]}")


def _set_frozen(layers, frozen: bool) -> None:
    for layer in layers:
        if isinstance(layer, BatchNorm):
            layer.freeze() if frozen else layer.unfreeze()
        else:  # the Keras wrapper
            layer.trainable = not frozen  # (its BatchNorm's freeze(), once built)


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Freeze every normkit BN layer of ``model``: running statistics, nothing updated or trained, even in train().

    Each ``normkit.BatchNorm`` (subclasses included) gets ``freeze()``: it normalizes with its
    running statistics in training mode too, updates neither them nor ``num_batches_tracked``,
    and its ``weight``/``bias`` get ``requires_grad=False`` and ``grad=None`` (no gradient, so
    optimizers skip them: a gradient kept from before would still feed weight decay or momentum).
    Unlike ``bn.eval()``, this survives ``model.train()``, so fine-tuning a model with frozen
    BN is just ``model.train()``. A ``normkit.keras.BatchNormalization`` gets ``trainable =
    False`` (Keras' meaning; built or not). Returns ``model`` (changed in place).

    torch.nn BN layers have no frozen mode: ``bn.eval()`` plus ``requires_grad_(False)`` is
    undone by the next ``model.train()``, silently. They are refused rather than half-frozen:
    ``convert_batch_norm(model, "normkit")`` first makes them normkit layers, which freeze.

    Raises:
        ValueError: ``model`` holds a torch.nn BN layer or a lazy one not sized yet (their names are
            in the message; nothing is frozen), or no normkit BN layer at all.
        TypeError: ``model`` is not a torch.nn.Module.
    """
    layers, foreign = _normkit_layers(model, "freeze_batch_norm")
    # Subclasses (a parametrized BN is one: torch makes it a ParametrizedBatchNorm2d) are not converted by
    # convert_batch_norm, so "convert them first" sent their user round in a circle.
    kept = [f"{_label(name)} ({type(module).__name__})" for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and (type(module) not in (*_TO_NORMKIT, nn.SyncBatchNorm)
                                                   or "forward" in vars(module))]
    if kept:
        raise ValueError(f"freeze_batch_norm: {', '.join(kept)} derive from torch.nn's BN classes, which have no "
                         "frozen mode (eval() is undone by model.train()), and convert_batch_norm leaves subclasses "
                         "(and instances with their own forward) alone; nothing was frozen. Replace them with normkit "
                         "layers by hand (a parametrized one: torch.nn.utils.parametrize.remove_parametrizations, "
                         "convert_batch_norm(model, 'normkit'), then register the parametrization again)")
    if foreign:
        raise ValueError(f"freeze_batch_norm: {', '.join(repr(n) for n in foreign)} are torch.nn BN layers, which "
                         "have no frozen mode (eval() is undone by model.train()); nothing was frozen. Convert them "
                         "first: model = normkit.convert_batch_norm(model, 'normkit')")
    if not layers:
        raise _nothing_to("freeze_batch_norm", model)
    # (checked first: freezing layer by layer would leave the ones before an unsized lazy layer frozen)
    unsized = [f"{_label(name)} ({type(module).__name__})" for name, module in model.named_modules()
               if isinstance(module, LazyModuleMixin) and isinstance(module, BatchNorm)
               and module.has_uninitialized_params()]
    if unsized:
        raise ValueError(f"freeze_batch_norm: not sized yet: {', '.join(unsized)} (a lazy layer's tensors are sized by "
                         "its first input or by a loaded state_dict); nothing was frozen. Call model(example_batch) "
                         "once, or load a state_dict, first")
    _set_frozen(layers, True)
    return model


def unfreeze_batch_norm(model: nn.Module) -> nn.Module:
    """Undo ``freeze_batch_norm``: every normkit BN layer trains again (``unfreeze()``; Keras: ``trainable = True``).

    ``weight``/``bias`` get ``requires_grad=True`` again (all of them, whatever they had before
    freezing). torch.nn BN layers, which cannot be frozen, are left as they are. Returns
    ``model`` (changed in place).

    Raises:
        ValueError: ``model`` holds no normkit BN layer.
        TypeError: ``model`` is not a torch.nn.Module.
    """
    layers, _ = _normkit_layers(model, "unfreeze_batch_norm")
    if not layers:
        raise _nothing_to("unfreeze_batch_norm", model)
    _set_frozen(layers, False)
    return model


# ----------------------------------------------------------------------------- torch.func


def replace_all_batch_norm_modules_(root: nn.Module) -> nn.Module:
    """``torch.func.replace_all_batch_norm_modules_`` for normkit's layers too: no running statistics, in place.

    torch.func.vmap cannot update one set of running statistics from a batch of samples (per-sample gradients,
    ``vmap(grad(loss))``, in training); torch's recipe switches them off on torch.nn's BN layers (it tests
    ``isinstance`` against torch.nn's class, so normkit's layers kept theirs and vmap refused them). This does
    the same for every ``normkit.BatchNorm`` (BatchNorm1d/2d/3d, options, the Keras layer's), every normkit
    InstanceNorm that tracks running statistics (torch's recipe leaves torch.nn's InstanceNorm alone), and,
    through torch's own function, torch.nn's BN layers: ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` become None and ``track_running_stats`` False, so every call, eval ones included,
    normalizes by the batch's statistics (torch's semantics). Renorm, a correction toward statistics kept across
    steps (and updated in place, which vmap refuses as it refuses the running ones), is switched off
    (``renorm=False``; its buffers stay, as when renorm is switched off by hand). Returns ``root``.

    Raises:
        ValueError: an unbuilt Keras layer or an unsized lazy layer (it would create its statistics later).
        TypeError: ``root`` is not a torch.nn.Module.
    """
    if not isinstance(root, nn.Module):
        raise TypeError(f"replace_all_batch_norm_modules_: expects a torch.nn.Module, got {type(root).__name__}")
    _refuse_scripted(root, "replace_all_batch_norm_modules_")
    _refuse_unbuilt(root, "replace_all_batch_norm_modules_", norms_only=True)
    torch.func.replace_all_batch_norm_modules_(root)
    keras = _keras_module()
    for module in root.modules():  # (a Keras layer comes before its BatchNorm)
        if keras is not None and isinstance(module, keras.BatchNormalization) and module.renorm:
            module.renorm = False  # (its config says so too; its BatchNorm follows)
        elif isinstance(module, BatchNorm) and module.renorm:
            module.renorm_clipping = None  # (first: BatchNorm takes clipping only with renorm)
            module.renorm = False
        if isinstance(module, (BatchNorm, _InstanceNorm)):
            module.running_mean = module.running_var = module.num_batches_tracked = None
            module.track_running_stats = False
    return root
