"""Runs that are never lost (issue 15), verifier and data side: the pool breaks loudly instead
of hanging, every wait has a deadline, workers start isolated, skipped rows are counted, workers
close with the env, the dataset fingerprint covers contents, verifier timeouts are flagged."""

import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pool_jobs
import pytest

from opefo_rllib.envs import MathEnv, MathVerifier, Problem, ProblemDataset, TextEnv, VerifyResult, load_problems
from opefo_rllib.envs import pool as pool_module
from opefo_rllib.envs.pool import WorkerPool, wait_all
from opefo_rllib.envs.verifier import _failure

WAIT_S = 30  # every wait in these tests is bounded: a regression fails, it does not hang


def _is_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _worker_pids(pool: WorkerPool) -> list[int]:
    return [w.proc.pid for w in pool._workers]


def _error_within(fn, seconds: float = WAIT_S) -> BaseException | None:
    """Run ``fn`` in a thread; its exception, or fail the test if it is still waiting after ``seconds``."""
    outcome: list = []

    def run():
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{fn} still waiting after {seconds} s: it hangs instead of failing"
    return outcome[0]


# --------------------------------------------------------------------------- 1. the pool never hangs


def test_cancelled_future_does_not_break_the_pool():
    with WorkerPool(pool_jobs.sleep_then, num_workers=1, on_failure=pool_jobs.failure, jobs_in_flight=1) as pool:
        assert pool.submit(0, "warm").result(timeout=WAIT_S) == "warm"  # the worker is up
        busy = pool.submit(1.0, "busy")
        queued = [pool.submit(0, "cancelled-1"), pool.submit(0, "cancelled-2")]
        assert all(f.cancel() for f in queued)  # still queued behind "busy": cancellable
        after = pool.submit(0, "after")
        assert busy.result(timeout=WAIT_S) == "busy"
        assert after.result(timeout=WAIT_S) == "after"
        assert pool.broken is None
        assert pool.stats()["completed"] == 3  # the cancelled jobs never ran


def test_cancelled_verifier_answer_leaves_the_verifier_working():
    v = MathVerifier(num_workers=1)
    try:
        futures = v.verify_batch_async(["\\boxed{1}"] * 4, ["1"] * 4)
        cancelled = [f.cancel() for f in futures[1:]]
        assert futures[0].result(timeout=WAIT_S).reward == 1.0
        assert v.verify("\\boxed{2}", "2").reward == 1.0
        assert v.pool.broken is None and any(cancelled)
    finally:
        v.close()


def test_failed_worker_restart_fails_waiting_jobs_instead_of_hanging(monkeypatch):
    with WorkerPool(pool_jobs.crash, num_workers=1, on_failure=pool_jobs.failure, jobs_in_flight=1) as pool:
        def no_more_processes(*args, **kwargs):
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(pool_module, "_Worker", no_more_processes)  # the restart after the crash fails
        crashed, waiting = pool.submit(3), pool.submit(4)
        assert crashed.result(timeout=WAIT_S)["failed"] == "crash"
        failed = waiting.result(timeout=WAIT_S)
        assert failed["failed"] == "error"
        assert "worker pool broken" in failed["message"] and "Too many open files" in failed["message"]
        assert "replacement worker" in pool.broken
        with pytest.raises(RuntimeError, match="WorkerPool is broken: could not start a replacement worker"):
            pool.submit(5)


def test_dispatcher_death_fails_pending_jobs_and_refuses_new_ones(monkeypatch, caplog):
    with WorkerPool(pool_jobs.sleep_then, num_workers=1, on_failure=pool_jobs.failure) as pool:
        assert pool.submit(0, "warm").result(timeout=WAIT_S) == "warm"

        def receive_fails(index, worker):
            raise ValueError("dispatcher bug")

        monkeypatch.setattr(pool, "_receive", receive_fails)
        futures = [pool.submit(0.2, i) for i in range(3)]
        results = [f.result(timeout=WAIT_S) for f in futures]
        assert all(r["failed"] == "error" for r in results)
        assert all("dispatcher thread died (ValueError: dispatcher bug)" in r["message"] for r in results)
        with pytest.raises(RuntimeError, match="broken: dispatcher thread died"):
            pool.submit(0, "late")
    assert "dispatcher thread died" in caplog.text


# --------------------------------------------------------------------------- 2. waits have deadlines


def test_wait_all_names_what_it_waited_for_and_how_many_were_pending():
    done: Future = Future()
    done.set_result(1)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"verifying step 7: 2 of 3 still pending after 0.2 s"):
        wait_all([done, Future(), Future()], 0.2, "verifying step 7")
    assert time.monotonic() - start < 5


class _StuckEnv(TextEnv):
    """Scores never arrive, as with a verifier whose pool is stuck."""

    def sample_problem(self, rng):
        return Problem(id="p", prompt="1+1=", answer="2")

    def score_batch_async(self, problems, responses):
        return [Future() for _ in responses]

    def score_deadline_s(self, num_answers):
        return 0.3


def test_textenv_score_batch_fails_with_a_deadline_instead_of_hanging():
    env = _StuckEnv()
    error = _error_within(lambda: env.score_batch([env.sample_problem(None)] * 2, ["2", "3"]))
    assert isinstance(error, TimeoutError) and "_StuckEnv.score_batch: scores: 2 of 2 still pending" in str(error)


def test_verifier_deadline_grows_with_the_answers_per_worker():
    v = MathVerifier(num_workers=2, timeout_s=5.0)
    assert v.wait_deadline_s(2) < v.wait_deadline_s(4) < v.wait_deadline_s(40)
    assert v.wait_deadline_s(4) >= 2 * 5.0  # two rounds of answers per worker, at least


# --- LLMEnvRunner.sample, without Ray or engines: a fake fleet answers every prompt at once.


class _FakeFleet:
    def __init__(self):
        self.shutdowns = 0

    def submit(self, prompts, n, sampling, seed, chunks=1):
        return [(list(range(len(prompts))), n)]

    def wait_any(self, pending, step):
        idx, n = pending[0]
        groups = [[SimpleNamespace(response_ids=[2], prompt_index=i, sampling_logp=[-0.5], weight_version=0,
                                   finished=False) for _ in range(n)] for i in range(len(idx))]  # "2": no stop id
        return idx, groups, 0.0, pending[1:], 0

    def shutdown(self):
        self.shutdowns += 1


class _FakeTokenizer:
    def encode(self, text):
        return [ord(c) % 64 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(i) for i in ids)


def _runner(env):
    from opefo_rllib.config.sections import PromptSettings
    from opefo_rllib.rollout.env_runner import LLMEnvRunner
    from opefo_rllib.rollout.prompts import PromptBuilder

    runner = LLMEnvRunner.__new__(LLMEnvRunner)  # skips Ray and the engines; sample() needs only these
    from opefo_rllib.config import SECTIONS

    pipeline_defaults = {f.name: f.default for f in SECTIONS["rollout"].fields()}  # sync, no filtering
    runner.config = SimpleNamespace(env="test/Fake-v0", prompts_per_batch=2, group_size=2, seed=0, max_new_tokens=8,
                                    **pipeline_defaults)
    runner.env, runner.fleet, runner.tokenizer, runner.sampling = env, _FakeFleet(), _FakeTokenizer(), None
    runner.prompts = PromptBuilder(runner.tokenizer, PromptSettings())  # raw prompts, no length limit
    runner._next_group_id, runner._sample_calls = 0, 0
    runner._ahead, runner._ahead_in_file = None, False
    runner.episodes = None  # a single-turn env
    runner.num_env_steps_sampled_lifetime = 0
    return runner


def test_runner_verification_wait_fails_naming_the_step_and_pending_answers():
    runner = _runner(_StuckEnv())
    error = _error_within(runner.sample)
    assert isinstance(error, TimeoutError)
    assert "(step 0, env 'test/Fake-v0'): verifying answers: 4 of 4 still pending after 0.3 s" in str(error)


# --------------------------------------------------------------------------- 3. isolated workers

SHADOW = """
import pathlib
pathlib.Path({marker!r}).write_text("the cwd's math_verify was imported")
raise ImportError("this is not the real math_verify")
"""


def test_workers_ignore_a_math_verify_module_in_the_cwd_and_pythonpath(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    (tmp_path / "math_verify.py").write_text(SHADOW.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    v = MathVerifier(num_workers=1)
    try:
        res = v.verify("\\boxed{\\frac{1}{2}}", "0.5")
    finally:
        v.close()
    assert not marker.exists()
    assert res.reward == 1.0 and res.error is None


JOB_MODULE = """
def math_verify_file():
    import math_verify
    return math_verify.__file__
"""


def test_job_module_folder_is_searched_last_so_it_cannot_shadow_installed_packages(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "faults_tmp_jobs.py").write_text(JOB_MODULE)
    (jobs / "math_verify.py").write_text(SHADOW.format(marker=str(tmp_path / "imported.txt")))
    monkeypatch.syspath_prepend(str(jobs))
    import faults_tmp_jobs

    with WorkerPool(faults_tmp_jobs.math_verify_file, num_workers=1, on_failure=pool_jobs.failure) as pool:
        found = pool.submit().result(timeout=WAIT_S)
    assert isinstance(found, str) and "site-packages" in found, found
    assert not (tmp_path / "imported.txt").exists()


# --------------------------------------------------------------------------- 4. skipped rows are counted


def _write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_skipped_rows_are_logged_with_file_line_and_counted_on_the_env(tmp_path, caplog):
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?"}, {"problem": "3+3?", "answer": "6"}, "{oops"]
    path = _write_rows(tmp_path / "math.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        env = MathEnv(data_files=str(path), verifier=MathVerifier(num_workers=1),
                      loader_kwargs={"on_bad_row": "skip", "id_field": None})
    assert env.skipped_rows == 2 and len(env.dataset) == 2
    row_warnings = [r.getMessage() for r in caplog.records if "skipped bad dataset row" in r.getMessage()]
    assert len(row_warnings) == 2
    assert f"{path}:2: field 'answer': missing" in row_warnings[0]
    assert f"{path}:4" in row_warnings[1] and "invalid JSON" in row_warnings[1]


class _SkippingEnv(TextEnv):
    skipped_rows = 3

    def sample_problem(self, rng):
        return Problem(id="p", prompt="1+1=", answer="2")

    def score(self, problem, response):
        return VerifyResult(reward=float(response == problem.answer), correct=response == problem.answer)


def test_runner_returns_skipped_rows_with_the_batch():
    runner = _runner(_SkippingEnv())
    sampled = runner.sample()
    rollouts = sampled.rollouts
    assert len(rollouts) == 4 and all(r.reward == 1.0 for r in rollouts)  # the fake engine answers "2"
    assert sampled.metrics == {"data/skipped_rows": 3.0, "rollout/prompts_skipped_too_long": 0.0,
                                "rollout/groups_filtered": 0.0, "rollout/refill_rounds": 0.0,
                                "rollout/batch_shortfall": 0.0}


# --------------------------------------------------------------------------- 5. workers close with the env


def test_env_close_stops_the_verifier_workers_and_is_idempotent():
    env = MathEnv(problems=[Problem(id="a", prompt="1+1?", answer="2")], verifier=MathVerifier(num_workers=2))
    env.reset(seed=0)
    assert env.score_batch([env.problem], ["\\boxed{2}"])[0].reward == 1.0
    pids = _worker_pids(env.verifier.pool)
    assert all(_is_running(pid) for pid in pids)
    env.close()
    env.close()
    assert not any(_is_running(pid) for pid in pids)


def test_runner_stop_closes_the_env_workers_and_leaves_the_fleet_to_its_owner():
    env = MathEnv(problems=[Problem(id="a", prompt="1+1?", answer="2")], verifier=MathVerifier(num_workers=1))
    runner = _runner(env)
    runner.sample()  # starts the verifier workers
    fleet, pids = runner.fleet, _worker_pids(env.verifier.pool)
    runner.stop()
    runner.stop()
    assert fleet.shutdowns == 0  # the Algorithm owns the fleet and shuts it down
    assert not any(_is_running(pid) for pid in pids)


ORPHANING_PARENT = """
import os, sys, time
sys.path.insert(0, {tests!r})
import pool_jobs
from opefo_rllib.envs.pool import WorkerPool
pool = WorkerPool(pool_jobs.touch_then_sleep, num_workers=1, timeout_s=600)
pool.submit({started!r}, 600)  # busy: the worker will not notice its socket close
while not os.path.exists({started!r}):
    time.sleep(0.05)
print(pool._workers[0].proc.pid, flush=True)
os._exit(0)  # killed, as ray.shutdown() kills an env-runner actor: no close(), no atexit
"""


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    import subprocess
    import sys

    code = ORPHANING_PARENT.format(tests=os.path.dirname(pool_jobs.__file__),
                                   started=str(tmp_path / "started"))
    log_path = tmp_path / "parent.log"
    with open(log_path, "w") as log:  # a file, not a pipe: the worker holds its copy open while it lives
        proc = subprocess.run([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0, log_path.read_text()[-2000:]
    pid = int(log_path.read_text().split()[-1])
    deadline = time.monotonic() + 15
    while _is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _is_running(pid), f"worker {pid} outlived its killed parent"


# --------------------------------------------------------------------------- 6. content fingerprint


def test_fingerprint_changes_when_an_answer_is_edited_even_without_ids(tmp_path):
    rows = [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(5)]
    path = _write_rows(tmp_path / "d.jsonl", rows)
    saved = ProblemDataset(load_problems(path, id_field=None).problems).state_dict()
    rows[3]["answer"] = "42"
    _write_rows(path, rows)
    edited = ProblemDataset(load_problems(path, id_field=None).problems)
    assert edited.fingerprint() != saved["fingerprint"]
    with pytest.raises(ValueError, match="different dataset"):
        edited.load_state_dict(saved)


def test_checkpoints_with_the_old_ids_only_fingerprint_still_resume(caplog):
    problems = [Problem(id=f"q{i}", prompt=f"p{i}", answer=str(i)) for i in range(4)]
    ds = ProblemDataset(problems, seed=2)
    ds.take(3)
    old = {**ds.state_dict(), "fingerprint": ds._ids_fingerprint()}
    del old["fingerprint_version"]
    resumed = ProblemDataset(problems, seed=2)
    resumed.load_state_dict(old)
    assert (resumed.epoch, resumed.position) == (ds.epoch, ds.position)
    assert "covers ids only" in caplog.text


# --------------------------------------------------------------------------- 7. timeouts are flagged


def test_a_verification_past_the_time_limit_is_flagged_timed_out_not_wrong():
    v = MathVerifier(num_workers=1, timeout_s=1.0)
    v._pool = WorkerPool(pool_jobs.slow_verify, 1, 1.0, _failure)  # a verify job that outlives the limit
    try:
        res = v.verify("\\boxed{2}", "2")
    finally:
        v.close()
    assert res.timed_out is True and res.error.startswith("timeout: ") and res.reward == 0.0
    assert v.stats()["timeouts"] == 1
