"""OPEFO: entropy flow of a policy-gradient step, and the weights that balance it.

Entropy flow (docs/algorithm.md section 4). One policy-gradient step on the sampled token a_t with
advantage A_t changes the entropy of p(. | s_t), to first order in the step size, by delta_t:

    "paper"        delta_t = -A_t (1 - pi_t)^2 (log pi_t + H_t)
    "single_logit" delta_t = -A_t pi_t (1 - pi_t) (log pi_t + H_t)
    "exact"        delta_t = -A_t [ pi_t (log pi_t + H_t) - sum_b p_b^2 (log p_b + H_t) ]

("exact" is the first-order change under the tabular-softmax step z <- z + eta A (e_a - p).)

Balancing (docs/algorithm.md section 5). With S+ = {delta > 0}, S- = {delta < 0},
P = sum_{S+} delta and N = sum_{S-} |delta| over the batch's response tokens:

    lambda* = (N - P) / (N + P)           (0 when N + P = 0)
    w_t = 1 + lambda on S+,  1 - lambda on S-,  1 where delta_t = 0
    =>  sum_t w_t delta_t = (1 + lambda) P - (1 - lambda) N = 0   for lambda = lambda*

A one-sided batch (P = 0 < N or N = 0 < P, e.g. few tokens with a non-zero advantage) has
lambda* = +-1: balancing it would give one side weight 0 and stop learning. Nothing on the other
side can be traded against it, so the balancing modes apply lambda = 0 (w = 1, a GRPO step),
``lambda_star`` reports NaN and ``is_one_sided`` lets the caller count such batches.

The rules (``balance_mode``) are registered in balance.py: "two_sided" (OPEFO),
"increase_only", "decrease_only", "static", "none" (w = 1: GRPO), "closed_loop" (lambda = f lambda*,
its f from the realized entropy changes, |lambda| <= 0.95) and "optimizer_aware" (the learner passes
its gradients; here, without them, it falls back to lambda*). ``balance_weights`` takes a rule's
name or the rule object itself.
Guard rails (docs/algorithm.md section 6), off by default: ``balance_fraction`` f cancels only the
fraction f of the net flow (lambda = f lambda*), ``max_abs_lambda`` caps |lambda|.

P and N are batch-global: with several learners or micro-batches, reduce the totals of
``flow_totals`` across all of them first and pass them to ``balance_weights(totals=...)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from opefo_rllib.core.balance import (BALANCE_RULES, BalanceRule, BalanceSettings, get_balance_rule, is_one_sided,
                                      lambda_star)

__all__ = [
    "ESTIMATORS",
    "BALANCE_MODES",
    "FlowTotals",
    "entropy_flow",
    "balance_sides",
    "flow_totals",
    "balance_lambda",
    "balance_weights",
    "is_one_sided",
    "lambda_star",
    "flow_diagnostics",
]

ESTIMATORS = ("paper", "single_logit", "exact")
BALANCE_MODES = BALANCE_RULES  # the registered balance rules by name (balance.py; grows with register_balance_rule)


class FlowTotals(NamedTuple):
    """Sums over the masked tokens of a batch (0-d float64 tensors), reducible across shards."""

    P: torch.Tensor  # sum of delta over S+
    N: torch.Tensor  # sum of |delta| over S-
    n_increase: torch.Tensor  # |S+|
    n_decrease: torch.Tensor  # |S-|
    n_tokens: torch.Tensor  # number of masked tokens

    def as_tensor(self) -> torch.Tensor:
        """Stack into one [5] tensor, e.g. for a single all_reduce."""
        return torch.stack(list(self))

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "FlowTotals":
        return cls(*t.unbind(0))


def entropy_flow(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    estimator: str = "paper",
    expected_s: torch.Tensor | None = None,
) -> torch.Tensor:
    """First-order entropy change delta_t of a policy-gradient step on each token.

    Args:
        logp: [B, T] log pi(a_t | s_t) of the sampled tokens.
        entropy: [B, T] H_t of the policy at each state.
        advantages: [B, T], or [B] (one per response, broadcast over tokens).
        estimator: "paper", "single_logit" or "exact".
        expected_s: [B, T] sum_b p_b^2 (log p_b + H_t); required by "exact" (see token_stats).

    Returns:
        delta [B, T], detached (the weights built from it carry no gradient).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown entropy-flow estimator {estimator!r}; choose one of {ESTIMATORS}")
    logp, entropy = logp.detach(), entropy.detach()
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    adv = adv.to(logp.dtype)
    pi = logp.exp()
    surprise = logp + entropy  # log pi_t + H_t: > 0 when pi_t > e^{-H_t}
    if estimator == "paper":
        return -adv * (1 - pi) ** 2 * surprise
    if estimator == "single_logit":
        return -adv * pi * (1 - pi) * surprise
    if expected_s is None:
        raise ValueError('estimator "exact" needs expected_s (token_stats(...).expected_s)')
    return -adv * (pi * surprise - expected_s.detach())


def flow_totals(delta: torch.Tensor, mask: torch.Tensor) -> FlowTotals:
    """P, N, |S+|, |S-| and the token count over the masked tokens of delta [B, T]."""
    m = mask.to(torch.bool)
    d = torch.where(m, delta.detach().to(torch.float64), torch.zeros((), dtype=torch.float64, device=delta.device))
    pos, neg = d > 0, d < 0
    return FlowTotals(
        P=d.clamp(min=0).sum(),
        N=(-d).clamp(min=0).sum(),
        n_increase=pos.sum().to(torch.float64),
        n_decrease=neg.sum().to(torch.float64),
        n_tokens=m.sum().to(torch.float64),
    )


def balance_lambda(
    totals: FlowTotals,
    mode: str = "two_sided",
    static_lambda: float = 0.0,
    balance_fraction: float = 1.0,
    max_abs_lambda: float | None = None,
) -> float:
    """The lambda the rule ``mode`` (balance.py) applies with these settings: f * (N - P) / (N + P),
    or static_lambda, capped; 0 for a one-sided batch under the balancing modes."""
    return _rule(mode, static_lambda, balance_fraction, max_abs_lambda).choose_lambda(totals)[0]


def balance_sides(delta: torch.Tensor, mask: torch.Tensor, mode: str = "two_sided") -> torch.Tensor:
    """c_t of the balancing weights w_t = 1 + lambda c_t, [B, T] float32: +1 on an entropy-increasing
    token (delta > 0) and -1 on a decreasing one when ``mode`` reweights that side, 0 elsewhere
    (masked tokens, delta = 0, a side the mode leaves alone, mode "none"). The weighted gradient is
    affine in lambda: sum_t w_t grad l_t = sum_t grad l_t + lambda sum_t c_t grad l_t."""
    return get_balance_rule(mode)().sides(delta, mask)


def balance_weights(
    delta: torch.Tensor,
    mask: torch.Tensor,
    mode: str | BalanceRule = "two_sided",
    static_lambda: float = 0.0,
    balance_fraction: float = 1.0,
    max_abs_lambda: float | None = None,
    totals: FlowTotals | None = None,
    lam: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """OPEFO token weights that balance entropy-increasing and -decreasing flow.

    Args:
        delta: [B, T] entropy flow per token (``entropy_flow``).
        mask: [B, T] 1 for response tokens, 0 for prompt / padding.
        mode: a balance rule's name (``BALANCE_MODES``), or the rule itself (then the three
            settings below are the rule's own).
        static_lambda: lambda used by mode "static".
        balance_fraction: cancel this fraction of the net flow (1 = full balance, OPEFO).
        max_abs_lambda: optional cap on |lambda|.
        totals: batch-global FlowTotals (defaults to those of this delta and mask).
        lam: the lambda to apply (default: the rule's ``choose_lambda`` of the totals).

    Returns:
        (weights [B, T] detached, positive; 1 on masked-out tokens), and stats with
        P, N, net_flow (P - N), lambda, lambda_star (NaN if one-sided), one_sided (0 / 1),
        frac_increase, frac_decrease, weighted_net_flow,
        w_mean, w_min, w_max.
    """
    if delta.shape != mask.shape:
        raise ValueError(f"delta {tuple(delta.shape)} and mask {tuple(mask.shape)} must have the same shape")
    rule = mode if isinstance(mode, BalanceRule) else _rule(mode, static_lambda, balance_fraction, max_abs_lambda)
    if totals is None:
        totals = flow_totals(delta, mask)
    if lam is None:
        lam = rule.choose_lambda(totals)[0]
    up, down = rule.side_weights(lam)
    sides = rule.sides(delta, mask)  # w_t = 1 + lambda c_t, each side's value rounded once
    weights = torch.ones_like(sides)
    weights = torch.where(sides > 0, torch.full_like(weights, up), weights)
    weights = torch.where(sides < 0, torch.full_like(weights, down), weights)
    m = mask.to(torch.bool)

    n_tok = max(float(totals.n_tokens), 1.0)
    w_masked = weights[m]
    p, n = float(totals.P), float(totals.N)
    stats = {
        "P": p,
        "N": n,
        "net_flow": p - n,
        "lambda": lam,
        "lambda_star": lambda_star(totals),
        "one_sided": float(is_one_sided(totals)),
        "frac_increase": float(totals.n_increase) / n_tok,
        "frac_decrease": float(totals.n_decrease) / n_tok,
        "weighted_net_flow": up * p - down * n,
        "w_mean": float(w_masked.mean()) if w_masked.numel() else 1.0,
        "w_min": float(w_masked.min()) if w_masked.numel() else 1.0,
        "w_max": float(w_masked.max()) if w_masked.numel() else 1.0,
    }
    return weights, stats


def _rule(mode: str, static_lambda: float, balance_fraction: float, max_abs_lambda: float | None) -> BalanceRule:
    return get_balance_rule(mode)(BalanceSettings(static_lambda=static_lambda, balance_fraction=balance_fraction,
                                                  max_abs_lambda=max_abs_lambda))


def flow_diagnostics(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    expected_s: torch.Tensor | None = None,
) -> dict[str, float]:
    """The "understanding" metrics of docs/algorithm.md section 11 for one batch.

    Quadrant fractions of the masked tokens (A > 0 or A < 0, and pi_t above or below e^{-H_t}),
    and the predicted entropy change sum_t delta_t for every estimator that can be computed.
    """
    m = mask.to(torch.bool)
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    adv = adv.expand_as(logp)
    likely = (logp.detach() + entropy.detach()) > 0  # pi_t > e^{-H_t}
    n = max(int(m.sum()), 1)
    out = {
        "quadrant/pos_adv_likely": float((m & (adv > 0) & likely).sum()) / n,
        "quadrant/pos_adv_rare": float((m & (adv > 0) & ~likely).sum()) / n,
        "quadrant/neg_adv_likely": float((m & (adv < 0) & likely).sum()) / n,
        "quadrant/neg_adv_rare": float((m & (adv < 0) & ~likely).sum()) / n,
    }
    for est in ESTIMATORS:
        if est == "exact" and expected_s is None:
            continue
        delta = entropy_flow(logp, entropy, adv, est, expected_s)
        out[f"predicted_entropy_change/{est}"] = float(torch.where(m, delta, torch.zeros_like(delta)).sum())
    return out
