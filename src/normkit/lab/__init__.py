"""The lab: reproduce the classic batch-normalization experiments (LeNet/MLP on digits or MNIST) from Python or `normkit`."""

from .checkpoint import CheckpointError, load_checkpoint
from .config import TrainConfig
from .data import DATASETS, DataError, load_dataset
from .models import LeNet, MLP, build_model
from .train import evaluate_checkpoint, run

__all__ = ["TrainConfig", "run", "evaluate_checkpoint", "load_checkpoint", "load_dataset", "build_model", "LeNet",
           "MLP", "DATASETS", "DataError", "CheckpointError"]
