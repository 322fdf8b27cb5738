"""Problem sets to evaluate: a registered env's held-out set, problem files, the math6 suite.

* A dataset-backed env (it has a ``dataset``, e.g. opefo/Math-v0) and a problem file are
  evaluated in file order (the first ``num_problems``, default all).
* A generated env (opefo/Arithmetic-v0, ...) has no end, so its evaluation set is a fixed,
  seeded held-out set: ``num_problems`` distinct problems drawn with ``HELDOUT_SEED``, leaving
  out every problem of the training stream's first epoch, defined for a generated task as the
  first ``exclude_draws`` problems the trainer draws with its seed (the default run draws
  250 iterations x 32 prompts = 8,000). Which problems these are does not depend on the model
  or the sampling seed, so two evaluations of one task are comparable.

No Ray: envs and files only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from opefo_rllib.config.fields import ConfigError
from opefo_rllib.envs import DatasetError, Problem, ProblemDataset, TextEnv, make_env
from opefo_rllib.envs.base import in_heldout_split
from opefo_rllib.envs.math_env import MathEnv
from opefo_rllib.envs.registry import EnvNotFound

__all__ = ["EvalTask", "HELDOUT_SEED", "TRAIN_EPOCH_DRAWS", "DEFAULT_GENERATED_PROBLEMS", "SUITES",
           "heldout_problems", "env_task", "file_task", "suite_tasks"]

HELDOUT_SEED = 12345  # not a training seed; the held-out figures of docs/algorithm.md section 13 use it too
TRAIN_EPOCH_DRAWS = 8000  # the default run's training stream: 250 iterations x 32 prompts
DEFAULT_GENERATED_PROBLEMS = 512
SUITES = {"math6": ("math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench")}
_SUFFIXES = (".jsonl", ".parquet", ".csv")


@dataclasses.dataclass
class EvalTask:
    """A named problem set and the env that poses and scores it (``close()`` when done)."""

    name: str
    env: TextEnv
    problems: list[Problem]
    excluded: int = 0  # held-out draws dropped because the training stream has them

    def close(self) -> None:
        self.env.close()


def heldout_problems(env: TextEnv, n: int, seed: int = HELDOUT_SEED, train_seed: int = 0,
                     exclude_draws: int = TRAIN_EPOCH_DRAWS) -> tuple[list[Problem], int]:
    """``n`` distinct problems of a generated env, none among the first ``exclude_draws`` problems
    of the training stream (``env.seed_problems(train_seed)``, as LLMEnvRunner seeds it).

    Returns (problems, number of draws skipped as training problems). The training stream is the
    one this env (with its env_config) draws: evaluate the training env's own config for a true
    held-out set. An env of ``split: heldout`` is held out by construction (its training twin never
    poses its problems), so nothing is excluded and a small problem space can be evaluated whole.
    Leaves the env seeded with ``seed``; use an env instance apart from the trainer's.
    """
    training: set[str] = set()
    if getattr(env, "split", "all") != "heldout":
        env.seed_problems(train_seed)
        training = {p.id for p in env.sample_problems(exclude_draws)}
    env.seed_problems(seed)
    out, chosen, excluded = [], set(), 0
    for _ in range(100 * n + 10_000):  # a task whose problem space is nearly exhausted ends in an error
        if len(out) == n:
            return out, excluded
        try:
            p = env.draw_problem(env.np_random)
        except ValueError as e:  # no problem of its split at all
            raise ConfigError(str(e)) from None
        if p.id in training:
            excluded += 1
        elif p.id not in chosen:  # a set: a problem drawn twice counts once
            chosen.add(p.id)
            out.append(p)
    where = ("in its held-out split" if getattr(env, "split", "all") == "heldout" else
             f"outside the training stream's first {exclude_draws}")
    raise ConfigError(f"{type(env).__name__}: cannot draw {n} distinct problems {where} (got {len(out)}); "
                      f"ask for fewer")


def _in_file_order(env: TextEnv, n: int | None) -> list[Problem]:
    """The first ``n`` problems of a dataset-backed env, in file order, posed as the env poses them."""
    problems = [p for p in env.dataset.problems if env.split == "all"
                or in_heldout_split(p.id, env.heldout_fraction) == (env.split == "heldout")]
    if not problems:
        raise ConfigError(f"{type(env).__name__}: no problem of its dataset is in split {env.split!r}")
    env.dataset = ProblemDataset(problems, shuffle=False)  # each problem of the split once
    total = len(env.dataset)
    return env.sample_problems(total if n is None else min(n, total))


def env_task(env_name: str, env_config: dict | None = None, num_problems: int | None = None,
             name: str | None = None, train_seed: int = 0, exclude_draws: int = TRAIN_EPOCH_DRAWS) -> EvalTask:
    """The evaluation set of a registered env (held out if generated, file order if dataset-backed)."""
    try:
        env = make_env(env_name, **dict(env_config or {}))
    except (DatasetError, ConfigError):
        raise
    except FileNotFoundError as e:
        raise ConfigError(f"task {env_name!r}: {e}") from None
    except EnvNotFound as e:
        raise ConfigError(f"unknown task {env_name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a bad env_config is the user's input
        raise ConfigError(f"task {env_name!r} with env_config {dict(env_config or {})}: {type(e).__name__}: {e}") \
            from None
    if isinstance(getattr(env, "dataset", None), ProblemDataset):
        return EvalTask(name or env_name, env, _in_file_order(env, num_problems))
    problems, excluded = heldout_problems(env, num_problems or DEFAULT_GENERATED_PROBLEMS, train_seed=train_seed,
                                          exclude_draws=exclude_draws)
    return EvalTask(name or env_name, env, problems, excluded)


def file_task(paths: str | Sequence[str], num_problems: int | None = None, name: str | None = None) -> EvalTask:
    """Problem files (JSONL / Parquet / CSV) as one set with opefo/Math-v0's template and verifier;
    named after the first file's stem."""
    files = [paths] if isinstance(paths, str) else list(paths)
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"data file not found: {f}")
    try:
        env = MathEnv(data_files=files, shuffle=False)
    except ImportError as e:  # Parquet without pyarrow
        raise ConfigError(f"{files[0]}: {e}") from None
    return EvalTask(name or Path(files[0]).stem, env, _in_file_order(env, num_problems))


def suite_tasks(suite: str, data_dir: str | Path, num_problems: int | None = None) -> list[EvalTask]:
    """The sets of a suite, each found by its name in ``data_dir`` (``math500.jsonl``, ...)."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; suites: {', '.join(sorted(SUITES))}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--data-dir {data_dir}: no such directory")
    files = []
    for stem in SUITES[suite]:
        found = [root / f"{stem}{s}" for s in _SUFFIXES if (root / f"{stem}{s}").is_file()]
        if not found:
            raise ConfigError(f"suite {suite}: {root / (stem + '.jsonl')} not found (looked for {stem}.jsonl, "
                              f".parquet, .csv in {root})")
        files.append(found[0])
    return [file_task(str(f), num_problems) for f in files]
