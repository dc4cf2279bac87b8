"""Sharing one evaluation or calibration among the ranks of a ``torchrun`` job.

``torchrun --nproc-per-node K -m meansparse_core -- evaluate ...`` starts K copies of the command;
``join`` connects them with torch.distributed (gloo on CPUs, NCCL on GPUs). Work is cut into the
batches a single process would run, in the same order and with the same seeds, and each rank
takes one contiguous run of those batches (``Group.shard``). Because every batch is computed
exactly as a single process computes it, the gathered per-item outcomes, the accuracies and the
statistics are bit-identical to a run without torchrun. Without torchrun, ``join`` returns
``SOLO``, a group of one, and every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks that share a job."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes results."""
        return self.rank == 0

    def shard(self, count: int) -> range:
        """This rank's contiguous share of ``count`` batches; shares differ by at most one batch.

        Ranks past the last batch (fewer batches than ranks) get an empty range and only take
        part in the collectives.
        """
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects, CPU tensors)."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; None on the other ranks."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


SOLO = Group()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)


def join(device: torch.device, timeout_minutes: float = 60.0) -> Group:
    """Connect to the other ranks when started by torchrun (with more than one rank); else ``SOLO``.

    On GPUs each rank takes the device numbered by its LOCAL_RANK. ``timeout_minutes`` bounds how
    long a collective waits for a rank that stopped answering (torchrun normally ends the others
    at once when one rank dies).
    """
    if not launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return SOLO
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    return Group(dist.get_rank(), dist.get_world_size())


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
