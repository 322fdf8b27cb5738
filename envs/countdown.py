"""opefo/Countdown-v0: reach a target from given numbers with + - * / and parentheses.

The response's expression (in ``\\boxed{}``, after "the answer is", or on its last line) is
parsed with ``ast`` and walked by hand: only integer literals, the four binary operators and
parentheses are accepted. Names, attribute access, calls, ``**``, unary minus, comprehensions
and everything else are rejected, never evaluated. Arithmetic is exact (``fractions.Fraction``),
and each given number may be used at most as often as it was given.
"""

from __future__ import annotations

import ast
import collections
import operator
from fractions import Fraction

import numpy as np

from opefo_rllib.envs.base import Problem, TextEnv
from opefo_rllib.envs.extract import extract_answer
from opefo_rllib.envs.verifier import VerifyResult

__all__ = ["CountdownEnv", "CountdownError", "evaluate_countdown", "score_countdown"]

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
MAX_EXPRESSION_CHARS = 300


class CountdownError(ValueError):
    """The expression is not an allowed Countdown expression."""


def _walk(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _walk(node.left, used), _walk(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise CountdownError("division by zero")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    raise CountdownError(f"not allowed in a Countdown expression: {type(node).__name__}")


def evaluate_countdown(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of an expression of integers, + - * / and parentheses, and the numbers used."""
    expr = expression.strip().replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/")
    expr = expr.replace("×", "*").replace("÷", "/").replace("\\left", "").replace("\\right", "")
    if "=" in expr:  # "3*7+25 = 46": keep the side that is an expression
        expr = expr.split("=")[0]
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise CountdownError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CountdownError(f"not an expression: {type(e).__name__}") from None
    used: list[int] = []
    try:
        value = _walk(tree.body, used)
    except RecursionError:
        raise CountdownError("expression nested too deeply") from None
    return value, used


def score_countdown(response: str, numbers: list[int], target: int, use_all: bool = False) -> VerifyResult:
    """Reward 1 if the response's expression uses the numbers as allowed and equals target."""
    extracted, extractor = extract_answer(response, ("boxed", "answer_is"))
    if extracted is None:
        lines = [ln for ln in response.strip().splitlines() if ln.strip()]
        extracted, extractor = (lines[-1].strip(), "last_line") if lines else (None, None)
    if extracted is None:
        return VerifyResult(reward=0.0)
    try:
        value, used = evaluate_countdown(extracted)
    except CountdownError as e:
        return VerifyResult(reward=0.0, extracted=extracted[:200], extractor=extractor, error=str(e))
    available, wanted = collections.Counter(numbers), collections.Counter(used)
    if any(wanted[n] > available[n] for n in wanted):
        return VerifyResult(reward=0.0, extracted=extracted[:200], format_ok=True, extractor=extractor,
                            error="uses a number not given, or more often than given")
    if use_all and wanted != available:
        return VerifyResult(reward=0.0, extracted=extracted[:200], format_ok=True, extractor=extractor,
                            error="does not use every number")
    correct = value == target
    return VerifyResult(reward=float(correct), correct=correct, extracted=extracted[:200], format_ok=True,
                        extractor=extractor)


class CountdownEnv(TextEnv):
    """Countdown: combine the given numbers to reach the target.

    Args:
        num_numbers: how many numbers are given.
        max_number: numbers are drawn from 1..max_number.
        use_all: whether every number must be used (default: each at most once).
        template: prompt template with ``{numbers}`` and ``{target}``.
    """

    def __init__(
        self,
        num_numbers: int = 4,
        max_number: int = 25,
        use_all: bool = False,
        template: str = ("Using the numbers {numbers}, write an expression that equals {target}. "
                         "Use + - * / and parentheses, each number at most once. "
                         "Put the final expression within \\boxed{{}}."),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 2 <= num_numbers <= 8:
            raise ValueError(f"CountdownEnv num_numbers must be in 2..8, got {num_numbers}")
        if max_number < 2:
            raise ValueError(f"CountdownEnv max_number must be >= 2, got {max_number}")
        self.num_numbers, self.max_number, self.use_all, self.template = num_numbers, max_number, use_all, template

    def sample_problem(self, rng: np.random.Generator) -> Problem:
        numbers = [int(x) for x in rng.integers(1, self.max_number + 1, size=self.num_numbers)]
        # Build a reachable positive integer target from a random subset, left to right.
        while True:
            k = self.num_numbers if self.use_all else int(rng.integers(2, self.num_numbers + 1))
            order = [numbers[i] for i in rng.permutation(self.num_numbers)[:k]]
            value = Fraction(order[0])
            for n in order[1:]:
                op = "+-*/"[int(rng.integers(4))]
                if op == "/" and value % n != 0:
                    op = "+"
                value = {"+": value + n, "-": value - n, "*": value * n, "/": value / n}[op]
            if value > 0 and value.denominator == 1:
                break
        target = int(value)
        return Problem(id=f"countdown:{','.join(map(str, numbers))}->{target}",
                       prompt=self.template.format(numbers=numbers, target=target),
                       answer=str(target), meta={"numbers": numbers, "target": target})

    def score(self, problem: Problem, response: str) -> VerifyResult:
        return score_countdown(response, problem.meta["numbers"], problem.meta["target"], self.use_all)
