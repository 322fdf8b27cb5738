"""Text environments: Gymnasium conformance, registry, tasks, multi-turn, batch API."""

from fractions import Fraction
from pathlib import Path

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

from opefo_rllib.envs import (
    ArithmeticEnv,
    CountdownEnv,
    MathEnv,
    MathVerifier,
    Problem,
    RetryWithFeedback,
    TextEnv,
    VerifyResult,
    evaluate_countdown,
    list_envs,
    make_env,
    register_env,
    score_countdown,
)
from opefo_rllib.envs.countdown import CountdownError
from paths import SHARED_BENCHMARKS

BENCHMARKS = SHARED_BENCHMARKS
ENV_KWARGS = {"opefo/Math-v0": {"data_files": str(BENCHMARKS / "gsm8k_test.jsonl")},
              "opefo/MathTool-v0": {"data_files": str(BENCHMARKS / "gsm8k_test.jsonl")}}


@pytest.mark.parametrize("name", list_envs())
def test_check_env_passes_for_every_registered_env(name):
    env = make_env(name, **ENV_KWARGS.get(name, {}))
    check_env(env, skip_render_check=False)
    obs, info = env.reset(seed=3)
    assert isinstance(obs, str) and obs and "task_id" in info


def test_builtins_are_registered_with_gymnasium_and_ray_tune():
    # In a fresh interpreter: importing the package is all it takes (Ray itself loads only later).
    import subprocess
    import sys

    code = """
import sys
import gymnasium as gym
import opefo_rllib.envs
assert "ray" not in sys.modules
from ray.tune.registry import ENV_CREATOR, _global_registry
for name in ("opefo/Arithmetic-v0", "opefo/Countdown-v0", "opefo/Math-v0", "opefo/ArithmeticRetry-v0",
             "opefo/MathTool-v0"):
    assert name in gym.registry, name
    assert _global_registry.contains(ENV_CREATOR, name), name
env = _global_registry.get(ENV_CREATOR, "opefo/Arithmetic-v0")({"max_digits": 1, "ops": ["+"]})
obs, _ = env.reset(seed=0)
assert type(env).__name__ == "ArithmeticEnv" and len(obs) == 4, obs  # "a+b="
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_reset_with_seed_is_deterministic_and_seeds_differ():
    env = make_env("opefo/Arithmetic-v0")
    first = [env.reset(seed=5)[0] for _ in range(1)] + [env.reset()[0] for _ in range(5)]
    again = [env.reset(seed=5)[0] for _ in range(1)] + [env.reset()[0] for _ in range(5)]
    assert first == again
    assert [env.reset(seed=6)[0]] + [env.reset()[0] for _ in range(5)] != first


def test_arithmetic_answers_are_exact_and_configurable():
    env = ArithmeticEnv(ops=("*",), min_digits=2, max_digits=2, mul_max_digits=2, num_operands=3, template="Q: {expr}\nA:")
    for p in env.sample_problems(50):
        expr = p.prompt[3:-3]
        a, b, c = (int(x) for x in expr.split("*"))
        assert int(p.answer) == a * b * c and all(10 <= x <= 99 for x in (a, b, c))
    p = Problem(id="x", prompt="3+4*2=", answer="11")
    assert env.score(p, "11").reward == 1.0
    assert env.score(p, "The answer is 11.").reward == 1.0
    assert env.score(p, "14").reward == 0.0
    assert env.score(p, "eleven").format_ok is False
    with pytest.raises(ValueError, match="ops"):
        ArithmeticEnv(ops=("**",))


def test_arithmetic_precedence_without_eval():
    from opefo_rllib.envs.arithmetic import _evaluate

    assert _evaluate([3, 4, 2, 5], ["+", "*", "-"]) == 3 + 4 * 2 - 5
    assert _evaluate([7, 2, 3], ["-", "-"]) == 2


def test_step_returns_verification_details():
    env = make_env("opefo/Arithmetic-v0")
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.problem.answer)
    assert (obs, reward, terminated, truncated) == ("", 1.0, True, False)
    for key in ("extracted", "correct", "format_ok", "timed_out", "error", "task_id"):
        assert key in info
    with pytest.raises(RuntimeError, match="before reset"):
        make_env("opefo/Countdown-v0").step("1")


def test_multi_turn_retry_gives_one_retry_with_feedback():
    env = make_env("opefo/ArithmeticRetry-v0")
    prompt, _ = env.reset(seed=1)
    assert env.max_turns == 2
    obs, reward, terminated, _, info = env.step("wrong")
    # The observation is the new text only (the trainer keeps the conversation); render() has it all.
    assert not terminated and reward == 0.0 and "not correct" in obs and "wrong" not in obs
    env.render_mode = "ansi"
    assert env.render() == prompt + "wrong" + obs
    obs, reward, terminated, _, _ = env.step(env.problem.answer)
    assert terminated and reward == 1.0 and obs == ""
    env.reset(seed=1)
    env.step("wrong")
    _, reward, terminated, _, _ = env.step("still wrong")
    assert terminated and reward == 0.0
    env.reset(seed=2)
    _, reward, terminated, _, _ = env.step(env.problem.answer)  # right the first time
    assert terminated and reward == 1.0


def test_new_episode_is_an_own_env_reset_on_the_problem():
    env = make_env("opefo/ArithmeticRetry-v0")
    env.seed_problems(0)
    first, second = env.sample_problems(2)
    a, b = env.new_episode(first), env.new_episode(second)
    assert a.problem == first and b.problem == second and a.turn == b.turn == 0
    a.step("wrong")  # one episode's state moves, the other's does not
    assert (a.turn, b.turn) == (1, 0)
    assert b.step(second.answer)[1:3] == (1.0, True)
    assert a.step(first.answer)[1:3] == (1.0, True)


def test_retry_discount_scales_late_rewards():
    env = RetryWithFeedback(ArithmeticEnv(), max_retries=2, retry_discount=0.5)
    env.reset(seed=0)
    env.step("x")
    env.step("y")
    assert env.step(env.problem.answer)[1] == 0.25


def test_batch_api_scores_many_responses():
    env = CountdownEnv(num_numbers=3, max_number=9)
    env.reset(seed=4)
    problems = env.sample_problems(6)
    responses = ["\\boxed{" + "+".join(map(str, p.meta["numbers"])) + "}" for p in problems]
    results = env.score_batch(problems, responses)
    for p, r in zip(problems, results):
        assert r.reward == float(sum(p.meta["numbers"]) == p.meta["target"])
    with pytest.raises(ValueError, match="problems but"):
        env.score_batch(problems, responses[:-1])


def test_countdown_targets_are_reachable():
    import itertools

    env = CountdownEnv(num_numbers=3, max_number=10)
    env.reset(seed=0)
    for p in env.sample_problems(20):
        nums, target = p.meta["numbers"], p.meta["target"]
        values = set()
        for perm in itertools.permutations(nums):
            for r in range(2, 4):
                for ops in itertools.product("+-*/", repeat=r - 1):
                    # left to right, as the generator builds it
                    expr = "(" * (r - 1) + str(perm[0]) + "".join(f"{o}{n})" for o, n in zip(ops, perm[1:r]))
                    try:
                        values.add(evaluate_countdown(expr)[0])
                    except CountdownError:
                        pass
        assert Fraction(target) in values, p


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hi')", "x + 1", "(3).real", "abs(-3)", "2 ** 10", "-3 + 5",
    "[1, 2]", "3 if 1 else 2", "lambda: 1", "1 + 2; 3", "True + 2", "3.5 + 1",
])
def test_countdown_rejects_anything_but_arithmetic(expr):
    with pytest.raises(CountdownError):
        evaluate_countdown(expr)
    assert score_countdown(f"\\boxed{{{expr}}}", [1, 2, 3, 5, 10], 4).reward == 0.0


def test_countdown_scoring_rules():
    nums = [3, 7, 25, 50]
    assert score_countdown("\\boxed{(50 - 25) * 3 + 7}", nums, 82).reward == 1.0
    assert score_countdown("so the answer is 50/25*7 = 14", nums, 14).reward == 1.0
    assert score_countdown("\\boxed{7 \\times 3}", nums, 21).reward == 1.0
    assert score_countdown("\\boxed{7 * 7}", nums, 49).error.startswith("uses a number")
    assert score_countdown("\\boxed{8 * 2}", nums, 16).reward == 0.0
    assert score_countdown("\\boxed{50 / (7 - 7)}", [50, 7, 7], 1).error == "division by zero"
    assert score_countdown("\\boxed{3 + 7}", nums, 10, use_all=True).reward == 0.0
    assert evaluate_countdown("50 / 3")[0] == Fraction(50, 3)  # exact, not float
    deep = "(" * 5000 + "1" + ")" * 5000
    assert score_countdown(deep, [1], 1).reward == 0.0


def test_math_env_poses_dataset_problems_with_the_template():
    v = MathVerifier(num_workers=1)
    try:
        env = MathEnv(data_files=str(BENCHMARKS / "gsm8k_test.jsonl"), verifier=v, seed=0)
        prompt, info = env.reset(seed=0)
        assert prompt.endswith("output the final answer within \\boxed{}.") and info["task_id"].startswith("gsm8k-test-")
        answer = env.problem.answer
        assert env.step(f"\\boxed{{{answer}}}")[1] == 1.0
        problems = env.sample_problems(3)
        results = env.score_batch(problems, [f"#### {p.answer}" for p in problems[:2]] + ["#### -1"])
        assert [r.reward for r in results] == [1.0, 1.0, 0.0]
    finally:
        v.close()
    with pytest.raises(ValueError, match="data_files"):
        MathEnv()


def test_subclassing_textenv_is_enough_for_a_new_task():
    class Echo(TextEnv):
        def sample_problem(self, rng):
            word = "".join(rng.choice(list("abc"), size=3))
            return Problem(id=word, prompt=f"say {word}:", answer=word)

        def score(self, problem, response):
            ok = response.strip() == problem.answer
            return VerifyResult(reward=float(ok), correct=ok, extracted=response.strip(), format_ok=True)

    register_env("test/Echo-v0", Echo)
    env = gym.make("test/Echo-v0").unwrapped
    check_env(env)
    _, info = env.reset(seed=0)
    assert env.step(info["task_id"])[1] == 1.0
    assert "test/Echo-v0" in list_envs()
