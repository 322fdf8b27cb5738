"""opefo/MathTool-v0: math problems the model may solve with a Python interpreter, turn by turn.

Each turn the model either writes a fenced ```python block -- the env runs it in the process
sandbox (``sandbox.py``) and the observation is its output, to append to the conversation -- or
answers: a turn without code, or the env's last allowed turn, is the final answer, verified with
math-verify like ``opefo/Math-v0`` (same data files, problems, template and verifier). Tool turns
earn 0; the episode's reward is the verdict on the answer.

Whatever the model writes, ``step`` does not raise: code that loops, floods, crashes or attacks
the sandbox comes back as an observation (its output tail, "Timed out after Ns", ...). Episode
state lives only in what ``reset`` sets (``problem``, ``turn``), so the trainer may step shallow
copies of one env concurrently in threads.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from opefo_rllib.envs.base import Problem, TextEnv
from opefo_rllib.envs.math_env import MathEnv
from opefo_rllib.envs.sandbox import SandboxLimits, SandboxResult, run_python, sandbox_backend

__all__ = ["MathToolEnv", "DEFAULT_TOOL_TEMPLATE", "extract_code", "tool_observation"]

DEFAULT_TOOL_TEMPLATE = (
    "{problem}\n\n"
    "You may use a Python interpreter. To run code, write one ```python code block and end your turn; "
    "what the code prints comes back in an ```output block. The standard library, numpy and sympy are "
    "available; there is no network or file access. When you know the answer, reply without a code "
    "block and put the final answer within \\boxed{{}}."
)
ERROR_TAIL_CHARS = 500  # of stderr, after a failed run: the end of a traceback says what went wrong

# The first fenced python block; its closing fence may be missing when generation stopped at it.
_CODE_BLOCK = re.compile(r"^```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:^```|\Z)", re.MULTILINE | re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The code of the first ```python block in ``text``, or None if it has none."""
    match = _CODE_BLOCK.search(text)
    return match.group(1) if match else None


def tool_observation(result: SandboxResult, timeout_s: float) -> str:
    """The ```output block of one run: stdout, then why it failed (timeout, the error's tail)."""
    lines = [result.stdout.rstrip("\n")]
    if result.timed_out:
        lines.append(f"Timed out after {timeout_s:g}s")
    elif result.exit_code is None:
        lines.append("Output limit reached: the program was stopped")
    elif not result.ok:
        lines.append(result.stderr.rstrip("\n")[-ERROR_TAIL_CHARS:] or f"Exited with code {result.exit_code}")
    body = "\n".join(line for line in lines if line)
    return f"```output\n{body}\n```\n"


class MathToolEnv(MathEnv):
    """Math with a sandboxed Python tool (multi-turn).

    Args:
        max_turns: turns per episode; the last one is the answer even if it has code.
        sandbox: ``SandboxLimits`` fields (timeout_s, cpu_s, memory_mb, file_size_mb,
            max_processes, max_output_chars) for each run of the model's code.
        template: prompt template with ``{problem}`` (default: ``DEFAULT_TOOL_TEMPLATE``).
        source, source_config: instead of data files, pose the problems of another registered env
            (e.g. ``opefo/Arithmetic-v0`` with its ``env_config``): its prompt is ``{problem}``, its
            answer the reference math-verify checks against.
        data_files, problems, ...: as ``MathEnv``.

    ``turn_end``: a turn that opens a python block ends at the block's closing fence (the trainer
    drops what the model wrote after it, e.g. an ```output block of its own invention).

    The observation of a tool turn is only the new text (the ```output block), not the
    conversation so far; a final answer's observation is "".
    """

    def __init__(
        self,
        data_files: str | Sequence[str] | None = None,
        problems: Sequence[Problem] | None = None,
        template: str = DEFAULT_TOOL_TEMPLATE,
        max_turns: int = 4,
        sandbox: dict | None = None,
        source: str | None = None,
        source_config: dict | None = None,
        **kwargs,
    ):
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"MathToolEnv max_turns must be an int >= 1, got {max_turns!r}")
        self.sandbox_limits = _limits(sandbox)
        self.source = _source_env(source, source_config, data_files, problems)
        if self.source is not None:  # problems drawn from the source env: no dataset to load
            placeholder = [Problem(id="unused", prompt="", answer="0")]
            super().__init__(problems=placeholder, template=template, **kwargs)
            self.dataset = None
        else:
            super().__init__(data_files=data_files, problems=problems, template=template, **kwargs)
        self.max_turns = max_turns
        room = self.observation_space.max_length
        if self.sandbox_limits.max_output_chars + ERROR_TAIL_CHARS + 200 > room:
            raise ValueError(f"MathToolEnv sandbox max_output_chars={self.sandbox_limits.max_output_chars} does not "
                             f"fit an observation of max_prompt_chars={room}; raise max_prompt_chars or lower it")
        self.sandbox_backend = sandbox_backend()  # an env that cannot run its tool fails here, not mid-run

    def seed_problems(self, seed: int) -> None:
        if self.source is None:
            return super().seed_problems(seed)
        TextEnv.seed_problems(self, seed)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if self.source is not None:
            return TextEnv.reset(self, seed=seed, options=options)
        return super().reset(seed=seed, options=options)

    def sample_problem(self, rng: np.random.Generator) -> Problem:
        if self.source is None:
            return super().sample_problem(rng)
        p = self.source.sample_problem(rng)
        return Problem(id=p.id, prompt=self.template.format(problem=p.prompt), answer=p.answer, meta=p.meta)

    def turn_end(self, text: str) -> int | None:
        """A turn with a python block ends at its closing fence (and the newline after it)."""
        match = _CODE_BLOCK.search(text)
        if match is None or not match.group(0).rstrip().endswith("```"):
            return None
        end = match.end()
        return end + 1 if text[end:end + 1] == "\n" else end

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self.problem is None:
            raise RuntimeError("MathToolEnv.step() called before reset()")
        response = self._clip(action)
        code = extract_code(response) if self.turn + 1 < self.max_turns else None
        self.turn += 1
        if code is None:
            result = self.score(self.problem, response)
            self._last_text += response
            return "", float(result.reward), True, False, {**self._info(), **result.as_info(), "tool_call": False}
        run = self._run_tool(code)
        observation = ("" if response.endswith("\n") else "\n") + tool_observation(run, self.sandbox_limits.timeout_s)
        self._last_text += response + observation  # rebound, not mutated: copies keep their own
        info = {**self._info(), "tool_call": True, "tool_error": not run.ok, "tool_timeout": run.timed_out,
                "tool_truncated": run.truncated, "tool_seconds": run.seconds}
        return observation, 0.0, False, False, info

    def _run_tool(self, code: str) -> SandboxResult:
        try:
            return run_python(code, self.sandbox_limits)
        except Exception as e:  # the sandbox itself failed: the model sees it, the run goes on
            return SandboxResult(stdout="", stderr=f"sandbox error: {type(e).__name__}: {e}"[:ERROR_TAIL_CHARS],
                                 exit_code=-1, timed_out=False, truncated=False, seconds=0.0)


def _source_env(source: str | None, config: dict | None, data_files, problems) -> TextEnv | None:
    """The env whose problems a MathToolEnv poses (None: its own data files or problems)."""
    if source is None:
        if config:
            raise ValueError("MathToolEnv source_config is set without source")
        if data_files is None and problems is None:
            raise ValueError("MathToolEnv needs data_files= (JSONL / Parquet / CSV / HF dataset), problems= or source= "
                             "(another env's problems, e.g. source: opefo/Arithmetic-v0; configs/smollm2_tool_cpu.yaml)")
        return None
    if data_files is not None or problems is not None:
        raise ValueError("MathToolEnv takes source= or data_files= / problems=, not both")
    from opefo_rllib.envs.registry import make_env

    return make_env(source, **dict(config or {}))


def _limits(sandbox: dict | None) -> SandboxLimits:
    if sandbox is None:
        return SandboxLimits()
    if not isinstance(sandbox, dict):
        raise ValueError(f"MathToolEnv sandbox must be a dict of SandboxLimits fields, got {type(sandbox).__name__}")
    fields = [f.name for f in dataclasses.fields(SandboxLimits)]
    unknown = sorted(set(sandbox) - set(fields))
    if unknown:
        raise ValueError(f"MathToolEnv sandbox: unknown keys {unknown}; valid: {fields}")
    return SandboxLimits(**sandbox)
