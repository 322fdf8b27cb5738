"""Automatic recovery of `opefo train` (opefo_rllib/supervisor.py): a learner actor and then the
driver SIGKILLed mid-run; the supervisor resumes each time from the latest checkpoint, and the
curves are those of an uninterrupted run at the same seed, each step once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from opefo_rllib.tools.run_processes import RunProcesses, kill

pytestmark = pytest.mark.slow

# The sync pipeline and the HF engine: an iteration's numbers depend only on the checkpoint and
# the seed, so a recovered run can be compared with an uninterrupted one exactly.
COMMON = ["--set", "pipeline=sync", "--set", "prompts_per_batch=4", "--set", "group_size=4",
          "--set", "max_new_tokens=6", "--set", "eval_every=0", "--set", "eval_before_train=false",
          "--set", "log_text_every=0", "--set", "checkpoint_every=2", "--set", "iterations=8",
          "--set", "num_learners=1", "--set", "ray={num_cpus: 3}"]


def _start(*args: str, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "opefo_rllib.cli", "train", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for(procs, pick, timeout_s: float = 60.0):
    """The first process ``pick(procs)`` returns, waiting for it to appear."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = pick(procs)
        if found:
            return found[0] if isinstance(found, list) else found
        time.sleep(0.2)
    raise AssertionError("the process to kill never appeared")



def test_a_killed_learner_and_a_killed_driver_are_recovered_and_the_curves_are_the_uninterrupted_runs(tmp_path):
    proc = _start(*COMMON, "--set", "max_failures=2", "--logdir", str(tmp_path / "chaos"), cwd=tmp_path)
    procs, out, kills = RunProcesses(proc.pid), [], []
    for line in proc.stdout:
        out.append(line)
        if not kills and line.startswith("  iter    3/8"):
            kills.append("learner")  # the learner dies in iteration 4 or 5: resume from iteration 2 or 4
            assert kill(_wait_for(procs, RunProcesses.learners))
        elif kills == ["learner"] and "resumed from" in line:
            kills.append("driver")  # the new driver dies right after it restored the checkpoint
            assert kill(_wait_for(procs, RunProcesses.driver))
    assert proc.wait(timeout=600) == 0, "".join(out[-40:])
    text = "".join(out)
    assert kills == ["learner", "driver"], text[-3000:]
    assert "recovery 1 of 2: resuming from" in text and "recovery 2 of 2: resuming from" in text, text[-3000:]
    assert "Traceback" not in text

    records = [json.loads(line) for line in (tmp_path / "chaos" / "recoveries.jsonl").read_text().splitlines()]
    assert [r["recovery"] for r in records] == [1, 2]
    assert "learner 0 of 1 died" in records[0]["cause"] and records[0]["returncode"] == 75
    assert records[1]["cause"] == "the driver was killed by SIGKILL" and records[1]["returncode"] == -9

    straight = _start(*COMMON, "--logdir", str(tmp_path / "straight"), cwd=tmp_path)
    log = straight.communicate(timeout=600)[0]
    assert straight.returncode == 0, log[-3000:]

    from opefo_rllib.evaluation.compare import curve_gaps, read_scalars, repeated_steps

    # fault/recoveries: 0 at step 1, then n at the first step the driver after the n-th recovery
    # trained (the second driver died before training one: the third's value replaces its own).
    expected = {1: 0.0} | {int(r["checkpoint"].rsplit("_", 1)[1]) + 1: float(r["recovery"]) for r in records}
    steps, values = read_scalars(tmp_path / "chaos")["fault/recoveries"]
    assert list(zip(steps, values)) == sorted(expected.items())
    assert repeated_steps(tmp_path / "chaos") == {}  # each step once, though iterations ran twice
    gaps = curve_gaps(tmp_path / "chaos", tmp_path / "straight")
    assert len(gaps) > 30 and max(gaps.values()) == 0.0, {t: g for t, g in gaps.items() if g}
