"""What to evaluate, and how: ``EvalSpec`` (sampling and metrics of one problem set) and the
``eval_tasks`` entries of a training config. Pure Python, part of the config layer (the sections check ``eval_tasks`` with it).

An ``eval_tasks`` entry is a mapping:

    {name: arith_heldout, task: opefo/Arithmetic-v0, env_config: {}, num_problems: 512,
     samples: 8, pass_k: [1, 8], greedy: true}

with ``task`` (a registered env) or ``data`` (one or more problem files, opefo/Math-v0 semantics).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from opefo_rllib.config.fields import ConfigError

__all__ = ["EvalSpec", "TaskEntry", "GREEDY_TEMPERATURE", "parse_pass_k", "parse_eval_task", "check_eval_tasks"]

# SamplingConfig's temperature 0: every engine decodes the argmax (HF: argmax; vLLM: its own
# greedy mode).
GREEDY_TEMPERATURE = 0.0


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """How one problem set is evaluated.

    Args:
        samples: K responses per problem at ``temperature`` (0: greedy only).
        pass_k: the k of each pass@k, each <= K.
        greedy: also one greedy response per problem (greedy_acc).
        temperature, max_new_tokens: sampling of the K responses.
        seed: sampling seed (the problem set does not depend on it).
        stop_token_ids: ids that end a response besides the model's EOS ids (training's setting).
        chunk_problems: problems per fleet call; verification of one chunk overlaps the next.
    """

    samples: int = 8
    pass_k: tuple[int, ...] = (1, 8)
    greedy: bool = False
    temperature: float = 1.0
    max_new_tokens: int = 8
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    chunk_problems: int = 128

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ConfigError(f"samples = {self.samples}: must be >= 0")
        if self.samples == 0 and not self.greedy:
            raise ConfigError("samples = 0 and no greedy decoding: nothing to evaluate")
        too_big = [k for k in self.pass_k if k > self.samples]
        if too_big:
            raise ConfigError(f"pass@{too_big[0]} needs at least {too_big[0]} samples per problem; samples = "
                              f"{self.samples}")
        if any(k < 1 for k in self.pass_k):
            raise ConfigError(f"pass_k {list(self.pass_k)}: each k must be >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"temperature = {self.temperature}: must be > 0")
        if self.max_new_tokens < 1 or self.chunk_problems < 1:
            raise ConfigError("max_new_tokens and chunk_problems must be >= 1")


def default_pass_k(samples: int) -> list[int]:
    """pass@1 and pass@samples when sampling, none otherwise."""
    return [1, samples] if samples else []


def parse_pass_k(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,8"`` or ``[1, 8]`` -> (1, 8), sorted, duplicates removed."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        ks = sorted({int(k) for k in items if str(k).strip()})
    except ValueError:
        raise ConfigError(f"pass_k {text!r}: expected integers such as 1,8") from None
    return tuple(ks)


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    """One ``eval_tasks`` entry, checked."""

    name: str
    task: str | None
    data: tuple[str, ...]
    env_config: dict
    num_problems: int | None
    spec: EvalSpec


_KEYS = ("name", "task", "data", "env_config", "num_problems", "samples", "pass_k", "greedy")


def parse_eval_task(entry: Any, index: int, temperature: float = 1.0, max_new_tokens: int = 8, seed: int = 0,
                    stop_token_ids: Sequence[int] = ()) -> TaskEntry:
    """Check one ``eval_tasks`` entry; a ConfigError names the entry and the key. The sampling
    arguments are the training run's (an eval task samples like training does)."""
    where = f"eval_tasks[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {list(_KEYS)}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(_KEYS)})")
    task, data = entry.get("task"), entry.get("data")
    if (task is None) == (data is None):
        raise ConfigError(f"{where}: give exactly one of 'task' (a registered env) or 'data' (problem files)")
    if task is not None and not (isinstance(task, str) and task):
        raise ConfigError(f"{where}: 'task' must be an env name")
    files = (data,) if isinstance(data, str) else tuple(data or ())
    if data is not None and (not files or not all(isinstance(f, str) and f for f in files)):
        raise ConfigError(f"{where}: 'data' must be a file path or a list of them")
    env_config = entry.get("env_config") or {}
    if not isinstance(env_config, dict):
        raise ConfigError(f"{where}: 'env_config' must be a mapping")
    num = entry.get("num_problems")
    if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
        raise ConfigError(f"{where}: 'num_problems' must be an integer >= 1 (or absent: all)")
    samples = entry.get("samples", 8)
    if not isinstance(samples, int) or isinstance(samples, bool):
        raise ConfigError(f"{where}: 'samples' must be an integer")
    greedy = entry.get("greedy", False)
    if not isinstance(greedy, bool):
        raise ConfigError(f"{where}: 'greedy' must be true or false")
    name = entry.get("name") or (task if task is not None else Path(files[0]).stem)
    try:
        pass_k = parse_pass_k(entry.get("pass_k", default_pass_k(samples)))
        spec = EvalSpec(samples=samples, pass_k=pass_k, greedy=greedy, temperature=temperature,
                        max_new_tokens=max_new_tokens, seed=seed, stop_token_ids=tuple(stop_token_ids))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return TaskEntry(str(name), task, files, dict(env_config), num, spec)


def check_eval_tasks(value: Any) -> str | None:
    """The ``eval_tasks`` field's check: error text or None."""
    if not isinstance(value, list):
        return "must be a list of mappings {name, task or data, env_config, num_problems, samples, pass_k, greedy}"
    try:
        names = [parse_eval_task(entry, i).name for i, entry in enumerate(value)]
    except ConfigError as e:
        return str(e)
    dupes = sorted({n for n in names if names.count(n) > 1})
    return f"two eval tasks are named {dupes[0]!r} (names key the TensorBoard tags)" if dupes else None
