"""Group-relative advantage estimators, registered by name.

A batch holds several responses per prompt; responses of one prompt share a group id. Each
estimator maps the outcome rewards r [N] and group ids [N] to one advantage per response:

    "grpo"     A_i = (r_i - mean_g r) / (std_g r + eps)     (unbiased sample std, as verl and TRL)
    "dr_grpo"  A_i =  r_i - mean_g r                        (Dr. GRPO, Liu et al. 2025: no std)
    "rloo"     A_i =  r_i - mean_{j != i in g} r_j = G/(G-1) (r_i - mean_g r)   (Ahmadian et al. 2024)

A group of size 1 (or whose rewards are all equal) gets A = 0.

Add an estimator by writing one function and registering it; one that needs knobs declares a
frozen settings dataclass (its fields become config fields) and receives it as ``settings=``:

    @register_adv_est("my_est")
    def my_est(rewards, group_index, num_groups, eps): ...

    @register_adv_est("my_tuned_est", settings=MyEstSettings)
    def my_tuned_est(rewards, group_index, num_groups, eps, settings): ...
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["ADV_ESTIMATORS", "ADV_EST_SETTINGS", "register_adv_est", "get_adv_est", "group_advantages"]

AdvEstimator = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]
ADV_ESTIMATORS: dict[str, AdvEstimator] = {}
ADV_EST_SETTINGS: dict[str, type] = {}  # estimator name -> its settings dataclass, if it has one


def register_adv_est(name: str, settings: type | None = None) -> Callable[[AdvEstimator], AdvEstimator]:
    """Decorator: register ``fn(rewards [N], group_index [N] in 0..G-1, num_groups, eps) -> [N]``
    (plus ``settings=`` an instance of ``settings`` when given)."""

    def deco(fn: AdvEstimator) -> AdvEstimator:
        if name in ADV_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADV_ESTIMATORS[name] = fn
        if settings is not None:
            ADV_EST_SETTINGS[name] = settings
        return fn

    return deco


def get_adv_est(name: str) -> AdvEstimator:
    try:
        return ADV_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {sorted(ADV_ESTIMATORS)}") from None


def _group_sum(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, index, x)


def _group_mean_count(rewards, index, num_groups):
    count = _group_sum(torch.ones_like(rewards), index, num_groups)
    mean = _group_sum(rewards, index, num_groups) / count
    return mean, count


@register_adv_est("grpo")
def grpo_advantage(rewards: torch.Tensor, index: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    mean, count = _group_mean_count(rewards, index, num_groups)
    centered = rewards - mean[index]
    var = _group_sum(centered * centered, index, num_groups) / (count - 1).clamp(min=1)
    return centered / (var.sqrt()[index] + eps)


@register_adv_est("dr_grpo")
def dr_grpo_advantage(rewards: torch.Tensor, index: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    mean, _ = _group_mean_count(rewards, index, num_groups)
    return rewards - mean[index]


@register_adv_est("rloo")
def rloo_advantage(rewards: torch.Tensor, index: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    mean, count = _group_mean_count(rewards, index, num_groups)
    g = count[index]
    scale = torch.where(g > 1, g / (g - 1).clamp(min=1), torch.zeros_like(g))
    return scale * (rewards - mean[index])


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence,
    estimator: str = "grpo",
    eps: float = 1e-6,
    settings: object | None = None,
) -> torch.Tensor:
    """One advantage per response from outcome rewards, normalised within prompt groups.

    Args:
        rewards: [N] rewards (float).
        group_ids: [N] ids of the prompt each response answers (ints, or any hashable values).
        estimator: a registered estimator name ("grpo", "dr_grpo", "rloo", ...).
        eps: added to the group std by "grpo".
        settings: the estimator's settings instance, for estimators registered with ``settings``.

    Returns:
        [N] float32 advantages (float64 if the rewards are float64).

    Example:
        >>> group_advantages([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], "dr_grpo")
        tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    fn = get_adv_est(estimator)
    r = torch.as_tensor(rewards)
    r = r.to(torch.float64 if r.dtype == torch.float64 else torch.float32)
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(r.shape)}")
    if torch.is_tensor(group_ids):
        if group_ids.shape != r.shape:
            raise ValueError(f"group_ids shape {tuple(group_ids.shape)} != rewards shape {tuple(r.shape)}")
        _, index = torch.unique(group_ids, return_inverse=True)
    else:
        ids = list(group_ids)
        if len(ids) != r.numel():
            raise ValueError(f"got {len(ids)} group ids for {r.numel()} rewards")
        lookup: dict = {}
        index = torch.tensor([lookup.setdefault(g, len(lookup)) for g in ids], dtype=torch.long)
    index = index.to(r.device)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf")
    if estimator in ADV_EST_SETTINGS:
        return fn(r, index, num_groups, eps, settings=settings or ADV_EST_SETTINGS[estimator]())
    return fn(r, index, num_groups, eps)
