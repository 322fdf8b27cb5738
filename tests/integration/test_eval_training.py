"""Validation during training: eval_tasks run on the training fleet before training and every
eval_every iterations, land in TensorBoard and RUN/eval/iter_N.json, and a resumed run keeps the
schedule (it follows the restored iteration)."""

import json
import os
import subprocess
import sys

import pytest

from opefo_rllib.cli import main

TASKS = "eval_tasks=[{name: arith, task: opefo/Arithmetic-v0, num_problems: 32, samples: 4, pass_k: [1, 4], " \
        "greedy: true}]"


def test_a_bad_eval_task_is_one_line_naming_the_field(capsys):
    code = main(["config", "--set", "eval_tasks=[{task: opefo/Arithmetic-v0, samples: 2, pass_k: [4]}]"])
    err = capsys.readouterr().err
    assert code == 2 and "'eval_tasks'" in err and "pass@4" in err and len(err.strip().splitlines()) == 1
    code = main(["config", "--set", "eval_tasks=[{data: /nowhere/math.jsonl}]", "--set", "eval_every=5"])
    err = capsys.readouterr().err
    assert code == 2 and "/nowhere/math.jsonl" in err


def test_a_generated_tasks_held_out_set_is_fixed_distinct_and_disjoint_from_the_training_stream():
    from opefo_rllib.envs import ArithmeticEnv
    from opefo_rllib.evaluation.tasks import TRAIN_EPOCH_DRAWS, heldout_problems

    first, excluded = heldout_problems(ArithmeticEnv(), 256)
    again, _ = heldout_problems(ArithmeticEnv(), 256)
    ids = [p.id for p in first]
    assert ids == [p.id for p in again] and len(set(ids)) == 256 and excluded > 0
    trainer = ArithmeticEnv()
    trainer.seed_problems(0)  # as LLMEnvRunner seeds its env (seed 0, the default)
    assert not {p.id for p in trainer.sample_problems(TRAIN_EPOCH_DRAWS)} & set(ids)


def _train(tmp_path, *args):
    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _eval_steps(run_dir, tag):
    from opefo_rllib.evaluation.compare import read_scalars

    return read_scalars(run_dir)[tag][0]


@pytest.mark.slow
def test_eval_before_and_every_n_iterations_and_resume_keeps_the_schedule(tmp_path):
    run = tmp_path / "run"
    common = ["--set", "prompts_per_batch=4", "--set", "group_size=4", "--set", "max_new_tokens=6", "--set",
              "eval_every=2", "--set", "eval_before_train=true", "--set", TASKS, "--set", "checkpoint_every=2"]
    out = _train(tmp_path, *common, "--set", "iterations=2", "--logdir", str(run))
    assert "eval    2  arith/greedy_acc" in out
    assert sorted(p.name for p in (run / "eval").glob("*.json")) == ["iter_000000.json", "iter_000002.json"]
    report = json.loads((run / "eval" / "iter_000002.json").read_text())
    assert report["config"]["weight_version"] == 2  # evaluated after the sync: the policy of iteration 2
    metrics = report["results"]["arith"]
    assert metrics["num_problems"] == 32 and {"greedy_acc", "avg@4", "pass@1", "pass@4", "maj@4"} <= set(metrics)
    assert len((run / "eval" / "iter_000002.problems.jsonl").read_text().splitlines()) == 32
    before = (run / "eval" / "iter_000000.json").stat().st_mtime_ns

    out = _train(tmp_path, "--resume", str(run / "checkpoints" / "iter_000002"), "--set", "iterations=5")
    assert "eval    4  arith/greedy_acc" in out and "eval    3" not in out and "eval    5" not in out
    assert sorted(p.name for p in (run / "eval").glob("*.json")) == ["iter_000000.json", "iter_000002.json",
                                                                      "iter_000004.json"]
    assert (run / "eval" / "iter_000000.json").stat().st_mtime_ns == before  # no second "before training"
    for tag in ("eval/arith/greedy_acc", "eval/arith/avg@4", "eval/arith/pass@4", "eval/arith/maj@4"):
        assert _eval_steps(run, tag) == [0, 2, 4]
