"""The training pass: per mini-batch, the backward of the weighted policy loss (plus the entropy
bonus and, ``kl_in: loss``, the KL penalty) micro-batch by micro-batch (aggregated with the global
token / sequence counts, so the gradient does not depend on the micro-batch size), then ONE
optimizer step. Strict on-policy: one mini-batch; approximate
on-policy (``num_updates_per_batch`` > 1) takes that many. A non-finite loss or gradient norm
skips the step (the finite-step guard, ``DeepSpeedTorchLearner.optimizer_step``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from opefo_rllib.algorithms.grpo.flow_pass import FlowPass, TrainingForwards
from opefo_rllib.algorithms.grpo.streaming import StreamGradients
from opefo_rllib.algorithms.grpo.token_weights import TokenWeights
from opefo_rllib.core.kl import kl_estimate
from opefo_rllib.core.policy_losses import aggregate_loss, entropy_bonus, loss_settings, policy_loss
from opefo_rllib.learner.data_parallel import all_reduce_sum, reduce_floats

__all__ = ["StepOutcome", "accumulate_gradients", "apply_streamed_gradients", "loss_counts", "mean_of",
           "run_training_pass"]


@dataclasses.dataclass
class StepOutcome:
    """The optimizer steps of one update: how many ran and were skipped, the summed loss, and the
    per-step and per-loss metrics."""

    applied: int
    skipped: int
    loss: float
    step_metrics: list[dict]


def loss_counts(mask: torch.Tensor, rows: torch.Tensor, max_new_tokens: int) -> dict[str, float]:
    """The aggregation denominators of a loss over ``rows`` (global: all of them, on every learner)."""
    return {"num_tokens": float(mask[rows].sum()), "num_seqs": float(len(rows)), "norm_length": float(max_new_tokens)}


def run_training_pass(learner, batch: dict[str, Any], flow: FlowPass, weights: TokenWeights, forwards: TrainingForwards,
                      entropy_coef: float, step: int) -> StepOutcome:
    """``num_updates_per_batch`` optimizer steps (mini-batches drawn with the step's seed); the
    flow pass's kept forwards serve the first mini-batch only."""
    c = learner.config
    n = batch["input_ids"].shape[0]
    gen = torch.Generator().manual_seed(int(c.seed or 0) * 1_000_003 + step)
    minibatches = list(torch.randperm(n, generator=gen).chunk(c.num_updates_per_batch)) \
        if c.num_updates_per_batch > 1 else [torch.arange(n)]
    step_metrics: list[dict] = []
    loss_total, applied = 0.0, 0
    for k, mb in enumerate(minibatches):
        loss, loss_metrics = learner.accumulate_gradients(batch, flow, weights, mb.sort().values, gen,
                                                          forwards if k == 0 else None, entropy_coef)
        loss_total += loss
        step_metrics += loss_metrics
        outcome = learner.optimizer_step(loss_finite=math.isfinite(loss))
        applied += not outcome["skipped"]
        step_metrics.append(outcome)
    return StepOutcome(applied, len(minibatches) - applied, loss_total, step_metrics)


def accumulate_gradients(learner, batch: dict[str, Any], flow: FlowPass, weights: TokenWeights, rows: torch.Tensor,
                         generator: torch.Generator, forwards: TrainingForwards | None,
                         entropy_coef: float) -> tuple[float, list[dict]]:
    """Backward of the weighted policy loss over ``rows``, micro-batch by micro-batch, with the
    counts of ``rows`` as the aggregation denominators; no optimizer step. ``forwards``: the flow
    pass's forwards to reuse (fused, or streamed: this learner's shares). Returns the summed loss
    and the losses' metrics."""
    c = learner.config
    streamed = forwards is not None and forwards.streamed
    if streamed and c.stream_backward:  # every backward ran during generation
        return apply_streamed_gradients(learner, batch, rows, forwards.gradients, weights.lam), []
    mask, adv = batch["response_mask"], batch["advantages"].float()
    settings = loss_settings(c.policy_loss, c)
    counts = loss_counts(mask, rows, c.max_new_tokens)
    kept = forwards.kept if forwards is not None else []
    if streamed or (kept and sum(len(k[0]) for k in kept) == len(rows)):
        # the flow pass's own forwards, plus filler micro-batches up to the most any learner kept,
        # so their backward collectives pair up
        plan = [(micro, False, (stats, w)) for micro, stats, w in kept]
        if learner.dp_world > 1:
            kept_per_learner = torch.zeros(learner.dp_world, dtype=torch.float64)
            kept_per_learner[learner.dp_rank] = len(plan)
            plan += [(rows[:1], True, None)] * (int(all_reduce_sum(kept_per_learner).max()) - len(plan))
    else:
        plan = [(micro, filler, None) for micro, filler in learner.planner.plan(batch, rows)]
    loss_total, loss_metrics, keys = 0.0, [], set()
    for micro, filler, forward in plan:
        if forward is not None:
            stats, w = forward
        else:
            learner.begin_training_forward()
            stats, w = learner._stats(batch, micro)
        m = mask[micro, :w]
        # flow.logp is log pi_old: the learner's weights before this update's first step. Only strict
        # on-policy are they the sampling weights; async tokens came from that version or an older one
        # (their log-probs are sampling_logp, which TIS compares against).
        loss_mat, lm = policy_loss(c.policy_loss, stats.logp, flow.logp[micro, :w], adv[micro], m,
                                   weights=weights.weights[micro, :w], config=settings, generator=generator)
        loss = aggregate_loss(loss_mat, m, c.loss_agg_mode, **counts)
        loss = loss + entropy_bonus(stats.entropy, m, entropy_coef, c.loss_agg_mode, **counts)
        if c.kl_coef > 0 and c.kl_in == "loss":  # kl_coef x aggregate(kl_t), its gradient through log pi
            kl = kl_estimate(c.kl_estimator, stats.logp, batch["ref_logp"][micro, :w])
            loss = loss + c.kl_coef * aggregate_loss(kl, m, c.loss_agg_mode, **counts)
        if filler:  # keeps this learner's collectives in step with the others; adds nothing
            loss = loss * 0.0
        # DeepSpeed averages gradients over learners; the loss is already a share of the
        # global sum (global counts), so x world makes the reduced gradient that sum's.
        learner.ds_engine.backward(loss * learner.dp_world, scale_wrt_gas=False)
        keys.update(lm)  # the same on every learner (fillers included), so the reduce below matches
        if not filler:
            loss_total += float(loss.detach())
            loss_metrics.append(lm)
    if learner.dp_world > 1:  # the global loss sum; the losses' metrics averaged over learners
        loss_total = reduce_floats([loss_total])[0]
        names = sorted(keys)
        loss_metrics = [dict(zip(names, reduce_floats([mean_of(loss_metrics, k) for k in names], mean=True)))]
    return loss_total, loss_metrics


def apply_streamed_gradients(learner, batch: dict[str, Any], rows: torch.Tensor, gradients: StreamGradients | None,
                             lam: float) -> float:
    """``stream_backward``: the update's gradient, (g_total + lambda g_side) x the aggregation's
    1 / count of the whole batch, handed to DeepSpeed through a surrogate's backward. Returns the loss."""
    params = learner.trainable_params()
    if gradients is None:  # a learner whose shares of the chunks were all empty: a zero gradient
        gradients = StreamGradients.zeros(params)
    counts = loss_counts(batch["response_mask"], rows, learner.config.max_new_tokens)
    count = counts["num_tokens"] if learner.config.loss_agg_mode == "token-mean" else counts["num_seqs"]
    scale = 1.0 / max(count, 1.0)
    learner.begin_training_forward()
    surrogate = gradients.surrogate(params, lam, scale)
    # DeepSpeed averages over learners; each holds its shares' sum, so x world makes the sum's.
    learner.ds_engine.backward(surrogate * learner.dp_world, scale_wrt_gas=False)
    return reduce_floats([gradients.loss(lam, scale)])[0]


def mean_of(dicts: list[dict], key: str) -> float:
    values = [d[key] for d in dicts if key in d]
    return sum(values) / len(values) if values else float("nan")
