"""GRPO family math: group advantages, registered losses, aggregation, Clip-Cov / KL-Cov."""

import math
import statistics

import pytest
import torch

from opefo_rllib.core import (
    ADV_ESTIMATORS,
    AGG_MODES,
    POLICY_LOSSES,
    PolicyLossConfig,
    aggregate_loss,
    entropy_bonus,
    group_advantages,
    policy_loss,
    register_adv_est,
    register_policy_loss,
    token_covariance,
)

REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 1.0, 0.0]
GROUPS = ["a", "a", "a", "a", "b", "b", "b", "c", "d"]  # d and c are singletons


def _by_hand(estimator):
    out = []
    for r, gid in zip(REWARDS, GROUPS):
        grp = [x for x, g in zip(REWARDS, GROUPS) if g == gid]
        mean = sum(grp) / len(grp)
        if estimator == "grpo":
            std = statistics.stdev(grp) if len(grp) > 1 else 0.0
            out.append((r - mean) / (std + 1e-6))
        elif estimator == "dr_grpo":
            out.append(r - mean)
        else:
            others = [x for x in grp]
            others.remove(r)
            out.append(r - sum(others) / len(others) if others else 0.0)
    return out


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_match_hand_computed_groups(estimator):
    adv = group_advantages(REWARDS, GROUPS, estimator)
    assert adv.tolist() == pytest.approx(_by_hand(estimator), abs=1e-5)


def test_group_advantages_accept_tensor_ids_and_interleaved_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    ids = torch.tensor([7, 3, 7, 3])
    adv = group_advantages(rewards, ids, "dr_grpo")
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_group_advantages_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_advantages([1.0], [0], "nope")
    with pytest.raises(ValueError, match="group ids"):
        group_advantages([1.0, 0.0], [0], "grpo")
    with pytest.raises(ValueError, match="NaN"):
        group_advantages([float("nan"), 0.0], [0, 0], "grpo")


def test_registering_a_new_estimator_and_loss():
    @register_adv_est("test_sign")
    def sign_est(rewards, index, num_groups, eps):
        return torch.sign(rewards - 0.5)

    @register_policy_loss("test_double_pg")
    def double_pg(logp, old_logp, advantages, mask, config, generator):
        return -2 * advantages * logp, {}

    try:
        assert group_advantages([1.0, 0.0], [0, 0], "test_sign").tolist() == [1.0, -1.0]
        logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
        mat, _ = policy_loss("test_double_pg", logp, None, torch.tensor([1.0]), torch.ones(1, 2))
        assert mat.tolist() == [[2.0, 4.0]]
        with pytest.raises(ValueError, match="already registered"):
            register_adv_est("test_sign")(sign_est)
    finally:
        ADV_ESTIMATORS.pop("test_sign", None)
        POLICY_LOSSES.pop("test_double_pg", None)


def _batch(seed=0, b=6, t=8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, 5, generator=g, requires_grad=True)
    tokens = torch.randint(5, (b, t), generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    adv = torch.randn(b, generator=g)
    old = (torch.log_softmax(logits.detach() + 0.3 * torch.randn(b, t, 5, generator=g), -1)
           .gather(-1, tokens[..., None])[..., 0])
    return logits, tokens, mask, adv, old


def _logp(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("loss_name", ["pg", "ppo_clip"])
def test_aggregation_gradient_is_the_same_whole_or_in_micro_batches(mode, loss_name):
    logits, tokens, mask, adv, old = _batch()
    counts = dict(num_tokens=mask.sum(), num_seqs=mask.shape[0], norm_length=8)

    def loss_of(rows):
        mat, _ = policy_loss(loss_name, _logp(logits[rows], tokens[rows]), old[rows], adv[rows], mask[rows])
        return aggregate_loss(mat, mask[rows], mode, **counts)

    (whole,) = torch.autograd.grad(loss_of(slice(0, 6)), logits)
    split = sum(torch.autograd.grad(loss_of(slice(i, i + 2)), logits)[0] for i in (0, 2, 4))
    single = sum(torch.autograd.grad(loss_of(slice(i, i + 1)), logits)[0] for i in range(6))
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(single, whole)


def test_aggregation_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(aggregate_loss(loss, mask, "token-mean")) == pytest.approx(10 / 4)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_length=5)) == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(loss, mask, "sum")


def test_ppo_clip_clips_at_asymmetric_bounds():
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.28)
    mat, m = policy_loss("ppo_clip", logp, old, adv, torch.ones(1, 4), config=cfg)
    assert mat.tolist()[0] == pytest.approx([-1.28, 1.5, -0.5, 0.8])
    (g,) = torch.autograd.grad(mat.sum(), logp)
    # Clipped tokens (ratio above 1.28 with A > 0; below 0.8 with A < 0) have zero gradient.
    assert g[0, 0] == 0 and g[0, 3] == 0 and g[0, 1] != 0 and g[0, 2] != 0
    assert m["clip_frac"] == pytest.approx(0.5)


def test_pg_loss_gradient_is_minus_advantage_times_grad_logp():
    logits, tokens, mask, adv, _ = _batch(seed=1)
    mat, _ = policy_loss("pg", _logp(logits, tokens), None, adv, mask)
    (g,) = torch.autograd.grad(aggregate_loss(mat, mask), logits)
    (ref,) = torch.autograd.grad(-(adv[:, None] * _logp(logits, tokens) * mask).sum() / mask.sum(), logits)
    torch.testing.assert_close(g, ref)


def _cov_setup(n_tokens=20000, seed=3):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(1, n_tokens, generator=g) * 3 - 1).requires_grad_()
    adv = torch.randn(1, n_tokens, generator=g) * 2
    mask = torch.ones(1, n_tokens)
    return logp, adv, mask


def test_clip_cov_detaches_the_specified_number_of_tokens_in_range():
    logp, adv, mask = _cov_setup()
    cfg = PolicyLossConfig(clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0)
    gen = torch.Generator().manual_seed(0)
    mat, m = policy_loss("clip_cov", logp, logp.detach(), adv, mask, config=cfg, generator=gen)
    (g,) = torch.autograd.grad(mat.sum(), logp)
    detached = (g == 0) & (adv != 0)
    assert int(detached.sum()) == math.floor(2e-4 * 20000) == m["cov_selected"]
    cov = token_covariance(logp, adv, mask)
    assert ((cov[detached] >= 1.0) & (cov[detached] <= 5.0)).all()
    in_range = int(((cov >= 1) & (cov <= 5)).sum())
    assert m["cov_candidates"] == in_range > 4
    # Values are unchanged: clip_cov only removes gradient.
    ref, _ = policy_loss("ppo_clip", logp, logp.detach(), adv, mask, config=cfg)
    torch.testing.assert_close(mat, ref)


def test_kl_cov_penalises_the_top_covariance_tokens():
    logp, adv, mask = _cov_setup(n_tokens=5000, seed=4)
    old = logp.detach() + 0.1
    cfg = PolicyLossConfig(kl_cov_ratio=2e-3, kl_cov_coef=1.0)
    mat, m = policy_loss("kl_cov", logp, old, adv, mask, config=cfg)
    base = -adv * (logp - old).exp()
    penalised = (mat - base).abs() > 1e-7
    k = math.floor(2e-3 * 5000)
    assert int(penalised.sum()) == k == m["cov_selected"]
    cov = token_covariance(logp, adv, mask)
    assert float(cov[penalised].min()) >= float(torch.topk(cov.flatten(), k).values.min())
    torch.testing.assert_close((mat - base)[penalised], torch.full((k,), 0.1), atol=1e-5, rtol=0)


def test_cov_means_ignore_masked_tokens():
    logp = torch.tensor([[0.0, 1.0, 100.0]])
    adv = torch.tensor([[1.0, -1.0, 50.0]])
    cov = token_covariance(logp, adv, torch.tensor([[1.0, 1.0, 0.0]]))
    assert cov[0].tolist() == pytest.approx([-0.5, -0.5, 0.0])


def test_entropy_bonus_raises_entropy_under_gradient_descent():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    mask = torch.ones(2, 3)
    bonus = entropy_bonus(ent, mask, coef=0.01)
    assert float(bonus.detach()) == pytest.approx(-0.01 * float(ent.detach().mean()), rel=1e-6)
    (g,) = torch.autograd.grad(bonus, logits)
    new = logits.detach() - 10.0 * g
    new_ent = -(torch.softmax(new, -1) * torch.log_softmax(new, -1)).sum(-1)
    assert float(new_ent.mean()) > float(ent.mean())
    assert float(entropy_bonus(ent, mask, 0.0)) == 0.0


def test_policy_loss_config_errors_name_the_field():
    with pytest.raises(ValueError, match="eps_low"):
        PolicyLossConfig(eps_low=-1)
    with pytest.raises(ValueError, match="clip_cov_lb"):
        PolicyLossConfig(clip_cov_lb=6, clip_cov_ub=5)
    with pytest.raises(ValueError, match="unknown policy loss"):
        policy_loss("nope", torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1))
