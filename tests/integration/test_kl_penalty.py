"""The KL penalty to the reference policy on the learner (no Ray actors): the reference is the
starting model, the loss term's gradient and the reward shaping equal hand-computed ones, and
kl_coef 0 builds nothing and changes nothing."""

import pytest
import torch

pytestmark = pytest.mark.slow

from learner_fixtures import build_learner, make_engine, rollout_batch
from opefo_rllib.core import group_advantages, opefo_loss
from opefo_rllib.core.entropy_flow import entropy_flow
from opefo_rllib.core.kl import kl_estimate
from opefo_rllib.models.loading import load_model
from opefo_rllib.models.rl_module import causal_lm_token_stats
from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
from ray.rllib.core import DEFAULT_MODULE_ID


@pytest.fixture(scope="module")
def engine():
    return make_engine()


def _lm(learner):
    return learner._module[DEFAULT_MODULE_ID].lm


def _nudge(learner, seed=0, scale=0.02):
    """Move the policy away from its reference (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _lm(learner).parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _base_logp(batch):
    base = load_model(TINY_DEFAULT_PATH).eval()
    with torch.no_grad():
        return causal_lm_token_stats(base, batch["input_ids"], batch["attention_mask"], 1.0, None).logp


def test_kl_coef_zero_builds_no_reference_and_logs_no_kl(engine):
    learner = build_learner(micro_batch_size=5)
    assert learner.reference is None
    metrics = learner.update_from_rollouts(rollout_batch(engine)).metrics
    assert not [k for k in metrics if k.startswith("kl/")]


def test_the_reference_is_the_starting_model_and_stays_frozen(engine):
    learner = build_learner(kl_coef=0.1)
    batch = rollout_batch(engine)
    before = learner.reference.token_logp(batch["input_ids"], batch["attention_mask"], 1.0)
    torch.testing.assert_close(before, _base_logp(batch), rtol=0, atol=1e-6)
    learner.update_from_rollouts(batch)
    learner.update_from_rollouts(dict(batch, weight_versions=batch["weight_versions"] + 1))
    after = learner.reference.token_logp(batch["input_ids"], batch["attention_mask"], 1.0)
    assert torch.equal(before, after)  # two optimizer steps later: the reference did not move
    assert not any(p.requires_grad for p in learner.reference.lm.parameters())
    # a resumed learner: its state is the trained policy, its reference the starting model again
    resumed = build_learner(kl_coef=0.1)
    resumed.set_state(learner.get_state())
    assert torch.equal(resumed.reference.token_logp(batch["input_ids"], batch["attention_mask"], 1.0), before)
    for a, b in zip(_lm(learner).parameters(), _lm(resumed).parameters()):
        assert torch.equal(a, b)


def test_kl_in_loss_adds_the_gradient_of_kl_coef_times_the_token_mean_kl(engine):
    coef = 0.5
    learner = build_learner(kl_coef=coef, kl_estimator="k2", kl_in="loss", micro_batch_size=5)
    _nudge(learner)
    batch = rollout_batch(engine)
    flow, forwards = learner.flow_pass(batch)
    kl = learner.kl_to_reference(batch, flow)
    assert kl.metrics["kl/mean"] > 1e-6 and kl.metrics["kl/max"] >= kl.metrics["kl/mean"]
    weights = learner.token_weights(kl.batch, kl.flow)
    learner.accumulate_gradients(kl.batch, kl.flow, weights, torch.arange(len(batch["rewards"])), torch.Generator(),
                                 forwards)
    params = dict(_lm(learner).named_parameters())
    from_learner = {k: p.grad.detach().clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    # by hand: OPEFO's loss plus coef x token-mean k2 against the base model's log-probs
    stats = learner._module[DEFAULT_MODULE_ID].sequence_token_stats(batch["input_ids"], batch["attention_mask"], 1.0)
    mask = batch["response_mask"]
    loss, _ = opefo_loss(stats.logp, stats.entropy, batch["advantages"], mask, stats.expected_s,
                         estimator="exact", mode="two_sided")
    kl_tokens = 0.5 * (stats.logp - _base_logp(batch)) ** 2
    (loss + coef * (kl_tokens * mask).sum() / mask.sum()).backward()
    for k, p in params.items():
        torch.testing.assert_close(from_learner[k], p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")


def test_kl_in_reward_shapes_rewards_advantages_and_the_flow(engine):
    coef = 2.0
    learner = build_learner(kl_coef=coef, kl_estimator="k1", kl_in="reward")
    _nudge(learner, seed=1)
    batch = rollout_batch(engine)
    flow, _ = learner.flow_pass(batch)
    kl = learner.kl_to_reference(batch, flow)
    mask = batch["response_mask"]
    seq_kl = ((flow.logp - _base_logp(batch)) * mask).sum(-1)
    expected = group_advantages(batch["rewards"] - coef * seq_kl, batch["group_ids"], "grpo")
    torch.testing.assert_close(kl.batch["advantages"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(kl.batch["advantages"], batch["advantages"])  # the shaping moved them
    torch.testing.assert_close(kl.flow.delta, entropy_flow(flow.logp, flow.entropy, expected, "exact", flow.expected_s),
                               rtol=1e-4, atol=1e-6)
    assert kl.metrics["kl/reward_penalty_mean"] == pytest.approx(float(coef * seq_kl.mean()), rel=1e-4)
    assert torch.equal(batch["rewards"], kl.batch["rewards"])  # the logged rewards stay the verifier's


def test_kl_grows_from_zero_as_the_policy_trains_away(engine):
    learner = build_learner(kl_coef=0.01, kl_estimator="k3", lr=1e-2)
    batch = rollout_batch(engine)
    first = learner.update_from_rollouts(batch).metrics
    assert abs(first["kl/mean"]) < 1e-5  # step 0: the policy is the reference
    second = learner.update_from_rollouts(dict(batch, weight_versions=batch["weight_versions"] + 1)).metrics
    assert second["kl/mean"] > 1e-4
    assert second["time/ref_logp_s"] > 0


def test_the_reference_in_an_actor_of_its_own_scores_as_the_copy_does(ray_session, engine):
    from opefo_rllib.learner.reference import RemoteReference

    kl = {"kl_coef": 0.5, "kl_estimator": "k3", "lr": 1e-2}
    local, remote = build_learner(**kl), build_learner(kl_reference="actor", **kl)
    assert isinstance(remote.reference, RemoteReference)
    batch = rollout_batch(engine)
    torch.testing.assert_close(remote.reference.token_logp(batch["input_ids"], batch["attention_mask"], 1.0),
                               local.reference.token_logp(batch["input_ids"], batch["attention_mask"], 1.0),
                               rtol=0, atol=1e-6)
    for step in range(2):
        b = dict(batch, weight_versions=batch["weight_versions"] + step)
        m_local, m_remote = local.update_from_rollouts(b, step).metrics, remote.update_from_rollouts(b, step).metrics
    assert m_local["kl/mean"] > 1e-4
    assert m_remote["kl/mean"] == pytest.approx(m_local["kl/mean"], rel=1e-4)
    assert m_remote["learner/loss"] == pytest.approx(m_local["learner/loss"], rel=1e-4)
