"""Every architecture, built by name from a small JSON-able config: `create_model("mlp", hidden=[128])`.

The dense nets use Keras' default initialisation (Glorot-uniform weights, zero biases) so that the classic
projects' numbers are comparable. Models return logits; softmax lives in the loss and in `predict`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from fmnist.errors import ConfigError, short_repr

NUM_CLASSES = 10
# A model file is read before anything is built, and the network's size follows from it alone, so a damaged or
# hostile model.json ("hidden": [100000000]) is refused before it allocates: 50 M parameters are 200 MB of float32,
# 200x the largest preset (convnet-wide, about 0.25 M) and still a fraction of a laptop's memory.
MAX_PARAMETERS = 50_000_000
MAX_LAYERS = 32  # dense layers, or conv blocks per stage: each is a module to build, whatever its width
MAX_STAGES = 4  # each ConvNet stage halves the image: 28 -> 14 -> 7 -> 3 -> 1; a fifth would leave no pixels


def _keras_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases, as Keras' Dense and Conv2D layers start."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


# The hidden-layer activations a learner can try, as Keras names them (`Dense(128, activation="tanh")`).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
                                                   "gelu": nn.GELU}


class MLP(nn.Module):
    """Flatten -> [Dense(h) activation (Dropout)]* -> Dense(10): the tutorial's network when hidden=(128,)."""

    def __init__(self, hidden: Sequence[int] = (128,), dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = 28 * 28
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
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


# ----------------------------------------------------------------------------------------------- configs
_Width = Annotated[int, Field(ge=1, le=MAX_PARAMETERS)]
_Dropout = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class _ModelConfig(BaseModel):
    """Keyword config of one architecture, typed and bounded: what `create_model` accepts, checked before building."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    dropout: _Dropout = 0.0

    def parameters(self) -> int:
        """Trainable parameters of the network this config builds, computed without building it."""
        raise NotImplementedError


class MLPConfig(_ModelConfig):
    hidden: Annotated[list[_Width], Field(max_length=MAX_LAYERS)] = [128]
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu"  # absent in model files before it existed

    def parameters(self) -> int:
        widths = [28 * 28, *self.hidden, NUM_CLASSES]
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))  # weight and bias of each Linear


class KerasCNNConfig(_ModelConfig):
    def parameters(self) -> int:
        return (9 * 32 + 32) + (9 * 32 * 64 + 64) + (64 * 5 * 5 * 128 + 128) + (128 * NUM_CLASSES + NUM_CLASSES)


class ConvNetConfig(_ModelConfig):
    widths: Annotated[list[_Width], Field(min_length=1, max_length=MAX_STAGES)] = [32, 64, 128]
    depth: Annotated[int, Field(ge=1, le=MAX_LAYERS)] = 1

    def parameters(self) -> int:
        total, channels = 0, 1
        for width in self.widths:
            for block in range(self.depth):  # conv without bias, then batch norm's weight and bias
                total += 9 * (channels if block == 0 else width) * width + 2 * width
            channels = width
        return total + channels * NUM_CLASSES + NUM_CLASSES


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "keras-cnn": KerasCNN, "convnet": ConvNet}
CONFIGS: dict[str, type[_ModelConfig]] = {"mlp": MLPConfig, "keras-cnn": KerasCNNConfig, "convnet": ConvNetConfig}


def check_config(name: str, config: dict[str, Any]) -> _ModelConfig:
    """The typed config of architecture `name`, refusing unknown names, wrong types, out-of-range values and a
    network over `MAX_PARAMETERS` with one line, before anything is allocated."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(CONFIGS)}")
    if not isinstance(config, dict):
        raise ConfigError(f"the config of architecture {name!r} must be an object of settings")
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
    try:
        checked = CONFIGS[name](**config)
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in problem["loc"]) or "config"
        shown = short_repr(problem.get("input"), 40)
        raise ConfigError(f"bad config for architecture {name!r}: {where} = {shown}: {problem['msg']}") from None
    count = checked.parameters()
    if count > MAX_PARAMETERS:
        raise ConfigError(f"architecture {name!r} with {config} would have {count:,} parameters, over the limit of "
                          f"{MAX_PARAMETERS:,}; use smaller layers")
    return checked


def parameter_count(name: str, **config: Any) -> int:
    """Trainable parameters of `create_model(name, **config)`, without building it."""
    return check_config(name, config).parameters()


def create_model(name: str, **config: Any) -> nn.Module:
    """Build an architecture by name from keyword config; a bad name, key, value or size raises `ConfigError`."""
    checked = check_config(name, config)
    return ARCHITECTURES[name](**checked.model_dump())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
