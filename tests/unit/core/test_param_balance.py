"""The optimizer-aware balance on a toy softmax policy whose tokens share parameters: its
prediction matches the realized entropy change of one SGD step and of one AdamW step within
10%, and the lambda it picks balances the realized change where the per-token lambda* does not."""

import pytest
import torch

from opefo_rllib.core.entropy_flow import balance_weights, entropy_flow
from opefo_rllib.core.param_balance import adamw_step, optimizer_aware_lambda, predicted_change, sgd_step

K, D, N = 12, 4, 64  # vocabulary, shared features, sampled tokens


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(K, D, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    x = torch.randn(N, D, generator=g, dtype=torch.float64)  # contexts share W: tokens interact through it
    with torch.no_grad():
        actions = torch.multinomial(torch.softmax(x @ w.T, -1), 1, generator=g).squeeze(1)
    adv = torch.randn(N, generator=g, dtype=torch.float64).sign()
    return w, x, actions, adv


def _mean_entropy(w, x):
    logp = torch.log_softmax(x @ w.T, -1)
    return -(logp.exp() * logp).sum(-1).mean()


def _grads(w, x, actions, adv, weights):
    """grad H, and g_total / g_diff of the pg loss sum_t -w_t A_t log pi(a_t) / N."""
    logp = torch.log_softmax(x @ w.T, -1)
    tok = logp.gather(1, actions[:, None]).squeeze(1)
    delta = entropy_flow(tok.detach()[None], (-(logp.exp() * logp).sum(-1)).detach()[None], adv,
                         "exact", ((logp.exp() ** 2) * (logp + (-(logp.exp() * logp).sum(-1))[:, None])).sum(-1)
                         .detach()[None])[0]
    loss_total = -(adv * tok).mean()
    loss_diff = -(torch.sign(delta) * adv * tok).mean()
    g_total, = torch.autograd.grad(loss_total, w, retain_graph=True)
    g_diff, = torch.autograd.grad(loss_diff, w, retain_graph=True)
    g_h, = torch.autograd.grad(_mean_entropy(w, x), w)
    return g_h, g_total, g_diff, delta


def _apply(w, dtheta):
    return (w.detach() + dtheta).requires_grad_()


@pytest.mark.parametrize("lam", [0.0, 0.4])
def test_prediction_matches_one_sgd_step(lam):
    w, x, actions, adv = _toy()
    g_h, g_t, g_d, _ = _grads(w, x, actions, adv, None)
    step = sgd_step(0.01)([g_t + lam * g_d])
    predicted = predicted_change([g_h], step)
    realized = float(_mean_entropy(_apply(w, step[0]), x) - _mean_entropy(w, x))
    assert abs(predicted) > 1e-7, predicted
    assert realized == pytest.approx(predicted, rel=0.10)


def test_prediction_matches_one_adamw_step_from_a_warm_state():
    w, x, actions, adv = _toy(seed=1)
    opt = torch.optim.AdamW([w], lr=1e-4, weight_decay=0.01)
    for _ in range(5):  # moments that are not zero, as mid-training
        opt.zero_grad()
        (-(adv * torch.log_softmax(x @ w.T, -1).gather(1, actions[:, None]).squeeze(1)).mean()).backward()
        opt.step()
    g_h, g_t, g_d, _ = _grads(w, x, actions, adv, None)
    step_fn = adamw_step([w], [opt.state[w]], lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    g = g_t + 0.3 * g_d
    predicted = predicted_change([g_h], step_fn([g]))
    before = float(_mean_entropy(w, x))
    opt.zero_grad()
    w.grad = g.clone()
    opt.step()  # the real AdamW step
    realized = float(_mean_entropy(w, x)) - before
    assert abs(predicted) > 1e-8, predicted
    assert realized == pytest.approx(predicted, rel=0.10)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_aware_lambda_balances_the_realized_change_better_than_lambda_star(optimizer):
    w, x, actions, adv = _toy(seed=2)
    g_h, g_t, g_d, delta = _grads(w, x, actions, adv, None)
    step_fn = sgd_step(0.01) if optimizer == "sgd" else adamw_step([w], [None], 1e-4, (0.9, 0.999), 1e-8)
    lam, info = optimizer_aware_lambda([g_h], [g_t], [g_d], step_fn)
    _, stats = balance_weights(delta[None].float(), torch.ones(1, N))
    lam_star = stats["lambda"]

    def realized(lam_):
        return float(_mean_entropy(_apply(w, step_fn([g_t + lam_ * g_d])[0]), x) - _mean_entropy(w, x))

    grpo = realized(0.0)
    assert abs(realized(lam)) < 0.1 * abs(grpo)  # balanced where it counts: the realized change
    assert abs(realized(lam)) < abs(realized(lam_star))  # the per-token balance misses it here
    assert abs(info["predicted_change"]) < 1e-3 * abs(info["predicted_change_grpo"]) + 1e-12
