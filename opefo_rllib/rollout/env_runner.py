"""LLMEnvRunner: an RLlib EnvRunner that turns text-env prompts into on-policy rollouts.

One ``sample()``: draw B problems from the Gymnasium text env and turn their prompts into token
ids with the model's own tokenizer (:mod:`opefo_rllib.rollout.prompts`: raw or chat format; a
prompt over ``max_prompt_tokens`` is replaced by another problem), send the B prompt groups to
the engine fleet (G samples each, each group whole on one engine), and verify each engine's
groups as soon as that engine is done, so verification overlaps the generation of the rest.
Every rollout carries its prompt group and the weight version that generated it.
"""

from __future__ import annotations

import time
from typing import Any

from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.checkpoints import Checkpointable

from opefo_rllib.envs import TextEnv, make_env
from opefo_rllib.envs.registry import import_env_modules
from opefo_rllib.envs.pool import wait_all
from opefo_rllib.fleet.engine import SamplingConfig
from opefo_rllib.fleet.fleet import EngineFleet
from opefo_rllib.rollout.batch import Rollout
from opefo_rllib.rollout.prompts import PromptBuilder, draw_prompts, response_text

__all__ = ["LLMEnvRunner"]


class LLMEnvRunner(EnvRunner, Checkpointable):
    """Samples ``prompts_per_batch`` x ``group_size`` responses per call from the engine fleet."""

    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        from opefo_rllib.models.loading import resolve_model_path

        c = self.config
        import_env_modules(c.imports)  # the run's own env modules, in whichever process builds the env
        self.env: TextEnv = make_env(c.env, **dict(c.env_config or {}))
        if getattr(self.env, "max_turns", 1) > 1:
            raise ValueError(f"env {c.env!r} is multi-turn; the trainer samples single-turn envs only for now")
        self.env.seed_problems(c.seed if c.seed is not None else 0)  # draws nothing: no item is skipped
        model_dir = resolve_model_path(c.model_path)
        self.tokenizer = _load_tokenizer(c.model_path, model_dir)
        self.prompts = PromptBuilder(self.tokenizer, c)
        self.sampling = SamplingConfig(temperature=c.temperature, max_new_tokens=c.max_new_tokens,
                                       top_p=c.top_p, top_k=c.top_k, seed=c.seed or 0,
                                       stop_token_ids=tuple(c.stop_token_ids or ()))
        # Engines get every EOS id of the model (each ends a response) and a pad id that is always
        # masked; they see token ids only, never text.
        engine_kwargs = {"model_path": str(model_dir), "eos_token_id": list(self.tokenizer.eos_token_ids),
                         "pad_token_id": self.tokenizer.pad_token_id, "dtype": c.engine_dtype}
        if c.engine == "vllm":
            engine_kwargs["colocated"] = c.colocate_engines
            if c.weight_sync != "object_store":
                engine_kwargs["weight_transfer_backend"] = c.weight_transfer_backend
        engine_kwargs.update(c.engine_kwargs or {})  # e.g. vLLM's gpu_memory_utilization, HF's device
        self.fleet = EngineFleet(
            kind=c.engine, num_engines=c.num_engines, engine_kwargs=engine_kwargs,
            num_cpus_per_engine=c.num_cpus_per_engine, num_gpus_per_engine=c.num_gpus_per_engine,
            generate_timeout_s=c.generate_timeout_s,
            sync_timeout_s=c.weight_sync_timeout_s)
        if c.weight_sync == "native" and self.fleet.native_backend is None:
            raise ValueError("config field 'weight_sync' = 'native': the installed vLLM has no weight-transfer API "
                             "(LLM.init_weight_transfer_engine); use 'auto' or 'object_store'")
        self._next_group_id = 0
        self._sample_calls = 0
        self.last_timings: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}  # runner metrics of the last sample(), for the algorithm's log

    @override(EnvRunner)
    def assert_healthy(self):
        assert self.fleet is not None and len(self.fleet) > 0, "LLMEnvRunner has no engines"

    @override(EnvRunner)
    def get_spaces(self):
        spaces = (self.env.observation_space, self.env.action_space)
        return {"__env__": spaces, DEFAULT_MODULE_ID: spaces}

    @override(EnvRunner)
    def sample(self, **kwargs) -> list[Rollout]:
        c = self.config
        step = self._sample_calls
        draw = draw_prompts(self.env, self.prompts, c.prompts_per_batch, env_name=str(c.env))
        problems, prompts = draw.problems, draw.prompt_ids
        group_ids = list(range(self._next_group_id, self._next_group_id + len(problems)))
        self._next_group_id += len(problems)
        start = time.perf_counter()
        pending = self.fleet.submit(prompts, c.group_size, self.sampling, seed=(c.seed or 0) * 100_003 + step)
        # What the model saw, special tokens (chat markers) included: for the TensorBoard samples.
        prompt_texts = [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
        verifying = []  # (prompt indices, results, futures)
        gen_done = start
        while pending:
            idx, results, _, pending = self.fleet.wait_any(pending, step)
            gen_done = time.perf_counter()
            texts, probs = [], []
            for k, group in zip(idx, results):
                for res in group:
                    texts.append(response_text(self.tokenizer, res.response_ids, res.finished))
                    probs.append(problems[k])
            verifying.append((idx, results, texts, self.env.score_batch_async(probs, texts)))
        verify_start = time.perf_counter()
        self._await_verification(verifying, step)
        rollouts = []
        for idx, results, texts, futures in verifying:
            flat = [res for group in results for res in group]
            for res, text, fut in zip(flat, texts, futures):
                verdict = fut.result()  # done: _await_verification waited for it
                k = idx[res.prompt_index]
                rollouts.append(Rollout(
                    group_id=group_ids[k], prompt_ids=prompts[k], response_ids=res.response_ids,
                    sampling_logp=res.sampling_logp, reward=float(verdict.reward), weight_version=res.weight_version,
                    correct=bool(verdict.correct), finished=res.finished, task_id=problems[k].id,
                    prompt_text=prompt_texts[k], response_text=text,
                    info={"format_ok": verdict.format_ok, "timed_out": verdict.timed_out,
                          "error": verdict.error is not None}))
        end = time.perf_counter()
        self.last_timings = {"generate_s": gen_done - start, "verify_s": end - verify_start}
        self._sample_calls += 1
        n_tokens = sum(len(r.response_ids) for r in rollouts)
        self.num_env_steps_sampled_lifetime += len(rollouts)
        self.last_timings["response_tokens"] = n_tokens
        self.last_metrics = {"data/skipped_rows": float(self.env.skipped_rows),
                             "rollout/prompts_skipped_too_long": float(draw.skipped_too_long)}
        return rollouts

    def _await_verification(self, verifying: list, step: int) -> None:
        """Wait for every verdict of this step, within the env's deadline for that many answers."""
        futures = [fut for *_, group_futures in verifying for fut in group_futures]
        wait_all(futures, self.env.score_deadline_s(len(futures)),
                 f"LLMEnvRunner.sample (step {step}, env {self.config.env!r}): verifying answers")

    @override(EnvRunner)
    def get_metrics(self) -> dict:
        return {}

    @override(Checkpointable)
    def get_ctor_args_and_kwargs(self):
        return (), {"config": self.config}

    @override(Checkpointable)
    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        state: dict[str, Any] = {"sample_calls": self._sample_calls,
                                 "next_group_id": self._next_group_id,
                                 "env_rng": self.env.np_random.bit_generator.state}
        dataset = getattr(self.env, "dataset", None)
        if dataset is not None:
            state["dataset"] = dataset.state_dict()
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

    @override(EnvRunner)
    def stop(self) -> None:
        """Close the env (its verifier's worker processes) and shut the engines down; idempotent.
        RLlib calls it from ``algo.stop()``."""
        try:
            if getattr(self, "env", None) is not None:
                self.env.close()
        finally:
            if getattr(self, "fleet", None) is not None:
                self.fleet.shutdown()
                self.fleet = None


def _load_tokenizer(model_path: str, model_dir):
    """The model directory's tokenizer; a missing or unusable one is a ConfigError naming the field."""
    from opefo_rllib.config.fields import ConfigError
    from opefo_rllib.models.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(model_dir)
    except TokenizerError as e:
        raise ConfigError(f"config field 'model_path' = {model_path!r}: {e}") from None
