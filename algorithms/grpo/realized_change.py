"""The realized change of a batch's mean response-token entropy across one optimizer step: the
batch re-scored with the new weights (no grad), beside the first-order prediction (OPEFO balances
the predicted flow; this measures what the optimizer really did), and token by token how well each
estimator predicts it (``TokenChangeSums``). The learner scores it itself, or, async with fp32 HF
engines, hands the engines an ``EngineRescore`` request (the batch's change only, no token
correlations)."""

from __future__ import annotations

import math
from typing import Any

import torch

from opefo_rllib.algorithms.grpo.flow_pass import FlowPass
from opefo_rllib.core.entropy_flow import ESTIMATORS, entropy_flow
from opefo_rllib.learner.data_parallel import reduce_floats

__all__ = ["realized_change_metrics", "rescored_entropy", "engine_rescore_request", "rescored_on_engines",
           "TokenChangeSums"]


def realized_change_metrics(before: float, after: float, net_flow: float) -> dict[str, float]:
    """The logged realized change of a batch's mean response-token entropy across one step (``before``
    as sampled, ``after`` re-scored with the new weights), and its ratio to the net predicted flow."""
    change = after - before
    return {"entropy_flow/realized_change": change, "entropy_flow/entropy_after_step": after,
            "entropy_flow/realized_over_net_flow": change / net_flow if net_flow else float("nan")}


class TokenChangeSums:
    """Token by token, how well each estimator's delta_t predicts the realized change of H_t across
    the step (H_t re-scored minus H_t as sampled): the sums of a Pearson correlation per estimator,
    added micro-batch by micro-batch and reducible over learners in one collective.

    delta_t is a token's own first-order effect; the realized change at t is that of the whole
    batch's step, so a correlation near 0 says the local prediction does not carry to the state's
    entropy (on the toy: -0.03 per batch under the uncapped exact rule)."""

    def __init__(self, batch: dict[str, Any], flow: FlowPass):
        adv = batch["advantages"].float()
        self.deltas = {est: entropy_flow(flow.logp, flow.entropy, adv, est, flow.expected_s) for est in ESTIMATORS}
        self.before = flow.entropy
        # [n, sum y, sum y^2] then [sum x, sum x^2, sum xy] per estimator (float64 sums)
        self.sums = [0.0] * (3 + 3 * len(ESTIMATORS))

    def add(self, rows: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> None:
        w = after.shape[1]
        m = mask.bool()
        y = (after - self.before[rows, :w])[m].double()
        self.sums[0] += float(m.sum())
        self.sums[1] += float(y.sum())
        self.sums[2] += float((y * y).sum())
        for i, est in enumerate(ESTIMATORS):
            x = self.deltas[est][rows, :w][m].double()
            self.sums[3 + 3 * i] += float(x.sum())
            self.sums[4 + 3 * i] += float((x * x).sum())
            self.sums[5 + 3 * i] += float((x * y).sum())

    @staticmethod
    def correlations(sums: list[float]) -> dict[str, float]:
        """``entropy_flow/token_corr/EST`` from (reduced) sums; NaN when a side is constant."""
        n, sy, syy = sums[:3]
        out = {}
        for i, est in enumerate(ESTIMATORS):
            sx, sxx, sxy = sums[3 + 3 * i:6 + 3 * i]
            cov, vx, vy = n * sxy - sx * sy, n * sxx - sx * sx, n * syy - sy * sy
            ok = n >= 3 and vx > 0 and vy > 0
            out[f"entropy_flow/token_corr/{est}"] = cov / math.sqrt(vx * vy) if ok else float("nan")
        return out


def rescored_entropy(learner, batch: dict[str, Any], flow: FlowPass) -> dict[str, float]:
    """Re-score ``batch`` on ``learner`` (its current weights): the realized change metrics and,
    per estimator, the token-level correlation of the predicted and realized change."""
    mask = batch["response_mask"]
    after_sum = 0.0
    tokens = TokenChangeSums(batch, flow)
    with torch.no_grad():
        for rows, filler in learner.planner.plan(batch, torch.arange(len(mask)), collective=learner.zero3):
            stats, w = learner._stats(batch, rows)
            if not filler:
                after_sum += float((stats.entropy * mask[rows, :w]).sum())
                tokens.add(rows, stats.entropy.detach(), mask[rows, :w])
    after_sum, *sums = reduce_floats([after_sum, *tokens.sums])
    metrics = realized_change_metrics(flow.mean_entropy(mask), after_sum / max(float(mask.sum()), 1.0),
                                      float(flow.totals.P - flow.totals.N))
    return {**metrics, **TokenChangeSums.correlations(sums)}


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
