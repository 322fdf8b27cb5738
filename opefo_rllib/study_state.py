"""Where one run of a study stands, read from its directory only (``run_state``):

    done        RUN/study_done.json says N iterations finished, or the newest checkpoint is at
                iteration >= N: not run again
    resumable   checkpoints/latest names a complete checkpoint below N: resume from it
    restart     the directory holds an attempt without a checkpoint
    new         no directory yet

``seed_dirs`` lists a run's seed directories, optionally only the done ones or only some seeds
(the study tables of benchmarks/ read a study part-way). Below both ``study`` (which acts on the
state) and ``study_report`` (which counts the done runs).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

from opefo_rllib.checkpoints import latest_checkpoint

__all__ = ["DONE_FILE", "RunState", "run_state", "seed_dirs"]

DONE_FILE = "study_done.json"  # written by the study when a run's `opefo train` exits 0


@dataclasses.dataclass(frozen=True)
class RunState:
    """What the study does with a run: ``done``, ``resumable`` (from ``checkpoint``), ``restart`` or ``new``."""

    kind: str
    checkpoint: Path | None = None
    iteration: int = 0


def _checkpoint_iteration(ckpt: Path) -> int:
    return int(ckpt.name.rsplit("_", 1)[-1])


def seed_dirs(run: Path, finished: bool = False, seeds: Iterable[int] | None = None) -> list[Path]:
    """A study run's RUN/seed_N directories, sorted; ``finished``: only those the study marked done
    (DONE_FILE); ``seeds``: only these seeds."""
    names = None if seeds is None else {f"seed_{n}" for n in seeds}
    return [d for d in sorted(run.glob("seed_*"))
            if (not finished or (d / DONE_FILE).exists()) and (names is None or d.name in names)]


def run_state(run_dir: Path, iterations: int) -> RunState:
    """Done, resumable (from its latest complete checkpoint), restart (an attempt left no
    checkpoint) or new, for a run of ``iterations``."""
    marker = run_dir / DONE_FILE
    if marker.is_file():
        try:
            if int(json.loads(marker.read_text()).get("iterations", 0)) >= iterations:
                return RunState("done", iteration=iterations)
        except (ValueError, TypeError, AttributeError):
            pass  # a damaged marker: decide from the checkpoints
    latest = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if latest is not None:
        done_at = _checkpoint_iteration(latest)
        return RunState("done" if done_at >= iterations else "resumable", latest, done_at)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return RunState("restart")
    return RunState("new")
