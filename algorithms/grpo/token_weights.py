"""Per-token weights of the loss: the balance rule's w_t = 1 + lambda c_t (1 under GRPO), times
the forking-token mask (``top_entropy_quantile``), times the truncated importance weights
min(pi_learner / pi_engine, C) (``tis_cap``, detached) and the off-policy mask."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from opefo_rllib.algorithms.grpo.flow_pass import FlowPass
from opefo_rllib.core.balance import BalanceRule, OptimizerAwareInputs
from opefo_rllib.core.entropy_flow import balance_weights

__all__ = ["TokenWeights", "token_weights", "high_entropy_tokens"]

# Stats of balance_weights logged as entropy_flow/<name>.
_FLOW_STATS = ("P", "N", "lambda", "lambda_star", "frac_increase", "frac_decrease", "w_mean", "w_min", "w_max")


@dataclasses.dataclass
class TokenWeights:
    """The weights [N, T] of one update, the lambda they balance with, and their metrics."""

    weights: torch.Tensor
    lam: float
    metrics: dict[str, float]


def token_weights(batch: dict[str, Any], flow: FlowPass, rule: BalanceRule, config: Any,
                  inputs: OptimizerAwareInputs | None = None) -> TokenWeights:
    """The token weights of ``batch`` under ``rule`` (``inputs``: optimizer_aware's gradients)."""
    c = config
    mask = batch["response_mask"]
    lam, rule_metrics = rule.choose_lambda(flow.totals, inputs)
    weights, bstats = balance_weights(flow.delta, mask, rule, totals=flow.totals, lam=lam)
    metrics = {f"entropy_flow/{key}": bstats[key] for key in _FLOW_STATS}
    metrics.update(rule_metrics)
    metrics["entropy_flow/balance_fraction"] = float(rule.fraction())
    metrics["entropy_flow/net"] = bstats["net_flow"]
    metrics["entropy_flow/weighted_net"] = bstats["weighted_net_flow"]
    metrics["entropy_flow/one_sided_batches"] = bstats["one_sided"]
    if c.top_entropy_quantile < 1.0:  # forking tokens only: the rest get weight 0
        keep = high_entropy_tokens(flow.entropy, mask, c.top_entropy_quantile)
        weights = weights * keep
        metrics["entropy_flow/high_entropy_frac"] = float((keep * mask).sum()) / max(float(mask.sum()), 1.0)
    metrics["rollout/tis_enabled"] = float(c.tis_cap is not None)
    if c.tis_cap is not None:
        n_tok = float(mask.sum())
        ratio = torch.exp(flow.logp - batch["sampling_logp"])
        tis = ratio.clamp(max=float(c.tis_cap))
        weights = weights * torch.where(mask.bool(), tis, torch.ones_like(tis))
        metrics["rollout/tis_weight_mean"] = float((tis * mask).sum()) / max(n_tok, 1.0)
        metrics["rollout/tis_clipped_frac"] = float((ratio > c.tis_cap)[mask.bool()].float().mean()) if n_tok else 0.0
        if c.offpolicy_mask != "none":  # tokens (or whole answers) far off the learner's policy: no gradient
            off = mask.bool() & ((ratio > c.tis_cap) | (ratio < 1.0 / c.tis_cap))
            if c.offpolicy_mask == "sequence":
                off = mask.bool() & off.any(dim=-1, keepdim=True)
            weights = weights * (~off).to(weights.dtype)
            metrics["rollout/offpolicy_masked_frac"] = float(off.sum()) / max(n_tok, 1.0)
    return TokenWeights(weights, lam, metrics)


def high_entropy_tokens(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """1.0 on the response tokens whose entropy H_t is in the top ``quantile`` of the batch's
    response tokens (ties at the threshold kept), 0.0 elsewhere (Wang et al. 2025, "forking" tokens)."""
    m = mask.bool()
    values = entropy[m]
    if values.numel() == 0:
        return torch.zeros_like(entropy)
    threshold = torch.quantile(values.float(), 1.0 - quantile)
    return ((entropy >= threshold) & m).to(entropy.dtype)
