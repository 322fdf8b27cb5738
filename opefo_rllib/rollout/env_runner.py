"""LLMEnvRunner: an RLlib EnvRunner that turns text-env prompts into on-policy rollouts.

One ``sample()``: draw B problems from the Gymnasium text env and turn their prompts into token
ids with the model's own tokenizer (:mod:`opefo_rllib.rollout.prompts`: raw or chat format; a
prompt over ``max_prompt_tokens`` is replaced by another problem), send the B prompt groups to
the engine fleet (G samples each, each group whole on one engine call), and verify each call's
groups as soon as that call is done, so verification overlaps the generation of the rest.
Every rollout carries its prompt group and the weight version that generated it.

The fleet is the Algorithm's (it builds, syncs and shuts it down): the runner samples through
the fleet it is given (``use_fleet``). A batch is ``start``-ed (drawn and submitted) and
``finish``-ed (collected, verified, filtered) into a :class:`Sampled` (rollouts, the batch's
metrics and timings); ``finish(..., on_chunk=f)`` hands each engine call's verified groups to
``f`` as they are done (the streaming pipeline: ``start(chunks=k)`` sends each engine's share as
k calls). The async pipeline starts the next batch before the update and finishes it after
(``start_ahead`` / ``finish_ahead`` / ``next_batch``); a checkpoint records that batch, finished,
beside the runner's counters (``env_runner/batch_ahead.json``, :mod:`opefo_rllib.rollout.ahead_record`),
so a resumed run trains on it once. ``filter_groups: zero_variance`` (DAPO's
dynamic sampling) drops groups whose rewards are all equal and refills them with new prompts;
the soft overlong penalty is applied to the reward here, before advantages.

Multi-turn envs (``max_turns`` above 1: ``opefo/ArithmeticRetry-v0``, ``opefo/MathTool-v0``) are
sampled as episodes (:mod:`opefo_rllib.rollout.episodes`): each engine call's groups go on as a
unit on that engine, one call per turn for the episodes still running (seeded from the call's
seed and the turn, so a run repeats), and the unit is handed on when its last episode ends. Every
turn of a batch is sampled before the next weight sync, so an episode's turns share one weight
version under every pipeline (async: the version before the update, as a single-turn sample).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.checkpoints import Checkpointable

from opefo_rllib.envs import TextEnv, make_env
from opefo_rllib.envs.registry import import_env_modules
from opefo_rllib.envs.pool import wait_all
from opefo_rllib.fleet.engine import SamplingConfig
from opefo_rllib.fleet.fleet import EngineFleet
from opefo_rllib.rollout.ahead_record import AHEAD_FILE, from_record, read_record, to_record, write_record
from opefo_rllib.rollout.batch import Rollout
from opefo_rllib.rollout.episodes import (EpisodeStepper, EpisodeUnit, call_args, episode_limits, episode_metrics,
                                          is_multi_turn)
from opefo_rllib.rollout.prompts import PromptBuilder, draw_prompts, response_text

__all__ = ["LLMEnvRunner", "Sampled", "overlong_penalty"]

logger = logging.getLogger(__name__)


class LLMEnvRunner(EnvRunner, Checkpointable):
    """Samples ``prompts_per_batch`` x ``group_size`` responses per call from the engine fleet."""

    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        from opefo_rllib.models.loading import resolve_model_path

        c = self.config
        import_env_modules(c.imports)  # the run's own env modules, in whichever process builds the env
        self.env: TextEnv = make_env(c.env, **dict(c.env_config or {}))
        self.env.seed_problems(c.seed if c.seed is not None else 0)  # draws nothing: no item is skipped
        model_dir = resolve_model_path(c.model_path)
        self.tokenizer = _load_tokenizer(c.model_path, model_dir)
        self.prompts = PromptBuilder(self.tokenizer, c)
        # Multi-turn envs: their episodes are stepped turn by turn (None: single-turn, scored in batches).
        self.episodes = EpisodeStepper(self.prompts, episode_limits(self.env, c), c.env_step_workers) \
            if is_multi_turn(self.env) else None
        self.sampling = SamplingConfig(temperature=c.temperature, max_new_tokens=c.max_new_tokens,
                                       top_p=c.top_p, top_k=c.top_k, seed=c.seed or 0,
                                       stop_token_ids=tuple(c.stop_token_ids or ()))
        self.fleet: EngineFleet | None = None  # the Algorithm's, given by use_fleet
        self._next_group_id = 0
        self._sample_calls = 0
        self._ahead: _Started | Sampled | None = None  # async: the batch generated during the update
        self._ahead_in_file = False  # the restored state's batch ahead is in its batch_ahead.json

    def use_fleet(self, fleet: EngineFleet) -> None:
        """Sample through ``fleet`` from now on (the Algorithm owns it: builds, syncs, stops it)."""
        self.fleet = fleet

    @override(EnvRunner)
    def assert_healthy(self):
        assert self.env is not None, "LLMEnvRunner has no env"

    @override(EnvRunner)
    def get_spaces(self):
        spaces = (self.env.observation_space, self.env.action_space)
        return {"__env__": spaces, DEFAULT_MODULE_ID: spaces}

    @override(EnvRunner)
    def sample(self, **kwargs) -> "Sampled":
        """One whole batch, generated now with the engines' current weights (the sync pipeline)."""
        return self.finish(self.start())

    # ------------------------------------------------------------------ one batch, in two halves
    def start(self, n_prompts: int | None = None, refill_round: int = 0, chunks: int = 1) -> "_Started":
        """Draw a batch's problems and start their generation (returns at once); ``chunks`` calls
        per engine (streaming)."""
        c = self.config
        step = self._sample_calls
        draw = draw_prompts(self.env, self.prompts, n_prompts or c.prompts_per_batch, env_name=str(c.env))
        group_ids = list(range(self._next_group_id, self._next_group_id + len(draw.problems)))
        self._next_group_id += len(draw.problems)
        seed = (c.seed or 0) * 100_003 + step + 1_000_000_007 * refill_round  # a refill round: other samples
        pending = self.fleet.submit(draw.prompt_ids, c.group_size, self.sampling, seed=seed, chunks=chunks)
        return _Started(step, draw, group_ids, pending, time.perf_counter(), chunks)

    def finish(self, started: "_Started", on_chunk: Callable[[list[Rollout]], None] | None = None) -> "Sampled":
        """Wait for a started batch and verify it, each engine call's share as soon as it is done
        (handed to ``on_chunk`` then: whole prompt groups, zero-variance groups already dropped
        under ``filter_groups``, then the refill rounds' shares); with ``filter_groups``, dropped
        groups are refilled with new prompts. Returns the batch with its metrics and timings."""
        c = self.config
        timings = {"generate_s": 0.0, "verify_s": 0.0, "engine_busy_s": 0.0}
        rollouts: list[Rollout] = []
        filtered = rounds = groups = 0
        skipped_long = started.draw.skipped_too_long
        current, dropped = started, 0
        while True:
            busy: dict[int, float] = {}
            for chunk, timing in self._collect(current, busy):
                timings["generate_s"] += timing["generate_s"]
                timings["verify_s"] += timing["verify_s"]
                if c.filter_groups == "zero_variance":
                    chunk, n_dropped = _drop_zero_variance(chunk)
                    dropped += n_dropped
                groups += len({r.group_id for r in chunk})
                self.num_env_steps_sampled_lifetime += len(chunk)
                if chunk:
                    if on_chunk is not None:
                        on_chunk(chunk)
                    rollouts += chunk
            timings["engine_busy_s"] += max(busy.values(), default=0.0)
            filtered += dropped
            if not dropped or rounds >= c.max_refill_rounds:
                break
            rounds += 1
            current = self.start(n_prompts=dropped, refill_round=rounds, chunks=started.chunks)
            skipped_long += current.draw.skipped_too_long
            dropped = 0
        shortfall = c.prompts_per_batch - groups
        if shortfall > 0:
            logger.warning("step %d: the batch is %d of %d prompt groups short after %d refill rounds of "
                           "filter_groups (every group of those had equal rewards)", started.step, shortfall,
                           c.prompts_per_batch, rounds)
        self._sample_calls += 1
        metrics = {"data/skipped_rows": float(self.env.skipped_rows),
                   "rollout/prompts_skipped_too_long": float(skipped_long),
                   "rollout/groups_filtered": float(filtered), "rollout/refill_rounds": float(rounds),
                   "rollout/batch_shortfall": float(max(shortfall, 0))}
        if self.episodes is not None:
            metrics.update(episode_metrics(rollouts))
        return Sampled(rollouts, metrics, timings)

    def _collect(self, started: "_Started", busy: dict[int, float]):
        """Each engine call's rollouts, verified, as the calls finish, with its (generate_s,
        verify_s) share of the batch's timings; ``busy`` sums each engine's own generation time."""
        if self.episodes is not None:
            yield from self._collect_episodes(started, busy)
            return
        c = self.config
        step, problems, prompts = started.step, started.draw.problems, started.draw.prompt_ids
        # What the model saw, special tokens (chat markers) included: for the TensorBoard samples.
        prompt_texts = [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
        pending, last = started.pending, started.at
        while pending:
            idx, results, seconds, pending, engine = self.fleet.wait_any(pending, step)
            gen_done = time.perf_counter()
            busy[engine] = busy.get(engine, 0.0) + seconds
            texts, probs = [], []
            for k, group in zip(idx, results):
                for res in group:
                    texts.append(response_text(self.tokenizer, res.response_ids, res.finished))
                    probs.append(problems[k])
            futures = self.env.score_batch_async(probs, texts)
            # The next calls are generated meanwhile: waiting here costs the pipeline nothing
            # until the last one (sync's verify_s is that last wait).
            wait_all(futures, self.env.score_deadline_s(len(futures)),
                     f"LLMEnvRunner.sample (step {step}, env {c.env!r}): verifying answers")
            rollouts = []
            flat = [res for group in results for res in group]
            for res, text, fut in zip(flat, texts, futures):
                verdict = fut.result()  # done: wait_all waited for it
                k = idx[res.prompt_index]
                rollouts.append(Rollout(
                    group_id=started.group_ids[k], prompt_ids=prompts[k], response_ids=res.response_ids,
                    sampling_logp=res.sampling_logp,
                    reward=float(verdict.reward) - overlong_penalty(len(res.response_ids), c),
                    weight_version=res.weight_version, correct=bool(verdict.correct), finished=res.finished,
                    task_id=problems[k].id, prompt_text=prompt_texts[k], response_text=text,
                    info={"format_ok": verdict.format_ok, "timed_out": verdict.timed_out,
                          "error": verdict.error is not None}))
            end = time.perf_counter()
            # generate_s: submit to the last call's answer, as the driver saw it (waits for
            # verification excluded); verify_s: the waits for verdicts.
            timing = {"generate_s": gen_done - last, "verify_s": end - gen_done}
            last = end
            yield rollouts, timing

    def _collect_episodes(self, started: "_Started", busy: dict[int, float]):
        """Multi-turn: each engine call's episodes, turn by turn on that engine, handed on (with
        their timings: ``verify_s`` is the env steps') when the last of them has ended."""
        c, step, draw = self.config, started.step, started.draw
        prompt_texts = [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in draw.prompt_ids]
        pending, last = list(started.pending), started.at
        while pending:
            idx, results, seconds, pending, engine = self.fleet.wait_any(pending, step)
            gen_done = time.perf_counter()
            busy[engine] = busy.get(engine, 0.0) + seconds
            if isinstance(idx, EpisodeUnit):  # a later turn of a unit's running episodes
                unit = idx
            else:  # a unit's first turn: group_size samples of each of its problems
                pick = list(idx)
                episodes = self.episodes.start(self.env, [draw.problems[k] for k in pick],
                                               [started.group_ids[k] for k in pick],
                                               [draw.prompt_ids[k] for k in pick], [prompt_texts[k] for k in pick],
                                               c.group_size)
                unit = EpisodeUnit(episodes, episodes, 1, call_args(started.pending, idx))
            next_turn = self.episodes.play(unit, results, self.fleet, engine)
            end = time.perf_counter()
            timing = {"generate_s": gen_done - last, "verify_s": end - gen_done}
            last = end
            if next_turn is not None:
                pending.append(next_turn)
                yield [], timing
            else:
                yield [ep.to_rollout(c.episode_reward) for ep in unit.episodes], timing

    # ------------------------------------------------------------------ the async pipeline's batch ahead
    def next_batch(self) -> "Sampled":
        """async: the batch generated during the last update (with the weights before it; after a
        resume, the checkpoint's), or, when none is ahead (the first step, a resumed run of a
        checkpoint without the record), one sampled now."""
        ahead, self._ahead = self._ahead, None
        if isinstance(ahead, Sampled):
            return ahead
        return self.finish(ahead) if ahead is not None else self.sample()

    def start_ahead(self) -> None:
        """async: start the next batch now, with the engines' current weights, so it is generated
        while the learner trains on this one."""
        self._ahead = self.start()

    def finish_ahead(self) -> "Sampled":
        """async: wait for the batch ahead and verify it (after the update, before the weight sync,
        so a sync never waits behind a generation); returns it (``next_batch`` hands it out next)."""
        if not isinstance(self._ahead, Sampled):
            self._ahead = self.finish(self._ahead)
        return self._ahead

    @override(EnvRunner)
    def get_metrics(self) -> dict:
        """Nothing: each batch's metrics come back with it (``Sampled.metrics``), so the algorithm
        logs those of the batch it trains on, not of the one generated ahead."""
        return {}

    @override(Checkpointable)
    def get_ctor_args_and_kwargs(self):
        return (), {"config": self.config}

    @override(Checkpointable)
    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        """The counters, env RNG and dataset position; under async also the batch ahead (finished
        first if still in flight), drawn with these counters and trained on next (``batch_ahead``)."""
        state: dict[str, Any] = {"sample_calls": self._sample_calls,
                                 "next_group_id": self._next_group_id,
                                 "env_rng": self.env.np_random.bit_generator.state}
        dataset = getattr(self.env, "dataset", None)
        if dataset is not None:
            state["dataset"] = dataset.state_dict()
        if self._ahead is not None:
            ahead = self.finish_ahead()
            state["batch_ahead"] = to_record(ahead.rollouts, ahead.metrics, ahead.timings)
        return state

    @override(Checkpointable)
    def set_state(self, state: dict[str, Any]) -> None:
        if not state or "sample_calls" not in state:
            return  # RLlib's initial module-state sync: nothing of ours in it
        self._sample_calls = int(state["sample_calls"])
        self._next_group_id = int(state["next_group_id"])
        self.env.np_random.bit_generator.state = state["env_rng"]
        if "dataset" in state and getattr(self.env, "dataset", None) is not None:
            self.env.dataset.load_state_dict(state["dataset"])
        # A checkpoint of a run without a batch ahead (sync, streaming; or written before the record
        # existed, when its runner state was that before the batch's draw: it is drawn again) has none.
        self._ahead = self._restored_ahead(state.get("batch_ahead"))
        self._ahead_in_file = state.get("batch_ahead_file") == AHEAD_FILE

    @override(Checkpointable)
    def save_to_path(self, path=None, *, state=None, filesystem=None, use_msgpack=False) -> str:
        """RLlib's, with the batch ahead as JSON (``batch_ahead.json``) beside the pickled counters."""
        state = dict(state if state is not None else self.get_state())
        record = state.pop("batch_ahead", None)
        if record is not None:
            state["batch_ahead_file"] = AHEAD_FILE
        out = super().save_to_path(path, state=state, filesystem=filesystem, use_msgpack=use_msgpack)
        if record is not None:
            write_record(out, record, filesystem)
        return out

    @override(Checkpointable)
    def restore_from_path(self, path, *, component=None, filesystem=None, **kwargs) -> None:
        super().restore_from_path(path, component=component, filesystem=filesystem, **kwargs)
        if component is None and self._ahead_in_file:
            record = read_record(path, filesystem)
            if record is None:  # the counters are past that batch: resuming without it would skip it
                from opefo_rllib.checkpoints import CheckpointError

                raise CheckpointError(f"{path}: the runner state says the batch ahead is in {AHEAD_FILE}, "
                                      "which is missing; this checkpoint cannot be resumed")
            self._ahead = self._restored_ahead(record, where=f"{path}/{AHEAD_FILE}")

    def _restored_ahead(self, record: dict | None, where: str = "the runner state") -> "Sampled | None":
        """The checkpoint's batch ahead, to train on next (async only)."""
        if record is None:
            return None
        if self.config.pipeline != "async":
            logger.warning("the checkpoint's batch ahead (%d samples) is dropped: pipeline is %r, not async",
                           len(record.get("rollouts", ())), self.config.pipeline)
            return None
        return Sampled(*from_record(record, where))

    @override(EnvRunner)
    def stop(self) -> None:
        """Close the env (its verifier's worker processes); idempotent. RLlib calls it from
        ``algo.stop()``; the fleet is the Algorithm's to shut down."""
        if getattr(self, "episodes", None) is not None:
            self.episodes.close()
        if getattr(self, "env", None) is not None:
            self.env.close()


@dataclasses.dataclass
class Sampled:
    """A finished batch: its rollouts, its ``data/`` and ``rollout/`` counters (skipped rows,
    filtered groups, refill rounds, shortfall), and its timings (``generate_s``, ``verify_s``,
    ``engine_busy_s``: the busiest engine's own generation seconds)."""

    rollouts: list[Rollout]
    metrics: dict[str, float]
    timings: dict[str, float]


@dataclasses.dataclass
class _Started:
    """A batch whose generation has started: its step, prompts, group ids and pending engine calls."""

    step: int
    draw: Any
    group_ids: list[int]
    pending: list
    at: float
    chunks: int = 1


def overlong_penalty(n_tokens: int, c: Any) -> float:
    """DAPO's soft overlong punishment: 0 up to max_new_tokens - overlong_buffer_len tokens, then
    rising linearly to overlong_penalty at max_new_tokens (0 when overlong_buffer_len is None)."""
    buffer = c.overlong_buffer_len
    if buffer is None:
        return 0.0
    excess = n_tokens - (c.max_new_tokens - buffer)
    return float(c.overlong_penalty) * min(max(excess, 0), buffer) / buffer


def _drop_zero_variance(rollouts: list[Rollout]) -> tuple[list[Rollout], int]:
    """The rollouts of groups whose rewards differ, and how many groups were dropped."""
    groups: dict[int, list[Rollout]] = {}
    for r in rollouts:
        groups.setdefault(r.group_id, []).append(r)
    keep = [g for g in groups.values() if len({r.reward for r in g}) > 1]
    return [r for g in keep for r in g], len(groups) - len(keep)


def _load_tokenizer(model_path: str, model_dir):
    """The model directory's tokenizer; a missing or unusable one is a ConfigError naming the field."""
    from opefo_rllib.config.fields import ConfigError
    from opefo_rllib.models.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(model_dir)
    except TokenizerError as e:
        raise ConfigError(f"config field 'model_path' = {model_path!r}: {e}") from None
