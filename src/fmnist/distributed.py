"""Data-parallel training over several processes, launched by `torchrun` (torch.distributed + DDP).

`fmnist train` runs unchanged under torchrun: every rank loads the data, draws the same seeded permutation and
augmentation for each global batch, and trains on its own contiguous slice of it; DDP averages the gradients, so
N processes with a global batch B take the same steps as one process with batch B. Metrics and stop requests are
summed across ranks at fixed points, so all ranks always agree on when to stop. Only rank 0 prints and writes.
The backend follows the device: gloo for CPU processes, NCCL when each process drives its own CUDA GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from fmnist.errors import ConfigError
from fmnist.hardware import usable_cores


@dataclass(frozen=True)
class Context:
    """Where this process stands in the group."""

    rank: int
    world: int
    backend: str
    owns_group: bool  # we initialised the process group, so we tear it down
    device: torch.device = torch.device("cpu")  # this rank's device; collectives run on it (NCCL needs the GPU)

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """True outside torchrun and on rank 0: the process that prints and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs (it moves gradients GPU to GPU), gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup(threads: int | None = None, device: torch.device | None = None) -> Context | None:
    """Join the group torchrun describes in the environment; None when alone.

    `device` is this rank's device (`fmnist.devices.resolve_device` gives each rank the GPU of its local rank).
    """
    if not launched_by_torchrun():
        return None
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run without torchrun")
    device = device or torch.device("cpu")
    backend = backend_for(device)
    if backend == "nccl" and not dist.is_nccl_available():
        raise ConfigError("this torch build has no NCCL for multi-GPU training; use --device cpu (gloo)")
    owns = not dist.is_initialized()
    if owns:
        seconds = int(os.environ.get("FMNIST_DIST_TIMEOUT", "300"))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before NCCL starts, or every rank's communicator lands on GPU 0
            dist.init_process_group(backend, timeout=timedelta(seconds=seconds), device_id=device)
        else:
            dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    if threads is None:
        # torch's default is one thread per core in *each* process: N processes would fight over the cores.
        torch.set_num_threads(max(1, usable_cores() // dist.get_world_size()))
    return Context(dist.get_rank(), dist.get_world_size(), dist.get_backend(), owns, device)


def check_batch(context: Context | None, batch_size: int) -> None:
    if context and batch_size % context.world:
        raise ConfigError(f"batch size {batch_size} is the global batch and must divide evenly among "
                          f"{context.world} processes; use a multiple of {context.world}")


def wrap(context: Context | None, model: nn.Module) -> nn.Module:
    """The module to train through: DDP (which broadcasts rank 0's weights now and averages gradients) or the model."""
    if context is None:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=True)


def shard(context: Context | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous slice of each global-batch tensor."""
    if context is None:
        return tensors
    return tuple(t.tensor_split(context.world)[context.rank] for t in tensors)


def sum_across(context: Context | None, values: list[float]) -> list[float]:
    """Element-wise sums over all ranks (one all-reduce); the values themselves when alone."""
    if context is None:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sync_buffers(context: Context | None, model: nn.Module) -> None:
    """Give every rank rank 0's batch-norm statistics, so evaluations and the saved model agree everywhere."""
    if context is None:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def teardown(context: Context | None) -> None:
    if context is not None and context.owns_group and dist.is_initialized():
        dist.destroy_process_group()
