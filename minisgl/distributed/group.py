"""The tensor-parallel process group of one engine and the collectives it uses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """This process's place among the tensor-parallel ranks of one engine."""

    rank: int = 0
    size: int = 1
    device_group: Any = None  # dist.ProcessGroup for tensors (None when size == 1)
    cpu_group: Any = None  # gloo dist.ProcessGroup for Python objects (rank 0's messages)

    @property
    def is_leader(self) -> bool:
        """Rank 0 takes requests, decides, and tells the other ranks."""
        return self.rank == 0

    def shard(self, total: int, what: str) -> int:
        """This rank's share of `total` (heads, features); it must divide evenly."""
        if total % self.size:
            raise ValueError(
                f"{what} ({total}) is not divisible by the tensor-parallel size {self.size}"
            )
        return total // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place; every rank gets the same bits."""
        if self.size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' x concatenated along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj: Any) -> Any:
        """The leader's `obj` on every rank (others pass None)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' values."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


#: The other ranks wait for rank 0's next step in a broadcast for as long as the server is
#: idle, which may be days; a collective inside a step that takes this long is a hang.
IDLE_TIMEOUT = timedelta(days=365)
STEP_TIMEOUT = timedelta(minutes=10)


def init_tp(
    rank: int,
    size: int,
    port: int,
    device: torch.device,
    step_timeout: timedelta = STEP_TIMEOUT,
) -> TPGroup:
    """Join the engine's ranks (all on this host, rendezvous on 127.0.0.1:port).

    Two groups: the device group (NCCL or gloo) for the tensors of a step, whose collectives
    fail after `step_timeout`, and a gloo group for rank 0's per-step messages, which never
    time out (a rank that dies still ends the others' wait at once: its sockets close).
    """
    if size == 1:
        return TPGroup()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=step_timeout,
        device_id=device if device.type == "cuda" else None,
    )
    messages = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TPGroup(rank, size, dist.group.WORLD, messages)


def destroy_tp(group: TPGroup) -> None:
    """Leave the process group (each rank, at the end)."""
    if group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
