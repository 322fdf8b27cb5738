"""The rollout pipeline: streaming (strict on-policy, the sync update), async (one batch ahead,
bounded staleness), dynamic sampling, overlong answers, and the fused flow pass's place in the
sync pipeline."""

import math
import pickle
from types import SimpleNamespace

import pytest
import torch
from bpe_fixture import bpe_model_dir  # noqa: F401 (fixture)

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


def test_streamed_chunks_join_into_the_batch_collating_it_whole_would_give():
    """streaming collates each chunk (whole groups, other lengths) once; joined, they are the batch."""
    from opefo_rllib.rollout.batch import concat_batches

    rollouts = [_rollout(0, 1.0, n_tokens=2), _rollout(0, 0.0, n_tokens=5, finished=False), _rollout(1, 1.0),
                _rollout(1, 1.0, n_tokens=1), _rollout(2, 0.0, n_tokens=4), _rollout(2, 1.0, n_tokens=2)]
    rollouts[5].info["timed_out"] = True  # left out of its group's baseline and of the loss
    whole = learner_batch(rollouts, 9, "grpo", mask_truncated=True)
    joined = concat_batches([learner_batch(rollouts[i:j], 9, "grpo", mask_truncated=True) for i, j in
                             ((0, 2), (2, 4), (4, 6))], pad_id=9)
    assert joined.keys() == whole.keys()
    for key, value in whole.items():
        assert torch.equal(joined[key], value), key


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
    from learner_fixtures import rollout_batch, make_engine

    return rollout_batch(make_engine())


@pytest.mark.slow
def test_samples_older_than_max_staleness_get_no_gradient(batch):
    from learner_fixtures import build_learner

    from opefo_rllib.algorithms.grpo.grpo_torch_learner import StaleBatchError

    with pytest.raises(StaleBatchError, match="strict on-policy"):
        stale = dict(batch, weight_versions=batch["weight_versions"] - 1)
        build_learner().update_from_rollouts(stale, 0)
    learner = build_learner(strict_on_policy=False, max_staleness=1)
    learner.weight_version = 2
    versions = torch.ones_like(batch["weight_versions"])
    versions[:5] = 0  # 2 versions old: refused
    metrics = learner.update_from_rollouts(dict(batch, weight_versions=versions), 0).metrics
    assert metrics["rollout/dropped_stale"] == 5 and metrics["rollout/staleness_max"] == 2
    assert metrics["rollout/staleness_mean"] == pytest.approx((5 * 2 + (len(versions) - 5)) / len(versions))
    # The update equals one on the batch whose 5 oldest rows have no response tokens.
    reference = build_learner(strict_on_policy=False, max_staleness=1)
    reference.weight_version = 2
    masked = dict(batch, weight_versions=torch.full_like(versions, 1), response_mask=batch["response_mask"].clone())
    masked["response_mask"][:5] = 0
    ref_metrics = reference.update_from_rollouts(masked, 0).metrics
    assert metrics["learner/loss"] == pytest.approx(ref_metrics["learner/loss"], rel=1e-6)
    for k, w in learner.policy_weights().items():
        torch.testing.assert_close(w, reference.policy_weights()[k])


def _stream_then_update(learner, batch, chunk_rows, step=0):
    """What the streaming pipeline does on the learner: a forward per finished chunk (its own
    collation, so its own padding), then the update on the whole batch."""
    start = 0
    for rows in chunk_rows:
        part = {k: v[start:start + rows] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        width = int(part["attention_mask"].sum(-1).max())  # as collate() of the chunk alone pads it
        chunk = {k: v[:, :width] for k, v in part.items()}
        # What learner_batch gives a chunk of whole groups: its rows' prompt lengths, advantages, masks.
        for key in ("prompt_lengths", "advantages"):
            chunk[key] = batch[key][start:start + rows]
        for key in ("response_mask", "sampling_logp"):
            chunk[key] = batch[key][start:start + rows, :width - 1]
        learner.stream_forward(chunk, start)
        start += rows
    return learner.update_from_rollouts(batch, step).metrics


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"micro_batch_size": 5}, {"zero_stage": 2, "balance_mode": "closed_loop"}],
                         ids=["one_micro_batch", "micro_batches", "zero2_closed_loop"])
def test_streaming_makes_the_sync_update(batch, overrides):
    """Chunks of uneven sizes and lengths, forwarded as they come, then one step with lambda from
    the whole batch: the weights of sync's step (rtol 1e-5), and the deferred re-score gives sync's
    realized change and closed-loop state."""
    from learner_fixtures import build_learner, rollout_batch, make_engine

    # adam_eps 1e-3: AdamW moves a weight whose gradient is ~0 by ~lr on float-summation noise
    # alone (the chunks sum in another order); this keeps the step a smooth function of the gradient.
    sync = build_learner(adam_eps=1e-3, **overrides)
    streaming = build_learner(pipeline="streaming", adam_eps=1e-3, **overrides)
    m_sync = sync.update_from_rollouts(batch, 0).metrics
    m_stream = _stream_then_update(streaming, batch, [4, 9, 3, 8])
    assert "entropy_flow/realized_change" not in m_stream  # measured later, during the next generation
    for key in ("learner/loss", "learner/grad_norm", "entropy_flow/lambda_star", "entropy_flow/lambda",
                "policy/entropy", "entropy_flow/P", "entropy_flow/N"):
        assert m_stream[key] == pytest.approx(m_sync[key], rel=1e-5, abs=1e-9), key
    for k, w in sync.policy_weights().items():
        torch.testing.assert_close(streaming.policy_weights()[k], w, rtol=1e-5, atol=1e-7)
    realized = streaming.measure_deferred_realized_change()
    for key in ("entropy_flow/entropy_after_step", "entropy_flow/realized_change"):  # a difference of two ~1.0
        assert realized[key] == pytest.approx(m_sync[key], abs=1e-6), key
    assert streaming.measure_deferred_realized_change() == {}  # once
    assert streaming.balance_rule.get_state() == pytest.approx(sync.balance_rule.get_state(), rel=1e-5)  # closed loop's f
    # A second step on a fresh batch (AdamW's moments in play), each from its own weights.
    engine = make_engine()
    engine.load_weights(sync.policy_weights(), sync.weight_version)
    second = rollout_batch(engine, seed=1)
    m_sync = sync.update_from_rollouts(second, 1).metrics
    m_stream = _stream_then_update(streaming, second, [12, 12])
    assert m_stream["learner/loss"] == pytest.approx(m_sync["learner/loss"], rel=1e-5, abs=1e-9)
    for k, w in sync.policy_weights().items():
        torch.testing.assert_close(streaming.policy_weights()[k], w, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"balance_mode": "none", "micro_batch_size": 5},
                                       {"zero_stage": 2, "balance_mode": "closed_loop", "tis_cap": 2.0,
                                        "loss_agg_mode": "seq-mean-token-mean", "entropy_coef": 0.01}],
                         ids=["opefo", "grpo_micro_batches", "zero2_closed_loop_tis_seq_mean"])
def test_stream_backward_makes_the_sync_update(batch, overrides):
    """Every chunk's backward during generation, into the two accumulators, combined with the
    whole batch's lambda: sync's step (rtol 1e-5), over two steps (AdamW's moments in play); the
    accumulated gradients are used once (a plain update after them is sync's again)."""
    from learner_fixtures import build_learner, rollout_batch, make_engine

    sync = build_learner(adam_eps=1e-3, **overrides)
    streaming = build_learner(pipeline="streaming", stream_backward=True, adam_eps=1e-3, **overrides)
    engine = make_engine()
    for step, (b, chunks) in enumerate([(batch, [4, 8, 12]), (None, [12, 12])]):
        if b is None:  # a fresh batch from the weights after the first step
            engine.load_weights(sync.policy_weights(), sync.weight_version)
            b = rollout_batch(engine, seed=1)
        m_sync = sync.update_from_rollouts(b, step).metrics
        m_stream = _stream_then_update(streaming, b, chunks, step)
        for key in ("learner/loss", "learner/grad_norm", "entropy_flow/lambda", "policy/entropy"):
            assert m_stream[key] == pytest.approx(m_sync[key], rel=1e-5, abs=1e-8), (step, key)
        for k, w in sync.policy_weights().items():
            torch.testing.assert_close(streaming.policy_weights()[k], w, rtol=1e-5, atol=1e-7)
    b = dict(b, weight_versions=torch.full_like(b["weight_versions"], sync.weight_version))  # on-policy again
    m_sync = sync.update_from_rollouts(b, 2).metrics
    m_plain = streaming.update_from_rollouts(b, 2).metrics  # no chunks streamed
    for key in ("learner/loss", "learner/grad_norm"):  # a gradient left in the accumulators would show here
        assert m_plain[key] == pytest.approx(m_sync[key], rel=1e-5, abs=1e-8), key


def test_streamed_chunks_must_cover_the_batch_once(batch):
    from learner_fixtures import build_learner

    learner = build_learner(pipeline="streaming")
    half = {k: batch[k][:10] for k in ("input_ids", "attention_mask")}
    learner.stream_forward(half, 0)
    with pytest.raises(RuntimeError, match="streamed chunks hold 10 rows"):
        learner.update_from_rollouts(batch, 0)
    # nothing left behind: the next update is a fresh learner's sync update of the batch
    again = learner.update_from_rollouts(batch, 0).metrics
    fresh = build_learner(pipeline="streaming").update_from_rollouts(batch, 0).metrics
    for key in ("learner/loss", "learner/grad_norm", "entropy_flow/lambda"):
        assert again[key] == pytest.approx(fresh[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_offpolicy_mask_zeroes_tokens_outside_the_band(batch, mode):
    from learner_fixtures import build_learner

    learner = build_learner(strict_on_policy=False, tis_cap=2.0, offpolicy_mask=mode)
    shifted = dict(batch, sampling_logp=batch["sampling_logp"].clone())
    shifted["sampling_logp"][0] -= 1.0  # row 0: the engine's probabilities e times lower -> ratio e > 2
    flow, _ = learner.flow_pass(shifted)
    token_weights = learner.token_weights(shifted, flow)
    weights, metrics = token_weights.weights, token_weights.metrics
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

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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
        ray.kill(algo.fleet.actors[0])  # the next batch ahead is generated by a restarted engine
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
    # The engines re-scored each step's batch (the learner did not): in TensorBoard at the step's own
    # iteration; step 2's score may be lost with the killed engine, never the run. Step 4's was pending.
    from opefo_rllib.evaluation.compare import read_scalars

    steps, values = read_scalars(tmp_path / "tb")["entropy_flow/realized_change"]
    assert {1, 3} <= set(steps) <= {1, 2, 3} and all(math.isfinite(v) for v in values)
    assert "entropy_flow/realized_change" not in fourth


@pytest.mark.slow
def test_the_engines_rescore_is_the_learners_realized_change(batch):
    """async with fp32 HF engines: the learner hands the re-score to the engines; an engine with
    the step's weights gives the realized change a sync learner measures itself (its first call
    checks the shared-prompt path against the plain one, the second takes it)."""
    from learner_fixtures import build_learner, make_engine

    from opefo_rllib.algorithms.grpo.grpo_torch_learner import realized_change_metrics

    asynchronous = build_learner(pipeline="async", strict_on_policy=False)
    sync = build_learner()
    assert asynchronous.realized_on_engines and not sync.realized_on_engines
    r_async, r_sync = asynchronous.update_from_rollouts(batch, 0), sync.update_from_rollouts(batch, 0)
    m_async, m_sync, pending = r_async.metrics, r_sync.metrics, r_async.engine_rescore
    assert "entropy_flow/realized_change" not in m_async and r_sync.engine_rescore is None
    assert pending["tokens"] == int(batch["response_mask"].sum()) == sum(len(r) for _, r in pending["sequences"])
    engine = make_engine()
    engine.load_weights(asynchronous.policy_weights(), asynchronous.weight_version)
    for _ in range(2):  # plain forward (and the check), then the shared-prompt one
        after_sum, tokens = engine.response_entropy(pending["sequences"], 1.0)
        measured = realized_change_metrics(pending["before"], after_sum / tokens, pending["net_flow"])
        for key in ("entropy_flow/entropy_after_step", "entropy_flow/realized_change"):
            assert measured[key] == pytest.approx(m_sync[key], abs=1e-6), key
    assert engine._shared_scoring
    # An answer whose first token is out of the loss (the engines score answers from their start):
    # the learner measures it itself.
    partial = dict(batch, response_mask=batch["response_mask"].clone())
    row = int(partial["response_mask"].sum(-1).argmax())
    assert partial["response_mask"][row].sum() >= 2
    partial["response_mask"][row, int(partial["response_mask"][row].nonzero()[0])] = 0.0
    result = build_learner(pipeline="async", strict_on_policy=False).update_from_rollouts(partial, 0)
    assert result.engine_rescore is None and "entropy_flow/realized_change" in result.metrics


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["sync", "streaming", "streaming_backward"])
def test_dynamic_sampling_fills_the_batch_or_says_how_short_it_is(ray_session, tmp_path, pipeline):
    from opefo_rllib.algorithms.opefo import OPEFOConfig

    config = OPEFOConfig().generation(**SMALL).rollout(filter_groups="zero_variance", max_refill_rounds=2,
                                                       pipeline=pipeline.split("_")[0], stream_chunks=2,
                                                       stream_backward=pipeline.endswith("backward"))
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


def _batch_ahead(ckpt) -> list[dict]:
    import json

    return json.loads((ckpt / "env_runner" / "batch_ahead.json").read_text())["rollouts"]


def _trained_samples(run_dir) -> dict[int, list[str]]:
    """Every iteration's trained batch, as the TensorBoard text samples show it (prompt, response,
    reward: one table row per sample), by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opefo_rllib.evaluation.compare import event_dir

    acc = EventAccumulator(str(event_dir(run_dir)), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: e.tensor_proto.string_val[0].decode().splitlines()[2:]
            for e in acc.Tensors("samples/text_summary")}


@pytest.mark.slow
def test_async_resume_trains_the_recorded_batch_ahead_once(tmp_path):
    """Stopped after iteration 2 and resumed, an async run trains at iteration 3 on the batch the
    checkpoint recorded (generated with version 1's weights before the stop), then goes on: every
    iteration's problems and samples, and its reward and loss, are those of the uninterrupted run;
    none lost, none trained twice."""
    import html
    import os
    import subprocess
    import sys

    from opefo_rllib.evaluation.compare import read_scalars

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", *args], cwd=tmp_path, text=True,
                              capture_output=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout

    batch = SMALL["prompts_per_batch"] * SMALL["group_size"]
    common = ["--set", "prompts_per_batch=4", "--set", "group_size=4", "--set", "max_new_tokens=6", "--set",
              "ray={num_cpus: 2}", "--set", "log_text_every=1", "--set", f"num_text_samples={batch}", "--set",
              "eval_every=0", "--set", "pipeline=async", "--set", "strict_on_policy=false", "--set",
              "checkpoint_every=2", "--set", "iterations=4"]
    cli(*common, "--set", f"logdir={tmp_path / 'run'}")
    ckpts = tmp_path / "run" / "checkpoints"
    # The checkpoint holds the runner past the batch ahead's draw, and that batch: iteration 3's
    # 4 problems (groups 8-11), generated with the weights of version 1.
    assert _runner_state(ckpts / "iter_000002")["next_group_id"] == 12
    recorded = _batch_ahead(ckpts / "iter_000002")
    assert len(recorded) == batch and {r["group_id"] for r in recorded} == {8, 9, 10, 11}
    assert {r["weight_version"] for r in recorded} == {1}
    resumed = cli("--resume", str(ckpts / "iter_000002"))
    assert "at iteration 2" in resumed
    branch = next((tmp_path / "run" / "branches").iterdir())

    straight, again = _trained_samples(tmp_path / "run"), _trained_samples(branch)
    assert sorted(straight) == [1, 2, 3, 4] and sorted(again) == [3, 4]
    assert all(len(straight[s]) == batch for s in straight)
    for step in (3, 4):  # the same problems and the same samples of them, in the same order
        assert again[step] == straight[step], step
    # iteration 3 trained exactly the recorded batch (each sample's prompt, response and reward, as
    # TensorBoard's table writes them)
    def row(r):
        cells = [html.escape(x).replace("|", "\\|").replace("\n", " ")[:500] for x in (r["prompt_text"],
                                                                                   r["response_text"])]
        return f"| {cells[0]} | {cells[1]} | {r['reward']:g} |"

    assert again[3] == [row(r) for r in recorded]
    ran, rerun = read_scalars(tmp_path / "run"), read_scalars(branch)
    # (the loss may be 0 on this tiny model, every group's rewards equal; the entropy never is)
    for tag in ("rollout/reward_mean", "learner/loss", "policy/entropy", "rollout/staleness_mean"):
        assert rerun[tag][0] == [3, 4], tag
        assert rerun[tag][1] == pytest.approx(ran[tag][1][2:], rel=1e-6, abs=1e-9), tag
    assert rerun["rollout/staleness_mean"][1] == [1.0, 1.0]  # trained one version behind, as without the stop
    # ... and the runs end in the same place: the same batch ahead after iteration 4, the same counters.
    end_straight, end_again = ckpts / "iter_000004", branch / "checkpoints" / "iter_000004"
    assert _batch_ahead(end_again) == _batch_ahead(end_straight)
    assert {r["group_id"] for r in _batch_ahead(end_again)} == {16, 17, 18, 19}
    state, state_again = _runner_state(end_straight), _runner_state(end_again)
    assert (state_again["sample_calls"], state_again["next_group_id"]) == (state["sample_calls"], 20)
    assert state_again["env_rng"] == state["env_rng"]


def _streaming_config(tmp_path, **rollout):
    from opefo_rllib.algorithms.opefo import OPEFOConfig

    config = OPEFOConfig().generation(**SMALL).rollout(pipeline="streaming", stream_chunks=3, **rollout)
    config.logging(tensorboard_dir=str(tmp_path / "tb"), log_text_every=0)
    config.fleet(generate_timeout_s=120, weight_sync_timeout_s=60)
    return config


@pytest.mark.slow
def test_streaming_an_engine_killed_with_calls_queued_loses_and_duplicates_nothing(ray_session, tmp_path):
    """Three calls queued on one engine, the engine killed: it is restarted once, each call is
    resent with its seed, and the batch is the one an unharmed engine gives, sample for sample."""
    import ray

    def first_batch(kill: bool):
        algo = _streaming_config(tmp_path / str(kill)).build_algo()
        runner = algo.env_runner
        started = runner.start(chunks=3)
        assert len(started.pending) == 3
        if kill:
            ray.kill(algo.fleet.actors[0])
        chunks: list = []
        sampled = runner.finish(started, on_chunk=chunks.append)
        assert [r for c in chunks for r in c] == sampled.rollouts  # each call's groups handed on as they came
        return algo, chunks

    reference, calm = first_batch(kill=False)
    reference.stop()
    algo, chunks = first_batch(kill=True)
    try:
        assert algo.fleet.restarts == 1
        got = sorted((r.group_id, r.response_ids) for c in chunks for r in c)  # resent calls may finish in any order
        assert got == sorted((r.group_id, r.response_ids) for c in calm for r in c)
        assert len(got) == SMALL["prompts_per_batch"] * SMALL["group_size"]
        result = algo.train()  # the pipeline goes on with the restarted engine, strictly on-policy
        assert result["rollout/num_samples"] == 16 and result["learner/optimizer_steps"] == 1
        assert result["rollout/staleness_max"] == 0 and 0 <= result["fleet/engine_idle_frac"] <= 1
    finally:
        algo.stop()


@pytest.mark.slow
def test_streaming_resume_reproduces_the_uninterrupted_run(tmp_path):
    """A checkpoint first re-scores the last step (the closed loop moves on it, and is saved):
    iteration 3 after a resume from iteration 2 is iteration 3 of the straight run, and TensorBoard
    has the realized change at every step."""
    import os
    import subprocess
    import sys

    from opefo_rllib.evaluation.compare import read_scalars

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", *args], cwd=tmp_path, text=True,
                              capture_output=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout

    def iteration_3(stdout: str) -> str:
        line = next(ln for ln in stdout.splitlines() if ln.strip().startswith("iter    3/"))
        return line.split("s/it")[0].rsplit(" ", 1)[0]

    straight = cli("--set", "prompts_per_batch=4", "--set", "group_size=4", "--set", "max_new_tokens=6", "--set",
                   "ray={num_cpus: 2}", "--set", "log_text_every=0", "--set", "eval_every=0", "--set",
                   "pipeline=streaming", "--set", "balance_mode=closed_loop", "--set", "checkpoint_every=2",
                   "--set", "iterations=3", "--set", f"logdir={tmp_path / 'run'}")
    resumed = cli("--resume", str(tmp_path / "run" / "checkpoints" / "iter_000002"))
    assert "at iteration 2" in resumed
    assert iteration_3(resumed) == iteration_3(straight)
    steps = read_scalars(tmp_path / "run" / "tensorboard")["entropy_flow/realized_change"][0]
    assert steps[:2] == [1, 2] and 3 in steps, steps


@pytest.mark.slow
def test_streaming_makes_the_sync_update_with_a_users_bpe_model(bpe_model_dir):
    """A user's Qwen2 with a BPE tokenizer, chat-templated prompts of different lengths, two EOS
    ids and answers up to 24 tokens: streamed chunks of uneven sizes make sync's step (rtol 1e-5)."""
    from learner_fixtures import build_learner

    from opefo_rllib.core import group_advantages
    from opefo_rllib.fleet.engine import SamplingConfig
    from opefo_rllib.fleet.hf_engine import HFEngine
    from opefo_rllib.models.loading import load_tokenizer
    from opefo_rllib.rollout.batch import collate

    tok = load_tokenizer(bpe_model_dir)
    engine = HFEngine(str(bpe_model_dir), eos_token_id=list(tok.eos_token_ids), pad_token_id=tok.pad_token_id)
    texts = ["What is 12 times 8?", "Compute 3 plus 4, please.", "A shop sells 14 apples a day. How many apples in a week? "
             "Put the answer in \\boxed{}.", "What is 7-2?"]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    results = engine.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=24), seed=0)
    rollouts = [Rollout(group_id=k, prompt_ids=prompts[k], response_ids=r.response_ids, sampling_logp=r.sampling_logp,
                        reward=float((k + s) % 3 == 0), weight_version=0, finished=r.finished)
                for k, group in enumerate(results) for s, r in enumerate(group)]
    assert len({len(p) for p in prompts}) == 4 and max(len(r.response_ids) for r in rollouts) > 12
    batch = collate(rollouts, tok.pad_token_id)
    batch["advantages"] = group_advantages(batch["rewards"], batch["group_ids"], "grpo")
    sync = build_learner(model_path=str(bpe_model_dir), adam_eps=1e-3)
    streaming = build_learner(model_path=str(bpe_model_dir), pipeline="streaming", adam_eps=1e-3)
    m_sync = sync.update_from_rollouts(batch, 0).metrics
    m_stream = _stream_then_update(streaming, batch, [4, 8, 4])  # whole prompt groups, as the engines return them
    for key in ("learner/loss", "learner/grad_norm", "entropy_flow/lambda_star", "policy/entropy"):
        assert m_stream[key] == pytest.approx(m_sync[key], rel=1e-5, abs=1e-9), key
    for k, w in sync.policy_weights().items():
        torch.testing.assert_close(streaming.policy_weights()[k], w, rtol=1e-5, atol=1e-7)
