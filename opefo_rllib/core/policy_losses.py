"""Policy losses of the GRPO family, registered by name, and loss aggregation.

Every loss maps per-token tensors [B, T] to a per-token loss matrix [B, T] plus metrics; the
optional per-token weights w_t (OPEFO's balancing weights) multiply that matrix, and
``aggregate_loss`` reduces it to a scalar. Notation: r_t = exp(log pi_t - log pi_old,t).

    "pg"        l_t = -w_t A_t log pi_t                   strict on-policy (docs/algorithm.md section 9.1)
    "ppo_clip"  l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
                (eps_high > eps_low is DAPO's clip-higher; optional dual clip at clip_ratio_c)
    "clip_cov"  ppo_clip, but floor(r * #tokens) tokens drawn at random among those with
                Cov_t = (log pi_t - mean log pi)(A_t - mean A) in [lb, ub] have their gradient
                detached                                  (Cui et al. 2025, arXiv 2505.22617)
    "kl_cov"    l_t = -A_t r_t, plus beta |log pi_t - log pi_old,t| on the top k * #tokens tokens
                by Cov_t                                  (same paper)

Defaults are those of Cui et al. (r = 2e-4, lb = 1, ub = 5; k = 2e-3, beta = 1); as in their
reference implementation at least one token is selected when the ratio is positive.

Add a loss by writing one function and registering it, with the settings dataclass it reads
(its fields become config fields):

    @register_policy_loss("my_loss", settings=MyLossSettings)
    def my_loss(logp, old_logp, advantages, mask, config, generator): ...  # -> (loss_mat, metrics)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import torch

__all__ = [
    "POLICY_LOSSES",
    "AGG_MODES",
    "PolicyLossConfig",
    "POLICY_LOSS_SETTINGS",
    "loss_settings",
    "register_policy_loss",
    "get_policy_loss",
    "policy_loss",
    "aggregate_loss",
    "entropy_bonus",
    "token_covariance",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _knob(default, doc: str, **checks):
    """A loss setting with its doc and bounds, read by the config (opefo_rllib.config.fields)."""
    return dataclasses.field(default=default, metadata={"doc": doc, **checks})


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Settings of the built-in clipped losses (each loss reads the ones it uses)."""

    eps_low: float = _knob(0.2, "PPO clip range below 1: ratio >= 1 - eps_low", low=0.0, high=1.0, high_open=True)
    eps_high: float = _knob(0.2, "PPO clip range above 1 (> eps_low is DAPO's clip-higher)", low=0.0)
    clip_ratio_c: float | None = _knob(None, "dual-clip bound for negative advantages (e.g. 3.0; None: off)",
                                       low=1.0, low_open=True)
    clip_cov_ratio: float = _knob(2e-4, "clip_cov: fraction of tokens whose gradient is detached", low=0.0, high=1.0)
    clip_cov_lb: float = _knob(1.0, "clip_cov: lower bound of the covariance window")
    clip_cov_ub: float = _knob(5.0, "clip_cov: upper bound of the covariance window")
    kl_cov_ratio: float = _knob(2e-3, "kl_cov: fraction of tokens (top covariance) that get the KL penalty",
                                low=0.0, high=1.0)
    kl_cov_coef: float = _knob(1.0, "kl_cov: coefficient beta of the |log pi - log pi_old| penalty", low=0.0)

    @staticmethod
    def cross_checks(c) -> Iterator[tuple[str, str]]:
        """Rules across fields: (field, why) for each broken one."""
        if c.clip_cov_lb > c.clip_cov_ub:
            yield "clip_cov_lb", f"must be <= clip_cov_ub ({c.clip_cov_ub})"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, lo, hi = getattr(self, f.name), f.metadata.get("low"), f.metadata.get("high")
            if value is not None and ((lo is not None and (value < lo or (f.metadata.get("low_open") and value == lo)))
                                      or (hi is not None and (value > hi or (f.metadata.get("high_open") and value == hi)))):
                raise ValueError(f"PolicyLossConfig.{f.name} = {value!r} is outside [{lo}, {hi}]")
        for name, why in self.cross_checks(self):
            raise ValueError(f"PolicyLossConfig.{name} = {getattr(self, name)!r}: {why}")


LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
POLICY_LOSSES: dict[str, LossFn] = {}
# The settings dataclass each loss reads (its fields become config fields; see loss_settings).
POLICY_LOSS_SETTINGS: dict[str, type] = {}


def register_policy_loss(name: str, settings: type | None = PolicyLossConfig) -> Callable[[LossFn], LossFn]:
    """Decorator: register ``fn(logp, old_logp, advantages, mask, config, generator)``.

    ``settings`` is the frozen dataclass passed as ``config``; declare its fields with
    ``dataclasses.field(default=..., metadata={"doc": "...", "low": ..., "high": ...})`` and
    they become config fields (YAML keys, ``opefo config``, validation) of every algorithm.
    """

    def deco(fn: LossFn) -> LossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        if settings is not None:
            POLICY_LOSS_SETTINGS[name] = settings
        return fn

    return deco


def loss_settings(name: str, values) -> object | None:
    """The settings instance of loss ``name``, its fields read from ``values`` (any object)."""
    cls = POLICY_LOSS_SETTINGS.get(name)
    if cls is None:
        return None
    return cls(**{f.name: getattr(values, f.name) for f in dataclasses.fields(cls)})


def get_policy_loss(name: str) -> LossFn:
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; registered: {sorted(POLICY_LOSSES)}") from None


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = mask.sum()
    return float((x * mask).sum() / n) if n > 0 else 0.0


@register_policy_loss("pg")
def pg_loss(logp, old_logp, advantages, mask, config, generator):
    """Strict on-policy policy gradient: l_t = -A_t log pi_t (the ratio is 1 and never clips)."""
    return -advantages * logp, {}


def _clipped_surrogate(logp, old_logp, advantages, mask, config):
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    loss = torch.maximum(unclipped, clipped)
    if config.clip_ratio_c is not None:
        # Dual clip: bound the loss of negative-advantage tokens whose ratio ran far above 1.
        dual = torch.minimum(loss, -advantages * config.clip_ratio_c)
        loss = torch.where(advantages < 0, dual, loss)
    m = mask.to(loss.dtype)
    metrics = {
        "clip_frac": _masked_mean((clipped > unclipped).to(loss.dtype), m),
        "ratio_mean": _masked_mean(ratio.detach(), m),
        "ratio_max": float(ratio.detach()[mask.bool()].max()) if mask.any() else 1.0,
        "ratio_min": float(ratio.detach()[mask.bool()].min()) if mask.any() else 1.0,
        "approx_kl": _masked_mean((-log_ratio).detach(), m),
    }
    return loss, ratio, metrics


@register_policy_loss("ppo_clip")
def ppo_clip_loss(logp, old_logp, advantages, mask, config, generator):
    loss, _, metrics = _clipped_surrogate(logp, old_logp, advantages, mask, config)
    return loss, metrics


def token_covariance(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cov_t = (log pi_t - mean log pi)(A_t - mean A), means over masked tokens; 0 elsewhere."""
    m = mask.bool()
    lp, adv = logp.detach(), advantages.detach().expand_as(logp)
    n = m.sum().clamp(min=1)
    lp_mean = torch.where(m, lp, torch.zeros_like(lp)).sum() / n
    adv_mean = torch.where(m, adv, torch.zeros_like(adv)).sum() / n
    return torch.where(m, (lp - lp_mean) * (adv - adv_mean), torch.zeros_like(lp))


def _selection_count(ratio: float, n_tokens: int) -> int:
    return max(1, math.floor(ratio * n_tokens)) if ratio > 0 and n_tokens > 0 else 0


@register_policy_loss("clip_cov")
def clip_cov_loss(logp, old_logp, advantages, mask, config, generator):
    loss, _, metrics = _clipped_surrogate(logp, old_logp, advantages, mask, config)
    cov = token_covariance(logp, advantages, mask)
    m = mask.bool()
    candidates = torch.nonzero((m & (cov >= config.clip_cov_lb) & (cov <= config.clip_cov_ub)).flatten()).squeeze(-1)
    k = min(_selection_count(config.clip_cov_ratio, int(m.sum())), candidates.numel())
    perm = torch.randperm(candidates.numel(), generator=generator)[:k].to(candidates.device)
    chosen = torch.zeros(loss.numel(), dtype=torch.bool, device=loss.device)
    chosen[candidates[perm]] = True
    chosen = chosen.view_as(loss)
    loss = torch.where(chosen, loss.detach(), loss)  # same value, no gradient
    metrics.update({"cov_selected": float(k), "cov_candidates": float(candidates.numel())})
    return loss, metrics


@register_policy_loss("kl_cov")
def kl_cov_loss(logp, old_logp, advantages, mask, config, generator):
    ratio = (logp - old_logp).exp()
    loss = -advantages * ratio
    cov = token_covariance(logp, advantages, mask)
    m = mask.bool()
    k = _selection_count(config.kl_cov_ratio, int(m.sum()))
    chosen = torch.zeros(loss.numel(), dtype=torch.bool, device=loss.device)
    if k:
        ranked = torch.where(m, cov, torch.full_like(cov, -math.inf)).flatten()
        chosen[torch.topk(ranked, k).indices] = True
    chosen = chosen.view_as(loss)
    penalty = config.kl_cov_coef * (logp - old_logp).abs()
    loss = torch.where(chosen, loss + penalty, loss)
    return loss, {"cov_selected": float(k), "ratio_mean": _masked_mean(ratio.detach(), mask.to(loss.dtype))}


def policy_loss(
    name: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    config: PolicyLossConfig | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token loss matrix [B, T] of a registered policy loss, times optional token weights.

    Args:
        name: registered loss ("pg", "ppo_clip", "clip_cov", "kl_cov", ...).
        logp: [B, T] current log pi of the sampled tokens (with gradient).
        old_logp: [B, T] log pi_old of the sampled tokens: the policy the ratio is taken against (the
            learner passes its weights before this update; None: logp.detach(), on-policy).
        advantages: [B, T] or [B] (broadcast over tokens).
        mask: [B, T] response-token mask.
        weights: [B, T] detached per-token weights (OPEFO), or None.
        config: PolicyLossConfig (defaults if None).
        generator: torch.Generator for the random choices of "clip_cov".
    """
    fn = get_policy_loss(name)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logp.dtype).expand_as(logp)
    old = logp.detach() if old_logp is None else old_logp.detach().to(logp.dtype)
    loss_mat, metrics = fn(logp, old, advantages, mask, config or PolicyLossConfig(), generator)
    if weights is not None:
        loss_mat = loss_mat * weights.detach().to(loss_mat.dtype)
    return loss_mat, metrics


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    "token-mean"               sum_{i,t} l / num_tokens
    "seq-mean-token-mean"      sum_i (sum_t l_i,t / |o_i|) / num_seqs
    "seq-mean-token-sum-norm"  sum_{i,t} l / (num_seqs * norm_length)        (Dr. GRPO)

    Pass ``num_tokens`` / ``num_seqs`` of the whole global batch when this call sees one
    micro-batch or shard: the sum of the per-shard results is then the whole-batch loss, and
    the gradient does not depend on the split. They default to this call's own counts.
    ``norm_length`` (a constant such as the max response length) defaults to T.
    """
    if loss_mat.shape != mask.shape:
        raise ValueError(f"loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} differ in shape")
    m = mask.to(loss_mat.dtype)
    masked = loss_mat * m
    if mode == "token-mean":
        denom = m.sum() if num_tokens is None else num_tokens
        return masked.sum() / torch.as_tensor(denom, dtype=loss_mat.dtype).clamp(min=1)
    seqs = m.shape[0] if num_seqs is None else num_seqs
    seqs = torch.as_tensor(seqs, dtype=loss_mat.dtype).clamp(min=1)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1)
        return per_seq.sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        length = loss_mat.shape[-1] if norm_length is None else norm_length
        return masked.sum() / (seqs * length)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {AGG_MODES}")


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    mode: str = "token-mean",
    **counts,
) -> torch.Tensor:
    """Entropy-regularisation term to add to the loss: -coef * aggregate(H_t) (0 when coef = 0)."""
    if coef == 0:
        return entropy.new_zeros(())
    return -coef * aggregate_loss(entropy, mask, mode, **counts)
