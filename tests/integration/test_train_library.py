"""``opefo_rllib.training.train()`` from Python: a tiny run returns its run directory, last
checkpoint, iterations and metrics, and resumes from that checkpoint; bad input raises the
typed error naming it before Ray starts (through ``opefo train``: one line, exit status 2)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opefo_rllib.checkpoints import CheckpointError
from opefo_rllib.config import ConfigError
from opefo_rllib.run_config import ConfigNotFound
from opefo_rllib.training import TrainResult, train
from paths import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tiny_cpu.yaml"
SMALL = {"iterations": 2, "eval_every": 0, "eval_before_train": False, "prompts_per_batch": 4, "group_size": 4,
         "max_new_tokens": 6, "log_text_every": 0, "export_hf_on_checkpoint": False}


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.mark.slow
def test_train_runs_two_iterations_returns_its_checkpoint_and_resumes_from_it(tmp_path, capsys):
    # The README's call (a shipped config by name), which test_readme leaves to this test.
    result = train("tiny_cpu", overrides=SMALL, logdir=tmp_path / "run")
    assert isinstance(result, TrainResult)
    assert result.run_dir == (tmp_path / "run").resolve() and result.iterations == 2
    assert result.checkpoint == result.run_dir / "checkpoints" / "iter_000002" and result.checkpoint.is_dir()
    assert 0.0 <= result.metrics["rollout/reward_mean"] <= 1.0
    assert "iter    2/2" in capsys.readouterr().out and not _ray_running()  # it started Ray and stopped it

    more = train(resume=result.checkpoint, overrides={"iterations": 3})
    assert (more.run_dir, more.iterations) == (result.run_dir, 3)
    assert more.checkpoint == result.run_dir / "checkpoints" / "iter_000003"
    assert f"resumed from {result.checkpoint} at iteration 2" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="already holds a run's checkpoints"):
        train(TINY, overrides=SMALL, logdir=result.run_dir)


def test_a_bad_key_raises_a_config_error_naming_it_before_ray_starts(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'grup_size'"):
        train(TINY, overrides={"grup_size": 4}, logdir=tmp_path / "run")
    with pytest.raises(ConfigError, match="run config: unknown key 'lrr'"):
        train([TINY, {"lrr": 1e-3}])
    with pytest.raises(ConfigNotFound) as e:
        train("overlays/nope")
    assert e.value.name == "overlays/nope" and "overlays/grpo_strict" in e.value.shipped
    assert not _ray_running() and not (tmp_path / "run").exists()


def test_opefo_train_gives_a_bad_key_as_one_line_and_exit_status_2(tmp_path):
    opefo = Path(sys.executable).parent / "opefo"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(opefo), "train", "--set", "grup_size=4"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stderr.strip().splitlines() if "WARNING" not in ln]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("opefo train: ") and "unknown key 'grup_size'" in lines[0]
