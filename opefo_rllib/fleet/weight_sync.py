"""WeightSync: the learner's weights and version to every engine, before the next sample.

One object, owned by the Algorithm, built from the fleet and a ``run_on_learner(fn)`` callable
(runs ``fn(learner)`` on the learner and returns its result). The strategy is chosen once, from
the engines:

* ``"native"`` (engines report a ``weight_transfer_backend``: vLLM): vLLM's weight-transfer API,
  sent by the learner straight from its device (:mod:`opefo_rllib.fleet.vllm_transfer`). The
  transfer group is built on the first sync and rebuilt after any engine restart; a failed round
  restarts the engines that are dead or left mid-update, then is retried once.
* ``"object_store"`` (HF and SGLang engines, vLLM without the API): the learner's CPU state dict
  goes into Ray's object store once and every engine loads it. Under LoRA that is the adapter
  alone (or, ``lora_sync: merged``, the merged weights: ``learner.engine_weights``).

Either way a restarted engine gets its weights the object-store way (the fleet's own
``weights_source``, given when it is built). WeightSync uses only the fleet's public methods
(``transfer_targets``, ``sync_weights``, ``confirm_version``, ``restart_unhealthy``) and takes the
weights and the version from the learner: the learner's ``weight_version`` is the one source.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

from opefo_rllib.fleet.fleet import EngineFleet

__all__ = ["WeightSync", "weights_and_version"]


class WeightSync:
    """Args:
        fleet: the engine fleet to keep in sync.
        run_on_learner: ``run_on_learner(fn)`` -> ``fn(learner)``, run where the learner lives. The
            learner has ``engine_weights()``, ``weight_version`` and ``push_weights_native(...)``.
        master_address: where the learner's transfer-group store listens (native strategy).
    """

    def __init__(self, fleet: EngineFleet, run_on_learner: Callable[[Callable[[Any], Any]], Any],
                 master_address: str = "127.0.0.1"):
        self.fleet, self.run_on_learner, self.master_address = fleet, run_on_learner, master_address
        self.strategy = "object_store" if fleet.native_backend is None else "native"
        self.group_builds = 0
        self.last_mb = 0.0  # megabytes of the last object-store push (under LoRA with adapter sync: the adapter's)
        self._built_at_restarts: int | None = None  # fleet.restarts when the transfer group was built

    def sync(self, step: int) -> float:
        """Push the learner's weights and version to every engine; returns the seconds it took."""
        start = time.perf_counter()
        if self.strategy == "native":
            self._sync_native(step)
        else:
            weights, version = self.run_on_learner(weights_and_version)
            self.last_mb = sum(getattr(v, "nbytes", 0) for v in weights.values()) / 2**20
            self.fleet.sync_weights(weights, version, step)
        return time.perf_counter() - start

    def _sync_native(self, step: int) -> None:
        fleet = self.fleet
        for attempt in range(2):
            rebuild = attempt > 0 or self._built_at_restarts != fleet.restarts  # first round, or new members
            targets = fleet.transfer_targets()
            push = functools.partial(_push_native, actors=targets.actors, world_sizes=targets.world_sizes,
                                     backend=targets.backend, step=step, timeout_s=targets.timeout_s,
                                     rebuild=rebuild, master_address=self.master_address)
            try:
                version = self.run_on_learner(push)
            except Exception:  # noqa: BLE001 - recover once, then let it out
                if attempt:
                    raise
                fleet.restart_unhealthy(self.run_on_learner(_weight_version), step)
                continue
            if rebuild:
                self.group_builds += 1
                self._built_at_restarts = fleet.restarts
            fleet.confirm_version(version, step)
            return

    def metrics(self) -> dict[str, float]:
        """The weight-sync counters, as logged every iteration."""
        return {"fleet/native_weight_sync": float(self.strategy == "native"),
                "fleet/transfer_group_builds": float(self.group_builds),
                "fleet/weight_sync_mb": self.last_mb}


# Module-level, so they pickle by reference when the learner is a remote actor.
def _weight_version(learner) -> int:
    return learner.weight_version


def weights_and_version(learner) -> tuple[dict, int]:
    """What the engines load (the learner's CPU state dict, or under LoRA with adapter sync its
    adapter alone) and its version; a fleet's ``weights_source`` asks this too."""
    return learner.engine_weights(), learner.weight_version


def _push_native(learner, **kwargs) -> int:
    return learner.push_weights_native(**kwargs)
