"""The processes of a running ``opefo train``, found by pid under its supervisor: for fault
tests and the chaos benchmark (benchmarks/chaos.py), which kill them.

    procs = RunProcesses(supervisor_pid)
    procs.driver()      # the driver, the supervisor's child (None between two drivers)
    procs.learners()    # the learner actors (RLlib names their class _WrappedExecutable)
    procs.engines()     # the engine actors

Only the descendants of the given process are looked at, so another run on the same machine
is never touched. Actors are matched by the process title Ray gives them (``ray::<Class>...``).
"""

from __future__ import annotations

import signal

import psutil

__all__ = ["RunProcesses", "kill", "LEARNER_TITLE", "ENGINE_TITLE"]

LEARNER_TITLE = "ray::_WrappedExecutable"  # RLlib wraps each remote Learner in this actor class
ENGINE_TITLE = "ray::EngineActor"


class RunProcesses:
    def __init__(self, supervisor_pid: int):
        self.root = psutil.Process(supervisor_pid)

    def _descendants(self) -> list[psutil.Process]:
        try:
            return self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def driver(self) -> psutil.Process | None:
        try:
            children = self.root.children()
        except psutil.NoSuchProcess:
            return None
        return next((p for p in children if _cmdline_has(p, "opefo_rllib.cli")), None)

    def _titled(self, title: str) -> list[psutil.Process]:
        return [p for p in self._descendants() if _cmdline_has(p, title)]

    def learners(self) -> list[psutil.Process]:
        return self._titled(LEARNER_TITLE)

    def engines(self) -> list[psutil.Process]:
        return self._titled(ENGINE_TITLE)

    def targets(self, kinds: tuple[str, ...] = ("engine", "learner")) -> list[tuple[str, psutil.Process]]:
        """(kind, process) of every live process of the given kinds: "engine", "learner", "driver"."""
        found = []
        for kind in kinds:
            procs = {"engine": self.engines, "learner": self.learners,
                     "driver": lambda: [d for d in [self.driver()] if d is not None]}[kind]()
            found += [(kind, p) for p in procs]
        return found


def _cmdline_has(proc: psutil.Process, text: str) -> bool:
    try:
        return text in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def kill(proc: psutil.Process) -> bool:
    """SIGKILL ``proc``; False when it was gone already."""
    try:
        proc.send_signal(signal.SIGKILL)
        return True
    except psutil.NoSuchProcess:
        return False
