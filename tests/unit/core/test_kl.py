"""The KL estimators against their formulas on known distributions (opefo_rllib/core/kl.py)."""

import pytest
import torch

from opefo_rllib.core.kl import KL_ESTIMATORS, kl_estimate, kl_stats, register_kl_estimator, sequence_kl


def _pair(seed: int, vocab: int = 7):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5, -1)
    logq = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5, -1)
    return logp, logq


def _expectation(name: str, logp: torch.Tensor, logq: torch.Tensor) -> float:
    """E_{y ~ p} of the estimate, exactly: sum over the vocabulary weighted by p."""
    return float((logp.exp() * kl_estimate(name, logp, logq)).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_and_k3_are_unbiased_estimates_of_kl(seed):
    logp, logq = _pair(seed)
    exact = float((logp.exp() * (logp - logq)).sum())  # KL(p || q)
    assert exact > 0.01
    assert _expectation("k1", logp, logq) == pytest.approx(exact, rel=1e-12)
    assert _expectation("k3", logp, logq) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k2_is_half_the_expected_squared_log_ratio(seed):
    logp, logq = _pair(seed)
    assert _expectation("k2", logp, logq) == pytest.approx(float((logp.exp() * (logp - logq) ** 2).sum()) / 2)


def test_per_token_values_and_signs():
    logp = torch.tensor([[-0.5, -2.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0]])
    r = ref - logp
    torch.testing.assert_close(kl_estimate("k1", logp, ref), logp - ref)
    assert float(kl_estimate("k1", logp, ref)[0, 1]) < 0  # k1 can be negative on one token
    torch.testing.assert_close(kl_estimate("k2", logp, ref), r ** 2 / 2)
    torch.testing.assert_close(kl_estimate("k3", logp, ref), r.exp() - r - 1)
    assert bool((kl_estimate("k3", logp, ref) >= 0).all())
    assert float(kl_estimate("k3", logp, ref)[0, 2]) == 0.0  # pi == pi_ref: no penalty
    torch.testing.assert_close(kl_estimate("low_var_kl", logp, ref), kl_estimate("k3", logp, ref))


def test_low_var_kl_bounds_a_token_the_reference_finds_impossible():
    logp = torch.tensor([[-0.1, -60.0]])
    ref = torch.tensor([[-100.0, -0.1]])  # r = -99.9 (clamped to -20), then r = +59.9 (exp overflows k3's scale)
    assert float(kl_estimate("k3", logp, ref)[0, 1]) > 1e20
    low = kl_estimate("low_var_kl", logp, ref)
    assert float(low[0, 0]) == pytest.approx(10.0)  # exp(-20) + 20 - 1 = 19, clamped to 10
    assert float(low[0, 1]) == pytest.approx(10.0)
    assert bool(torch.isfinite(low).all())


def test_gradients_flow_through_the_policy_only():
    logp = torch.tensor([[-0.7, -1.3]], requires_grad=True)
    ref = torch.tensor([[-0.7, -1.0]], requires_grad=True)
    kl_estimate("k3", logp, ref).sum().backward()
    assert ref.grad is None  # the reference is a constant
    # d/d logp (e^r - r - 1), r = ref - logp: -e^r + 1; 0 where pi == pi_ref
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.0 - float(torch.tensor(0.3).exp())]]))
    logp.grad = None
    kl_estimate("k1", logp, ref.detach()).sum().backward()
    torch.testing.assert_close(logp.grad, torch.ones_like(logp))


def test_sequence_kl_sums_response_tokens_without_gradient():
    logp = torch.tensor([[-0.5, -1.0, -2.0], [-0.2, -0.3, -0.4]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, -1.0], [-0.2, -0.2, -0.2]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    seq = sequence_kl("k1", logp, ref, mask)
    torch.testing.assert_close(seq, torch.tensor([0.5, -0.3]))
    assert not seq.requires_grad


def test_kl_stats_read_response_tokens_only():
    kl = torch.tensor([[0.1, 5.0, 0.3], [0.2, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    stats = kl_stats(kl, mask)
    assert stats["kl/mean"] == pytest.approx(0.2)
    assert stats["kl/max"] == pytest.approx(0.3)
    assert kl_stats(kl, torch.zeros_like(mask)) == {"kl/mean": 0.0, "kl/max": 0.0}


def test_registry_names_and_errors():
    assert set(KL_ESTIMATORS) >= {"k1", "k2", "k3", "low_var_kl"}
    with pytest.raises(ValueError, match="unknown KL estimator 'nope'"):
        kl_estimate("nope", torch.zeros(1, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="already registered"):
        register_kl_estimator("k1")(lambda logp, ref: logp)
