"""The typed config sections: one definition per field drives defaults, setters, YAML keys,
validation (every rule names its field), `opefo config` and the field table of docs/configuration.md."""

import dataclasses
import pathlib
import re

import pytest

from opefo_rllib.config import (
    RLLIB_SECTION,
    RUN_SECTION,
    SECTIONS,
    ConfigError,
    all_fields,
    markdown_table,
    register_section,
    setting,
)
from opefo_rllib.run_config import apply_overrides, build_algo_config, load_run_config
from paths import REPO_ROOT

CONFIGURATION_PAGE = REPO_ROOT / "docs" / "configuration.md"
TINY = REPO_ROOT / "configs" / "tiny_cpu.yaml"

# One bad value per validation rule, and the field its error must name.
BAD_VALUES = [
    ("algorithm=ppo", "algorithm"), ("iterations=-1", "iterations"), ("iterations=0", "iterations"),
    ("checkpoint_every=-1", "checkpoint_every"), ("keep_checkpoints=-1", "keep_checkpoints"), ("max_failures=-1", "max_failures"), ("logdir=5", "logdir"), ("ray=[2]", "ray"), ("ray={1: 2}", "ray"),
    ("lr=abc", "lr"), ("lr=-1", "lr"), ("grad_clip=0", "grad_clip"), ("seed=abc", "seed"),
    ("num_learners=-1", "num_learners"), ("num_cpus_per_learner=-1", "num_cpus_per_learner"),
    ("num_cpus_per_learner=lots", "num_cpus_per_learner"), ("num_gpus_per_learner=-1", "num_gpus_per_learner"),
    ("offload_optimizer=1", "offload_optimizer"), ("offload_params=true", "offload_params"),
    ("pipeline=stream", "pipeline"), ("pipeline=async", "pipeline"), ("stream_chunks=0", "stream_chunks"), ("max_staleness=0", "max_staleness"),
    ("offpolicy_mask=all", "offpolicy_mask"), ("offpolicy_mask=token", "offpolicy_mask"),
    ("filter_groups=std", "filter_groups"), ("max_refill_rounds=-1", "max_refill_rounds"),
    ("mask_truncated=2", "mask_truncated"), ("overlong_buffer_len=0", "overlong_buffer_len"),
    ("overlong_buffer_len=8", "overlong_buffer_len"), ("overlong_penalty=-1", "overlong_penalty"),
    ("max_turns=0", "max_turns"), ("max_episode_tokens=0", "max_episode_tokens"),
    ("episode_reward=mean", "episode_reward"), ("env_step_workers=0", "env_step_workers"),
    ("weights_check=sometimes", "weights_check"), ("weights_check_every=0", "weights_check_every"),
    ("engine_node_labels={role: 1}", "engine_node_labels"), ("engine_node_labels=[a]", "engine_node_labels"),
    ("engine_node_fallback=true", "engine_node_fallback"),
    ("fuse_flow_pass=maybe", "fuse_flow_pass"), ("offload_optimizer=true", "offload_optimizer"), ("env_config=[1]", "env_config"),
    ("imports=[1]", "imports"), ("imports=mymod", "imports"), ("model_path=5", "model_path"), ("model_dtype=float16", "model_dtype"),
    ("gradient_checkpointing=maybe", "gradient_checkpointing"), ("logits_chunk_size=0", "logits_chunk_size"),
    ("prompt_format=jinja", "prompt_format"), ("system_prompt=3", "system_prompt"),
    ("max_prompt_tokens=0", "max_prompt_tokens"), ("on_long_prompt=truncate", "on_long_prompt"),
    ("stop_token_ids=[-1]", "stop_token_ids"), ("stop_token_ids=[a]", "stop_token_ids"),
    ("prompts_per_batch=0", "prompts_per_batch"), ("prompts_per_batch=2.5", "prompts_per_batch"),
    ("group_size=0", "group_size"), ("group_size=1", "group_size"),
    ("temperature=0", "temperature"), ("max_new_tokens=0", "max_new_tokens"),
    ("top_p=0", "top_p"), ("top_p=0.9", "top_p"), ("top_k=-1", "top_k"), ("top_k=5", "top_k"),
    ("engine=tgi", "engine"), ("num_engines=0", "num_engines"), ("num_cpus_per_engine=-1", "num_cpus_per_engine"),
    ("num_gpus_per_engine=-1", "num_gpus_per_engine"), ("colocate_engines=2", "colocate_engines"),
    ("engine_dtype=int8", "engine_dtype"), ("generate_timeout_s=0", "generate_timeout_s"),
    ("stall_timeout_s=0", "stall_timeout_s"),
    ("weight_sync_timeout_s=-5", "weight_sync_timeout_s"), ("resource_wait_timeout_s=-1", "resource_wait_timeout_s"), ("weight_sync=nccl", "weight_sync"),
    ("weight_sync=native", "weight_sync"), ("weight_transfer_backend=mpi", "weight_transfer_backend"),
    ("weight_transfer_address=7", "weight_transfer_address"),
    ("adv_estimator=ppo", "adv_estimator"), ("policy_loss=dpo", "policy_loss"), ("loss_agg_mode=sum", "loss_agg_mode"),
    ("entropy_coef=nan", "entropy_coef"), ("adaptive_entropy=1", "adaptive_entropy"),
    ("entropy_coef_lr=-1", "entropy_coef_lr"), ("entropy_coef_max=-1", "entropy_coef_max"),
    ("kl_coef=-0.1", "kl_coef"), ("kl_estimator=k4", "kl_estimator"), ("kl_in=advantage", "kl_in"),
    ("kl_reference=engine", "kl_reference"), ("kl_reference_num_cpus=-1", "kl_reference_num_cpus"),
    ("kl_reference_num_gpus=-1", "kl_reference_num_gpus"), ("kl_reference=actor\nlora_rank=8", "kl_reference"),
    ("lora_rank=-1", "lora_rank"), ("lora_alpha=0", "lora_alpha"), ("lora_dropout=1.0", "lora_dropout"),
    ("lora_target_modules=[]", "lora_target_modules"), ("lora_sync=tensors", "lora_sync"),
    ("lora_rank=8\nzero_stage=3", "lora_rank"),     ("lora_rank=8\nengine=vllm\nweight_sync=native", "weight_sync"),
    ("lora_rank=8\nlora_dropout=0.1", "lora_dropout"),
    ("top_entropy_quantile=0", "top_entropy_quantile"), ("top_entropy_quantile=1.5", "top_entropy_quantile"), ("tis_cap=0", "tis_cap"), ("strict_on_policy=1", "strict_on_policy"),
    ("num_updates_per_batch=4", "num_updates_per_batch"), ("num_updates_per_batch=0", "num_updates_per_batch"),
    ("micro_batch_size=0", "micro_batch_size"), ("max_tokens_per_micro_batch=0", "max_tokens_per_micro_batch"), ("verify_failure_policy=drop", "verify_failure_policy"),
    ("eps_low=-1", "eps_low"), ("eps_low=1", "eps_low"), ("eps_high=-0.1", "eps_high"),
    ("clip_ratio_c=0.5", "clip_ratio_c"), ("clip_cov_ratio=2", "clip_cov_ratio"), ("clip_cov_lb=9", "clip_cov_lb"),
    ("clip_cov_ub=abc", "clip_cov_ub"), ("kl_cov_ratio=-1", "kl_cov_ratio"), ("kl_cov_coef=-1", "kl_cov_coef"),
    ("entropy_flow_estimator=second_order", "entropy_flow_estimator"), ("balance_mode=sideways", "balance_mode"),
    ("static_lambda=1", "static_lambda"), ("balance_fraction=1.5", "balance_fraction"),
    ("max_abs_lambda=1", "max_abs_lambda"), ("measure_realized_change=2", "measure_realized_change"),
    ("entropy_target=0", "entropy_target"), ("closed_loop_gain=-1", "closed_loop_gain"),
    ("closed_loop_target_gain=-1", "closed_loop_target_gain"), ("closed_loop_max_fraction=9", "closed_loop_max_fraction"), ("weight_decay=-1", "weight_decay"),
    ("adam_betas=[0.9, 1.0]", "adam_betas"), ("adam_betas=[0.9]", "adam_betas"), ("adam_eps=0", "adam_eps"),
    ("lr_warmup_steps=-1", "lr_warmup_steps"), ("max_nonfinite_steps=0", "max_nonfinite_steps"), ("zero_stage=5", "zero_stage"), ("bf16=2", "bf16"),
    ("learner_num_threads=0", "learner_num_threads"), ("learner_timeout_s=0", "learner_timeout_s"), ("tensorboard_dir=3", "tensorboard_dir"),
    ("log_text_every=-1", "log_text_every"), ("num_text_samples=-1", "num_text_samples"),
    ("export_hf_on_checkpoint=off_", "export_hf_on_checkpoint"),
    ("eval_every=-1", "eval_every"), ("eval_exclude_draws=-1", "eval_exclude_draws"),
    ("eval_tasks=[{task: opefo/Arithmetic-v0, data: x.jsonl}]", "eval_tasks"),
]


@pytest.mark.parametrize("override, field", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_each_validation_rule_names_its_field(override, field):
    # The library's pipeline (sync): the default run's streaming refuses some of these values itself.
    data = apply_overrides(load_run_config([TINY]), ["pipeline=sync", *override.split("\n")])  # a newline: several
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        build_algo_config(data)


@pytest.mark.parametrize("other", ["zero_stage=3", "strict_on_policy=false\nnum_updates_per_batch=2",
                                   "colocate_engines=true"])
def test_streaming_refuses_what_it_cannot_keep_on_one_step(other):
    data = apply_overrides(load_run_config([TINY]), ["pipeline=streaming", *other.split("\n")])
    with pytest.raises(ConfigError, match="config field 'pipeline'.*streaming"):
        build_algo_config(data)


@pytest.mark.parametrize("other", ["pipeline=sync", "policy_loss=ppo_clip", "adaptive_entropy=true",
                                   "balance_mode=optimizer_aware", "top_entropy_quantile=0.2"])
def test_stream_backward_refuses_what_needs_the_whole_batch(other):
    data = apply_overrides(load_run_config([TINY]), ["pipeline=streaming", "stream_backward=true", other])
    with pytest.raises(ConfigError, match="config field 'stream_backward'"):
        build_algo_config(data)


def test_hf_engine_kwargs_are_those_of_its_constructor():
    import inspect

    from opefo_rllib.config.sections import HF_ENGINE_KWARGS
    from opefo_rllib.fleet.hf_engine import HFEngine

    from_fields = {"model_path", "eos_token_id", "pad_token_id", "dtype", "lora"}  # fleet_from_config sets these
    assert set(HF_ENGINE_KWARGS) == set(inspect.signature(HFEngine).parameters) - from_fields
    data = apply_overrides(load_run_config([TINY]), ["engine_kwargs={max_model_len: 1024}"])
    with pytest.raises(ConfigError, match="config field 'engine_kwargs'.*max_model_len"):
        build_algo_config(data)


def test_lora_without_peft_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    data = apply_overrides(load_run_config([TINY]), ["lora_rank=4"])
    with pytest.raises(ConfigError, match=r"config field 'lora_rank'.*pip install 'opefo-rllib\[lora\]'"):
        build_algo_config(data)


def test_the_kl_penalty_is_refused_with_stream_backward():
    data = apply_overrides(load_run_config([TINY]), ["pipeline=streaming", "stream_backward=true", "kl_coef=0.01"])
    with pytest.raises(ConfigError, match="config field 'kl_coef'.*stream_backward"):
        build_algo_config(data)
    build_algo_config(apply_overrides(load_run_config([TINY]), ["kl_coef=0.01", "kl_in=reward"]))  # streaming alone: fine


def test_every_checked_field_has_a_bad_value_case():
    """A field whose declaration has a check, choices or bounds must appear in BAD_VALUES."""
    covered = {field for _, field in BAD_VALUES}
    sections = [RUN_SECTION, RLLIB_SECTION, *SECTIONS.values()]
    for spec in (f for s in sections for f in s.fields()):
        m = spec.meta
        if any(m.get(k) is not None for k in ("choices", "low", "high", "check")):
            assert spec.name in covered, f"no BAD_VALUES case for the checked field {spec.name!r}"


def test_every_field_is_typed_documented_and_its_default_valid():
    from opefo_rllib.algorithms.grpo.grpo import GRPOConfig, validate_fields

    fields = all_fields()
    assert len(fields) > 50
    for spec in fields.values():
        assert spec.doc and len(spec.doc) > 10, spec.name
        assert spec.type_name() and "typing" not in spec.type_name(), spec.name
    config = GRPOConfig()
    for name, spec in fields.items():
        assert getattr(config, name) == spec.default, name
    validate_fields(config)  # the defaults pass their own checks


def test_setters_are_derived_from_sections_and_refuse_unknown_keywords():
    from opefo_rllib.algorithms.grpo.grpo import GRPOConfig
    from opefo_rllib.algorithms.opefo import OPEFOConfig

    c = (OPEFOConfig().training(lr=3e-4, policy_loss="ppo_clip", eps_high=0.28, adam_betas=[0.9, 0.99],
                                balance_mode="static", static_lambda=0.1)
         .generation(prompts_per_batch=4, group_size=2).fleet(num_engines=2).entropy_flow(estimator="paper")
         .deepspeed(zero_stage=2).logging(log_text_every=0).policy_model(logits_chunk_size=64))
    assert (c.lr, c.policy_loss, c.eps_high, c.adam_betas) == (3e-4, "ppo_clip", 0.28, (0.9, 0.99))
    assert (c.balance_mode, c.static_lambda, c.entropy_flow_estimator) == ("static", 0.1, "paper")
    assert (c.prompts_per_batch, c.group_size, c.num_engines, c.zero_stage) == (4, 2, 2, 2)
    with pytest.raises(TypeError, match="generation.*'lr'"):
        GRPOConfig().generation(lr=1e-3)
    with pytest.raises(TypeError, match="fleet.*'group_sise'"):
        GRPOConfig().fleet(group_sise=3)
    assert "group_size (int, default 8)" in GRPOConfig.generation.__doc__


def test_a_new_section_is_one_declaration(tmp_path):
    """Registering a section gives a default, a setter keyword, a YAML key and validation."""
    from opefo_rllib.algorithms.grpo.grpo import GRPOConfig

    @dataclasses.dataclass
    class ProbeSettings:
        """A section added by a test."""

        probe_knob: float = setting(0.5, "a knob for the test", low=0.0, high=1.0)

    register_section("probe", ProbeSettings, setter="logging")
    try:
        assert GRPOConfig().probe_knob == 0.5
        assert GRPOConfig().logging(probe_knob=0.25).probe_knob == 0.25
        run = tmp_path / "run.yaml"
        run.write_text(f"base: {TINY}\nprobe_knob: 0.75\n")
        assert build_algo_config(load_run_config([run])).probe_knob == 0.75
        with pytest.raises(ConfigError, match="'probe_knob' = 2"):
            build_algo_config(apply_overrides(load_run_config([TINY]), ["probe_knob=2"]))
        assert "probe_knob" in markdown_table(SECTIONS.values())
    finally:
        del SECTIONS["probe"]
    with pytest.raises(ValueError, match="already in section 'generation'"):
        @dataclasses.dataclass
        class Clash:
            """Clash."""

            group_size: int = setting(3, "a second definition of group_size")

        register_section("clash", Clash)
    assert "clash" not in SECTIONS


def test_a_registered_loss_declares_its_own_settings():
    import torch

    from opefo_rllib.algorithms.grpo.grpo import GRPOConfig
    from opefo_rllib.core.policy_losses import POLICY_LOSS_SETTINGS, POLICY_LOSSES, loss_settings, \
        register_policy_loss

    @dataclasses.dataclass(frozen=True)
    class ScaledPGSettings:
        """Settings of a test loss."""

        pg_scale: float = dataclasses.field(default=2.0, metadata={"doc": "scale of the test loss", "low": 0.0})

    @register_policy_loss("scaled_pg_test", settings=ScaledPGSettings)
    def scaled_pg(logp, old_logp, advantages, mask, config, generator):
        return -config.pg_scale * advantages * logp, {}

    try:
        c = GRPOConfig().training(policy_loss="scaled_pg_test", pg_scale=3.0)
        c.validate()
        settings = loss_settings("scaled_pg_test", c)
        assert settings == ScaledPGSettings(pg_scale=3.0)
        loss, _ = POLICY_LOSSES["scaled_pg_test"](torch.ones(1, 2), None, torch.ones(1, 2), None, settings, None)
        assert float(loss.sum()) == -6.0
        c.pg_scale = -1.0
        with pytest.raises(ConfigError, match="'pg_scale' = -1.0"):
            c.validate()
    finally:
        del POLICY_LOSSES["scaled_pg_test"], POLICY_LOSS_SETTINGS["scaled_pg_test"]
    assert "pg_scale" not in all_fields()


def test_configuration_page_field_table_is_the_generated_one():
    text = CONFIGURATION_PAGE.read_text()
    block = re.search(r"<!-- fields:begin -->\n(.*?)\n<!-- fields:end -->", text, flags=re.S)
    assert block, "docs/configuration.md has no generated field table"
    expected = markdown_table([RUN_SECTION, RLLIB_SECTION, *SECTIONS.values()])
    assert block.group(1) == expected, (
        "docs/configuration.md's field table is not the generated one: regenerate it with the "
        "command under 'Every field (generated)' in that page (the table is `opefo config --markdown`)")
