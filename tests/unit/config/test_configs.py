"""Shipped run configs load and validate; bad keys and values are named."""

from pathlib import Path

import pytest

from opefo_rllib.run_config import ConfigError, apply_overrides, build_algo_config, load_run_config
from paths import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
OVERLAYS = sorted((CONFIGS / "overlays").glob("*.yaml"))
LAYOUTS = sorted((CONFIGS / "layouts").glob("*.yaml"))


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "qwen2.5-math-7b_opefo.yaml", "qwen3-4b-base_opefo.yaml",
                                  "qwen2.5-math-1.5b_opefo_1gpu.yaml"])
def test_shipped_configs_validate(name):
    config = build_algo_config(load_run_config([CONFIGS / name]))
    assert config.prompts_per_batch >= 1


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_every_overlay_validates_on_top_of_the_default(overlay):
    data = load_run_config([CONFIGS / "tiny_cpu.yaml", overlay])
    config = build_algo_config(data)
    if "grpo" in overlay.stem or overlay.stem in ("clip_higher", "clip_cov", "kl_cov", "entropy_bonus",
                                                  "adaptive_entropy", "forking_tokens"):
        assert type(config).__name__ == "GRPOConfig" and config.balance_mode == "none"
    else:
        assert type(config).__name__ == "OPEFOConfig"


def test_overlay_base_chain_and_values():
    config = build_algo_config(load_run_config([CONFIGS / "tiny_cpu.yaml", CONFIGS / "overlays" / "clip_higher.yaml"]))
    assert (config.policy_loss, config.eps_low, config.eps_high, config.num_updates_per_batch) == ("ppo_clip", 0.2, 0.28, 8)
    assert config.strict_on_policy is False
    qwen3 = load_run_config([CONFIGS / "qwen3-4b-base_opefo.yaml"])
    assert qwen3["max_new_tokens"] == 8000 and qwen3["group_size"] == 8  # from its base
    one_gpu = build_algo_config(load_run_config([CONFIGS / "qwen2.5-math-1.5b_opefo_1gpu.yaml"]))
    assert one_gpu.colocate_engines and one_gpu.num_engines == 1 and one_gpu.max_tokens_per_micro_batch == 16384
    assert one_gpu.num_gpus_per_learner + one_gpu.num_gpus_per_engine == 1.0 and not one_gpu.offload_optimizer


def test_errors_name_the_key_or_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'grup_size'.*'group_size'"):
        apply_overrides(load_run_config([CONFIGS / "tiny_cpu.yaml"]), ["grup_size=4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiny: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_run_config([bad])
    for override, field in (["balance_mode=sideways", "'balance_mode'"], ["group_size=0", "'group_size'"],
                            ["top_p=0.9", "'top_p'"], ["num_updates_per_batch=4", "'num_updates_per_batch'"],
                            ["zero_stage=5", "'zero_stage'"]):
        # pipeline sync: the default run's streaming would refuse num_updates_per_batch > 1 first
        data = apply_overrides(load_run_config([CONFIGS / "tiny_cpu.yaml"]), ["pipeline=sync", override])
        with pytest.raises(ConfigError, match=field):
            build_algo_config(data)


def test_yaml_numbers_without_a_dot_are_numbers():
    data = apply_overrides(load_run_config([CONFIGS / "tiny_cpu.yaml"]), ["lr=5e-4"])
    assert build_algo_config(data).lr == 5e-4


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda p: p.stem)
def test_gpu_layouts_validate_on_the_paper_recipe(layout):
    config = build_algo_config(load_run_config([CONFIGS / "qwen2.5-math-7b_opefo.yaml", layout]))
    bundles = config.algo_class.default_resource_request(config).bundles  # OPEFO's: GRPO's refuses its balancing
    engine_bundles = bundles[-config.num_engines:]
    assert all(b.get("GPU") == config.num_gpus_per_engine for b in engine_bundles)
    assert config.colocate_engines == (layout.stem == "colocated_gpu")
    # Colocated with several learners: NCCL cannot hold two ranks on one GPU, ipc reaches only the
    # sender's GPU (the one-GPU recipe's case): the object store.
    assert config.weight_sync == ("object_store" if config.colocate_engines else "native")
    assert config.colocate_engines or config.weight_transfer_backend == "nccl"
    learner_bundles = bundles[1:1 + config.num_learners]
    assert config.num_learners > 1 and all(b.get("GPU") == config.num_gpus_per_learner for b in learner_bundles)
    gpus = config.num_learners * config.num_gpus_per_learner + config.num_engines * config.num_gpus_per_engine
    assert gpus == {"two_nodes_gpu": 16, "colocated_gpu": 8, "disaggregated_gpu": 8}[layout.stem]


def test_algorithm_grpo_refuses_a_balance_mode_in_one_line():
    """tiny_cpu.yaml balances (two_sided); --set algorithm=GRPO used to keep balancing silently."""
    data = apply_overrides(load_run_config([CONFIGS / "tiny_cpu.yaml"]), ["algorithm=GRPO"])
    with pytest.raises(ConfigError) as err:
        build_algo_config(data)
    assert str(err.value) == ("config field 'balance_mode' = 'two_sided': algorithm GRPO trains with w = 1 "
                              "(balance_mode none); use algorithm OPEFO to balance the entropy flow")
    grpo = build_algo_config(apply_overrides(data, ["balance_mode=none"]))
    assert type(grpo).__name__ == "GRPOConfig" and grpo.balance_mode == "none"
