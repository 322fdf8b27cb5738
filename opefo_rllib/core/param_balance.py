"""Optimizer-aware entropy balance: lambda from the parameter-space step the optimizer will take.

The per-token estimators (entropy_flow.py) predict each token's entropy change in logit space, as
if every token had its own logits. A real step moves shared parameters, and Adam rescales every
coordinate. This module predicts the change of the batch's mean entropy H (over response
tokens) along the update the optimizer actually takes, to first order in parameter space:

    dH(lambda) = grad_theta H . Dtheta( g(lambda) )

The OPEFO-weighted gradient is affine in lambda (w = 1 + lambda on S+, 1 - lambda on S-):

    g(lambda) = g_total + lambda g_diff,   g_total = grad sum_t l_t,   g_diff = grad sum_t sign(delta_t) l_t

Dtheta is the optimizer's own step for that gradient (``sgd_step`` or ``adamw_step``: the exact
AdamW update from its current moments, bias corrections and weight decay, so its nonlinearity in
g is kept), and ``optimizer_aware_lambda`` solves dH(lambda) = 0 for lambda in [-cap, cap] (a
scalar root: every evaluation is elementwise work, no extra backward). Gradient clipping, if it
engages, scales the step and not its direction: for AdamW it changes dH's zero hardly at all, for
SGD not at all.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

__all__ = ["sgd_step", "adamw_step", "predicted_change", "optimizer_aware_lambda"]

Tensors = Sequence[torch.Tensor]


def sgd_step(lr: float) -> Callable[[Tensors], list[torch.Tensor]]:
    """Dtheta = -lr g."""
    return lambda grads: [-lr * g for g in grads]


def adamw_step(params: Tensors, states: Sequence[dict | None], lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float = 0.0) -> Callable[[Tensors], list[torch.Tensor]]:
    """The exact step torch.optim.AdamW takes from its current state (``states[i]``: the param's
    ``exp_avg``, ``exp_avg_sq``, ``step``, or None before its first step) for gradients ``grads``."""
    b1, b2 = betas

    def step(grads: Tensors) -> list[torch.Tensor]:
        out = []
        for p, g, st in zip(params, grads, states):
            m = st["exp_avg"] if st else torch.zeros_like(p)
            v = st["exp_avg_sq"] if st else torch.zeros_like(p)
            t = float(st["step"]) + 1 if st else 1.0
            m1 = b1 * m + (1 - b1) * g
            v1 = b2 * v + (1 - b2) * g * g
            denom = (v1 / (1 - b2 ** t)).sqrt() + eps
            out.append(-lr * (m1 / (1 - b1 ** t)) / denom - lr * weight_decay * p.detach())
        return out

    return step


def predicted_change(grad_h: Tensors, step: Tensors) -> float:
    """First-order change of H along ``step``: sum over parameters of grad_h . step."""
    return float(sum((gh.double() * s.double()).sum() for gh, s in zip(grad_h, step)))


def optimizer_aware_lambda(grad_h: Tensors, g_total: Tensors, g_diff: Tensors,
                           step_fn: Callable[[Tensors], list[torch.Tensor]], cap: float = 0.95,
                           iters: int = 40) -> tuple[float, dict[str, float]]:
    """lambda in [-cap, cap] with grad_h . step_fn(g_total + lambda g_diff) = 0 (bisection on a
    sign change; without one, the end of the interval where |dH| is least). Returns lambda and
    the predicted changes at lambda = 0 (GRPO's step) and at the chosen lambda."""
    def f(lam: float) -> float:
        return predicted_change(grad_h, step_fn([a + lam * b for a, b in zip(g_total, g_diff)]))

    f0 = f(0.0)
    lo, hi = -cap, cap
    f_lo, f_hi = f(lo), f(hi)
    if f_lo == 0.0 or f_hi == 0.0 or math.copysign(1, f_lo) == math.copysign(1, f_hi):
        lam = lo if abs(f_lo) <= abs(f_hi) else hi
        if abs(f0) <= min(abs(f_lo), abs(f_hi)):
            lam = 0.0
    else:
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            f_mid = f(mid)
            if math.copysign(1, f_mid) == math.copysign(1, f_lo):
                lo, f_lo = mid, f_mid
            else:
                hi = mid
        lam = 0.5 * (lo + hi)
    return lam, {"predicted_change_grpo": f0, "predicted_change": f(lam)}
