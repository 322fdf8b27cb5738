"""A pool of worker processes with a hard wall-time limit per job.

math-verify's own timeouts use ``signal.alarm``, which only works in the main thread of a
process, and sympy can still hang or blow the stack on hostile input. So every job runs in
the main thread of a worker process, and the parent kills a worker whose job outlives its
deadline and starts a replacement. A job that times out, crashes its worker, or raises
resolves to ``on_failure(kind, message)`` instead of propagating: callers always get a result.
A pool that cannot go on (no worker can start, the dispatcher thread died) breaks loudly: it
fails every unfinished job naming the cause and refuses new ones. Workers start isolated
(``python -I``) and end themselves if the parent process dies.

Jobs are submitted from any thread and come back as ``concurrent.futures.Future`` objects, so
verification overlaps whatever the caller does next.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

__all__ = ["WorkerPool", "PoolStats", "wait_all"]

FailureHandler = Callable[[str, str], Any]
log = logging.getLogger(__name__)


def _ref(fn: Callable) -> str:
    ref = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in ref or fn.__module__ == "__main__":
        raise ValueError(f"WorkerPool needs a module-level function importable by name, got {ref}")
    return ref


class PoolStats(dict):
    """Counters: submitted, completed, timeouts, crashes, errors, restarts."""


def wait_all(futures: Sequence[Future], timeout_s: float, what: str) -> list:
    """The results of ``futures``, waiting at most ``timeout_s`` for all of them together.

    Past the deadline a TimeoutError names ``what`` was waited for and how many were still
    pending, so a stuck verifier fails the caller loudly instead of hanging it.
    """
    _, not_done = concurrent.futures.wait(futures, timeout=timeout_s)
    if not_done:
        raise TimeoutError(f"{what}: {len(not_done)} of {len(futures)} still pending after {timeout_s:g} s")
    return [f.result() for f in futures]


def _import_root(module: str) -> str:
    """The folder ``module`` was imported from when it is not an installed package (a tests/ or
    script folder), else "": a worker adds it to its path only if it cannot import the module."""
    file = getattr(sys.modules.get(module), "__file__", None) or ""
    rel = module.replace(".", os.sep)
    for suffix in (os.sep + rel + ".py", os.sep + os.path.join(rel, "__init__.py")):
        if file.endswith(suffix):
            return file[: -len(suffix)]
    return ""


def _fallback_path(*refs: str) -> str:
    roots = (_import_root(ref.partition(":")[0]) for ref in refs if ref)
    return os.pathsep.join(dict.fromkeys(r for r in roots if r))


class _Worker:
    """One worker: a fresh interpreter started with ``-I -m`` (no re-import of the caller's
    ``__main__``, unlike multiprocessing's spawn), talking over a socket pair.

    ``-I`` keeps the current directory, PYTHONPATH and user site-packages off the worker's
    path, so a stray ``math_verify.py`` in the cwd cannot replace the installed package in every
    worker. A job module outside site-packages (``fallback_path``) is found last, never first.
    """

    __slots__ = ("proc", "conn", "ready", "jobs", "deadline")

    def __init__(self, fn_ref: str, init_ref: str, fallback_path: str = ""):
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "opefo_rllib.envs._worker", str(fd), fn_ref, init_ref, fallback_path],
                pass_fds=(fd,), stdin=subprocess.DEVNULL, close_fds=True,
                # Still read by opefo_rllib/__init__.py to skip Ray registration in workers.
                env={**os.environ, "OPEFO_POOL_WORKER": "1"},
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()  # the worker holds its own copy
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


def settle(fut: Future, value: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``fut``; a Future its caller cancelled meanwhile is left as it is."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)
    except InvalidStateError:
        pass


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

    The pool never hangs its callers: if a worker cannot be restarted or the dispatcher thread
    dies, the pool is marked ``broken``, every unresolved job fails ("error") naming the cause,
    and ``submit`` raises. A cancelled Future is dropped if not yet sent, else ignored.
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
        self.broken: str | None = None  # why the pool gave up (workers cannot start, dispatcher died)
        self._lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self._futures: dict[int, Future] = {}
        self._ids = itertools.count()
        self._stats = PoolStats(submitted=0, completed=0, timeouts=0, crashes=0, errors=0, restarts=0)
        self._closed = False
        self._fallback_path = _fallback_path(self._fn_ref, self._init_ref)
        self._workers: list[_Worker] = []
        try:
            for _ in range(num_workers):
                self._workers.append(self._spawn())
        except BaseException:
            for w in self._workers:
                w.kill()
            raise
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
            if not self._thread.is_alive():
                raise RuntimeError("WorkerPool is broken: its dispatcher thread is not running")
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
        self._pending.clear()
        for job_id in self._unresolved():
            self._resolve_failure(job_id, "error", "pool closed")
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

    def _spawn(self) -> _Worker:
        return _Worker(self._fn_ref, self._init_ref, self._fallback_path)

    def _unresolved(self) -> list[int]:
        """Every job whose Future is not resolved yet: queued, in flight, or between the two."""
        with self._lock:
            return list(self._futures)

    @staticmethod
    def _settle(fut: Future, value: Any = None, error: BaseException | None = None) -> None:
        settle(fut, value, error)

    def _resolve_failure(self, job_id: int, kind: str, message: str) -> None:
        fut = self._futures.pop(job_id, None)
        if fut is None or fut.done():
            return
        key = {"timeout": "timeouts", "crash": "crashes", "error": "errors"}[kind]
        with self._lock:
            self._stats[key] += 1
        try:
            value = self._on_failure(kind, message)
        except Exception as e:  # noqa: BLE001 - a failing handler fails this job, not the dispatcher
            self._settle(fut, error=e)
            return
        self._settle(fut, value)

    def _replace(self, index: int) -> None:
        old = self._workers[index]
        old.kill()
        if not old.ready:
            self._start_failures += 1
            if self._start_failures >= self._max_start_failures:
                self._give_up(f"{self._start_failures} workers exited before starting "
                              f"(last exit code {old.proc.returncode}); see their stderr above")
                return
        try:
            self._workers[index] = self._spawn()
        except OSError as e:  # e.g. out of processes or file descriptors: nothing left to run jobs on
            self._give_up(f"could not start a replacement worker ({type(e).__name__}: {e})")
            return
        with self._lock:
            self._stats["restarts"] += 1

    def _give_up(self, reason: str) -> None:
        log.error("WorkerPool(%s) is broken: %s; failing its unfinished jobs", self._fn_ref, reason)
        with self._lock:
            self.broken = reason
            self._pending.clear()
        for w in self._workers:
            w.kill()
        for job_id in self._unresolved():
            self._resolve_failure(job_id, "error", f"worker pool broken: {reason}")

    def _fail_oldest_and_replace(self, index: int, kind: str, message: str) -> None:
        """The oldest job of worker ``index`` failed with its process; requeue the rest."""
        w = self._workers[index]
        (job_id, _), rest = w.jobs.popleft(), list(w.jobs)
        w.jobs.clear()
        with self._lock:
            self._pending.extendleft(reversed(rest))
        self._resolve_failure(job_id, kind, message)  # first: a failed restart must not lose it
        self._replace(index)

    def _next_job(self) -> tuple | None:
        """The oldest queued job whose caller still wants it; cancelled ones are dropped."""
        while True:
            with self._lock:
                if not self._pending:
                    return None
                job = self._pending.popleft()
                fut = self._futures.get(job[0])
            if fut is not None and self._claim(fut):
                return job
            self._futures.pop(job[0], None)

    @staticmethod
    def _claim(fut: Future) -> bool:
        """Mark ``fut`` running, so its caller can no longer cancel it under the dispatcher's
        feet; False if the caller cancelled it (or it is resolved already: the pool is closing)."""
        if fut.running():  # requeued after its worker died
            return True
        if fut.done():
            return False
        return fut.set_running_or_notify_cancel()

    def _assign(self) -> None:
        for w in self._workers:
            while w.ready and len(w.jobs) < self.jobs_in_flight:
                job = self._next_job()
                if job is None:
                    return
                if not w.jobs:
                    w.deadline = time.monotonic() + self.timeout_s
                w.jobs.append(job)
                try:
                    w.conn.send(job)
                except Exception as e:  # noqa: BLE001 - unpicklable arguments, or a dead pipe
                    w.jobs.pop()
                    self._resolve_failure(job[0], "error", f"could not send job: {type(e).__name__}: {e}")

    def _run(self) -> None:
        try:
            self._dispatch()
        except BaseException as e:  # noqa: BLE001 - a dead dispatcher must not leave callers waiting
            log.exception("WorkerPool(%s): dispatcher thread died", self._fn_ref)
            self._give_up(f"dispatcher thread died ({type(e).__name__}: {e})")

    def _dispatch(self) -> None:
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
                        self._settle(fut, value)
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
