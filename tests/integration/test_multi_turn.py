"""Multi-turn episodes in training: the learner's gradient on real two-turn episodes is OPEFO's on
the model's tokens alone, an episode whose turns span two weight versions is refused in strict
mode, and opefo/ArithmeticRetry-v0 trains through `opefo train` with the streaming (default) and
async pipelines (the tiny model), evaluates multi-turn, and resumes to the straight run."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from learner_fixtures import build_learner, make_engine
from sampled import keep_sampled_batches
from opefo_rllib.algorithms.grpo.grpo_torch_learner import StaleBatchError
from opefo_rllib.envs import ArithmeticEnv, RetryWithFeedback
from opefo_rllib.fleet.engine import SamplingConfig
from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
from opefo_rllib.models.tokenizer import load_tokenizer
from opefo_rllib.rollout.batch import learner_batch
from opefo_rllib.rollout.episodes import EpisodeStepper, episode_limits
from opefo_rllib.rollout.prompts import PromptBuilder

pytestmark = pytest.mark.slow

TOK = load_tokenizer(TINY_DEFAULT_PATH)
SETTINGS = SimpleNamespace(prompt_format="raw", system_prompt=None, max_prompt_tokens=None, on_long_prompt="skip",
                           max_turns=None, max_episode_tokens=None, episode_reward="final", env_step_workers=2)
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=6)


def _play(engine, between=None, prompts=4, group=4):
    """Episodes of the retry env sampled by ``engine``: turn 1 of every episode, then ``between()``
    (e.g. a weight update), then turn 2 of those still running. Returns (episodes, batch)."""
    env = RetryWithFeedback(ArithmeticEnv(), max_retries=1)
    builder = PromptBuilder(TOK, SETTINGS)
    stepper = EpisodeStepper(builder, episode_limits(env, SETTINGS), 2)
    env.seed_problems(0)
    problems = env.sample_problems(prompts)
    prompt_ids = [builder.encode(p.prompt, p.id) for p in problems]
    episodes = stepper.start(env, problems, list(range(prompts)), prompt_ids, [""] * prompts, group)
    first = engine.generate(prompt_ids, group, SAMPLING, seed=0)
    stepper.advance(episodes, [r for g in first for r in g])
    if between is not None:
        between()
    running = [ep for ep in episodes if not ep.done]
    second = engine.generate([ep.context() for ep in running], 1, SAMPLING, seed=1)
    stepper.advance(running, [g[0] for g in second])
    stepper.close()
    rollouts = [ep.to_rollout("final") for ep in episodes]
    for r in rollouts[::3]:  # mixed rewards in every group, so the advantages are not all zero
        r.reward = 1.0 - r.reward
    return episodes, learner_batch(rollouts, TOK.pad_token_id, "grpo")


def test_the_learner_trains_the_model_tokens_of_two_turn_episodes_and_nothing_else():
    from opefo_rllib.core import opefo_loss

    engine = make_engine()
    episodes, batch = _play(engine)
    assert any(ep.turns == 2 for ep in episodes) and any(0 in ep.action_mask for ep in episodes)
    learner = build_learner(micro_batch_size=5)
    flow, forwards = learner.flow_pass(batch)
    # The batch's flows P and N sum the model's tokens alone: every token with the mask, none of the env's.
    model = batch["response_mask"].bool()
    assert int(flow.totals.n_tokens) == int(model.sum()) == sum(sum(ep.action_mask) for ep in episodes)
    assert float(flow.totals.P) == pytest.approx(float(flow.delta[model].clamp(min=0).sum()), rel=1e-5)
    assert float(flow.totals.N) == pytest.approx(float(-flow.delta[model].clamp(max=0).sum()), rel=1e-5)
    weights = learner.token_weights(batch, flow)
    learner.accumulate_gradients(batch, flow, weights, torch.arange(len(batch["rewards"])), torch.Generator(), forwards)
    module = learner._module[DEFAULT_MODULE_ID]
    params = dict(module.lm.named_parameters())
    from_learner = {k: p.grad.detach().clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    # By hand: OPEFO's loss over the model's tokens only (the response mask the episodes built).
    stats = module.sequence_token_stats(batch["input_ids"], batch["attention_mask"], 1.0)
    loss, _ = opefo_loss(stats.logp, stats.entropy, batch["advantages"], batch["response_mask"], stats.expected_s)
    loss.backward()
    for k, p in params.items():
        torch.testing.assert_close(from_learner[k], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert sum(float(g.abs().sum()) for g in from_learner.values()) > 0
    # The engine sampled every model token of every turn from the learner's policy: the gap is ~0
    # (the env's tokens, with no sampling log-prob, would make it large were they not masked).
    metrics = build_learner().update_from_rollouts(batch, step=0).metrics
    assert metrics["rollout/logprob_gap_max"] < 1e-4, metrics["rollout/logprob_gap_max"]


def test_strict_on_policy_refuses_an_episode_whose_turns_span_two_versions():
    engine = make_engine()
    learner = build_learner()
    _, warmup = _play(engine)
    learner.update_from_rollouts(warmup, step=0)  # the learner is at version 1 now

    def sync():
        engine.load_weights(learner.policy_weights(), learner.weight_version)

    episodes, mixed = _play(make_engine(), between=None)  # turn 1 and 2 by version 0
    with pytest.raises(StaleBatchError, match="weight versions \\[0\\].*version 1"):
        learner.update_from_rollouts(mixed, step=1)
    episodes, spanning = _play(engine, between=sync)  # turn 1 by version 0, turn 2 by version 1
    assert any(ep.versions == [0, 1] for ep in episodes)
    with pytest.raises(StaleBatchError, match="weight versions \\[0\\].*version 1"):  # an episode's oldest turn
        learner.update_from_rollouts(spanning, step=1)
    _, current = _play(engine)  # every turn by version 1: trained
    assert learner.update_from_rollouts(current, step=1).metrics["rollout/logprob_gap_max"] < 1e-4


SMALL = ["--set", "env=opefo/ArithmeticRetry-v0", "--set", "prompts_per_batch=4", "--set", "group_size=4",
         "--set", "max_new_tokens=6", "--set", "ray={num_cpus: 2}", "--set", "log_text_every=0"]
RETRY_EVAL = "eval_tasks=[{name: retry, task: opefo/ArithmeticRetry-v0, num_problems: 8, samples: 2, " \
             "pass_k: [1, 2], greedy: true}]"


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _scalars(run: Path) -> dict[str, dict[int, float]]:
    from opefo_rllib.evaluation.compare import read_scalars

    return {tag: dict(zip(steps, values)) for tag, (steps, values) in read_scalars(run / "tensorboard").items()}


def _iteration_line(stdout: str, i: int) -> str:
    line = next(line for line in stdout.splitlines() if line.strip().startswith(f"iter {i:4d}/"))
    return line.split("s/it")[0].rsplit(" ", 1)[0]


def test_the_retry_env_trains_evaluates_multi_turn_and_resumes_the_straight_run(tmp_path):
    straight = _cli(*SMALL, "--set", "iterations=3", "--set", "checkpoint_every=2", "--set", RETRY_EVAL,
                    "--set", "eval_every=3", "--logdir", str(tmp_path / "run"), cwd=tmp_path)
    s = _scalars(tmp_path / "run")
    assert sorted(s["episode/turns_mean"]) == [1, 2, 3]
    assert all(1 < v <= 2 for v in s["episode/turns_mean"].values())  # wrong answers got their retry
    assert all(0 < v < 1 for v in s["episode/env_token_frac"].values())
    # The default pipeline (streaming): every turn on-policy to the token, env tokens masked.
    assert max(s["rollout/logprob_gap_max"].values()) < 1e-4 and max(s["rollout/staleness_max"].values()) == 0
    assert s["episode/cut_frac"][1] == 0.0 and s["learner/weight_version"][3] == 3
    # Evaluation plays episodes too: before training and at iteration 3.
    assert sorted(s["eval/retry/greedy_acc"]) == [0, 3]
    resumed = _cli("--resume", str(tmp_path / "run" / "checkpoints" / "iter_000002"), cwd=tmp_path)
    assert "at iteration 2" in resumed
    assert _iteration_line(resumed, 3) == _iteration_line(straight, 3)


def test_the_retry_env_trains_with_the_async_pipeline(tmp_path):
    # (The streaming pipeline is the default: the test above.)
    _cli(*SMALL, "--set", "strict_on_policy=false", "--set", "pipeline=async", "--set", "iterations=2",
         "--set", "eval_every=0", "--set", "eval_before_train=false", "--logdir", str(tmp_path / "run"), cwd=tmp_path)
    s = _scalars(tmp_path / "run")
    assert all(v > 1 for v in s["episode/turns_mean"].values()) and len(s["episode/turns_mean"]) == 2
    # One version per episode: async is at most one version behind, whole episodes.
    assert max(s["rollout/staleness_max"].values()) <= 1


def test_the_tool_env_trains_smollm2_two_iterations(ray_session, smollm2_dir, tmp_path):
    """The shipped tool recipe's task (configs/smollm2_tool_cpu.yaml) on SmolLM2 with its chat
    template and its engine (vLLM): episodes call the sandboxed tool, its output comes back as a user
    turn, every model token of every turn is on-policy (the log-prob gap after each weight sync), env
    tokens masked. (The HF engine's multi-turn episodes are the retry tests' above; SmolLM2 on the HF
    engine is test_real_model_training's.)"""
    import yaml

    from opefo_rllib.algorithms.opefo import OPEFOConfig
    import opefo_rllib.configs

    recipe = yaml.safe_load((Path(opefo_rllib.configs.__file__).parent / "smollm2_tool_cpu.yaml").read_text())
    config = (OPEFOConfig()
              .environment("opefo/MathTool-v0", env_config=recipe["env_config"])
              .policy_model(model_path=str(smollm2_dir))
              .generation(prompts_per_batch=2, group_size=2, max_new_tokens=64, prompt_format="chat",
                          temperature=recipe["temperature"], max_episode_tokens=400)
              .fleet(engine="vllm", engine_kwargs={"max_model_len": 1024})
              .training(lr=1e-5, max_tokens_per_micro_batch=2048, micro_batch_size=None)
              .logging(tensorboard_dir=str(tmp_path / "tb")))
    algo = config.build_algo()
    try:
        batches = keep_sampled_batches(algo)
        results = [algo.train() for _ in range(2)]
        tokenizer = algo.env_runner.tokenizer
        assert len(batches) == 2  # one batch an iteration, through the sync pipeline
        called = [r for b in batches for r in b.rollouts if r.info["tool_calls"]]
        for _ in range(3):  # ~3 in 4 episodes call the tool: more batches only if the run's had none
            if called:
                break
            called = [r for r in algo.env_runner.sample().rollouts if r.info["tool_calls"]]
    finally:
        algo.stop()
    tolerance = 1e-3  # fp32 both sides; vLLM's own CPU kernels
    for r in results:
        assert r["rollout/num_samples"] == 4 and 1 <= r["episode/turns_mean"] <= 3
        assert r["rollout/logprob_gap_max"] < tolerance, r["rollout/logprob_gap_max"]
    assert sum(r["episode/tool_calls_mean"] for r in results) > 0  # the model calls the tool (~1.5 a episode)
    assert called
    for r in called:
        text = tokenizer.decode(r.response_ids, skip_special_tokens=False)
        assert "<|im_start|>user\n" in text and "```output" in text  # the tool's answer, as a user turn
        assert 0 in r.action_mask and len(r.action_mask) == len(r.response_ids) == len(r.sampling_logp)
        env_tokens = [t for t, m in zip(r.response_ids, r.action_mask) if not m]
        assert "```output" in tokenizer.decode(env_tokens, skip_special_tokens=False)
