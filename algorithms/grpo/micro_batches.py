"""Micro-batch planning: which rows each forward / backward of an update takes.

Rows go ``micro_batch_size`` at a time, or, with ``max_tokens_per_micro_batch``, sorted by length
and packed so that rows x longest row stays within the budget (a longer row goes alone); each
micro-batch is then cut to its own longest row, so a few long answers do not pad the whole batch.
With several learners each plans its token-balanced shard, padded with zero-weight filler
micro-batches to the longest plan when the pass runs collectives.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from opefo_rllib.learner.data_parallel import padded_plan, token_balanced_shards

__all__ = ["MicroBatchPlanner", "pack_by_tokens"]


class MicroBatchPlanner:
    """Plans micro-batches for one learner (``dp_rank`` of ``dp_world``) under a config."""

    def __init__(self, config: Any, dp_world: int, dp_rank: int):
        self.config, self.dp_world, self.dp_rank = config, dp_world, dp_rank

    def micro_batches(self, rows: torch.Tensor, lengths: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """``rows`` in micro-batches of ``micro_batch_size`` rows, or packed under the token budget."""
        c = self.config
        budget = getattr(c, "max_tokens_per_micro_batch", None)
        if budget is None or lengths is None:
            size = c.micro_batch_size or len(rows)
            for i in range(0, len(rows), size):
                yield rows[i:i + size]
            return
        yield from pack_by_tokens(rows, lengths[rows], int(budget), c.micro_batch_size)

    def plan(self, batch: dict, rows: torch.Tensor, collective: bool = True) -> Iterator[tuple[torch.Tensor, bool]]:
        """This learner's micro-batches of ``rows`` as ``(rows, is_filler)``: with several learners,
        its token-balanced shard, padded with filler micro-batches to the longest plan of any learner
        when the pass runs collectives (every backward; forwards under ZeRO-3). One learner: all of
        ``rows``, no filler."""
        lengths = batch["attention_mask"].sum(-1)
        if self.dp_world == 1:
            for micro in self.micro_batches(rows, lengths):
                yield micro, False
            return
        shards = token_balanced_shards(rows, lengths, self.dp_world)
        if not collective:
            for micro in self.micro_batches(shards[self.dp_rank], lengths):
                yield micro, False
            return
        yield from padded_plan(shards, self.dp_rank, lambda r: self.micro_batches(r, lengths), rows[:1])

    def my_share(self, chunk: dict) -> Iterator[torch.Tensor]:
        """Micro-batches of this learner's token-balanced share of a streamed chunk's rows."""
        lengths = chunk["attention_mask"].sum(-1)
        mine = torch.arange(chunk["input_ids"].shape[0])
        if self.dp_world > 1:
            mine = token_balanced_shards(mine, lengths, self.dp_world)[self.dp_rank]
        return self.micro_batches(mine, lengths) if len(mine) else iter(())

    def fusable(self, batch: dict) -> bool:
        """One learner, one optimizer step, one micro-batch: the flow pass's forward can be the
        training forward (``fuse_flow_pass``)."""
        c = self.config
        if not c.fuse_flow_pass or self.dp_world > 1 or c.num_updates_per_batch > 1:
            return False
        n = batch["input_ids"].shape[0]
        return len(list(self.micro_batches(torch.arange(n), batch["attention_mask"].sum(-1)))) == 1


def pack_by_tokens(rows: torch.Tensor, lengths: torch.Tensor, budget: int, max_rows: int | None = None):
    """Micro-batches of ``rows`` (sorted by ``lengths``, longest first) whose padded size
    (rows x longest) stays within ``budget`` tokens; at most ``max_rows`` rows each."""
    order = torch.argsort(lengths, descending=True, stable=True)
    current: list[int] = []
    longest = 0
    for i in order.tolist():
        length = int(lengths[i])
        width = max(longest, length)
        if current and (width * (len(current) + 1) > budget or (max_rows and len(current) >= max_rows)):
            yield rows[torch.tensor(current)]
            current, width = [], length
        current.append(i)
        longest = width
    if current:
        yield rows[torch.tensor(current)]
