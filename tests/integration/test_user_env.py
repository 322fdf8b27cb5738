"""A user's own environment module trains from the command line: `env: module:env-id` and
`imports: [module]` (docs/environments.md's ReverseEnv, saved as a module in a temporary directory)."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from paths import REPO_ROOT

ENVIRONMENTS_PAGE = REPO_ROOT / "docs" / "environments.md"


def _reverse_env_module(tmp_path: Path) -> str:
    """docs/environments.md's ReverseEnv block, minus its demo lines, as module ``myenvs``."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", ENVIRONMENTS_PAGE.read_text(), flags=re.S) if "ReverseEnv" in b)
    source = block.split("\nenv = gym.make")[0]
    (tmp_path / "myenvs.py").write_text(source)
    return "myenvs"


def _train(tmp_path, *sets):
    args = ["train", "--set", "iterations=2", "--set", "prompts_per_batch=4", "--set", "group_size=4",
            "--set", "max_new_tokens=5", "--logdir", str(tmp_path / f"run{len(list(tmp_path.iterdir()))}")]
    for s in sets:
        args += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "opefo_rllib.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["module:env-id", "imports"])
def test_docs_reverse_env_trains_from_the_command_line(tmp_path, how):
    module = _reverse_env_module(tmp_path)
    sets = [f"env={module}:my/Reverse-v0"] if how == "module:env-id" else \
        ["env=my/Reverse-v0", f"imports=[{module}]"]
    proc = _train(tmp_path, *sets)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "iter    2/2" in proc.stdout and "my/Reverse-v0" in proc.stdout


def test_an_unknown_env_says_how_to_import_a_module(tmp_path, capfd):
    from opefo_rllib.cli import main

    # capfd: opefo train opens the env in its driver process (the supervisor's child), whose stderr is fd 2

    assert main(["train", "--set", "env=my/Nowhere-v0"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "'my/Nowhere-v0'" in err and "opefo/Arithmetic-v0" in err and "module:env-id" in err
    assert main(["train", "--set", "env=nomodule_here:my/X-v0"]) == 2
    assert "cannot import module 'nomodule_here'" in capfd.readouterr().err
    assert main(["config", "--set", "imports=[nomodule_here]"]) == 2
    assert "imports: cannot import module 'nomodule_here'" in capfd.readouterr().err


def test_the_reverse_env_module_registers_its_env(tmp_path):
    _reverse_env_module(tmp_path)
    code = textwrap.dedent("""
        from opefo_rllib.envs import make_env
        env = make_env("myenvs:my/Reverse-v0")
        print(type(env).__name__, env.length)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ReverseEnv 4", out.stderr[-2000:]
