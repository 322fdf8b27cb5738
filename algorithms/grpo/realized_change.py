"""The realized change of a batch's mean response-token entropy across one optimizer step: the
batch re-scored with the new weights (no grad), beside the first-order prediction (OPEFO balances
the predicted flow; this measures what the optimizer really did). The learner scores it itself,
or, async with fp32 HF engines, hands the engines an ``EngineRescore`` request."""

from __future__ import annotations

from typing import Any

import torch

from opefo_rllib.algorithms.grpo.flow_pass import FlowPass
from opefo_rllib.learner.data_parallel import reduce_floats

__all__ = ["realized_change_metrics", "rescored_entropy", "engine_rescore_request", "rescored_on_engines"]


def realized_change_metrics(before: float, after: float, net_flow: float) -> dict[str, float]:
    """The logged realized change of a batch's mean response-token entropy across one step (``before``
    as sampled, ``after`` re-scored with the new weights), and its ratio to the net predicted flow."""
    change = after - before
    return {"entropy_flow/realized_change": change, "entropy_flow/entropy_after_step": after,
            "entropy_flow/realized_over_net_flow": change / net_flow if net_flow else float("nan")}


def rescored_entropy(learner, batch: dict[str, Any], flow: FlowPass) -> dict[str, float]:
    """Re-score ``batch`` on ``learner`` (its current weights): the realized change metrics."""
    mask = batch["response_mask"]
    after_sum = 0.0
    with torch.no_grad():
        for rows, filler in learner.planner.plan(batch, torch.arange(len(mask)), collective=learner.zero3):
            stats, w = learner._stats(batch, rows)
            if not filler:
                after_sum += float((stats.entropy * mask[rows, :w]).sum())
    after_sum = reduce_floats([after_sum])[0]
    return realized_change_metrics(flow.mean_entropy(mask), after_sum / max(float(mask.sum()), 1.0),
                                   float(flow.totals.P - flow.totals.N))


def rescored_on_engines(config: Any) -> bool:
    """async with fp32 HF engines and an fp32 learner: the engines re-score the batch after the
    step (``response_entropy``, the same weights and numbers as the learner's forward) while they
    would otherwise wait for the learner; not for closed_loop, which needs the number before the
    next update."""
    c = config
    return (c.pipeline == "async" and c.engine == "hf" and c.engine_dtype == "float32"
            and c.model_dtype == "float32" and c.balance_mode != "closed_loop")


def engine_rescore_request(batch: dict[str, Any], flow: FlowPass) -> dict[str, Any] | None:
    """What the engines need to measure this step's realized change, and what the learner knows
    of it: the answers in the loss as (prompt ids, response ids), their token count, the entropy
    before the step and the net predicted flow. None when some answer is only partly in the loss
    (the engines score whole answers): then the learner measures it."""
    mask, ids, plens = batch["response_mask"], batch["input_ids"], batch.get("prompt_lengths")
    if plens is None:
        return None
    sequences = []
    for i, k in enumerate(mask.sum(-1).long().tolist()):
        if k:
            p = int(plens[i])
            if float(mask[i, p - 1:p - 1 + k].sum()) != k:
                return None
            sequences.append((ids[i, :p].tolist(), ids[i, p:p + k].tolist()))
    return {"sequences": sequences, "tokens": int(mask.sum()), "before": flow.mean_entropy(mask),
            "net_flow": float(flow.totals.P - flow.totals.N)}
