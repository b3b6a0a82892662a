"""Process-group lifetime for every multi-process entry point (torchrun): join the group, sum across it, and end a
worker without gloo's teardown abort. Training, fine-tuning and tensor-parallel serving all use these."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(device: torch.device | str | None = None) -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun with no group, else after joining the process group (nccl when
    `device` is CUDA, else gloo). A group the caller already initialised is used as it is."""
    if world_size_from_env() == 1 and not dist.is_initialized():
        return 0, 1
    if not dist.is_initialized():
        kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sums `x` in place over the processes (nothing to do for one process); returns it."""
    if world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every process's `obj`, in rank order (a one-element list for one process). Collective."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def end_worker(code: int = 0, *, only_under_torchrun: bool = False) -> int:
    """Ends a torchrun worker: barrier and destroy the process group when one is still up, then os._exit(code).

    Interpreter finalization after destroy_process_group can still abort in gloo's C++ teardown ("terminate called
    without an active exception", about 1 run in 10 on a 2-core machine), and torchrun then reports a finished job
    as failed. With only_under_torchrun, a process outside torchrun (WORLD_SIZE 1) just gets `code` back."""
    if only_under_torchrun and world_size_from_env() <= 1:
        return code
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
