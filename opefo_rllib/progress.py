"""What the CLI shows while it works: an eval progress bar and the stage lines of a start.

On a terminal, ``opefo eval`` draws a tqdm bar per problem set, moved by the engines' token
counts while a call runs (not only when it returns), with tokens/s and an ETA. On a pipe or in CI
a bar's carriage returns are noise, so the same numbers come as a plain line at most every
``line_every_s`` seconds, and once at the end of each set.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from opefo_rllib.evaluation.runner import GenerationProgress

__all__ = ["EvalProgressBar", "Stages", "fmt_duration"]


def fmt_duration(seconds: float) -> str:
    """``1m05s``: how the CLI prints durations and ETAs."""
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m}m{s:02d}s"


def _is_tty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _eta(p: GenerationProgress) -> float | None:
    """Seconds left, from the rate the token budget is used up at (None before any progress)."""
    if p.budget_done <= 0 or p.seconds <= 0:
        return None
    return p.seconds * (p.budget - p.budget_done) / p.budget_done


class EvalProgressBar:
    """``evaluate_task``'s progress callback: a tqdm bar on a TTY, sparse lines elsewhere."""

    def __init__(self, stream: IO[str] | None = None, tty: bool | None = None, line_every_s: float = 30.0):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.line_every_s = line_every_s
        self._task: str | None = None
        self._bar: Any = None
        self._last_line = 0.0

    def __call__(self, p: GenerationProgress) -> None:
        if p.task != self._task:
            self.close()
            self._task, self._last_line = p.task, time.monotonic()
            if self.tty:
                self._bar = self._new_bar(p)
        rate = p.tokens / p.seconds if p.seconds > 0 else 0.0
        if self._bar is not None:
            self._bar.n = p.budget_done
            self._bar.set_postfix_str(f"{rate:.1f} tok/s, {p.answers_done}/{p.answers} answers", refresh=False)
            self._bar.refresh()
        elif p.answers_done == p.answers or time.monotonic() - self._last_line >= self.line_every_s:
            self._last_line = time.monotonic()
            eta = _eta(p)
            print(f"  {p.task}: {p.answers_done}/{p.answers} answers, {p.tokens} tokens, {rate:.1f} tok/s"
                  + (f", ~{fmt_duration(eta)} left" if eta is not None and p.answers_done < p.answers else ""),
                  file=self.stream, flush=True)

    def _new_bar(self, p: GenerationProgress):
        from tqdm import tqdm

        return tqdm(total=p.budget, desc=f"  {p.task}", file=self.stream, leave=True, dynamic_ncols=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Stages:
    """One status line per start-up stage ("Ray up  1.2 s"), timed from the previous stage."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self._since = time.monotonic()

    def done(self, what: str, at: float | None = None) -> None:
        """Print ``what`` with the seconds since the previous stage; ``at``: when it was done
        (a ``time.monotonic()`` reading; default now)."""
        now = time.monotonic() if at is None else at
        print(f"  {what:<40} {now - self._since:6.1f} s", file=self.stream, flush=True)
        self._since = now
