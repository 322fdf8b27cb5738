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


def pid():
    return os.getpid()


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
