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
from fmnist.hardware import CPU_CLASSES, DEVICE_HELP


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


# oneDNN's ISA names, lowest first, and the CPU class each caps at (ONEDNN_MAX_CPU_ISA emulates a lesser CPU).
_ISA_CAPS = (("AVX2", "AVX2"), ("AVX2_VNNI", "AVX2"), ("AVX2_VNNI_2", "AVX2"), ("AVX512_CORE", "AVX512"),
             ("AVX512_CORE_VNNI", "AVX512"), ("AVX512_CORE_BF16", "AVX512-BF16"), ("AVX512_CORE_FP16", "AVX512-BF16"),
             ("AVX512_CORE_AMX", "AMX"), ("AVX512_CORE_AMX_FP16", "AMX"))


def cpu_class() -> str:
    """What decides CPU speed here: "AMX", "AVX512-BF16", "AVX512" or "AVX2" (or "SSE"), as torch's probes see the
    hardware, capped by ONEDNN_MAX_CPU_ISA when that limits oneDNN to a lesser CPU (the laptop emulation)."""
    probes = torch.cpu
    found = ("AMX" if _probe(probes, "_is_amx_tile_supported") else
             "AVX512-BF16" if _probe(probes, "_is_avx512_bf16_supported") else
             "AVX512" if _probe(probes, "_is_avx512_supported") else
             "AVX2" if _probe(probes, "_is_avx2_supported") else "SSE")
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    cap = dict(_ISA_CAPS).get(limit)
    if cap is not None and CPU_CLASSES.index(cap) < CPU_CLASSES.index(found):
        return cap
    return found


def _probe(module: object, name: str) -> bool:
    try:
        return bool(getattr(module, name)())
    except (AttributeError, RuntimeError):  # an older torch without the probe
        return False


def supports_bf16(device: torch.device) -> bool:
    """Whether "auto" precision picks bf16: GPUs with bf16 units, and CPUs that compute bf16 natively (AMX tiles or
    AVX512-BF16: measured 1.6-2x faster for the CNN presets on Zen 4); plain AVX2/AVX-512 only emulate it, slower
    than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_class() in ("AMX", "AVX512-BF16")
