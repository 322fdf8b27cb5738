"""Entry point of a WorkerPool worker: ``python -I -m opefo_rllib.envs._worker FD FN INIT [PATH]``.

Reads ``(job_id, args)`` from the socket FD, runs ``FN(*args)`` in this process's main thread
(math-verify's signal-based timeouts need it), and sends ``(job_id, ("ok"|"error", value))``.
The worker runs isolated (``-I``: no cwd, PYTHONPATH or user site-packages on ``sys.path``);
PATH lists folders of job modules that are not installed (e.g. tests/), tried only after the
installed packages and only when FN or INIT cannot be imported otherwise.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable


def _import(module: str, fallback_path: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if not fallback_path or not (module == missing or module.startswith(missing + ".")):
            raise  # a dependency of the module is missing, not the module itself
    # Appended, not prepended: a folder of job modules never shadows an installed package.
    sys.path.extend(p for p in fallback_path.split(os.pathsep) if p not in sys.path)
    importlib.invalidate_caches()
    return importlib.import_module(module)


def _resolve(ref: str, fallback_path: str = "") -> Callable:
    module, _, name = ref.partition(":")
    obj: Any = _import(module, fallback_path)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this worker when its parent dies. The parent kills workers whose job hangs; if it is
    killed itself (e.g. ``ray.shutdown()`` ends the env-runner actor), nobody else would."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="opefo-parent-watch", daemon=True).start()


def _worker_main(fd: int, fn_ref: str, init_ref: str, fallback_path: str = "") -> None:
    """Import FN (and run INIT) once, say "ready", then run jobs until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    _exit_with_parent()
    conn = Connection(fd)
    fn = _resolve(fn_ref, fallback_path)
    if init_ref:
        _resolve(init_ref, fallback_path)()
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
    _worker_main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")
