"""Entry point of a WorkerPool worker: ``python -m opefo_rllib.envs._worker FD FN INIT``.

Reads ``(job_id, args)`` from the socket FD, runs ``FN(*args)`` in this process's main thread
(math-verify's signal-based timeouts need it), and sends ``(job_id, ("ok"|"error", value))``.
"""

from __future__ import annotations

import importlib
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any, Callable


def _resolve(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _worker_main(fd: int, fn_ref: str, init_ref: str) -> None:
    """Entry point of a worker process: ``python -m opefo_rllib.envs.pool FD FN INIT``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    conn = Connection(fd)
    fn = _resolve(fn_ref)
    if init_ref:
        _resolve(init_ref)()
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job_id, args = msg
        try:
            out = ("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001 - any failure of one job is that job's result
            out = ("error", f"{type(e).__name__}: {str(e)[:300]}")
        try:
            conn.send((job_id, out))
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result
            conn.send((job_id, ("error", f"result not sendable: {type(e).__name__}")))


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
