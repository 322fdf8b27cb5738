"""GRPO as a native RLlib algorithm: GRPOConfig and GRPO.

The recipe of one ``training_step``, the same for every pipeline:

    sample = pipeline.sample(step)               # B prompts x G responses, verified, versioned, collated once
    metrics = update(sample.batch)               # flow pass, then ONE optimizer step (N learners:
                                                 #   token-balanced shards, global lambda*, docs/scaling.md)
    pipeline.before_sync(step, sample)           # async: the batch ahead finished, the engines' re-score in
    sync_fleet_weights(step)                     # new weights and version, before the next sample
    pipeline.after_sync(step, rescore)           # async: the engines re-score this step's batch
    log(...)                                     # validation when due, RLlib's result, TensorBoard

The pipeline is one object (``algorithms/grpo/pipelines.py``), chosen once in ``setup`` from the
``pipeline`` field. ``sync`` generates the batch now. ``streaming`` is the same update, strictly
on-policy, with the learner's forward moved into the generation: each engine's share goes as
``stream_chunks`` calls, and every finished call's groups get their training forward
(``stream_forward``, graphs kept) while the rest are generated; the update then takes lambda
from the whole batch. The realized-change re-score of a step runs while the next batch is
generated (``measure_deferred_realized_change``; TensorBoard has it at its own step). ``async``
trains on the batch generated during the previous update and starts the next one before this
update: generation overlaps learning, samples are one version old (approximately on-policy;
``max_staleness``, ``tis_cap``, ``offpolicy_mask``); with fp32 HF engines the realized-change
re-score runs on the engines, queued after the weight sync and collected after the next update.

The Algorithm owns the engine fleet (built in ``setup``, given to the env runner, shut down in
``cleanup``), its ``WeightSync`` and TensorBoard.

The config covers the paper's baselines: strict on-policy GRPO (``policy_loss="pg"``, one
update per batch), approximate on-policy (``"ppo_clip"`` with ``num_updates_per_batch`` > 1),
clip-higher (``eps_high`` > ``eps_low``), entropy bonus (``entropy_coef``), Clip-Cov and
KL-Cov (``policy_loss="clip_cov" | "kl_cov"``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override

from opefo_rllib.envs.registry import register_all_with_tune
from opefo_rllib.rollout.batch import learner_batch, rollout_metrics
from opefo_rllib.config import SECTIONS, all_fields, check_value, coerce_value, rllib_fields, validate_sections

__all__ = ["GRPOConfig", "GRPO", "LearnerFailedError", "NonFiniteTrainingError"]

logger = logging.getLogger(__name__)

register_all_with_tune()  # RLlib resolves env names through Tune's registry


class LearnerFailedError(RuntimeError):
    """A learner raised, died, or did not answer within ``learner_timeout_s``."""


class NonFiniteTrainingError(RuntimeError):
    """``max_nonfinite_steps`` batches in a row had a non-finite loss or gradient norm."""


def _section_setter(setter: str, extra_doc: str = ""):
    """A fluent, keyword-only setter for every field of the sections whose setter is ``setter``."""

    def set_fields(self, **kwargs) -> "GRPOConfig":
        self._set_fields(setter, kwargs)
        return self

    set_fields.__name__ = setter
    set_fields.__doc__ = _setter_doc(setter, extra_doc)
    return set_fields


def _setter_doc(setter: str, extra_doc: str) -> str:
    lines = [f"Set fields of: {', '.join(s.name for s in SECTIONS.values() if s.setter == setter)}. {extra_doc}"
             .strip(), "", "Keyword arguments (see `opefo config` for the resolved values):"]
    lines += [f"    {f.name} ({f.type_name()}, default {f.default!r}): {f.doc}"
              for s in SECTIONS.values() if s.setter == setter for f in s.fields()]
    return "\n".join(lines)


class GRPOConfig(AlgorithmConfig):
    """Configuration of GRPO-family training; fluent setters like RLlib's own configs.

    Every project field is declared once, with its type, default, doc and checks, in a section
    of ``opefo_rllib.config.sections``; this class takes its defaults, its validation and its
    setters from there: one per section's ``setter`` (several sections may share one, e.g.
    ``training`` sets the objective, loss and optimisation sections plus RLlib's own ``lr``,
    ``grad_clip``, ...); each setter's docstring lists its fields.

    Example:
        >>> config = (GRPOConfig().environment("opefo/Arithmetic-v0")
        ...           .training(lr=1e-4, adv_estimator="grpo", policy_loss="pg")
        ...           .generation(prompts_per_batch=16, group_size=8, temperature=1.0, max_new_tokens=8)
        ...           .fleet(num_engines=1))
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or GRPO)
        for spec in all_fields().values():
            setattr(self, spec.name, spec.default)
        for name in ("lr", "grad_clip", "seed", "env"):  # RLlib's fields, with this project's defaults
            setattr(self, name, rllib_fields()[name].default)
        # RLlib plumbing: one local EnvRunner, in the Algorithm's process (it samples through the
        # Algorithm's engine fleet). num_learners keeps RLlib's own default (0: one local learner;
        # the run config's field, or .learners(num_learners=N), sets N remote learners).
        from opefo_rllib.rollout.env_runner import LLMEnvRunner

        self.env_runner_cls = LLMEnvRunner
        self.num_env_runners = 0
        self.create_local_env_runner = True
        self.num_cpus_for_main_process = 1

    # ------------------------------------------------------------------ fluent setters
    def _set_fields(self, setter: str, kwargs: dict, also: tuple[str, ...] = ()) -> None:
        sections = [s for s in SECTIONS.values() if s.setter == setter or s.setter in also]
        specs = {f.name: f for s in sections for f in s.fields()}
        aliases = {k: v for s in sections for k, v in s.aliases.items()}
        for key, value in kwargs.items():
            if value is NotProvided:
                continue
            name = aliases.get(key, key)
            if name not in specs:
                raise TypeError(f"GRPOConfig.{setter}() got an unexpected keyword argument {key!r}; "
                                f"it sets {sorted(specs)}")
            setattr(self, name, coerce_value(specs[name], value))

    def environment(self, env=NotProvided, *, imports=NotProvided, **kwargs) -> "GRPOConfig":
        """RLlib's ``environment(env, env_config=...)`` plus ``imports``: modules that register
        your envs, imported wherever the env is built (an env may also be named module:env-id)."""
        self._set_fields("environment", {"imports": imports})
        super().environment(env, **kwargs)
        return self

    policy_model = _section_setter("policy_model", "The policy: a local Hugging Face model directory, "
                                   'or "tiny-default".')
    generation = _section_setter("generation")
    rollout = _section_setter("rollout", "The rollout pipeline (sync / streaming / async), dynamic sampling, overlong answers.")
    fleet = _section_setter("fleet")
    entropy_flow = _section_setter("entropy_flow", 'Alias: estimator= sets entropy_flow_estimator.')
    deepspeed = _section_setter("deepspeed")
    logging = _section_setter("logging")

    def _set_with_rllib(self, setter: str, kwargs: dict, rllib_setter, also: tuple[str, ...] = ()) -> "GRPOConfig":
        """Our sections' fields of ``setter`` (and ``also``) here; every other keyword to RLlib's own setter."""
        ours = {f.name for s in SECTIONS.values() if s.setter in (setter, *also) for f in s.fields()}
        self._set_fields(setter, {k: v for k, v in kwargs.items() if k in ours}, also=also)
        rllib_setter(**{k: v for k, v in kwargs.items() if k not in ours})
        return self

    def training(self, **kwargs) -> "GRPOConfig":
        return self._set_with_rllib("training", kwargs, super().training, also=("entropy_flow",))

    training.__doc__ = _setter_doc("training", "Plus the entropy_flow fields, and RLlib's own training settings "
                                   "(lr, grad_clip, ...).")

    def evaluation(self, **kwargs) -> "GRPOConfig":
        return self._set_with_rllib("evaluation", kwargs, super().evaluation)

    evaluation.__doc__ = _setter_doc("evaluation", "Validation during training on the training fleet (RLlib's own "
                                     "evaluation_* settings are passed on but unused).")

    # ------------------------------------------------------------------ RLlib hooks
    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from opefo_rllib.models.rl_module import HFCausalLMModule

        return RLModuleSpec(module_class=HFCausalLMModule, learner_only=True,
                            model_config=HFCausalLMModule.model_config_of(self))

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        from opefo_rllib.algorithms.grpo.grpo_torch_learner import GRPOTorchLearner

        return GRPOTorchLearner

    @override(AlgorithmConfig)
    def validate(self) -> None:
        validate_fields(self)  # ours first: RLlib's own messages (e.g. for lr="abc") name no field
        super().validate()


def validate_fields(c: Any) -> None:
    """Check every project field and RLlib field of ``c``; raises ConfigError naming the field."""
    for spec in rllib_fields().values():
        if spec.name != "env":  # RLlib also takes an env class or a callable
            check_value(spec, getattr(c, spec.name))
    validate_sections(c)


class GRPO(Algorithm):
    """GRPO-family RLVR on RLlib: the training loop of the module docstring.

    Owns the engine fleet (built in ``setup``, shut down in ``cleanup``; the env runner samples
    through it), the weight sync, the pipeline object and TensorBoard."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> GRPOConfig:
        return GRPOConfig()

    @classmethod
    @override(Algorithm)
    def default_resource_request(cls, config):
        """RLlib's bundles (main process, learners) plus one bundle per engine actor, so Tune
        reserves the inference fleet with the rest of the trial (engines are created inside the
        trial's placement group)."""
        from ray.tune.execution.placement_groups import PlacementGroupFactory

        base = super().default_resource_request(config)
        cfg = config if isinstance(config, AlgorithmConfig) else cls.get_default_config().update_from_dict(config)
        engine_bundles = [{"CPU": cfg.num_cpus_per_engine, **({"GPU": cfg.num_gpus_per_engine}
                                                               if cfg.num_gpus_per_engine else {})}
                          for _ in range(cfg.num_engines)]
        return PlacementGroupFactory(bundles=list(base.bundles) + engine_bundles, strategy=cfg.placement_strategy)

    @override(Algorithm)
    def setup(self, config) -> None:
        super().setup(config)  # RLlib's: the env runner and the learners
        self.learners_ready_at = time.monotonic()  # the CLI's "learners up" line
        from opefo_rllib.algorithms.grpo.pipelines import make_pipeline
        from opefo_rllib.fleet.from_config import fleet_from_config
        from opefo_rllib.fleet.weight_sync import CHECK_TOLERANCE, WeightsCheck, WeightSync, weights_and_version
        from opefo_rllib.logging_tb import TensorBoardLogger

        c = self.config
        self.tb = TensorBoardLogger(c.tensorboard_dir or self.logdir)
        # The fleet: a restarted engine gets the learner's weights (and version) when it holds no copy.
        self.fleet = fleet_from_config(c, self.env_runner.tokenizer,
                                       lambda: self.run_on_learner(weights_and_version, what="the policy weights"))
        self.env_runner.use_fleet(self.fleet)
        # Learner -> engines weights (native or object store).
        # ... and a check that they serve them: the coarser dtype of the two sets the tolerance.
        check = WeightsCheck(c.weights_check, c.weights_check_every,
                             max(CHECK_TOLERANCE[c.engine_dtype], CHECK_TOLERANCE[c.model_dtype]))
        self.weight_sync = WeightSync(self.fleet, self.run_on_learner, master_address=c.weight_transfer_address,
                                      check=check)
        if c.lora_rank:
            from opefo_rllib.config.sections import lora_syncs_adapter

            logger.warning("LoRA rank %d: the %s engines get %s after each step", c.lora_rank, c.engine,
                           "the adapter alone" if lora_syncs_adapter(c) else
                           "the merged weights (base + B A)")
        self.pipeline = make_pipeline(c.pipeline, c, self.env_runner, self.run_on_learner, self.log_scalars)
        self.evaluator = None  # validation on the training fleet (eval_tasks), when scheduled
        if c.eval_tasks and (c.eval_every or c.eval_before_train):
            from opefo_rllib.evaluation.validation import TrainingEvaluator, eval_dir

            self.evaluator = TrainingEvaluator(c, eval_dir(self.tb.logdir))

    @override(Algorithm)
    def training_step(self) -> None:
        step = self.training_iteration
        if step == 0 and self.evaluator is not None and self.evaluator.due(0):
            self.log_scalars(self.validate(0), 0)  # the starting policy, at TensorBoard step 0
        t0 = time.perf_counter()
        sample = self.pipeline.sample(step)
        t1 = time.perf_counter()
        metrics, delta_hist, rescore = self._update(sample.batch, step)
        t2 = time.perf_counter()
        timings = self.pipeline.before_sync(step, sample)
        t_ahead = time.perf_counter()
        sync_s = self.sync_fleet_weights(step)
        t3 = time.perf_counter()
        self.pipeline.after_sync(step, rescore)
        metrics.update(rollout_metrics(sample.rollouts, sample.batch))
        metrics.update(sample.metrics)
        metrics.update(self._step_metrics(sample, timings, metrics, rollout_s=t1 - t0, learn_s=t2 - t1,
                                          sync_s=sync_s, ahead_wait_s=t_ahead - t2, step_s=t3 - t0))
        self._log(step, sample, metrics, delta_hist)

    def _update(self, batch: dict, step: int) -> tuple[dict, Any, dict | None]:
        """The learner's update of ``batch``: its metrics, the entropy-flow histogram, and the
        engines' re-score request (or None). The one place that reads the learner's result."""
        with self._engines_released():
            update = self.run_on_learner(lambda learner, b=batch, s=step: learner.update_from_rollouts(b, s),
                                         what=f"the update of iteration {step + 1}")
        return update.metrics, update.delta_hist, update.engine_rescore

    @contextlib.contextmanager
    def _engines_released(self):
        """Colocated engines share the learners' devices: they free their memory during the update."""
        if not self.config.colocate_engines:
            yield
            return
        self.fleet.release_memory()
        yield
        self.fleet.resume_memory()

    def _step_metrics(self, sample, timings: dict, metrics: dict, **seconds: float) -> dict[str, float]:
        """The iteration's time/, fleet/ and throughput/ metrics."""
        step_s = seconds["step_s"]
        return {
            "time/generate_s": timings["generate_s"],
            "time/verify_s": timings["verify_s"],
            "time/rollout_s": seconds["rollout_s"],
            "time/learn_s": seconds["learn_s"],
            # streaming: learner work done while the batch was generated (forwards, last step's re-score)
            "time/learner_in_flight_s": sample.learner_in_flight_s,
            "time/weight_sync_s": seconds["sync_s"],
            "time/ahead_wait_s": seconds["ahead_wait_s"],  # async: waiting for the batch generated during the update
            "time/step_s": step_s,
            "fleet/engine_busy_s": timings["engine_busy_s"],
            "fleet/engine_idle_frac": max(0.0, 1.0 - timings["engine_busy_s"] / max(step_s, 1e-9)),
            "throughput/tokens_per_s": metrics["rollout/response_tokens"] / max(step_s, 1e-9),
            **self.fleet.metrics(),  # fleet/engine_restarts, fleet/memory_releases
            **self.weight_sync.metrics(),  # fleet/native_weight_sync, fleet/transfer_group_builds
        }

    def _log(self, step: int, sample, metrics: dict, delta_hist) -> None:
        """Validation when due, then RLlib's result, TensorBoard (scalars, the flow histogram, text
        samples) at step + 1; a run of non-finite steps is an error."""
        c, global_step = self.config, step + 1
        if self.evaluator is not None and self.evaluator.due(global_step):
            metrics.update(self.validate(global_step))  # engines hold version global_step: the new policy
        for key, value in metrics.items():
            self.metrics.log_value(key, value, window=1)
        self.tb.scalars(metrics, global_step)
        self.tb.histogram("entropy_flow/delta", delta_hist, global_step)
        if c.log_text_every and (step % c.log_text_every == 0):
            self.tb.samples(sample.rollouts[: c.num_text_samples], global_step)
        self.tb.flush()
        if metrics["learner/nonfinite_in_a_row"] >= c.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"iteration {global_step}: {int(metrics['learner/nonfinite_in_a_row'])} batches in a row had a "
                f"non-finite loss or gradient norm (grad norm {metrics['learner/grad_norm']:.4g}); their steps were "
                f"skipped and the weights are those of version {int(metrics['learner/weight_version'])} "
                f"(max_nonfinite_steps = {c.max_nonfinite_steps}; lower lr or raise grad_clip)")

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        """Scalars into TensorBoard at ``step`` now (validation at 0, measurements of an earlier step)."""
        self.tb.scalars(metrics, step)
        self.tb.flush()

    def validate(self, iteration: int) -> dict[str, float]:
        """Evaluate ``eval_tasks`` on the training fleet, which holds the current weights (called
        after the weight sync); writes RUN/eval/iter_NNNNNN.json, returns the eval/... scalars."""
        return self.evaluator.run(self.fleet, self.env_runner.tokenizer, iteration)

    def sync_fleet_weights(self, step: int) -> float:
        """Push the learner's weights and version to every engine (before the next sample); seconds."""
        return self.weight_sync.sync(step)

    @override(Algorithm)
    def restore_from_path(self, path, *args, **kwargs) -> None:
        try:
            super().restore_from_path(path, *args, **kwargs)
        except Exception:
            # A learner that died during the restore surfaces from RLlib as an IndexError of its
            # empty result list: name the learner instead (a LearnerFailedError the CLI retries).
            self.run_on_learner(_no_op, what=f"restoring the checkpoint {path}")
            raise
        self.sync_fleet_weights(self.training_iteration)  # engines start from the restored policy
        # TensorBoard continues after the restored iteration: hide any later events of the
        # interrupted run, so a curve never has two values at one step.
        from opefo_rllib.logging_tb import TensorBoardLogger

        self.tb.close()
        self.tb = TensorBoardLogger(self.tb.logdir, purge_step=self.training_iteration + 1)

    @override(Algorithm)
    def save_checkpoint(self, checkpoint_dir: str) -> None:
        super().save_checkpoint(checkpoint_dir)
        if self.config.export_hf_on_checkpoint:
            self.export_policy(f"{checkpoint_dir}/hf_policy")

    def policy_weights(self) -> dict:
        """A CPU copy of the policy's state dict, from the learner."""
        return self.run_on_learner(lambda learner: learner.policy_weights(), what="the policy weights")

    def run_on_learner(self, fn, what: str = "a learner call"):
        """``fn(learner)`` on every learner at once (their collectives need all of them), and the
        result of rank 0 (the first that is not None: other ranks return None where rank 0 speaks
        for all, e.g. the gathered weights). A learner that fails, has died, or does not answer
        within ``learner_timeout_s`` is an error naming it and what was asked."""
        timeout = self.config.learner_timeout_s
        results = self.learner_group.foreach_learner(fn, timeout_seconds=timeout, healthy_only=False)
        return _rank0_result(results, max(1, self.config.num_learners), what, timeout)

    @override(Algorithm)
    def save_to_path(self, path=None, *args, **kwargs):
        """RLlib saves learner 0's state; with several learners (or ZeRO-3) that state needs every
        learner at once (gathered ZeRO-3 weights, each rank's optimizer shard): stage it first."""
        self.pipeline.flush(self.training_iteration)  # a measurement of the last step still pending
        self.run_on_learner(_stage_state, what="collecting the learner state for a checkpoint")
        try:
            return super().save_to_path(path, *args, **kwargs)
        finally:  # a later get_state() must not see this checkpoint's state
            self.run_on_learner(_clear_staged_state, what="releasing the staged learner state")

    def export_policy(self, directory: str) -> str:
        """Write the current policy in Hugging Face format (safetensors + config + tokenizer); under
        LoRA the merged model, or with ``export_adapter`` the adapter alone in peft's format."""
        from opefo_rllib.learner.hf_export import export_adapter, export_hf_policy

        if self.config.lora_rank and self.config.export_adapter:
            state, lora_config = self.run_on_learner(lambda learner: learner.adapter_export(), what="the adapter")
            return export_adapter(self.config.model_path, state, lora_config, directory)
        return export_hf_policy(self.config.model_path, self.policy_weights(), directory)

    @override(Algorithm)
    def cleanup(self) -> None:
        if getattr(self, "tb", None) is not None:
            self.tb.close()
        if getattr(self, "evaluator", None) is not None:
            self.evaluator.close()
        try:
            super().cleanup()  # the env runner closes its env
        finally:
            if getattr(self, "fleet", None) is not None:
                self.fleet.shutdown()
                self.fleet = None


def _no_op(learner) -> None:
    return None


def _stage_state(learner) -> None:
    learner.stage_state()


def _clear_staged_state(learner) -> None:
    learner.clear_staged_state()


def _rank0_result(results, num_learners: int, what: str = "a learner call", timeout_s: float | None = None):
    """The first non-None result of the learners' calls (learner order); an error naming the
    learners that died, failed or did not answer (a learner that died first: the others then
    fail in their collectives with it)."""
    import ray

    got = sorted(results, key=lambda r: getattr(r, "actor_id", 0) or 0)
    failed = [r for r in got if hasattr(r, "ok") and not r.ok]
    answered = {getattr(r, "actor_id", 0) or 0 for r in got}
    missing = [i for i in range(num_learners) if i not in answered]
    if failed or missing:
        died = [r for r in failed if isinstance(r.get(), ray.exceptions.RayActorError)]
        parts = [f"learner {r.actor_id} of {num_learners} died during {what}" for r in died]
        if missing:
            parts.append(f"learner(s) {missing} of {num_learners} did not answer {what} within learner_timeout_s = "
                         f"{timeout_s} s")
        parts += [f"learner {r.actor_id} of {num_learners} failed during {what}: {_last_line(r.get())}"
                  for r in failed if r not in died]
        raise LearnerFailedError("; ".join(parts)) from (failed[0].get() if failed else None)
    values = [r.get() if hasattr(r, "get") else r for r in got]
    return next((v for v in values if v is not None), None)


def _last_line(error: BaseException) -> str:
    """The error's own message (a RayTaskError carries the remote traceback before it)."""
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[-1].strip() if lines else ''}"
