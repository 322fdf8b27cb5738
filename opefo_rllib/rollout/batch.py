"""Rollout samples and their tensor form for the learner.

A ``Rollout`` is one response to one prompt: token ids, the engine's sampling log-probs, the
verifier's reward, the prompt group it belongs to, and the weight version that produced it.
``collate`` right-pads prompt + response into [N, L] and aligns the response mask and the
sampling log-probs with the targets (token t is predicted at position t - 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

__all__ = ["Rollout", "collate"]


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


def collate(rollouts: Sequence[Rollout], pad_id: int = 0) -> dict[str, Any]:
    """Tensors for the learner: input_ids / attention_mask [N, L], response_mask and
    sampling_logp [N, L-1] aligned with targets input_ids[:, 1:], rewards, group ids, versions."""
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
        response_mask[i, start: start + length] = 1
        sampling_logp[i, start: start + length] = torch.tensor(r.sampling_logp, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "sampling_logp": sampling_logp,
        "rewards": torch.tensor([r.reward for r in rollouts], dtype=torch.float32),
        "group_ids": torch.tensor([r.group_id for r in rollouts], dtype=torch.long),
        "weight_versions": torch.tensor([r.weight_version for r in rollouts], dtype=torch.long),
    }
