"""WeightSync, the one weight-sync object the Algorithm owns, against a fake fleet and learner
(no Ray): the strategy is chosen once, the transfer group is rebuilt exactly when the fleet's
members changed, a failed native round restarts engines and is retried once, and a restarted
engine's weights come from the learner. WeightSync sees only the fleet's public methods (the fake
has nothing else). The real thing runs in tests/integration/test_vllm_engine.py."""

import time

import pytest

from opefo_rllib.fleet.fleet import TransferTargets
from opefo_rllib.fleet.weight_sync import WeightSync, weights_and_version


class FakeLearner:
    def __init__(self):
        self.weight_version = 3
        self.pushes, self.fail_next = [], 0

    def engine_weights(self):  # what the engines load (the whole state dict; under LoRA the adapter)
        return {"w": self.weight_version}

    def push_weights_native(self, actors, world_sizes, backend, step, timeout_s, rebuild, master_address):
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("weight transfer: update_weights failed on engine 1")
        self.pushes.append({"actors": actors, "backend": backend, "rebuild": rebuild, "address": master_address})
        return self.weight_version


class FakeFleet:
    """The public surface WeightSync may use: native_backend, restarts, transfer_targets(),
    sync_weights(), confirm_version(), restart_unhealthy()."""

    LOAD_S = 0.05  # how long the engines take to load object-store weights

    def __init__(self, native_backend):
        self.native_backend, self.restarts = native_backend, 0
        self._actors, self.calls = ["a0", "a1"], []

    def transfer_targets(self):
        return TransferTargets(actors=list(self._actors), world_sizes=[1, 1], backend=self.native_backend,
                               timeout_s=5.0)

    def sync_weights(self, weights, version, step):
        time.sleep(self.LOAD_S)
        self.calls.append(("sync_weights", weights, version, step))

    def confirm_version(self, version, step):
        self.calls.append(("confirm_version", version, step))

    def restart_unhealthy(self, version, step):
        self.calls.append(("restart_unhealthy", version, step))
        self._actors[1] = "a1'"
        self.restarts += 1


def _sync(native_backend):
    learner, fleet = FakeLearner(), FakeFleet(native_backend)
    return learner, fleet, WeightSync(fleet, lambda fn: fn(learner), master_address="10.0.0.1")


def test_object_store_strategy_pushes_the_learners_weights_and_version():
    learner, fleet, sync = _sync(None)
    assert sync.strategy == "object_store"
    assert sync.sync(step=4) >= FakeFleet.LOAD_S  # the seconds it took, the engines' load included
    assert fleet.calls == [("sync_weights", {"w": 3}, 3, 4)]
    assert sync.metrics() == {"fleet/native_weight_sync": 0.0, "fleet/transfer_group_builds": 0.0,
                              "fleet/weight_sync_mb": 0.0}  # the fake's weights are not tensors


def test_a_restarted_engine_gets_the_learners_current_weights_and_version():
    learner = FakeLearner()
    learner.weight_version = 9  # a fleet's weights_source runs this on the learner
    assert weights_and_version(learner) == ({"w": 9}, 9)


def test_native_group_is_built_once_then_rebuilt_after_a_restart():
    learner, fleet, sync = _sync("opefo_gloo")
    sync.sync(0)
    sync.sync(1)
    fleet.restarts += 1  # an engine died during generation and came back
    sync.sync(2)
    assert [p["rebuild"] for p in learner.pushes] == [True, False, True]
    assert {p["address"] for p in learner.pushes} == {"10.0.0.1"}
    assert fleet.calls[-1] == ("confirm_version", 3, 2)
    assert sync.metrics() == {"fleet/native_weight_sync": 1.0, "fleet/transfer_group_builds": 2.0,
                              "fleet/weight_sync_mb": 0.0}  # measured on the object-store path only


def test_a_failed_native_round_restarts_engines_and_retries_once_with_a_new_group():
    learner, fleet, sync = _sync("opefo_gloo")
    sync.sync(0)
    learner.fail_next = 1
    sync.sync(1)
    assert fleet.calls[-2:] == [("restart_unhealthy", 3, 1), ("confirm_version", 3, 1)]
    assert learner.pushes[-1]["rebuild"] and learner.pushes[-1]["actors"] == ["a0", "a1'"]
    assert sync.group_builds == 2
    learner.fail_next = 2  # fails again after the recovery: the error comes out
    with pytest.raises(RuntimeError, match="update_weights failed"):
        sync.sync(2)
