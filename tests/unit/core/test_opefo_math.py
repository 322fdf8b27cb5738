"""OPEFO math: token stats, entropy-flow estimators, balancing weights, the loss gradient."""

import math

import pytest
import torch

from opefo_rllib.core import aggregate_loss, policy_loss
from opefo_rllib.core import (
    BALANCE_MODES,
    FlowTotals,
    balance_weights,
    entropy_flow,
    flow_diagnostics,
    flow_totals,
    opefo_loss,
    token_stats,
    token_stats_from_hidden,
)


def _entropy(z: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(z, -1)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------- token_stats


def test_token_stats_matches_direct_definitions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(7, (2, 3), generator=g)
    s = token_stats(logits, tokens, temperature=0.7)
    p = torch.softmax(logits / 0.7, -1)
    h = -(p * p.log()).sum(-1)
    torch.testing.assert_close(s.entropy, h)
    torch.testing.assert_close(s.logp, p.log().gather(-1, tokens[..., None])[..., 0])
    torch.testing.assert_close(s.expected_s, (p**2 * (p.log() + h[..., None])).sum(-1))


def test_token_stats_bf16_accumulates_in_float32():
    logits = torch.randn(2, 4, 300).to(torch.bfloat16)
    tokens = torch.randint(300, (2, 4))
    s = token_stats(logits, tokens)
    assert s.logp.dtype == torch.float32
    ref = token_stats(logits.float(), tokens)
    torch.testing.assert_close(s.entropy, ref.entropy)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_token_stats_match_unchunked_values_and_grads(temperature):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 5, 40, generator=g) * 3).requires_grad_()
    tokens = torch.randint(40, (3, 5), generator=g)
    co = torch.randn(3, 3, 5, generator=g)  # arbitrary cotangents for the three outputs

    def run(chunk):
        s = token_stats(logits, tokens, temperature, chunk_size=chunk)
        (grad,) = torch.autograd.grad((co[0] * s.logp + co[1] * s.entropy + co[2] * s.expected_s).sum(), logits)
        return s, grad

    ref, ref_grad = run(None)
    for chunk in (1, 4, 7, 100):
        s, grad = run(chunk)
        for a, b in zip(s, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_stats_from_hidden_chunked_matches_full_logits(dtype):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, 16, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(50, 16, generator=g, dtype=dtype) * 0.5).requires_grad_()
    tokens = torch.randint(50, (2, 9), generator=g)
    co = torch.randn(3, 2, 9, generator=g, dtype=dtype)

    def run(chunk):
        s = token_stats_from_hidden(hidden, weight, tokens, temperature=0.8, chunk_size=chunk)
        obj = (co[0] * s.logp + co[1] * s.entropy + co[2] * s.expected_s).sum()
        return s, torch.autograd.grad(obj, (hidden, weight))

    ref, (ref_h, ref_w) = run(None)
    for chunk in (1, 5, 18, 64):
        s, (gh, gw) = run(chunk)
        for a, b in zip(s, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh, ref_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, ref_w, atol=1e-5, rtol=1e-5)


def test_token_stats_from_hidden_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(6, (1, 3), generator=g)

    def f(h, w):
        s = token_stats_from_hidden(h, w, tokens, temperature=1.3, chunk_size=2)
        return s.logp, s.entropy, s.expected_s

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_token_stats_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="tokens must be"):
        token_stats(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="lm_head_weight"):
        token_stats_from_hidden(torch.randn(1, 2, 4), torch.randn(5, 3), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_stats(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), temperature=0)


# --------------------------------------------------------------------------- entropy flow


def test_exact_estimator_matches_finite_difference():
    """delta_exact = dH/deta of the step z <- z + eta A (e_a - p), measured at eta = 1e-4."""
    g = torch.Generator().manual_seed(4)
    eta = 1e-4
    rel_errors = []
    for vocab in (3, 5, 10, 50, 200, 1000):
        for _ in range(20):
            z = torch.randn(vocab, generator=g, dtype=torch.float64) * float(torch.rand((), generator=g) * 4 + 0.5)
            p = torch.softmax(z, -1)
            a = int(torch.multinomial(p, 1, generator=g))
            adv = float(torch.randn((), generator=g))
            s = token_stats(z.view(1, 1, -1), torch.tensor([[a]]))
            delta = entropy_flow(s.logp, s.entropy, torch.tensor([adv], dtype=torch.float64), "exact", s.expected_s)
            step = -p.clone()
            step[a] += 1
            measured = (_entropy(z + eta * adv * step) - _entropy(z)) / eta
            rel_errors.append(abs(float(measured) - float(delta)) / max(abs(float(delta)), 1e-12))
    median = sorted(rel_errors)[len(rel_errors) // 2]
    assert median < 1e-3, median


def test_estimators_share_the_quadrant_signs():
    # pi above e^{-H} with A > 0 lowers entropy (delta < 0) for every estimator; flip A, flip sign.
    z = torch.tensor([[[3.0, 0.0, 0.0, 0.0]]])
    s_likely = token_stats(z, torch.tensor([[0]]))
    s_rare = token_stats(z, torch.tensor([[1]]))
    for est in ("paper", "single_logit", "exact"):
        for s, sign in ((s_likely, -1), (s_rare, 1)):
            for adv in (1.0, -1.0):
                d = entropy_flow(s.logp, s.entropy, torch.tensor([adv]), est, s.expected_s)
                assert math.copysign(1, float(d)) == sign * adv, (est, sign, adv)


def test_paper_and_single_logit_formulas():
    logp = torch.tensor([[-0.2, -3.0]])
    ent = torch.tensor([[1.1, 0.4]])
    adv = torch.tensor([[0.5, -2.0]])
    pi = logp.exp()
    torch.testing.assert_close(entropy_flow(logp, ent, adv, "paper"), -adv * (1 - pi) ** 2 * (logp + ent))
    torch.testing.assert_close(entropy_flow(logp, ent, adv, "single_logit"), -adv * pi * (1 - pi) * (logp + ent))
    with pytest.raises(ValueError, match="expected_s"):
        entropy_flow(logp, ent, adv, "exact")
    with pytest.raises(ValueError, match="unknown entropy-flow estimator"):
        entropy_flow(logp, ent, adv, "nope")


# --------------------------------------------------------------------------- balancing


def _random_delta(seed=5, shape=(6, 11)):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(shape, generator=g) * torch.rand(shape, generator=g)
    delta[0, 0] = 0.0
    mask = torch.rand(shape, generator=g) > 0.25
    return delta, mask


def test_two_sided_balances_the_flow_exactly():
    delta, mask = _random_delta()
    delta = delta - 0.3 * delta.abs()  # make N > P, as under GRPO
    w, st = balance_weights(delta, mask, "two_sided")
    m = mask.float()
    p = float((delta.clamp(min=0) * m).sum())
    n = float(((-delta).clamp(min=0) * m).sum())
    assert n > p
    assert abs(float((w * delta * m).sum())) < 1e-5 * (p + n)
    assert (w > 0).all()
    assert st["lambda"] == pytest.approx((n - p) / (n + p), rel=1e-6)
    assert st["P"] == pytest.approx(p, rel=1e-6) and st["N"] == pytest.approx(n, rel=1e-6)
    assert st["frac_increase"] == pytest.approx(float(((delta > 0) & mask).sum()) / float(mask.sum()))
    assert st["frac_decrease"] == pytest.approx(float(((delta < 0) & mask).sum()) / float(mask.sum()))
    assert abs(st["weighted_net_flow"]) < 1e-6 * (p + n)
    assert not w.requires_grad


def test_each_balance_mode_does_what_the_spec_says():
    delta, mask = _random_delta(seed=6)
    lam = balance_weights(delta, mask, "two_sided")[1]["lambda"]
    pos, neg, zero = mask & (delta > 0), mask & (delta < 0), ~mask | (delta == 0)
    expect = {
        "increase_only": (1 + lam, 1.0),
        "decrease_only": (1.0, 1 - lam),
        "static": (1 + 0.001, 1 - 0.001),
        "none": (1.0, 1.0),
        "two_sided": (1 + lam, 1 - lam),
        "closed_loop": (1 + lam, 1 - lam),  # with its fraction f = 1 (the learner sets f)
        "optimizer_aware": (1 + lam, 1 - lam),  # without the learner's gradients: lambda* (the learner passes its own)
    }
    assert set(expect) == set(BALANCE_MODES)
    for mode, (up, down) in expect.items():
        w, st = balance_weights(delta, mask, mode, static_lambda=0.001)
        torch.testing.assert_close(w[pos], torch.full_like(w[pos], up))
        torch.testing.assert_close(w[neg], torch.full_like(w[neg], down))
        assert (w[zero] == 1).all(), mode


def test_guard_rails_scale_and_cap_lambda():
    delta, mask = _random_delta(seed=7)
    full = balance_weights(delta, mask)[1]["lambda"]
    assert balance_weights(delta, mask, balance_fraction=0.5)[1]["lambda"] == pytest.approx(0.5 * full)
    capped = balance_weights(delta, mask, max_abs_lambda=abs(full) / 4)[1]["lambda"]
    assert capped == pytest.approx(math.copysign(abs(full) / 4, full))
    with pytest.raises(ValueError, match="lambda must lie in"):
        balance_weights(delta, mask, "static", static_lambda=1.5)


def test_global_totals_drive_the_weights_of_each_shard():
    delta, mask = _random_delta(seed=8)
    whole, _ = balance_weights(delta, mask)
    t1, t2 = flow_totals(delta[:3], mask[:3]), flow_totals(delta[3:], mask[3:])
    totals = FlowTotals.from_tensor(t1.as_tensor() + t2.as_tensor())
    w1, _ = balance_weights(delta[:3], mask[:3], totals=totals)
    w2, _ = balance_weights(delta[3:], mask[3:], totals=totals)
    torch.testing.assert_close(torch.cat([w1, w2]), whole)


def test_no_flow_gives_lambda_zero():
    w, st = balance_weights(torch.zeros(2, 3), torch.ones(2, 3))
    assert st["lambda"] == 0.0 and (w == 1).all()


@pytest.mark.parametrize("side", ["decrease", "increase"])
@pytest.mark.parametrize("mode", ["two_sided", "increase_only", "decrease_only"])
def test_a_one_sided_batch_is_not_balanced_and_is_reported(side, mode):
    """P = 0 < N (or N = 0 < P) gives lambda* = +-1, which would zero one side's weights and
    stop learning; instead lambda = 0 (a plain GRPO step), lambda* is NaN and the batch is
    flagged, with or without a cap on |lambda|."""
    from opefo_rllib.core import is_one_sided, lambda_star

    delta, mask = _random_delta(seed=11)
    delta = -delta.abs() if side == "decrease" else delta.abs()
    for cap in (None, 0.5):
        w, st = balance_weights(delta, mask, mode, max_abs_lambda=cap)
        assert st["lambda"] == 0.0 and (w == 1).all()
        assert math.isnan(st["lambda_star"]) and st["one_sided"] == 1.0
    totals = flow_totals(delta, mask)
    assert is_one_sided(totals) and math.isnan(lambda_star(totals))
    both = flow_totals(torch.zeros(2, 3), torch.ones(2, 3))
    assert not is_one_sided(both) and lambda_star(both) == 0.0
    assert balance_weights(*_random_delta(seed=11))[1]["one_sided"] == 0.0


def test_flow_diagnostics_quadrants_sum_to_nonzero_advantage_share():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 6, 12, generator=g) * 2
    tokens = torch.randint(12, (4, 6), generator=g)
    s = token_stats(logits, tokens)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.5])
    mask = torch.ones(4, 6)
    d = flow_diagnostics(s.logp, s.entropy, adv, mask, s.expected_s)
    quads = sum(v for k, v in d.items() if k.startswith("quadrant/"))
    assert quads == pytest.approx(0.75)
    delta = entropy_flow(s.logp, s.entropy, adv, "exact", s.expected_s)
    assert d["predicted_entropy_change/exact"] == pytest.approx(float(delta.sum()), rel=1e-5)


# --------------------------------------------------------------------------- the loss gradient


def _loss_setup(seed=10):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 7, 9, generator=g, requires_grad=True)
    tokens = torch.randint(9, (4, 7), generator=g)
    mask = torch.ones(4, 7)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    adv = torch.tensor([1.2, -0.4, 0.0, -0.8])
    return logits, tokens, mask, adv


def test_opefo_mode_none_is_strict_grpo_gradient():
    logits, tokens, mask, adv = _loss_setup()
    s = token_stats(logits, tokens)
    loss, _ = opefo_loss(s.logp, s.entropy, adv, mask, s.expected_s, mode="none")
    (g_opefo,) = torch.autograd.grad(loss, logits)
    s = token_stats(logits, tokens)
    grpo = -(adv[:, None] * s.logp * mask).sum() / mask.sum()
    (g_grpo,) = torch.autograd.grad(grpo, logits)
    torch.testing.assert_close(g_opefo, g_grpo)


@pytest.mark.parametrize("estimator", ["paper", "single_logit", "exact"])
def test_opefo_two_sided_gradient_is_weighted_policy_gradient(estimator):
    logits, tokens, mask, adv = _loss_setup(seed=11)
    s = token_stats(logits, tokens)
    loss, st = opefo_loss(s.logp, s.entropy, adv, mask, s.expected_s, estimator=estimator)
    (g_opefo,) = torch.autograd.grad(loss, logits)
    # By hand: w from the sign of delta and lambda = (N - P) / (N + P); grad = -sum(w A grad logp) / T.
    with torch.no_grad():
        s0 = token_stats(logits, tokens)
        delta = entropy_flow(s0.logp, s0.entropy, adv, estimator, s0.expected_s)
        p = float((delta.clamp(min=0) * mask).sum())
        n = float(((-delta).clamp(min=0) * mask).sum())
        lam = (n - p) / (n + p)
        w = torch.where(delta > 0, 1 + lam, torch.where(delta < 0, 1 - lam, 1.0))
    assert st["lambda"] == pytest.approx(lam, rel=1e-6)
    total = torch.zeros_like(logits)
    for b in range(4):
        for t in range(7):
            if mask[b, t]:
                (gl,) = torch.autograd.grad(torch.log_softmax(logits[b, t], -1)[tokens[b, t]], logits)
                total += float(w[b, t] * adv[b]) * gl
    torch.testing.assert_close(g_opefo, -total / mask.sum(), atol=1e-6, rtol=1e-5)


def test_opefo_loss_is_the_pg_policy_loss_with_weights():
    logits, tokens, mask, adv = _loss_setup(seed=12)
    s = token_stats(logits, tokens)
    delta = entropy_flow(s.logp, s.entropy, adv, "exact", s.expected_s)
    w, _ = balance_weights(delta, mask)
    mat, _ = policy_loss("pg", s.logp, None, adv, mask, weights=w)
    loss, _ = opefo_loss(s.logp, s.entropy, adv, mask, s.expected_s)
    torch.testing.assert_close(loss, aggregate_loss(mat, mask))
