"""The command's conventions: ``--version`` from argparse, ``--debug`` before or after the
command, ``eval --engine`` offering every engine the fleet has, and ``main`` leaving
``sys.path`` alone while a user's env module in the current directory still imports."""

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from opefo_rllib.cli import main
from opefo_rllib.config import ConfigError
from paths import REPO_ROOT

OPEFO = Path(sys.executable).parent / "opefo"  # the console script pip installed


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == version
    # and at once: building the parser imports neither the config (torch) nor Ray
    code = ("import sys\nfrom opefo_rllib.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n"
            "    print(sorted({'torch', 'ray'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.splitlines() == [version, "[]"], out


def test_eval_offers_every_engine_of_the_fleet(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    assert "one of the fleet's engines: hf, vllm, sglang (default hf)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as e:
        main(["eval", "tiny-default", "--task", "opefo/Arithmetic-v0", "--engine", "trt"])
    assert e.value.code == 2 and "invalid choice: 'trt'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--debug", "train", "--set", "lr=abc"], ["train", "--debug", "--set", "lr=abc"],
                                  ["--debug", "config", "--verbose", "--set", "lr=abc"]])
def test_debug_before_or_after_the_command_shows_the_traceback(argv):
    with pytest.raises(ConfigError, match="'lr'"):
        main(argv)


def test_main_leaves_sys_path_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert main(["envs"]) == 0
    assert "opefo/Arithmetic-v0" in capsys.readouterr().out
    assert sys.path == before


ENV_MODULE = textwrap.dedent('''
    import gymnasium as gym
    from opefo_rllib.envs import register_env


    class EchoEnv(gym.Env):
        """Answer the prompt's word back."""

        def __init__(self, word: str = "ok"):
            self.word = word

        def reset(self, *, seed=None, options=None):
            return f"Say {self.word}:", {"answer": self.word}

        def step(self, action):
            return "", float(str(action).strip() == self.word), True, False, {}


    register_env("{name}/Echo-v0", EchoEnv)
''')


def test_an_env_module_in_the_current_directory_imports_without_sys_path(tmp_path, monkeypatch):
    from opefo_rllib.envs.registry import import_env_modules, list_envs

    name = "cwd_echo_envs"
    (tmp_path / f"{name}.py").write_text(ENV_MODULE.replace("{name}", name))
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert str(tmp_path) not in sys.path and "" not in sys.path
    try:
        import_env_modules([name])
        assert f"{name}/Echo-v0" in list_envs() and sys.modules[name].__file__ == str(tmp_path / f"{name}.py")
        assert sys.path == before
    finally:
        sys.modules.pop(name, None)


def test_the_console_script_imports_an_env_module_from_the_current_directory(tmp_path):
    (tmp_path / "myechoenvs.py").write_text(ENV_MODULE.replace("{name}", "my"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(OPEFO), "config", "--set", "env=my/Echo-v0", "--set", "imports=[myechoenvs]"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'my/Echo-v0'" in next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("env "))
    missing = subprocess.run([str(OPEFO), "config", "--set", "imports=[not_here_envs]"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "cannot import module 'not_here_envs'" in missing.stderr
