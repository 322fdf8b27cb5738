"""Verifiable-reward text environments (installed as ``opefo_rllib.envs``).

Importing this package registers the built-in environments with Gymnasium and Ray Tune:

    opefo/Arithmetic-v0        generated integer arithmetic (the tiny CPU default)
    opefo/ArithmeticRetry-v0   the same, multi-turn: a wrong answer gets one retry with feedback
    opefo/Countdown-v0         reach a target from given numbers (safe AST evaluation)
    opefo/Math-v0              any dataset with reference answers, verified with math-verify
    opefo/MathTool-v0          the same, multi-turn, with a sandboxed Python tool (envs/sandbox.py)
"""

from opefo_rllib.envs.arithmetic import ArithmeticEnv, score_integer_answer
from opefo_rllib.envs.base import Problem, RetryWithFeedback, TextEnv, UnicodeText
from opefo_rllib.envs.countdown import CountdownEnv, evaluate_countdown, score_countdown
from opefo_rllib.envs.datasets import BadRow, DatasetError, LoadedProblems, ProblemDataset, load_problems
from opefo_rllib.envs.extract import extract_answer
from opefo_rllib.envs.math_env import DEFAULT_MATH_TEMPLATE, MathEnv
from opefo_rllib.envs.math_tool import DEFAULT_TOOL_TEMPLATE, MathToolEnv
from opefo_rllib.envs.registry import list_envs, make_env, register_env
from opefo_rllib.envs.verifier import MathVerifier, VerifyResult, math_equal, shared_math_verifier


def _arithmetic_retry(max_retries: int = 1, **kwargs) -> RetryWithFeedback:
    return RetryWithFeedback(ArithmeticEnv(**kwargs), max_retries=max_retries)


register_env("opefo/Arithmetic-v0", ArithmeticEnv)
register_env("opefo/ArithmeticRetry-v0", _arithmetic_retry)
register_env("opefo/Countdown-v0", CountdownEnv)
register_env("opefo/Math-v0", MathEnv)
register_env("opefo/MathTool-v0", MathToolEnv)

__all__ = [
    "ArithmeticEnv",
    "BadRow",
    "CountdownEnv",
    "DEFAULT_MATH_TEMPLATE",
    "DEFAULT_TOOL_TEMPLATE",
    "DatasetError",
    "LoadedProblems",
    "MathEnv",
    "MathToolEnv",
    "MathVerifier",
    "Problem",
    "ProblemDataset",
    "RetryWithFeedback",
    "TextEnv",
    "UnicodeText",
    "VerifyResult",
    "evaluate_countdown",
    "extract_answer",
    "list_envs",
    "load_problems",
    "make_env",
    "math_equal",
    "register_env",
    "score_countdown",
    "score_integer_answer",
    "shared_math_verifier",
]
