"""What `opefo train`'s supervisor retries, and the lines it and the driver print
(opefo_rllib/supervisor.py; the recoveries themselves: tests/integration/test_recovery.py)."""

import json
import signal

import pytest
from ray.exceptions import RayActorError

from opefo_rllib.algorithms.grpo.grpo import LearnerFailedError
from opefo_rllib.cli import _causes, failure_line
from opefo_rllib.fleet.weight_sync import WeightsMismatchError
from opefo_rllib.supervisor import _death, _read_state, record_failure, recoverable, write_driver_state
from opefo_rllib.training import TrainingStopped

ENGINE_DIED = RayActorError(error_msg="The actor died unexpectedly before finishing this task.\n"
                                      "\tclass_name: EngineActor\n\tactor_id: 05720ad1\n\tpid: 9096\n"
                                      "\tnamespace: d9f0\n\tip: 192.0.2.2\nThe actor is dead because ...")


def _wrapped(error: BaseException) -> BaseException:
    try:
        try:
            raise error
        except BaseException as inner:
            raise RuntimeError("while building the Algorithm") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize("error", [LearnerFailedError("learner 0 of 1 died during the update of iteration 3"),
                                   TimeoutError("weight sync of version 4 timed out"), ENGINE_DIED])
def test_a_lost_actor_or_a_deadline_is_retried_wrapped_or_not(error):
    assert recoverable(error, _causes) and recoverable(_wrapped(error), _causes)


@pytest.mark.parametrize("error", [TrainingStopped("non-finite", None), WeightsMismatchError("engine 1 serves ..."),
                                   ValueError("a bug"), KeyboardInterrupt()])
def test_what_a_rerun_meets_again_is_not_retried(error):
    assert not recoverable(error, _causes) and not recoverable(_wrapped(error), _causes)


def test_a_deterministic_stop_wins_over_a_lost_actor_in_the_same_chain():
    stop = TrainingStopped("non-finite", None)
    stop.__context__ = LearnerFailedError("learner 0 of 1 died")
    assert not recoverable(stop, _causes)


def test_a_dead_actor_is_one_line_naming_its_class_and_process():
    assert failure_line(_wrapped(ENGINE_DIED)) == \
        "an engine actor (pid 9096) died: The actor died unexpectedly before finishing this task."


def test_how_a_driver_ended_in_words():
    assert _death(-signal.SIGKILL) == "the driver was killed by SIGKILL"
    assert _death(-signal.SIGSEGV) == "the driver was killed by SIGSEGV"
    assert _death(75) == "the driver exited with status 75"


def test_the_driver_report_and_its_failure_round_trip(tmp_path):
    state = tmp_path / "driver.json"
    assert _read_state(state) is None  # a driver that died before its run was set up
    write_driver_state(state, tmp_path / "run", max_failures=2, iterations=8)
    got = _read_state(state)
    assert (got.run_dir, got.max_failures, got.iterations, got.failure) == (tmp_path / "run", 2, 8, None)
    record_failure(state, "learner 0 of 1 died during the update of iteration 3")
    assert _read_state(state).failure == "learner 0 of 1 died during the update of iteration 3"
    assert json.loads(state.read_text())["max_failures"] == 2 and not list(tmp_path.glob("*.tmp"))
    state.write_text("{not json")
    assert _read_state(state) is None
