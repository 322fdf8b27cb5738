"""The config sections of GRPO / OPEFO: every project field, with its type, default, doc and checks.

Defaults are those of the tiny CPU run. ``GRPOConfig`` (algorithms/grpo/grpo.py) takes its fields,
defaults, fluent setters, YAML keys and validation from here; ``opefo config`` prints them and
the field table of docs/configuration.md is generated from them (tests/unit/config/test_config_sections.py checks it).

To add a field: add one ``setting(...)`` line to its section. To add a section (a later feature):
declare a dataclass and ``register_section`` it. A policy loss or advantage estimator registered
with a settings dataclass contributes that dataclass's fields to the "objective" setter.

Imports only the pure-torch registries of the math (no Ray).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from opefo_rllib.core.advantages import ADV_EST_SETTINGS, ADV_ESTIMATORS
from opefo_rllib.core.policy_losses import AGG_MODES, POLICY_LOSS_SETTINGS, POLICY_LOSSES
from opefo_rllib.core.balance import BALANCE_RULES
from opefo_rllib.core.entropy_flow import ESTIMATORS
from opefo_rllib.core.kl import KL_ESTIMATORS, KL_PLACES
from opefo_rllib.config.fields import Section, register_section, setting, SECTIONS

__all__ = ["RunSettings", "RLlibSettings", "PolicyModelSettings", "LoraSettings", "lora_syncs_adapter",
           "GenerationSettings", "RolloutPipelineSettings", "EpisodeSettings",
           "FleetSettings",
           "ObjectiveSettings", "KLSettings", "EntropyFlowSettings", "OptimizationSettings", "DeepSpeedSettings",
           "LoggingSettings", "EvaluationSettings", "RUN_SECTION", "RLLIB_SECTION", "run_fields", "rllib_fields"]

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class EnvironmentSettings:
    """What to import before the env is built (env and env_config are RLlib's own fields)."""

    imports: list | None = setting(None, "modules imported before the env is built, wherever it is built (they "
                                   "register your envs); an env may also be named module:env-id",
                                   check=lambda v: None if all(isinstance(m, str) and m for m in v)
                                   else "must be a list of module names")


@dataclasses.dataclass
class PolicyModelSettings:
    """The policy: which model the learner trains and the engines sample from."""

    model_path: str = setting("tiny-default", 'a local Hugging Face model directory, a .gguf file (a path or '
                              'pkg:PACKAGE/FILE; converted once into a cached directory), or "tiny-default" (shipped)')
    model_dtype: str = setting("float32", "the learner's parameter dtype", choices=DTYPES)
    gradient_checkpointing: bool = setting(False, "recompute activations in backward (memory for time)")
    logits_chunk_size: int = setting(1024, "tokens per chunk of the LM head in token_stats_from_hidden", low=1)
    share_prompt_forward: bool = setting(True, "the learner runs each distinct prompt of a micro-batch once and "
                                         "shares its key/value cache with the rows (samples) of that prompt; the "
                                         "same stats up to float order (checked once per run against the plain "
                                         "forward; a model that fails keeps the plain one). Off under ZeRO-3 and "
                                         "gradient checkpointing")


@dataclasses.dataclass
class LoraSettings:
    """LoRA adapters (peft) on the policy: only they train, are checkpointed and go to the engines."""

    lora_rank: int = setting(0, "rank r of the LoRA adapters (0: off, full fine-tuning)", low=0)
    lora_alpha: float = setting(16.0, "LoRA scale numerator: the update is alpha / r x B A", low=0.0, low_open=True)
    lora_dropout: float = setting(0.0, "dropout on the adapters' input (> 0 makes the learner's log-probs differ "
                                  "from the engines': strict on-policy needs 0)", low=0.0, high=1.0, high_open=True)
    lora_target_modules: list | None = setting(None, "names of the Linear modules to adapt (None: the "
                                               "architecture's attention and MLP projections, models/lora.py)",
                                               check=lambda v: None if v and all(isinstance(m, str) and m for m in v)
                                               else "must be a non-empty list of module names")
    lora_sync: str = setting("auto", "what the engines get after a step: adapter (the adapter tensors only; every "
                             "engine kind takes them), merged (base + B A as whole weights, through the full-weight "
                             "path), or auto (adapter)", choices=("auto", "adapter", "merged"))
    export_adapter: bool = setting(False, "exports (hf_policy/ beside each checkpoint) write the adapter alone, in "
                                   "peft's format, instead of the merged model")

    @staticmethod
    def cross_checks(c) -> Iterator[tuple[str, str]]:
        if not c.lora_rank:
            return
        import importlib.util

        if importlib.util.find_spec("peft") is None:  # found without importing it
            yield "lora_rank", "LoRA needs peft: pip install 'opefo-rllib[lora]'"
        if c.zero_stage == 3:
            yield "lora_rank", ("LoRA trains under ZeRO 0-2 here; ZeRO-3 would partition the frozen base weights the "
                                "merged sync and the reference gather whole (use zero_stage 0, 1 or 2)")
        if c.weight_sync == "native" and lora_syncs_adapter(c):
            yield "weight_sync", "with LoRA the engines get the adapter through the object store (weight_sync: auto)"
        if c.lora_dropout > 0 and c.strict_on_policy:
            yield "lora_dropout", "strict on-policy needs the learner to score what the engines sampled: dropout 0"
        if c.balance_mode == "optimizer_aware":
            yield "balance_mode", "optimizer_aware reads Adam's state of every parameter; with LoRA use another rule"


def lora_syncs_adapter(c) -> bool:
    """The engines get the adapter alone (else merged weights): LoRA on, and not lora_sync merged
    (every engine kind takes an adapter; SGLang's path is not run, CUDA only)."""
    return bool(c.lora_rank) and c.lora_sync != "merged"


@dataclasses.dataclass
class PromptSettings:
    """How an env's prompt becomes the token ids the engines see, and when a response stops."""

    prompt_format: str = setting("raw", "raw: the env's prompt as it is (base models); chat: the tokenizer's chat "
                                 "template, with system_prompt", choices=("raw", "chat"))
    system_prompt: str | None = setting(None, "system message of prompt_format chat (None: none)")
    max_prompt_tokens: int | None = setting(None, "longest prompt, in tokens (None: no limit); a longer one is "
                                            "skipped and counted, or an error (on_long_prompt)", low=1)
    on_long_prompt: str = setting("skip", "a prompt over max_prompt_tokens: skip (counted in "
                                  "rollout/prompts_skipped_too_long) or error", choices=("skip", "error"))
    stop_token_ids: list | None = setting(None, "token ids that end a response, besides every EOS id of the model",
                                          check=lambda v: None if all(isinstance(t, int) and not isinstance(t, bool)
                                                                      and t >= 0 for t in v)
                                          else "must be a list of token ids (integers >= 0)")


@dataclasses.dataclass
class GenerationSettings:
    """The batch and how responses are sampled (strict on-policy: the full distribution)."""

    prompts_per_batch: int = setting(16, "prompt groups per batch (B)", low=1)
    group_size: int = setting(8, "responses sampled per prompt (G)", low=1)
    temperature: float = setting(1.0, "sampling temperature; the learner scores the same tempered distribution",
                                 low=0.0, low_open=True)
    max_new_tokens: int = setting(8, "longest response, in tokens", low=1)
    top_p: float = setting(1.0, "nucleus sampling (strict on-policy needs 1.0)", low=0.0, high=1.0, low_open=True)
    top_k: int = setting(0, "top-k sampling, 0 = off (strict on-policy needs 0)", low=0)

    @staticmethod
    def cross_checks(c) -> Iterator[tuple[str, str]]:
        if c.group_size < 2 and c.adv_estimator in ("grpo", "rloo"):
            yield "group_size", f"{c.adv_estimator!r} advantages need at least 2 responses per prompt"
        if c.strict_on_policy and c.top_p != 1.0:
            yield "top_p", ("strict on-policy samples the full distribution the learner scores (top_p=1, top_k=0); "
                            "the learner does not apply the same truncation")
        if c.strict_on_policy and c.top_k != 0:
            yield "top_k", "strict on-policy samples the full distribution the learner scores (top_p=1, top_k=0)"


@dataclasses.dataclass
class RolloutPipelineSettings:
    """How rollouts reach the learner: the pipeline, dynamic sampling, overlong answers."""

    pipeline: str = setting("sync", "sync: sample, then learn, then sync weights (strict on-policy); streaming: "
                            "the same update, with the learner's forward running on each engine call's groups as "
                            "they finish and the realized-change re-score during the next generation (strict "
                            "on-policy); async: the engines generate the next batch with the weights they hold while "
                            "the learner trains (one batch ahead; samples 1 version old; needs strict_on_policy: "
                            "false)", choices=("sync", "streaming", "async"))
    stream_chunks: int = setting(2, "streaming: each engine's share of a batch goes as this many calls, answered one "
                                 "by one (2: the fastest of 2, 4, 8 on the default workload, docs/pipeline.md)", low=1)
    stream_backward: bool = setting(False, "streaming: run each chunk's backward as it arrives too, into two "
                                    "gradient accumulators (of l_t and of c_t l_t, c_t the token's balance side: "
                                    "w_t = 1 + lambda c_t) combined with the batch's lambda once it is in: the whole "
                                    "learner during generation, for a second backward per chunk (none under GRPO) "
                                    "and two fp32 copies of the model; pays when generation outlasts the learner "
                                    "(docs/pipeline.md). policy_loss pg, without adaptive_entropy, optimizer_aware, "
                                    "top_entropy_quantile or offpolicy_mask")
    max_staleness: int = setting(1, "async: a sample older than the learner's version minus this is left out of the "
                                 "loss (rollout/dropped_stale)", low=1)
    offpolicy_mask: str = setting("none", "off-policy samples: token (tokens whose pi_learner / pi_engine is outside "
                                  "[1/tis_cap, tis_cap] get no gradient), sequence (the whole answer then), or none",
                                  choices=("none", "token", "sequence"))
    filter_groups: str = setting("none", "dynamic sampling (DAPO): zero_variance drops groups whose rewards are all "
                                 "equal (no advantage) and refills the batch with new prompts", choices=("none", "zero_variance"))
    max_refill_rounds: int = setting(3, "filter_groups: rounds of new prompts before a batch is returned short "
                                     "(rollout/batch_shortfall says by how many groups)", low=0)
    mask_truncated: bool = setting(False, "answers cut at max_new_tokens get no gradient (DAPO overlong filtering)")
    overlong_buffer_len: int | None = setting(None, "soft overlong penalty (DAPO): the last this many tokens before "
                                              "max_new_tokens cost up to overlong_penalty reward, linearly (None: off)",
                                              low=1)
    overlong_penalty: float = setting(1.0, "the reward an answer of max_new_tokens tokens loses (overlong_buffer_len)",
                                      low=0.0)

    @staticmethod
    def cross_checks(c) -> Iterator[tuple[str, str]]:
        if c.pipeline == "async" and c.strict_on_policy:
            yield "pipeline", ("pipeline 'async' trains on samples of the previous weights; it needs "
                               "strict_on_policy: false (OPEFO then is approximately on-policy; see tis_cap, "
                               "offpolicy_mask)")
        if c.pipeline == "streaming":
            if c.num_updates_per_batch != 1:
                yield "pipeline", ("pipeline 'streaming' keeps each chunk's forward for the batch's one optimizer "
                                   "step; it needs num_updates_per_batch: 1")
            if c.zero_stage == 3:
                yield "pipeline", ("pipeline 'streaming' keeps several forwards' graphs before one backward, which "
                                   "ZeRO-3's parameter gathering does not support; use zero_stage 0-2")
            if c.colocate_engines:
                yield "pipeline", ("pipeline 'streaming' runs the learner during generation, while colocated engines "
                                   "hold their memory (they release it only for the update); use sync or async")
        if c.stream_backward:
            if c.pipeline != "streaming":
                yield "stream_backward", "stream_backward is a form of pipeline 'streaming'"
            elif c.policy_loss != "pg":
                yield "stream_backward", ("stream_backward needs policy_loss 'pg' (its gradient is affine in lambda; "
                                          f"{c.policy_loss!r} is not)")
            elif c.adaptive_entropy or c.balance_mode == "optimizer_aware" or c.top_entropy_quantile < 1.0 \
                    or c.offpolicy_mask != "none":
                yield "stream_backward", ("stream_backward needs every token's weight from its own chunk and lambda: "
                                          "not adaptive_entropy, balance_mode optimizer_aware, top_entropy_quantile "
                                          "< 1 or offpolicy_mask (they need the whole batch)")
        if c.offpolicy_mask != "none" and c.tis_cap is None:
            yield "offpolicy_mask", "offpolicy_mask needs tis_cap (its band is [1/tis_cap, tis_cap])"
        if c.overlong_buffer_len is not None and c.overlong_buffer_len >= c.max_new_tokens:
            yield "overlong_buffer_len", f"must be below max_new_tokens ({c.max_new_tokens})"


@dataclasses.dataclass
class EpisodeSettings:
    """Multi-turn episodes: how many turns, how many tokens, which reward (docs/multi_turn.md)."""

    max_turns: int | None = setting(None, "multi-turn envs: model turns per episode at most (None: the env's own "
                                    "max_turns); an episode still going after them is cut", low=1)
    max_episode_tokens: int | None = setting(None, "multi-turn envs: tokens after the prompt per episode at most, the "
                                             "model's and the env's (None: no bound but max_turns); a turn that "
                                             "reaches it is cut there and ends the episode (episode/cut_frac)",
                                             low=1)
    episode_reward: str = setting("final", "multi-turn envs: an episode's reward is its final step's (final) or the "
                                  "sum of every step's (sum)", choices=("final", "sum"))
    env_step_workers: int = setting(8, "multi-turn envs: episodes whose env steps (tool programs, verifiers) run "
                                    "at once", low=1)


# HFEngine's keyword arguments a config may set through engine_kwargs (the rest come from fields;
# tests/unit/config/test_config_sections.py ties this to HFEngine's signature).
HF_ENGINE_KWARGS = ("device", "num_threads", "token_delay_s")


@dataclasses.dataclass
class FleetSettings:
    """The inference fleet: engine actors, their resources, timeouts and weight sync."""

    engine: str = setting("hf", "engine kind", choices=("hf", "vllm", "sglang"))
    num_engines: int = setting(1, "engine actors (each prompt group is generated whole on one)", low=1)
    num_cpus_per_engine: float = setting(0.5, "CPUs reserved per engine actor", low=0.0)
    num_gpus_per_engine: float = setting(0.0, "GPUs reserved per engine actor", low=0.0)
    engine_node_labels: dict | None = setting(None, "Ray node labels an engine actor must run on (Ray's "
                                              "label_selector, e.g. {opefo-role: engines}; a node gets its labels "
                                              "from ray start --labels); None: any node. A restarted engine waits "
                                              "up to resource_wait_timeout_s + weight_sync_timeout_s for such a node",
                                              check=lambda v: None if all(isinstance(k, str) and k and
                                                                          isinstance(x, str) for k, x in v.items())
                                              else "must map label names to string values")
    engine_node_fallback: bool = setting(False, "with engine_node_labels: an engine that no labelled node can take "
                                         "(none has room, or its node died) runs on any node with room instead of "
                                         "waiting for one")
    colocate_engines: bool = setting(False, "engines share the learners' devices and release memory during updates")
    engine_dtype: str = setting("float32", "the engines' dtype", choices=DTYPES)
    stall_timeout_s: float = setting(180.0, "a generation whose engine produced no new token for this long ends "
                                     "the run in one line naming the engine, the step and the tokens so far; "
                                     "one still producing tokens runs on, however long", low=0.0, low_open=True)
    generate_timeout_s: float | None = setting(None, "optional hard cap on one wait for generation, tokens coming "
                                               "or not (None: none; stall_timeout_s is the deadline)",
                                               low=0.0, low_open=True)
    weight_sync_timeout_s: float = setting(120.0, "deadline of one weight push", low=0.0, low_open=True)
    resource_wait_timeout_s: float = setting(10.0, "how long a run waits for the Ray cluster to have the CPUs and "
                                             "GPUs it asks for before it stops naming what is missing (raise it "
                                             "for autoscaling clusters)", low=0.0)
    weight_sync: str = setting("auto", "native (vLLM's weight-transfer API), object_store, or auto",
                               choices=("auto", "native", "object_store"))
    weight_transfer_backend: str = setting("auto", "native backend: nccl, ipc (colocated), opefo_gloo (CPU), or auto",
                                           choices=("auto", "nccl", "ipc", "opefo_gloo"))
    weight_transfer_address: str = setting("127.0.0.1", "address the learner's weight-transfer store listens on")
    weights_check: str | bool = setting("every_sync", "after a weight sync every engine's log-probs of a fixed probe "
                                        "sequence must equal the learner's (tolerance by dtype: 1e-3 fp32, 0.1 bf16), "
                                        "or the run stops naming the engine and the version: every_sync, every_n "
                                        "(weights_check_every), or off (YAML's off, false, is taken as off)",
                                        check=lambda v: None if v in ("every_sync", "every_n", "off", False)
                                        else "must be every_sync, every_n or off")
    weights_check_every: int = setting(10, "weights_check every_n: check every this many syncs", low=1)
    engine_kwargs: dict | None = setting(None, "extra keyword arguments of each engine (vLLM: LLM(...) arguments such "
                                         "as gpu_memory_utilization, max_model_len, tensor_parallel_size)")

    @staticmethod
    def cross_checks(c) -> Iterator[tuple[str, str]]:
        unknown = sorted(set(c.engine_kwargs or {}) - set(HF_ENGINE_KWARGS)) if c.engine == "hf" else []
        if unknown:  # vLLM and SGLang take any keyword of their own engines
            yield "engine_kwargs", (f"the hf engine takes no {unknown} (a vLLM setting?); its own: "
                                    f"{list(HF_ENGINE_KWARGS)}")
        if c.engine_node_fallback and not c.engine_node_labels:
            yield "engine_node_fallback", "falls back from engine_node_labels, which is not set"
        if c.weight_sync == "native" and c.engine != "vllm":
            yield "weight_sync", (f"native weight transfer is vLLM's API; engine is {c.engine!r} "
                                  "(use 'auto' or 'object_store')")


@dataclasses.dataclass
class ObjectiveSettings:
    """The objective: advantages, the registered policy loss, aggregation, on-policy mode."""

    adv_estimator: str = setting("grpo", "registered group-advantage estimator", choices=lambda: ADV_ESTIMATORS)
    policy_loss: str = setting("pg", "registered policy loss (pg = strict on-policy)", choices=lambda: POLICY_LOSSES)
    loss_agg_mode: str = setting("token-mean", "how the per-token loss is reduced", choices=AGG_MODES)
    entropy_coef: float = setting(0.0, "entropy bonus coefficient (a baseline; 0 = off)")
    adaptive_entropy: bool = setting(False, "adapt entropy_coef towards entropy_target each step (Skywork-OR1; TRL's "
                                     "use_adaptive_entropy): coef += entropy_coef_lr x (target - batch entropy)")
    entropy_coef_lr: float = setting(0.01, "adaptive_entropy: step size of the coefficient per nat of gap", low=0.0)
    entropy_coef_max: float = setting(0.05, "adaptive_entropy: the coefficient stays in [0, this]", low=0.0)
    top_entropy_quantile: float = setting(1.0, "train on the highest-entropy tokens only: the top this fraction of "
                                          "each batch's response tokens by H_t (0.2: the 'forking' tokens; TRL's "
                                          "top_entropy_quantile; 1: all)", low=0.0, high=1.0, low_open=True)
    tis_cap: float | None = setting(None, "truncated importance sampling cap C on pi_learner / pi_engine (None: off)",
                                    low=0.0, low_open=True)
    strict_on_policy: bool = setting(True, "refuse samples of other weight versions; one optimizer step per batch")
    num_updates_per_batch: int = setting(1, "optimizer steps per batch (> 1 needs strict_on_policy: false)", low=1)
    micro_batch_size: int | None = setting(None, "sequences per forward/backward (None: the whole batch)", low=1)
    max_tokens_per_micro_batch: int | None = setting(None, "token budget of a forward/backward: rows sorted by length "
                                                     "and packed to rows x longest <= budget (None: off)", low=1)
    fuse_flow_pass: bool = setting(True, "when the whole update is one micro-batch (one learner, one optimizer "
                                   "step), run its forward once, with gradients, for both the flow pass and the "
                                   "backward (the same update, one forward fewer)")
    verify_failure_policy: str = setting("mask", "answers whose verification timed out or crashed: mask (left out "
                                         "of the loss and the baseline) or zero (scored as wrong)",
                                         choices=("mask", "zero"))

    @staticmethod
    def cross_checks(c) -> Iterator[tuple[str, str]]:
        if c.strict_on_policy and c.num_updates_per_batch != 1:
            yield "num_updates_per_batch", ("strict on-policy takes exactly one optimizer step per rollout batch; "
                                            "set strict_on_policy=False for approximate on-policy training")


@dataclasses.dataclass
class KLSettings:
    """KL to a reference policy, the starting model (off by default, as in the paper)."""

    kl_coef: float = setting(0.0, "weight of the KL penalty to the reference policy (0: off, no reference is built)",
                             low=0.0)
    kl_estimator: str = setting("low_var_kl", "per-token KL estimator: k1 (log pi - log pi_ref), k2 (squared log "
                                "ratio / 2), k3 (exp(r) - r - 1, r = log pi_ref - log pi), low_var_kl (k3 clamped)",
                                choices=lambda: tuple(KL_ESTIMATORS))
    kl_in: str = setting("loss", "loss: kl_coef x the aggregated KL is added to the loss (gradient through log pi); "
                         "reward: kl_coef x each answer's summed KL is taken from its reward before the group "
                         "advantages (so also from the entropy flow's A_t)", choices=KL_PLACES)
    kl_reference: str = setting("learner", "where the reference lives: learner (a frozen copy beside the policy; "
                                "under LoRA the policy with its adapter off) or actor (a Ray actor of its own per "
                                "learner, loaded from model_path: for models too large to hold twice on a learner)",
                                choices=("learner", "actor"))
    kl_reference_num_cpus: float = setting(0.0, "kl_reference actor: CPUs it reserves (outside the run's placement "
                                           "group: not counted in the run's resource request)", low=0.0)
    kl_reference_num_gpus: float = setting(0.0, "kl_reference actor: GPUs it reserves (likewise not counted)", low=0.0)

    @staticmethod
    def cross_checks(c) -> Iterator[tuple[str, str]]:
        if c.kl_coef > 0 and c.stream_backward:
            yield "kl_coef", ("the KL penalty needs the reference's log-probs of the whole batch before any backward; "
                              "stream_backward runs them during generation (use stream_backward: false)")
        if c.kl_reference == "actor" and c.lora_rank:
            yield "kl_reference", ("under LoRA the reference is the base model inside the policy (adapter off), no "
                                   "copy to move out: use kl_reference: learner")


@dataclasses.dataclass
class EntropyFlowSettings:
    """Entropy flow: the estimator every run logs, and OPEFO's balancing rule."""

    entropy_flow_estimator: str = setting("exact", "per-token entropy-flow estimator", choices=ESTIMATORS)
    balance_mode: str = setting("none", 'balancing rule ("two_sided" = OPEFO, the OPEFO default; "none" = GRPO)',
                                choices=lambda: tuple(BALANCE_RULES))  # the registered rules (core/balance.py)
    static_lambda: float = setting(0.0, 'lambda of balance_mode "static"', low=-1.0, high=1.0, low_open=True,
                                   high_open=True)
    balance_fraction: float = setting(1.0, "f in lambda = f * lambda*: the fraction of the net flow cancelled",
                                      low=0.0, high=1.0)
    max_abs_lambda: float | None = setting(None, "cap on |lambda| (None: no cap; OPEFO's default is 0.3, the "
                                           "entropy-rules study's pick: docs/results.md)", low=0.0, high=1.0,
                                           high_open=True)
    measure_realized_change: bool = setting(True, "re-score the batch after the optimizer step (no grad) and log "
                                            "entropy_flow/realized_change (one extra forward per step: the learner's; "
                                            "streaming: during the next generation; async with fp32 HF engines: the "
                                            "engines', during the next update)")
    entropy_target: float | None = setting(None, 'closed_loop: the entropy to hold (None: the first batch\'s)',
                                           low=0.0, low_open=True)
    closed_loop_gain: float = setting(10.0, "closed_loop: f -= gain x realized entropy change per step", low=0.0)
    closed_loop_target_gain: float = setting(1.0, "closed_loop: f -= target_gain x (batch entropy - target) / target",
                                             low=0.0)
    closed_loop_max_fraction: float = setting(1.5, "closed_loop: f stays in [0, this]; lambda = f x lambda*, |lambda| "
                                              "<= 0.95", low=0.0, high=5.0)

    @staticmethod
    def cross_checks(c) -> Iterator[tuple[str, str]]:
        learner_class = getattr(c, "get_default_learner_class", None)  # an algorithm config: its learner
        if c.balance_mode != "none" and learner_class is not None \
                and not getattr(learner_class(), "balances_entropy_flow", True):
            yield "balance_mode", ("algorithm GRPO trains with w = 1 (balance_mode none); use algorithm OPEFO to "
                                   "balance the entropy flow")
        if c.balance_mode == "closed_loop" and not c.measure_realized_change:
            yield "measure_realized_change", "closed_loop balancing is driven by the realized entropy change"
        if c.balance_mode == "optimizer_aware" and c.zero_stage == 3:
            yield "balance_mode", ("optimizer_aware takes gradients per parameter, which ZeRO-3 partitions: it needs "
                                   "zero_stage 0, 1 or 2 (any number of learners, fp32 or bf16)")


@dataclasses.dataclass
class OptimizationSettings:
    """AdamW (through DeepSpeed) and its schedule; lr and grad_clip are RLlib's fields."""

    weight_decay: float = setting(0.0, "AdamW weight decay", low=0.0)
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas (beta1, beta2)", check=lambda b: None if all(
        0.0 <= x < 1.0 for x in b) else "each beta must be in [0, 1)")
    adam_eps: float = setting(1e-8, "AdamW epsilon", low=0.0, low_open=True)
    lr_warmup_steps: int = setting(0, "linear warm-up steps of the learning rate", low=0)
    max_nonfinite_steps: int = setting(3, "stop the run after this many batches in a row whose optimizer step was "
                                       "skipped for a non-finite loss or gradient norm", low=1)


@dataclasses.dataclass
class DeepSpeedSettings:
    """The DeepSpeed engine of the learner."""

    zero_stage: int = setting(0, "DeepSpeed ZeRO stage (3 shards parameters too)", choices=(0, 1, 2, 3))
    bf16: bool = setting(False, "bf16 mixed precision in the learner")
    learner_num_threads: int = setting(1, "torch threads of the learner process", low=1)
    learner_timeout_s: float = setting(1800.0, "deadline of one call on a remote learner (an update, the weights); "
                                       "the error names the call", low=0.0, low_open=True)
    offload_optimizer: bool = setting(False, "keep fp32 master weights and Adam states in CPU memory (ZeRO-Offload; "
                                      "needs zero_stage >= 1): ~12 bytes/param off the GPU")
    offload_params: bool = setting(False, "keep the bf16/fp32 parameter partitions in CPU memory between uses "
                                   "(ZeRO-Infinity parameter offload; needs zero_stage 3): ~2 bytes/param off the GPU")

    @staticmethod
    def cross_checks(c) -> Iterator[tuple[str, str]]:
        if c.offload_optimizer and c.zero_stage == 0:
            yield "offload_optimizer", "ZeRO-Offload needs zero_stage 1, 2 or 3"
        if c.offload_params and c.zero_stage != 3:
            yield "offload_params", "parameter offload needs zero_stage 3 (only stage 3 partitions parameters)"


@dataclasses.dataclass
class LoggingSettings:
    """TensorBoard and checkpoint exports."""

    tensorboard_dir: str | None = setting(None, "TensorBoard directory (None: the Algorithm's logdir)")
    log_text_every: int = setting(10, "iterations between text-sample tables (0: never)", low=0)
    num_text_samples: int = setting(4, "samples per text table", low=0)
    export_hf_on_checkpoint: bool = setting(True, "write hf_policy/ (Hugging Face format) beside each checkpoint")


def _check_eval_tasks(value: Any) -> str | None:
    from opefo_rllib.config.eval_spec import check_eval_tasks  # late: eval_spec imports config.fields

    return check_eval_tasks(value)


@dataclasses.dataclass
class EvaluationSettings:
    """Validation during training: problem sets evaluated on the training fleet with the current weights."""

    eval_every: int = setting(0, "iterations between evaluations of eval_tasks (0: never)", low=0)
    eval_before_train: bool = setting(False, "also evaluate eval_tasks before the first iteration (iteration 0)")
    eval_tasks: list | None = setting(None, "problem sets: a list of {name, task or data, env_config, num_problems, "
                                      "samples, pass_k, greedy}; logged as eval/NAME/<metric>",
                                      check=_check_eval_tasks)
    eval_exclude_draws: int = setting(8000, "a generated task's held-out set leaves out the training stream's first "
                                      "this many problems (its first epoch: the default run draws 250 x 32)", low=0)

    @staticmethod
    def cross_checks(c) -> Iterator[tuple[str, str]]:
        if (c.eval_every or c.eval_before_train) and not c.eval_tasks:
            yield "eval_tasks", "eval_every / eval_before_train are set but eval_tasks is empty"


def _auto_or_non_negative(value) -> str | None:
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        return None
    return 'must be "auto" or a number >= 0'


@dataclasses.dataclass
class RLlibSettings:
    """RLlib's own AlgorithmConfig fields that a run config may set."""

    env: str = setting("opefo/Arithmetic-v0", "registered text env (see `opefo envs`), or module:env-id")
    env_config: dict | None = setting(None, "keyword arguments of the env")
    lr: float = setting(1e-4, "learning rate", low=0.0)
    grad_clip: float | None = setting(1.0, "gradient-norm clip (None: off)", low=0.0, low_open=True)
    seed: int | None = setting(0, "seed of sampling, data order and the learner")
    num_learners: int = setting(0, "RLlib learner actors, data-parallel under DeepSpeed (0: one local learner in "
                                "the driver; N: N remote learners in one torch.distributed group)", low=0)
    num_cpus_per_learner: float | str = setting("auto", "CPUs of each remote learner (auto: 1 without GPUs, else 0)",
                                                check=_auto_or_non_negative)
    num_gpus_per_learner: float = setting(0, "GPUs of each learner (with num_learners 0: of the local learner)",
                                          low=0.0)


def _ray_kwargs(value: dict) -> str | None:
    bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
    return f"keys must be ray.init keyword names, got {bad}" if bad else None


@dataclasses.dataclass
class RunSettings:
    """Keys of a run config that are not algorithm fields (read by `opefo train`)."""

    algorithm: str = setting("OPEFO", "OPEFO or GRPO", choices=("OPEFO", "GRPO", "opefo", "grpo"))
    iterations: int = setting(100, "train until the run has done this many iterations (a resumed run continues to it)", low=1)
    checkpoint_every: int = setting(0, "iterations between checkpoints (0: only at the end)", low=0)
    keep_checkpoints: int = setting(0, "keep the newest N checkpoints of the run, removing older ones after each save "
                                    "(0: keep all; a 135M-parameter model's is ~1.6 GB with its Adam state)", low=0)
    max_failures: int = setting(3, "`opefo train` restarts a run whose driver or learner died (or a deadline passed) "
                                "from its latest checkpoint up to this many times (0: a failure ends the run)", low=0)
    logdir: str | None = setting(None, "run directory (None: opefo_runs/<time>)")
    ray: dict = setting({"num_cpus": 2}, "keyword arguments of ray.init when train() starts Ray (address: join a "
                        "running cluster); a run inside a running Ray session uses that one", check=_ray_kwargs)
    base: str | None = setting(None, "a run config this one overlays (path relative to this file)")


def _registry_settings() -> list[type]:
    seen: list[type] = []
    for cls in list(POLICY_LOSS_SETTINGS.values()) + list(ADV_EST_SETTINGS.values()):
        if cls not in seen:
            seen.append(cls)
    return seen


class RegistrySection(Section):
    """The "loss_settings" section: the fields and rules of every registered loss's / estimator's
    settings dataclass, collected when asked (a loss registered later contributes its fields too)."""

    def _parts(self) -> list[Section]:
        return [Section(self.name, cls, self.setter, self.doc, {}) for cls in _registry_settings()]

    def fields(self):
        out, names = [], set()
        for spec in (spec for part in self._parts() for spec in part.fields()):
            if spec.name not in names:
                names.add(spec.name)
                out.append(spec)
        return out

    def cross_checks(self, config):
        for part in self._parts():
            yield from part.cross_checks(config)


register_section("environment", EnvironmentSettings)
register_section("policy_model", PolicyModelSettings)
register_section("lora", LoraSettings, setter="policy_model")
register_section("prompts", PromptSettings, setter="generation")
register_section("generation", GenerationSettings)
register_section("rollout", RolloutPipelineSettings)
register_section("episodes", EpisodeSettings, setter="generation")
register_section("fleet", FleetSettings)
register_section("objective", ObjectiveSettings, setter="training")
SECTIONS["loss_settings"] = RegistrySection("loss_settings", object, "training",
                                            "Settings of the registered policy losses and advantage estimators", {})
register_section("kl", KLSettings, setter="training")
register_section("entropy_flow", EntropyFlowSettings, aliases={"estimator": "entropy_flow_estimator"})
register_section("optimization", OptimizationSettings, setter="training")
register_section("deepspeed", DeepSpeedSettings)
register_section("logging", LoggingSettings)
register_section("evaluation", EvaluationSettings)

# Not GRPOConfig sections of ours: RLlib's own fields and the run keys (checked the same way).
RLLIB_SECTION = Section("rllib", RLlibSettings, "", RLlibSettings.__doc__.strip(), {})
RUN_SECTION = Section("run", RunSettings, "", RunSettings.__doc__.strip(), {})


def rllib_fields() -> dict[str, Any]:
    return {f.name: f for f in RLLIB_SECTION.fields()}


def run_fields() -> dict[str, Any]:
    return {f.name: f for f in RUN_SECTION.fields()}

