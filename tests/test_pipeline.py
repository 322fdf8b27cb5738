"""The rollout pipeline: async (one batch ahead, bounded staleness), dynamic sampling, overlong
answers, and the fused flow pass's place in the sync pipeline."""

import pickle
from types import SimpleNamespace

import pytest
import torch

from opefo_rllib.rollout.batch import Rollout, learner_batch
from opefo_rllib.rollout.env_runner import _drop_zero_variance, overlong_penalty


def _rollout(group, reward, n_tokens=3, finished=True, version=0):
    return Rollout(group_id=group, prompt_ids=[1, 5, 6], response_ids=[7] * n_tokens, sampling_logp=[-0.5] * n_tokens,
                   reward=reward, weight_version=version, finished=finished)


def test_overlong_penalty_is_zero_before_the_buffer_and_linear_inside_it():
    c = SimpleNamespace(overlong_buffer_len=4, max_new_tokens=10, overlong_penalty=0.5)
    assert [overlong_penalty(n, c) for n in (3, 6, 7, 8, 10)] == [0.0, 0.0, 0.125, 0.25, 0.5]
    assert overlong_penalty(10, SimpleNamespace(overlong_buffer_len=None)) == 0.0


def test_zero_variance_groups_are_dropped_whole():
    rollouts = [_rollout(0, 1.0), _rollout(0, 1.0), _rollout(1, 0.0), _rollout(1, 1.0), _rollout(2, 0.0),
                _rollout(2, 0.0)]
    kept, dropped = _drop_zero_variance(rollouts)
    assert dropped == 2 and {r.group_id for r in kept} == {1} and len(kept) == 2


def test_mask_truncated_keeps_the_baseline_and_drops_the_gradient():
    rollouts = [_rollout(0, 1.0), _rollout(0, 0.0, finished=False), _rollout(0, 0.0)]
    plain = learner_batch(rollouts, 0, "grpo")
    masked = learner_batch(rollouts, 0, "grpo", mask_truncated=True)
    assert torch.equal(plain["advantages"], masked["advantages"])  # the truncated answer still counts in the baseline
    assert masked["response_mask"][1].sum() == 0 and masked["response_mask"][0].sum() == 3
    assert masked["truncation_masked"].tolist() == [False, True, False]


# ---------------------------------------------------------------------------- the learner's side
@pytest.fixture
def batch():
    from learner_fixtures import _rollout_batch, make_engine

    return _rollout_batch(make_engine())


@pytest.mark.slow
def test_samples_older_than_max_staleness_get_no_gradient(batch):
    from learner_fixtures import _build_learner

    from opefo_rllib.algorithms.grpo.grpo_torch_learner import StaleBatchError

    with pytest.raises(StaleBatchError, match="strict on-policy"):
        stale = dict(batch, weight_versions=batch["weight_versions"] - 1)
        _build_learner().update_from_rollouts(stale, 0)
    learner = _build_learner(strict_on_policy=False, max_staleness=1)
    learner.weight_version = 2
    versions = torch.ones_like(batch["weight_versions"])
    versions[:5] = 0  # 2 versions old: refused
    metrics = learner.update_from_rollouts(dict(batch, weight_versions=versions), 0)
    assert metrics["rollout/dropped_stale"] == 5 and metrics["rollout/staleness_max"] == 2
    assert metrics["rollout/staleness_mean"] == pytest.approx((5 * 2 + (len(versions) - 5)) / len(versions))
    # The update equals one on the batch whose 5 oldest rows have no response tokens.
    reference = _build_learner(strict_on_policy=False, max_staleness=1)
    reference.weight_version = 2
    masked = dict(batch, weight_versions=torch.full_like(versions, 1), response_mask=batch["response_mask"].clone())
    masked["response_mask"][:5] = 0
    ref_metrics = reference.update_from_rollouts(masked, 0)
    assert metrics["learner/loss"] == pytest.approx(ref_metrics["learner/loss"], rel=1e-6)
    for k, w in learner.policy_weights().items():
        torch.testing.assert_close(w, reference.policy_weights()[k])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_offpolicy_mask_zeroes_tokens_outside_the_band(batch, mode):
    from learner_fixtures import _build_learner

    from opefo_rllib.algorithms.grpo.grpo_torch_learner import FlowPass

    learner = _build_learner(strict_on_policy=False, tis_cap=2.0, offpolicy_mask=mode)
    shifted = dict(batch, sampling_logp=batch["sampling_logp"].clone())
    shifted["sampling_logp"][0] -= 1.0  # row 0: the engine's probabilities e times lower -> ratio e > 2
    flow = learner.flow_pass(shifted)
    assert isinstance(flow, FlowPass)
    weights, metrics = learner.token_weights(shifted, flow)
    row0 = shifted["response_mask"][0].bool()
    assert (weights[0][row0] == 0).all()
    assert metrics["rollout/offpolicy_masked_frac"] > 0
    others = shifted["response_mask"][1:].bool()
    assert (weights[1:][others] > 0).all()  # in-band rows keep their gradient (tokens: ratio 1 here)


# ---------------------------------------------------------------------------- end to end
SMALL = {"prompts_per_batch": 4, "group_size": 4, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _async_config(tmp_path, **rollout):
    from opefo_rllib.algorithms.opefo import OPEFOConfig

    config = OPEFOConfig().generation(**SMALL).training(strict_on_policy=False, tis_cap=2.0)
    config.rollout(pipeline="async", **rollout)
    config.logging(tensorboard_dir=str(tmp_path / "tb"), log_text_every=0)
    config.fleet(generate_timeout_s=120, weight_sync_timeout_s=60)
    return config


@pytest.mark.slow
def test_async_pipeline_trains_one_version_behind_and_survives_a_killed_engine(ray_session, tmp_path):
    import ray

    algo = _async_config(tmp_path).build_algo()
    try:
        first, second = algo.train(), algo.train()
        ray.kill(algo.env_runner.fleet.actors[0])  # the next batch ahead is generated by a restarted engine
        third, fourth = algo.train(), algo.train()
    finally:
        algo.stop()
    assert first["rollout/staleness_max"] == 0  # the first batch is sampled with the weights it trains
    for r in (second, third):
        assert r["rollout/staleness_mean"] == 1 and r["rollout/dropped_stale"] == 0
    for r in (first, second, third, fourth):
        assert r["rollout/num_samples"] == 16 and r["learner/optimizer_steps"] == 1
    assert fourth["learner/weight_version"] == 4 and fourth["fleet/engine_restarts"] == 1
    assert 0 <= fourth["fleet/engine_idle_frac"] <= 1


@pytest.mark.slow
def test_dynamic_sampling_fills_the_batch_or_says_how_short_it_is(ray_session, tmp_path):
    from opefo_rllib.algorithms.opefo import OPEFOConfig

    config = OPEFOConfig().generation(**SMALL).rollout(filter_groups="zero_variance", max_refill_rounds=2)
    config.logging(tensorboard_dir=str(tmp_path / "tb"), log_text_every=0)
    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(3)]
    finally:
        algo.stop()
    for r in results:
        groups = r["rollout/num_samples"] / SMALL["group_size"]
        assert groups + r["rollout/batch_shortfall"] == SMALL["prompts_per_batch"]  # never short without saying so
        assert r["rollout/refill_rounds"] <= 2
        assert r["rollout/solve_all_frac"] == 0 and r["rollout/solve_none_frac"] == 0  # no zero-variance group left
    assert sum(r["rollout/groups_filtered"] for r in results) > 0


def _runner_state(ckpt) -> dict:
    with open(ckpt / "env_runner" / "state.pkl", "rb") as f:  # our own checkpoint (RLlib pickles it)
        return pickle.load(f)


@pytest.mark.slow
def test_async_resume_regenerates_the_batch_ahead_losing_and_duplicating_nothing(tmp_path):
    import os
    import subprocess
    import sys

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", *args], cwd=tmp_path, text=True,
                              capture_output=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout

    common = ["--set", "prompts_per_batch=4", "--set", "group_size=4", "--set", "max_new_tokens=6", "--set",
              "ray={num_cpus: 2}", "--set", "log_text_every=0", "--set", "eval_every=0", "--set", "pipeline=async",
              "--set", "strict_on_policy=false", "--set", "checkpoint_every=2", "--set", "iterations=4"]
    cli(*common, "--set", f"logdir={tmp_path / 'run'}")
    ckpts = tmp_path / "run" / "checkpoints"
    # At a checkpoint the batch ahead is not in the runner's state: it is drawn again on resume.
    assert _runner_state(ckpts / "iter_000002")["sample_calls"] == 2
    resumed = cli("--resume", str(ckpts / "iter_000002"))
    assert "at iteration 2" in resumed
    branch = next((tmp_path / "run" / "branches").iterdir())
    straight, again = _runner_state(ckpts / "iter_000004"), _runner_state(branch / "checkpoints" / "iter_000004")
    # The same problems were drawn, in the same order, as in the uninterrupted run: none lost or repeated.
    assert (again["sample_calls"], again["next_group_id"]) == (straight["sample_calls"], straight["next_group_id"])
    assert again["env_rng"] == straight["env_rng"]
