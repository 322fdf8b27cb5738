"""The flow pass: per-token log pi, H and S of the whole batch as sampled (no grad), its entropy
flow delta_t and the batch-global totals P and N.

OPEFO's weights need lambda* = (N - P) / (N + P) of the whole batch before any backward pass; this
pass provides it (and the flow metrics every baseline logs too, and log pi_old for clipped
losses). When the update is one micro-batch (``fuse_flow_pass``) this forward keeps its graph and
is the training forward too; under ``pipeline: streaming`` every micro-batch's forward already ran
(``StreamedForwards``) and this pass only reads them. Either way the forwards the backward reuses
come back as ``TrainingForwards``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from opefo_rllib.algorithms.grpo.streaming import StreamedForwards, StreamGradients
from opefo_rllib.core.entropy_flow import FlowTotals, entropy_flow, flow_totals
from opefo_rllib.learner.data_parallel import all_reduce_sum

__all__ = ["FlowPass", "TrainingForwards", "run_flow_pass"]


@dataclasses.dataclass
class FlowPass:
    """The flow pass of one batch: no-grad per-token stats [N, T-1] as sampled, the entropy flow
    delta and its batch totals (P, N, ...)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    expected_s: torch.Tensor
    delta: torch.Tensor
    totals: FlowTotals

    def with_advantages(self, advantages: torch.Tensor, mask: torch.Tensor, estimator: str) -> "FlowPass":
        """The same stats with the flow of other advantages (``kl_in: reward`` shapes them)."""
        delta = entropy_flow(self.logp, self.entropy, advantages.float(), estimator, self.expected_s)
        return dataclasses.replace(self, delta=delta, totals=flow_totals(delta, mask))

    def mean_entropy(self, mask: torch.Tensor) -> float:
        """The batch's mean response-token entropy (as sampled)."""
        return float((self.entropy * mask).sum()) / max(float(mask.sum()), 1.0)


@dataclasses.dataclass
class TrainingForwards:
    """The forwards the training pass reuses instead of running its own: ``kept`` as (rows, stats
    with graph, width), the fused one or this learner's streamed ones; ``streamed``: the update's
    forwards were streamed (on every learner, even one whose share was empty); ``gradients``: under
    stream_backward, the streamed gradient accumulators (no graphs kept)."""

    kept: list = dataclasses.field(default_factory=list)
    streamed: bool = False
    gradients: StreamGradients | None = None


def run_flow_pass(learner, batch: dict[str, Any],
                  streamed: StreamedForwards | None) -> tuple[FlowPass, TrainingForwards]:
    """The flow pass of ``batch`` on ``learner`` (its forwards, plan and data-parallel rank)."""
    c = learner.config
    n, width = batch["input_ids"].shape
    if streamed is not None:
        logp, entropy, expected_s = streamed.flow_stats(n, width, learner.dp_world)
        # stream_backward: the gradients are in the accumulators already, the graphs gone
        forwards = TrainingForwards([] if streamed.stream_backward else streamed.forwards, True, streamed.gradients)
    else:
        logp = torch.zeros(n, width - 1)
        entropy, expected_s = torch.zeros_like(logp), torch.zeros_like(logp)
        forwards = TrainingForwards()
        fused = learner.planner.fusable(batch)
        with torch.set_grad_enabled(fused):
            for rows, filler in learner.planner.plan(batch, torch.arange(n), collective=learner.zero3):
                if fused:
                    learner.begin_training_forward()
                stats, w = learner._stats(batch, rows)
                if fused:
                    forwards.kept = [(rows, stats, w)]
                if not filler:
                    logp[rows, :w], entropy[rows, :w], expected_s[rows, :w] = (
                        stats.logp.detach(), stats.entropy.detach(), stats.expected_s.detach())
    if learner.dp_world > 1:  # each rank filled its rows: the sum is the whole batch, on every rank
        logp, entropy, expected_s = all_reduce_sum(torch.stack([logp, entropy, expected_s])).unbind(0)
    delta = entropy_flow(logp, entropy, batch["advantages"].float(), c.entropy_flow_estimator, expected_s)
    return FlowPass(logp, entropy, expected_s, delta, flow_totals(delta, batch["response_mask"])), forwards
