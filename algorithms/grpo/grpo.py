"""GRPO as a native RLlib algorithm: GRPOConfig and GRPO.

The recipe of one ``training_step``:

    rollouts = env_runner.sample()                  # B prompts x G responses, verified, versioned
    advantages = group_advantages(rewards, groups)  # per prompt group, before any split
    learner_group.foreach_learner(update)           # flow pass, then ONE optimizer step
    env_runner.sync_weights(new weights, version)   # before the next batch is sampled

The config covers the paper's baselines: strict on-policy GRPO (``policy_loss="pg"``, one
update per batch), approximate on-policy (``"ppo_clip"`` with ``num_updates_per_batch`` > 1),
clip-higher (``eps_high`` > ``eps_low``), entropy bonus (``entropy_coef``), Clip-Cov and
KL-Cov (``policy_loss="clip_cov" | "kl_cov"``).
"""

from __future__ import annotations

import time
from typing import Any

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override

from opefo_rllib.algorithms.grpo.advantages import ADV_ESTIMATORS, group_advantages
from opefo_rllib.algorithms.grpo.losses import AGG_MODES, POLICY_LOSSES
from opefo_rllib.algorithms.opefo.entropy_flow import BALANCE_MODES, ESTIMATORS

__all__ = ["GRPOConfig", "GRPO"]

# Fields this project adds to AlgorithmConfig, with their defaults (the tiny CPU run's).
GRPO_DEFAULTS: dict[str, Any] = {
    # policy model
    "model_path": "tiny-default", "model_dtype": "float32", "gradient_checkpointing": False,
    "logits_chunk_size": 1024,
    # generation and the engine fleet
    "engine": "hf", "num_engines": 1, "num_cpus_per_engine": 0.5, "num_gpus_per_engine": 0.0,
    "colocate_engines": False, "engine_dtype": "float32",
    "temperature": 1.0, "max_new_tokens": 8, "top_p": 1.0, "top_k": 0,
    "generate_timeout_s": 600.0, "weight_sync_timeout_s": 120.0,
    "weight_sync": "auto", "weight_transfer_backend": "auto", "weight_transfer_address": "127.0.0.1",
    # batch
    "prompts_per_batch": 16, "group_size": 8,
    # objective
    "adv_estimator": "grpo", "policy_loss": "pg", "loss_agg_mode": "token-mean",
    "eps_low": 0.2, "eps_high": 0.2, "clip_ratio_c": None,
    "clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 2e-3, "kl_cov_coef": 1.0,
    "entropy_coef": 0.0, "tis_cap": None, "strict_on_policy": True, "num_updates_per_batch": 1, "micro_batch_size": None,
    # entropy flow (GRPO logs it; OPEFO balances it)
    "entropy_flow_estimator": "exact", "balance_mode": "none", "static_lambda": 0.0,
    "balance_fraction": 1.0, "max_abs_lambda": None,
    # optimizer and DeepSpeed
    "weight_decay": 0.0, "adam_betas": (0.9, 0.999), "adam_eps": 1e-8, "lr_warmup_steps": 0,
    "zero_stage": 0, "bf16": False, "learner_num_threads": 1,
    # logging and checkpoints
    "tensorboard_dir": None, "log_text_every": 10, "num_text_samples": 4, "export_hf_on_checkpoint": True,
}


class GRPOConfig(AlgorithmConfig):
    """Configuration of GRPO-family training; fluent setters like RLlib's own configs.

    Example:
        >>> config = (GRPOConfig().environment("opefo/Arithmetic-v0")
        ...           .training(lr=1e-4, adv_estimator="grpo", policy_loss="pg")
        ...           .generation(temperature=1.0, max_new_tokens=8, group_size=8)
        ...           .fleet(num_engines=1))
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or GRPO)
        for key, value in GRPO_DEFAULTS.items():
            setattr(self, key, value)
        self.lr = 1e-4
        self.grad_clip = 1.0
        self.seed = 0
        self.env = "opefo/Arithmetic-v0"
        # RLlib plumbing: one local EnvRunner (it drives the engine actors) and one local learner.
        from opefo_rllib.rollout.env_runner import LLMEnvRunner

        self.env_runner_cls = LLMEnvRunner
        self.num_env_runners = 0
        self.create_local_env_runner = True
        self.num_learners = 0
        self.num_cpus_for_main_process = 1

    # ------------------------------------------------------------------ fluent setters
    def _set(self, **kwargs) -> "GRPOConfig":
        for key, value in kwargs.items():
            if value is not NotProvided:
                setattr(self, key, value)
        return self

    def training(self, *, adv_estimator=NotProvided, policy_loss=NotProvided, loss_agg_mode=NotProvided,
                 eps_low=NotProvided, eps_high=NotProvided, clip_ratio_c=NotProvided, clip_cov_ratio=NotProvided,
                 clip_cov_lb=NotProvided, clip_cov_ub=NotProvided, kl_cov_ratio=NotProvided, kl_cov_coef=NotProvided,
                 entropy_coef=NotProvided, strict_on_policy=NotProvided, num_updates_per_batch=NotProvided,
                 micro_batch_size=NotProvided, prompts_per_batch=NotProvided, weight_decay=NotProvided,
                 adam_betas=NotProvided, adam_eps=NotProvided, lr_warmup_steps=NotProvided,
                 entropy_flow_estimator=NotProvided, tis_cap=NotProvided, **kwargs) -> "GRPOConfig":
        """Objective and optimisation settings (plus RLlib's own, e.g. ``lr``, ``grad_clip``)."""
        super().training(**kwargs)
        return self._set(
            adv_estimator=adv_estimator, policy_loss=policy_loss, loss_agg_mode=loss_agg_mode, eps_low=eps_low,
            eps_high=eps_high, clip_ratio_c=clip_ratio_c, clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb,
            clip_cov_ub=clip_cov_ub, kl_cov_ratio=kl_cov_ratio, kl_cov_coef=kl_cov_coef, entropy_coef=entropy_coef,
            strict_on_policy=strict_on_policy, num_updates_per_batch=num_updates_per_batch,
            micro_batch_size=micro_batch_size, prompts_per_batch=prompts_per_batch, weight_decay=weight_decay,
            adam_betas=adam_betas, adam_eps=adam_eps, lr_warmup_steps=lr_warmup_steps,
            entropy_flow_estimator=entropy_flow_estimator, tis_cap=tis_cap)

    def generation(self, *, temperature=NotProvided, max_new_tokens=NotProvided, top_p=NotProvided,
                   top_k=NotProvided, group_size=NotProvided) -> "GRPOConfig":
        """How responses are sampled (strict on-policy: full distribution, top_p=1, top_k=0)."""
        return self._set(temperature=temperature, max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k,
                         group_size=group_size)

    def fleet(self, *, engine=NotProvided, num_engines=NotProvided, num_cpus_per_engine=NotProvided,
              num_gpus_per_engine=NotProvided, colocate_engines=NotProvided, engine_dtype=NotProvided,
              generate_timeout_s=NotProvided, weight_sync_timeout_s=NotProvided, weight_sync=NotProvided,
              weight_transfer_backend=NotProvided, weight_transfer_address=NotProvided) -> "GRPOConfig":
        """The inference fleet: engine kind ("hf" | "vllm" | "sglang"), engine actors, their CPUs and
        GPUs, colocation (engines release their memory while the learner trains), timeouts, and how
        weights reach the engines: ``weight_sync`` "native" (vLLM's weight-transfer API, backend
        ``weight_transfer_backend``: "auto" | "nccl" | "ipc" | "opefo_gloo"; the learner's store listens
        on ``weight_transfer_address``), "object_store" (state dict through Ray's object store), or
        "auto" (native where the engine has it, else object_store)."""
        return self._set(engine=engine, num_engines=num_engines, num_cpus_per_engine=num_cpus_per_engine,
                         num_gpus_per_engine=num_gpus_per_engine, colocate_engines=colocate_engines,
                         engine_dtype=engine_dtype, generate_timeout_s=generate_timeout_s,
                         weight_sync_timeout_s=weight_sync_timeout_s, weight_sync=weight_sync,
                         weight_transfer_backend=weight_transfer_backend,
                         weight_transfer_address=weight_transfer_address)

    def policy_model(self, *, model_path=NotProvided, model_dtype=NotProvided, gradient_checkpointing=NotProvided,
                     logits_chunk_size=NotProvided) -> "GRPOConfig":
        """The policy: a local Hugging Face model directory, or "tiny-default"."""
        return self._set(model_path=model_path, model_dtype=model_dtype,
                         gradient_checkpointing=gradient_checkpointing, logits_chunk_size=logits_chunk_size)

    def deepspeed(self, *, zero_stage=NotProvided, bf16=NotProvided, learner_num_threads=NotProvided
                  ) -> "GRPOConfig":
        """DeepSpeed settings of the learner."""
        return self._set(zero_stage=zero_stage, bf16=bf16, learner_num_threads=learner_num_threads)

    def logging(self, *, tensorboard_dir=NotProvided, log_text_every=NotProvided, num_text_samples=NotProvided,
                export_hf_on_checkpoint=NotProvided) -> "GRPOConfig":
        """TensorBoard directory (default: the Algorithm's logdir) and text-sample cadence."""
        return self._set(tensorboard_dir=tensorboard_dir, log_text_every=log_text_every,
                         num_text_samples=num_text_samples, export_hf_on_checkpoint=export_hf_on_checkpoint)

    # ------------------------------------------------------------------ RLlib hooks
    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from opefo_rllib.models.rl_module import HFCausalLMModule

        return RLModuleSpec(module_class=HFCausalLMModule, learner_only=True,
                            model_config={"model_path": self.model_path, "dtype": self.model_dtype,
                                          "gradient_checkpointing": self.gradient_checkpointing,
                                          "logits_chunk_size": self.logits_chunk_size})

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        from opefo_rllib.algorithms.grpo.grpo_torch_learner import GRPOTorchLearner

        return GRPOTorchLearner

    @override(AlgorithmConfig)
    def validate(self) -> None:
        super().validate()
        validate_fields(self)


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"config field {field!r} = {value!r}: {why}")


def validate_fields(c: Any) -> None:
    """Check the project's config fields; the error names the bad field."""
    choices = {"adv_estimator": ADV_ESTIMATORS, "policy_loss": POLICY_LOSSES, "loss_agg_mode": AGG_MODES,
               "entropy_flow_estimator": ESTIMATORS, "balance_mode": BALANCE_MODES, "engine": ("hf", "vllm", "sglang"),
               "weight_sync": ("auto", "native", "object_store"),
               "weight_transfer_backend": ("auto", "nccl", "ipc", "opefo_gloo"),
               "model_dtype": ("float32", "bfloat16"), "engine_dtype": ("float32", "bfloat16")}
    for field, allowed in choices.items():
        if getattr(c, field) not in allowed:
            _fail(field, getattr(c, field), f"choose one of {sorted(allowed)}")
    for field in ("prompts_per_batch", "group_size", "max_new_tokens", "num_engines", "num_updates_per_batch"):
        if not isinstance(getattr(c, field), int) or getattr(c, field) < 1:
            _fail(field, getattr(c, field), "must be an integer >= 1")
    if c.micro_batch_size is not None and (not isinstance(c.micro_batch_size, int) or c.micro_batch_size < 1):
        _fail("micro_batch_size", c.micro_batch_size, "must be None (whole batch) or an integer >= 1")
    if c.num_gpus_per_engine < 0 or c.num_cpus_per_engine < 0:
        _fail("num_gpus_per_engine" if c.num_gpus_per_engine < 0 else "num_cpus_per_engine",
              min(c.num_gpus_per_engine, c.num_cpus_per_engine), "must be >= 0")
    if c.tis_cap is not None and not c.tis_cap > 0:
        _fail("tis_cap", c.tis_cap, "truncated importance sampling cap C must be > 0 (or None: off)")
    if c.zero_stage not in (0, 1, 2, 3):
        _fail("zero_stage", c.zero_stage, "DeepSpeed ZeRO stage must be 0, 1, 2 or 3")
    if not c.temperature > 0:
        _fail("temperature", c.temperature, "must be > 0")
    if c.strict_on_policy:
        if c.num_updates_per_batch != 1:
            _fail("num_updates_per_batch", c.num_updates_per_batch,
                  "strict on-policy takes exactly one optimizer step per rollout batch; set strict_on_policy=False "
                  "for approximate on-policy training")
        if c.top_p != 1.0 or c.top_k != 0:
            _fail("top_p" if c.top_p != 1.0 else "top_k", c.top_p if c.top_p != 1.0 else c.top_k,
                  "strict on-policy samples the full distribution the learner scores (top_p=1, top_k=0); "
                  "the learner does not apply the same truncation")
    if c.group_size < 2 and c.adv_estimator in ("grpo", "rloo"):
        _fail("group_size", c.group_size, f"{c.adv_estimator!r} advantages need at least 2 responses per prompt")
    if c.weight_sync == "native" and c.engine != "vllm":
        _fail("weight_sync", c.weight_sync, f"native weight transfer is vLLM's API; engine is {c.engine!r} "
              "(use 'auto' or 'object_store')")
    if c.num_learners > 1:
        _fail("num_learners", c.num_learners, "this version trains with one (local or remote) learner")


class GRPO(Algorithm):
    """GRPO-family RLVR on RLlib: the training loop of the module docstring."""

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
        super().setup(config)
        from opefo_rllib.logging_tb import TensorBoardLogger

        self.tb = TensorBoardLogger(self.config.tensorboard_dir or self.logdir)
        # A restarted engine under native sync loads the learner's current weights from here.
        self.env_runner.fleet.weights_provider = lambda: _first_result(self.learner_group.foreach_learner(
            lambda learner: learner.policy_weights()))

    @override(Algorithm)
    def training_step(self) -> None:
        import torch

        from opefo_rllib.rollout.batch import collate

        c = self.config
        step = self.training_iteration
        runner = self.env_runner
        t0 = time.perf_counter()
        rollouts = runner.sample()
        batch = collate(rollouts, pad_id=runner.tokenizer.pad_token_id)
        batch["advantages"] = group_advantages(batch["rewards"], batch["group_ids"], c.adv_estimator)
        t1 = time.perf_counter()
        if c.colocate_engines:  # engines share the learners' devices: free their memory meanwhile
            runner.fleet.release_memory()
        results = self.learner_group.foreach_learner(lambda learner, b=batch, s=step: learner.update_from_rollouts(b, s))
        metrics = _first_result(results)
        if c.colocate_engines:
            runner.fleet.resume_memory()
        t2 = time.perf_counter()
        sync_s = self.sync_fleet_weights(step)
        t3 = time.perf_counter()

        delta_hist = metrics.pop("_delta_hist")
        rewards = batch["rewards"]
        lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float32)
        metrics.update({
            "rollout/reward_mean": float(rewards.mean()),
            "rollout/num_samples": float(len(rollouts)),
            "rollout/accuracy": sum(r.correct for r in rollouts) / len(rollouts),
            "rollout/response_length_mean": float(lengths.mean()),
            "rollout/truncated_frac": sum(not r.finished for r in rollouts) / len(rollouts),
            "rollout/solve_all_frac": _group_frac(rollouts, all),
            "rollout/solve_none_frac": _group_frac(rollouts, lambda xs: not any(xs)),
            "rollout/verify_timeouts": float(sum(r.info.get("timed_out", False) for r in rollouts)),
            "rollout/verify_errors": float(sum(r.info.get("error", False) for r in rollouts)),
            "time/generate_s": runner.last_timings["generate_s"],
            "time/verify_s": runner.last_timings["verify_s"],
            "time/rollout_s": t1 - t0,
            "time/learn_s": t2 - t1,
            "time/weight_sync_s": sync_s,
            "time/step_s": t3 - t0,
            "throughput/tokens_per_s": float(lengths.sum()) / max(t3 - t0, 1e-9),
            "fleet/engine_restarts": float(runner.fleet.restarts),
            "fleet/memory_releases": float(runner.fleet.memory_releases),
            "fleet/native_weight_sync": float(runner.fleet.native_backend is not None),
            "fleet/transfer_group_builds": float(runner.fleet.group_builds),
        })
        for key, value in metrics.items():
            self.metrics.log_value(key, value, window=1)
        global_step = step + 1
        self.tb.scalars(metrics, global_step)
        self.tb.histogram("entropy_flow/delta", delta_hist, global_step)
        if c.log_text_every and (step % c.log_text_every == 0):
            self.tb.samples(rollouts[: c.num_text_samples], global_step)
        self.tb.flush()

    def sync_fleet_weights(self, step: int) -> float:
        """Push the learner's weights and version to every engine (before the next sample)."""
        fleet = self.env_runner.fleet
        if fleet.native_backend is None:
            weights, version = _first_result(self.learner_group.foreach_learner(
                lambda learner: (learner.policy_weights(), learner.weight_version)))
            return self.env_runner.sync_weights(weights, version, step)
        return self._sync_native(fleet, step)

    def _sync_native(self, fleet, step: int) -> float:
        """vLLM's weight-transfer API, driven from the learner; one retry after restarting engines."""
        c = self.config
        start = time.perf_counter()
        for attempt in range(2):
            try:
                actors, sizes, backend, rebuild = fleet.native_targets()

                def push(learner, a=actors, s=sizes, b=backend, r=rebuild or attempt > 0):
                    return learner.push_weights_native(a, s, b, step, c.weight_sync_timeout_s, r,
                                                       c.weight_transfer_address)

                version = _first_result(self.learner_group.foreach_learner(push))
            except Exception:  # noqa: BLE001 - recover once, then let it out
                if attempt:
                    raise
                version = _first_result(self.learner_group.foreach_learner(lambda learner: learner.weight_version))
                fleet.recover_native_sync(version, step)
                continue
            fleet.confirm_native_sync(version, step)
            return time.perf_counter() - start
        raise AssertionError("unreachable")

    @override(Algorithm)
    def restore_from_path(self, path, *args, **kwargs) -> None:
        super().restore_from_path(path, *args, **kwargs)
        self.sync_fleet_weights(self.training_iteration)  # engines start from the restored policy

    @override(Algorithm)
    def save_checkpoint(self, checkpoint_dir: str) -> None:
        super().save_checkpoint(checkpoint_dir)
        if self.config.export_hf_on_checkpoint:
            self.export_policy(f"{checkpoint_dir}/hf_policy")

    def export_policy(self, directory: str) -> str:
        """Write the current policy in Hugging Face format (safetensors + config + tokenizer)."""
        from opefo_rllib.learner.hf_export import export_hf_policy

        weights = _first_result(self.learner_group.foreach_learner(lambda learner: learner.policy_weights()))
        return export_hf_policy(self.config.model_path, weights, directory)

    @override(Algorithm)
    def cleanup(self) -> None:
        if getattr(self, "tb", None) is not None:
            self.tb.close()
        super().cleanup()


def _first_result(results):
    """The value of the first learner's call (re-raising its error, if any)."""
    first = next(iter(results))
    return first.get() if hasattr(first, "get") else first


def _group_frac(rollouts, test) -> float:
    groups: dict[int, list[bool]] = {}
    for r in rollouts:
        groups.setdefault(r.group_id, []).append(r.correct)
    return sum(test(v) for v in groups.values()) / max(len(groups), 1)
