"""Bad input at the command line: one line naming what is wrong, exit status 2, no traceback
(``--debug`` shows it); and `opefo config` prints the resolved, documented config."""

import json
import pathlib

import pytest

from opefo_rllib.cli import main
from paths import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tiny_cpu.yaml"


def _run(capfd, *argv):
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if "WARNING" not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def math_rows(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"id": f"p{i}", "problem": f"What is {i}+1?", "answer": str(i + 1)})
                              for i in range(3)) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}) + "\n"
                   + json.dumps({"id": "b", "problem": "2+2?"}) + "\n")
    return good, bad


@pytest.mark.parametrize("cmd", ["train", "config"])
def test_math_env_without_data_files(capfd, cmd):
    code, _, err = _run(capfd, cmd, "--set", "env=opefo/Math-v0")
    _assert_one_line_error(code, err, f"opefo {cmd}:", "'env'", "data_files")


def test_data_files_naming_a_missing_file(capfd, tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    code, _, err = _run(capfd, "train", "--set", "env=opefo/Math-v0", "--set", f"env_config={{data_files: {missing}}}")
    _assert_one_line_error(code, err, "'env'", str(missing))


def test_a_bad_dataset_row_names_file_line_and_field(capfd, math_rows):
    _, bad = math_rows
    code, _, err = _run(capfd, "train", "--set", "env=opefo/Math-v0", "--set", f"env_config={{data_files: {bad}}}")
    _assert_one_line_error(code, err, f"{bad}:2", "'answer'")


def test_model_path_naming_a_missing_directory(capfd, tmp_path):
    code, _, err = _run(capfd, "train", "--set", f"model_path={tmp_path / 'no_model'}")
    _assert_one_line_error(code, err, "'model_path'", "no_model")


def test_resume_naming_a_missing_checkpoint(capfd, tmp_path):
    code, _, err = _run(capfd, "train", "--resume", str(tmp_path / "iter_000009"))
    _assert_one_line_error(code, err, "--resume", "iter_000009")


@pytest.mark.parametrize("override, field", [("iterations=-1", "iterations"), ("lr=abc", "lr"),
                                             ("grup_size=4", "grup_size"), ("group_size", "group_size")])
def test_bad_values_and_keys(capfd, override, field):
    code, _, err = _run(capfd, "train", "--set", override)
    _assert_one_line_error(code, err, field)


def test_unknown_config_file(capfd, tmp_path):
    code, _, err = _run(capfd, "config", "--config", str(tmp_path / "none.yaml"))
    _assert_one_line_error(code, err, "none.yaml")


def test_debug_shows_the_traceback(capfd):
    from opefo_rllib.run_config import ConfigError

    with pytest.raises(ConfigError, match="'lr'"):
        main(["--debug", "train", "--set", "lr=abc"])


def test_config_prints_sections_values_and_docs(capfd, math_rows):
    good, _ = math_rows
    code, out, _ = _run(capfd, "config", "--config", str(TINY), "--set", "group_size=4",
                        "--set", "env=opefo/Math-v0", "--set", f"env_config={{data_files: {good}}}")
    assert code == 0
    for header in ("[run]", "[rllib]", "[policy_model]", "[generation]", "[fleet]", "[objective]",
                   "[loss_settings]", "[entropy_flow]", "[optimization]", "[deepspeed]", "[logging]"):
        assert header in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("group_size"))
    assert "= 4" in line and "responses sampled per prompt" in line
    assert "'two_sided'" in next(ln for ln in out.splitlines() if ln.strip().startswith("balance_mode"))
