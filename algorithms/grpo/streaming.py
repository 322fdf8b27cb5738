"""``pipeline: streaming``: the training forwards of one batch, run chunk by chunk while the rest
of the batch is generated, held until the update takes them.

``StreamedForwards`` holds, for one batch, each streamed micro-batch as ``(batch rows, stats,
width)`` (graphs kept, or under ``stream_backward`` detached numbers) and, under
``stream_backward``, the two gradient accumulators ``StreamGradients``:

    g_total = sum_t grad l_t,   g_side = sum_t c_t grad l_t   (c_t the token's balance side)

so that the weighted gradient sum_t (1 + lambda c_t) grad l_t = g_total + lambda g_side once
lambda of the whole batch is known. Each loss is aggregated with unit counts; the whole batch's
count scales both at the end (``StreamGradients.surrogate``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from opefo_rllib.core.balance import BalanceRule
from opefo_rllib.core.entropy_flow import entropy_flow
from opefo_rllib.core.policy_losses import aggregate_loss, entropy_bonus, loss_settings, policy_loss
from opefo_rllib.learner.data_parallel import all_reduce_sum

__all__ = ["StreamedForwards", "StreamGradients"]


@dataclasses.dataclass
class StreamGradients:
    """stream_backward's accumulators: g_total and g_side (fp32, one per parameter) and their losses."""

    total: list[torch.Tensor]
    side: list[torch.Tensor]
    loss_total: float = 0.0
    loss_side: float = 0.0

    @classmethod
    def zeros(cls, params: list[torch.nn.Parameter]) -> "StreamGradients":
        return cls([torch.zeros_like(p, dtype=torch.float32) for p in params],
                   [torch.zeros_like(p, dtype=torch.float32) for p in params])

    def add(self, losses: list[torch.Tensor], params: list[torch.nn.Parameter]) -> None:
        """Backward of [loss_total] or [loss_total, loss_side] into the accumulators."""
        for k, (buffers, loss) in enumerate(zip((self.total, self.side), losses)):
            grads = torch.autograd.grad(loss, params, retain_graph=k + 1 < len(losses), allow_unused=True)
            for buffer, g in zip(buffers, grads):
                if g is not None:
                    buffer += g.float()
            if k == 0:
                self.loss_total += float(loss.detach())
            else:
                self.loss_side += float(loss.detach())

    def surrogate(self, params: list[torch.nn.Parameter], lam: float, scale: float) -> torch.Tensor:
        """sum_p <p, (g_total + lambda g_side) x scale>, whose gradient is that combination: its backward
        hands the gradient to DeepSpeed (ZeRO's hooks, clipping and the finite-step guard see it)."""
        return sum((p * ((g_t + lam * g_s) * scale).to(p.dtype)).sum()
                   for p, g_t, g_s in zip(params, self.total, self.side))

    def loss(self, lam: float, scale: float) -> float:
        return (self.loss_total + lam * self.loss_side) * scale


class StreamedForwards:
    """The streamed forwards of one batch (and, under stream_backward, their gradients)."""

    def __init__(self, stream_backward: bool):
        self.stream_backward = stream_backward
        self.forwards: list[tuple[torch.Tensor, Any, int]] = []  # (batch rows, stats, width)
        self.gradients: StreamGradients | None = None

    def add(self, rows: torch.Tensor, stats, width: int) -> None:
        self.forwards.append((rows, stats, width))

    def backward(self, chunk: dict[str, Any], rows: torch.Tensor, stats, width: int, rule: BalanceRule,
                 config: Any, params: list[torch.nn.Parameter]) -> None:
        """stream_backward: the backward of one streamed micro-batch (``rows`` of ``chunk``, which carries
        its rows' advantages, group-local so those of the whole batch) into the two accumulators.
        GRPO (no side reweighted): one backward."""
        c = config
        mask, adv = chunk["response_mask"][rows, :width], chunk["advantages"][rows].float()
        delta = entropy_flow(stats.logp, stats.entropy, adv, c.entropy_flow_estimator, stats.expected_s)
        sides = rule.sides(delta, mask)
        base = torch.ones_like(mask)
        if c.tis_cap is not None:  # min(pi_learner / pi_engine, C), as token_weights has it
            ratio = torch.exp(stats.logp.detach() - chunk["sampling_logp"][rows, :width])
            base = torch.where(mask.bool(), ratio.clamp(max=float(c.tis_cap)), base)
        settings = loss_settings("pg", c)
        unit = {"num_tokens": 1.0, "num_seqs": 1.0, "norm_length": float(c.max_new_tokens)}

        def loss_of(weights):
            loss_mat, _ = policy_loss("pg", stats.logp, stats.logp.detach(), adv, mask, weights=weights,
                                      config=settings)
            return aggregate_loss(loss_mat, mask, c.loss_agg_mode, **unit)

        losses = [loss_of(base) + entropy_bonus(stats.entropy, mask, c.entropy_coef, c.loss_agg_mode, **unit)]
        if bool(sides.any()):
            losses.append(loss_of(base * sides))
        if self.gradients is None:
            self.gradients = StreamGradients.zeros(params)
        self.gradients.add(losses, params)

    def flow_stats(self, n: int, width: int, dp_world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log pi, H, S) [n, width - 1] of this learner's streamed rows (0 elsewhere), after checking
        that the learners' streamed chunks hold every row of the batch once."""
        covered = torch.zeros(n, dtype=torch.float64)
        for rows, _, _ in self.forwards:
            covered.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
        if dp_world > 1:  # each learner streamed its shares
            covered = all_reduce_sum(covered)
        if not bool((covered == 1).all()):
            raise RuntimeError(f"streaming: the streamed chunks hold {int(covered.sum())} rows, not the batch's "
                               f"{n} rows once each")
        logp = torch.zeros(n, width - 1)
        entropy, expected_s = torch.zeros_like(logp), torch.zeros_like(logp)
        for rows, stats, w in self.forwards:
            logp[rows, :w], entropy[rows, :w], expected_s[rows, :w] = (
                stats.logp.detach(), stats.entropy.detach(), stats.expected_s.detach())
        return logp, entropy, expected_s
