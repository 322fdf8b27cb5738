"""opefo/Arithmetic-v0: generated integer arithmetic, verified exactly (the tiny CPU default).

Problems look like ``"37+45="`` (the default template suits a tiny character-level model) and
the reward is 1 when the last integer of the response equals the exact result. Operators,
operand digit counts, the number of operands and the template are configurable; problems are
drawn from the env's seeded generator, so a seed fixes the whole stream.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from opefo_rllib.envs.base import Problem, TextEnv
from opefo_rllib.envs.extract import extract_answer
from opefo_rllib.envs.verifier import VerifyResult

__all__ = ["ArithmeticEnv", "score_integer_answer"]

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_INT = re.compile(r"^[+-]?\d+$")


def score_integer_answer(response: str, answer: str, order: Sequence[str] = ("boxed", "answer_is", "last_number")
                         ) -> VerifyResult:
    """Reward 1 if the extracted final answer is exactly the integer ``answer`` (no eval)."""
    extracted, extractor = extract_answer(response, order)
    if extracted is None:
        return VerifyResult(reward=0.0, format_ok=False)
    cleaned = extracted.replace(",", "").strip().rstrip(".")
    if not _INT.match(cleaned) or len(cleaned) > 64:
        return VerifyResult(reward=0.0, extracted=extracted[:200], format_ok=False, extractor=extractor)
    correct = int(cleaned) == int(answer)
    return VerifyResult(reward=float(correct), correct=correct, extracted=cleaned, format_ok=True, extractor=extractor)


class ArithmeticEnv(TextEnv):
    """Integer arithmetic problems.

    Args:
        ops: operators to draw from ("+", "-", "*").
        min_digits, max_digits: digit counts of each operand.
        mul_max_digits: digit cap of the right operand of "*" (keeps products learnable).
        num_operands: operands per problem (evaluated left to right with usual precedence).
        template: prompt template with ``{expr}``.
    """

    def __init__(
        self,
        ops: Sequence[str] = ("+", "-", "*"),
        min_digits: int = 1,
        max_digits: int = 2,
        mul_max_digits: int = 1,
        num_operands: int = 2,
        template: str = "{expr}=",
        **kwargs,
    ):
        super().__init__(**kwargs)
        bad = [op for op in ops if op not in _OPS]
        if bad or not ops:
            raise ValueError(f"ArithmeticEnv ops {list(ops)!r}: choose from {sorted(_OPS)}")
        if not 1 <= min_digits <= max_digits <= 18:
            raise ValueError(f"ArithmeticEnv needs 1 <= min_digits <= max_digits <= 18, got {min_digits}, {max_digits}")
        if num_operands < 2:
            raise ValueError(f"ArithmeticEnv num_operands must be >= 2, got {num_operands}")
        if "{expr}" not in template:
            raise ValueError("ArithmeticEnv template must contain {expr}")
        self.ops, self.template = tuple(ops), template
        self.min_digits, self.max_digits, self.mul_max_digits = min_digits, max_digits, max(1, mul_max_digits)
        self.num_operands = num_operands

    def _operand(self, rng: np.random.Generator, max_digits: int) -> int:
        digits = int(rng.integers(self.min_digits, max(self.min_digits, max_digits) + 1))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    def sample_problem(self, rng: np.random.Generator) -> Problem:
        values = [self._operand(rng, self.max_digits)]
        ops = []
        for _ in range(self.num_operands - 1):
            op = self.ops[int(rng.integers(len(self.ops)))]
            ops.append(op)
            values.append(self._operand(rng, min(self.mul_max_digits, self.max_digits) if op == "*" else self.max_digits))
        expr = str(values[0]) + "".join(f"{op}{v}" for op, v in zip(ops, values[1:]))
        return Problem(id=f"arith:{expr}", prompt=self.template.format(expr=expr), answer=str(_evaluate(values, ops)))

    def score(self, problem: Problem, response: str) -> VerifyResult:
        return score_integer_answer(response, problem.answer)


def _evaluate(values: list[int], ops: list[str]) -> int:
    """Evaluate with * before + and -, without eval()."""
    terms, term_ops = [values[0]], []
    for op, v in zip(ops, values[1:]):
        if op == "*":
            terms[-1] = terms[-1] * v
        else:
            terms.append(v)
            term_ops.append(op)
    total = terms[0]
    for op, v in zip(term_ops, terms[1:]):
        total = _OPS[op](total, v)
    return total
