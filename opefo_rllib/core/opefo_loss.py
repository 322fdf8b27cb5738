"""The OPEFO loss in one call: strict on-policy policy gradient with entropy-flow weights.

    L(theta) = -(1 / T) sum_{j,i,t} w_t A_{j,i} log pi_theta(a_t | s_t)      (docs/algorithm.md section 9.1)

with w_t from ``balance_weights`` (detached) and T the response tokens of the global batch.
With ``mode="none"`` every w_t is 1 and this is strict on-policy GRPO.

For micro-batched training, compute delta for the whole batch first, reduce ``flow_totals``,
and pass ``totals``, ``num_tokens`` (and ``num_seqs``) of the global batch to every call.
"""

from __future__ import annotations

import torch

from opefo_rllib.core.policy_losses import aggregate_loss, policy_loss
from opefo_rllib.core.entropy_flow import FlowTotals, balance_weights, entropy_flow

__all__ = ["opefo_loss"]


def opefo_loss(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    expected_s: torch.Tensor | None = None,
    estimator: str = "exact",
    mode: str = "two_sided",
    static_lambda: float = 0.0,
    balance_fraction: float = 1.0,
    max_abs_lambda: float | None = None,
    agg_mode: str = "token-mean",
    totals: FlowTotals | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_length: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """OPEFO loss for one (micro-)batch and the balancing stats.

    Args:
        logp, entropy, expected_s: [B, T] from ``token_stats`` (logp carries the gradient).
        advantages: [B] per response or [B, T] per token.
        mask: [B, T] response-token mask.
        estimator, mode, static_lambda, balance_fraction, max_abs_lambda: see ``balance_weights``.
        agg_mode, num_tokens, num_seqs, norm_length: see ``aggregate_loss``.
        totals: batch-global FlowTotals (default: this batch's).

    Returns:
        (scalar loss, stats of ``balance_weights``).
    """
    delta = entropy_flow(logp, entropy, advantages, estimator, expected_s)
    weights, stats = balance_weights(
        delta, mask, mode, static_lambda, balance_fraction, max_abs_lambda, totals=totals
    )
    loss_mat, _ = policy_loss("pg", logp, None, advantages, mask, weights=weights)
    loss = aggregate_loss(loss_mat, mask, agg_mode, num_tokens, num_seqs, norm_length)
    return loss, stats
