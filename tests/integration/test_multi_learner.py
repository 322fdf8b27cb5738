"""Several learners: RLlib's remote learner group (Ray Train workers, one gloo group) with
DeepSpeed data parallel over it. Two learners must make the update one learner makes."""

import pytest
import ray
import torch

pytestmark = pytest.mark.slow

from learner_fixtures import build_learner, rollout_batch, make_engine  # noqa: E402
from opefo_rllib.algorithms.grpo.grpo import _rank0_result  # noqa: E402
from opefo_rllib.algorithms.opefo import OPEFOConfig  # noqa: E402
from opefo_rllib.envs import ArithmeticEnv  # noqa: E402
from opefo_rllib.learner.data_parallel import padded_plan, token_balanced_shards  # noqa: E402
from ray.rllib.core import DEFAULT_MODULE_ID  # noqa: E402


def test_token_balanced_shards_cover_every_row_once_with_near_equal_tokens():
    lengths = torch.tensor([40, 3, 3, 3, 3, 3, 3, 3, 30, 5, 5, 5])
    rows = torch.arange(len(lengths))
    shards = token_balanced_shards(rows, lengths, 2)
    assert sorted(torch.cat(shards).tolist()) == rows.tolist()
    tokens = [int(lengths[s].sum()) for s in shards]
    assert abs(tokens[0] - tokens[1]) <= int(lengths.min()) + 2, tokens  # a row-count split would be 61 vs 45
    assert token_balanced_shards(rows, lengths, 2)[0].tolist() == shards[0].tolist()  # deterministic


def test_padded_plan_gives_every_rank_the_same_number_of_micro_batches():
    shards = [torch.arange(5), torch.arange(5, 6), torch.tensor([], dtype=torch.long)]
    plans = [list(padded_plan(shards, r, lambda s: s.split(2), torch.tensor([0]))) for r in range(3)]
    assert [len(p) for p in plans] == [3, 3, 3]
    assert [bool(f) for _, f in plans[1]] == [False, True, True] and all(f for _, f in plans[2])


# Adam's first step is lr x g / (|g| + eps): with eps = 1e-8 a coordinate whose gradient is ~1e-9
# moves by ~lr on float-summation noise alone (two learners sum in another order); eps = 1e-3
# keeps the step a smooth function of the gradient, so equal weights mean equal gradients.
ADAM_EPS = 1e-3


def _group(num_learners: int, **overrides):
    config = OPEFOConfig()
    for key, value in {"lr": 1e-3, "adam_eps": ADAM_EPS, "seed": 0, "micro_batch_size": 5, "num_learners": num_learners,
                       "num_cpus_per_learner": 0.5, "learner_timeout_s": 120.0, **overrides}.items():
        setattr(config, key, value)
    env = ArithmeticEnv()
    return config.build_learner_group(env=None, spaces={DEFAULT_MODULE_ID: (env.observation_space, env.action_space)})


def _on_all(group, fn, num_learners=2, what="a test call"):
    return _rank0_result(group.foreach_learner(fn, timeout_seconds=120), num_learners, what, 120)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_learners_make_the_one_learner_update(ray_session, stage):
    batch = rollout_batch(make_engine(), prompts=6, group=4)
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 2  # uneven rows: shards differ in rows, not only in tokens
    one = build_learner(zero_stage=stage, micro_batch_size=5, adam_eps=ADAM_EPS)
    m1 = one.update_from_rollouts(batch, step=0).metrics
    w1 = one.policy_weights()
    group = _group(2, zero_stage=stage)
    try:
        m2 = _on_all(group, lambda learner, b=batch: learner.update_from_rollouts(b, 0).metrics, what="the update")
        w2 = _on_all(group, lambda learner: learner.policy_weights(), what="the weights")
        ranks = _on_all(group, lambda learner: (learner.dp_world, learner.dp_rank) if learner.dp_rank else None)
        versions = [r.get() for r in group.foreach_learner(lambda learner: learner.weight_version)]
    finally:
        group.shutdown()
    assert ranks == (2, 1) and versions == [1, 1]
    for key in ("entropy_flow/lambda_star", "entropy_flow/P", "entropy_flow/N", "policy/entropy", "learner/loss",
                "learner/grad_norm"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key
    # the difference of two mean entropies of ~1 nat: float32 sums in another order move it by ~1e-7
    assert m2["entropy_flow/realized_change"] == pytest.approx(m1["entropy_flow/realized_change"], rel=1e-3, abs=1e-6)
    assert abs(m1["entropy_flow/realized_change"]) > 1e-5  # the step did change the entropy
    for est in ("exact", "single_logit", "paper"):  # each learner's token sums, reduced before the correlation
        assert m2[f"entropy_flow/token_corr/{est}"] == pytest.approx(m1[f"entropy_flow/token_corr/{est}"], abs=1e-4)
    assert m2["learner/optimizer_steps"] == 1
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(w1[k], w) for k, w in build_learner().policy_weights().items())  # it moved


def _stream_chunks(group, batch, chunk_rows):
    """What the streaming pipeline sends every learner: each finished chunk (whole prompt groups,
    collated alone), then the update on the whole batch."""
    start = 0
    for rows in chunk_rows:
        part = {k: v[start:start + rows] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        width = int(part["attention_mask"].sum(-1).max())
        chunk = {k: v[:, :width] for k, v in part.items()}
        chunk.update({k: batch[k][start:start + rows] for k in ("prompt_lengths", "advantages")})
        chunk.update({k: batch[k][start:start + rows, :width - 1] for k in ("response_mask", "sampling_logp")})
        _on_all(group, lambda learner, c=chunk, r=start: learner.stream_forward(c, r), what="a streamed forward")
        start += rows


@pytest.mark.parametrize("stage, backward", [(0, False), (2, False), (2, True)],
                         ids=["zero0", "zero2", "zero2_stream_backward"])
def test_two_streaming_learners_make_the_one_learner_sync_update(ray_session, stage, backward):
    """Streaming on two learners: each streams its token-balanced share of every chunk (a chunk of
    one row leaves one learner nothing; with micro-batches of 5 the learners keep different numbers
    of forwards, evened out by filler backward passes), and the step is one sync learner's, over
    two steps, with the deferred re-score's realized change."""
    engine = make_engine()
    one = build_learner(zero_stage=stage, micro_batch_size=5, adam_eps=ADAM_EPS)
    group = _group(2, zero_stage=stage, pipeline="streaming", stream_backward=backward)
    try:
        kept = []
        for step, chunks in enumerate([[1, 11, 12], [13, 11]]):
            engine.load_weights(one.policy_weights(), one.weight_version)
            batch = rollout_batch(engine, prompts=6, group=4, seed=step)
            m1 = one.update_from_rollouts(batch, step).metrics
            _stream_chunks(group, batch, chunks)
            kept.append([r.get() for r in group.foreach_learner(lambda learner: len(learner._streamed.forwards))])
            m2 = _on_all(group, lambda learner, b=batch, s=step: learner.update_from_rollouts(b, s).metrics,
                         what="the update")
            for key in ("entropy_flow/lambda_star", "policy/entropy", "learner/loss", "learner/grad_norm"):
                assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), (step, key)
            realized = _on_all(group, lambda learner: learner.measure_deferred_realized_change(), what="re-score")
            assert realized["entropy_flow/realized_change"] == pytest.approx(
                m1["entropy_flow/realized_change"], abs=1e-6)
        w2 = _on_all(group, lambda learner: learner.policy_weights(), what="the weights")
    finally:
        group.shutdown()
    assert any(a != b for a, b in kept), kept  # the filler backward passes did have work to do
    for k, w in one.policy_weights().items():
        torch.testing.assert_close(w2[k], w, rtol=1e-4, atol=1e-6)


def test_two_zero2_learners_choose_the_one_learner_optimizer_aware_lambda(ray_session):
    """The balance's three gradients are summed over the learners, and AdamW's moments are
    reassembled from both learners' ZeRO-2 partitions (step 2 reads them)."""
    engine = make_engine()
    one = build_learner(zero_stage=0, micro_batch_size=5, adam_eps=ADAM_EPS, balance_mode="optimizer_aware",
                         max_abs_lambda=None)
    group = _group(2, zero_stage=2, balance_mode="optimizer_aware", max_abs_lambda=None)
    try:
        for step in range(2):
            engine.load_weights(one.policy_weights(), one.weight_version)
            batch = rollout_batch(engine, prompts=6, group=4, seed=step)
            m1 = one.update_from_rollouts(batch, step).metrics
            m2 = _on_all(group, lambda learner, b=batch, s=step: learner.update_from_rollouts(b, s).metrics,
                         what="the update")
            for key in ("entropy_flow/lambda_optimizer_aware", "entropy_flow/predicted_param_change_grpo",
                        "learner/grad_norm"):
                assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-9), (step, key)
    finally:
        group.shutdown()


# ---------------------------------------------------------------------------- the CLI, end to end
SMALL = ["--set", "prompts_per_batch=4", "--set", "group_size=4", "--set", "max_new_tokens=6", "--set",
         "ray={num_cpus: 2}", "--set", "log_text_every=0", "--set", "eval_every=0", "--set", "iterations=3"]
# Two learners on this 2-CPU machine: 1 driver + 2 x 0.25 + 1 engine x 0.5 = 2 CPUs.
TWO_LEARNERS = ["--set", "num_learners=2", "--set", "num_cpus_per_learner=0.25", "--set", "zero_stage=2"]


def _cli(*args, cwd):
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _line(stdout: str, i: int) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.strip().startswith(f"iter {i:4d}/"))
    return line.split("s/it")[0].rsplit(" ", 1)[0]  # every number but the timing


def test_cli_trains_with_two_learners_resumes_to_the_same_iteration_and_refuses_another_count(tmp_path):
    """One two-learner run (a CLI run starts Ray, two learners and an engine: ~30 s) serves both
    claims: its resume reproduces the straight run, and a resume that changes num_learners is refused."""
    import subprocess
    import sys

    from opefo_rllib.evaluation.compare import read_scalars

    straight = _cli(*SMALL, *TWO_LEARNERS, "--set", "checkpoint_every=2", "--set", f"logdir={tmp_path / 'two'}",
                    cwd=tmp_path)
    _cli(*SMALL, "--set", "zero_stage=2", "--set", f"logdir={tmp_path / 'one'}", cwd=tmp_path)
    two, single = read_scalars(tmp_path / "two"), read_scalars(tmp_path / "one")
    assert set(two) == set(single)  # every TensorBoard tag
    assert two["learner/optimizer_steps"][1] == [1.0, 1.0, 1.0]  # one optimizer step per iteration
    assert two["learner/weight_version"][1] == [1.0, 2.0, 3.0]
    assert two["rollout/num_samples"][1] == [16.0, 16.0, 16.0]  # whole batches: 4 prompts x 4
    # The same run as one learner's, up to float summation order (shards sum in another order).
    for tag in ("rollout/reward_mean", "policy/entropy", "entropy_flow/lambda_star"):
        assert two[tag][1] == pytest.approx(single[tag][1], rel=1e-3, abs=1e-5), tag
    # A resume with another learner count is refused, naming the field.
    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", "--resume",
                           str(tmp_path / "two" / "checkpoints" / "iter_000003"), "--set", "num_learners=0",
                           "--set", "iterations=4"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "num_learners" in proc.stderr + proc.stdout, proc.stdout[-3000:] + proc.stderr
    resumed = _cli("--resume", str(tmp_path / "two" / "checkpoints" / "iter_000002"), cwd=tmp_path)
    assert "at iteration 2" in resumed
    assert _line(resumed, 3) == _line(straight, 3)


# ---------------------------------------------------------------------------- a learner that dies
def test_a_learner_killed_mid_update_is_an_error_naming_it_within_the_timeout(ray_session):
    import threading
    import time

    from opefo_rllib.algorithms.grpo.grpo import LearnerFailedError

    batch = rollout_batch(make_engine(), prompts=4, group=4)
    group = _group(2, zero_stage=1)
    actors = list(group._workers)

    def slow_update(learner, b=batch):  # rank 1 dies while rank 0 waits in the update's first collective
        time.sleep(2.0 if learner.dp_rank == 1 else 0.0)
        return learner.update_from_rollouts(b, 0)

    killer = threading.Timer(1.0, lambda: ray.kill(actors[1], no_restart=True))
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(LearnerFailedError) as err:
            _rank0_result(group.foreach_learner(slow_update, timeout_seconds=30, healthy_only=False), 2,
                          "the update of iteration 1", 30)
    finally:
        killer.cancel()
        group.shutdown()
    assert time.monotonic() - start < 40
    message = str(err.value)
    assert message.startswith("learner 1 of 2 died during the update of iteration 1"), message


def test_a_users_bpe_model_trains_on_two_zero3_learners_and_resumes(tmp_path):
    """What a user brings: a Qwen2 model with a BPE tokenizer and a chat template, answers up to
    48 tokens, two learners under ZeRO-3 (the 7B recipe's layout), checkpoint and resume."""
    from bpe_fixture import build_bpe_model

    model = build_bpe_model(tmp_path / "qwen2_bpe")
    run = ["--set", f"model_path={model}", "--set", "prompt_format=chat", "--set", "max_new_tokens=48",
           "--set", "prompts_per_batch=4", "--set", "group_size=4", "--set", "ray={num_cpus: 2}", "--set",
           "log_text_every=0", "--set", "eval_every=0", "--set", "eval_before_train=false", "--set", "num_learners=2", "--set", "pipeline=sync",  # ZeRO-3
           "--set", "num_cpus_per_learner=0.25", "--set", "zero_stage=3", "--set", "iterations=2",
           "--set", "checkpoint_every=1", "--set", f"logdir={tmp_path / 'run'}"]
    straight = _cli(*run, cwd=tmp_path)
    resumed = _cli("--resume", str(tmp_path / "run" / "checkpoints" / "iter_000001"), cwd=tmp_path)
    assert "at iteration 1" in resumed
    assert _line(resumed, 2) == _line(straight, 2)


@pytest.mark.parametrize("stage,kl_in", [(2, "loss"), (3, "reward")])
def test_two_learners_make_the_one_learner_update_with_a_kl_penalty(ray_session, stage, kl_in):
    """Each learner scores its shard with its reference (under ZeRO-3 copied from the gathered
    policy); two updates, so the second one has a KL to penalise."""
    kl = {"kl_coef": 0.5, "kl_estimator": "k3", "kl_in": kl_in}
    engine = make_engine()
    one = build_learner(zero_stage=stage, micro_batch_size=5, adam_eps=ADAM_EPS, **kl)
    group = _group(2, zero_stage=stage, **kl)
    try:
        for step in range(2):
            batch = rollout_batch(engine, prompts=6, group=4, seed=step)
            batch["weight_versions"] += step
            m1 = one.update_from_rollouts(batch, step).metrics
            m2 = _on_all(group, lambda learner, b=batch, s=step: learner.update_from_rollouts(b, s).metrics,
                         what="the update")
        w2 = _on_all(group, lambda learner: learner.policy_weights(), what="the weights")
    finally:
        group.shutdown()
    assert m1["kl/mean"] > 1e-4
    for key in ("kl/mean", "kl/max", "entropy_flow/P", "entropy_flow/N", "learner/loss"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-3, abs=1e-6), key
    w1 = one.policy_weights()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_two_lora_learners_make_the_one_learner_update(ray_session):
    lora = {"lora_rank": 4, "lora_alpha": 8.0, "zero_stage": 2}
    batch = rollout_batch(make_engine(), prompts=6, group=4)
    one = build_learner(micro_batch_size=5, adam_eps=ADAM_EPS, **lora)
    m1 = one.update_from_rollouts(batch, 0).metrics
    group = _group(2, **lora)
    try:
        m2 = _on_all(group, lambda learner, b=batch: learner.update_from_rollouts(b, 0).metrics, what="the update")
        a2 = _on_all(group, lambda learner: learner.engine_weights(), what="the adapter")
    finally:
        group.shutdown()
    assert m2["learner/grad_norm"] == pytest.approx(m1["learner/grad_norm"], rel=1e-4) and m1["learner/grad_norm"] > 0
    a1 = one.engine_weights()
    assert set(a2) == set(a1) and all(".lora_" in k for k in a1)
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-6)
