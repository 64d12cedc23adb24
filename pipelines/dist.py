"""torch.distributed set-up from torchrun's environment: rank, world size, device, backend.

Device and backend follow what is available: NCCL on CUDA, gloo on CPU (so every multi-process
path also runs, and is tested, on a CPU machine). Nothing here is global state: `init_distributed`
returns a `DistInfo` that callers pass around.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None = single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str = "auto") -> str:
    """'auto' → 'cuda' when available, else 'cpu'."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def init_distributed(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if world == 1:
        return DistInfo(0, 1, 0, device, None)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, device, backend)


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging; gradients are averaged by DDP itself)."""
    if not info.distributed:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / info.world_size


def node_first(info: DistInfo, fn: Callable[[], T], timeout_s: int = 24 * 3600) -> T:
    """Run `fn` on each node's local rank 0 first; every other rank waits at a barrier, then runs `fn` itself.

    Why: work that each node does once into a shared place (the token cache) is done by one process per node
    while the others wait, instead of all of them racing for it. The barrier has its own gloo group with a long
    timeout (decoding a paper-scale cache can outlast the training group's); a rank that dies breaks it at once.
    """
    if not info.distributed:
        return fn()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        first = fn() if info.local_rank == 0 else None
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)
    return first if info.local_rank == 0 else fn()
