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
