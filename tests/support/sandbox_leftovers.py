"""What a sandbox run may leave behind, for the sandbox tests: processes and temp dirs.

A sandbox's processes live in a pid namespace of their own, run as our descendants while they
run, and when orphaned (their backend killed first) become children of the host's pid 1, which
in a container may never reap them. A snapshot taken before a run, compared with one after,
shows whatever of it survived.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time

# Command names of the sandbox's own processes: its init (bwrap, sh) and the interpreter.
SANDBOX_COMMS = {"bwrap", "unshare", "sh", os.path.basename(os.path.realpath(sys.executable))[:15]}


def _stat(pid: str) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    state, ppid = text.rsplit(")", 1)[1].split()[:2]
    return comm, state, int(ppid)


def _descendants(root: int, parents: dict[int, int]) -> set[int]:
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def snapshot() -> set[tuple[str, object]]:
    """Sandbox-like processes (another pid namespace, our descendants, orphans of pid 1 with a
    sandbox process's name) and sandbox temp dirs, as they are now."""
    ours = os.readlink("/proc/self/ns/pid")
    parents, found = {}, set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = _stat(pid)
        if stat is None:
            continue
        comm, state, ppid = stat
        parents[int(pid)] = ppid
        try:
            other_ns = os.readlink(f"/proc/{pid}/ns/pid") != ours
        except OSError:  # a zombie has no namespaces left to show
            other_ns = False
        if other_ns or (ppid == 1 and comm in SANDBOX_COMMS):
            found.add(("process", (int(pid), comm, state)))
    found |= {("process", (pid, "descendant", "")) for pid in _descendants(os.getpid(), parents)}
    found |= {("tempdir", d) for d in glob.glob(os.path.join(tempfile.gettempdir(), "opefo-sandbox-*"))}
    return found


def leftovers(before: set, grace_s: float = 2.0) -> set:
    """What is in a snapshot now but was not in ``before``, once ``grace_s`` has not cleared it."""
    end = time.monotonic() + grace_s
    while True:
        new = {item for item in snapshot() if item not in before and not _same_process(item, before)}
        if not new or time.monotonic() > end:
            return new
        time.sleep(0.05)


def _same_process(item, before: set) -> bool:
    """A process seen before under another label (e.g. a state change) is not new."""
    return item[0] == "process" and any(b[0] == "process" and b[1][0] == item[1][0] for b in before)
