"""Data parallelism over several learners: token-balanced shards, equal collective schedules,
sums across ranks. Pure torch (``torch.distributed``); one process is world size 1.

Every learner receives the whole batch (advantages are group statistics: computed before any
split) and trains on its own shard of rows. Three rules keep N learners equal to one:

* **Shards by tokens, not rows.** ``token_balanced_shards`` deals rows longest first to the
  learner with the fewest tokens so far, so a few long answers do not all land on one learner.
  Every rank computes every shard (same batch, same rule): no communication.
* **Same number of collectives everywhere.** DeepSpeed reduces gradients at each backward (ZeRO
  0-2) and gathers parameters at each forward (ZeRO-3): a rank that runs fewer micro-batches
  than another would hang it. ``padded_plan`` pads every rank's micro-batch plan to the longest
  one with zero-weight micro-batches (one row, loss x 0).
* **Global sums.** Per-token flow statistics, loss sums and token counts are sums over the whole
  batch: a rank fills its rows of a zero tensor and ``all_reduce_sum`` adds the rest.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

__all__ = ["token_balanced_shards", "padded_plan", "world_and_rank", "all_reduce_sum", "all_reduce_sum_tensors",
           "reduce_floats"]


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def token_balanced_shards(rows: torch.Tensor, lengths: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Split ``rows`` into ``world`` shards of near-equal token counts (``lengths[rows]``).

    Greedy longest-processing-time: rows longest first (stable), each to the shard with the fewest
    tokens so far (lowest rank on ties). Each shard's rows are returned sorted. Deterministic, so
    every rank computes the same split."""
    if world == 1:
        return [rows]
    tokens = [0] * world
    shards: list[list[int]] = [[] for _ in range(world)]
    order = torch.argsort(lengths[rows], descending=True, stable=True)
    for i in order.tolist():
        r = min(range(world), key=lambda k: (tokens[k], k))
        shards[r].append(int(rows[i]))
        tokens[r] += int(lengths[rows[i]])
    return [torch.tensor(sorted(s), dtype=torch.long) for s in shards]


def padded_plan(shards: list[torch.Tensor], rank: int,
                micro_batches: Callable[[torch.Tensor], Iterable[torch.Tensor]],
                filler: torch.Tensor) -> Iterator[tuple[torch.Tensor, bool]]:
    """This rank's micro-batches as ``(rows, is_filler)``, padded with ``filler`` micro-batches to
    the longest plan of any rank, so every rank runs the same number of forwards / backwards."""
    plans = [list(micro_batches(s)) if len(s) else [] for s in shards]
    longest = max(len(p) for p in plans)
    mine = plans[rank]
    for micro in mine:
        yield micro, False
    for _ in range(longest - len(mine)):
        yield filler, True


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (a no-op in one process); returns it."""
    import torch.distributed as dist

    if world_and_rank()[0] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_sum_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum same-dtype tensors over all ranks in one collective (flattened together); new tensors."""
    if world_and_rank()[0] == 1:
        return list(tensors)
    flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def reduce_floats(values: list[float], mean: bool = False) -> list[float]:
    """Sums (or means) of several floats over all ranks, in one collective."""
    world = world_and_rank()[0]
    if world == 1:
        return list(values)
    t = all_reduce_sum(torch.tensor(values, dtype=torch.float64))
    if mean:
        t = t / world
    return t.tolist()
