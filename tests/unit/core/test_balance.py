"""The balance-rule registry (core/balance.py): each rule's lambda and weights on hand-built
flows, the controllers' state through get_state / set_state, closed loop's update after the step,
and a user rule registered by name."""

import pytest
import torch

from opefo_rllib.core.balance import (BALANCE_RULES, BalanceRule, BalanceSettings, OptimizerAwareInputs,
                                      get_balance_rule, make_balance_rule, register_balance_rule)
from opefo_rllib.core.entropy_control import AdaptiveEntropyCoef
from opefo_rllib.core.entropy_flow import balance_weights, flow_totals

# P = 0.3 (two tokens), N = 0.6 (one token), one delta = 0 and one masked token: lambda* = 1/3.
DELTA = torch.tensor([[0.1, 0.2, -0.6, 0.0, 5.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
TOTALS = flow_totals(DELTA, MASK)
STAR = (0.6 - 0.3) / (0.6 + 0.3)


def _weights(rule):
    return balance_weights(DELTA, MASK, rule, totals=TOTALS)


@pytest.mark.parametrize("name, lam, up, down", [
    ("none", 0.0, 1.0, 1.0),
    ("two_sided", STAR, 1 + STAR, 1 - STAR),
    ("increase_only", STAR, 1 + STAR, 1.0),
    ("decrease_only", STAR, 1.0, 1 - STAR),
    ("static", 0.25, 1.25, 0.75),
    ("closed_loop", STAR, 1 + STAR, 1 - STAR),  # f starts at 1
    ("optimizer_aware", STAR, 1 + STAR, 1 - STAR),  # no gradients given: lambda*
])
def test_each_rule_gives_its_lambda_and_weights(name, lam, up, down):
    rule = make_balance_rule(name, BalanceSettings(static_lambda=0.25))
    assert rule.choose_lambda(TOTALS)[0] == pytest.approx(lam)
    weights, stats = _weights(rule)
    torch.testing.assert_close(weights, torch.tensor([[up, up, down, 1.0, 1.0]]))
    assert stats["lambda"] == pytest.approx(lam)
    assert stats["weighted_net_flow"] == pytest.approx(up * 0.3 - down * 0.6)


def test_two_sided_cancels_the_net_flow_and_the_cap_and_fraction_apply():
    _, stats = _weights(make_balance_rule("two_sided"))
    assert stats["weighted_net_flow"] == pytest.approx(0.0, abs=1e-12)
    assert make_balance_rule("two_sided", BalanceSettings(balance_fraction=0.5)).choose_lambda(TOTALS)[0] == \
        pytest.approx(STAR / 2)
    assert make_balance_rule("two_sided", BalanceSettings(max_abs_lambda=0.1)).choose_lambda(TOTALS)[0] == 0.1
    assert make_balance_rule("static", BalanceSettings(static_lambda=-0.5, max_abs_lambda=0.2)) \
        .choose_lambda(TOTALS)[0] == -0.2


def test_a_one_sided_batch_gets_lambda_zero_from_every_rule_but_static():
    one_sided = flow_totals(torch.tensor([[0.1, 0.2]]), torch.ones(1, 2))
    for name in BALANCE_RULES:
        if name != "static":
            assert make_balance_rule(name).choose_lambda(one_sided)[0] == 0.0, name


def test_closed_loop_updates_after_the_step_and_round_trips_its_state():
    rule = make_balance_rule("closed_loop", BalanceSettings(closed_loop_gain=10.0, closed_loop_target_gain=1.0,
                                                            closed_loop_max_fraction=1.5))
    assert rule.cap() == 0.95
    assert rule.after_update(entropy_after=1.0, change=0.0) == {"entropy_flow/entropy_target": 1.0}
    rule.after_update(entropy_after=1.05, change=0.05)  # rising: f -= 10 x 0.05 + 1 x 0.05
    assert rule.closed_loop_fraction == pytest.approx(0.45)
    assert rule.choose_lambda(TOTALS)[0] == pytest.approx(0.45 * STAR)  # the next batch's lambda follows f
    fresh = make_balance_rule("closed_loop")
    fresh.set_state(rule.get_state())
    assert (fresh.closed_loop_fraction, fresh.entropy_target) == (rule.closed_loop_fraction, 1.0)
    assert fresh.choose_lambda(TOTALS) == rule.choose_lambda(TOTALS)
    for _ in range(20):
        rule.after_update(entropy_after=0.2, change=-0.5)  # collapsing: f rises to its bound
    assert rule.closed_loop_fraction == 1.5 and rule.choose_lambda(TOTALS)[0] == pytest.approx(1.5 * STAR)


def test_optimizer_aware_takes_lambda_from_the_gradients_it_is_given():
    """grad H = 1, g_total = 1, g_diff = 2, SGD: dH(lambda) = -3 (1 + 2 lambda), zero at lambda = -0.5
    (not lambda* = 1/3); max_abs_lambda 0.3 clips it."""
    ones = [torch.ones(3)]
    inputs = OptimizerAwareInputs(ones, ones, [torch.full((3,), 2.0)], lambda grads: [-g for g in grads])
    lam, metrics = make_balance_rule("optimizer_aware").choose_lambda(TOTALS, inputs)
    assert lam == pytest.approx(-0.5) and metrics["entropy_flow/lambda_optimizer_aware"] == pytest.approx(-0.5)
    capped, _ = make_balance_rule("optimizer_aware", BalanceSettings(max_abs_lambda=0.3)).choose_lambda(TOTALS, inputs)
    assert capped == pytest.approx(-0.3)


def test_adaptive_entropy_coefficient_commits_after_the_step_and_round_trips():
    control = AdaptiveEntropyCoef(coef=0.01, lr=0.1, coef_max=0.05, target=1.0)
    assert control.coefficient(0.8) == pytest.approx(0.03) and control.coef == 0.01  # no state change yet
    control.after_update(0.8)
    assert control.coef == pytest.approx(0.03)
    fresh = AdaptiveEntropyCoef(coef=0.0, lr=0.1, coef_max=0.05)
    fresh.set_state(control.get_state())
    assert fresh.coefficient(0.0) == control.coefficient(0.0) == 0.05  # clipped at coef_max


def test_a_registered_user_rule_is_a_balance_mode():
    @register_balance_rule("half_star_test")
    class HalfStar(BalanceRule):
        def raw_lambda(self, totals):
            return 0.5 * super().raw_lambda(totals)

    try:
        assert get_balance_rule("half_star_test") is HalfStar
        weights, stats = balance_weights(DELTA, MASK, "half_star_test")
        assert stats["lambda"] == pytest.approx(STAR / 2) and float(weights[0, 0]) == pytest.approx(1 + STAR / 2)
        from opefo_rllib.config import all_fields

        assert "half_star_test" in all_fields()["balance_mode"].choices()
    finally:
        del BALANCE_RULES["half_star_test"]
    with pytest.raises(ValueError, match="unknown balance mode 'half_star_test'"):
        get_balance_rule("half_star_test")
