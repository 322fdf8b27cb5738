"""The rollout pipelines: how a GRPO iteration gets the batch it trains on.

One object per value of the ``pipeline`` field, chosen once in ``GRPO.setup`` (:func:`make_pipeline`);
``GRPO.training_step`` calls the same four steps of each around the learner's update:

    sample = pipeline.sample(step)            # the batch to train on, collated once
    ...learner update...
    timings = pipeline.before_sync(step, sample)  # what must end before the engines get new weights
    ...weight sync...
    pipeline.after_sync(step, rescore)        # what the engines do with the new weights meanwhile

and ``flush(step)`` before a checkpoint (a measurement still pending is logged first).

* :class:`SyncPipeline` - generate the batch now, with the weights of the last sync.
* :class:`StreamingPipeline` - the same batch and update, strictly on-policy, with the learner's
  training forward of each finished engine call (``stream_forward``) run while the rest are
  generated, and the last update's realized-change re-score (``measure_deferred_realized_change``)
  during this generation.
* :class:`AsyncPipeline` - train on the batch generated during the last update and start the next
  one first (one batch ahead, one version old: ``max_staleness`` bounds it in the learner); with
  fp32 HF engines the realized-change re-score runs on the engines behind the next generation.
  A checkpoint records the batch ahead in the runner's state (``env_runner/batch_ahead.json``):
  a resumed run trains on it first, as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

from opefo_rllib.rollout.batch import Rollout, concat_batches, learner_batch
from opefo_rllib.rollout.env_runner import LLMEnvRunner

__all__ = ["Sample", "Pipeline", "SyncPipeline", "StreamingPipeline", "AsyncPipeline", "PIPELINES", "make_pipeline"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Sample:
    """The batch an iteration trains on: its rollouts, its learner tensors, the runner's counters
    of it, its generation timings (``generate_s``, ``verify_s``, ``engine_busy_s``) and the learner
    seconds spent while it was generated (streaming)."""

    rollouts: list[Rollout]
    batch: dict[str, Any]
    metrics: dict[str, float]
    timings: dict[str, float]
    learner_in_flight_s: float = 0.0


class Pipeline:
    """Args:
        config: the GRPOConfig.
        runner: the env runner that samples through the fleet.
        run_on_learner: ``run_on_learner(fn, what)`` -> ``fn(learner)``'s result (rank 0's).
        log_at: ``log_at(metrics, step)`` writes scalars to TensorBoard at an earlier step.
    """

    def __init__(self, config: Any, runner: LLMEnvRunner, run_on_learner: Callable[..., Any],
                 log_at: Callable[[dict[str, float], int], None]):
        self.config, self.runner, self.run_on_learner, self.log_at = config, runner, run_on_learner, log_at

    def sample(self, step: int) -> Sample:
        raise NotImplementedError

    def before_sync(self, step: int, sample: Sample) -> dict[str, float]:
        """After the update, before the weight sync; the generation timings to log this iteration."""
        return sample.timings

    def after_sync(self, step: int, rescore: dict | None) -> None:
        """After the weight sync. ``rescore``: the learner's request that the engines re-score the
        batch (async only asks)."""

    def flush(self, step: int) -> None:
        """Before a checkpoint: log what is still being measured."""

    def _collate(self, rollouts: list[Rollout]) -> dict[str, Any]:
        c = self.config
        return learner_batch(rollouts, self.runner.tokenizer.pad_token_id, c.adv_estimator, c.verify_failure_policy,
                             c.mask_truncated)

    def _sample_from(self, sampled) -> Sample:
        return Sample(sampled.rollouts, self._collate(sampled.rollouts), sampled.metrics, sampled.timings)


class SyncPipeline(Pipeline):
    """The batch, generated now with the engines' current weights."""

    def sample(self, step: int) -> Sample:
        return self._sample_from(self.runner.sample())


class StreamingPipeline(Pipeline):
    """Strict on-policy, the sync update; the learner's forwards run between the engine calls."""

    def sample(self, step: int) -> Sample:
        started = self.runner.start(chunks=self.config.stream_chunks)
        t0 = time.perf_counter()
        self._log_deferred_realized_change(step)  # the engines generate meanwhile
        learner_s = time.perf_counter() - t0
        parts: list[dict[str, Any]] = []

        def forward(chunk: list[Rollout]) -> None:
            nonlocal learner_s
            # whole prompt groups: their advantages and masks are those they have in the whole batch
            part = self._collate(chunk)
            t = time.perf_counter()
            self.run_on_learner(lambda learner, b=part, r=sum(len(p["input_ids"]) for p in parts):
                                learner.stream_forward(b, r), what=f"a streamed forward of iteration {step + 1}")
            learner_s += time.perf_counter() - t
            parts.append(part)

        sampled = self.runner.finish(started, on_chunk=forward)
        return Sample(sampled.rollouts, concat_batches(parts, self.runner.tokenizer.pad_token_id), sampled.metrics,
                      sampled.timings, learner_in_flight_s=learner_s)

    def flush(self, step: int) -> None:
        self._log_deferred_realized_change(step)  # it may move the closed loop, which is saved

    def _log_deferred_realized_change(self, step: int) -> None:
        """The realized entropy change of the update of iteration ``step`` (measured now, with the
        weights right after it), into TensorBoard at that iteration."""
        if not self.config.measure_realized_change:
            return
        metrics = self.run_on_learner(lambda learner: learner.measure_deferred_realized_change(),
                                      what=f"the realized entropy change of iteration {step}")
        if metrics:  # TensorBoard only: RLlib's result of this iteration is about this iteration
            self.log_at(metrics, step)


class AsyncPipeline(Pipeline):
    """One batch ahead: generation overlaps the update; the engines re-score the realized change."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._engine_rescore: tuple[int, dict, list] | None = None  # (TensorBoard step, learner's numbers, calls)

    def sample(self, step: int) -> Sample:
        sampled = self.runner.next_batch()  # generated during the last update
        self.runner.start_ahead()  # the next one, generated during this update
        return self._sample_from(sampled)

    def before_sync(self, step: int, sample: Sample) -> dict[str, float]:
        self._collect_engine_rescore()  # the last step's, scored by the engines during this update
        # the engines are done with the batch ahead before they get the new weights
        return self.runner.finish_ahead().timings

    def after_sync(self, step: int, rescore: dict | None) -> None:
        if rescore is not None:  # the engines hold this step's weights: score its batch behind the next generation
            self._engine_rescore = (step + 1, rescore,
                                    self.runner.fleet.submit_entropy(rescore["sequences"], self.config.temperature))

    def flush(self, step: int) -> None:
        self._collect_engine_rescore()  # so a resumed run's TensorBoard has it

    def _collect_engine_rescore(self) -> None:
        """The realized entropy change of the last step, from the engines' re-score, into
        TensorBoard at that step. An engine that failed costs this one measurement (a warning),
        never the run."""
        if self._engine_rescore is None:
            return
        step, known, calls = self._engine_rescore
        self._engine_rescore = None
        try:
            after_sum, tokens = self.runner.fleet.collect_entropy(calls, step)
        except Exception as err:  # noqa: BLE001 - a diagnostic: the engines' own failures are handled by sampling
            logger.warning("the realized entropy change of iteration %d is not measured: the engines' re-score "
                           "failed (%s)", step, err)
            return
        if tokens != known["tokens"]:
            logger.warning("the realized entropy change of iteration %d is not measured: the engines scored %d "
                           "tokens, the batch has %d", step, tokens, known["tokens"])
            return
        from opefo_rllib.algorithms.grpo.grpo_torch_learner import realized_change_metrics

        self.log_at(realized_change_metrics(known["before"], after_sum / max(tokens, 1), known["net_flow"]), step)


PIPELINES: dict[str, type[Pipeline]] = {"sync": SyncPipeline, "streaming": StreamingPipeline, "async": AsyncPipeline}


def make_pipeline(name: str, *args, **kwargs) -> Pipeline:
    """The pipeline object of the ``pipeline`` field's value ``name``."""
    return PIPELINES[name](*args, **kwargs)
