"""Optimizers for the lab, with Keras' RMSprop so the classic Keras experiment is reproduced as published.

Keras 3 RMSprop (keras/src/optimizers/rmsprop.py) puts epsilon INSIDE the square root:

    v <- rho * v + (1 - rho) * g^2
    w <- w - lr * g / sqrt(v + eps)          lr 1e-3, rho 0.9, eps 1e-7

torch.optim.RMSprop puts it outside (``g / (sqrt(v) + eps)``) and defaults to alpha 0.99, eps 1e-8.
With eps 1e-7 the two differ while v is tiny (sqrt(1e-7) ~ 3e-4 caps the first steps), so the
lab implements Keras' rule rather than approximating it.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("rmsprop", "sgd", "adam")
# Keras' default learning rates: RMSprop 1e-3, SGD 1e-2, Adam 1e-3.
DEFAULT_LR = {"rmsprop": 1e-3, "sgd": 1e-2, "adam": 1e-3}


class KerasRMSprop(torch.optim.Optimizer):
    """RMSprop exactly as Keras 3 computes it (no momentum, not centered): epsilon inside the square root."""

    def __init__(self, params, lr: float = 1e-3, rho: float = 0.9, eps: float = 1e-7):
        if lr < 0 or not 0.0 <= rho < 1.0 or eps < 0:
            raise ValueError(f"KerasRMSprop needs lr >= 0, 0 <= rho < 1, eps >= 0; got lr={lr}, rho={rho}, eps={eps}")
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["velocity"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                velocity = state["velocity"]
                velocity.mul_(group["rho"]).addcmul_(param.grad, param.grad, value=1.0 - group["rho"])
                param.addcdiv_(param.grad, velocity.add(group["eps"]).sqrt_(), value=-group["lr"])
        return loss


def build_optimizer(name: str, parameters, lr: float | None = None, rho: float = 0.9, eps: float = 1e-7,
                    momentum: float = 0.0) -> torch.optim.Optimizer:
    """``lr=None`` takes Keras' default for that optimizer; ``eps`` is Keras' 1e-7 for RMSprop and Adam."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR[name] if lr is None else lr
    if name == "rmsprop":
        return KerasRMSprop(parameters, lr=lr, rho=rho, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum)
    return torch.optim.Adam(parameters, lr=lr, eps=eps)

