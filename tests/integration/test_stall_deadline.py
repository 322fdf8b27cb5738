"""Deadlines by progress (issue 21, item 4): a generation still producing tokens runs on past the
stall window, one that produces none ends in one line naming the engine, the step and the tokens
so far; every timeout path of the CLI ends in one line on stderr and exit status 1 (``--debug``:
the traceback); ``opefo eval`` reports progress while a call runs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest

from opefo_rllib.cli import failure_line
from opefo_rllib.evaluation.runner import GenerationProgress
from opefo_rllib.fleet.deadlines import EngineProgress, EngineStalled, ProgressWatch, stall_message
from opefo_rllib.fleet.engine import SamplingConfig
from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
from opefo_rllib.progress import EvalProgressBar

NEVER = 10**6  # an EOS id no model emits: every response runs to max_new_tokens (known token counts)
SMALL = ["--set", "prompts_per_batch=2", "--set", "group_size=2", "--set", "max_new_tokens=4",
         "--set", "ray={num_cpus: 2}", "--set", "log_text_every=0", "--set", "iterations=2"]


# --------------------------------------------------------------------------- pieces, no Ray

def test_a_window_restarts_only_when_the_token_count_moves():
    watch = ProgressWatch(stall_timeout_s=2.0)
    watch.observe(0, EngineProgress("generate", 0, 5), now=0.0)
    watch.observe(1, EngineProgress("generate", 0, 9), now=0.0)
    watch.observe(0, EngineProgress("generate", 3, 8), now=1.5)  # engine 0 moved
    watch.observe(1, EngineProgress("generate", 0, 9), now=1.5)  # engine 1 did not
    watch.observe(1, None, now=1.9)  # no answer is no progress
    assert watch.stalled([0, 1], now=2.5) == [1]
    assert watch.stalled([0, 1], now=3.6) == [0, 1]


def test_the_stall_message_is_one_line_with_engine_step_and_tokens():
    line = stall_message("generation at step 7", 1, 2, EngineProgress("generate", 41, 300), 2.0)
    assert "\n" not in line
    assert "generation at step 7: engine 1 (of 2) produced no token for 2 s" in line
    assert "41 tokens so far in this call" in line


class _RemoteError(Exception):
    """Like Ray's RayTaskError: a wrapper whose message is the remote traceback, with ``cause``."""

    def __init__(self, cause):
        super().__init__("Traceback (most recent call last):\n  File ...\nsomething")
        self.cause = cause


def test_failure_line_finds_the_timeout_under_wrappers_and_ignores_other_errors():
    stalled = EngineStalled("generation at step 3: engine 0 (of 1) produced no token for 1 s")
    try:
        try:
            raise _RemoteError(stalled)
        except _RemoteError as e:
            raise RuntimeError("RLlib re-raised") from e
    except RuntimeError as outer:
        assert failure_line(outer) == str(stalled)
    assert failure_line(TimeoutError("weight sync to version 1 at step 1 timed out\nmore")) == (
        "weight sync to version 1 at step 1 timed out")
    assert failure_line(ValueError("a bug")) is None  # not a run failure: the traceback shows


def _progress(done, tokens, budget_done, seconds):
    return GenerationProgress("set", done, 8, tokens, budget_done, 8 * 16, seconds)


def test_off_a_terminal_progress_is_sparse_lines_with_rate_and_eta():
    out = io.StringIO()
    bar = EvalProgressBar(out, tty=False, line_every_s=3600)
    bar(_progress(0, 10, 10, 1.0))
    bar(_progress(2, 40, 40, 2.0))
    bar(_progress(8, 100, 128, 4.0))  # the set's last answer: always a line
    lines = out.getvalue().splitlines()
    assert lines == ["  set: 8/8 answers, 100 tokens, 25.0 tok/s"], lines
    out = io.StringIO()
    bar = EvalProgressBar(out, tty=False, line_every_s=0)
    bar(_progress(2, 32, 64, 2.0))
    assert out.getvalue() == "  set: 2/8 answers, 32 tokens, 16.0 tok/s, ~0m02s left\n"


def test_on_a_terminal_the_bar_moves_with_running_tokens():
    out = io.StringIO()
    bar = EvalProgressBar(out, tty=True)
    bar(_progress(0, 16, 16, 1.0))  # no answer finished yet: the bar moves on running tokens
    assert bar._bar.n == 16 and "16.0 tok/s, 0/8 answers" in out.getvalue()
    bar.close()


def test_hf_engine_counts_its_tokens_as_it_samples():
    from opefo_rllib.fleet.hf_engine import HFEngine

    engine = HFEngine(str(TINY_DEFAULT_PATH), eos_token_id=NEVER)
    engine.generate([[5, 6, 7], [8, 9]], 3, SamplingConfig(max_new_tokens=5), seed=0)
    assert engine.generated_tokens() == 2 * 3 * 5
    engine.generate([[5]], 2, SamplingConfig(max_new_tokens=4), seed=1)
    assert engine.generated_tokens() == 30 + 8


# --------------------------------------------------------------------------- the fleet (Ray)

@pytest.fixture
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _fleet(token_delay_s: float, stall_timeout_s: float):
    from opefo_rllib.fleet.fleet import EngineFleet

    return EngineFleet("hf", engine_kwargs={"model_path": str(TINY_DEFAULT_PATH), "eos_token_id": NEVER,
                                            "token_delay_s": token_delay_s}, stall_timeout_s=stall_timeout_s)


@pytest.mark.slow
def test_a_generation_producing_tokens_runs_past_the_stall_window(ray_session):
    fleet = _fleet(token_delay_s=0.2, stall_timeout_s=1.0)  # 12 tokens: ~2.4 s, over twice the window
    reports = []
    try:
        pending = fleet.submit([[5, 6], [7]], 2, SamplingConfig(max_new_tokens=12), seed=0)
        idx, results, seconds, rest, engine = fleet.wait_any(pending, step=3, on_progress=lambda r: reports.append(r))
    finally:
        fleet.shutdown()
    assert rest == [] and list(idx) == [0, 1]
    assert all(len(r.response_ids) == 12 for group in results for r in group)
    assert seconds > 1.0  # it did outlive the window
    # progress was answered while generate ran: partial counts of the running call
    partial = [r[0].call_tokens for r in reports if 0 in r and r[0].call == "generate"]
    assert any(0 < t < 4 * 12 for t in partial), partial


@pytest.mark.slow
def test_a_stalled_generation_ends_in_one_line_naming_engine_step_and_tokens(ray_session):
    fleet = _fleet(token_delay_s=600.0, stall_timeout_s=1.0)  # the first token never comes
    try:
        pending = fleet.submit([[5, 6]], 2, SamplingConfig(max_new_tokens=4), seed=0)
        start = time.monotonic()
        with pytest.raises(EngineStalled) as caught:
            fleet.wait_any(pending, step=5)
        assert time.monotonic() - start < 60  # the stall window, not the engine's 600 s sleep
        shut = time.monotonic()
    finally:
        fleet.shutdown()
    assert time.monotonic() - shut < 20  # the stalled engine was killed: shutdown does not wait for it
    message = str(caught.value)
    assert "\n" not in message
    assert "generation at step 5: engine 0 (of 1) produced no token for 1 s" in message
    assert "0 tokens so far in this call" in message


@pytest.mark.slow
def test_the_optional_hard_cap_ends_a_wait_even_while_tokens_come(ray_session):
    from opefo_rllib.fleet.deadlines import GenerationTimeout
    from opefo_rllib.fleet.fleet import EngineFleet

    fleet = EngineFleet("hf", engine_kwargs={"model_path": str(TINY_DEFAULT_PATH), "eos_token_id": NEVER,
                                             "token_delay_s": 0.2}, stall_timeout_s=30.0, generate_timeout_s=1.0)
    try:
        pending = fleet.submit([[5, 6]], 1, SamplingConfig(max_new_tokens=200), seed=0)  # ~40 s of tokens
        with pytest.raises(GenerationTimeout, match=r"generation at step 2: still running after 1 s "
                                                    r"\(generate_timeout_s; engines \[0\] of 1 busy"):
            fleet.wait_any(pending, step=2)
        shut = time.monotonic()
    finally:
        fleet.shutdown()
    assert time.monotonic() - shut < 20  # the busy engine was killed: the shutdown did not wait out its call


@pytest.mark.slow
def test_eval_progress_moves_while_a_call_runs(ray_session):
    from opefo_rllib.evaluation.codec import Codec, model_tokenizer
    from opefo_rllib.evaluation.runner import eval_fleet, evaluate_task
    from opefo_rllib.config.eval_spec import EvalSpec
    from opefo_rllib.evaluation.tasks import env_task

    codec = Codec(model_tokenizer(TINY_DEFAULT_PATH))
    task = env_task("opefo/Arithmetic-v0", num_problems=2, exclude_draws=0)
    fleet = eval_fleet("hf", 1, TINY_DEFAULT_PATH, codec, 1.0, stall_timeout_s=1.0,
                       extra_engine_kwargs={"token_delay_s": 0.2, "eos_token_id": NEVER})
    seen: list[GenerationProgress] = []
    try:
        report = evaluate_task(fleet, codec, task, EvalSpec(samples=2, pass_k=(1, 2), max_new_tokens=8),
                               progress=seen.append)
    finally:
        task.close()
        fleet.shutdown()
    assert report.metrics["response_length_mean"] == 8  # one call of ~1.6 s: longer than the 1 s window
    assert any(p.answers_done == 0 and p.tokens > 0 for p in seen), seen  # moved before the call returned
    assert seen[-1].answers_done == seen[-1].answers == 4 and seen[-1].budget_done == seen[-1].budget == 32
    assert [p.budget_done for p in seen] == sorted(p.budget_done for p in seen)  # never goes back


# --------------------------------------------------------------------------- the CLI's timeout paths

def _cli(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "opefo_rllib.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _assert_one_error_line(proc, command: str, *needles: str) -> None:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"opefo {command}: "), proc.stderr[-4000:]
    for needle in needles:
        assert needle in last, (needle, last)
    assert sum(needles[0] in ln for ln in proc.stderr.splitlines()) == 1, proc.stderr[-4000:]  # said once


EVAL_STALL = ["eval", "tiny-default", "--task", "opefo/Arithmetic-v0", "--num-problems", "2", "--samples", "1",
              "--max-new-tokens", "4", "--stall-timeout-s", "1", "--engine-kwargs", "{token_delay_s: 600}"]


@pytest.mark.slow
def test_eval_stall_is_one_line_and_exit_1(tmp_path):
    proc = _cli(*EVAL_STALL, cwd=tmp_path)
    _assert_one_error_line(proc, "eval", "engine 0", "step 0", "produced no token for 1 s", "tokens so far")


@pytest.mark.slow
def test_eval_stall_with_debug_shows_the_traceback(tmp_path):
    proc = _cli("--debug", *EVAL_STALL, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "EngineStalled" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_train_stall_is_recovered_once_then_one_line_and_exit_1(tmp_path):
    """A stall is a failure a restart may not meet again: the supervisor restarts the run
    (max_failures 1, no checkpoint yet: from the start), the engine stalls again, and the run ends
    in one line naming the stall and that recovery was spent."""
    proc = _cli("train", *SMALL, "--set", "engine_kwargs={token_delay_s: 600}", "--set", "stall_timeout_s=1",
                "--set", "max_failures=1", "--logdir", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("opefo train: ")]
    assert len(ours) == 2, proc.stderr[-4000:]
    assert "produced no token for 1 s" in ours[0] and "recovery 1 of 1: no checkpoint yet, starting over" in ours[0]
    assert "engine 0" in ours[1] and "step 0" in ours[1] and "produced no token for 1 s" in ours[1]
    assert "not recovered: max_failures = 1 recovery used" in ours[1]
    assert len((tmp_path / "run" / "recoveries.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_weight_sync_timeout_is_one_line_and_exit_1(tmp_path):
    proc = _cli("train", *SMALL, "--set", "weight_sync_timeout_s=1e-9", "--set", "max_failures=0",
                "--logdir", str(tmp_path / "run"), cwd=tmp_path)
    _assert_one_error_line(proc, "train", "weight sync", "timed out")
