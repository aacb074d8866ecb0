"""Sharding a probe over torch.distributed ranks (gloo on CPU, nccl on GPU): each rank takes every
world-th unit of work, and the results are gathered as they are, with no arithmetic across ranks,
so any number of processes gives the single process's result bit for bit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` ranks (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Shard":
        """The running torch.distributed group, if one is initialised (`torchrun`), else one process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def mine(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """(index, item) pairs of this rank: every world-th one, from its rank on."""
        return [(i, x) for i, x in enumerate(items) if i % self.world == self.rank]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (all ranks get the list)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
