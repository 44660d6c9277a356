"""normkit: batch normalization done completely for PyTorch (public API only)."""

from . import functional, reference, registry
from .lazy import (LazyBatchNorm, LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d, LazyInstanceNorm1d,
                   LazyInstanceNorm2d, LazyInstanceNorm3d)
from .modules import (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d, InstanceNorm2d,
                      InstanceNorm3d, LayerNorm)
from .options import apply_constraints, constrain_after_step, regularization_loss
from .registry import create_norm
from .tools import (convert_batch_norm, fold_batch_norm, freeze_batch_norm, recalibrate_running_stats,
                    replace_all_batch_norm_modules_, synchronize_batch_norm, unfreeze_batch_norm)

__version__ = "0.1.0"

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d",
           "InstanceNorm2d", "InstanceNorm3d", "LazyBatchNorm", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
           "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d", "regularization_loss", "apply_constraints", "constrain_after_step",
           "recalibrate_running_stats", "convert_batch_norm", "synchronize_batch_norm", "fold_batch_norm",
           "freeze_batch_norm", "unfreeze_batch_norm", "replace_all_batch_norm_modules_", "create_norm", "functional", "reference", "registry", "keras"]


def __getattr__(name):
    # keras.py is imported on first use so `import normkit` stays light.
    if name == "keras":
        import importlib
        return importlib.import_module(".keras", __name__)
    raise AttributeError(f"module 'normkit' has no attribute {name!r}")
