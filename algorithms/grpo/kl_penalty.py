"""The KL penalty to the reference policy (``kl_coef`` > 0), as one step of the update.

``kl_to_reference`` runs the reference over the batch (no grad; several learners: each its
token-balanced shard, then summed), and returns the batch with ``ref_logp`` [N, T-1] for the loss
(``kl_in: loss``: the training pass adds kl_coef x aggregate(kl_t), core/kl.py), or, under
``kl_in: reward``, with each answer's reward less kl_coef x its summed KL and the group
advantages and entropy flow recomputed from them. The flow pass's log pi is the policy before
the step, so ``kl/mean`` and ``kl/max`` are the KL of the policy that is being updated.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from opefo_rllib.algorithms.grpo.flow_pass import FlowPass
from opefo_rllib.core.kl import kl_estimate, kl_stats
from opefo_rllib.learner.data_parallel import all_reduce_sum
from opefo_rllib.rollout.batch import batch_advantages

__all__ = ["KLStep", "kl_to_reference", "reference_logp"]


@dataclasses.dataclass
class KLStep:
    """The batch and flow the update goes on with, and the KL metrics."""

    batch: dict[str, Any]
    flow: FlowPass
    metrics: dict[str, float]


def reference_logp(learner, batch: dict[str, Any]) -> torch.Tensor:
    """log pi_ref of every target position of ``batch`` [N, T-1] (0 past each row's end)."""
    n, width = batch["input_ids"].shape
    out = torch.zeros(n, width - 1)
    for rows, _ in learner.planner.plan(batch, torch.arange(n), collective=False):  # no fillers: no collectives
        if not len(rows):
            continue
        w = int(batch["attention_mask"][rows].sum(-1).max())
        out[rows, :w - 1] = learner.reference.token_logp(batch["input_ids"][rows, :w],
                                                         batch["attention_mask"][rows, :w],
                                                         learner.config.temperature).float().cpu()
    return all_reduce_sum(out) if learner.dp_world > 1 else out


def kl_to_reference(learner, batch: dict[str, Any], flow: FlowPass) -> KLStep:
    c = learner.config
    t0 = time.perf_counter()
    ref = reference_logp(learner, batch)
    mask = batch["response_mask"]
    kl = kl_estimate(c.kl_estimator, flow.logp, ref)
    metrics = kl_stats(kl, mask)
    metrics["time/ref_logp_s"] = time.perf_counter() - t0
    batch = dict(batch, ref_logp=ref)
    if c.kl_in == "reward":
        seq_kl = (kl * mask).sum(-1)
        shaped = batch["rewards"] - c.kl_coef * seq_kl
        # masked answers stay out of the baseline, as in learner_batch (a collate-only batch has none)
        excluded = batch.get("verify_masked", torch.zeros(len(shaped), dtype=torch.bool))
        advantages = batch_advantages(shaped, batch["group_ids"], excluded, c.adv_estimator)
        batch["advantages"] = advantages
        flow = flow.with_advantages(advantages, mask, c.entropy_flow_estimator)
        metrics["kl/reward_penalty_mean"] = float((c.kl_coef * seq_kl).mean())
    return KLStep(batch, flow, metrics)
