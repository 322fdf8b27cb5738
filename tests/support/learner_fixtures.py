"""Shared by the learner tests: a learner built from OPEFOConfig (no Ray actors), the tiny
model's HF engine, and a verified, grouped rollout batch with mixed rewards."""

import numpy as np
from opefo_rllib.core import group_advantages
from opefo_rllib.algorithms.opefo import OPEFOConfig
from opefo_rllib.envs import ArithmeticEnv
from ray.rllib.core import DEFAULT_MODULE_ID

from opefo_rllib.fleet.engine import SamplingConfig
from opefo_rllib.fleet.hf_engine import HFEngine
from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
from opefo_rllib.models.tokenizer import CharTokenizer
from opefo_rllib.rollout.batch import Rollout, collate

TOK = CharTokenizer.load(TINY_DEFAULT_PATH)


def build_learner(**overrides):
    config = OPEFOConfig()
    for key, value in {"lr": 1e-3, "seed": 0, **overrides}.items():
        setattr(config, key, value)
    env = ArithmeticEnv()
    learner = config.build_learner(spaces={DEFAULT_MODULE_ID: (env.observation_space, env.action_space)})
    return learner


def make_engine() -> HFEngine:
    return HFEngine(str(TINY_DEFAULT_PATH), eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)


def rollout_batch(engine, prompts=6, group=4, seed=0):
    env = ArithmeticEnv()
    rng = np.random.default_rng(seed)
    problems = [env.sample_problem(rng) for _ in range(prompts)]
    ids = [TOK.encode(p.prompt) for p in problems]
    results = engine.generate(ids, group, SamplingConfig(temperature=1.0, max_new_tokens=6), seed=seed)
    rollouts = []
    for k, (p, res_group) in enumerate(zip(problems, results)):
        for res in res_group:
            verdict = env.score(p, TOK.decode(res.response_ids))
            rollouts.append(Rollout(group_id=k, prompt_ids=ids[k], response_ids=res.response_ids,
                                    sampling_logp=res.sampling_logp, reward=verdict.reward,
                                    weight_version=res.weight_version, correct=verdict.correct))
    # Make sure some groups have mixed rewards, so advantages are not all zero.
    for r in rollouts[::3]:
        r.reward = 1.0 - r.reward
    batch = collate(rollouts, TOK.pad_token_id)
    batch["advantages"] = group_advantages(batch["rewards"], batch["group_ids"], "grpo")
    return batch
