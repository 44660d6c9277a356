"""The lab's two networks, LeNet and the BN paper's MLP, each taking its normalization by name.

References: LeCun et al. 1998 (LeNet-5, here with sigmoid and max pooling as in the classic BN
notebook); Ioffe & Szegedy 2015, section 4.1 (three hidden layers of 100 sigmoid units on MNIST).
The normalization sits between each affine layer and its activation, as in the paper.
"""

from __future__ import annotations

from torch import nn

from normkit.registry import create_norm, norm_name

MODELS = ("lenet", "mlp")
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
INITS = ("keras", "torch")


def _block(layer: nn.Module, features: int, rank: int, norm: str, activation: str,
           norm_options: dict | None) -> list[nn.Module]:
    # Instance normalization needs spatial axes: LeNet uses it in its conv blocks, its dense blocks go unnormalized.
    # (compared by norm_name: create_norm takes "Instance" too, which failed on LeNet's dense blocks)
    normalization = (nn.Identity() if norm_name(norm) == "instance" and rank == 2
                     else create_norm(norm, features, rank, **(norm_options or {})))
    return [layer, normalization, ACTIVATIONS[activation]()]


class LeNet(nn.Sequential):
    """conv(6, 5x5) -> norm -> act -> maxpool 2 -> conv(16, 5x5) -> norm -> act -> maxpool 2 -> flatten
    -> dense(120) -> norm -> act -> dense(84) -> norm -> act -> dense(10), for (N, 1, 28, 28) inputs."""

    def __init__(self, norm: str = "batch", activation: str = "sigmoid", num_classes: int = 10,
                 norm_options: dict | None = None):
        super().__init__(
            *_block(nn.Conv2d(1, 6, kernel_size=5), 6, 4, norm, activation, norm_options), nn.MaxPool2d(2),
            *_block(nn.Conv2d(6, 16, kernel_size=5), 16, 4, norm, activation, norm_options), nn.MaxPool2d(2),
            nn.Flatten(),
            *_block(nn.Linear(16 * 4 * 4, 120), 120, 2, norm, activation, norm_options),
            *_block(nn.Linear(120, 84), 84, 2, norm, activation, norm_options),
            nn.Linear(84, num_classes),
        )


class MLP(nn.Sequential):
    """784 -> 3 x (dense(100) -> norm -> act) -> dense(10): the BN paper's MNIST network."""

    def __init__(self, norm: str = "batch", activation: str = "sigmoid", num_classes: int = 10,
                 in_features: int = 28 * 28, hidden: int = 100, depth: int = 3, norm_options: dict | None = None):
        layers: list[nn.Module] = [nn.Flatten()]
        for index in range(depth):
            layers += _block(nn.Linear(in_features if index == 0 else hidden, hidden), hidden, 2, norm, activation,
                             norm_options)
        super().__init__(*layers, nn.Linear(hidden, num_classes))


def keras_init_(model: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases for conv/dense layers: Keras' defaults, which the classic run used."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def build_model(name: str, norm: str, activation: str = "sigmoid", init: str = "keras",
                norm_options: dict | None = None) -> nn.Module:
    """The network ``name`` with ``norm`` layers (``norm_options``: keywords for each of them)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if name == "mlp" and norm_name(norm) == "instance":
        raise ValueError("norm 'instance' needs spatial axes and the mlp has none; use it with --model lenet, "
                         "or pick layer/batch for the mlp")
    model = (LeNet if name == "lenet" else MLP)(norm=norm, activation=activation, norm_options=norm_options)
    return keras_init_(model) if init == "keras" else model
