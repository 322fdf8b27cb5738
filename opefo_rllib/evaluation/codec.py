"""Prompt text <-> token ids for the engines, exactly as training does it.

Engines take token ids, so the driver tokenizes: the model directory's tokenizer
(:func:`opefo_rllib.models.tokenizer.load_tokenizer`) and the rollout's
:class:`~opefo_rllib.rollout.prompts.PromptBuilder` (raw text or the chat template), and responses
are decoded with :func:`~opefo_rllib.rollout.prompts.response_text`, the text the verifier reads
in training. Unlike a training batch, an evaluation set never drops a problem: no prompt length
limit applies here.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from opefo_rllib.config.fields import ConfigError
from opefo_rllib.models.tokenizer import TokenizerError, load_tokenizer
from opefo_rllib.rollout.prompts import PromptBuilder, response_text

__all__ = ["Codec", "model_tokenizer"]


def model_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer of a model directory; a missing or unusable one is a ConfigError naming it."""
    try:
        return load_tokenizer(model_dir)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None


class Codec:
    """Encodes prompts and decodes responses for one tokenizer and prompt format."""

    def __init__(self, tokenizer: Any, prompt_format: str = "raw", system_prompt: str | None = None):
        self.tokenizer = tokenizer
        settings = SimpleNamespace(prompt_format=prompt_format, system_prompt=system_prompt, max_prompt_tokens=None,
                                   on_long_prompt="error")
        self.builder = PromptBuilder(tokenizer, settings)
        self.eos_token_ids = list(tokenizer.eos_token_ids)
        self.pad_token_id = int(tokenizer.pad_token_id)

    def encode(self, text: str, problem_id: str = "") -> list[int]:
        return self.builder.encode(text, problem_id)

    def decode(self, response_ids: Sequence[int], finished: bool) -> str:
        return response_text(self.tokenizer, response_ids, finished)
