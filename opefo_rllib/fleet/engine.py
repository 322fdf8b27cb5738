"""The Engine protocol every inference backend (HF, vLLM, SGLang) implements.

An engine generates ``n`` samples per prompt from token ids, returning every sampled token's
log-probability under the distribution it actually sampled from (temperature applied, no
truncation in strict mode), and it loads new weights tagged with a version, so every sample
carries the version of the weights that produced it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

__all__ = ["SamplingConfig", "GenerationResult", "Engine"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Strict on-policy training needs top_p = 1 and top_k = 0 (the full
    distribution at ``temperature``), which is what the learner scores."""

    temperature: float = 1.0
    max_new_tokens: int = 16
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_full_distribution(self) -> bool:
        return self.top_p == 1.0 and self.top_k == 0


@dataclasses.dataclass
class GenerationResult:
    """One sampled response: token ids, the sampling log-prob of each, and the weight version."""

    prompt_index: int
    sample_index: int
    response_ids: list[int]
    sampling_logp: list[float]
    weight_version: int
    finished: bool  # ended with EOS (False: cut at max_new_tokens)


@runtime_checkable
class Engine(Protocol):
    """What the fleet needs from an inference backend."""

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig,
                 seed: int | None = None) -> list[list[GenerationResult]]:
        """``n`` samples for each prompt (token ids); result[i][k] is sample k of prompt i."""

    def load_weights(self, weights: Mapping[str, Any], version: int) -> None:
        """Replace the model weights (a name -> tensor mapping) and set the weight version."""

    def weight_version(self) -> int:
        """The version of the weights currently loaded."""
