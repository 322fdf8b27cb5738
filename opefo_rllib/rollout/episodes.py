"""Multi-turn episodes: the model writes a turn, the env answers, until the episode ends.

An episode starts from its prompt in an env of its own (``TextEnv.new_episode``). Each round the
engine samples one turn from everything so far (prompt, earlier turns, env observations); the
env's ``step(turn text)`` returns the observation (a tool's output, feedback), the reward and
whether the episode is over; the observation's tokens are appended (``PromptBuilder.
encode_observation``) and the next turn is sampled. An episode ends when the env terminates or
truncates it, or is cut by ``max_turns`` or ``max_episode_tokens`` (a turn that reaches the
budget is cut there: a prefix of a sample is a sample of that prefix, so it stays on-policy). An
env may end a turn early too, at its turn-end marker (``TextEnv.turn_end``, e.g. the closing fence
of a code block): the tokens after it are dropped the same way, whichever engine sampled them.

The finished episode is one :class:`~opefo_rllib.rollout.batch.Rollout`: ``response_ids`` all its
tokens after the prompt, ``action_mask`` 1 on the model's and 0 on the env's (context only: no
loss, flow or log-prob gap on them), ``weight_version`` the oldest of its turns' versions (strict
on-policy refuses an episode whose turns disagree with the learner, as it refuses a single-turn
sample; async measures its staleness from its oldest turn), and its reward the final step's or
the sum of its steps' (``episode_reward``).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from opefo_rllib.fleet.engine import GenerationResult
from opefo_rllib.rollout.batch import Rollout
from opefo_rllib.rollout.prompts import PromptBuilder, response_text

__all__ = ["Episode", "EpisodeLimits", "EpisodeStepper", "EpisodeUnit", "call_args", "episode_limits",
           "episode_metrics", "is_multi_turn"]

TURN_SEED_STRIDE = 15_485_863  # turn t of a unit is sampled with its first call's seed + t * this


def is_multi_turn(env) -> bool:
    """Does ``env`` take more than one model turn per episode (``max_turns`` above 1)?"""
    return int(getattr(env, "max_turns", 1)) > 1


@dataclasses.dataclass(frozen=True)
class EpisodeLimits:
    """How far an episode may go: model turns, tokens after the prompt, and its reward rule."""

    max_turns: int
    max_tokens: int | None
    reward: str  # "final" | "sum"


def episode_limits(env, config: Any) -> EpisodeLimits:
    """The limits of ``env``'s episodes under a run's ``max_turns`` / ``max_episode_tokens`` /
    ``episode_reward`` (``max_turns`` caps the env's own)."""
    turns = int(getattr(env, "max_turns", 1))
    if config.max_turns is not None:
        turns = min(turns, int(config.max_turns))
    return EpisodeLimits(turns, config.max_episode_tokens, config.episode_reward)


@dataclasses.dataclass
class Episode:
    """One episode in progress: its env, its tokens after the prompt (model's and env's) and what
    each turn and step gave."""

    env: Any  # this episode's own env (TextEnv.new_episode)
    group_id: int
    prompt_ids: list[int]
    prompt_text: str = ""
    ids: list[int] = dataclasses.field(default_factory=list)
    action_mask: list[int] = dataclasses.field(default_factory=list)
    logp: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)  # one per model turn
    rewards: list[float] = dataclasses.field(default_factory=list)  # one per env step
    texts: list[str] = dataclasses.field(default_factory=list)  # turns and observations, in order
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    ended_by_marker: int = 0  # turns the env's turn-end marker ended (turn_end)
    done: bool = False
    cut: bool = False  # ended by max_turns / max_episode_tokens, not by the env
    finished: bool = True  # the last model turn ended with a stop id
    last_info: dict = dataclasses.field(default_factory=dict)

    @property
    def turns(self) -> int:
        return len(self.versions)

    def context(self) -> list[int]:
        """What the next turn is sampled from: the prompt and everything after it."""
        return self.prompt_ids + self.ids

    def to_rollout(self, reward_rule: str) -> Rollout:
        info = self.last_info
        reward = sum(self.rewards) if reward_rule == "sum" else (self.rewards[-1] if self.rewards else 0.0)
        return Rollout(
            group_id=self.group_id, prompt_ids=self.prompt_ids, response_ids=list(self.ids),
            sampling_logp=list(self.logp), reward=float(reward), weight_version=min(self.versions),
            correct=bool(info.get("correct", False)), finished=self.finished and not self.cut,
            task_id=self.env.problem.id, prompt_text=self.prompt_text, response_text="".join(self.texts),
            info={"format_ok": bool(info.get("format_ok", False)), "timed_out": bool(info.get("timed_out", False)),
                  "error": info.get("error") is not None, "turns": self.turns, "tool_calls": self.tool_calls,
                  "tool_errors": self.tool_errors, "tool_timeouts": self.tool_timeouts, "cut": self.cut,
                  "ended_by_marker": self.ended_by_marker,
                  "turn_versions": list(self.versions)},
            action_mask=list(self.action_mask))


@dataclasses.dataclass
class EpisodeUnit:
    """One first engine call's episodes, played turn by turn on that call's engine: all of them,
    the ones in the call now waiting (in its prompt order), the turn and the first call's args
    ``(prompts, n, sampling, seed)``; ``rows``: the problems' indices, for whoever needs them."""

    episodes: list[Episode]
    running: list[Episode]
    turn: int
    args: tuple
    rows: list[int] = dataclasses.field(default_factory=list)


def call_args(pending: list, idx) -> tuple:
    """The args of the submitted call (a fleet pending entry) whose indices are ``idx``."""
    return next(entry[3] for entry in pending if entry[0] is idx)


class EpisodeStepper:
    """Advances episodes by one turn: appends each sampled turn, steps its env (many at once, in
    ``workers`` threads: tool programs and verifiers wait on other processes), appends the
    observation's tokens or ends the episode."""

    def __init__(self, builder: PromptBuilder, limits: EpisodeLimits, workers: int):
        self.builder, self.tokenizer, self.limits = builder, builder.tokenizer, limits
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opefo-env-step")

    def start(self, env, problems: Sequence[Any], group_ids: Sequence[int], prompt_ids: Sequence[list[int]],
              prompt_texts: Sequence[str], group_size: int) -> list[Episode]:
        """``group_size`` episodes per problem, each in an env of its own (group k: episodes
        k * group_size ...), in the order the engines return their samples."""
        return [Episode(env.new_episode(p), g, list(ids), text)
                for p, g, ids, text in zip(problems, group_ids, prompt_ids, prompt_texts) for _ in range(group_size)]

    def advance(self, episodes: Sequence[Episode], turns: Sequence[GenerationResult]) -> None:
        """Append ``turns[i]`` to ``episodes[i]`` and step its env; every episode is then either
        done or ends with the env's observation, ready for its next turn."""
        texts = [self._append_turn(ep, res) for ep, res in zip(episodes, turns)]
        steps = list(self._pool.map(lambda pair: pair[0].env.step(pair[1]), zip(episodes, texts)))
        for ep, text, step in zip(episodes, texts, steps):
            self._after_step(ep, text, *step)

    def play(self, unit: EpisodeUnit, results: list, fleet, engine: int) -> tuple | None:
        """Advance ``unit`` by its call's ``results`` (turn 1: ``n`` samples per problem; later
        turns: one per running episode) and send its next turn to ``engine``: the fleet's pending
        entry for it (its indices are the unit), or None when every episode has ended."""
        turns = [r for group in results for r in group] if unit.turn == 1 else [group[0] for group in results]
        self.advance(unit.running, turns)
        still = [ep for ep in unit.episodes if not ep.done]
        if not still:
            return None
        _, _, sampling, seed = unit.args
        nxt = dataclasses.replace(unit, running=still, turn=unit.turn + 1)
        return fleet.submit_to(engine, [ep.context() for ep in still], 1, sampling,
                               seed + TURN_SEED_STRIDE * unit.turn, nxt)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _append_turn(self, ep: Episode, res: GenerationResult) -> str:
        ids, logp, finished = list(res.response_ids), list(res.sampling_logp), res.finished
        keep = self._turn_end(ep, ids, finished)
        if keep is not None:  # the env's turn-end marker: the rest of the sample is dropped
            ids, logp, finished = ids[:keep], logp[:keep], False
            ep.ended_by_marker += 1
        budget = self.limits.max_tokens
        if budget is not None and len(ep.ids) + len(ids) >= budget:
            keep = budget - len(ep.ids)
            if keep < len(ids):  # cut at the budget: the kept tokens are still this policy's sample
                ids, logp, finished = ids[:keep], logp[:keep], False
            ep.cut = True
        ep.ids += ids
        ep.logp += logp
        ep.action_mask += [1] * len(ids)
        ep.versions.append(res.weight_version)
        ep.finished = finished
        text = response_text(self.tokenizer, ids, finished)
        ep.texts.append(self.tokenizer.decode(ids, skip_special_tokens=False))
        return text

    def _turn_end(self, ep: Episode, ids: list[int], finished: bool) -> int | None:
        """Tokens of the turn up to the env's turn-end marker, when the env has one inside it (the
        fewest tokens whose text reaches the marker), else None."""
        text = response_text(self.tokenizer, ids, finished)
        end = ep.env.turn_end(text)
        if end is None or end >= len(text):
            return None
        low, high = 1, len(ids)  # the fewest tokens whose text holds the first ``end`` characters
        while low < high:
            mid = (low + high) // 2
            if len(self.tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= end:
                high = mid
            else:
                low = mid + 1
        return low if low < len(ids) else None

    def _after_step(self, ep: Episode, text: str, observation: str, reward: float, terminated: bool,
                    truncated: bool, info: dict) -> None:
        ep.rewards.append(float(reward))
        ep.last_info = dict(info)
        if info.get("tool_call"):
            ep.tool_calls += 1
            ep.tool_errors += bool(info.get("tool_error"))
            ep.tool_timeouts += bool(info.get("tool_timeout"))
        if terminated or truncated:
            ep.done, ep.cut = True, False if terminated else ep.cut
            return
        if ep.cut or ep.turns >= self.limits.max_turns:
            ep.done = ep.cut = True
            return
        stop_id = ep.ids[-1] if ep.finished and ep.ids else None
        obs_ids = self.builder.encode_observation(observation, stop_id)
        if self.limits.max_tokens is not None and len(ep.ids) + len(obs_ids) >= self.limits.max_tokens:
            ep.done = ep.cut = True  # no room for another turn after this observation
            return
        ep.ids += obs_ids
        ep.logp += [0.0] * len(obs_ids)
        ep.action_mask += [0] * len(obs_ids)
        ep.texts.append(self.tokenizer.decode(obs_ids, skip_special_tokens=False))


def episode_metrics(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """The ``episode/...`` metrics of a batch of multi-turn episodes (TensorBoard)."""
    n = max(len(rollouts), 1)
    tokens = sum(len(r.response_ids) for r in rollouts)
    env_tokens = tokens - sum(r.model_tokens for r in rollouts)
    tool_calls = sum(r.info.get("tool_calls", 0) for r in rollouts)
    return {
        "episode/turns_mean": sum(r.info.get("turns", 1) for r in rollouts) / n,
        "episode/tool_calls_mean": tool_calls / n,
        "episode/tool_errors": float(sum(r.info.get("tool_errors", 0) for r in rollouts)),
        "episode/tool_timeouts": float(sum(r.info.get("tool_timeouts", 0) for r in rollouts)),
        "episode/env_token_frac": env_tokens / max(tokens, 1),
        "episode/cut_frac": sum(bool(r.info.get("cut")) for r in rollouts) / n,
        "episode/turns_ended_by_marker": float(sum(r.info.get("ended_by_marker", 0) for r in rollouts)),
    }
