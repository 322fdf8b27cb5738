"""KL to a reference policy: per-token estimators, registered by name, and where the penalty goes.

The sampled token y_t ~ pi, and r_t = log pi_ref(y_t) - log pi(y_t). Each estimator maps the two
log-probs [B, T] to a per-token estimate of KL(pi || pi_ref) at that position (Schulman 2020,
"Approximating KL divergence"):

    "k1"          -r_t = log pi - log pi_ref                   unbiased, high variance, can be < 0
    "k2"          r_t^2 / 2                                    biased, low variance, >= 0
    "k3"          exp(r_t) - r_t - 1                           unbiased, low variance, >= 0
    "low_var_kl"  k3 with r_t clamped to [-20, 20] and the estimate to [-10, 10]   (k3 made safe
                                                               against a token pi_ref finds impossible)

``kl_coef * aggregate(kl_t)`` is added to the loss (``kl_in: loss``, its gradient flows through
log pi), or ``kl_coef * sum_t kl_t`` (no gradient) is taken from each answer's reward before the
group advantages (``kl_in: reward``). docs/algorithm.md section 15 says how either meets OPEFO's
entropy balance.

Add an estimator by registering one function ``fn(logp, ref_logp) -> kl [B, T]``:

    @register_kl_estimator("my_kl")
    def my_kl(logp, ref_logp): ...
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["KL_ESTIMATORS", "KL_PLACES", "register_kl_estimator", "kl_estimate", "sequence_kl", "kl_stats"]

KLFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: dict[str, KLFn] = {}
KL_PLACES = ("loss", "reward")  # where kl_coef * KL goes: the loss, or each answer's reward


def register_kl_estimator(name: str) -> Callable[[KLFn], KLFn]:
    """Decorator: register ``fn(logp, ref_logp) -> per-token KL estimate`` under ``name``."""

    def deco(fn: KLFn) -> KLFn:
        if name in KL_ESTIMATORS:
            raise ValueError(f"KL estimator {name!r} is already registered")
        KL_ESTIMATORS[name] = fn
        return fn

    return deco


@register_kl_estimator("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@register_kl_estimator("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ref_logp - logp) ** 2


@register_kl_estimator("k3")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    r = ref_logp - logp
    return r.exp() - r - 1.0


@register_kl_estimator("low_var_kl")
def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    # exp(r) overflows where the reference gives the sampled token (almost) no mass: clamp r first,
    # then the estimate, so one such token cannot own the batch's gradient.
    r = (ref_logp - logp).clamp(-20.0, 20.0)
    return (r.exp() - r - 1.0).clamp(-10.0, 10.0)


def kl_estimate(name: str, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The per-token estimate [B, T] of estimator ``name``; differentiable in ``logp``."""
    try:
        fn = KL_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown KL estimator {name!r}; registered: {sorted(KL_ESTIMATORS)}") from None
    return fn(logp, ref_logp.detach())


def sequence_kl(name: str, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each answer's summed estimate over its response tokens [B] (no gradient): what ``kl_in:
    reward`` takes, times kl_coef, from the answer's reward."""
    with torch.no_grad():
        return (kl_estimate(name, logp, ref_logp) * mask).sum(-1)


def kl_stats(kl: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``kl/mean`` (per response token) and ``kl/max`` of a per-token estimate."""
    m = mask.to(torch.bool)
    values = kl.detach()[m]
    if values.numel() == 0:
        return {"kl/mean": 0.0, "kl/max": 0.0}
    return {"kl/mean": float(values.mean()), "kl/max": float(values.max())}
