"""The lab's Keras RMSprop against the update Keras 3 documents, in NumPy float64."""

import numpy as np
import torch

from normkit.lab.optim import build_optimizer


def test_keras_rmsprop_puts_epsilon_inside_the_square_root():
    """keras/src/optimizers/rmsprop.py (no momentum, not centered), with its defaults lr 1e-3, rho 0.9, eps 1e-7:
    v <- rho v + (1 - rho) g^2,  w <- w - lr g / sqrt(v + eps). Gradients of 1e-4 keep v (about 1e-9) below eps,
    where torch.optim.RMSprop's g / (sqrt(v) + eps) would take steps a hundred times larger."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=5)
    parameter = torch.nn.Parameter(torch.tensor(w))
    optimizer = build_optimizer("rmsprop", [parameter])
    velocity = np.zeros(5)
    for _ in range(4):
        g = rng.normal(size=5) * 1e-4
        parameter.grad = torch.tensor(g)
        optimizer.step()
        velocity = 0.9 * velocity + 0.1 * g * g
        w = w - 1e-3 * g / np.sqrt(velocity + 1e-7)
        np.testing.assert_allclose(parameter.detach().numpy(), w, rtol=1e-12, atol=0)
