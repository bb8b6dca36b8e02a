"""Process-group plumbing for the training engine (torchrun conventions).

A process launched by ``torchrun`` finds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in its environment; :func:`init_distributed` reads
them, picks the device and joins the process group (NCCL on CUDA, Gloo on CPU). A plain
``python script.py`` sees none of them and gets a single-process context, so the same
training script runs both ways.

Every collective helper here is a no-op (or the identity) when no process group is
initialised, so callers never branch on the world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "all_gather_object",
    "all_reduce_max",
    "barrier",
    "destroy_distributed",
    "init_distributed",
    "is_distributed",
    "resolve_device",
    "unwrap",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    rank: global rank in [0, world_size). local_rank: rank on this machine (selects the
    GPU). device: the device this process trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the one process that writes logs and checkpoints."""
        return self.rank == 0


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """Device to train on.

    None picks ``cuda:<local_rank>`` when CUDA is available, else CPU. A bare "cuda" is
    pinned to ``cuda:<local_rank>`` so that every torchrun process gets its own GPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """Join the torchrun process group if there is one; return this process's context.

    Reads RANK / WORLD_SIZE / LOCAL_RANK (defaults 0 / 1 / 0). With WORLD_SIZE > 1 the
    default process group is created once (``env://`` rendezvous, NCCL for CUDA devices,
    Gloo otherwise); a group the caller created already is reused as is. Safe to call
    repeatedly, e.g. once per training stage in the same process.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        # NCCL binds communicators to the current device; set it before the first collective.
        torch.cuda.set_device(resolved)
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved)
    return DistContext(0, 1, local_rank, resolved)


def destroy_distributed() -> None:
    """Leave the process group (end of a torchrun script); no-op without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers.

    State dicts and attribute access must go through this: a DDP wrapper prefixes every
    key with ``module.``.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def barrier() -> None:
    """Wait for every rank; no-op in a single process."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a single process.

    Objects travel pickled in memory between our own ranks only (nothing is read from
    disk), which is why pickling is acceptable here.
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks, in place (tensor on this rank's device)."""
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value
