"""Choose a normalization layer by name: one small table shared by the lab, the CLI and the tools.

``create_norm("batch", 16, rank=4)`` builds the layer for a (N, 16, H, W) input. Names:

    none      nn.Identity (no normalization)
    batch     normkit.BatchNorm (over axis 1, any rank)
    torch     torch.nn.BatchNorm1d/2d/3d (the baseline normkit is compared to)
    layer     normkit.LayerNorm over the features (dense) or GroupNorm(1, C) (conv: LayerNorm over C, H, W);
              affine=False and elementwise_affine=False both drop gamma and beta on either
    instance  normkit.InstanceNorm (conv; affine, as BN's parameters are) - dense inputs have no
              spatial axes, so it is refused there
    group     normkit.GroupNorm with the largest divisor of C up to 32 that leaves >= 2 channels per group
    renorm    normkit.BatchNorm(renorm=True) with the paper's clipping schedule at 1/50 of its step
              counts (RenormClipping.paper_schedule(0.02)): plain BN for the first 100 training
              steps, then rmax 1 -> 3 by step 800 and dmax 0 -> 5 by step 500 (rmin = 1/rmax);
              renorm_momentum 0.1 (BN's momentum): the renorm averages must keep up with weights
              that change every step of a short run (tools/renorm_rate.py: with Keras' 0.01 the lab's
              LeNet falls to 0.66-0.75 test accuracy where 0.1 gives 0.95-0.96)
    ghost     normkit.BatchNorm(virtual_batch_size=16)
    keras     normkit.BatchNorm with Keras' BatchNormalization defaults: momentum 0.99 (0.01 on the new
              batch here), epsilon 1e-3, moving variance updated with the biased batch variance (Keras 3)
"""

from __future__ import annotations

import numbers

from typing import Callable

from torch import nn

from . import modules
from .stats import RenormClipping

NORM_NAMES = ("none", "batch", "torch", "layer", "instance", "group", "renorm", "ghost", "keras")

# The renorm paper relaxes its clipping over 40,000 steps; the lab's runs are hundreds to thousands of steps.
RENORM_SCHEDULE_SCALE = 0.02
# ...and its renorm statistics must follow weights that move every step: BN's own momentum, not Keras' 0.01.
RENORM_MOMENTUM = 0.1

# Keras' BatchNormalization defaults in normkit's vocabulary (see normkit.keras for the full mapping).
KERAS_BN_DEFAULTS = {"momentum": 0.01, "eps": 1e-3, "unbiased_running_var": False}


def _torch_batch_norm(num_features: int, rank: int, **kwargs) -> nn.Module:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
    if cls is None:
        raise ValueError(f"torch.nn has no BatchNorm for inputs of rank {rank}; use 'batch' (normkit.BatchNorm)")
    return cls(num_features, **kwargs)


def _groups_for(num_channels: int, limit: int = 32) -> int:
    """The largest divisor of C up to 32 that leaves at least 2 channels per group (dense inputs need them)."""
    limit = max(1, min(limit, num_channels // 2))
    return max(g for g in range(1, limit + 1) if num_channels % g == 0)


def _instance_norm(num_features: int, rank: int, **kwargs) -> nn.Module:
    cls = {3: modules.InstanceNorm1d, 4: modules.InstanceNorm2d, 5: modules.InstanceNorm3d}.get(rank)
    if cls is None:
        raise ValueError(f"instance normalization needs spatial axes (input rank 3 to 5), got rank {rank}; "
                         "for dense layers use 'layer' or 'batch'")
    kwargs.setdefault("affine", True)
    return cls(num_features, **kwargs)


def _layer_norm(num_features: int, rank: int, **kwargs) -> nn.Module:
    # One name, two classes: either class's name for the affine switch serves both, so one option set (the lab's
    # --norm-option, for LeNet's conv and dense layers alike) can turn gamma and beta off.
    if "affine" in kwargs and "elementwise_affine" in kwargs:
        raise ValueError("normalization 'layer' takes affine or elementwise_affine (the same switch), not both")
    if "num_groups" in kwargs:
        raise ValueError("normalization 'layer' has one group of all channels on conv inputs; for num_groups "
                         "use 'group'")
    if rank == 2:
        if "affine" in kwargs:
            kwargs["elementwise_affine"] = kwargs.pop("affine")
        return modules.LayerNorm(num_features, **kwargs)
    if "elementwise_affine" in kwargs:
        kwargs["affine"] = kwargs.pop("elementwise_affine")
    return modules.GroupNorm(1, num_features, **kwargs)


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "none": lambda num_features, rank, **kwargs: nn.Identity(),
    "batch": lambda num_features, rank, **kwargs: modules.BatchNorm(num_features, **kwargs),
    "torch": _torch_batch_norm,
    "layer": _layer_norm,
    "instance": _instance_norm,
    "group": lambda num_features, rank, num_groups=None, **kwargs: modules.GroupNorm(
        _groups_for(num_features) if num_groups is None else num_groups, num_features, **kwargs),
    "renorm": lambda num_features, rank, **kwargs: modules.BatchNorm(num_features, **{
        "renorm": True, "renorm_clipping": RenormClipping.paper_schedule(RENORM_SCHEDULE_SCALE),
        "renorm_momentum": RENORM_MOMENTUM, **kwargs}),
    "ghost": lambda num_features, rank, **kwargs: modules.BatchNorm(num_features,
                                                                    **{"virtual_batch_size": 16, **kwargs}),
    "keras": lambda num_features, rank, **kwargs: modules.BatchNorm(num_features, **{**KERAS_BN_DEFAULTS, **kwargs}),
}


def norm_name(name: str) -> str:
    """The entry of NORM_NAMES that ``name`` spells, whatever its case, dashes and underscores ("Re-Norm" is
    "renorm"): what code that treats a name specially (the lab's models: ``instance`` has no dense form) compares."""
    if not isinstance(name, str):
        # (str(name) made None the name "none": create_norm(None, ...) built no normalization, silently)
        raise TypeError(f"a normalization's name must be a str, one of {', '.join(NORM_NAMES)}; got {name!r}")
    key = name.replace("_", "").replace("-", "").lower()
    if key not in _FACTORIES:
        raise ValueError(f"unknown normalization {name!r}; choose one of {', '.join(NORM_NAMES)}")
    return key


def create_norm(name: str, num_features: int, rank: int, **kwargs) -> nn.Module:
    """Build the normalization ``name`` for inputs of ``rank`` (2 dense, 3-5 with spatial axes).

    ``kwargs`` go to the layer's constructor and override the name's own settings (``ghost`` with
    ``virtual_batch_size=8``, ``renorm`` with ``renorm_momentum=0.01``, ``group`` with ``num_groups=2``).
    """
    key = norm_name(name)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 2:
        # (a string rank '2' built LayerNorm's conv twin, GroupNorm, silently: `rank == 2` was False)
        raise ValueError(f"rank must be the input's rank, an int >= 2 (2 for dense inputs, 3 to 5 with spatial axes), "
                         f"got {rank!r}")
    if key in ("group", "torch"):
        # (their own errors name no argument: 'group' picks its groups from it first, torch.nn fails in torch.empty)
        modules._check_num_features(num_features, tuples=False)
    if key == "none" and kwargs:
        raise ValueError(f"normalization 'none' takes no options, got {', '.join(kwargs)}")
    return _FACTORIES[key](num_features, rank, **kwargs)


NORM_TYPES = (modules.BatchNorm, modules.LayerNorm, modules.GroupNorm, modules._InstanceNorm,
              nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """True for normkit's and torch.nn's normalization layers."""
    return isinstance(module, NORM_TYPES)
