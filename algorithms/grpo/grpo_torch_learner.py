"""GRPOTorchLearner: the GRPO-family update on a DeepSpeed-wrapped causal LM, as a recipe.

``update_from_rollouts`` is one policy update; each step takes what it needs and returns a value:

1. ``check_on_policy``: every sample's weight version must equal the learner's (strict mode);
   otherwise samples older than ``max_staleness`` versions are left out (the async pipeline).
2. ``flow_pass`` (flow_pass.py): per-token log pi, H and S of the whole batch, its entropy flow
   delta_t and totals P, N -> ``FlowPass``, and the forwards the backward may reuse (fused, or
   streamed by ``stream_forward`` into a ``StreamedForwards``) -> ``TrainingForwards``.
   With ``kl_coef`` > 0, ``kl_to_reference`` (kl_penalty.py) adds the reference's log-probs
   (and, ``kl_in: reward``, shapes the rewards, the advantages and the flow) -> ``KLStep``.
3. ``token_weights`` (token_weights.py): the balance rule's lambda and weights (core/balance.py;
   GRPO's rule is "none": w = 1, ``OPEFOTorchLearner`` supplies the configured one), forking
   tokens, truncated IS and the off-policy mask -> ``TokenWeights``.
4. ``training_pass`` (gradients.py): per mini-batch, the backward of the weighted registered
   policy loss micro-batch by micro-batch, then ONE ``optimizer_step`` -> ``StepOutcome``; a
   non-finite loss or gradient norm skips the step and keeps the weight version.
5. The realized change (realized_change.py, ``measure_realized_change``): the batch re-scored
   after the step; streaming defers it to ``measure_deferred_realized_change`` (called while the
   next batch is generated), async with fp32 HF engines hands it to the engines (the
   ``UpdateResult``'s ``engine_rescore``). Then the controllers update, after the step: the
   balance rule's ``after_update`` (closed loop) and adaptive entropy's coefficient.
6. ``batch_metrics``: entropy, flow diagnostics and the engine-vs-learner log-prob gap.

With policy_loss "pg" and no TIS, steps 2-4 compute the gradient of ``opefo_loss`` on the batch
(tests/integration/test_learner.py ties the two).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from opefo_rllib.algorithms.grpo import gradients
from opefo_rllib.algorithms.grpo.flow_pass import FlowPass, TrainingForwards, run_flow_pass
from opefo_rllib.algorithms.grpo.kl_penalty import KLStep, kl_to_reference
from opefo_rllib.algorithms.grpo.micro_batches import MicroBatchPlanner, pack_by_tokens
from opefo_rllib.algorithms.grpo.optimizer_aware import optimizer_aware_inputs
from opefo_rllib.algorithms.grpo.realized_change import (engine_rescore_request, realized_change_metrics,
                                                         rescored_entropy, rescored_on_engines)
from opefo_rllib.algorithms.grpo.streaming import StreamedForwards
from opefo_rllib.algorithms.grpo.token_weights import TokenWeights, high_entropy_tokens, token_weights
from opefo_rllib.core.balance import BalanceRule, OptimizerAwareInputs, lambda_star, make_balance_rule
from opefo_rllib.core.entropy_control import AdaptiveEntropyCoef
from opefo_rllib.core.entropy_flow import flow_diagnostics
from opefo_rllib.learner.deepspeed_learner import DeepSpeedTorchLearner
from opefo_rllib.learner.reference import ReferencePolicy, RemoteReference

__all__ = ["GRPOTorchLearner", "StaleBatchError", "UpdateResult", "FlowPass", "TokenWeights", "pack_by_tokens",
           "high_entropy_tokens", "realized_change_metrics"]

logger = logging.getLogger(__name__)


class StaleBatchError(RuntimeError):
    """A strict on-policy learner got samples from other weights than its own."""


@dataclasses.dataclass
class UpdateResult:
    """What one update returns to the Algorithm: the metrics to log, the entropy flow of the
    batch's response tokens (for its histogram), and, async with fp32 HF engines, the request for
    the engines to re-score the batch (``engine_rescore_request``; None: nothing to hand over)."""

    metrics: dict[str, Any]
    delta_hist: np.ndarray
    engine_rescore: dict[str, Any] | None = None


class GRPOTorchLearner(DeepSpeedTorchLearner):
    """State across updates: the weight version and finite-step counts, the balance rule and the
    adaptive entropy coefficient (both with their checkpoint state), the streamed forwards of the
    batch being generated, and streaming's pending re-score of the last batch."""

    balances_entropy_flow = False  # GRPO: w = 1; the config check refuses another balance_mode

    def build(self) -> None:
        super().build()
        c = self.config
        self.planner = MicroBatchPlanner(c, self.dp_world, self.dp_rank)
        self.balance_rule = self.make_balance_rule()
        self.adaptive_entropy = AdaptiveEntropyCoef.of(c) if c.adaptive_entropy else None
        self.weight_version = 0
        self.nonfinite_steps = 0  # optimizer steps skipped by the finite-step guard, in all
        self.nonfinite_in_a_row = 0  # batches in a row whose every step was skipped
        self._streamed: StreamedForwards | None = None  # streaming: the forwards of the batch being generated
        self._pending_rescore: tuple[dict, FlowPass] | None = None  # streaming: the last step's, not re-scored yet
        self._native_sender = None
        self.reference = self.build_reference() if c.kl_coef > 0 else None  # the KL penalty's frozen policy

    def make_balance_rule(self) -> BalanceRule:
        """GRPO trains with w = 1 (``OPEFOTorchLearner`` supplies the configured rule)."""
        return make_balance_rule("none")

    def build_reference(self) -> ReferencePolicy | RemoteReference:
        """The KL reference: the policy with its adapter off (LoRA), a Ray actor holding the
        starting model (kl_reference: actor), else a frozen copy of the policy before any step
        (gathered under ZeRO-3)."""
        c, module = self.config, self._module[DEFAULT_MODULE_ID]
        if module.peft_model is not None:
            return ReferencePolicy.adapter_disabled(module.peft_model, module.lm, c.logits_chunk_size)
        if c.kl_reference == "actor":  # a Ray actor of its own: the learner holds one model
            return RemoteReference(c.model_path, c.model_dtype, c.logits_chunk_size, c.kl_reference_num_cpus,
                                   c.kl_reference_num_gpus)
        with self._gathered_policy() as lm:
            return ReferencePolicy.copy_of(lm, self.config.logits_chunk_size)

    @property
    def zero3(self) -> bool:
        return int(self.config.zero_stage) == 3

    def update_from_rollouts(self, batch: dict[str, Any], step: int = 0) -> UpdateResult:
        """One policy update from a collated rollout batch with ``advantages`` [N]."""
        c = self.config
        streamed, self._streamed = self._streamed, None  # this batch's streamed forwards, handed over once
        batch, staleness = self.check_on_policy(batch, step)
        self.ds_engine.train()
        if self._pending_rescore is not None:  # streaming without the re-score call: do it before this step
            self.measure_deferred_realized_change()
        flow, forwards = self.flow_pass(batch, streamed)
        kl_metrics = {}
        if self.reference is not None:
            kl = self.kl_to_reference(batch, flow)
            batch, flow, kl_metrics = kl.batch, kl.flow, kl.metrics
        entropy = flow.mean_entropy(batch["response_mask"])
        entropy_coef = self.adaptive_entropy.coefficient(entropy) if self.adaptive_entropy else c.entropy_coef
        inputs = None
        if self.balance_rule.needs_gradients and not math.isnan(lambda_star(flow.totals)):
            inputs = self.optimizer_aware_inputs(batch, flow)
        weights = self.token_weights(batch, flow, inputs)
        metrics = {**weights.metrics, **kl_metrics}
        if self.adaptive_entropy:
            metrics["learner/entropy_coef"] = entropy_coef
        outcome = self.training_pass(batch, flow, weights, forwards, entropy_coef, step)
        metrics.update(self.count_steps(outcome, step))
        if self.adaptive_entropy:  # the controller moves after the step, to the coefficient it used
            self.adaptive_entropy.after_update(entropy)
        rescore = None
        if c.measure_realized_change:
            if c.pipeline == "streaming":  # re-scored while the next batch is generated
                self._pending_rescore = (batch, flow)
            elif self.realized_on_engines and (rescore := self.engine_rescore(batch, flow)) is not None:
                pass  # re-scored by the engines during the next update
            else:
                metrics.update(self.realized_change_and_controllers(batch, flow))
        metrics.update(self.batch_metrics(batch, flow))
        metrics.update(staleness)
        mask = batch["response_mask"].bool()
        return UpdateResult(metrics, flow.delta[mask].numpy(), rescore)

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

    def _stats(self, batch: dict, rows: torch.Tensor):
        """The policy's token stats of ``rows`` (with the graph when grad is on) and their width."""
        module = self._module[DEFAULT_MODULE_ID]
        ids, attn = batch["input_ids"][rows], batch["attention_mask"][rows]
        width = int(attn.sum(-1).max())  # drop all-padding columns of this micro-batch
        prompt_lengths = batch["prompt_lengths"][rows] if "prompt_lengths" in batch else None  # shared prompts
        stats = module.sequence_token_stats(ids[:, :width], attn[:, :width], self.config.temperature,
                                            use_full_logits=self.zero3, prompt_lengths=prompt_lengths)
        return stats, width - 1

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self._module[DEFAULT_MODULE_ID].lm.parameters() if p.requires_grad]

    def stream_forward(self, chunk: dict[str, Any], first_row: int) -> None:
        """``pipeline: streaming``: the training forward (with gradients) of a finished chunk of the
        batch being generated: collated rows ``first_row``, ... of that batch (several learners:
        each its token-balanced share), kept in this batch's ``StreamedForwards`` for the update
        that follows. ``stream_backward``: the backward runs now instead, into its accumulators."""
        self.ds_engine.train()
        if self._streamed is None:
            self._streamed = StreamedForwards(self.config.stream_backward)
        with torch.enable_grad():
            for rows in self.planner.my_share(chunk):
                self.begin_training_forward()
                stats, w = self._stats(chunk, rows)
                if self.config.stream_backward:  # the backward now; keep the numbers, not the graph
                    self._streamed.backward(chunk, rows, stats, w, self.balance_rule, self.config,
                                            self.trainable_params())
                    stats = type(stats)(*(t.detach() for t in stats))
                self._streamed.add(rows + first_row, stats, w)

    # The steps (one method each, so a subclass or a profiler can wrap one).
    def flow_pass(self, batch: dict[str, Any], streamed: StreamedForwards | None = None
                  ) -> tuple[FlowPass, TrainingForwards]:
        return run_flow_pass(self, batch, streamed)

    def kl_to_reference(self, batch: dict[str, Any], flow: FlowPass) -> KLStep:
        return kl_to_reference(self, batch, flow)

    def optimizer_aware_inputs(self, batch: dict[str, Any], flow: FlowPass) -> OptimizerAwareInputs:
        return optimizer_aware_inputs(self, batch, flow)

    def token_weights(self, batch: dict[str, Any], flow: FlowPass,
                      inputs: OptimizerAwareInputs | None = None) -> TokenWeights:
        return token_weights(batch, flow, self.balance_rule, self.config, inputs)

    def training_pass(self, batch: dict[str, Any], flow: FlowPass, weights: TokenWeights,
                      forwards: TrainingForwards, entropy_coef: float, step: int) -> gradients.StepOutcome:
        return gradients.run_training_pass(self, batch, flow, weights, forwards, entropy_coef, step)

    def accumulate_gradients(self, batch: dict[str, Any], flow: FlowPass, weights: TokenWeights, rows: torch.Tensor,
                             generator: torch.Generator, forwards: TrainingForwards | None = None,
                             entropy_coef: float | None = None) -> tuple[float, list[dict]]:
        coef = self.config.entropy_coef if entropy_coef is None else entropy_coef
        return gradients.accumulate_gradients(self, batch, flow, weights, rows, generator, forwards, coef)

    def count_steps(self, outcome: gradients.StepOutcome, step: int) -> dict[str, float]:
        """Version + 1 if any optimizer step of the batch ran (else the weights, and so the version,
        stay as they were and ``learner/nonfinite_in_a_row`` grows); the step metrics."""
        steps = outcome.step_metrics
        n = outcome.applied + outcome.skipped
        self.nonfinite_steps += outcome.skipped
        if outcome.applied:
            self.weight_version += 1
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
        if outcome.skipped:
            logger.warning("step %d: non-finite loss or gradient norm (loss %.4g, grad norm %.4g); %d of %d optimizer "
                           "steps skipped, weights kept at version %d", step, outcome.loss,
                           gradients.mean_of(steps, "grad_norm"), outcome.skipped, n, self.weight_version)
        metrics = {"learner/loss": outcome.loss / n, "learner/grad_norm": gradients.mean_of(steps, "grad_norm"),
                   "learner/lr": steps[-1]["lr"], "learner/optimizer_steps": float(outcome.applied),
                   "learner/weight_version": float(self.weight_version),
                   "learner/nonfinite_steps": float(self.nonfinite_steps),
                   "learner/nonfinite_in_a_row": float(self.nonfinite_in_a_row)}
        for key in ("clip_frac", "ratio_mean", "approx_kl", "cov_selected"):
            value = gradients.mean_of(steps, key)
            if not math.isnan(value):
                metrics[f"learner/{key}"] = value
        return metrics

    def realized_change(self, batch: dict[str, Any], flow: FlowPass) -> dict[str, float]:
        return rescored_entropy(self, batch, flow)

    def realized_change_and_controllers(self, batch: dict[str, Any], flow: FlowPass) -> dict[str, float]:
        """The realized change, then the balance rule's update from it (closed loop: after the step)."""
        metrics = self.realized_change(batch, flow)
        metrics.update(self.balance_rule.after_update(metrics["entropy_flow/entropy_after_step"],
                                                      metrics["entropy_flow/realized_change"]))
        return metrics

    def measure_deferred_realized_change(self) -> dict[str, float]:
        """streaming: the realized entropy change of the last update's batch, measured now (the
        weights are still those right after its step), and the closed loop's update from it;
        {} when there is none pending."""
        pending, self._pending_rescore = self._pending_rescore, None
        return self.realized_change_and_controllers(*pending) if pending is not None else {}

    @property
    def realized_on_engines(self) -> bool:
        return rescored_on_engines(self.config)

    def engine_rescore(self, batch: dict[str, Any], flow: FlowPass) -> dict[str, Any] | None:
        return engine_rescore_request(batch, flow)

    def batch_metrics(self, batch: dict[str, Any], flow: FlowPass) -> dict[str, float]:
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
        return metrics

    def push_weights_native(self, actors, world_sizes, backend: str, step: int, timeout_s: float, rebuild: bool,
                            master_address: str = "127.0.0.1") -> int:
        """Send the policy to vLLM engines through vLLM's weight-transfer API, straight from the
        learner's device (``rebuild``: open a new transfer group first); returns the version now
        stamped on every engine."""
        from opefo_rllib.fleet.vllm_transfer import NativeWeightSender

        if self._native_sender is None:
            module = self._module[DEFAULT_MODULE_ID]
            lm = module.lm
            # under LoRA: base + B A merged (CPU copies), by the plain model's names: vLLM serves the merged model
            named = (lambda: self._hf_state_dict(lm).items()) if module.peft_model is not None \
                else (lambda: lm.state_dict().items())
            self._native_sender = NativeWeightSender(named, master_address)
        with self._gathered_policy():  # every learner takes part in a ZeRO-3 gather; rank 0 sends
            if self.dp_rank == 0:
                self._native_sender.send(actors, world_sizes, backend, self.weight_version, step, timeout_s, rebuild)
        return self.weight_version

    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state["weight_version"] = self.weight_version
        state["nonfinite_steps"] = self.nonfinite_steps
        state["balance_rule"] = self.balance_rule.get_state()
        state["adaptive_entropy"] = self.adaptive_entropy.get_state() if self.adaptive_entropy else None
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        if "weight_version" in state:
            self.weight_version = int(state["weight_version"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        if "closed_loop" in state:  # checkpoints before the balance-rule registry
            old = state["closed_loop"]
            state = {"balance_rule": {"fraction": old["fraction"], "entropy_target": old["entropy_target"]},
                     "adaptive_entropy": {"coef": old.get("entropy_coef"), "target": old["entropy_target"]}}
        if state.get("balance_rule"):
            self.balance_rule.set_state(state["balance_rule"])
        if self.adaptive_entropy and (state.get("adaptive_entropy") or {}).get("coef") is not None:
            self.adaptive_entropy.set_state(state["adaptive_entropy"])
