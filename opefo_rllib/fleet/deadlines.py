"""Deadlines by progress: a generation call may run as long as its engine keeps producing tokens.

A per-call deadline cannot tell a long generation (a 32-problem chat eval at 256 tokens) from a
hung engine; both just take long. Engines count the tokens they sample (``generated_tokens``) and
``EngineActor.progress`` reports that count while a call runs, so the fleet ends a call only when
its engine produced nothing for ``stall_timeout_s`` (``EngineStalled``), or, where a hard cap is
set (``generate_timeout_s``), when the whole wait passed it (``GenerationTimeout``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping, Sequence

import ray

__all__ = ["EngineProgress", "EngineStalled", "GenerationTimeout", "ProgressWatch", "wait_progressing"]

POLL_S = 1.0  # the longest time between two progress queries (shorter for small stall windows)


@dataclasses.dataclass(frozen=True)
class EngineProgress:
    """What an engine actor reports while it works (``EngineActor.progress``).

    call: the method running now ("generate", "response_entropy"), None when idle.
    call_tokens: tokens the running call has produced so far (0 when idle).
    tokens: tokens produced over the actor's life; any change is progress.
    """

    call: str | None
    call_tokens: int
    tokens: int


class EngineStalled(TimeoutError):
    """An engine produced no token for ``stall_timeout_s``; the message names engine, step, tokens."""


class GenerationTimeout(TimeoutError):
    """A wait passed the optional hard cap ``generate_timeout_s`` although tokens kept coming."""


OnProgress = Callable[[Mapping[int, EngineProgress]], None]  # engine -> its latest report


@dataclasses.dataclass
class ProgressWatch:
    """The stall windows of one wait: per busy engine, its last token count and when it changed."""

    stall_timeout_s: float
    started: float = dataclasses.field(default_factory=time.monotonic)
    last: dict[int, tuple[int | None, float]] = dataclasses.field(default_factory=dict)

    def observe(self, engine: int, report: EngineProgress | None, now: float) -> None:
        """Record a report (None: the engine did not answer); a new token count restarts its window."""
        tokens = None if report is None else report.tokens
        seen = self.last.get(engine)
        if seen is None or (tokens is not None and tokens != seen[0]):
            self.last[engine] = (tokens, now)

    def stalled(self, engines: Sequence[int], now: float) -> list[int]:
        """The engines among ``engines`` whose window has passed ``stall_timeout_s``."""
        return [e for e in engines if e in self.last and now - self.last[e][1] > self.stall_timeout_s]


def poll_progress(actors: Mapping[int, object], timeout_s: float) -> dict[int, EngineProgress]:
    """Each actor's progress report; an actor that does not answer within ``timeout_s`` (or died:
    its generate call then fails on its own) is left out."""
    refs = {engine: actor.progress.remote() for engine, actor in actors.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    reports = {}
    for engine, ref in refs.items():
        if ref in ready:
            try:
                reports[engine] = ray.get(ref)
            except ray.exceptions.RayError:
                pass
    return reports


def stall_message(what: str, engine: int, num_engines: int, report: EngineProgress | None, stall_s: float) -> str:
    """One line: which engine stalled, in what, and how far it got."""
    if report is None:
        got = "it did not answer progress queries"
    else:
        got = f"{report.call_tokens} tokens so far in this call, {report.tokens} since it started"
    return (f"{what}: engine {engine} (of {num_engines}) produced no token for {stall_s:g} s "
            f"(stall_timeout_s); {got}")


def wait_progressing(refs: list, engines: Sequence[int], actors: Sequence[object], num_returns: int, what: str,
                     stall_timeout_s: float, hard_cap_s: float | None = None,
                     on_progress: OnProgress | None = None) -> list:
    """Block until ``num_returns`` of ``refs`` (calls on ``engines``, positions in ``actors``) are
    done; returns the ready refs. Meanwhile the busy engines' progress is polled, passed to
    ``on_progress``, and an engine without a new token for ``stall_timeout_s`` ends the wait in
    ``EngineStalled`` (the stalled engine is killed first: it would only block the shutdown
    behind its call); past ``hard_cap_s`` (None: no cap) in ``GenerationTimeout``, the busy
    engines killed for the same reason."""
    watch = ProgressWatch(stall_timeout_s)
    poll_s = max(0.05, min(POLL_S, stall_timeout_s / 5))
    while True:
        ready, rest = ray.wait(refs, num_returns=num_returns, timeout=poll_s)
        if len(ready) >= num_returns:
            return ready
        busy = sorted({e for ref, e in zip(refs, engines) if ref in rest})
        reports = poll_progress({e: actors[e] for e in busy}, poll_s)
        now = time.monotonic()
        for e in busy:
            watch.observe(e, reports.get(e), now)
        if on_progress is not None:
            on_progress(reports)
        stalled = watch.stalled(busy, now)
        if stalled:
            e = stalled[0]
            message = stall_message(what, e, len(actors), reports.get(e), stall_timeout_s)
            for s in stalled:
                ray.kill(actors[s])
            raise EngineStalled(message)
        if hard_cap_s is not None and now - watch.started > hard_cap_s:
            for e in busy:
                ray.kill(actors[e])
            raise GenerationTimeout(f"{what}: still running after {hard_cap_s:g} s (generate_timeout_s; engines "
                                    f"{busy} of {len(actors)} busy, tokens still coming)")
