"""LoRA on the learner and adapter-only sync to the HF engine (no Ray actors): only the adapter
trains, its first step equals AdamW's by hand, an engine given the adapter serves the learner's
policy (and one that missed a sync shows in the gap at once), state round-trips, exports reload."""

import pytest
import torch

pytestmark = pytest.mark.slow

from learner_fixtures import TOK, build_learner, make_engine, rollout_batch
from opefo_rllib.core import opefo_loss
from opefo_rllib.fleet.engine import SamplingConfig
from opefo_rllib.fleet.hf_engine import HFEngine
from opefo_rllib.models.loading import load_model
from opefo_rllib.models.lora import LORA_KEY
from opefo_rllib.models.rl_module import causal_lm_token_stats
from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
from opefo_rllib.rollout.batch import Rollout, collate
from ray.rllib.core import DEFAULT_MODULE_ID

LORA = {"lora_rank": 4, "lora_alpha": 8.0}


@pytest.fixture(scope="module")
def engine():
    return make_engine()


def _module(learner):
    return learner._module[DEFAULT_MODULE_ID]


def _next(batch, step):
    return dict(batch, weight_versions=batch["weight_versions"] + step)


def _lora_engine():
    return HFEngine(str(TINY_DEFAULT_PATH), eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id,
                    lora={"rank": 4, "alpha": 8.0})


def test_only_the_adapter_trains_and_its_first_step_is_adamws_by_hand(engine):
    lr, eps = 1e-2, 1e-8
    learner = build_learner(lr=lr, adam_eps=eps, micro_batch_size=5, **LORA)
    lm = _module(learner).lm
    assert learner.trainable_params() and all(LORA_KEY in n for n, p in lm.named_parameters() if p.requires_grad)
    before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    batch = rollout_batch(engine)
    # the gradient by hand: OPEFO's loss on the LoRA model, autograd
    stats = _module(learner).sequence_token_stats(batch["input_ids"], batch["attention_mask"], 1.0)
    loss, _ = opefo_loss(stats.logp, stats.entropy, batch["advantages"], batch["response_mask"], stats.expected_s,
                         estimator="exact", mode="two_sided")
    params = dict((n, p) for n, p in lm.named_parameters() if p.requires_grad)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    learner.update_from_rollouts(batch)
    after = lm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(LORA_KEY in k for k in changed)  # the base model never moves
    for name, g in grads.items():
        key = name
        # AdamW's first step (bias-corrected m = g, v = g^2, no weight decay): -lr g / (|g| + eps)
        expected = before[key] - lr * g / (g.abs() + eps) if g is not None else before[key]
        torch.testing.assert_close(after[key], expected, rtol=1e-4, atol=2e-5, msg=lambda m: f"{key}: {m}")
    # B starts at 0, so A gets no gradient in the first step and moves only from the second on
    assert any("lora_B" in k for k in changed) and not any("lora_A" in k for k in changed)


def _engine_batch(eng, seed=0):
    """A batch sampled by ``eng`` (its sampling log-probs are the engine's)."""
    from opefo_rllib.envs import ArithmeticEnv
    import numpy as np

    env = ArithmeticEnv()
    rng = np.random.default_rng(seed)
    ids = [TOK.encode(env.sample_problem(rng).prompt) for _ in range(4)]
    results = eng.generate(ids, 4, SamplingConfig(temperature=1.0, max_new_tokens=6), seed=seed)
    rollouts = [Rollout(group_id=k, prompt_ids=ids[k], response_ids=r.response_ids, sampling_logp=r.sampling_logp,
                        reward=0.0, weight_version=r.weight_version) for k, group in enumerate(results) for r in group]
    return collate(rollouts, TOK.pad_token_id)


def _gap(learner, batch) -> float:
    stats = _module(learner).sequence_token_stats(batch["input_ids"], batch["attention_mask"], 1.0)
    mask = batch["response_mask"].bool()
    return float((stats.logp.detach() - batch["sampling_logp"])[mask].abs().max())


def test_the_engine_serves_the_learners_adapter_and_a_missed_sync_shows_at_once(engine):
    learner = build_learner(lr=3e-2, **LORA)
    eng = _lora_engine()
    for step in range(3):
        learner.update_from_rollouts(_next(rollout_batch(engine, seed=step), step), step)
    adapter = learner.engine_weights()
    full = learner.policy_weights()
    assert set(adapter) == {k for k in _module(learner).lm.state_dict() if LORA_KEY in k}
    adapter_bytes = sum(v.numel() * v.element_size() for v in adapter.values())
    full_bytes = sum(v.numel() * v.element_size() for v in full.values())
    assert adapter_bytes < full_bytes / 10, (adapter_bytes, full_bytes)
    stale_gap = _gap(learner, _engine_batch(eng))  # the engine still holds the starting adapter (B = 0)
    eng.load_weights(adapter, learner.weight_version)
    assert eng.weight_version() == 3
    served_gap = _gap(learner, _engine_batch(eng, seed=1))
    assert served_gap < 1e-4, served_gap
    assert stale_gap > 1e-3, stale_gap  # one skipped adapter sync is plain in the gap metric
    # an engine without adapters takes the merged weights (the fallback path) and serves the same policy
    plain = make_engine()
    plain.load_weights(full, learner.weight_version)
    assert _gap(learner, _engine_batch(plain, seed=2)) < 1e-4


def test_an_adapter_of_another_shape_is_refused_naming_the_engine(engine):
    learner = build_learner(lora_rank=2, lora_alpha=4.0)
    with pytest.raises(ValueError, match="HFEngine.load_weights: the adapter does not match"):
        _lora_engine().load_weights({k: v for k, v in learner.engine_weights().items()}, 1)


def test_lora_state_holds_the_adapter_and_resumes_the_straight_run(engine):
    straight = build_learner(lr=1e-2, **LORA)
    batches = [_next(rollout_batch(engine, seed=s), s) for s in range(3)]
    for s in range(2):
        straight.update_from_rollouts(batches[s], s)
    state = straight.get_state()
    assert state["rl_module"][DEFAULT_MODULE_ID] and all(LORA_KEY in k for k in state["rl_module"][DEFAULT_MODULE_ID])
    resumed = build_learner(lr=1e-2, **LORA)
    resumed.set_state(state)
    m1 = straight.update_from_rollouts(batches[2], 2).metrics
    m2 = resumed.update_from_rollouts(batches[2], 2).metrics
    assert m2["learner/loss"] == m1["learner/loss"] and m2["learner/weight_version"] == 3
    for (k, a), b in zip(_module(straight).lm.state_dict().items(), _module(resumed).lm.state_dict().values()):
        assert torch.equal(a, b), k


def test_the_kl_reference_under_lora_is_the_base_model_with_no_copy(engine):
    learner = build_learner(lr=3e-2, kl_coef=0.1, **LORA)
    assert learner.reference.lm is _module(learner).lm  # the policy itself, adapter switched off
    for step in range(2):
        metrics = learner.update_from_rollouts(_next(rollout_batch(engine, seed=step), step), step).metrics
    batch = rollout_batch(engine, seed=5)
    base = load_model(TINY_DEFAULT_PATH).eval()
    with torch.no_grad():
        expected = causal_lm_token_stats(base, batch["input_ids"], batch["attention_mask"], 1.0, None).logp
    got = learner.reference.token_logp(batch["input_ids"], batch["attention_mask"], 1.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert metrics["kl/mean"] > 1e-5  # the adapter moved the policy away from the base


def test_exports_reload_merged_and_as_a_peft_adapter(engine, tmp_path):
    from peft import PeftModel

    from opefo_rllib.learner.hf_export import export_adapter, export_hf_policy

    learner = build_learner(lr=3e-2, **LORA)
    for step in range(2):
        learner.update_from_rollouts(_next(rollout_batch(engine, seed=step), step), step)
    batch = rollout_batch(engine, seed=7)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    policy = _module(learner).sequence_token_stats(ids, attn, 1.0).logp.detach()
    merged = load_model(export_hf_policy(str(TINY_DEFAULT_PATH), learner.policy_weights(), str(tmp_path / "merged")))
    state, config = learner.adapter_export()
    adapter_dir = export_adapter(str(TINY_DEFAULT_PATH), state, config, str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    peft_model = PeftModel.from_pretrained(load_model(TINY_DEFAULT_PATH), adapter_dir).eval()
    mask = batch["response_mask"].bool()
    with torch.no_grad():
        for model in (merged.eval(), peft_model.get_base_model()):
            logp = causal_lm_token_stats(model, ids, attn, 1.0, None).logp
            assert float((logp - policy)[mask].abs().max()) < 1e-4


def test_a_restarted_engine_gets_the_current_adapter(engine):
    """A LoRA fleet: an engine killed after the adapter of version 3 was synced comes back from
    the learner's weights_source with that adapter, and samples exactly what it sampled before."""
    import ray

    from opefo_rllib.fleet.fleet import EngineFleet

    learner = build_learner(lr=3e-2, **LORA)
    for step in range(3):
        learner.update_from_rollouts(_next(rollout_batch(engine, seed=step), step), step)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        kwargs = {"model_path": str(TINY_DEFAULT_PATH), "eos_token_id": TOK.eos_token_id,
                  "lora": {"rank": 4, "alpha": 8.0}}
        fleet = EngineFleet("hf", num_engines=1, engine_kwargs=kwargs, sync_timeout_s=60,
                            weights_source=lambda: (learner.engine_weights(), learner.weight_version))
        fleet.sync_weights(learner.engine_weights(), version=learner.weight_version, step=3)
        prompts = [TOK.encode(f"{i}*2=") for i in range(4)]

        def run(kill: bool):
            if kill:
                ray.kill(fleet.actors[0])
            pending = fleet.submit(prompts, 2, SamplingConfig(max_new_tokens=4), seed=11)
            out = {}
            while pending:
                idx, results, _, pending, _ = fleet.wait_any(pending, step=4)
                out.update({k: [(r.response_ids, r.sampling_logp, r.weight_version) for r in g]
                            for k, g in zip(idx, results)})
            return out

        clean = run(kill=False)
        restarted = run(kill=True)
        assert fleet.restarts == 1
        assert restarted == clean and {v for g in restarted.values() for *_, v in g} == {3}
        fleet.shutdown()
    finally:
        ray.shutdown()


def test_gradient_checkpointing_gives_the_same_lora_update(engine):
    batch = rollout_batch(engine)
    plain = build_learner(micro_batch_size=5, **LORA)
    checkpointed = build_learner(micro_batch_size=5, gradient_checkpointing=True, **LORA)
    assert _module(checkpointed).lm.is_gradient_checkpointing and not _module(plain).lm.is_gradient_checkpointing
    m1 = plain.update_from_rollouts(batch).metrics
    m2 = checkpointed.update_from_rollouts(batch).metrics
    assert m2["learner/grad_norm"] == pytest.approx(m1["learner/grad_norm"], rel=1e-4) and m1["learner/grad_norm"] > 0
    for (k, a), b in zip(_module(plain).lm.state_dict().items(), _module(checkpointed).lm.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
