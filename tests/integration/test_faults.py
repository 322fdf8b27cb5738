"""Fault campaign of `opefo train`: each fault is injected for real and the run must lose
nothing (docs/faults.md, "The fault campaign").

- a loss that turns NaN: the non-finite step is skipped and counted, then a clean stop;
  no checkpoint holds non-finite weights;
- SIGKILL of the driver in the middle of a checkpoint: `--resume` refuses the partial one and
  continues from the last complete one, without duplicate TensorBoard steps;
- resume with a changed batch shape is refused naming the field; a moved run resumes;
  resuming an older checkpoint continues in a new branch, never over newer checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SMALL = ["--set", "prompts_per_batch=4", "--set", "group_size=4", "--set", "max_new_tokens=6",
         "--set", "ray={num_cpus: 2}", "--set", "log_text_every=0"]


def _cli(*args, cwd, expect=0, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opefo_rllib.evaluation.compare import event_dir

    acc = EventAccumulator(str(event_dir(tb_dir)), size_guidance={"scalars": 0})  # RUN/tensorboard/NAME
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def _weights_finite(ckpt: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(ckpt / "hf_policy" / "model.safetensors").values())


NAN_LOSS = textwrap.dedent("""
    import sys
    from opefo_rllib.core import policy_losses
    from opefo_rllib.cli import main

    finite_calls = int(sys.argv.pop(1))
    original, calls = policy_losses.POLICY_LOSSES["pg"], [0]
    def pg_turning_nan(logp, old_logp, advantages, mask, config, generator):
        calls[0] += 1
        loss_mat, metrics = original(logp, old_logp, advantages, mask, config, generator)
        return (loss_mat * float("nan") if calls[0] > finite_calls else loss_mat), metrics
    policy_losses.POLICY_LOSSES["pg"] = pg_turning_nan
    sys.exit(main(sys.argv[1:]))
""")


def test_a_run_whose_loss_turns_non_finite_skips_the_step_then_stops_cleanly(tmp_path):
    """The loss turns NaN after the first update's (the learner runs in the driver: a wrapper
    script makes the registered "pg" loss NaN from then on). A diverging lr used to do it, but
    whether lr 1e3 gives a NaN gradient at all depends on the machine's float kernels."""
    run = tmp_path / "nan_run"
    script = tmp_path / "nan_loss.py"
    script.write_text(NAN_LOSS)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the default run streams 2 chunks, one loss call each: 2 finite calls = the first update
    # max_failures 0: the training runs in the wrapper's own process (no supervisor's driver), patch and all.
    proc = subprocess.run([sys.executable, str(script), "2", "train", *SMALL, "--set", "max_failures=0",
                           "--set", "iterations=12",
                           "--set", "max_nonfinite_steps=1", "--set", "checkpoint_every=1", "--logdir", str(run)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "opefo train: stopped:" in proc.stderr and "non-finite" in proc.stderr
    assert "last finite checkpoint:" in proc.stderr and "Traceback" not in proc.stderr
    assert "optimizer steps skipped, weights kept at version 1" in proc.stderr
    skipped = _scalars(run / "tensorboard", "learner/nonfinite_steps")
    assert [v for _, v in skipped] == [0.0, 1.0], skipped
    norms = _scalars(run / "tensorboard", "learner/grad_norm")
    assert norms[0][1] == norms[0][1] and norms[-1][1] != norms[-1][1], "the non-finite grad norm must show"
    ckpts = sorted((run / "checkpoints").glob("iter_*"))
    assert [c.name for c in ckpts] == ["iter_000001"], proc.stdout
    assert all(_weights_finite(c) for c in ckpts)
    versions = _scalars(run / "tensorboard", "learner/weight_version")
    assert [v for _, v in versions] == [1.0, 1.0], "a skipped step must keep the weight version"


KILL_IN_SAVE = textwrap.dedent("""
    import os, sys, time
    import opefo_rllib.checkpoints as ck
    from opefo_rllib.cli import main

    original = ck._fsync_tree
    def slow_fsync(root):
        if "iter_000003" in str(root):  # the third save: stop half-way and wait to be killed
            open(os.environ["KILL_MARKER"], "w").close()
            time.sleep(600)
        original(root)
    ck._fsync_tree = slow_fsync
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_during_a_checkpoint_then_resume_loses_nothing(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "kill_in_save.py"
    script.write_text(KILL_IN_SAVE)
    marker = tmp_path / "saving"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILL_MARKER": str(marker)}
    # max_failures 0: the save is slowed (and the run killed) in the wrapper's own process.
    proc = subprocess.Popen([sys.executable, str(script), "train", *SMALL, "--set", "max_failures=0",
                             "--set", "iterations=4",
                             "--set", "checkpoint_every=1", "--logdir", str(run)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert marker.exists(), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()

    ckpts = run / "checkpoints"
    partial = [p for p in ckpts.iterdir() if p.name.startswith(".tmp-iter_000003")]
    assert partial and not (ckpts / "iter_000003").exists()
    assert (ckpts / "latest").read_text().strip() == "iter_000002"
    refused = _cli("--resume", str(partial[0]), cwd=tmp_path, expect=2)
    assert "incomplete" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

    resumed = _cli("--resume", str(ckpts / "iter_000002"), cwd=tmp_path)
    assert "at iteration 2" in resumed.stdout and "new branch" not in resumed.stdout
    assert (ckpts / "iter_000003").is_dir() and (ckpts / "iter_000004").is_dir()
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    assert (ckpts / "latest").read_text().strip() == "iter_000004"
    # The killed run had logged iteration 3 before its save; the resumed run's step 3 replaces it.
    steps = [s for s, _ in _scalars(run / "tensorboard", "rollout/reward_mean")]
    assert steps == [1, 2, 3, 4], steps


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-iteration run with a checkpoint every iteration, under ZeRO-2 so that the ZeRO-2
    resume test below resumes a copy of it instead of paying a CLI run of its own; its stdout is
    kept beside it (stdout.txt)."""
    root = tmp_path_factory.mktemp("runs")
    proc = _cli(*SMALL, "--set", "zero_stage=2", "--set", "iterations=3", "--set", "checkpoint_every=1",
                "--logdir", str(root / "run"), cwd=root)
    (root / "stdout.txt").write_text(proc.stdout)
    return root / "run"


def test_resume_refuses_a_changed_batch_shape_naming_the_field(finished_run, tmp_path):
    proc = _cli("--resume", str(finished_run / "checkpoints" / "iter_000003"), "--set", "group_size=8",
                "--set", "iterations=5", cwd=tmp_path, expect=2)
    assert "'group_size'" in proc.stderr and "differs from the checkpoint's" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _cli("--resume", str(finished_run / "checkpoints" / "iter_000003"), cwd=tmp_path, expect=2)
    assert "iterations" in proc.stderr  # nothing left to do: say how to continue


def test_a_moved_run_resumes_where_it_now_lives(finished_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(finished_run, moved)
    proc = _cli("--resume", str(moved / "checkpoints" / "iter_000003"), "--set", "iterations=4",
                "--set", "log_text_every=1", cwd=tmp_path)
    assert str(moved) in proc.stdout
    assert (moved / "checkpoints" / "iter_000004").is_dir()
    assert not (finished_run / "checkpoints" / "iter_000004").exists()
    saved = json.loads((moved / "checkpoints" / "iter_000004" / "opefo_run.json").read_text())
    assert saved["config"]["iterations"] == 4 and saved["config"]["log_text_every"] == 1


def test_resuming_an_older_checkpoint_branches(finished_run, tmp_path):
    before = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    proc = _cli("--resume", str(finished_run / "checkpoints" / "iter_000001"), "--set", "iterations=2",
                cwd=tmp_path)
    assert "new branch" in proc.stdout
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == before
    branch = next((finished_run / "branches").iterdir())
    assert (branch / "checkpoints" / "iter_000002").is_dir()
    assert [s for s, _ in _scalars(branch / "tensorboard", "rollout/reward_mean")] == [2]


def _iteration_numbers(stdout: str, i: int) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.strip().startswith(f"iter {i:4d}/"))
    return line.split("s/it")[0].rsplit(" ", 1)[0]


def test_a_zero2_checkpoint_resumes_to_the_same_iteration(finished_run, tmp_path):
    """A run resumed from iteration 2 reproduces iteration 3 of the uninterrupted run (the module's
    finished run, ZeRO-2). ZeRO-3's resume, which once could not checkpoint at all (a KeyError from
    the client optimizer's state), is test_multi_learner's two-learner ZeRO-3 run and resume."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    straight = (finished_run.parent / "stdout.txt").read_text()
    resumed = _cli("--resume", str(run / "checkpoints" / "iter_000002"), cwd=tmp_path)
    assert "new branch" in resumed.stdout
    assert _iteration_numbers(resumed.stdout, 3) == _iteration_numbers(straight, 3)
