"""A non-editable install carries the configs and the tiny model: `opefo train` runs the default
from a directory outside the checkout, and `--config` takes a shipped config by name."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from paths import REPO_ROOT

pytestmark = pytest.mark.slow

ROOT = REPO_ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install .`` (no dependencies: the test environment has them) into a target folder."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, timeout=600, cwd=build,
                   env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
    return target


def _run(installed, cwd, *argv, timeout=600):
    code = ("import sys, opefo_rllib; from opefo_rllib.cli import main; "
            "print('package at', opefo_rllib.__file__); sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(installed), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_installed_package_holds_configs_and_tiny_model(installed):
    pkg = installed / "opefo_rllib"
    assert (pkg / "configs" / "tiny_cpu.yaml").is_file()
    assert (pkg / "configs" / "overlays" / "grpo_strict.yaml").is_file()
    assert (pkg / "models" / "tiny_default" / "model.safetensors").is_file()
    assert not (installed / "envs").exists() and not (installed / "algorithms").exists()


def test_train_runs_the_default_outside_the_checkout(installed, tmp_path):
    proc = _run(installed, tmp_path, "train", "--set", "iterations=2", "--set", "prompts_per_batch=4",
                "--set", "group_size=4", "--logdir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"package at {installed}" in proc.stdout
    assert "iter    2/2" in proc.stdout and (tmp_path / "run" / "checkpoints" / "iter_000002").is_dir()


def test_config_takes_a_shipped_config_by_name(installed, tmp_path):
    proc = _run(installed, tmp_path, "config", "--config", "tiny_cpu", "--config", "overlays/grpo_strict")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GRPOConfig" in proc.stdout and str(installed) in proc.stdout
    bad = _run(installed, tmp_path, "config", "--config", "overlays/nope")
    assert bad.returncode == 2 and "overlays/grpo_strict" in bad.stderr
