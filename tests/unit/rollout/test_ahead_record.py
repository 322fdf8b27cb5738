"""The async pipeline's batch ahead in a checkpoint: the runner writes it as JSON beside its
pickled counters and reads back the same batch, sample for sample."""

import json
import logging
import pickle

import pytest

from opefo_rllib.rollout.ahead_record import AHEAD_FILE, RecordError, from_record, to_record
from opefo_rllib.rollout.batch import Rollout


def _batch():
    from opefo_rllib.rollout.env_runner import Sampled

    rollouts = [Rollout(group_id=8, prompt_ids=[1, 5, 6], response_ids=[7, 9], sampling_logp=[0.1 + 0.2, -1e-30],
                        reward=1.0, weight_version=1, correct=True, task_id="a-3", prompt_text="2+1=",
                        response_text="3 | ok", info={"format_ok": True, "timed_out": False, "error": False}),
                Rollout(group_id=9, prompt_ids=[1, 4], response_ids=[7, 2, 3], sampling_logp=[-2.5, float("-inf"), 0.0],
                        reward=-0.125, weight_version=1, finished=False, info={"turns": 2, "turn_versions": [1, 1]},
                        action_mask=[1, 0, 1])]
    return Sampled(rollouts, {"data/skipped_rows": 0.0, "rollout/refill_rounds": 1.0},
                   {"generate_s": 0.25, "verify_s": 0.01, "engine_busy_s": 0.2})


def _runner(pipeline="async"):
    from opefo_rllib.algorithms.opefo import OPEFOConfig
    from opefo_rllib.rollout.env_runner import LLMEnvRunner

    return LLMEnvRunner(config=OPEFOConfig().rollout(pipeline=pipeline).training(strict_on_policy=False))


def test_a_record_reads_back_the_same_rollouts_floats_bit_for_bit():
    batch = _batch()
    text = json.dumps(to_record(batch.rollouts, batch.metrics, batch.timings))
    rollouts, metrics, timings = from_record(json.loads(text))
    assert rollouts == batch.rollouts and metrics == batch.metrics and timings == batch.timings
    assert rollouts[0].sampling_logp[0] == 0.1 + 0.2 and rollouts[1].sampling_logp[1] == float("-inf")
    with pytest.raises(RecordError, match="format 1"):
        from_record({"format": 99, "rollouts": []})
    with pytest.raises(RecordError, match=r"rollout 0 has fields \['tokens'\]"):
        from_record({"format": 1, "rollouts": [{"tokens": []}], "metrics": {}, "timings": {}})


def test_the_runner_checkpoints_its_batch_ahead_and_trains_it_next(tmp_path, caplog):
    from opefo_rllib.checkpoints import CheckpointError

    runner = _runner()
    runner._sample_calls, runner._next_group_id = 3, 12  # past the batch ahead's draw
    runner._ahead = _batch()
    runner.save_to_path(tmp_path / "env_runner")
    with open(tmp_path / "env_runner" / "state.pkl", "rb") as f:
        pickled = pickle.load(f)
    assert "batch_ahead" not in pickled and pickled["batch_ahead_file"] == AHEAD_FILE  # the batch is JSON only

    resumed = _runner()
    resumed.restore_from_path(tmp_path / "env_runner")
    assert (resumed._sample_calls, resumed._next_group_id) == (3, 12)
    assert resumed.next_batch() == _batch()  # trained next, once: nothing is ahead after it
    assert resumed._ahead is None and "batch_ahead" not in resumed.get_state()

    with caplog.at_level(logging.WARNING):  # only async trains a batch ahead
        sync = _runner("sync")
        sync.restore_from_path(tmp_path / "env_runner")
    assert sync._ahead is None and "batch ahead (2 samples) is dropped: pipeline is 'sync'" in caplog.text

    (tmp_path / "env_runner" / AHEAD_FILE).unlink()  # the counters are past a batch the checkpoint lost
    with pytest.raises(CheckpointError, match=f"{AHEAD_FILE}, which is missing"):
        _runner().restore_from_path(tmp_path / "env_runner")


def test_a_checkpoint_without_a_batch_ahead_has_no_record(tmp_path):
    runner = _runner()  # sync and streaming never have one; nor async before its first step
    runner.save_to_path(tmp_path / "env_runner")
    assert not (tmp_path / "env_runner" / AHEAD_FILE).exists()
    resumed = _runner()
    resumed.restore_from_path(tmp_path / "env_runner")
    assert resumed._ahead is None
