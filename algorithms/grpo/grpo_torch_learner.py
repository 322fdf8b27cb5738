"""GRPOTorchLearner: the GRPO-family / OPEFO update on a DeepSpeed-wrapped causal LM.

One call of ``update_from_rollouts`` is one policy update:

1. Strict on-policy check: every sample's weight version must equal the learner's.
2. Flow pass (no grad, micro-batch by micro-batch): per-token log pi, H and S for the whole
   batch, the entropy flow delta_t, and the batch-global totals P and N. OPEFO's weights need
   lambda* = (N - P) / (N + P) of the whole batch before any backward pass; this pass provides
   it (and the flow metrics every baseline logs too, and log pi_old for clipped losses).
3. Training pass: per micro-batch, the registered policy loss times the balancing weights,
   aggregated with the global token / sequence counts (so the gradient does not depend on the
   micro-batch size), backward; then ONE optimizer step (strict on-policy). Approximate
   on-policy configs (``num_updates_per_batch`` > 1) take that many mini-batch steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from opefo_rllib.algorithms.grpo.losses import PolicyLossConfig, aggregate_loss, entropy_bonus, policy_loss
from opefo_rllib.algorithms.opefo.entropy_flow import (
    balance_lambda,
    balance_weights,
    entropy_flow,
    flow_diagnostics,
    flow_totals,
)
from opefo_rllib.learner.deepspeed_learner import DeepSpeedTorchLearner

__all__ = ["GRPOTorchLearner", "StaleBatchError"]


class StaleBatchError(RuntimeError):
    """A strict on-policy learner got samples from other weights than its own."""


class GRPOTorchLearner(DeepSpeedTorchLearner):
    weight_version: int = 0

    def loss_config(self) -> PolicyLossConfig:
        c = self.config
        return PolicyLossConfig(eps_low=c.eps_low, eps_high=c.eps_high, clip_ratio_c=c.clip_ratio_c,
                                clip_cov_ratio=c.clip_cov_ratio, clip_cov_lb=c.clip_cov_lb, clip_cov_ub=c.clip_cov_ub,
                                kl_cov_ratio=c.kl_cov_ratio, kl_cov_coef=c.kl_cov_coef)

    def _micro_batches(self, rows: torch.Tensor):
        size = self.config.micro_batch_size or len(rows)
        for i in range(0, len(rows), size):
            yield rows[i:i + size]

    def _stats(self, batch: dict, rows: torch.Tensor):
        module = self._module[DEFAULT_MODULE_ID]
        ids, attn = batch["input_ids"][rows], batch["attention_mask"][rows]
        width = int(attn.sum(-1).max())  # drop all-padding columns of this micro-batch
        stats = module.sequence_token_stats(ids[:, :width], attn[:, :width], self.config.temperature,
                                            use_full_logits=int(self.config.zero_stage) == 3)
        return stats, width - 1

    def update_from_rollouts(self, batch: dict[str, Any], step: int = 0) -> dict[str, Any]:
        """One policy update from a collated rollout batch with ``advantages`` [N]."""
        c = self.config
        versions = batch["weight_versions"]
        if c.strict_on_policy and bool((versions != self.weight_version).any()):
            raise StaleBatchError(f"strict on-policy: batch at step {step} holds weight versions "
                                  f"{sorted(set(versions.tolist()))}, the learner is at version {self.weight_version}")
        self.ds_engine.train()
        n, width = batch["input_ids"].shape
        mask = batch["response_mask"]
        adv = batch["advantages"].float()
        all_rows = torch.arange(n)

        # --- flow pass (no grad): stats of the whole batch, as sampled.
        logp = torch.zeros(n, width - 1)
        entropy, expected_s = torch.zeros_like(logp), torch.zeros_like(logp)
        with torch.no_grad():
            for rows in self._micro_batches(all_rows):
                stats, w = self._stats(batch, rows)
                logp[rows, :w], entropy[rows, :w], expected_s[rows, :w] = stats.logp, stats.entropy, stats.expected_s
        delta = entropy_flow(logp, entropy, adv, c.entropy_flow_estimator, expected_s)
        totals = flow_totals(delta, mask)
        weights, bstats = balance_weights(delta, mask, c.balance_mode, c.static_lambda, c.balance_fraction,
                                          c.max_abs_lambda, totals=totals)
        metrics = _flow_metrics(bstats, balance_lambda(totals, "two_sided"), delta, mask)
        metrics.update(flow_diagnostics(logp, entropy, adv, mask, expected_s))
        n_tok = float(mask.sum())
        metrics["policy/entropy"] = float((entropy * mask).sum()) / max(n_tok, 1.0)
        gap = (logp - batch["sampling_logp"]).abs() * mask
        metrics["rollout/logprob_gap_mean"] = float(gap.sum()) / max(n_tok, 1.0)
        metrics["rollout/logprob_gap_max"] = float(gap.max()) if n_tok else 0.0
        # KL(engine || learner) per sequence, estimated from the sampled tokens, averaged.
        metrics["rollout/logprob_kl"] = float(((batch["sampling_logp"] - logp) * mask).sum()) / n

        # Optional truncated importance sampling against the engines' numeric mismatch:
        # w_t *= min(pi_learner / pi_engine, C), detached (off unless tis_cap is set).
        metrics["rollout/tis_enabled"] = float(c.tis_cap is not None)
        if c.tis_cap is not None:
            ratio = torch.exp(logp - batch["sampling_logp"])
            tis = ratio.clamp(max=float(c.tis_cap))
            weights = weights * torch.where(mask.bool(), tis, torch.ones_like(tis))
            metrics["rollout/tis_weight_mean"] = float((tis * mask).sum()) / max(n_tok, 1.0)
            metrics["rollout/tis_clipped_frac"] = float((ratio > c.tis_cap)[mask.bool()].float().mean()) if n_tok else 0.0

        # --- training pass: num_updates_per_batch optimizer steps (1 = strict on-policy).
        old_logp = logp  # the policy that sampled (equal to the current one before the first step)
        loss_cfg = self.loss_config()
        gen = torch.Generator().manual_seed(int(c.seed or 0) * 1_000_003 + step)
        minibatches = list(torch.randperm(n, generator=gen).chunk(c.num_updates_per_batch)) \
            if c.num_updates_per_batch > 1 else [all_rows]
        step_metrics: list[dict] = []
        loss_total = 0.0
        for mb in minibatches:
            mb = mb.sort().values
            counts = {"num_tokens": float(mask[mb].sum()), "num_seqs": float(len(mb)),
                      "norm_length": float(c.max_new_tokens)}
            for rows in self._micro_batches(mb):
                stats, w = self._stats(batch, rows)
                m = mask[rows, :w]
                loss_mat, lm = policy_loss(c.policy_loss, stats.logp, old_logp[rows, :w], adv[rows], m,
                                           weights=weights[rows, :w], config=loss_cfg, generator=gen)
                loss = aggregate_loss(loss_mat, m, c.loss_agg_mode, **counts)
                loss = loss + entropy_bonus(stats.entropy, m, c.entropy_coef, c.loss_agg_mode, **counts)
                self.ds_engine.backward(loss, scale_wrt_gas=False)
                loss_total += float(loss.detach())
                step_metrics.append(lm)
            step_metrics.append(self.optimizer_step())
        self.weight_version += 1
        metrics["learner/loss"] = loss_total / len(minibatches)
        metrics["learner/grad_norm"] = _mean(step_metrics, "grad_norm")
        metrics["learner/lr"] = step_metrics[-1]["lr"]
        metrics["learner/optimizer_steps"] = float(len(minibatches))
        for key in ("clip_frac", "ratio_mean", "approx_kl", "cov_selected"):
            value = _mean(step_metrics, key)
            if not math.isnan(value):
                metrics[f"learner/{key}"] = value
        metrics["learner/weight_version"] = float(self.weight_version)
        metrics["_delta_hist"] = delta[mask.bool()].numpy()
        return metrics

    def push_weights_native(self, actors, world_sizes, backend: str, step: int, timeout_s: float, rebuild: bool,
                            master_address: str = "127.0.0.1") -> int:
        """Send the policy to vLLM engines through vLLM's weight-transfer API, straight from the
        learner's device (``rebuild``: open a new transfer group first); returns the version now
        stamped on every engine."""
        from opefo_rllib.fleet.weight_sync import NativeWeightSender

        if getattr(self, "_native_sender", None) is None:
            lm = self._module[DEFAULT_MODULE_ID].lm
            self._native_sender = NativeWeightSender(lambda: lm.state_dict().items(), master_address)
        with self._gathered_policy():
            self._native_sender.send(actors, world_sizes, backend, self.weight_version, step, timeout_s, rebuild)
        return self.weight_version

    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state["weight_version"] = self.weight_version
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        if "weight_version" in state:
            self.weight_version = int(state["weight_version"])


def _mean(dicts: list[dict], key: str) -> float:
    values = [d[key] for d in dicts if key in d]
    return sum(values) / len(values) if values else float("nan")


def _flow_metrics(bstats: dict, lambda_star: float, delta: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    return {
        "entropy_flow/P": bstats["P"],
        "entropy_flow/N": bstats["N"],
        "entropy_flow/net": bstats["net_flow"],
        "entropy_flow/lambda": bstats["lambda"],
        "entropy_flow/lambda_star": lambda_star,
        "entropy_flow/frac_increase": bstats["frac_increase"],
        "entropy_flow/frac_decrease": bstats["frac_decrease"],
        "entropy_flow/weighted_net": bstats["weighted_net_flow"],
        "entropy_flow/w_mean": bstats["w_mean"],
        "entropy_flow/w_min": bstats["w_min"],
        "entropy_flow/w_max": bstats["w_max"],
    }
