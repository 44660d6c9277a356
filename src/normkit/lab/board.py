"""TensorBoard for a run: scalars per step and per epoch, histograms of the norm layers and the activations' inputs."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from normkit.registry import is_norm_layer

from .models import ACTIVATIONS


class Board:
    """TensorBoard scalars per step and per epoch, histograms of norm layers and pre-activations per epoch."""

    def __init__(self, out: Path, enabled: bool, purge_step: int | None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is a lab extra
            self.writer = SummaryWriter(log_dir=str(out), purge_step=purge_step)

    def step(self, step: int, loss: float, accuracy: float) -> None:
        if self.writer:
            self.writer.add_scalar("step/loss", loss, step)
            self.writer.add_scalar("step/accuracy", accuracy, step)

    def epoch(self, step: int, record: dict, model: nn.Module, probe: torch.Tensor) -> None:
        # Logged at the global step that ends the epoch, not at the epoch number: one monotonic x-axis per
        # file is what lets TensorBoard purge a killed run's extra steps and not take epochs for restarts.
        if not self.writer:
            return
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if record[key] is not None and math.isfinite(record[key]):
                self.writer.add_scalar(f"epoch/{key}", record[key], step)
        for name, module in model.named_modules():
            if is_norm_layer(module):
                for tensor_name in ("weight", "bias", "running_mean", "running_var"):
                    tensor = getattr(module, tensor_name, None)
                    if isinstance(tensor, torch.Tensor):
                        self._histogram(f"norm/{name}.{tensor_name}", tensor.detach().float().cpu(), step)
        for name, values in preactivations(model, probe).items():
            self._histogram(f"preactivation/{name}", values, step)
        self.writer.flush()

    # TensorBoard's buckets end just below 1e20 and a histogram whose values all lie beyond them is an error.
    HISTOGRAM_LIMIT = 1e19

    def _histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        # TensorBoard cannot bin NaN or infinity ("The histogram is empty"): a diverged run's weights are drawn
        # from their finite values, and a tensor with none is left out of that epoch. Finite values past
        # TensorBoard's largest bucket (a run diverging through 1e20 and up) are drawn in the outermost ones.
        values = values[torch.isfinite(values)].float().clamp(-self.HISTOGRAM_LIMIT, self.HISTOGRAM_LIMIT)
        if values.numel():
            self.writer.add_histogram(tag, values, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


@torch.no_grad()
def preactivations(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of every activation (the normalized values BN feeds the nonlinearity), in eval mode."""
    captured, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, tuple(ACTIVATIONS.values())):
            hooks.append(module.register_forward_hook(
                lambda _module, inputs, _output, name=name: captured.__setitem__(name, inputs[0].detach().cpu())))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return captured
