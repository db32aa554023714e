"""Networks of "your own" for tests/test_custom_model.py: importable as `custom_nets` (pytest puts tests/ on sys.path,
and the tests' fixture does too), so a run folder can name them as `custom_nets:TinyNet` and load them again."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small conv net: conv(width) -> ReLU -> 4x4 average pool -> Dense 10."""

    def __init__(self, width: int = 8, hidden: list[int] | None = None):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        sizes = [width * 7 * 7, *(hidden or [])]
        layers: list[nn.Module] = []
        for size_in, size_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(size_in, size_out), nn.ReLU()]
        self.head = nn.Sequential(*layers, nn.Linear(sizes[-1], 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = nn.functional.avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.head(features.flatten(1))


class WrongShape(nn.Module):
    """Seven outputs instead of ten."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(28 * 28, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.flatten(1))


def not_a_module() -> None:
    """A function, where a class is expected."""
