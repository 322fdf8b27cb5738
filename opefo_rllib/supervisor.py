"""Automatic recovery of ``opefo train``: a supervisor process around the training driver.

``opefo train`` runs the training in a child process, the *driver* (``opefo train`` with the same
arguments, plus ``--supervisor-state FILE``), and waits for it. When the driver dies (a signal:
SIGKILL, the OOM killer) or ends with a failure that a fresh start may not meet again (a learner
that died or missed its deadline, an engine stall: the driver's exit status ``RECOVERABLE_EXIT``),
the supervisor starts a new driver that resumes the run from its latest complete checkpoint and
re-runs the iterations lost since, up to the run's ``max_failures`` times. The restored learner,
sampler and engines continue the same streams, so a recovered sync run's curves are those of an
uninterrupted run; TensorBoard hides the lost iterations' first events (``purge_step`` on
restore), so it keeps each step once.

Each recovery is one line on stderr, a record in ``RUN/recoveries.jsonl`` (cause, checkpoint,
time of the failure) and the TensorBoard scalar
``fault/recoveries`` (how many recoveries preceded the driver, at the step it resumed from).
Bad input (exit 2), a run stopped by non-finite updates, an engine serving other weights than
the learner's, an unexpected error (a bug) and a stop asked by the user (Ctrl-C, SIGTERM) are
never retried: a fresh start would meet them again, or they were meant.

The driver reports its run directory and ``max_failures`` through the state file once its run
is set up (before Ray starts); a driver that dies before that has nothing to resume and its
failure stands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["RECOVERABLE_EXIT", "RECOVERIES_FILE", "DriverState", "write_driver_state", "record_failure",
           "supervise", "recoverable"]

RECOVERABLE_EXIT = 75  # sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry"
RECOVERIES_FILE = "recoveries.jsonl"


@dataclasses.dataclass(frozen=True)
class DriverState:
    """What a driver tells its supervisor: where its run lives, how often it may be restarted,
    where it ends, and (when it failed recoverably) the failure's one line."""

    run_dir: Path
    max_failures: int
    iterations: int
    failure: str | None = None


def write_driver_state(path: str | os.PathLike, run_dir: Path, max_failures: int, iterations: int) -> None:
    """The driver's report, written atomically (the supervisor may read it at any moment)."""
    _write_json(Path(path), {"run_dir": str(run_dir), "max_failures": max_failures, "iterations": iterations})


def record_failure(path: str | os.PathLike, line: str) -> None:
    """Add the one-line failure of a driver about to exit with ``RECOVERABLE_EXIT``."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {}
    _write_json(path, {**data, "failure": line})


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_state(path: Path) -> DriverState | None:
    try:
        data = json.loads(path.read_text())
        return DriverState(Path(data["run_dir"]), int(data["max_failures"]), int(data["iterations"]),
                           data.get("failure"))
    except (OSError, ValueError, KeyError):
        return None  # the driver died before its run was set up


def recoverable(error: BaseException, causes: Callable[[BaseException], Sequence[BaseException]]) -> bool:
    """Whether a failure of the run may pass with a fresh driver: a learner failure (died, or no
    answer by its deadline), a deadline (an engine stall, a weight sync) or a Ray actor killed
    where nothing restarts it (an engine while the fleet starts). Non-finite updates and a
    served-weights mismatch are not: a deterministic rerun meets them again."""
    from ray.exceptions import RayActorError

    from opefo_rllib.algorithms.grpo.grpo import LearnerFailedError
    from opefo_rllib.fleet.weight_sync import WeightsMismatchError
    from opefo_rllib.training import TrainingStopped

    found = list(causes(error))
    if any(isinstance(e, (TrainingStopped, WeightsMismatchError)) for e in found):
        return False
    return any(isinstance(e, (LearnerFailedError, TimeoutError, RayActorError)) for e in found)


def _checkpoint_iteration(checkpoint: Path) -> int:
    from opefo_rllib.checkpoints import RUN_FILE

    return int(json.loads((checkpoint / RUN_FILE).read_text())["iteration"])


def _driver_command(argv_prefix: Sequence[str], train_args: Sequence[str], state_file: Path,
                    resume: Path | str | None, logdir: Path | str | None, recoveries: int) -> list[str]:
    cmd = [sys.executable, "-m", "opefo_rllib.cli", *argv_prefix, "train", *train_args,
           "--supervisor-state", str(state_file), "--recoveries", str(recoveries)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    if logdir is not None:
        cmd += ["--logdir", str(logdir)]
    return cmd


def _death(returncode: int) -> str:
    """How a driver ended, in words."""
    if returncode < 0:
        try:
            return f"the driver was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"the driver was killed by signal {-returncode}"
    return f"the driver exited with status {returncode}"


class _Driver:
    """One driver process in a session of its own (its Ray processes with it), with Ctrl-C and
    SIGTERM forwarded to it; ``stopped`` says the user asked the run to stop."""

    def __init__(self, cmd: list[str]):
        self.stopped = False
        self.proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)

    def _forward(self, signum, frame) -> None:  # noqa: ARG002 - a signal handler's signature
        self.stopped = True
        try:
            os.kill(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                try:
                    return self.proc.wait()
                except KeyboardInterrupt:  # a signal between handler swaps: forward it too
                    self._forward(signal.SIGINT, None)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _kill_session(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid


def _die_with_parent() -> None:
    """In the driver, before it runs: SIGKILL when the supervisor dies (Linux), so killing
    ``opefo train`` ends its run as it did without a supervisor (Ray's services die with the driver)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill_session(pid: int) -> None:
    """What a dead driver left of its session (Ray kills its own services with their parent;
    this catches anything that outlived it)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _set_aside_logs(run_dir: Path, recovery: int) -> Path | None:
    """A run that failed before its first checkpoint starts over in the same directory: its first
    attempt's TensorBoard events move to ``RUN/failed_attempts/<n>/`` (kept, out of the run's curves)."""
    from opefo_rllib.logging_tb import TB_DIR

    tb = run_dir / TB_DIR
    if not tb.exists():
        return None
    target = run_dir / "failed_attempts" / str(recovery)
    target.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tb), str(target / TB_DIR))
    return target


def supervise(argv_prefix: Sequence[str], train_args: Sequence[str], resume: str | None, logdir: str | None,
              on_driver: Callable[[int], None] | None = None) -> int:
    """Run ``opefo train`` in a driver and recover it; the exit status of the last driver (0 when
    the run finished; 1 when it failed past ``max_failures`` or could not be recovered).

    Args:
        argv_prefix: the options before ``train`` (``--debug``, ``--verbose``).
        train_args: ``--config`` / ``--set`` arguments of the command, given to every driver.
        resume, logdir: the command's ``--resume`` and ``--logdir``.
        on_driver: called with each driver's pid as it starts (tests, the chaos benchmark).
    """
    with tempfile.TemporaryDirectory(prefix="opefo-supervisor-") as tmp:
        state_file = Path(tmp) / "driver.json"
        recoveries = 0
        cmd = _driver_command(argv_prefix, train_args, state_file, resume, logdir, recoveries)
        while True:
            state_file.unlink(missing_ok=True)
            driver = _Driver(cmd)
            if on_driver is not None:
                on_driver(driver.pid)
            returncode = driver.wait()
            failed_at = time.time()
            if returncode in (0, 2) or driver.stopped:
                return returncode if returncode >= 0 else 128 - returncode
            state = _read_state(state_file)
            cause = state.failure if state is not None and state.failure else _death(returncode)
            if returncode >= 0 and returncode != RECOVERABLE_EXIT:
                return returncode  # the driver printed its own line (or traceback): not ours to retry
            if state is None:
                print(f"opefo train: {cause} before its run was set up; nothing to resume", file=sys.stderr)
                return 1
            if recoveries >= state.max_failures:
                print(f"opefo train: {cause}; not recovered: max_failures = {state.max_failures} "
                      f"{'recovery' if state.max_failures == 1 else 'recoveries'} used "
                      f"(the run's checkpoints are in {state.run_dir / 'checkpoints'})", file=sys.stderr)
                return 1
            recoveries += 1
            from opefo_rllib.checkpoints import latest_checkpoint

            checkpoint = latest_checkpoint(state.run_dir)
            if checkpoint is not None and _checkpoint_iteration(checkpoint) >= state.iterations:
                print(f"opefo train: {cause} after its last checkpoint {checkpoint}; the run is complete",
                      file=sys.stderr)
                return 0
            set_aside = _set_aside_logs(state.run_dir, recoveries) if checkpoint is None else None
            start = checkpoint if checkpoint is not None else resume
            print(f"opefo train: {cause}; recovery {recoveries} of {state.max_failures}: "
                  + (f"resuming from {checkpoint}" if checkpoint is not None else "no checkpoint yet, starting over"
                     + (f" (the first attempt's logs: {set_aside})" if set_aside else "")), file=sys.stderr, flush=True)
            with open(state.run_dir / RECOVERIES_FILE, "a") as log:
                log.write(json.dumps({"recovery": recoveries, "cause": cause, "returncode": returncode,
                                      "checkpoint": None if checkpoint is None else str(checkpoint),
                                      "failed_at": failed_at}) + "\n")
            cmd = _driver_command(argv_prefix, train_args, state_file, start, state.run_dir, recoveries)
