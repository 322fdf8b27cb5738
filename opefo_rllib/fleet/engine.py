"""The Engine protocol every inference backend (HF, vLLM, SGLang) implements.

An engine generates ``n`` samples per prompt from token ids, returning every sampled token's
log-probability under the distribution it actually sampled from (temperature applied, no
truncation in strict mode), and it loads new weights tagged with a version, so every sample
carries the version of the weights that produced it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

__all__ = ["SamplingConfig", "GenerationResult", "Engine", "NoNativeTransfer", "as_token_ids"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Strict on-policy training needs top_p = 1 and top_k = 0 (the full
    distribution at ``temperature``), which is what the learner scores. ``temperature`` 0 is
    greedy decoding (the argmax; for evaluation only: the learner cannot score it)."""

    temperature: float = 1.0
    max_new_tokens: int = dataclasses.field(default_factory=lambda: _setting_default("max_new_tokens"))
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()  # end a response too, beside the engine's EOS ids

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", as_token_ids(self.stop_token_ids, "SamplingConfig.stop_token_ids"))
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def is_full_distribution(self) -> bool:
        return self.top_p == 1.0 and self.top_k == 0

    def stop_ids(self, eos_token_ids: Sequence[int]) -> tuple[int, ...]:
        """Every id that ends a response: the engine's EOS ids, then ``stop_token_ids``."""
        return tuple(dict.fromkeys([*eos_token_ids, *self.stop_token_ids]))


def _setting_default(name: str):
    """A generation field's default, from its one declaration (config.sections)."""
    from opefo_rllib.config.sections import GenerationSettings

    return next(f.default for f in dataclasses.fields(GenerationSettings) if f.name == name)


def as_token_ids(ids: int | Sequence[int], what: str) -> tuple[int, ...]:
    """``ids`` (one id or several) as a tuple of ints >= 0; ValueError naming ``what`` otherwise."""
    values = [ids] if isinstance(ids, int) else list(ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values):
        raise ValueError(f"{what} must be token ids (integers >= 0), got {ids!r}")
    return tuple(values)


@dataclasses.dataclass
class GenerationResult:
    """One sampled response: token ids, the sampling log-prob of each, and the weight version."""

    prompt_index: int
    sample_index: int
    response_ids: list[int]
    sampling_logp: list[float]
    weight_version: int
    finished: bool  # ended with a stop id (an EOS id or a stop_token_id; False: cut at max_new_tokens)


@runtime_checkable
class Engine(Protocol):
    """Everything the fleet's ``EngineActor`` calls on an inference backend.

    Weights reach an engine one of two ways. ``load_weights`` (a state dict, through Ray's object
    store) every engine has. vLLM's native weight-transfer API (``init_weight_transfer`` ..
    ``abort_weight_update``, driven from the learner by :mod:`opefo_rllib.fleet.vllm_transfer`) only
    engines whose ``weight_transfer_backend`` is not None; the others inherit
    :class:`NoNativeTransfer`, whose methods refuse.

    Optional, outside the protocol: ``response_entropy(sequences, temperature) -> (entropy sum,
    tokens)``, the policy entropy of given answers under the current weights (HFEngine has it; the
    async pipeline's re-score uses it with ``engine: hf``, the learner re-scores otherwise).
    """

    weight_transfer_backend: str | None  # "nccl" | "ipc" | "opefo_gloo", or None: no native transfer

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig,
                 seed: int | None = None) -> list[list[GenerationResult]]:
        """``n`` samples for each prompt (token ids); result[i][k] is sample k of prompt i."""

    def load_weights(self, weights: Mapping[str, Any], version: int) -> None:
        """Replace the model weights (a name -> tensor mapping) and set the weight version."""

    def weight_version(self) -> int:
        """The version of the weights currently loaded."""

    def probe_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """The log-probability of each token of ``token_ids`` after the ones before it (temperature
        1, ``len - 1`` values) under the weights this engine serves: their fingerprint, compared
        with the learner's after a weight sync (``weights_check``)."""

    def generated_tokens(self) -> int:
        """Tokens sampled over the engine's life. Read while ``generate`` runs (from another
        thread of the actor), so the fleet's stall deadline sees a long call progress: count them
        as they are sampled where the backend allows (HF, vLLM), else as each call returns."""

    def release_memory(self) -> None:
        """Colocation: free device memory (weights, KV cache) while the learner trains."""

    def resume_memory(self) -> None:
        """Undo ``release_memory`` before the next generation or weight update."""

    def shutdown(self) -> None:
        """Stop the engine and free what it holds (subprocesses, device memory)."""

    def world_size(self) -> int:
        """Workers of this engine (tensor x pipeline parallel): its ranks in a transfer group."""

    def init_weight_transfer(self, init_info: dict) -> None:
        """Native transfer: join the learner's transfer group."""

    def shutdown_weight_transfer(self) -> None:
        """Native transfer: leave the transfer group."""

    def start_weight_update(self) -> None:
        """Native transfer: open an update round."""

    def update_weights(self, update_info: dict | list) -> None:
        """Native transfer: receive the tensors the learner sends."""

    def finish_weight_update(self, version: int) -> None:
        """Native transfer: close the round and stamp ``version``."""

    def abort_weight_update(self) -> bool:
        """Native transfer, after a failed round: close an open update; False if this engine must be
        restarted."""


class NoNativeTransfer:
    """The Engine protocol's native weight-transfer part for engines without one (HF, SGLang):
    ``weight_transfer_backend`` is None, one worker, and the transfer calls refuse."""

    weight_transfer_backend: str | None = None

    def world_size(self) -> int:
        return 1

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no native weight transfer "
                                  "(weight_transfer_backend is None): its weights go through load_weights")

    def init_weight_transfer(self, init_info: dict) -> None:
        self._refuse()

    def shutdown_weight_transfer(self) -> None:
        self._refuse()

    def start_weight_update(self) -> None:
        self._refuse()

    def update_weights(self, update_info: dict | list) -> None:
        self._refuse()

    def finish_weight_update(self, version: int) -> None:
        self._refuse()

    def abort_weight_update(self) -> bool:
        return True  # no update is ever open
