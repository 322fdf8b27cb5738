"""One problem set through an EngineFleet, scored by its env's verifier.

Per chunk of problems: a greedy call (n = 1) and a sampled call (n = K) go to the fleet at once
(each prompt group whole on one engine); as each engine's share comes back it is decoded and
handed to ``env.score_batch_async``, so verification (math-verify worker processes for
opefo/Math-v0) overlaps the generation of the rest. A multi-turn env's answers are episodes,
played turn by turn as in training (each with its env's own ``max_turns``); an episode's outcome
is its final reward, its length its model tokens. The fleet serves whatever weights it holds:
the trainer's current policy during training, the model under test in ``opefo eval``.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from opefo_rllib.envs.pool import wait_all
from opefo_rllib.envs.verifier import VerifyResult
from opefo_rllib.evaluation.codec import Codec
from opefo_rllib.evaluation.metrics import summarize
from opefo_rllib.config.eval_spec import GREEDY_TEMPERATURE, EvalSpec
from opefo_rllib.evaluation.tasks import EvalTask
from opefo_rllib.fleet.engine import GenerationResult, SamplingConfig
from opefo_rllib.rollout.episodes import Episode, EpisodeStepper, EpisodeUnit, call_args, episode_limits, is_multi_turn

__all__ = ["TaskReport", "GenerationProgress", "evaluate_task", "eval_fleet"]

# Multi-turn tasks are evaluated with their env's own turn limit and no token budget, rewarded by
# their final step, eight episodes' env steps at once.
EVAL_EPISODES = SimpleNamespace(max_turns=None, max_episode_tokens=None, episode_reward="final", env_step_workers=8)


@dataclasses.dataclass(frozen=True)
class GenerationProgress:
    """How far one task's generation got, for a progress bar: tokens/s and an ETA while calls run.

    ``budget`` is answers x max_new_tokens; ``budget_done`` counts the tokens generated plus what
    each finished answer left unused, so it grows with every token and reaches ``budget`` at the end.
    """

    task: str
    answers_done: int
    answers: int
    tokens: int
    budget_done: int
    budget: int
    seconds: float


Progress = Callable[[GenerationProgress], None]


@dataclasses.dataclass
class TaskReport:
    """The metrics of one problem set, its per-problem records, and how long it took."""

    name: str
    metrics: dict[str, Any]
    records: list[dict[str, Any]]
    seconds: float


@dataclasses.dataclass
class _Outcome:
    length: int
    finished: bool
    reward: float
    correct: bool
    answer: str | None
    format_ok: bool


def _submit_chunk(fleet, prompts: list[list[int]], chunk: range, spec: EvalSpec, chunk_no: int):
    """Start the greedy and the sampled calls of one chunk; returns [(kind, pending)]."""
    passes = []
    if spec.greedy:
        passes.append(("greedy", 1, GREEDY_TEMPERATURE))
    if spec.samples:
        passes.append(("sampled", spec.samples, spec.temperature))
    calls = []
    for offset, (kind, n, temperature) in enumerate(passes):
        sampling = SamplingConfig(temperature=temperature, max_new_tokens=spec.max_new_tokens, seed=spec.seed,
                                  stop_token_ids=spec.stop_token_ids)
        seed = spec.seed * 1_000_003 + 2 * chunk_no + offset  # fixed per chunk: a rerun draws the same samples
        calls.append((kind, fleet.submit([prompts[i] for i in chunk], n, sampling, seed=seed)))
    return calls


def evaluate_task(fleet, codec: Codec, task: EvalTask, spec: EvalSpec, step: int = 0,
                  progress: Progress | None = None) -> TaskReport:
    """Generate, score and summarise ``task`` on ``fleet`` (an EngineFleet); ``step`` names the
    training iteration in timeout errors."""
    start = time.perf_counter()
    scoring = _generate(fleet, codec, task, spec, step, progress)
    futures = [f for *_, fs in scoring for f in fs]
    wait_all(futures, task.env.score_deadline_s(len(futures)), f"evaluating {task.name}: verifying answers")
    greedy, sampled = _outcomes(scoring, len(task.problems), spec.samples)
    metrics = _metrics(greedy, sampled, spec)
    if task.excluded:
        metrics["excluded_training_draws"] = task.excluded
    seconds = time.perf_counter() - start
    metrics["seconds"] = seconds
    return TaskReport(task.name, metrics, _records(task.problems, greedy, sampled), seconds)


def _generate(fleet, codec: Codec, task: EvalTask, spec: EvalSpec, step: int, progress: Progress | None) -> list:
    """Every chunk through the fleet; each engine's share is handed to the verifier as it arrives.
    Returns [(kind, problem indices, generation results, verdict futures)]."""
    problems = task.problems
    prompts = [codec.encode(p.prompt, p.id) for p in problems]
    tally = _Tally(task.name, len(problems) * (int(spec.greedy) + spec.samples), spec.max_new_tokens, progress)
    if is_multi_turn(task.env):
        return _generate_episodes(fleet, codec, task, spec, step, prompts, tally)
    scoring = []
    for chunk_no, first in enumerate(range(0, len(problems), spec.chunk_problems)):
        chunk = range(first, min(first + spec.chunk_problems, len(problems)))
        for kind, pending in _submit_chunk(fleet, prompts, chunk, spec, chunk_no):
            while pending:
                idx, results, _, pending, engine = fleet.wait_any(pending, step, on_progress=tally.running)
                tally.finished(engine, [len(r.response_ids) for group in results for r in group])
                rows = [chunk[i] for i in idx]
                texts = [codec.decode(r.response_ids, r.finished) for group in results for r in group]
                asked = [problems[k] for k, group in zip(rows, results) for _ in group]
                scoring.append((kind, rows, results, task.env.score_batch_async(asked, texts)))
    return scoring


def _generate_episodes(fleet, codec: Codec, task: EvalTask, spec: EvalSpec, step: int, prompts: list,
                       tally: "_Tally") -> list:
    """``_generate`` for a multi-turn env: every answer is an episode, played turn by turn on the
    engine of its first turn (as in training, with the env's own max_turns); each episode's
    outcome is its final reward and its model tokens."""
    problems, scoring = task.problems, []
    stepper = EpisodeStepper(codec.builder, episode_limits(task.env, EVAL_EPISODES), EVAL_EPISODES.env_step_workers)
    try:
        for chunk_no, first in enumerate(range(0, len(problems), spec.chunk_problems)):
            chunk = range(first, min(first + spec.chunk_problems, len(problems)))
            for kind, pending in _submit_chunk(fleet, prompts, chunk, spec, chunk_no):
                submitted = list(pending)
                while pending:
                    idx, results, _, pending, engine = fleet.wait_any(pending, step, on_progress=tally.running)
                    later = isinstance(idx, EpisodeUnit)
                    tally.finished(engine, [len(r.response_ids) for group in results for r in group],
                                   answers=not later)  # an answer counts at its first turn
                    if later:
                        unit = idx
                    else:
                        args, rows = call_args(submitted, idx), [chunk[i] for i in idx]
                        episodes = stepper.start(task.env, [problems[k] for k in rows], [0] * len(rows),
                                                 [prompts[k] for k in rows], [""] * len(rows), args[1])
                        unit = EpisodeUnit(episodes, episodes, 1, args, rows)
                    next_turn = stepper.play(unit, results, fleet, engine)
                    if next_turn is not None:
                        pending.append(next_turn)
                    else:
                        scoring.append((kind, unit.rows, *_episode_outcomes(unit.episodes, len(unit.rows))))
    finally:
        stepper.close()
    return scoring


def _episode_outcomes(episodes: list[Episode], rows: int) -> tuple[list, list]:
    """Finished episodes as the (results, verdict futures) a single-turn call's answers give: per
    row, its episodes as GenerationResults (their model tokens) and done futures of their rewards."""
    n = len(episodes) // rows
    results, futures = [], []
    for r in range(rows):
        group = []
        for s, ep in enumerate(episodes[r * n:(r + 1) * n]):
            model_ids = [t for t, m in zip(ep.ids, ep.action_mask) if m]
            group.append(GenerationResult(r, s, model_ids, [], min(ep.versions), ep.finished and not ep.cut))
            rollout = ep.to_rollout("final")
            verdict = VerifyResult(reward=rollout.reward, correct=rollout.correct,
                                   extracted=ep.last_info.get("extracted"), format_ok=rollout.info["format_ok"])
            done: Future = Future()
            done.set_result(verdict)
            futures.append(done)
        results.append(group)
    return results, futures


class _Tally:
    """The answers and tokens of one task's generation so far, reported to ``progress``: finished
    answers as calls return, the running calls' tokens from the engines' progress reports.

    A running call's count only grows here (per engine, the most seen since its last call
    returned): a report taken just after the call ended, before the fleet saw the result, says 0
    and must not move the bar back."""

    def __init__(self, task: str, answers: int, max_new_tokens: int, progress: Progress | None):
        self.task, self.answers, self.max_new_tokens, self.progress = task, answers, max_new_tokens, progress
        self.start = time.perf_counter()
        self.done = self.done_tokens = 0
        self.in_flight: dict[int, int] = {}  # engine -> tokens of its running call

    def running(self, reports) -> None:
        """``EngineFleet.wait_any``'s on_progress: the busy engines' tokens of their running calls."""
        for engine, r in reports.items():
            if r.call == "generate":
                self.in_flight[engine] = max(self.in_flight.get(engine, 0), r.call_tokens)
        self._report()

    def finished(self, engine: int, lengths: list[int], answers: bool = True) -> None:
        """A call on ``engine`` returned answers (or, ``answers`` False, later turns) of these lengths."""
        self.in_flight.pop(engine, None)
        self.done += len(lengths) if answers else 0
        self.done_tokens += sum(lengths)
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            running = sum(self.in_flight.values())
            self.progress(GenerationProgress(
                self.task, self.done, self.answers, self.done_tokens + running,
                self.done * self.max_new_tokens + running, self.answers * self.max_new_tokens,
                time.perf_counter() - self.start))


def _outcomes(scoring: list, num_problems: int, samples: int) -> tuple[list, list[list]]:
    """The greedy outcome [P] and the sampled outcomes [P][K] of verified generations."""
    greedy: list[_Outcome | None] = [None] * num_problems
    sampled: list[list[_Outcome | None]] = [[None] * samples for _ in range(num_problems)]
    for kind, rows, results, futures in scoring:
        verdicts = iter(f.result() for f in futures)
        for k, group in zip(rows, results):
            for res in group:
                v = next(verdicts)
                out = _Outcome(len(res.response_ids), res.finished, float(v.reward), bool(v.correct), v.extracted,
                               bool(v.format_ok))
                if kind == "greedy":
                    greedy[k] = out
                else:
                    sampled[k][res.sample_index] = out
    return greedy, sampled


def _matrix(rows: list[list], name: str) -> np.ndarray:
    """[P, K] array of one attribute of the outcomes."""
    return np.array([[getattr(o, name) for o in row] for row in rows], dtype=np.float64).reshape(len(rows), -1)


def _metrics(greedy: list, sampled: list[list], spec: EvalSpec) -> dict[str, Any]:
    rows = sampled if spec.samples else [[g] for g in greedy]  # lengths etc. of greedy when K = 0
    return summarize(_matrix(sampled, "correct"), [[o.answer for o in row] for row in sampled], _matrix(rows, "length"),
                     _matrix(rows, "finished"), _matrix(rows, "format_ok"), spec.pass_k,
                     np.array([g.correct for g in greedy], dtype=np.float64) if spec.greedy else None)


def _records(problems, greedy: list, sampled: list[list]) -> list[dict[str, Any]]:
    records = []
    for p, g, row in zip(problems, greedy, sampled):
        rec = {"id": p.id, "reference": p.answer, "answers": [o.answer for o in row],
               "rewards": [o.reward for o in row]}
        if g is not None:
            rec.update(greedy_answer=g.answer, greedy_reward=g.reward)
        records.append(rec)
    return records


def eval_fleet(engine: str, num_engines: int, model_dir, codec: Codec, num_cpus_per_engine: float,
               dtype: str = "float32", stall_timeout_s: float = 180.0, extra_engine_kwargs: dict | None = None):
    """An EngineFleet serving ``model_dir`` for ``opefo eval`` (Ray must be running); a call
    whose engine produced no token for ``stall_timeout_s`` ends the evaluation."""
    from opefo_rllib.fleet.fleet import EngineFleet

    engine_kwargs = {"model_path": str(model_dir), "eos_token_id": codec.eos_token_ids,
                     "pad_token_id": codec.pad_token_id, "dtype": dtype, **(extra_engine_kwargs or {})}
    return EngineFleet(kind=engine, num_engines=num_engines, engine_kwargs=engine_kwargs,
                       num_cpus_per_engine=num_cpus_per_engine, stall_timeout_s=stall_timeout_s)
