"""Prompts: how an env's prompt text becomes the token ids the engines see, and how a response's
ids become the text the verifier reads. Training (``LLMEnvRunner``) and evaluation share it.

* ``PromptBuilder.encode``: ``prompt_format`` "raw" feeds the env's prompt as it is (base models);
  "chat" wraps it in the tokenizer's chat template as the user's turn (after ``system_prompt``)
  and opens the assistant's turn. A prompt over ``max_prompt_tokens`` is never cut: it is skipped
  (``None``) or, with ``on_long_prompt`` "error", refused naming its problem id.
* ``PromptBuilder.encode_observation``: a multi-turn env's observation as the tokens appended
  after a model turn: the text itself ("raw"), or ("chat") a user turn of the chat template: what
  the template writes after an assistant message (less the stop token the model already wrote),
  then the user message, then the opening of the next assistant turn.
* ``draw_prompts``: a whole batch of prompts from an env, drawing replacements for skipped ones.
* ``response_text``: a response decoded without its stop token and without special tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from opefo_rllib.config.fields import ConfigError

__all__ = ["PromptBuilder", "PromptTooLongError", "PromptDraw", "draw_prompts", "response_text",
           "MAX_DRAWS_PER_PROMPT"]

# A batch may draw this many problems per prompt it needs before too many long prompts is an error.
MAX_DRAWS_PER_PROMPT = 10


class PromptTooLongError(ConfigError):
    """A prompt over ``max_prompt_tokens`` with ``on_long_prompt: error``, or a batch that could not
    be filled because too many were (a ConfigError: ``opefo train`` prints it as one line)."""


class PromptBuilder:
    """Token ids of env prompts for one model's tokenizer, by the run's prompt settings.

    Args:
        tokenizer: a :class:`~opefo_rllib.models.tokenizer.ModelTokenizer` (``load_tokenizer``).
        config: anything with the fields of ``PromptSettings`` (``prompt_format``, ``system_prompt``,
            ``max_prompt_tokens``, ``on_long_prompt``): the algorithm config, or a PromptSettings.

    ``skipped_too_long`` counts the prompts skipped so far.
    """

    def __init__(self, tokenizer, config: Any):
        self.tokenizer = tokenizer
        self.prompt_format = config.prompt_format
        self.system_prompt = config.system_prompt
        self.max_prompt_tokens = config.max_prompt_tokens
        self.on_long_prompt = config.on_long_prompt
        self.skipped_too_long = 0
        self._chat_turn: tuple[str, str, str] | None = None  # (after assistant, before / after user text)
        if self.prompt_format not in ("raw", "chat"):
            raise ConfigError(f"config field 'prompt_format' = {self.prompt_format!r}: must be 'raw' or 'chat'")
        if self.on_long_prompt not in ("skip", "error"):
            raise ConfigError(f"config field 'on_long_prompt' = {self.on_long_prompt!r}: must be 'skip' or 'error'")
        if self.prompt_format == "chat" and not tokenizer.chat_template:
            raise ConfigError(f"config field 'prompt_format' = 'chat': the tokenizer of model dir {tokenizer.source} "
                              "has no chat template (none in tokenizer_config.json or chat_template.jinja); use "
                              "prompt_format 'raw', or save a chat template with the tokenizer")
        if self.prompt_format == "raw" and self.system_prompt:
            raise ConfigError("config field 'system_prompt' is set but prompt_format is 'raw': a system prompt goes "
                              "through the chat template (prompt_format 'chat')")

    def encode(self, prompt_text: str, problem_id: str) -> list[int] | None:
        """The prompt's token ids, or None when it is over ``max_prompt_tokens`` and skipped.

        Raises PromptTooLongError naming ``problem_id`` when it is too long and
        ``on_long_prompt`` is "error".
        """
        if self.prompt_format == "chat":
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            ids = self.tokenizer.encode_chat(messages + [{"role": "user", "content": prompt_text}])
        else:
            ids = self.tokenizer.encode(prompt_text)
        limit = self.max_prompt_tokens
        if limit is None or len(ids) <= limit:
            return ids
        if self.on_long_prompt == "error":
            raise PromptTooLongError(f"problem {problem_id!r}: its prompt is {len(ids)} tokens ({self.prompt_format} "
                                     f"format), over max_prompt_tokens = {limit} (on_long_prompt = 'error'); raise "
                                     "max_prompt_tokens, or set on_long_prompt to 'skip' to leave such prompts out")
        self.skipped_too_long += 1
        return None


    def encode_observation(self, text: str, stop_id: int | None) -> list[int]:
        """The token ids a multi-turn env's observation ``text`` adds after a model turn that ended
        with ``stop_id`` (None: cut at max_new_tokens): ``text`` itself ("raw"), or a user turn of the
        chat template closing the model's turn and opening the next one ("chat")."""
        if self.prompt_format == "raw":
            return self.tokenizer.encode_plain(text)
        after_assistant, before, after = self._chat_turn_parts()
        if stop_id is not None:
            stop_text = self.tokenizer.decode([stop_id], skip_special_tokens=False)
            if stop_text and after_assistant.startswith(stop_text):  # the model wrote it already
                after_assistant = after_assistant[len(stop_text):]
        return self.tokenizer.encode_plain(after_assistant + before + text + after)

    def _chat_turn_parts(self) -> tuple[str, str, str]:
        """What the chat template writes between an assistant message and the next one, found by
        rendering a probe conversation with one user message more (the difference is the turn)."""
        if self._chat_turn is None:
            marks = ("\u2063OPEFO_A\u2063", "\u2063OPEFO_O\u2063")
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            probe = system + [{"role": "user", "content": "q"}, {"role": "assistant", "content": marks[0]}]
            closed = self.tokenizer.render_chat(probe, add_generation_prompt=False)
            opened = self.tokenizer.render_chat(probe + [{"role": "user", "content": marks[1]}],
                                                add_generation_prompt=True)
            if marks[0] not in closed or not opened.startswith(closed) or marks[1] not in opened:
                raise ConfigError(f"config field 'prompt_format' = 'chat': the chat template of model dir "
                                  f"{self.tokenizer.source} does not render a conversation by appending turns, so "
                                  "a multi-turn env's observation cannot be added as tokens; use prompt_format 'raw'")
            after_assistant = closed[closed.rindex(marks[0]) + len(marks[0]):]
            before, _, after = opened[len(closed):].partition(marks[1])
            self._chat_turn = (after_assistant, before, after)
        return self._chat_turn


@dataclasses.dataclass
class PromptDraw:
    """One batch of prompts: the problems, their token ids, and how many drawn ones were skipped."""

    problems: list
    prompt_ids: list[list[int]]
    skipped_too_long: int


def draw_prompts(env, builder: PromptBuilder, n: int, env_name: str = "") -> PromptDraw:
    """Draw problems from ``env`` until ``n`` have prompts within ``max_prompt_tokens``.

    Skipped problems are replaced by the next ones the env draws, so a batch is always whole. After
    ``MAX_DRAWS_PER_PROMPT * n`` draws, PromptTooLongError (the data are mostly too long).
    """
    problems, prompt_ids, drawn = [], [], 0
    while len(problems) < n:
        if drawn >= MAX_DRAWS_PER_PROMPT * n:
            raise PromptTooLongError(
                f"env {env_name!r}: drew {drawn} problems for a batch of {n} prompts and {drawn - len(problems)} "
                f"were over max_prompt_tokens = {builder.max_prompt_tokens}; raise max_prompt_tokens or filter "
                "the long problems out of the data")
        batch = env.sample_problems(n - len(problems))
        drawn += len(batch)
        for problem in batch:
            ids = builder.encode(problem.prompt, problem.id)
            if ids is not None:
                problems.append(problem)
                prompt_ids.append(ids)
    return PromptDraw(problems, prompt_ids, drawn - len(problems))


def response_text(tokenizer, response_ids: Sequence[int], finished: bool) -> str:
    """The text the verifier reads: a finished response without its final stop token (an EOS id
    or a stop_token_id, special or not), decoded without special tokens."""
    ids = list(response_ids)[:-1] if finished else list(response_ids)
    return tokenizer.decode(ids, skip_special_tokens=True)
