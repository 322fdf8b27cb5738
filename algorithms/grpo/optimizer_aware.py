"""What balance_mode optimizer_aware needs of the learner (core/param_balance.py does the math):
the gradients of the unweighted loss, of the sign(delta)-weighted loss and of the mean entropy,
by ``torch.autograd.grad`` (no DeepSpeed side effects), micro-batch by micro-batch, summed over
the learners, and AdamW's step from its state whole (``adam_state``: ZeRO 0-2, fp32 or bf16).
Costs three more backward passes per micro-batch and five fp32 copies of the model (three
gradients, two moments)."""

from __future__ import annotations

from typing import Any

import torch

from opefo_rllib.algorithms.grpo.flow_pass import FlowPass
from opefo_rllib.algorithms.grpo.gradients import loss_counts
from opefo_rllib.core.balance import OptimizerAwareInputs
from opefo_rllib.core.param_balance import adamw_step
from opefo_rllib.core.policy_losses import aggregate_loss, loss_settings, policy_loss
from opefo_rllib.learner.data_parallel import all_reduce_sum_tensors

__all__ = ["optimizer_aware_inputs"]


def optimizer_aware_inputs(learner, batch: dict[str, Any], flow: FlowPass) -> OptimizerAwareInputs:
    """The gradients and AdamW step of ``batch`` on ``learner``, the same on every learner."""
    c = learner.config
    mask, adv = batch["response_mask"], batch["advantages"].float()
    params = learner.trainable_params()
    settings = loss_settings(c.policy_loss, c)
    counts = loss_counts(mask, torch.arange(len(mask)), c.max_new_tokens)
    sums = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in range(3)]  # g_total, g_diff, grad H
    sign = torch.sign(flow.delta) * mask
    for rows, _ in learner.planner.plan(batch, torch.arange(len(mask)), collective=False):
        stats, w = learner._stats(batch, rows)
        m = mask[rows, :w]
        losses = [aggregate_loss(policy_loss(c.policy_loss, stats.logp, flow.logp[rows, :w], adv[rows], m,
                                             weights=wt, config=settings)[0], m, c.loss_agg_mode, **counts)
                  for wt in (torch.ones_like(m), sign[rows, :w])]
        losses.append((stats.entropy * m).sum() / max(counts["num_tokens"], 1.0))
        for k, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, params, retain_graph=k < 2, allow_unused=True)
            for acc, g in zip(sums[k], grads):
                if g is not None:
                    acc += g.float()
    if learner.dp_world > 1:  # each learner summed its shard; the rows' counts are already global
        sums = [all_reduce_sum_tensors(grads) for grads in sums]
    values, states = learner.adam_state(params)
    step_fn = adamw_step(values, states, lr=learner._lr(), betas=tuple(c.adam_betas), eps=c.adam_eps,
                         weight_decay=c.weight_decay)
    return OptimizerAwareInputs(grad_entropy=sums[2], g_total=sums[0], g_diff=sums[1], step_fn=step_fn)
