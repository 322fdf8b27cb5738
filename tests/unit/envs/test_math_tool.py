"""opefo/MathTool-v0 (envs/math_tool.py): tool turns run the model's code in the sandbox and show
only its bounded output; hostile code is stopped in bounded time, leaves nothing behind and the
episode goes on; the answer turn is verified by math-verify; max_turns is honoured."""

import copy
import os
import socket
import threading
import time
from pathlib import Path

import gymnasium as gym
import pytest
from sandbox_leftovers import leftovers, snapshot

import opefo_rllib.envs.base as envs_base
from opefo_rllib.envs import MathToolEnv, MathVerifier, Problem, make_env
from opefo_rllib.envs import math_tool
from opefo_rllib.envs.math_tool import extract_code

LIMITS = {"timeout_s": 2.0, "cpu_s": 5, "max_output_chars": 500}
OBS_MAX = LIMITS["max_output_chars"] + 200  # the output block's fences, markers and error tail


def _problem(pid: str = "p1", answer: str = "42") -> Problem:
    return Problem(id=pid, prompt=f"What is 6 * 7? ({pid})", answer=answer)


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(num_workers=1)
    yield v
    v.close()


@pytest.fixture
def env(verifier):
    env = MathToolEnv(problems=[_problem()], verifier=verifier, sandbox=LIMITS, max_turns=50)
    env.reset(seed=0)
    return env


def _code(body: str) -> str:
    return f"I will compute it.\n```python\n{body}\n```\n"


def test_registered_and_the_prompt_explains_the_tool(verifier):
    assert "opefo/MathTool-v0" in gym.registry
    env = make_env("opefo/MathTool-v0", problems=[_problem()], verifier=verifier)
    prompt, info = env.reset(seed=0)
    assert prompt.startswith("What is 6 * 7? (p1)") and "```python" in prompt and "\\boxed{}" in prompt
    assert info == {"task_id": "p1", "turn": 0} and env.max_turns == 4


def test_a_program_runs_and_only_its_output_is_the_observation(env):
    env.render_mode = "ansi"
    prompt = env.problem.prompt
    response = "Let me check.\n```python\nimport sympy\nprint(6 * 7, sympy.isprime(7))\n```"
    obs, reward, terminated, truncated, info = env.step(response)
    assert obs == "\n```output\n42 True\n```\n"  # the new text only: not the prompt, not the response
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["tool_call"] and not info["tool_error"] and not info["tool_timeout"] and info["turn"] == 1
    assert 0 < info["tool_seconds"] < 10 and info["task_id"] == "p1"
    obs2, *_ = env.step(_code("print('again')"))
    assert obs2 == "```output\nagain\n```\n"  # the response ended with a newline: none is added
    assert env.render() == prompt + response + obs + _code("print('again')") + obs2


def test_the_answer_turn_is_verified_by_math_verify(env):
    obs, reward, terminated, truncated, info = env.step("So the answer is \\boxed{42}.")
    assert (obs, reward, terminated, truncated) == ("", 1.0, True, False)
    assert info["correct"] and info["extracted"] == "42" and info["tool_call"] is False and info["turn"] == 1
    env.reset()
    _, reward, terminated, _, info = env.step("\\boxed{41}")
    assert reward == 0.0 and terminated and not info["correct"]


def test_max_turns_makes_the_last_turn_the_answer_even_with_code(verifier):
    env = MathToolEnv(problems=[_problem()], verifier=verifier, max_turns=2, sandbox=LIMITS)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(_code("print(42)"))
    assert not terminated and info["tool_call"]
    obs, reward, terminated, _, info = env.step(_code("print(1)") + "\\boxed{42}")
    assert terminated and obs == "" and reward == 1.0 and info["tool_call"] is False and info["turn"] == 2
    single = MathToolEnv(problems=[_problem()], verifier=verifier, max_turns=1)
    single.reset(seed=0)
    assert single.step(_code("print(42)"))[2] is True  # one turn: it is the answer


def _hostile_cases(tmp_path: Path, port: int) -> dict:
    """name: (code, check of (obs, info)) -- each must be stopped or contained."""
    passwd = Path("/etc/passwd").read_text().splitlines()[0]
    project_file = os.path.realpath(envs_base.__file__)
    outside = tmp_path / "outside.txt"
    return {
        "infinite loop": ("while True: pass", lambda o, i: i["tool_timeout"] and "Timed out after 2s" in o),
        "fork bomb": ("import os\nwhile True: os.fork()", lambda o, i: i["tool_error"]),
        "10 GB": ("x = bytearray(10 * 1024**3)\nprint(len(x))", lambda o, i: "MemoryError" in o),
        "print 100 MB": ("print('x' * 100_000_000)", lambda o, i: i["tool_truncated"] and "Output limit" in o),
        "/etc/passwd": ("print(open('/etc/passwd').read())", lambda o, i: passwd not in o and i["tool_error"]),
        "project file": (f"print(open({project_file!r}).read())",
                         lambda o, i: "class TextEnv" not in o and i["tool_error"]),
        "write outside": (f"open({str(outside)!r}, 'w').write('pwned')",
                          lambda o, i: outside.read_text() == "original" and i["tool_error"]),
        "socket": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')",
                   lambda o, i: "connected" not in o and i["tool_error"]),
        "kill parent": ("import os\nos.kill(os.getppid(), 9)\nos.kill(-1, 9)\nprint('done')", lambda o, i: True),
        "import from cwd": ("import evil_mod", lambda o, i: "ModuleNotFoundError" in o and "EVIL" not in o),
    }


def test_hostile_programs_are_contained_and_the_episode_goes_on(env, tmp_path, monkeypatch):
    (tmp_path / "evil_mod.py").write_text("print('EVIL')\n")
    (tmp_path / "outside.txt").write_text("original")
    monkeypatch.chdir(tmp_path)
    before = snapshot()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        for name, (code, check) in _hostile_cases(tmp_path, listener.getsockname()[1]).items():
            start = time.monotonic()
            obs, reward, terminated, truncated, info = env.step(_code(code))  # never raises
            took = time.monotonic() - start
            assert took < LIMITS["timeout_s"] + 10, (name, took)  # slack for a loaded machine (the loop would never end)
            assert len(obs) <= OBS_MAX and obs.startswith("```output\n"), (name, len(obs), obs[:200])
            assert check(obs, info), (name, obs, info)
            assert (reward, terminated, truncated) == (0.0, False, False) and info["tool_call"], name
            assert leftovers(before) == set(), name
            after, *_ = env.step(_code("print('fine')"))  # the episode and the sandbox go on
            assert after == "```output\nfine\n```\n", (name, after)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    assert not (tmp_path / "new.txt").exists()


def test_errors_show_a_bounded_tail(env):
    obs, *_, info = env.step(_code("print('start')\ndef f(n): return f(n + 1)\nf(0)"))
    assert info["tool_error"] and obs.startswith("```output\nstart\n") and "RecursionError" in obs
    assert len(obs) <= OBS_MAX
    obs, *_, info = env.step(_code("import sys; sys.exit(3)"))
    assert obs == "```output\nExited with code 3\n```\n" and info["tool_error"]


def test_a_failing_sandbox_becomes_an_observation(env, monkeypatch):
    def broken(code, limits):
        raise OSError("no more processes")

    monkeypatch.setattr(math_tool, "run_python", broken)
    obs, reward, terminated, _, info = env.step(_code("print(1)"))
    assert "sandbox error: OSError: no more processes" in obs and info["tool_error"] and not terminated


def test_copies_step_concurrently_without_sharing_episode_state(verifier):
    base = MathToolEnv(problems=[_problem()], verifier=verifier, sandbox=LIMITS)
    # The trainer's episodes: shallow copies (TextEnv.new_episode), stepped at once in threads.
    episodes = [base.new_episode(_problem(f"q{k}", answer=str(k))) for k in range(3)]
    episodes.append(copy.copy(base))
    episodes[3].reset(options={"problem": _problem("q3", answer="3")})
    results: dict = {}

    def play(k: int) -> None:
        ep = episodes[k]
        obs1 = ep.step(_code(f"import time; time.sleep(0.3); print('episode', {k})"))
        obs2 = ep.step(f"\\boxed{{{k}}}")
        results[k] = (obs1, obs2, ep.turn)

    threads = [threading.Thread(target=play, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in range(4):
        (obs1, _, _, _, info1), (_, reward, terminated, _, info2), turn = results[k]
        assert obs1 == f"```output\nepisode {k}\n```\n" and info1["task_id"] == f"q{k}"
        assert reward == 1.0 and terminated and turn == 2 and info2["task_id"] == f"q{k}"
    assert base.problem is None and base.turn == 0  # the original was never stepped


def test_extract_code_takes_the_first_python_block():
    assert extract_code("no code here \\boxed{1}") is None
    assert extract_code("```python\nprint(1)\n```\n```python\nprint(2)\n```") == "print(1)\n"
    assert extract_code("text\n```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("stopped at the fence\n```python\nprint(3)\n") == "print(3)\n"  # no closing fence
    assert extract_code("inline ```python print(1)``` is not a block") is None
    assert extract_code("```text\nprint(1)\n```") is None


@pytest.mark.parametrize("kwargs, match", [
    ({"max_turns": 0}, "max_turns"),
    ({"max_turns": "3"}, "max_turns"),
    ({"sandbox": {"timeout": 1}}, "unknown keys"),
    ({"sandbox": {"timeout_s": -1}}, "timeout_s"),
    ({"sandbox": [1]}, "dict"),
    ({"sandbox": {"max_output_chars": 100_000}}, "max_prompt_chars"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MathToolEnv(problems=[_problem()], **kwargs)


def test_a_source_env_poses_its_problems_through_the_tool_template(verifier):
    env = make_env("opefo/MathTool-v0", source="opefo/Arithmetic-v0", verifier=verifier, max_turns=2,
                   source_config={"ops": ["*"], "min_digits": 2, "max_digits": 2, "mul_max_digits": 2,
                                  "template": "What is {expr}?"})
    env.seed_problems(0)
    first = env.sample_problems(3)
    env.seed_problems(0)
    assert [p.id for p in env.sample_problems(3)] == [p.id for p in first]  # seeded like any env
    problem = first[0]
    a, b = problem.id.removeprefix("arith:").split("*")
    assert problem.prompt.startswith(f"What is {a}*{b}?") and "python" in problem.prompt
    episode = env.new_episode(problem)
    observation, *_ = episode.step(_code(f"print({a}*{b})"))
    assert str(int(a) * int(b)) in observation
    assert episode.step(f"\\boxed{{{int(a) * int(b)}}}")[1:3] == (1.0, True)
    with pytest.raises(ValueError, match="not both"):
        MathToolEnv(source="opefo/Arithmetic-v0", problems=[_problem()], verifier=verifier)
    with pytest.raises(ValueError, match="data_files=.*problems= or source="):  # nothing to pose
        MathToolEnv(verifier=verifier)


def test_a_code_turn_ends_at_the_closing_fence(env):
    text = "Let me run it.\n```python\nprint(6*7)\n```\n```output\n41\n```\nso \\boxed{41}"
    end = env.turn_end(text)
    assert text[:end] == "Let me run it.\n```python\nprint(6*7)\n```\n"  # the invented output is dropped
    assert env.turn_end("no code, \\boxed{42}") is None
    assert env.turn_end("```python\nprint(1)") is None  # not closed: the turn is whatever was written
