"""The trainer's parallel layout as a value object: data × tensor × pipeline parallel.

`ParallelDims(dp, tp, pp)` is checked once against the world size, and everyone derives
every rank's coordinates from it the same way: the launcher (which refuses a layout that
does not divide), each rank (which reports its coordinates when it says hello), and the
controller (which checks them and shards by them).

Ranks are numbered as megatron-core orders its groups ("tp-cp-ep-dp-pp", with cp = ep =
1): tensor-parallel rank fastest, then data-parallel, then pipeline stage, so the ranks
of one tensor-parallel group are adjacent (one node, fast links) and

    rank = tp + TP * (dp + DP * pp)

How the controller uses it: a batch is sharded over DP groups only (every TP/PP rank of
a DP group gets the same shard), and a DP group's outputs and metrics come from its
reporting rank, the last pipeline stage's TP rank 0, which is where the loss is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.messages import RankCoords

EXPORTING_RANK = 0  # the trainer rank that gathers whole adapters, writes checkpoints and pushes to engines


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        for name in ("dp", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel size {name} must be a positive integer, got {value!r}")

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1) -> "ParallelDims":
        """The layout of `world_size` ranks with the given TP and PP sizes; DP is what is left."""
        if tp < 1 or pp < 1:
            raise ValueError(f"--tp and --pp must be at least 1, got tp={tp} pp={pp}")
        if world_size < 1 or world_size % (tp * pp):
            raise ValueError(f"{world_size} trainer rank(s) cannot be split into tensor-parallel groups of {tp} "
                             f"times pipeline stages of {pp}: --trainer-ranks must be a multiple of tp*pp "
                             f"= {tp * pp}")
        return cls(dp=world_size // (tp * pp), tp=tp, pp=pp)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, rank: int) -> RankCoords:
        # imported here: the launcher checks layouts before it starts anything, and cluster.messages (numpy, a
        # hundred dataclasses) would add ~0.2 s to every cold start before the first process is spawned
        from cluster.messages import RankCoords

        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return RankCoords(tp=rank % self.tp, dp=(rank // self.tp) % self.dp, pp=rank // (self.tp * self.dp))

    def rank_of(self, coords: RankCoords) -> int:
        return coords.tp + self.tp * (coords.dp + self.dp * coords.pp)

    def shard_bounds(self, num_datums: int) -> list[tuple[int, int]]:
        """The contiguous datum range [start, stop) of each DP group, in DP order."""
        bounds = [round(num_datums * d / self.dp) for d in range(self.dp + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def reporting_rank(self, dp: int) -> int:
        """The rank whose replies speak for DP group `dp`: last pipeline stage, TP rank 0."""
        return self.tp * (dp + self.dp * (self.pp - 1))  # rank_of(tp=0, dp, pp=PP-1)

    def describe(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp}"
