"""Module-level jobs for WorkerPool tests (workers import them by name)."""

import os
import time


def echo(x):
    return x


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def crash(code):
    os._exit(code)


def raise_error(message):
    raise RuntimeError(message)


def meet(folder, workers, timeout_s):
    """Check in (a file named by this worker's pid in ``folder``), then wait until ``workers``
    distinct workers have checked in: (pid, True) only when they ran at the same time."""
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(os.listdir(folder)) >= workers:
            return os.getpid(), True
        time.sleep(0.01)
    return os.getpid(), False


def failure(kind, message):
    return {"failed": kind, "message": message}


def slow_verify(*args):
    """A verify job (MathVerifier's arguments) that outlives any short time limit."""
    time.sleep(60)
    return {"reward": 1.0, "correct": True, "format_ok": True}


def touch_then_sleep(path, seconds):
    """Say the job started (a file appears at ``path``), then stay busy."""
    open(path, "w").close()
    time.sleep(seconds)
    return path
