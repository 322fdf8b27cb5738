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

After a sync (every one, every ``check_every``-th, or none: ``weights_check``) every engine
returns the log-probs of a fixed probe sequence under the weights it serves, and they must equal
the learner's to a tolerance set by the engines' dtype: a version label says which weights an
engine believes it has, the probe what it serves. A mismatch is a ``WeightsMismatchError``
naming the engine and the version, raised before any sample of that version is drawn.

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

__all__ = ["WeightSync", "WeightsCheck", "WeightsMismatchError", "weights_and_version", "CHECK_TOLERANCE"]

# Largest |log-prob difference| on the probe that still counts as the same weights, by the engines'
# dtype: fp32 engines agree with an fp32 learner to ~1e-5 (vLLM's CPU kernels ~5e-5); bf16 rounds
# each weight to 3 significant digits, which moves a log-prob by up to a few hundredths.
CHECK_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}


class WeightsMismatchError(RuntimeError):
    """An engine serves other weights than the learner's after a sync (``weights_check``)."""


class WeightsCheck:
    """When and how closely the served weights are checked after a sync.

    Args:
        mode: "every_sync", "every_n" (every ``every``-th sync) or "off".
        every: the period of "every_n".
        tolerance: the largest |log-prob difference| on the probe still counted as the same weights.
    """

    def __init__(self, mode: str | bool = "every_sync", every: int = 1, tolerance: float = CHECK_TOLERANCE["float32"]):
        mode = "off" if mode is False else mode  # YAML reads an unquoted off as false
        if mode not in ("every_sync", "every_n", "off"):
            raise ValueError(f"weights_check must be every_sync, every_n or off, got {mode!r}")
        self.mode, self.every, self.tolerance = mode, max(1, int(every)), float(tolerance)

    def due(self, sync_number: int) -> bool:
        """Is the ``sync_number``-th sync (1, 2, ...) checked?"""
        return self.mode == "every_sync" or (self.mode == "every_n" and sync_number % self.every == 0)


class WeightSync:
    """Args:
        fleet: the engine fleet to keep in sync.
        run_on_learner: ``run_on_learner(fn)`` -> ``fn(learner)``, run where the learner lives. The
            learner has ``engine_weights()``, ``weight_version`` and ``push_weights_native(...)``.
        master_address: where the learner's transfer-group store listens (native strategy).
    """

    def __init__(self, fleet: EngineFleet, run_on_learner: Callable[[Callable[[Any], Any]], Any],
                 master_address: str = "127.0.0.1", check: WeightsCheck | None = None):
        self.fleet, self.run_on_learner, self.master_address = fleet, run_on_learner, master_address
        self.check = check or WeightsCheck("off")
        self.syncs = self.checks = 0
        self.last_check_s = 0.0
        self.last_check_gap = 0.0  # the largest probe log-prob difference of the last check
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
        seconds = time.perf_counter() - start
        self.syncs += 1
        if self.check.due(self.syncs):  # its own seconds: fleet/weights_check_s
            self.check_served_weights(step)
        return seconds

    def check_served_weights(self, step: int) -> None:
        """Every engine's probe log-probs against the learner's; WeightsMismatchError on a mismatch."""
        start = time.perf_counter()
        version, probe, expected = self.run_on_learner(_probe)
        served = self.fleet.probe_logprobs(probe, step)
        gaps = [max(abs(a - b) for a, b in zip(got, expected)) for got in served]
        self.checks += 1
        self.last_check_gap, self.last_check_s = max(gaps), time.perf_counter() - start
        wrong = [(e, gap) for e, gap in enumerate(gaps) if not gap <= self.check.tolerance]  # NaN is wrong too
        if wrong:
            engine, gap = wrong[0]
            raise WeightsMismatchError(
                f"weights check after the sync to version {version} at step {step}: engine {engine} (of "
                f"{len(gaps)}) serves other weights than the learner's: its log-probs of the probe sequence differ "
                f"by up to {gap:.3g} (tolerance {self.check.tolerance:g}){_others(wrong)}; the version label says "
                f"{version}, the weights do not")

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
        metrics = {"fleet/native_weight_sync": float(self.strategy == "native"),
                   "fleet/transfer_group_builds": float(self.group_builds),
                   "fleet/weight_sync_mb": self.last_mb}
        if self.checks:
            metrics.update({"fleet/weights_checks": float(self.checks), "fleet/weights_check_s": self.last_check_s,
                            "fleet/weights_check_gap": self.last_check_gap})
        return metrics


# Module-level, so they pickle by reference when the learner is a remote actor.
def _weight_version(learner) -> int:
    return learner.weight_version


def weights_and_version(learner) -> tuple[dict, int]:
    """What the engines load (the learner's CPU state dict, or under LoRA with adapter sync its
    adapter alone) and its version; a fleet's ``weights_source`` asks this too."""
    return learner.engine_weights(), learner.weight_version


def _probe(learner) -> tuple[int, list[int], list[float]] | None:
    """The learner's version, the probe and its log-probs (None on ranks other than 0)."""
    ids = learner.probe_ids()
    logprobs = learner.probe_logprobs(ids)  # every rank takes part (ZeRO-3 gathers)
    return None if logprobs is None else (learner.weight_version, ids, logprobs)


def _others(wrong: list[tuple[int, float]]) -> str:
    return f" (engines {[e for e, _ in wrong]} all differ)" if len(wrong) > 1 else ""


def _push_native(learner, **kwargs) -> int:
    return learner.push_weights_native(**kwargs)
