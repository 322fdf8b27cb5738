"""A pool of worker processes with a hard wall-time limit per job.

math-verify's own timeouts use ``signal.alarm``, which only works in the main thread of a
process, and sympy can still hang or blow the stack on hostile input. So every job runs in
the main thread of a worker process, and the parent kills a worker whose job outlives its
deadline and starts a replacement. A job that times out, crashes its worker, or raises
resolves to ``on_failure(kind, message)`` instead of propagating: callers always get a result.

Jobs are submitted from any thread and come back as ``concurrent.futures.Future`` objects, so
verification overlaps whatever the caller does next.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

__all__ = ["WorkerPool", "PoolStats"]

FailureHandler = Callable[[str, str], Any]


def _ref(fn: Callable) -> str:
    ref = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in ref or fn.__module__ == "__main__":
        raise ValueError(f"WorkerPool needs a module-level function importable by name, got {ref}")
    return ref


class PoolStats(dict):
    """Counters: submitted, completed, timeouts, crashes, errors, restarts."""


def _child_pythonpath() -> str:
    """The parent's import path, so a job function importable here is importable there."""
    return os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))


class _Worker:
    """One worker: a fresh interpreter started with ``-m`` (no re-import of the caller's
    ``__main__``, unlike multiprocessing's spawn), talking over a socket pair."""

    __slots__ = ("proc", "conn", "ready", "jobs", "deadline")

    def __init__(self, fn_ref: str, init_ref: str):
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opefo_rllib.envs._worker", str(fd), fn_ref, init_ref],
            pass_fds=(fd,), stdin=subprocess.DEVNULL, close_fds=True,
            env={**os.environ, "OPEFO_POOL_WORKER": "1", "PYTHONPATH": _child_pythonpath()},
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        # Jobs sent and not yet answered, oldest first; the worker runs them in order and the
        # deadline is that of the oldest (set when it started, i.e. when the one before it ended).
        self.ready, self.jobs, self.deadline = False, collections.deque(), None

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        self.conn.close()


class WorkerPool:
    """Run ``fn(*args)`` jobs in ``num_workers`` processes, each job limited to ``timeout_s``.

    Args:
        fn: a module-level function (imported by name in the workers).
        num_workers: worker processes.
        timeout_s: hard wall-time limit per job; the worker is killed and replaced past it.
        on_failure: ``(kind, message) -> result`` for kind in {"timeout", "crash", "error"}.
        init: optional module-level function run once in each worker (e.g. warm imports).
        jobs_in_flight: jobs queued at each worker at once (2 hides the parent's dispatch latency).
        max_start_failures: workers that may die before ever becoming ready, in a row, before
            the pool gives up and fails every queued job with an error naming the cause.
    """

    def __init__(
        self,
        fn: Callable,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        on_failure: FailureHandler | None = None,
        init: Callable | None = None,
        max_start_failures: int = 3,
        jobs_in_flight: int = 2,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._fn_ref, self._init_ref = _ref(fn), (_ref(init) if init else "")
        self.timeout_s = float(timeout_s)
        self.jobs_in_flight = max(1, int(jobs_in_flight))
        self._on_failure = on_failure or (lambda kind, msg: None)
        self._max_start_failures, self._start_failures = max_start_failures, 0
        self.broken: str | None = None  # set when workers cannot start
        self._lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self._futures: dict[int, Future] = {}
        self._ids = itertools.count()
        self._stats = PoolStats(submitted=0, completed=0, timeouts=0, crashes=0, errors=0, restarts=0)
        self._closed = False
        self._workers = [_Worker(self._fn_ref, self._init_ref) for _ in range(num_workers)]
        wake_r, wake_w = socket.socketpair()
        self._wake_r, self._wake_w = Connection(wake_r.detach()), Connection(wake_w.detach())
        self._thread = threading.Thread(target=self._run, name="opefo-worker-pool", daemon=True)
        self._thread.start()
        _live_pools.add(self)

    # ---------------------------------------------------------------- public API
    def submit(self, *args) -> Future:
        """Queue one job; returns a Future that always resolves (failures via on_failure)."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("WorkerPool is closed")
            if self.broken:
                raise RuntimeError(f"WorkerPool is broken: {self.broken}")
            job_id = next(self._ids)
            self._futures[job_id] = fut
            self._pending.append((job_id, args))
            self._stats["submitted"] += 1
        self._wake()
        return fut

    def map(self, arg_tuples) -> list[Future]:
        return [self.submit(*args) for args in arg_tuples]

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(self._stats)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def close(self) -> None:
        """Stop the workers; jobs still queued resolve as failures ("error": pool closed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        self._thread.join(timeout=10)
        for w in self._workers:
            try:
                w.conn.send(None)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + 2
        for w in self._workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            w.kill()
        in_flight = [job_id for w in self._workers for job_id, _ in w.jobs]
        for job_id in in_flight + [job_id for job_id, _ in self._pending]:
            self._resolve_failure(job_id, "error", "pool closed")
        self._pending.clear()
        _live_pools.discard(self)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- dispatcher thread
    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"x")
        except Exception:  # noqa: BLE001
            pass

    def _resolve_failure(self, job_id: int, kind: str, message: str) -> None:
        fut = self._futures.pop(job_id, None)
        if fut is not None and not fut.done():
            key = {"timeout": "timeouts", "crash": "crashes", "error": "errors"}[kind]
            with self._lock:
                self._stats[key] += 1
            fut.set_result(self._on_failure(kind, message))

    def _replace(self, index: int) -> None:
        old = self._workers[index]
        old.kill()
        if not old.ready:
            self._start_failures += 1
            if self._start_failures >= self._max_start_failures:
                self._give_up(f"{self._start_failures} workers exited before starting "
                              f"(last exit code {old.proc.returncode}); see their stderr above")
                return
        self._workers[index] = _Worker(self._fn_ref, self._init_ref)
        with self._lock:
            self._stats["restarts"] += 1

    def _give_up(self, reason: str) -> None:
        with self._lock:
            self.broken = reason
            pending = list(self._pending)
            self._pending.clear()
        in_flight = [job_id for w in self._workers for job_id, _ in w.jobs]
        for w in self._workers:
            w.kill()
        for job_id in in_flight + [job_id for job_id, _ in pending]:
            self._resolve_failure(job_id, "error", f"worker pool broken: {reason}")

    def _fail_oldest_and_replace(self, index: int, kind: str, message: str) -> None:
        """The oldest job of worker ``index`` failed with its process; requeue the rest."""
        w = self._workers[index]
        (job_id, _), rest = w.jobs.popleft(), list(w.jobs)
        w.jobs.clear()
        with self._lock:
            self._pending.extendleft(reversed(rest))
        self._replace(index)
        self._resolve_failure(job_id, kind, message)

    def _assign(self) -> None:
        for w in self._workers:
            while w.ready and len(w.jobs) < self.jobs_in_flight:
                with self._lock:
                    if not self._pending:
                        return
                    job = self._pending.popleft()
                if not w.jobs:
                    w.deadline = time.monotonic() + self.timeout_s
                w.jobs.append(job)
                try:
                    w.conn.send(job)
                except Exception as e:  # noqa: BLE001 - unpicklable arguments, or a dead pipe
                    w.jobs.pop()
                    self._resolve_failure(job[0], "error", f"could not send job: {type(e).__name__}: {e}")

    def _run(self) -> None:
        while not self._closed and not self.broken:
            self._assign()
            now = time.monotonic()
            deadlines = [w.deadline - now for w in self._workers if w.jobs]
            timeout = max(0.0, min(deadlines)) if deadlines else None
            conns = [w.conn for w in self._workers] + [self._wake_r]
            try:
                ready = wait(conns, timeout=timeout)
            except OSError:
                ready = []
            if self._wake_r in ready:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
            for i, w in enumerate(list(self._workers)):
                if w.conn in ready:
                    self._receive(i, w)
            now = time.monotonic()
            for i, w in enumerate(list(self._workers)):
                if w.jobs and now >= w.deadline:
                    self._fail_oldest_and_replace(i, "timeout", f"no result within {self.timeout_s:g} s")

    def _receive(self, index: int, w: _Worker) -> None:
        try:
            while w.conn.poll():  # drain everything this worker has sent
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    self._start_failures = 0
                    continue
                job_id, (status, value) = msg
                w.jobs.popleft()
                w.deadline = time.monotonic() + self.timeout_s if w.jobs else None
                if status == "ok":
                    fut = self._futures.pop(job_id, None)
                    if fut is not None:
                        with self._lock:
                            self._stats["completed"] += 1
                        fut.set_result(value)
                else:
                    self._resolve_failure(job_id, "error", value)
        except (EOFError, OSError):
            code = w.proc.poll()
            if w.jobs:
                self._fail_oldest_and_replace(index, "crash", f"worker exited (code {code})")
            else:
                self._replace(index)


_live_pools: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_live_pools):
        pool.close()
