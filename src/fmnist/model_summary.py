"""A Keras-style `model.summary()`: each layer, its output shape, parameters and multiply-adds, and the totals.

`summary(target)` takes a network (any `nn.Module` that maps (N, 1, 28, 28) images to 10 logits), a run folder or a
preset name, runs one blank image through it with forward hooks on the leaf layers, and returns a `ModelSummary`
whose `str()` is the table (`fmnist summary RUN`, `fmnist summary --preset fast`, `fmnist train --summary`).
Written here rather than taken from torchinfo: the table is a dozen lines of hooks, and this one reads like Keras'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

BYTES_PER_PARAMETER = 4  # float32, as fmnist saves weights


@dataclass
class LayerRow:
    """One leaf layer: its dotted name in the model, its class, its output shape for one image and its cost."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    parameters: int
    mult_adds: int


@dataclass
class ModelSummary:
    """The layers in call order and the totals; `str()` gives the table."""

    title: str
    rows: list[LayerRow] = field(default_factory=list)
    total_parameters: int = 0
    trainable_parameters: int = 0

    @property
    def mult_adds(self) -> int:
        """Multiply-adds of one forward pass of one image (convolutions and dense layers)."""
        return sum(row.mult_adds for row in self.rows)

    @property
    def size_mb(self) -> float:
        """The weights' size as fmnist stores them (float32), in MB."""
        return self.total_parameters * BYTES_PER_PARAMETER / 1e6

    def __str__(self) -> str:
        head = f"{'Layer (type)':<34}{'Output shape':<22}{'Param #':>12}{'Mult-adds':>14}"
        rule = "=" * len(head)
        lines = [f"Model: {self.title}", rule, head, rule]
        for row in self.rows:
            shape = "(N, " + ", ".join(str(size) for size in row.output_shape[1:]) + ")"
            lines.append(f"{row.name + ' (' + row.kind + ')':<34}{shape:<22}{row.parameters:>12,}{row.mult_adds:>14,}")
        lines += [rule, f"Total params: {self.total_parameters:,} ({self.size_mb:.2f} MB as float32)",
                  f"Trainable params: {self.trainable_parameters:,}",
                  f"Non-trainable params: {self.total_parameters - self.trainable_parameters:,}",
                  f"Mult-adds per image: {self.mult_adds / 1e6:,.2f} M", rule]
        return "\n".join(lines)


def _mult_adds(layer: nn.Module, output: torch.Tensor) -> int:
    """Multiply-adds of a convolution or dense layer for the output it produced (one image); 0 for the rest."""
    if isinstance(layer, nn.Conv2d):
        kernel = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        return output.numel() * kernel
    if isinstance(layer, nn.Linear):
        return output.numel() // output.shape[-1] * layer.in_features * layer.out_features
    return 0


def summarize_module(model: nn.Module, title: str | None = None) -> ModelSummary:
    """Run one blank 28x28 image through `model` (eval mode, no gradients) and record every leaf layer it calls."""
    result = ModelSummary(title or type(model).__name__)
    names = {module: name for name, module in model.named_modules()}
    hooks = []

    def record(layer: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and not isinstance(layer, nn.Identity):  # a dropout of 0: nothing
            result.rows.append(LayerRow(names[layer], type(layer).__name__, tuple(output.shape),
                                        sum(p.numel() for p in layer.parameters(recurse=False)),
                                        _mult_adds(layer, output)))

    for module in model.modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 1, 28, 28, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    result.total_parameters = sum(p.numel() for p in model.parameters())
    result.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


def summary(target: nn.Module | str | os.PathLike, trust_code: bool = False) -> ModelSummary:
    """The table for a network, a run folder (its saved architecture) or a preset name (the network it trains).
    A run of your own network imports the code it names, which runs it: only with `trust_code=True`."""
    if isinstance(target, nn.Module):
        return summarize_module(target)
    from fmnist.config import PRESETS, resolve_config
    from fmnist.models import create_model

    if isinstance(target, str) and target in PRESETS and not Path(target).is_dir():
        architecture = resolve_config(target).architecture()
        return summarize_module(create_model(architecture["name"], **architecture["config"]),
                                f"{architecture['name']}, preset {target}")
    from fmnist.checkpoint import build_model, read_meta

    meta = read_meta(target)
    network = build_model(meta, trust_code=trust_code, source=f"run folder {target}")
    name = meta.architecture.name
    if name == "custom":  # a validated CustomNetwork config (build_model checked it)
        name = f"custom {meta.architecture.config['target']}"
    return summarize_module(network, f"{name}, run {target}")
