"""Where engine actors run, and replacements for dead ones: Ray's node labels (with an optional
fallback to any node) and the wait for replacements that Ray may first place on a dying node."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ray

__all__ = ["EnginePlacement", "EngineUnplaceable"]


class EngineUnplaceable(TimeoutError):
    """A replacement engine was not placed and started in time (a deadline, reported as one line
    like the others); the message says what it needs."""


@dataclasses.dataclass(frozen=True)
class EnginePlacement:
    """How the fleet starts an engine actor (``actor_cls``: the fleet's EngineActor)."""

    actor_cls: Any
    kind: str
    engine_kwargs: dict
    num_cpus: float
    num_gpus: float
    node_labels: dict
    node_fallback: bool
    restart_timeout_s: float

    def start(self):
        """A new engine actor on a node the labels allow."""
        placement = {}
        if self.node_labels:
            placement["label_selector"] = dict(self.node_labels)
            if self.node_fallback:  # an empty selector: any node
                placement["fallback_strategy"] = [{"label_selector": {}}]
        return self.actor_cls.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                      **placement).remote(self.kind, self.engine_kwargs)

    def start_replacements(self, engines: list[int], step: int) -> dict[int, Any]:
        """New engine actors for ``engines``, started together, each answering. Until Ray has
        marked a lost node dead (its health check: seconds) it may place a replacement there,
        where it dies before it runs: that one is placed again (up to 3 times; more is an engine
        that cannot start, and its error is raised), all within ``restart_timeout_s``."""
        deadline = time.monotonic() + self.restart_timeout_s
        started = {e: self.start() for e in engines}
        pings = {e: a.weight_version.remote() for e, a in started.items()}
        ready: dict[int, Any] = {}
        deaths = dict.fromkeys(engines, 0)
        while pings and time.monotonic() < deadline:
            ray.wait(list(pings.values()), num_returns=1, timeout=min(1.0, max(deadline - time.monotonic(), 0.0)))
            for e, ping in list(pings.items()):
                try:
                    ray.get(ping, timeout=0)
                except ray.exceptions.GetTimeoutError:
                    continue  # being placed, or starting
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    deaths[e] += 1
                    if deaths[e] > 3:
                        raise
                    started[e] = self.start()
                    pings[e] = started[e].weight_version.remote()
                    continue
                ready[e] = started.pop(e)
                del pings[e]
        if pings:
            for a in (*started.values(), *ready.values()):
                ray.kill(a)
            raise EngineUnplaceable(self._unplaceable(next(iter(pings)), step))
        return ready

    def _unplaceable(self, engine: int, step: int) -> str:
        needs = f"{self.num_cpus:g} CPU" + (f" + {self.num_gpus:g} GPU" if self.num_gpus else "")
        hard = self.node_labels and not self.node_fallback
        where = f"a node labelled {self.node_labels} (engine_node_labels) with {needs} free" if hard \
            else f"a node with {needs} free"
        return (f"engine {engine} died at step {step} and its replacement was not placed and started within "
                f"{self.restart_timeout_s:g} s (resource_wait_timeout_s + weight_sync_timeout_s): it needs {where}; "
                "add such a node, or raise resource_wait_timeout_s" + (", or set engine_node_fallback" if hard else ""))
