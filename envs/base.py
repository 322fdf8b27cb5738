"""TextEnv: the Gymnasium base class of every verifiable-reward text environment.

An episode is a prompt (observation) answered by model responses (actions). A subclass says
how to draw a problem and how to score a response:

    class MyEnv(TextEnv):
        def sample_problem(self, rng): return Problem(id=..., prompt=..., answer=...)
        def score(self, problem, response): return VerifyResult(reward=..., correct=...)

Single-turn tasks terminate after one step. Multi-turn tasks set ``max_turns`` above 1, override
``step`` (see ``RetryWithFeedback``, ``MathToolEnv``) and return the next observation with
``terminated=False``: only the new text (feedback, a tool's output), which the trainer appends
to the conversation as tokens; the model's next turn sees every earlier turn. The trainer steps
each multi-turn episode in an env of its own (``new_episode``: a shallow copy sharing the data,
verifier and tools, with its own episode state), many at once.

A finite problem space (single-digit sums, a small dataset) is split in two by ``split`` /
``heldout_fraction``: a problem belongs to the held-out part when a hash of its id falls below the
fraction, so a ``split: train`` env never poses a problem of its ``split: heldout`` twin, whatever
the seeds (validation on a held-out split of the very task that is trained).

The trainer does not step envs one at a time: it draws many problems with
``sample_problems(n)`` and scores many responses at once with ``score_batch_async``, which
subclasses with a slow verifier (math-verify) override to verify in parallel worker processes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import string
from concurrent.futures import Future
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding

from opefo_rllib.envs.pool import wait_all
from opefo_rllib.envs.verifier import VerifyResult

__all__ = ["Problem", "UnicodeText", "TextEnv", "RetryWithFeedback", "SPLITS", "in_heldout_split"]

SPLITS = ("all", "train", "heldout")
SPLIT_DRAWS = 10_000  # draws to find one problem of the split before it is an error


@dataclasses.dataclass(frozen=True)
class Problem:
    """One task instance: what the model is asked, and what the verifier checks against."""

    id: str
    prompt: str
    answer: str
    meta: dict = dataclasses.field(default_factory=dict, compare=False)


class UnicodeText(spaces.Text):
    """A ``gymnasium.spaces.Text`` that contains any str of allowed length, whatever its
    characters (a model can emit any Unicode); ``sample()`` draws from printable ASCII."""

    def __init__(self, max_length: int, min_length: int = 0, seed: int | None = None):
        super().__init__(max_length=max_length, min_length=min_length, charset=string.printable, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"


class TextEnv(gym.Env):
    """Base class of verifiable-reward text environments (Gymnasium API, text in and out).

    Args:
        max_prompt_chars: observation space length limit.
        max_response_chars: action space length limit (longer responses are cut, keeping the end).
        split: "all" (every problem), "train" or "heldout": the part of the problem space this env
            poses (see ``in_heldout_split``).
        heldout_fraction: the share of problem ids in the held-out part.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}
    skipped_rows = 0  # dataset rows dropped at load (``on_bad_row="skip"``); datasets set it
    split, heldout_fraction = "all", 0.2  # also for subclasses that skip TextEnv.__init__
    max_turns = 1  # model turns an episode may take (above 1: a multi-turn env, stepped turn by turn)

    def __init__(self, max_prompt_chars: int = 8192, max_response_chars: int = 65536, render_mode: str | None = None,
                 split: str = "all", heldout_fraction: float = 0.2):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.split, self.heldout_fraction = split, float(heldout_fraction)
        self.observation_space = UnicodeText(max_prompt_chars)
        self.action_space = UnicodeText(max_response_chars)
        self.max_response_chars = max_response_chars
        self.render_mode = render_mode
        self.problem: Problem | None = None
        self.turn = 0
        self._last_text = ""

    # ------------------------------------------------------------------ subclass hooks
    def sample_problem(self, rng: np.random.Generator) -> Problem:
        """Draw the next problem (rng is the env's seeded generator)."""
        raise NotImplementedError

    def score(self, problem: Problem, response: str) -> VerifyResult:
        """Score one response; must never raise on bad model output (score 0 instead)."""
        raise NotImplementedError

    def score_batch_async(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[Future]:
        """Score many responses; one Future[VerifyResult] each. Override for parallel verifiers."""
        if len(problems) != len(responses):
            raise ValueError(f"score_batch: {len(problems)} problems but {len(responses)} responses")
        futures = []
        for problem, response in zip(problems, responses):
            fut: Future = Future()
            fut.set_result(self.score(problem, response))
            futures.append(fut)
        return futures

    def score_deadline_s(self, num_answers: int) -> float:
        """How long waiting for ``num_answers`` scores may take before it is an error (a stuck
        verifier must fail loudly, not hang the run). Override with a bound that fits the verifier."""
        return 600.0

    # ------------------------------------------------------------------ batch API
    def draw_problem(self, rng: np.random.Generator) -> Problem:
        """The next problem of this env's split (``sample_problem`` redrawn until it is in it)."""
        if self.split == "all":
            return self.sample_problem(rng)
        want_heldout = self.split == "heldout"
        for _ in range(SPLIT_DRAWS):
            problem = self.sample_problem(rng)
            if in_heldout_split(problem.id, self.heldout_fraction) == want_heldout:
                return problem
        raise ValueError(f"{type(self).__name__}: no problem of split {self.split!r} (heldout_fraction "
                         f"{self.heldout_fraction}) in {SPLIT_DRAWS} draws")

    def turn_end(self, text: str) -> int | None:
        """Where the model's turn ends, if the env ends it before the model does: the length of
        the turn's text up to its turn-end marker (e.g. the closing fence of a code block), or
        None. The trainer keeps the turn's tokens up to there and drops the rest (a prefix of a
        sample is a sample of it: still on-policy)."""
        return None

    def new_episode(self, problem: Problem) -> "TextEnv":
        """An env for one episode of ``problem``, reset on it: a shallow copy of this one (its data,
        verifier and tools shared, its episode state its own), so many episodes run at once."""
        episode = copy.copy(self)
        episode.reset(options={"problem": problem})
        return episode

    def seed_problems(self, seed: int) -> None:
        """Seed the problem stream without drawing a problem (the trainer's start)."""
        self._np_random, self._np_random_seed = seeding.np_random(seed)

    def sample_problems(self, n: int) -> list[Problem]:
        """Draw n problems (the trainer's batch path; no episode state is touched)."""
        return [self.draw_problem(self.np_random) for _ in range(n)]

    def score_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[VerifyResult]:
        futures = self.score_batch_async(problems, responses)
        return wait_all(futures, self.score_deadline_s(len(futures)), f"{type(self).__name__}.score_batch: scores")

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        """Start an episode. ``options={"problem": Problem}`` poses a given problem."""
        super().reset(seed=seed)
        problem = (options or {}).get("problem")
        self.problem = problem if problem is not None else self.draw_problem(self.np_random)
        self.turn = 0
        self._last_text = self.problem.prompt
        return self.problem.prompt, self._info()

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        """Score the response; single-turn: terminated=True and an empty observation."""
        if self.problem is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before reset()")
        response = self._clip(action)
        result = self.score(self.problem, response)
        self.turn += 1
        self._last_text = self.problem.prompt + response
        return "", float(result.reward), True, False, {**self._info(), **result.as_info()}

    def render(self) -> str | None:
        return self._last_text if self.render_mode == "ansi" else None

    def _info(self) -> dict:
        return {"task_id": self.problem.id, "turn": self.turn}

    def _clip(self, response: Any) -> str:
        text = response if isinstance(response, str) else str(response)
        return text[-self.max_response_chars:]


def in_heldout_split(problem_id: str, fraction: float) -> bool:
    """Is ``problem_id`` in the held-out part? A stable hash of the id (not Python's salted
    ``hash``), so the split is the same in every process and run."""
    digest = hashlib.sha256(problem_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


class RetryWithFeedback(TextEnv):
    """Multi-turn wrapper: a wrong answer gets ``max_retries`` more tries, with feedback.

    The observation after a wrong answer is the feedback (the new text only: the conversation so
    far is the trainer's, or ``render()``'s); the episode ends on a correct answer or when the
    retries run out. Reward: the verifier's reward of the final answer, times ``retry_discount``
    per retry used.
    """

    def __init__(
        self,
        env: TextEnv,
        max_retries: int = 1,
        feedback: str = "\nThat is not correct. Try again.\n",
        retry_discount: float = 1.0,
    ):
        # The inner env's split applies to the episodes (draw_problem filters the inner draws).
        super().__init__(env.observation_space.max_length * (max_retries + 2), env.max_response_chars,
                         split=env.split, heldout_fraction=env.heldout_fraction)
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.env, self.max_retries, self.feedback, self.retry_discount = env, max_retries, feedback, retry_discount
        self._transcript = ""

    @property
    def max_turns(self) -> int:
        return self.max_retries + 1

    def sample_problem(self, rng: np.random.Generator) -> Problem:
        return self.env.sample_problem(rng)

    def score(self, problem: Problem, response: str) -> VerifyResult:
        return self.env.score(problem, response)

    def score_batch_async(self, problems, responses) -> list[Future]:
        return self.env.score_batch_async(problems, responses)

    def score_deadline_s(self, num_answers: int) -> float:
        return self.env.score_deadline_s(num_answers)

    @property
    def skipped_rows(self) -> int:
        return self.env.skipped_rows

    def close(self) -> None:
        self.env.close()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        obs, info = super().reset(seed=seed, options=options)
        self._transcript = obs
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self.problem is None:
            raise RuntimeError("RetryWithFeedback.step() called before reset()")
        response = self._clip(action)
        result = self.score(self.problem, response)
        self.turn += 1
        self._transcript += response
        info = {**self._info(), **result.as_info()}
        if result.correct or self.turn > self.max_retries:
            reward = float(result.reward) * self.retry_discount ** (self.turn - 1)
            self._last_text = self._transcript
            return "", reward, True, False, info
        self._transcript += self.feedback
        self._last_text = self._transcript
        return self.feedback, 0.0, False, False, info
