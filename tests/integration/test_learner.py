"""The DeepSpeed learner on its own (no Ray actors): strictness, one step, ZeRO and
micro-batch invariance, and engine/learner log-prob agreement."""

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

from learner_fixtures import build_learner, rollout_batch, make_engine
from opefo_rllib.algorithms.grpo.grpo_torch_learner import StaleBatchError
from ray.rllib.core import DEFAULT_MODULE_ID


@pytest.fixture
def engine():
    return make_engine()


def test_learner_logprobs_equal_engine_sampling_logprobs(engine):
    learner = build_learner()
    batch = rollout_batch(engine)
    assert batch["response_mask"].sum() > 20 and batch["sampling_logp"].abs().sum() > 1.0
    metrics = learner.update_from_rollouts(batch, step=0).metrics
    assert metrics["rollout/logprob_gap_max"] < 1e-4, metrics["rollout/logprob_gap_max"]
    # After an update and a weight sync, the engine samples from exactly the learner's policy.
    engine.load_weights(learner.policy_weights(), learner.weight_version)
    batch2 = rollout_batch(engine, seed=1)
    assert int(batch2["weight_versions"].unique()) == 1
    metrics2 = learner.update_from_rollouts(batch2, step=1).metrics
    assert metrics2["rollout/logprob_gap_max"] < 1e-4, metrics2["rollout/logprob_gap_max"]
    assert metrics2["policy/entropy"] > 0


def test_strict_mode_refuses_a_stale_batch_and_takes_one_step_per_batch(engine):
    learner = build_learner()
    batch = rollout_batch(engine)
    steps_before = learner.ds_engine.global_steps
    metrics = learner.update_from_rollouts(batch, step=0).metrics
    assert learner.ds_engine.global_steps == steps_before + 1
    assert metrics["learner/optimizer_steps"] == 1 and learner.weight_version == 1
    with pytest.raises(StaleBatchError, match="weight versions \\[0\\].*version 1"):
        learner.update_from_rollouts(batch, step=1)  # sampled by version 0


def test_approximate_on_policy_takes_several_steps(engine):
    learner = build_learner(strict_on_policy=False, num_updates_per_batch=3, policy_loss="ppo_clip",
                             balance_mode="none")
    steps_before = learner.ds_engine.global_steps
    metrics = learner.update_from_rollouts(rollout_batch(engine), step=0).metrics
    assert learner.ds_engine.global_steps == steps_before + 3 and metrics["learner/optimizer_steps"] == 3
    assert 0.0 <= metrics["learner/clip_frac"] <= 1.0


def _update_grads(engine, on_learner=None, **overrides):
    """Run one update and capture the full gradient of every parameter just before the step
    (``on_learner(learner)``: checks on the built learner first)."""
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(0)
    learner = build_learner(**overrides)
    if on_learner is not None:
        on_learner(learner)
    grads = {}
    original_step = learner.optimizer_step

    def step_and_capture(**kwargs):
        for name, p in learner.ds_engine.module.named_parameters():
            g = safe_get_full_grad(p)
            grads[name] = g.detach().clone() if g is not None else torch.zeros(())
        return original_step(**kwargs)

    learner.optimizer_step = step_and_capture
    metrics = learner.update_from_rollouts(rollout_batch(engine), step=0).metrics
    return grads, metrics


def _assert_grads_close(a, b):
    # Tolerance: float32 summation order differs between splits / ZeRO stages.
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert sum(float(g.abs().sum()) for g in a.values()) > 0


def test_micro_batch_size_does_not_change_the_update(engine):
    whole, m_whole = _update_grads(engine, micro_batch_size=None)
    single, m_single = _update_grads(engine, micro_batch_size=1)
    three, _ = _update_grads(engine, micro_batch_size=3)
    assert m_whole["learner/loss"] == pytest.approx(m_single["learner/loss"], abs=1e-6)
    _assert_grads_close(whole, single)
    _assert_grads_close(whole, three)


def test_token_budget_micro_batches_give_the_same_update_on_uneven_lengths(engine):
    """Rows sorted by length and packed under a token budget: same loss and gradients as the
    whole batch, on a batch whose sequences differ in length (some responses cut short)."""
    batch_lengths = rollout_batch(engine)["attention_mask"].sum(-1)
    assert int(batch_lengths.max()) - int(batch_lengths.min()) >= 3, batch_lengths
    whole, m_whole = _update_grads(engine, micro_batch_size=None)
    packed, m_packed = _update_grads(engine, max_tokens_per_micro_batch=40)
    capped, _ = _update_grads(engine, max_tokens_per_micro_batch=64, micro_batch_size=2)
    assert m_whole["learner/loss"] == pytest.approx(m_packed["learner/loss"], abs=1e-6)
    _assert_grads_close(whole, packed)
    _assert_grads_close(whole, capped)


def test_pack_by_tokens_covers_every_row_within_the_budget():
    from opefo_rllib.algorithms.grpo.grpo_torch_learner import pack_by_tokens

    g = torch.Generator().manual_seed(0)
    lengths = torch.cat([torch.randint(20, 80, (60,), generator=g), torch.tensor([900, 1200])])
    rows = torch.arange(100, 100 + len(lengths))
    batches = list(pack_by_tokens(rows, lengths, budget=1000, max_rows=16))
    seen = torch.cat(batches).sort().values
    assert torch.equal(seen, rows)
    for mb in batches:
        width = int(lengths[mb - 100].max())
        assert len(mb) <= 16 and (len(mb) * width <= 1000 or len(mb) == 1)
    padded = sum(len(mb) * int(lengths[mb - 100].max()) for mb in batches)
    assert padded / int(lengths.sum()) < 1.1  # vs len(lengths) * 1200 / sum when padding to the longest


def _update_deltas(engine, on_learner=None, **overrides):
    """Weight change of one update with Adam made linear-ish: lr = 1, eps = 1 gives
    delta = -g / (|g| + 1) on the first step, a monotone map of the gradient that does not
    amplify tiny gradients (as eps = 1e-8 would), so equal deltas mean equal gradients."""
    torch.manual_seed(0)
    learner = build_learner(lr=1.0, adam_eps=1.0, grad_clip=0.0, **overrides)
    if on_learner is not None:  # checks on the built learner
        on_learner(learner)
    before = learner.policy_weights()
    metrics = learner.update_from_rollouts(rollout_batch(engine), step=0).metrics
    after = learner.policy_weights()
    return {k: after[k] - before[k] for k in before}, metrics


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("micro_batch_size", [None, 5])
def test_zero_stages_give_the_zero_0_update(engine, stage, micro_batch_size):
    # micro_batch_size 5: several backward passes per step (ZeRO-3 once kept only the last one's gradient)
    ref, m_ref = _update_deltas(engine, zero_stage=0, micro_batch_size=micro_batch_size)
    other, m_other = _update_deltas(engine, zero_stage=stage, micro_batch_size=micro_batch_size)
    assert m_ref["learner/grad_norm"] == pytest.approx(m_other["learner/grad_norm"], rel=1e-4)
    assert m_ref["learner/loss"] == pytest.approx(m_other["learner/loss"], abs=1e-6)
    _assert_grads_close(ref, other)


@pytest.mark.parametrize("stage", [2, 3])
def test_optimizer_offload_gives_the_same_update(engine, stage):
    """ZeRO-Offload (fp32 master weights and Adam states in CPU memory) changes where the
    optimizer runs, not what it computes."""
    ref, m_ref = _update_deltas(engine, zero_stage=0, on_learner=lambda learner: _assert_offloaded(learner, False))
    offloaded, m_off = _update_deltas(engine, zero_stage=stage, offload_optimizer=True,
                                      on_learner=lambda learner: _assert_offloaded(learner, True))
    assert m_ref["learner/loss"] == pytest.approx(m_off["learner/loss"], abs=1e-6)
    _assert_grads_close(ref, offloaded)


def _assert_offloaded(learner, optimizer: bool, params: bool = False):
    """DeepSpeed's own optimizer says where the optimizer state and parameter partitions live."""
    opt = learner.ds_optimizer
    stage = int(learner.config.zero_stage)
    if stage == 2:
        assert opt.cpu_offload is optimizer
    elif stage == 3:
        assert bool(opt.offload_optimizer) is optimizer and bool(opt.offload_param) is params
    else:
        assert not optimizer and not params and not getattr(opt, "cpu_offload", False)


def test_parameter_offload_gives_the_same_update(engine):
    """ZeRO-3 with its parameter partitions (and the optimizer) in CPU memory, several micro-batches."""
    ref, m_ref = _update_deltas(engine, zero_stage=0, micro_batch_size=5)
    offloaded, m_off = _update_deltas(engine, zero_stage=3, offload_params=True, offload_optimizer=True,
                                      micro_batch_size=5,
                                      on_learner=lambda learner: _assert_offloaded(learner, True, params=True))
    assert m_ref["learner/loss"] == pytest.approx(m_off["learner/loss"], abs=1e-6)
    _assert_grads_close(ref, offloaded)


def test_truncated_importance_sampling_is_off_by_default_and_logged_when_on(engine):
    batch = rollout_batch(engine)
    off = build_learner().update_from_rollouts(batch, step=0).metrics
    assert off["rollout/tis_enabled"] == 0.0 and "rollout/tis_weight_mean" not in off
    skewed = dict(batch, sampling_logp=batch["sampling_logp"] - 0.5 * batch["response_mask"])  # engine less sure
    on = build_learner(tis_cap=1.2).update_from_rollouts(skewed, step=0).metrics
    # pi_learner / pi_engine = e^0.5 = 1.65 on every response token, capped at 1.2.
    assert on["rollout/tis_enabled"] == 1.0 and on["rollout/tis_weight_mean"] == pytest.approx(1.2, rel=1e-5)
    assert on["rollout/tis_clipped_frac"] == 1.0


def test_gradient_checkpointing_gives_the_same_update(engine):
    def checkpointing(on):
        def check(learner):
            assert learner._module[DEFAULT_MODULE_ID].lm.is_gradient_checkpointing is on
        return check

    plain, m_plain = _update_grads(engine, on_learner=checkpointing(False))
    ckpt, m_ckpt = _update_grads(engine, on_learner=checkpointing(True), gradient_checkpointing=True)
    assert m_plain["learner/loss"] == pytest.approx(m_ckpt["learner/loss"], abs=1e-6)
    _assert_grads_close(plain, ckpt)


def test_bf16_learner_updates_and_its_gap_to_an_fp32_engine_is_measured(engine):
    learner = build_learner(bf16=True, model_dtype="bfloat16")
    metrics = learner.update_from_rollouts(rollout_batch(engine), step=0).metrics
    assert np.isfinite(metrics["learner/loss"]) and np.isfinite(metrics["learner/grad_norm"])
    # bf16 scoring of fp32 samples: a real, logged mismatch (what tis_cap exists for).
    assert 1e-4 < metrics["rollout/logprob_gap_max"] < 0.5


def test_one_learner_step_computes_the_gradient_of_opefo_loss(engine):
    """flow_pass -> token_weights -> accumulate_gradients is opefo_loss's gradient on the batch."""
    from opefo_rllib.core import opefo_loss

    learner = build_learner(micro_batch_size=5)  # several micro-batches, uneven last one
    batch = rollout_batch(engine)
    flow, forwards = learner.flow_pass(batch)
    weights = learner.token_weights(batch, flow)
    learner.accumulate_gradients(batch, flow, weights, torch.arange(len(batch["rewards"])), torch.Generator(), forwards)
    module = learner._module[DEFAULT_MODULE_ID]
    params = dict(module.lm.named_parameters())
    from_learner = {k: p.grad.detach().clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    stats = module.sequence_token_stats(batch["input_ids"], batch["attention_mask"], 1.0)
    loss, _ = opefo_loss(stats.logp, stats.entropy, batch["advantages"], batch["response_mask"], stats.expected_s,
                         estimator="exact", mode="two_sided")
    loss.backward()
    for k, p in params.items():
        torch.testing.assert_close(from_learner[k], p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert sum(float(g.abs().sum()) for g in from_learner.values()) > 0


@pytest.mark.parametrize("algo", ["OPEFO", "GRPO"])
def test_a_one_sided_batch_trains_and_is_counted(engine, algo):
    """A batch whose flow is all on one side (here: one response token with a non-zero advantage)
    used to crash every run, GRPO's included; now it takes a plain GRPO step and is counted."""
    learner = build_learner(**({"balance_mode": "none"} if algo == "GRPO" else {}))
    batch = rollout_batch(engine)
    first = int(batch["response_mask"][0].nonzero()[0])
    batch["response_mask"].zero_()
    batch["response_mask"][0, first] = 1.0
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    batch["advantages"][0] = 1.0
    before = learner.policy_weights()
    metrics = learner.update_from_rollouts(batch, step=0).metrics
    assert metrics["entropy_flow/one_sided_batches"] == 1.0
    assert np.isnan(metrics["entropy_flow/lambda_star"]) and metrics["entropy_flow/lambda"] == 0.0
    assert metrics["entropy_flow/w_min"] == metrics["entropy_flow/w_max"] == 1.0
    after = learner.policy_weights()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the step was not taken"


def test_finite_step_guard_skips_and_counts(engine):
    """A NaN loss skips the optimizer step: weights, optimizer state and version unchanged,
    counted in a row; a finite batch afterwards steps again and resets the count."""
    learner = build_learner()
    batch = rollout_batch(engine)
    before = learner.policy_weights()
    poisoned = dict(batch, advantages=batch["advantages"].clone())
    poisoned["advantages"][0] = float("nan")
    for k in range(3):
        metrics = learner.update_from_rollouts(poisoned, step=k).metrics
        assert metrics["learner/nonfinite_in_a_row"] == k + 1 and metrics["learner/nonfinite_steps"] == k + 1
        assert metrics["learner/optimizer_steps"] == 0 and learner.weight_version == 0
    after = learner.policy_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert learner.ds_engine.global_steps == 0
    metrics = learner.update_from_rollouts(batch, step=3).metrics
    assert metrics["learner/nonfinite_in_a_row"] == 0 and metrics["learner/nonfinite_steps"] == 3
    assert learner.weight_version == 1 and metrics["learner/grad_norm"] > 0


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_finite_step_guard_catches_a_nan_gradient_under_every_zero_stage(engine, zero_stage):
    """A finite loss whose gradient is NaN (a hook poisons one tensor) is not applied either."""
    learner = build_learner(zero_stage=zero_stage)
    batch = rollout_batch(engine)
    before = learner.policy_weights()
    param = next(p for p in learner.ds_engine.module.parameters() if p.requires_grad)
    handle = param.register_hook(lambda g: g * float("nan"))
    metrics = learner.update_from_rollouts(batch, step=0).metrics
    handle.remove()
    assert metrics["learner/nonfinite_steps"] == 1 and learner.weight_version == 0
    assert not np.isfinite(metrics["learner/grad_norm"])
    after = learner.policy_weights()
    assert all(torch.equal(before[k], after[k]) for k in before), "a non-finite step changed the weights"
    metrics = learner.update_from_rollouts(batch, step=1).metrics
    assert learner.weight_version == 1 and np.isfinite(metrics["learner/grad_norm"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_learner_state_round_trips_under_every_zero_stage(engine, stage):
    """get_state -> set_state on a fresh learner, then the same batch: the same update (the
    optimizer state, master weights and scheduler came back). ZeRO-3 used to fail at get_state."""
    import pickle

    batch1, batch2 = rollout_batch(engine, seed=0), rollout_batch(engine, seed=1)
    for b in (batch1, batch2):
        b["weight_versions"] = torch.zeros_like(b["weight_versions"])
    torch.manual_seed(0)
    first = build_learner(zero_stage=stage)
    first.update_from_rollouts(batch1, step=0)
    state = pickle.loads(pickle.dumps(first.get_state()))  # as a checkpoint stores it
    torch.manual_seed(1)  # a different init: everything must come from the state
    second = build_learner(zero_stage=stage)
    second.set_state(state)
    assert second.weight_version == first.weight_version == 1
    w_first, w_second = first.policy_weights(), second.policy_weights()
    assert all(torch.equal(w_first[k], w_second[k]) for k in w_first)
    batch2["weight_versions"] = torch.ones_like(batch2["weight_versions"])
    m1 = first.update_from_rollouts(batch2, step=1).metrics
    m2 = second.update_from_rollouts(batch2, step=1).metrics
    assert m1["learner/loss"] == pytest.approx(m2["learner/loss"], abs=1e-7)
    w_first, w_second = first.policy_weights(), second.policy_weights()
    for k in w_first:
        torch.testing.assert_close(w_first[k], w_second[k], rtol=1e-6, atol=1e-8, msg=lambda m: f"{k}: {m}")


def _token_stats(learner, batch):
    module = learner._module[DEFAULT_MODULE_ID]
    with torch.no_grad():
        return module.sequence_token_stats(batch["input_ids"], batch["attention_mask"], 1.0)


def _mean_entropy(learner, batch) -> float:
    mask = batch["response_mask"]
    return float((_token_stats(learner, batch).entropy * mask).sum() / mask.sum())


def test_realized_change_is_the_direct_before_after_difference(engine):
    from opefo_rllib.core.entropy_flow import ESTIMATORS, entropy_flow

    learner = build_learner(lr=1e-2, max_tokens_per_micro_batch=None, micro_batch_size=3)  # several micro-batches
    batch = rollout_batch(engine)
    stats_before = _token_stats(learner, batch)
    before = _mean_entropy(learner, batch)
    metrics = learner.update_from_rollouts(batch, step=0).metrics
    after = _mean_entropy(learner, batch)
    assert abs(after - before) > 1e-4, "the step should move the entropy"
    assert metrics["entropy_flow/realized_change"] == pytest.approx(after - before, abs=1e-6)
    assert metrics["entropy_flow/entropy_after_step"] == pytest.approx(after, abs=1e-6)
    # token by token: each estimator's delta_t against H_t after minus H_t before, over the response tokens
    mask = batch["response_mask"].bool()
    realized = (_token_stats(learner, batch).entropy - stats_before.entropy)[mask].double().numpy()
    for est in ESTIMATORS:
        delta = entropy_flow(stats_before.logp, stats_before.entropy, batch["advantages"].float(), est,
                             stats_before.expected_s)[mask].double().numpy()
        expected = float(np.corrcoef(delta, realized)[0, 1])
        assert metrics[f"entropy_flow/token_corr/{est}"] == pytest.approx(expected, abs=1e-4), est
    off = build_learner(measure_realized_change=False).update_from_rollouts(rollout_batch(engine), step=0).metrics
    assert "entropy_flow/realized_change" not in off


def test_closed_loop_fraction_follows_the_realized_change_within_its_bounds(engine):
    learner = build_learner(balance_mode="closed_loop", closed_loop_gain=10.0, closed_loop_target_gain=1.0,
                             closed_loop_max_fraction=1.5)
    rule = learner.balance_rule
    rule.after_update(entropy_after=1.0, change=0.0)  # sets the target to the first batch's entropy
    assert rule.entropy_target == 1.0 and rule.closed_loop_fraction == 1.0
    rule.after_update(entropy_after=1.1, change=0.1)  # rising: f falls by 10 x 0.1 + 0.1
    assert rule.closed_loop_fraction == pytest.approx(0.0)
    for _ in range(50):
        rule.after_update(entropy_after=0.2, change=-0.5)  # collapsing: f rises, capped
    assert rule.closed_loop_fraction == 1.5
    batch = rollout_batch(engine)
    metrics = learner.update_from_rollouts(batch, step=0).metrics
    assert metrics["entropy_flow/balance_fraction"] == 1.5
    assert abs(metrics["entropy_flow/lambda"]) <= 0.95 + 1e-9
    assert 0.0 <= rule.closed_loop_fraction <= 1.5 and "entropy_flow/entropy_target" in metrics
    state = learner.get_state()
    fresh = build_learner(balance_mode="closed_loop")
    fresh.set_state(state)
    assert fresh.balance_rule.closed_loop_fraction == rule.closed_loop_fraction
    assert fresh.balance_rule.entropy_target == rule.entropy_target == 1.0


def test_high_entropy_tokens_keep_the_top_quantile():
    from opefo_rllib.algorithms.grpo.grpo_torch_learner import high_entropy_tokens

    entropy = torch.tensor([[0.1, 0.5, 0.9, 0.3, 2.0], [1.5, 0.2, 0.7, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.float32)
    keep = high_entropy_tokens(entropy, mask, 0.25)  # 9 response tokens: the top ~2-3 by H
    assert keep[1, 4] == 0  # not a response token, whatever its entropy
    kept = sorted(round(v, 4) for v in entropy[keep.bool()].tolist())
    # the 75th percentile of the 9 (linear interpolation) is the 7th smallest, 0.9 itself: kept (ties kept)
    assert kept == [0.9, 1.5, 2.0]


def test_forking_tokens_and_adaptive_entropy_train_and_stay_in_bounds(engine):
    batch = rollout_batch(engine)
    forking = build_learner(balance_mode="none", top_entropy_quantile=0.2)
    metrics = forking.update_from_rollouts(batch, step=0).metrics
    assert 0.15 <= metrics["entropy_flow/high_entropy_frac"] <= 0.3
    assert metrics["entropy_flow/w_min"] == 1.0 and forking.weight_version == 1  # balancing off, step taken
    adaptive = build_learner(balance_mode="none", adaptive_entropy=True, entropy_coef=0.0, entropy_coef_lr=1.0,
                              entropy_coef_max=0.05, entropy_target=5.0)  # far above: the coefficient rises
    m1 = adaptive.update_from_rollouts(batch, step=0).metrics
    assert m1["learner/entropy_coef"] == 0.05  # clipped at entropy_coef_max
    assert adaptive.adaptive_entropy.coef == 0.05  # committed after the step
    adaptive.adaptive_entropy.target = 0.01  # far below: it falls back to 0
    adaptive.adaptive_entropy.after_update(batch_entropy=1.0)
    assert adaptive.adaptive_entropy.coef == 0.0


@pytest.mark.parametrize("stage", [0, 3])
def test_fused_flow_pass_makes_the_same_update_with_one_forward_fewer(engine, stage):
    batch = rollout_batch(engine)
    results = {}
    for fuse in (False, True):
        learner = build_learner(zero_stage=stage, fuse_flow_pass=fuse)
        calls = []
        original = learner._stats
        learner._stats = lambda b, rows, _o=original: (calls.append(len(rows)), _o(b, rows))[1]
        metrics = learner.update_from_rollouts(batch, step=0).metrics
        results[fuse] = (metrics, learner.policy_weights(), len(calls))
    (m0, w0, calls0), (m1, w1, calls1) = results[False], results[True]
    assert (calls0, calls1) == (3, 2)  # flow, training, realized change -> the first two are one forward
    for key in ("learner/loss", "learner/grad_norm", "entropy_flow/lambda_star", "entropy_flow/realized_change"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-6, abs=1e-9), key
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-6, atol=1e-8)


def _optimizer_aware_steps(**overrides) -> list[dict]:
    """Two optimizer-aware updates (the second reads AdamW's moments from the first), each on a
    batch sampled from the learner's current weights."""
    engine = make_engine()
    learner = build_learner(balance_mode="optimizer_aware", **{"max_abs_lambda": None, **overrides})  # as studied
    out = []
    for step in range(2):
        engine.load_weights(learner.policy_weights(), learner.weight_version)
        out.append(learner.update_from_rollouts(rollout_batch(engine, seed=step), step).metrics)
    return out


def test_optimizer_aware_balance_zeroes_the_predicted_parameter_space_change():
    for metrics in _optimizer_aware_steps():
        lam = metrics["entropy_flow/lambda_optimizer_aware"]
        assert -0.95 <= lam <= 0.95 and metrics["entropy_flow/lambda"] == lam
        assert abs(metrics["entropy_flow/predicted_param_change"]) <= \
            1e-3 * abs(metrics["entropy_flow/predicted_param_change_grpo"]) + 1e-12
        assert metrics["learner/optimizer_steps"] == 1 and math.isfinite(metrics["learner/loss"])
    with pytest.raises(Exception, match="balance_mode"):
        build_learner(balance_mode="optimizer_aware", zero_stage=3).config.validate()


def test_optimizer_aware_balance_reads_adams_state_from_zero_1_and_2_partitions():
    """ZeRO 1-2 keep AdamW's moments in flat fp32 partitions; the balance reassembles them per
    parameter and must choose the lambda ZeRO-0 chooses (step 2 is the one that reads them)."""
    keys = ("entropy_flow/lambda_optimizer_aware", "entropy_flow/predicted_param_change_grpo", "learner/grad_norm")
    reference = _optimizer_aware_steps(zero_stage=0, adam_eps=1e-3)
    assert reference[1]["entropy_flow/lambda_optimizer_aware"] != reference[0]["entropy_flow/lambda_optimizer_aware"]
    for stage in (1, 2):
        got = _optimizer_aware_steps(zero_stage=stage, adam_eps=1e-3)
        for ref, m in zip(reference, got):
            for key in keys:
                assert m[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-9), (stage, key)
    bf16 = _optimizer_aware_steps(zero_stage=2, bf16=True)  # bf16 model, fp32 master weights and moments
    for m in bf16:
        assert -0.95 <= m["entropy_flow/lambda_optimizer_aware"] <= 0.95 and math.isfinite(m["learner/loss"])


def test_a_registered_balance_rule_trains_by_name(engine):
    """A user rule registered in core/balance.py is a balance_mode: the config takes it and the
    OPEFO learner trains with its lambda."""
    from opefo_rllib.algorithms.grpo.grpo import validate_fields
    from opefo_rllib.core.balance import BALANCE_RULES, BalanceRule, register_balance_rule

    @register_balance_rule("fixed_tenth_test")
    class FixedTenth(BalanceRule):
        def raw_lambda(self, totals):
            return 0.1

    try:
        learner = build_learner(balance_mode="fixed_tenth_test")
        validate_fields(learner.config)
        assert isinstance(learner.balance_rule, FixedTenth)
        metrics = learner.update_from_rollouts(rollout_batch(engine), step=0).metrics
    finally:
        del BALANCE_RULES["fixed_tenth_test"]
    assert metrics["entropy_flow/lambda"] == 0.1 and metrics["learner/optimizer_steps"] == 1
    assert metrics["entropy_flow/w_max"] == pytest.approx(1.1) and metrics["entropy_flow/w_min"] == pytest.approx(0.9)
