"""The served-weights check (weights_check): after each sync every engine's log-probs of a fixed
probe sequence equal the learner's; an engine whose sync was skipped (its version label moved, its
weights did not, verl #7495's failure) stops the run within that step, naming it and the version."""

import pytest
import ray

from opefo_rllib.fleet.weight_sync import WeightsCheck, WeightsMismatchError, weights_and_version

pytestmark = pytest.mark.slow


def test_when_the_check_runs():
    assert [WeightsCheck("every_sync").due(n) for n in (1, 2, 3)] == [True, True, True]
    assert [WeightsCheck("every_n", every=3).due(n) for n in range(1, 7)] == [False, False, True, False, False, True]
    assert not any(WeightsCheck("off").due(n) for n in range(1, 5))
    assert not WeightsCheck(False).due(1)  # `--set weights_check=off`: YAML reads false
    with pytest.raises(ValueError, match="every_sync, every_n or off"):
        WeightsCheck("sometimes")


def test_a_sync_that_skips_an_engine_is_caught_naming_it_and_the_version(ray_session, tmp_path):
    from opefo_rllib.algorithms.opefo import OPEFOConfig
    from opefo_rllib.cli import failure_line

    config = (OPEFOConfig()
              .generation(prompts_per_batch=4, group_size=4, max_new_tokens=6)
              .fleet(num_engines=2, num_cpus_per_engine=0.25)
              .training(lr=1e-3)
              .logging(tensorboard_dir=str(tmp_path / "tb")))
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        assert result["fleet/weights_checks"] == 2  # one per sync
        assert result["fleet/weights_check_gap"] < 1e-4  # fp32 HF engines serve exactly the learner's weights
        assert 0 < result["fleet/weights_check_s"] < result["time/step_s"]
        old_weights, version = algo.run_on_learner(weights_and_version)
        fleet = algo.fleet

        def skipping_sync(weights, version, step):
            """Engine 0 gets the new weights; engine 1 only the new version label."""
            ray.get([fleet.actors[0].load_weights.remote(dict(weights), version),
                     fleet.actors[1].load_weights.remote(old_weights, version)])
            fleet.version = version

        fleet.sync_weights = skipping_sync
        with pytest.raises(WeightsMismatchError, match="engine 1 \\(of 2\\) serves other weights") as caught:
            algo.train()
        assert f"version {version + 1}" in str(caught.value) and "at step 2" in str(caught.value)  # the third iteration (steps count from 0)
        line = failure_line(caught.value)  # opefo train prints it as one line
        assert line is not None and "\n" not in line and "engine 1" in line
    finally:
        algo.stop()
