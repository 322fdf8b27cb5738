"""GRPOTorchLearner: the GRPO-family / OPEFO update on a DeepSpeed-wrapped causal LM.

``update_from_rollouts`` is one policy update, in named steps (each a method a subclass or a
later feature can extend):

1. ``check_on_policy``: every sample's weight version must equal the learner's (strict mode);
   otherwise samples older than ``max_staleness`` versions are left out (the async pipeline).
2. ``flow_pass`` (no grad, micro-batch by micro-batch): per-token log pi, H and S for the whole
   batch, the entropy flow delta_t and the batch-global totals P and N. OPEFO's weights need
   lambda* = (N - P) / (N + P) of the whole batch before any backward pass; this pass provides
   it (and the flow metrics every baseline logs too, and log pi_old for clipped losses). When the
   update is one micro-batch (``fuse_flow_pass``), this forward keeps its graph and is the
   training forward too. Under ``pipeline: streaming`` every micro-batch's forward already ran
   (``stream_forward``, one finished engine call at a time, graphs kept; with ``stream_backward``
   their gradients already accumulated): this step only reads them.
3. ``token_weights``: the balancing weights times the optional truncated-IS weights.
4. ``training_pass``: per mini-batch, ``accumulate_gradients`` (the registered policy loss times
   the weights, aggregated with the global token / sequence counts so the gradient does not
   depend on the micro-batch size, one backward per micro-batch), then ONE ``optimizer_step``.
   Strict on-policy: one mini-batch; approximate on-policy (``num_updates_per_batch`` > 1) takes
   that many mini-batch steps. A non-finite loss or gradient norm skips the step (finite-step
   guard, ``DeepSpeedTorchLearner.optimizer_step``) and keeps the weight version.
5. ``realized_change`` (``measure_realized_change``, on by default): re-score the batch after the
   step, the realized change of its mean entropy; ``closed_loop`` balancing feeds it back
   (``update_closed_loop``). Streaming defers it to ``measure_deferred_realized_change``, called
   while the next batch is generated (the weights are unchanged until then); async with fp32 HF
   engines hands it to the engines (``engine_rescore``; they score during the next update).
6. ``batch_metrics``: entropy, flow diagnostics and the engine-vs-learner log-prob gap.

With policy_loss "pg" and no TIS, steps 2-4 compute the gradient of ``opefo_loss`` on the batch
(tests/test_learner.py ties the two).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from opefo_rllib.algorithms.grpo.losses import aggregate_loss, entropy_bonus, loss_settings, policy_loss
from opefo_rllib.algorithms.opefo.entropy_flow import (
    FlowTotals,
    balance_sides,
    balance_weights,
    entropy_flow,
    flow_diagnostics,
    flow_totals,
    lambda_star,
)
from opefo_rllib.learner.data_parallel import (all_reduce_sum, all_reduce_sum_tensors, padded_plan, reduce_floats,
                                               token_balanced_shards)
from opefo_rllib.learner.deepspeed_learner import DeepSpeedTorchLearner

__all__ = ["GRPOTorchLearner", "StaleBatchError", "FlowPass", "pack_by_tokens", "high_entropy_tokens",
           "realized_change_metrics"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FlowPass:
    """The flow pass of one batch: no-grad per-token stats [N, T-1] as sampled, the entropy flow
    delta and its batch totals (P, N, ...)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    expected_s: torch.Tensor
    delta: torch.Tensor
    totals: FlowTotals

    def mean_entropy(self, mask: torch.Tensor) -> float:
        """The batch's mean response-token entropy (as sampled)."""
        return float((self.entropy * mask).sum()) / max(float(mask.sum()), 1.0)


_CLOSED_LOOP_MAX_LAMBDA = 0.95  # f > 1 may push |f lambda*| towards 1, where one side's weight vanishes

# Stats of balance_weights logged as entropy_flow/<name>.
_FLOW_STATS = ("P", "N", "lambda", "lambda_star", "frac_increase", "frac_decrease", "w_mean", "w_min", "w_max")


class StaleBatchError(RuntimeError):
    """A strict on-policy learner got samples from other weights than its own."""


class GRPOTorchLearner(DeepSpeedTorchLearner):
    _kept_forwards: list | tuple = ()  # [(rows, stats, width)] of the flow pass's graph-keeping forwards (fused or
    # streamed), for the backward that follows
    _streamed: list | None = None  # streaming: the forwards of the chunks received so far
    _stream_grads: dict | None = None  # stream_backward: the two gradient accumulators and their losses
    _balance_lambda: float = 0.0  # the lambda of the update in progress (stream_backward combines with it)
    _streaming_update: bool = False  # the update in progress had its forwards streamed
    _deferred_realized: tuple | None = None  # streaming: (batch, flow) of the last step, not re-scored yet
    weight_version: int = 0
    nonfinite_steps: int = 0  # optimizer steps skipped by the finite-step guard, in all
    nonfinite_in_a_row: int = 0  # batches in a row whose every step was skipped
    closed_loop_fraction: float = 1.0  # f of balance_mode closed_loop (lambda = f lambda*)
    entropy_target: float | None = None  # closed_loop's / adaptive_entropy's target (config, or the first batch's)
    adaptive_entropy_coef: float | None = None  # adaptive_entropy's current coefficient

    def check_on_policy(self, batch: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, float]]:
        """Strict on-policy: refuse a batch sampled under other weights than the learner's.
        Otherwise (approximate on-policy, the async pipeline): measure each sample's staleness
        (learner version - sample version) and leave samples older than ``max_staleness`` out of
        the loss (their response mask 0). Returns the batch to train on and the staleness metrics."""
        versions = batch["weight_versions"]
        if self.config.strict_on_policy:
            if bool((versions != self.weight_version).any()):
                raise StaleBatchError(f"strict on-policy: batch at step {step} holds weight versions "
                                      f"{sorted(set(versions.tolist()))}, the learner is at version "
                                      f"{self.weight_version}")
            return batch, {"rollout/staleness_mean": 0.0, "rollout/staleness_max": 0.0, "rollout/dropped_stale": 0.0}
        staleness = (self.weight_version - versions).float()
        stale = staleness > self.config.max_staleness
        if bool(stale.any()):
            batch = dict(batch, response_mask=batch["response_mask"] * (~stale).float()[:, None])
        return batch, {"rollout/staleness_mean": float(staleness.mean()), "rollout/staleness_max": float(staleness.max()),
                       "rollout/dropped_stale": float(stale.sum())}

    def _micro_batches(self, rows: torch.Tensor, lengths: torch.Tensor | None = None):
        """Split ``rows`` into micro-batches: ``micro_batch_size`` rows each, or, with
        ``max_tokens_per_micro_batch``, rows sorted by length and packed so that rows x longest
        row stays within the budget (a longer row goes alone). Each micro-batch is then cut to
        its own longest row (``_stats``), so a few long answers no longer pad the whole batch."""
        c = self.config
        budget = getattr(c, "max_tokens_per_micro_batch", None)
        if budget is None or lengths is None:
            size = c.micro_batch_size or len(rows)
            for i in range(0, len(rows), size):
                yield rows[i:i + size]
            return
        yield from pack_by_tokens(rows, lengths[rows], int(budget), c.micro_batch_size)

    @property
    def _zero3(self) -> bool:
        return int(self.config.zero_stage) == 3

    def _plan(self, batch: dict, rows: torch.Tensor, collective: bool = True):
        """This learner's micro-batches of ``rows`` as ``(rows, is_filler)``: with several
        learners, its token-balanced shard, padded with zero-weight filler micro-batches to the
        longest plan of any learner when the pass runs collectives (every backward; forwards under
        ZeRO-3). One learner: all of ``rows``, no filler."""
        lengths = batch["attention_mask"].sum(-1)
        if self.dp_world == 1:
            for micro in self._micro_batches(rows, lengths):
                yield micro, False
            return
        shards = token_balanced_shards(rows, lengths, self.dp_world)
        if not collective:
            for micro in self._micro_batches(shards[self.dp_rank], lengths):
                yield micro, False
            return
        yield from padded_plan(shards, self.dp_rank, lambda r: self._micro_batches(r, lengths), rows[:1])

    def _stats(self, batch: dict, rows: torch.Tensor):
        module = self._module[DEFAULT_MODULE_ID]
        ids, attn = batch["input_ids"][rows], batch["attention_mask"][rows]
        width = int(attn.sum(-1).max())  # drop all-padding columns of this micro-batch
        prompt_lengths = batch["prompt_lengths"][rows] if "prompt_lengths" in batch else None  # shared prompts
        stats = module.sequence_token_stats(ids[:, :width], attn[:, :width], self.config.temperature,
                                            use_full_logits=self._zero3, prompt_lengths=prompt_lengths)
        return stats, width - 1

    def _fusable(self, batch: dict[str, Any]) -> bool:
        """One learner, one optimizer step, one micro-batch: the flow pass's forward can be the
        training forward (``fuse_flow_pass``)."""
        c = self.config
        if not c.fuse_flow_pass or self.dp_world > 1 or c.num_updates_per_batch > 1:
            return False
        n = batch["input_ids"].shape[0]
        return len(list(self._micro_batches(torch.arange(n), batch["attention_mask"].sum(-1)))) == 1

    def stream_forward(self, chunk: dict[str, Any], first_row: int) -> None:
        """``pipeline: streaming``: the training forward (with gradients) of a finished chunk of the
        batch being generated: collated rows ``first_row``, ... of that batch (several learners:
        each its token-balanced share). The graphs are kept; the update that follows
        (``update_from_rollouts`` on the whole batch) takes its flow-pass stats from them and runs
        one backward per kept micro-batch, with lambda from the whole batch. ``stream_backward``:
        the backward runs now instead, into two accumulators (``_stream_backward``)."""
        self.ds_engine.train()
        if self._streamed is None:
            self._streamed = []
        lengths = chunk["attention_mask"].sum(-1)
        mine = torch.arange(chunk["input_ids"].shape[0])
        if self.dp_world > 1:  # several learners: this one's token-balanced share of the chunk
            mine = token_balanced_shards(mine, lengths, self.dp_world)[self.dp_rank]
        with torch.enable_grad():
            for rows in (self._micro_batches(mine, lengths) if len(mine) else ()):
                self.begin_training_forward()
                stats, w = self._stats(chunk, rows)
                if self.config.stream_backward:  # the backward now; keep the numbers, not the graph
                    self._stream_backward(chunk, rows, stats, w)
                    stats = type(stats)(*(t.detach() for t in stats))
                self._streamed.append((rows + first_row, stats, w))

    def _trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self._module[DEFAULT_MODULE_ID].lm.parameters() if p.requires_grad]

    def _stream_backward(self, chunk: dict[str, Any], rows: torch.Tensor, stats, w: int) -> None:
        """``stream_backward``: the backward of one streamed micro-batch into two accumulators,
        g_total = sum_t grad l_t and g_side = sum_t c_t grad l_t (c_t = ``balance_sides``, so that
        the weighted gradient is g_total + lambda g_side), each loss aggregated with unit counts
        (the whole batch's counts scale both once it is in). ``chunk`` carries its rows' advantages
        (group-local: those of the whole batch) and response mask. GRPO (no side): one backward."""
        c = self.config
        mask, adv = chunk["response_mask"][rows, :w], chunk["advantages"][rows].float()
        delta = entropy_flow(stats.logp, stats.entropy, adv, c.entropy_flow_estimator, stats.expected_s)
        sides = balance_sides(delta, mask, c.balance_mode)
        base = torch.ones_like(mask)
        if c.tis_cap is not None:  # min(pi_learner / pi_engine, C), as token_weights has it
            ratio = torch.exp(stats.logp.detach() - chunk["sampling_logp"][rows, :w])
            base = torch.where(mask.bool(), ratio.clamp(max=float(c.tis_cap)), base)
        settings = loss_settings("pg", c)
        unit = {"num_tokens": 1.0, "num_seqs": 1.0, "norm_length": float(c.max_new_tokens)}

        def loss_of(weights):
            loss_mat, _ = policy_loss("pg", stats.logp, stats.logp.detach(), adv, mask, weights=weights, config=settings)
            return aggregate_loss(loss_mat, mask, c.loss_agg_mode, **unit)

        losses = [loss_of(base) + entropy_bonus(stats.entropy, mask, c.entropy_coef, c.loss_agg_mode, **unit)]
        if bool(sides.any()):
            losses.append(loss_of(base * sides))
        params = self._trainable_params()
        if self._stream_grads is None:
            self._stream_grads = _zero_accumulators(params)
        acc = self._stream_grads
        for k, (name, loss) in enumerate(zip(("total", "side"), losses)):
            grads = torch.autograd.grad(loss, params, retain_graph=k + 1 < len(losses), allow_unused=True)
            for buffer, g in zip(acc[name], grads):
                if g is not None:
                    buffer += g.float()
            acc[f"loss_{name}"] += float(loss.detach())

    def _apply_streamed_gradients(self, batch: dict[str, Any], rows: torch.Tensor) -> float:
        """``stream_backward``: the update's gradient, (g_total + lambda g_side) x the aggregation's
        1 / count of the whole batch, handed to DeepSpeed through the backward of sum_p <p, g_p>
        (whose gradient is g: ZeRO's gradient hooks, clipping and the finite-step guard see it as
        any backward). Returns the loss."""
        acc, self._stream_grads = self._stream_grads, None
        params = self._trainable_params()
        if acc is None:  # a learner whose shares of the chunks were all empty: a zero gradient
            acc = _zero_accumulators(params)
        counts = self._loss_counts(batch["response_mask"], rows)
        count = counts["num_tokens"] if self.config.loss_agg_mode == "token-mean" else counts["num_seqs"]
        scale, lam = 1.0 / max(count, 1.0), self._balance_lambda
        self.begin_training_forward()
        surrogate = sum((p * ((g_t + lam * g_s) * scale).to(p.dtype)).sum()
                        for p, g_t, g_s in zip(params, acc["total"], acc["side"]))
        # DeepSpeed averages over learners; each holds its shares' sum, so x world makes the sum's.
        self.ds_engine.backward(surrogate * self.dp_world, scale_wrt_gas=False)
        return reduce_floats([(acc["loss_total"] + lam * acc["loss_side"]) * scale])[0]

    def flow_pass(self, batch: dict[str, Any]) -> "FlowPass":
        """Stats of the whole batch as sampled (no grad), its entropy flow and its totals P, N.

        Fused (``_fusable``): the one forward runs with gradients and its graph is kept for
        ``accumulate_gradients``, which then skips its own forward of the same rows. Streamed
        (``stream_forward``): every row's forward has run already; its stats are used as they are."""
        c = self.config
        n, width = batch["input_ids"].shape
        logp = torch.zeros(n, width - 1)
        entropy, expected_s = torch.zeros_like(logp), torch.zeros_like(logp)
        self._kept_forwards = []
        streamed, self._streamed = self._streamed, None
        self._streaming_update = streamed is not None  # on every learner, even one whose share was empty
        if streamed is not None:
            covered = torch.zeros(n, dtype=torch.float64)
            for rows, _, _ in streamed:
                covered.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
            if self.dp_world > 1:  # each learner streamed its shares
                covered = all_reduce_sum(covered)
            if not bool((covered == 1).all()):
                raise RuntimeError(f"streaming: the streamed chunks hold {int(covered.sum())} rows, not the batch's "
                                   f"{n} rows once each")
            for rows, stats, w in streamed:
                logp[rows, :w], entropy[rows, :w], expected_s[rows, :w] = (
                    stats.logp.detach(), stats.entropy.detach(), stats.expected_s.detach())
            # stream_backward: the gradients are in the accumulators already, the graphs gone
            self._kept_forwards = [] if self.config.stream_backward else streamed
        else:
            fused = self._fusable(batch)
            with torch.set_grad_enabled(fused):
                for rows, filler in self._plan(batch, torch.arange(n), collective=self._zero3):
                    if fused:
                        self.begin_training_forward()
                    stats, w = self._stats(batch, rows)
                    if fused:
                        self._kept_forwards = [(rows, stats, w)]
                    if not filler:
                        logp[rows, :w], entropy[rows, :w], expected_s[rows, :w] = (
                            stats.logp.detach(), stats.entropy.detach(), stats.expected_s.detach())
        if self.dp_world > 1:  # each rank filled its rows: the sum is the whole batch, on every rank
            logp, entropy, expected_s = all_reduce_sum(torch.stack([logp, entropy, expected_s])).unbind(0)
        delta = entropy_flow(logp, entropy, batch["advantages"].float(), c.entropy_flow_estimator, expected_s)
        return FlowPass(logp, entropy, expected_s, delta, flow_totals(delta, batch["response_mask"]))

    def token_weights(self, batch: dict[str, Any], flow: "FlowPass") -> tuple[torch.Tensor, dict[str, float]]:
        """Per-token weights [N, T]: the balancing weights (1 under GRPO) times, when ``tis_cap``
        is set, the truncated importance weights min(pi_learner / pi_engine, C) (detached)."""
        c = self.config
        mask = batch["response_mask"]
        fraction, cap = c.balance_fraction, c.max_abs_lambda
        if c.balance_mode == "closed_loop":  # lambda = f lambda*, f from the realized changes so far
            fraction = self.closed_loop_fraction
            cap = min(cap, _CLOSED_LOOP_MAX_LAMBDA) if cap is not None else _CLOSED_LOOP_MAX_LAMBDA
        mode, static, aware = c.balance_mode, c.static_lambda, {}
        if mode == "optimizer_aware" and not math.isnan(lambda_star(flow.totals)):
            static, aware = self.optimizer_aware_lambda(batch, flow, cap if cap is not None else 0.95)
            mode = "static"
        weights, bstats = balance_weights(flow.delta, mask, mode, static, fraction, cap, totals=flow.totals)
        metrics = {f"entropy_flow/{key}": bstats[key] for key in _FLOW_STATS}
        metrics.update(aware)
        metrics["entropy_flow/balance_fraction"] = float(fraction)
        metrics["entropy_flow/net"] = bstats["net_flow"]
        metrics["entropy_flow/weighted_net"] = bstats["weighted_net_flow"]
        metrics["entropy_flow/one_sided_batches"] = bstats["one_sided"]
        if c.top_entropy_quantile < 1.0:  # forking tokens only: the rest get weight 0
            keep = high_entropy_tokens(flow.entropy, mask, c.top_entropy_quantile)
            weights = weights * keep
            metrics["entropy_flow/high_entropy_frac"] = float((keep * mask).sum()) / max(float(mask.sum()), 1.0)
        metrics["rollout/tis_enabled"] = float(c.tis_cap is not None)
        if c.tis_cap is not None:
            n_tok = float(mask.sum())
            ratio = torch.exp(flow.logp - batch["sampling_logp"])
            tis = ratio.clamp(max=float(c.tis_cap))
            weights = weights * torch.where(mask.bool(), tis, torch.ones_like(tis))
            metrics["rollout/tis_weight_mean"] = float((tis * mask).sum()) / max(n_tok, 1.0)
            metrics["rollout/tis_clipped_frac"] = float((ratio > c.tis_cap)[mask.bool()].float().mean()) if n_tok else 0.0
            if c.offpolicy_mask != "none":  # tokens (or whole answers) far off the learner's policy: no gradient
                off = mask.bool() & ((ratio > c.tis_cap) | (ratio < 1.0 / c.tis_cap))
                if c.offpolicy_mask == "sequence":
                    off = mask.bool() & off.any(dim=-1, keepdim=True)
                weights = weights * (~off).to(weights.dtype)
                metrics["rollout/offpolicy_masked_frac"] = float(off.sum()) / max(n_tok, 1.0)
        return weights, metrics

    def optimizer_aware_lambda(self, batch: dict[str, Any], flow: "FlowPass", cap: float) -> tuple[float, dict]:
        """lambda whose weighted gradient's AdamW step leaves the batch's mean entropy unchanged to
        first order in parameter space (param_balance.py): the gradients of the unweighted loss, of
        the sign(delta)-weighted loss and of the mean entropy, by ``torch.autograd.grad`` (no
        DeepSpeed side effects), micro-batch by micro-batch, summed over the learners; AdamW's
        state whole (``adam_state``: ZeRO 0-2, fp32 or bf16); then a scalar root over lambda,
        the same on every learner. Costs three more backward passes per micro-batch and five
        fp32 copies of the model (three gradients, two moments)."""
        from opefo_rllib.algorithms.opefo.param_balance import adamw_step, optimizer_aware_lambda

        c = self.config
        mask, adv = batch["response_mask"], batch["advantages"].float()
        params = self._trainable_params()
        settings = loss_settings(c.policy_loss, c)
        counts = self._loss_counts(mask, torch.arange(len(mask)))
        sums = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in range(3)]  # g_total, g_diff, grad H
        sign = torch.sign(flow.delta) * mask
        for rows, _ in self._plan(batch, torch.arange(len(mask)), collective=False):
            stats, w = self._stats(batch, rows)
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
        if self.dp_world > 1:  # each learner summed its shard; the rows' counts are already global
            sums = [all_reduce_sum_tensors(grads) for grads in sums]
        values, states = self.adam_state(params)
        step_fn = adamw_step(values, states, lr=self._lr(), betas=tuple(c.adam_betas), eps=c.adam_eps,
                             weight_decay=c.weight_decay)
        lam, info = optimizer_aware_lambda(sums[2], sums[0], sums[1], step_fn, cap=cap)
        return lam, {"entropy_flow/lambda_optimizer_aware": lam,
                     "entropy_flow/predicted_param_change": info["predicted_change"],
                     "entropy_flow/predicted_param_change_grpo": info["predicted_change_grpo"]}

    def _loss_counts(self, mask: torch.Tensor, rows: torch.Tensor) -> dict[str, float]:
        """The aggregation denominators of a loss over ``rows`` (global: all of them, on every learner)."""
        return {"num_tokens": float(mask[rows].sum()), "num_seqs": float(len(rows)),
                "norm_length": float(self.config.max_new_tokens)}

    def accumulate_gradients(self, batch: dict[str, Any], flow: "FlowPass", weights: torch.Tensor,
                             rows: torch.Tensor, generator: torch.Generator) -> tuple[float, list[dict]]:
        """Backward of the weighted policy loss over ``rows``, micro-batch by micro-batch, with the
        counts of ``rows`` as the aggregation denominators; no optimizer step. Returns the summed
        loss and the losses' metrics."""
        if self._streaming_update and self.config.stream_backward:  # every backward ran during generation
            return self._apply_streamed_gradients(batch, rows), []
        c = self.config
        mask, adv = batch["response_mask"], batch["advantages"].float()
        settings = loss_settings(c.policy_loss, c)
        counts = self._loss_counts(mask, rows)
        loss_total, loss_metrics, keys = 0.0, [], set()
        kept, self._kept_forwards = self._kept_forwards, []
        if self._streaming_update or (kept and sum(len(k[0]) for k in kept) == len(rows)):
            # the flow pass's own forwards (fused, or streamed: this learner's shares), plus filler
            # micro-batches up to the most any learner kept, so their backward collectives pair up
            plan = [(micro, False, (stats, w)) for micro, stats, w in kept]
            if self.dp_world > 1:
                kept_per_learner = torch.zeros(self.dp_world, dtype=torch.float64)
                kept_per_learner[self.dp_rank] = len(plan)
                plan += [(rows[:1], True, None)] * (int(all_reduce_sum(kept_per_learner).max()) - len(plan))
        else:
            plan = [(micro, filler, None) for micro, filler in self._plan(batch, rows)]
        for micro, filler, forward in plan:
            if forward is not None:
                stats, w = forward
            else:
                self.begin_training_forward()
                stats, w = self._stats(batch, micro)
            m = mask[micro, :w]
            # flow.logp is log pi_old: the policy that sampled (equal to the current one before the first step).
            loss_mat, lm = policy_loss(c.policy_loss, stats.logp, flow.logp[micro, :w], adv[micro], m,
                                       weights=weights[micro, :w], config=settings, generator=generator)
            loss = aggregate_loss(loss_mat, m, c.loss_agg_mode, **counts)
            loss = loss + entropy_bonus(stats.entropy, m, self.current_entropy_coef(), c.loss_agg_mode, **counts)
            if filler:  # keeps this learner's collectives in step with the others; adds nothing
                loss = loss * 0.0
            # DeepSpeed averages gradients over learners; the loss is already a share of the
            # global sum (global counts), so x world makes the reduced gradient that sum's.
            self.ds_engine.backward(loss * self.dp_world, scale_wrt_gas=False)
            keys.update(lm)  # the same on every learner (fillers included), so the reduce below matches
            if not filler:
                loss_total += float(loss.detach())
                loss_metrics.append(lm)
        if self.dp_world > 1:  # the global loss sum; the losses' metrics averaged over learners
            loss_total = reduce_floats([loss_total])[0]
            names = sorted(keys)
            loss_metrics = [dict(zip(names, reduce_floats([_mean(loss_metrics, k) for k in names], mean=True)))]
        return loss_total, loss_metrics

    def training_pass(self, batch: dict[str, Any], flow: "FlowPass", weights: torch.Tensor,
                      step: int) -> dict[str, float]:
        """``num_updates_per_batch`` optimizer steps (1 = strict on-policy), then version + 1.

        A step whose loss or gradient norm is not finite is skipped by ``optimizer_step`` (the
        finite-step guard); if every step of the batch was skipped, the weights and so the weight
        version stay as they were, and ``learner/nonfinite_in_a_row`` grows."""
        c = self.config
        n = batch["input_ids"].shape[0]
        gen = torch.Generator().manual_seed(int(c.seed or 0) * 1_000_003 + step)
        minibatches = list(torch.randperm(n, generator=gen).chunk(c.num_updates_per_batch)) \
            if c.num_updates_per_batch > 1 else [torch.arange(n)]
        step_metrics: list[dict] = []
        loss_total, applied = 0.0, 0
        for mb in minibatches:
            loss, loss_metrics = self.accumulate_gradients(batch, flow, weights, mb.sort().values, gen)
            loss_total += loss
            step_metrics += loss_metrics
            outcome = self.optimizer_step(loss_finite=math.isfinite(loss))
            applied += not outcome["skipped"]
            step_metrics.append(outcome)
        skipped = len(minibatches) - applied
        self.nonfinite_steps += skipped
        if applied:
            self.weight_version += 1
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
        if skipped:
            logger.warning("step %d: non-finite loss or gradient norm (loss %.4g, grad norm %.4g); %d of %d optimizer "
                           "steps skipped, weights kept at version %d", step, loss_total,
                           _mean(step_metrics, "grad_norm"), skipped, len(minibatches), self.weight_version)
        metrics = {"learner/loss": loss_total / len(minibatches), "learner/grad_norm": _mean(step_metrics, "grad_norm"),
                   "learner/lr": step_metrics[-1]["lr"], "learner/optimizer_steps": float(applied),
                   "learner/weight_version": float(self.weight_version),
                   "learner/nonfinite_steps": float(self.nonfinite_steps),
                   "learner/nonfinite_in_a_row": float(self.nonfinite_in_a_row)}
        for key in ("clip_frac", "ratio_mean", "approx_kl", "cov_selected"):
            value = _mean(step_metrics, key)
            if not math.isnan(value):
                metrics[f"learner/{key}"] = value
        return metrics

    def realized_change(self, batch: dict[str, Any], flow: "FlowPass") -> dict[str, float]:
        """Re-score the same batch after the optimizer step (no grad): the realized change of its
        mean response-token entropy, beside the first-order prediction (OPEFO balances the
        predicted flow; this measures what the optimizer really did to the entropy)."""
        mask = batch["response_mask"]
        after_sum = 0.0
        with torch.no_grad():
            for rows, filler in self._plan(batch, torch.arange(len(mask)), collective=self._zero3):
                stats, w = self._stats(batch, rows)
                if not filler:
                    after_sum += float((stats.entropy * mask[rows, :w]).sum())
        after_sum = reduce_floats([after_sum])[0]
        return realized_change_metrics(flow.mean_entropy(mask), after_sum / max(float(mask.sum()), 1.0),
                                       float(flow.totals.P - flow.totals.N))

    @property
    def realized_on_engines(self) -> bool:
        """async with fp32 HF engines and an fp32 learner: the engines re-score the batch after the
        step (``response_entropy``, the same weights and numbers as the learner's forward) while
        they would otherwise wait for the learner; not for closed_loop, which needs the number
        before the next update."""
        c = self.config
        return (c.pipeline == "async" and c.engine == "hf" and c.engine_dtype == "float32"
                and c.model_dtype == "float32" and c.balance_mode != "closed_loop")

    def engine_rescore(self, batch: dict[str, Any], flow: "FlowPass") -> dict[str, Any] | None:
        """What the engines need to measure this step's realized change, and what the learner knows
        of it: the answers in the loss as (prompt ids, response ids), their token count, the
        entropy before the step and the net predicted flow. None when some answer is only partly in
        the loss (the engines score whole answers): then the learner measures it."""
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

    def current_entropy_coef(self) -> float:
        """entropy_coef, or its adapted value under ``adaptive_entropy``."""
        return self.adaptive_entropy_coef if self.config.adaptive_entropy else self.config.entropy_coef

    def update_entropy_coef(self, batch_entropy: float) -> None:
        """adaptive_entropy: coef += entropy_coef_lr x (target - batch entropy), in [0, entropy_coef_max];
        the target is entropy_target, or the first batch's entropy."""
        c = self.config
        if self.entropy_target is None:
            self.entropy_target = float(c.entropy_target) if c.entropy_target is not None else batch_entropy
        if self.adaptive_entropy_coef is None:
            self.adaptive_entropy_coef = float(c.entropy_coef)
        coef = self.adaptive_entropy_coef + c.entropy_coef_lr * (self.entropy_target - batch_entropy)
        self.adaptive_entropy_coef = min(max(coef, 0.0), float(c.entropy_coef_max))

    def update_closed_loop(self, entropy_after: float, change: float) -> None:
        """closed_loop balancing: f -= gain x realized change + target_gain x relative gap to the
        entropy target, kept in [0, closed_loop_max_fraction]. Entropy rising (change > 0, or above
        the target) lowers f, so less of the net decreasing flow is cancelled next step."""
        c = self.config
        if self.entropy_target is None:
            self.entropy_target = float(c.entropy_target) if c.entropy_target is not None else entropy_after - change
        gap = (entropy_after - self.entropy_target) / self.entropy_target
        f = self.closed_loop_fraction - c.closed_loop_gain * change - c.closed_loop_target_gain * gap
        self.closed_loop_fraction = min(max(f, 0.0), float(c.closed_loop_max_fraction))

    def batch_metrics(self, batch: dict[str, Any], flow: "FlowPass") -> dict[str, Any]:
        """Policy entropy, flow diagnostics, and the engine-vs-learner log-prob gap of the batch."""
        mask, n = batch["response_mask"], batch["input_ids"].shape[0]
        n_tok = float(mask.sum())
        metrics = flow_diagnostics(flow.logp, flow.entropy, batch["advantages"].float(), mask, flow.expected_s)
        metrics["policy/entropy"] = flow.mean_entropy(mask)
        gap = (flow.logp - batch["sampling_logp"]).abs() * mask
        metrics["rollout/logprob_gap_mean"] = float(gap.sum()) / max(n_tok, 1.0)
        metrics["rollout/logprob_gap_max"] = float(gap.max()) if n_tok else 0.0
        # KL(engine || learner) per sequence, estimated from the sampled tokens, averaged.
        metrics["rollout/logprob_kl"] = float(((batch["sampling_logp"] - flow.logp) * mask).sum()) / n
        metrics["_delta_hist"] = flow.delta[mask.bool()].numpy()
        return metrics

    def update_from_rollouts(self, batch: dict[str, Any], step: int = 0) -> dict[str, Any]:
        """One policy update from a collated rollout batch with ``advantages`` [N].

        ``pipeline: streaming`` defers the realized-change re-score to ``measure_deferred_realized_change``
        (called while the next batch is generated; same weights, same number)."""
        try:
            return self._update(batch, step)
        finally:  # a failed update leaves no graph (or streamed gradient) behind for the next one
            self._streamed, self._kept_forwards, self._stream_grads = None, [], None
            self._streaming_update = False

    def measure_deferred_realized_change(self) -> dict[str, float]:
        """streaming: the realized entropy change of the last update's batch, measured now (the
        weights are still those right after its step), and the closed loop's update from it;
        {} when there is none pending."""
        pending, self._deferred_realized = self._deferred_realized, None
        return self._realized_and_closed_loop(*pending) if pending is not None else {}

    def _realized_and_closed_loop(self, batch: dict[str, Any], flow: "FlowPass") -> dict[str, float]:
        metrics = self.realized_change(batch, flow)
        if self.config.balance_mode == "closed_loop":
            self.update_closed_loop(metrics["entropy_flow/entropy_after_step"], metrics["entropy_flow/realized_change"])
            metrics["entropy_flow/entropy_target"] = self.entropy_target
        return metrics

    def _update(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        batch, staleness = self.check_on_policy(batch, step)
        self.ds_engine.train()
        if self._deferred_realized is not None:  # streaming without the re-score call: do it before this step
            self.measure_deferred_realized_change()
        flow = self.flow_pass(batch)
        if self.config.adaptive_entropy:
            self.update_entropy_coef(flow.mean_entropy(batch["response_mask"]))
        weights, metrics = self.token_weights(batch, flow)
        self._balance_lambda = metrics["entropy_flow/lambda"]
        if self.config.adaptive_entropy:
            metrics["learner/entropy_coef"] = self.adaptive_entropy_coef
        metrics.update(self.training_pass(batch, flow, weights, step))
        if self.config.measure_realized_change:
            if self.config.pipeline == "streaming":  # re-scored while the next batch is generated
                self._deferred_realized = (batch, flow)
            elif self.realized_on_engines and (pending := self.engine_rescore(batch, flow)) is not None:
                metrics["_realized_on_engines"] = pending  # re-scored by the engines during the next update
            else:
                metrics.update(self._realized_and_closed_loop(batch, flow))
        metrics.update(self.batch_metrics(batch, flow))
        metrics.update(staleness)
        return metrics

    def push_weights_native(self, actors, world_sizes, backend: str, step: int, timeout_s: float, rebuild: bool,
                            master_address: str = "127.0.0.1") -> int:
        """Send the policy to vLLM engines through vLLM's weight-transfer API, straight from the
        learner's device (``rebuild``: open a new transfer group first); returns the version now
        stamped on every engine."""
        from opefo_rllib.fleet.vllm_transfer import NativeWeightSender

        if getattr(self, "_native_sender", None) is None:
            lm = self._module[DEFAULT_MODULE_ID].lm
            self._native_sender = NativeWeightSender(lambda: lm.state_dict().items(), master_address)
        with self._gathered_policy():  # every learner takes part in a ZeRO-3 gather; rank 0 sends
            if self.dp_rank == 0:
                self._native_sender.send(actors, world_sizes, backend, self.weight_version, step, timeout_s, rebuild)
        return self.weight_version

    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state["weight_version"] = self.weight_version
        state["nonfinite_steps"] = self.nonfinite_steps
        state["closed_loop"] = {"fraction": self.closed_loop_fraction, "entropy_target": self.entropy_target,
                                "entropy_coef": self.adaptive_entropy_coef}
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        if "weight_version" in state:
            self.weight_version = int(state["weight_version"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        if "closed_loop" in state:
            self.closed_loop_fraction = float(state["closed_loop"]["fraction"])
            self.entropy_target = state["closed_loop"]["entropy_target"]
            self.adaptive_entropy_coef = state["closed_loop"].get("entropy_coef")


def _zero_accumulators(params: list[torch.nn.Parameter]) -> dict[str, Any]:
    """stream_backward's accumulators: g_total and g_side (fp32, one per parameter) and their losses."""
    return {"total": [torch.zeros_like(p, dtype=torch.float32) for p in params],
            "side": [torch.zeros_like(p, dtype=torch.float32) for p in params], "loss_total": 0.0, "loss_side": 0.0}


def realized_change_metrics(before: float, after: float, net_flow: float) -> dict[str, float]:
    """The logged realized change of a batch's mean response-token entropy across one step (``before``
    as sampled, ``after`` re-scored with the new weights), and its ratio to the net predicted flow."""
    change = after - before
    return {"entropy_flow/realized_change": change, "entropy_flow/entropy_after_step": after,
            "entropy_flow/realized_over_net_flow": change / net_flow if net_flow else float("nan")}


def high_entropy_tokens(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """1.0 on the response tokens whose entropy H_t is in the top ``quantile`` of the batch's
    response tokens (ties at the threshold kept), 0.0 elsewhere (Wang et al. 2025, "forking" tokens)."""
    m = mask.bool()
    values = entropy[m]
    if values.numel() == 0:
        return torch.zeros_like(entropy)
    threshold = torch.quantile(values.float(), 1.0 - quantile)
    return ((entropy >= threshold) & m).to(entropy.dtype)


def pack_by_tokens(rows: torch.Tensor, lengths: torch.Tensor, budget: int, max_rows: int | None = None):
    """Micro-batches of ``rows`` (sorted by ``lengths``, longest first) whose padded size
    (rows x longest) stays within ``budget`` tokens; at most ``max_rows`` rows each."""
    order = torch.argsort(lengths, descending=True, stable=True)
    current: list[int] = []
    longest = 0
    for i in order.tolist():
        length = int(lengths[i])
        width = max(longest, length)
        if current and (width * (len(current) + 1) > budget or (max_rows and len(current) >= max_rows)):
            yield rows[torch.tensor(current)]
            current, width = [], length
        current.append(i)
        longest = width
    if current:
        yield rows[torch.tensor(current)]


def _mean(dicts: list[dict], key: str) -> float:
    values = [d[key] for d in dicts if key in d]
    return sum(values) / len(values) if values else float("nan")
