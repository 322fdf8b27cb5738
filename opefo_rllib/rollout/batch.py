"""Rollout samples and their tensor form for the learner.

A ``Rollout`` is one response to one prompt: token ids, the engine's sampling log-probs, the
verifier's reward, the prompt group it belongs to, and the weight version that produced it. A
multi-turn episode is one ``Rollout`` too: its ``response_ids`` are every token after the prompt,
the model's turns and the env's observations in order, and ``action_mask`` says which are the
model's (1) and which the env's (0): env tokens are context only, left out of the loss, the
entropy flow and the log-prob gap through the response mask.
``collate`` right-pads prompt + response into [N, L] and aligns the response mask and the
sampling log-probs with the targets (token t is predicted at position t - 1); ``learner_batch``
adds the group advantages (computed per prompt group, so a batch of whole groups gets the ones
it has in any larger batch) and leaves samples whose verification failed out of the loss;
``concat_batches`` joins such batches (the streaming pipeline's chunks) into one;
``rollout_metrics`` summarises a batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from opefo_rllib.core.advantages import group_advantages

__all__ = ["Rollout", "batch_advantages", "collate", "concat_batches", "learner_batch", "rollout_metrics", "verify_failed"]


@dataclasses.dataclass
class Rollout:
    group_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    sampling_logp: list[float]
    reward: float
    weight_version: int
    correct: bool = False
    finished: bool = True
    task_id: str = ""
    prompt_text: str = ""
    response_text: str = ""
    info: dict = dataclasses.field(default_factory=dict)
    # Multi-turn: 1 for each model token of response_ids, 0 for each env token (None: all model's).
    action_mask: list[int] | None = None

    @property
    def model_tokens(self) -> int:
        """The tokens the model sampled (a multi-turn episode's env tokens excluded)."""
        return len(self.response_ids) if self.action_mask is None else int(sum(self.action_mask))


def collate(rollouts: Sequence[Rollout], pad_id: int = 0) -> dict[str, Any]:
    """Tensors for the learner: input_ids / attention_mask [N, L], response_mask and
    sampling_logp [N, L-1] aligned with targets input_ids[:, 1:], rewards, group ids, prompt lengths,
    versions."""
    seqs = [r.prompt_ids + r.response_ids for r in rollouts]
    width = max(map(len, seqs))
    n = len(rollouts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width - 1), dtype=torch.float32)
    sampling_logp = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, (r, s) in enumerate(zip(rollouts, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        start, length = len(r.prompt_ids) - 1, len(r.response_ids)
        response_mask[i, start: start + length] = 1 if r.action_mask is None else \
            torch.tensor(r.action_mask, dtype=torch.float32)
        sampling_logp[i, start: start + length] = torch.tensor(r.sampling_logp, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "sampling_logp": sampling_logp,
        "rewards": torch.tensor([r.reward for r in rollouts], dtype=torch.float32),
        "group_ids": torch.tensor([r.group_id for r in rollouts], dtype=torch.long),
        "prompt_lengths": torch.tensor([len(r.prompt_ids) for r in rollouts], dtype=torch.long),
        "weight_versions": torch.tensor([r.weight_version for r in rollouts], dtype=torch.long),
    }


def verify_failed(rollout: Rollout) -> bool:
    """The verifier timed out or crashed on this answer (so its reward says nothing)."""
    return bool(rollout.info.get("timed_out", False) or rollout.info.get("error", False))


def learner_batch(rollouts: Sequence[Rollout], pad_id: int, adv_estimator: str,
                  verify_failure_policy: str = "mask", mask_truncated: bool = False) -> dict[str, Any]:
    """``collate`` plus ``advantages`` [N] from the registered estimator, over whole prompt groups.

    ``verify_failure_policy``: "mask" leaves answers whose verification failed out of the loss
    (response mask 0, advantage 0) and out of their group's baseline, so a correct but slow
    answer is not punished; "zero" scores them 0 like a wrong answer. ``mask_truncated``: answers
    cut at the token limit keep their reward in the group baseline but get no gradient (DAPO).
    """
    batch = collate(rollouts, pad_id)
    failed = torch.tensor([verify_failed(r) for r in rollouts], dtype=torch.bool)
    batch["verify_masked"] = failed if verify_failure_policy == "mask" else torch.zeros_like(failed)
    batch["advantages"] = batch_advantages(batch["rewards"], batch["group_ids"], batch["verify_masked"], adv_estimator)
    batch["response_mask"][batch["verify_masked"]] = 0.0
    truncated = torch.tensor([not r.finished for r in rollouts], dtype=torch.bool)
    if mask_truncated:
        batch["response_mask"][truncated] = 0.0
    batch["truncation_masked"] = truncated if mask_truncated else torch.zeros_like(truncated)
    return batch


def batch_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, excluded: torch.Tensor,
                     adv_estimator: str) -> torch.Tensor:
    """Group advantages [N] of ``rewards``; the ``excluded`` rows (verification failed, masked)
    get 0 and stay out of their group's baseline. The learner calls it again when it shapes the
    rewards (``kl_in: reward``)."""
    if not bool(excluded.any()):
        return group_advantages(rewards, group_ids, adv_estimator)
    advantages = torch.zeros(len(rewards), dtype=torch.float32)
    keep = ~excluded
    if bool(keep.any()):
        advantages[keep] = group_advantages(rewards[keep], group_ids[keep], adv_estimator)
    return advantages


def concat_batches(parts: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """``learner_batch``-es of disjoint whole prompt groups as one: the tensors ``learner_batch`` of
    all their rollouts (in order) would give, each [n, width] tensor right-padded to the widest
    (``input_ids`` with ``pad_id``, the rest with 0)."""
    width = max(p["input_ids"].shape[1] for p in parts)

    def padded(key: str, t: torch.Tensor, own_width: int) -> torch.Tensor:
        if t.dim() == 1:
            return t
        extra = width - own_width  # the same for [n, L] and target-aligned [n, L-1] tensors
        return torch.nn.functional.pad(t, (0, extra), value=pad_id if key == "input_ids" else 0)

    return {key: torch.cat([padded(key, p[key], p["input_ids"].shape[1]) for p in parts]) for key in parts[0]}


def _group_frac(rollouts: Sequence[Rollout], test) -> float:
    groups: dict[int, list[bool]] = {}
    for r in rollouts:
        groups.setdefault(r.group_id, []).append(r.correct)
    return sum(test(v) for v in groups.values()) / max(len(groups), 1)


def rollout_metrics(rollouts: Sequence[Rollout], batch: dict[str, Any]) -> dict[str, float]:
    """The ``rollout/...`` metrics of one batch (rewards, lengths, truncation, verifier failures)."""
    n = len(rollouts)
    lengths = torch.tensor([r.model_tokens for r in rollouts], dtype=torch.float32)
    return {
        "rollout/reward_mean": float(batch["rewards"].mean()),
        "rollout/num_samples": float(n),
        "rollout/accuracy": sum(r.correct for r in rollouts) / n,
        "rollout/response_length_mean": float(lengths.mean()),
        "rollout/response_tokens": float(lengths.sum()),
        "rollout/truncated_frac": sum(not r.finished for r in rollouts) / n,
        "rollout/solve_all_frac": _group_frac(rollouts, all),
        "rollout/solve_none_frac": _group_frac(rollouts, lambda xs: not any(xs)),
        "rollout/verify_timeouts": float(sum(r.info.get("timed_out", False) for r in rollouts)),
        "rollout/verify_errors": float(sum(r.info.get("error", False) for r in rollouts)),
        "rollout/verify_failures_masked": float(batch["verify_masked"].sum()),
        "rollout/truncation_masked": float(batch["truncation_masked"].sum()) if "truncation_masked" in batch else 0.0,
    }
