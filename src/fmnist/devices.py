"""Which device computes: a CUDA GPU when one is asked for (or found, with "auto"), else the CPU.

One place decides, so `train`, `evaluate` and `predict` accept the same `--device` values and refuse the same
impossible ones with the same one-line fix. Under torchrun each process takes the GPU of its LOCAL_RANK.
Apple's MPS is refused rather than half-supported: nobody on the team could test it.
"""

from __future__ import annotations

import os
import re

import torch

from fmnist.errors import ConfigError
from fmnist.hardware import DEVICE_HELP



def node_position() -> tuple[int, int] | None:
    """(this process's index on its node, processes on the node) under torchrun; None outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def resolve_device(name: str = "auto", position: tuple[int, int] | None = None) -> torch.device:
    """The torch device `name` means here, or a `ConfigError` naming the problem and the fix.

    `position` is torchrun's (LOCAL_RANK, LOCAL_WORLD_SIZE): each process then takes the GPU of its local rank.
    "auto" takes GPUs only when there is one for every process on the node, so all ranks choose alike.
    """
    rank_on_node, ranks_on_node = position if position is not None else (None, 1)
    text = str(name).strip().lower()
    if text == "auto":
        enough = torch.cuda.is_available() and torch.cuda.device_count() >= ranks_on_node
        text = "cuda" if enough else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        raise ConfigError("device mps (Apple GPU) is not supported yet; use --device cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ConfigError(f"unknown device {name!r}; use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        reason = ("this torch is a CPU-only build" if torch.version.cuda is None
                  else "torch sees no CUDA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        raise ConfigError(f"device {name!r}: {reason}; use --device cpu or auto")
    count = torch.cuda.device_count()
    if match.group(1) is not None:
        if rank_on_node is not None:
            raise ConfigError(f"device {name!r} under torchrun: each process takes the GPU of its local rank; "
                              "pass --device cuda and choose GPUs with CUDA_VISIBLE_DEVICES")
        index = int(match.group(1))
    else:
        index = rank_on_node or 0
    if index >= count:
        fix = (f"start at most {count} processes per node (--nproc-per-node {count})" if rank_on_node is not None
               else f"use cuda:0 to cuda:{count - 1}")
        raise ConfigError(f"GPU {index} does not exist: torch sees {count} GPU(s); {fix}")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """`cpu`, or `cuda:0 (NVIDIA H100 80GB HBM3)`: what a run's metrics record."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def supports_bf16(device: torch.device) -> bool:
    """Whether "auto" precision picks bf16: CPUs with AMX tiles (measured 1.6-4x faster), GPUs with bf16 units."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return torch.cpu._is_amx_tile_supported()
    except AttributeError:  # older torch without the probe
        return False
