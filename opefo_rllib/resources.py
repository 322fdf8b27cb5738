"""Does the Ray cluster have what a run asks for? An error naming what is missing, not a hang.

Ray queues an actor it cannot place and waits, silently, for resources that may never come (a
2-CPU machine asked for 8 engines waited until killed). ``wait_for_resources`` compares the run's
request (the algorithm's resource bundles: driver + learner, and one bundle per engine) with the
cluster's totals, waits up to ``resource_wait_timeout_s`` for an autoscaling cluster to grow, and
then raises ``InsufficientResources`` with the arithmetic:

    8 engines x 0.5 CPU + 1 driver/learner CPU = 5 CPUs; the cluster has 2
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["InsufficientResources", "requested_resources", "shortfall", "wait_for_resources"]


class InsufficientResources(RuntimeError):
    """The cluster cannot meet the run's resource request; the message says by how much."""


def _fmt(x: float) -> str:
    return f"{x:g}"


def requested_resources(config: Any) -> dict[str, dict[str, float]]:
    """Per resource ("CPU", "GPU"): the driver/learner part and the engines' part of the request."""
    from opefo_rllib.algorithms.grpo.grpo import GRPO

    bundles = GRPO.default_resource_request(config).bundles
    engines = bundles[len(bundles) - config.num_engines:]
    rest = bundles[:len(bundles) - config.num_engines]
    out: dict[str, dict[str, float]] = {}
    for kind in ("CPU", "GPU"):
        out[kind] = {"driver": sum(b.get(kind, 0.0) for b in rest), "engines": sum(b.get(kind, 0.0) for b in engines)}
    return out


def shortfall(config: Any, cluster: dict[str, float]) -> str | None:
    """None if ``cluster`` (Ray's cluster_resources) covers the request, else the explanation."""
    request = requested_resources(config)
    lines = []
    for kind, unit in (("CPU", "CPU"), ("GPU", "GPU")):
        need = request[kind]["driver"] + request[kind]["engines"]
        have = float(cluster.get(kind, 0.0))
        if need > have + 1e-9:
            per_engine = config.num_cpus_per_engine if kind == "CPU" else config.num_gpus_per_engine
            lines.append(f"{config.num_engines} engines x {_fmt(per_engine)} {unit} + "
                         f"{_fmt(request[kind]['driver'])} driver/learner {unit} = {_fmt(need)} {unit}s; "
                         f"the cluster has {_fmt(have)}")
    return "; ".join(lines) or None


def wait_for_resources(config: Any, timeout_s: float, cluster_resources: Callable[[], dict] | None = None,
                       poll_s: float = 2.0) -> None:
    """Return once the cluster covers the request; raise InsufficientResources after ``timeout_s``."""
    if cluster_resources is None:
        import ray

        cluster_resources = ray.cluster_resources
    deadline = time.monotonic() + timeout_s
    while True:
        missing = shortfall(config, cluster_resources())
        if missing is None:
            return
        if time.monotonic() >= deadline:
            raise InsufficientResources(
                f"the run asks for more than the Ray cluster has: {missing} (waited {_fmt(timeout_s)} s; lower "
                "num_engines / num_cpus_per_engine / num_gpus_per_engine, add nodes, or raise "
                "resource_wait_timeout_s for an autoscaling cluster)")
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
