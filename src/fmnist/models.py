"""Every architecture, built by name from a small JSON-able config: `create_model("mlp", hidden=[128])`.

The dense nets use Keras' default initialisation (Glorot-uniform weights, zero biases) so that the classic
projects' numbers are comparable. Models return logits; softmax lives in the loss and in `predict`.
Your own network is the architecture "custom": a class named by import path plus JSON keyword arguments, imported,
built and checked here (`create_custom`), and imported from a file only when the caller trusts it (`check_trust`).
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

    Pool 2 floors conv 2's 11x11 output to 5x5, so conv 2's last row and column, and everything that feeds only
    them, are never used: only the top-left 26x26 pixels reach the output (26 -> conv 24 -> pool 12 -> conv 10 ->
    pool 5). The forward pass reads just those, computing the same outputs and gradients with 15% less work.
    """

    USED_INPUT = 26  # pixels per side that reach the output (see above)

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
        return self.head(self.features(x[..., :self.USED_INPUT, :self.USED_INPUT]))


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
    """Build an architecture by name from keyword config; a bad name, key, value or size raises `ConfigError`.

    `create_model("custom", target="pkg.mod:Class", kwargs={...})` imports and builds your own network
    (`create_custom`). Importing runs that module's code: callers that took the name from a file or a config check
    `check_trust` first."""
    if name == CUSTOM:
        unknown = sorted(set(config) - {"target", "kwargs"})
        if unknown or not isinstance(config.get("target"), str) or not isinstance(config.get("kwargs", {}), dict):
            raise ConfigError(f"the config of architecture {CUSTOM!r} is {short_repr(config)}; it takes target "
                              "(package.module:Class) and kwargs (an object)")
        return create_custom(config["target"], config.get("kwargs"))
    checked = check_config(name, config)
    return ARCHITECTURES[name](**checked.model_dump())


# ----------------------------------------------------------------------------------------------- your own network
CUSTOM = "custom"  # the architecture name of a network given by import path: {"target": ..., "kwargs": ...}
_PROBE_SHAPE = (2, 1, 28, 28)  # a batch of two: a network that squeezes the batch dimension away shows it


def _detail(error: BaseException) -> str:
    """An exception raised by someone else's code, as a few words for a one-line message."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:160]}".rstrip(": ")


def check_trust(target: str, source: str, trust_code: bool) -> None:
    """Refuse to import a network named by `source` (a run folder, a config) unless the caller trusts it: importing
    a module runs its code, so a run folder from someone else could run anything on this machine."""
    from fmnist.errors import UntrustedCodeError

    if not trust_code:
        raise UntrustedCodeError(f"{source} names code {short_repr(target)}: using it imports that module, which runs "
                                 "its code; if you trust it, pass --trust-code (Python: trust_code=True)")


def import_network(target: str) -> type[nn.Module]:
    """The `nn.Module` subclass at `target` ("package.module:Class"); each way it can fail is one `ConfigError`."""
    import importlib

    module_name, _, qualname = target.partition(":")
    if not module_name or not qualname:
        raise ConfigError(f"custom network {short_repr(target)} is not an import path; write it as "
                          "package.module:Class")
    try:
        found: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigError(f"custom network {target}: no module named {error.name!r}; install it, or run from the "
                          "folder that holds it (or add that folder to PYTHONPATH)") from None
    except Exception as error:  # the module's own code failed as it was imported
        raise ConfigError(f"custom network {target}: importing {module_name} failed ({_detail(error)})") from None
    for part in qualname.split("."):
        if not hasattr(found, part):
            raise ConfigError(f"custom network {target}: module {module_name} has no {qualname!r}")
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ConfigError(f"custom network {target} is a {type(found).__name__}, not a torch.nn.Module subclass")
    return found


def create_custom(target: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Import the class at `target`, build it with `kwargs` and check it (`check_network`). Seed torch first for
    reproducible weights: the class initialises them as it likes."""
    network_class = import_network(target)
    try:
        network = network_class(**(kwargs or {}))
    except Exception as error:  # someone else's constructor: any failure is one line
        raise ConfigError(f"custom network {target}: building it with {short_repr(kwargs or {})} failed "
                          f"({_detail(error)})") from None
    check_network(network, target)
    return network


def check_network(network: nn.Module, target: str) -> None:
    """A network fmnist can train and load: trainable parameters within `MAX_PARAMETERS`, and (2, 10) logits for a
    (2, 1, 28, 28) batch of blank images (run in eval mode without gradients; its mode is restored)."""
    total = sum(parameter.numel() for parameter in network.parameters())
    if total > MAX_PARAMETERS:
        raise ConfigError(f"custom network {target} has {total:,} parameters, over the limit of {MAX_PARAMETERS:,}; "
                          "use smaller layers")
    if not any(parameter.requires_grad for parameter in network.parameters()):
        raise ConfigError(f"custom network {target} has no trainable parameters")
    device = next(network.parameters()).device
    was_training = network.training
    try:
        network.eval()
        with torch.no_grad():
            output = network(torch.zeros(_PROBE_SHAPE, device=device))
    except Exception as error:  # someone else's forward pass
        raise ConfigError(f"custom network {target} fails on a {_PROBE_SHAPE} batch of images "
                          f"({_detail(error)})") from None
    finally:
        network.train(was_training)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != (_PROBE_SHAPE[0], NUM_CLASSES):
        raise ConfigError(f"custom network {target} maps a {_PROBE_SHAPE} batch to {shape}, not "
                          f"({_PROBE_SHAPE[0]}, {NUM_CLASSES}) logits; end it with a layer of {NUM_CLASSES} outputs")


def network_target(network: nn.Module) -> str:
    """The import path of a network's class, "module:Qualified.Name", as a run records it."""
    return f"{type(network).__module__}:{type(network).__qualname__}"


def check_reloadable(target: str, network: nn.Module | None = None, kwargs: dict[str, Any] | None = None) -> None:
    """Refuse, before training, a network a run folder could not rebuild: one defined in `__main__` (a notebook or
    script) or inside a function cannot be imported again; and a passed `network` must be what its class builds
    from `kwargs` (same tensors and shapes), since loading the run will build it that way."""
    module_name, _, qualname = target.partition(":")
    where = ("in __main__ (a notebook or script)" if module_name == "__main__"
             else "inside a function" if "<locals>" in qualname else None)
    if where:
        raise ConfigError(f"custom network {target} is defined {where}, so the run folder could not import it again "
                          "to load the run: move the class into a .py module and import it from there, or train in "
                          "memory (without out_dir)")
    if network is None:
        return
    if import_network(target) is not type(network):
        raise ConfigError(f"custom network {target} imports another class than the network's own; the module "
                          "was reloaded or the class replaced: restart and import it once")
    rebuilt = create_custom(target, kwargs).state_dict()
    mine = network.state_dict()
    problem = next((f"tensor {name!r} is {list(tensor.shape)} rebuilt, {list(mine[name].shape)} passed"
                    for name, tensor in rebuilt.items() if name in mine and tensor.shape != mine[name].shape), None)
    missing, extra = sorted(set(mine) - set(rebuilt)), sorted(set(rebuilt) - set(mine))
    if missing or extra:
        problem = (f"the rebuilt one lacks tensor {missing[0]!r}" if missing
                   else f"the rebuilt one has an extra tensor {extra[0]!r}")
    if problem:
        raise ConfigError(f"{target}(**{short_repr(kwargs or {})}) does not rebuild the network you passed "
                          f"({problem}); a run folder rebuilds it that way, so pass the keyword arguments it was "
                          "built with as model_kwargs=, or train in memory (without out_dir)")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
