"""opefo/Math-v0: any dataset of problems with reference answers, verified with math-verify.

MATH, GSM8K, DAPO-Math, or the benchmark sets: load them with ``load_problems`` (or pass
``data_files=``), and the env poses each problem through a prompt template and scores answers
with ``MathVerifier`` in its pool of worker processes.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Sequence

import numpy as np

from opefo_rllib.envs.base import Problem, TextEnv
from opefo_rllib.envs.datasets import ProblemDataset, load_problems
from opefo_rllib.envs.verifier import MathVerifier, VerifyResult, shared_math_verifier

__all__ = ["MathEnv", "DEFAULT_MATH_TEMPLATE"]

log = logging.getLogger(__name__)

DEFAULT_MATH_TEMPLATE = "{problem}\nLet's think step by step and output the final answer within \\boxed{{}}."


class MathEnv(TextEnv):
    """Math word problems with reference answers.

    Args:
        data_files: one path or a list of paths (JSONL / Parquet / CSV / HF dataset dirs).
        problems: already-loaded problems (instead of data_files).
        template: prompt template with ``{problem}``.
        shuffle, seed: the deterministic order of the problem stream.
        verifier: a MathVerifier (default: the process-wide shared one).
        loader_kwargs: passed to ``load_problems`` (field names, on_bad_row, split, ...).

    ``skipped_rows`` counts the bad rows ``on_bad_row="skip"`` dropped (each logged with its
    file:line); ``close()`` stops the verifier's worker processes (they restart if used again).
    """

    def __init__(
        self,
        data_files: str | Sequence[str] | None = None,
        problems: Sequence[Problem] | None = None,
        template: str = DEFAULT_MATH_TEMPLATE,
        shuffle: bool = True,
        seed: int = 0,
        verifier: MathVerifier | None = None,
        loader_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if "{problem}" not in template:
            raise ValueError("MathEnv template must contain {problem}")
        if problems is None:
            if data_files is None:
                raise ValueError("MathEnv needs data_files= (JSONL / Parquet / CSV / HF dataset) or problems=; "
                                 "e.g. gymnasium.make('opefo/Math-v0', data_files='math_train.jsonl')")
            problems = self._load(data_files, loader_kwargs or {})
        self.dataset = ProblemDataset(list(problems), shuffle=shuffle, seed=seed)
        self.template = template
        self._verifier = verifier

    def _load(self, data_files, loader_kwargs: dict) -> list[Problem]:
        files = [data_files] if isinstance(data_files, (str, bytes)) or not isinstance(data_files, Sequence) \
            else list(data_files)
        loaded = [load_problems(f, **loader_kwargs) for f in files]
        self.skipped_rows = sum(len(lp.skipped) for lp in loaded)
        if self.skipped_rows:
            log.warning("MathEnv: %d bad dataset rows skipped (on_bad_row='skip'); each is logged above",
                        self.skipped_rows)
        return [p for lp in loaded for p in lp.problems]

    @property
    def verifier(self) -> MathVerifier:
        return self._verifier if self._verifier is not None else shared_math_verifier()

    def seed_problems(self, seed: int) -> None:
        super().seed_problems(seed)
        self.dataset.reseed(seed)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.dataset.reseed(seed)
        return super().reset(seed=seed, options=options)

    def sample_problem(self, rng: np.random.Generator) -> Problem:
        p = next(self.dataset)
        return Problem(id=p.id, prompt=self.template.format(problem=p.prompt), answer=p.answer, meta=p.meta)

    def score(self, problem: Problem, response: str) -> VerifyResult:
        return self.verifier.verify(response, problem.answer)

    def score_batch_async(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[Future]:
        return self.verifier.verify_batch_async(responses, [p.answer for p in problems])

    def score_deadline_s(self, num_answers: int) -> float:
        return self.verifier.wait_deadline_s(num_answers)

    def close(self) -> None:
        self.verifier.close()  # idempotent; the verifier restarts its workers if used again
        super().close()
