"""Every architecture, built by name from a small JSON-able config: `create_model("mlp", hidden=[128])`.

The dense nets use Keras' default initialisation (Glorot-uniform weights, zero biases) so that the classic
projects' numbers are comparable. Models return logits; softmax lives in the loss and in `predict`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fmnist.errors import ConfigError

NUM_CLASSES = 10


def _keras_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases, as Keras' Dense and Conv2D layers start."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class MLP(nn.Module):
    """Flatten -> [Dense(h) ReLU (Dropout)]* -> Dense(10): the tutorial's network when hidden=(128,)."""

    def __init__(self, hidden: Sequence[int] = (128,), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = 28 * 28
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.layers = nn.Sequential(*layers)
        _keras_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KerasCNN(nn.Module):
    """The typical Keras tutorial CNN: Conv32 -> pool -> Conv64 -> pool -> Dense128 -> Dense10 ('valid' convs).

    Keras applies ReLU in the conv layer and pools after it; max-pooling first and ReLU second computes exactly the
    same function and gradients (both are monotonic), on a quarter of the values: ReLU and its backward pass were
    a fifth of this network's training step on CPU.
    """

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(),
                                  nn.Dropout(dropout) if dropout else nn.Identity(), nn.Linear(128, NUM_CLASSES))
        _keras_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_bn(in_channels: int, out_channels: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                               nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Stages of 3x3 conv-BN-ReLU blocks, each stage ending in 2x2 max-pooling; global-pool linear head.

    `widths` gives the channels of each stage (28 -> 14 -> 7 -> 3 pixels), `depth` the blocks per stage.
    Batch norm lets a one-cycle schedule use a high learning rate, which is what makes few epochs enough.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128), depth: int = 1, dropout: float = 0.0):
        super().__init__()
        if not widths:
            raise ConfigError("ConvNet needs at least one stage width, e.g. widths=[32, 64, 128]")
        stages: list[nn.Module] = []
        channels = 1
        for width in widths:
            # The stage's last ReLU comes after its max-pooling: the same function and gradients (both are
            # monotonic), on a quarter of the values. Parameter names are unchanged, so older runs load as before.
            blocks = [_conv_bn(channels if i == 0 else width, width, relu=i < depth - 1) for i in range(depth)]
            stages.append(nn.Sequential(*blocks, nn.MaxPool2d(2), nn.ReLU(inplace=True)))
            channels = width
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                  nn.Dropout(dropout) if dropout else nn.Identity(), nn.Linear(channels, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "keras-cnn": KerasCNN, "convnet": ConvNet}


def create_model(name: str, **config: Any) -> nn.Module:
    """Build an architecture by name from keyword config; unknown names or keys raise `ConfigError`."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[name](**config)
    except TypeError as error:
        raise ConfigError(f"bad config for architecture {name!r}: {error}") from None


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
