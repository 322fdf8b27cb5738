"""Several learners: RLlib's remote learner group (Ray Train workers, one gloo group) with
DeepSpeed data parallel over it. Two learners must make the update one learner makes."""

import pytest
import ray
import torch

pytestmark = pytest.mark.slow

from learner_fixtures import _build_learner, _rollout_batch, make_engine  # noqa: E402
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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_learners_make_the_one_learner_update(ray_session, stage):
    batch = _rollout_batch(make_engine(), prompts=6, group=4)
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 2  # uneven rows: shards differ in rows, not only in tokens
    one = _build_learner(zero_stage=stage, micro_batch_size=5, adam_eps=ADAM_EPS)
    m1 = one.update_from_rollouts(batch, step=0)
    w1 = one.policy_weights()
    group = _group(2, zero_stage=stage)
    try:
        m2 = _on_all(group, lambda learner, b=batch: learner.update_from_rollouts(b, 0), what="the update")
        w2 = _on_all(group, lambda learner: learner.policy_weights(), what="the weights")
        ranks = _on_all(group, lambda learner: (learner.dp_world, learner.dp_rank) if learner.dp_rank else None)
        versions = [r.get() for r in group.foreach_learner(lambda learner: learner.weight_version)]
    finally:
        group.shutdown()
    assert ranks == (2, 1) and versions == [1, 1]
    for key in ("entropy_flow/lambda_star", "entropy_flow/P", "entropy_flow/N", "policy/entropy", "learner/loss",
                "learner/grad_norm", "entropy_flow/realized_change"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key
    assert m2["learner/optimizer_steps"] == 1
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(w1[k], w) for k, w in _build_learner().policy_weights().items())  # it moved
