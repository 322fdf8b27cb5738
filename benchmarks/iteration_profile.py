"""Where one training iteration's time goes (issue 14, item 1): per phase, median over iterations.

Builds the algorithm from a run config (default: the tiny CPU run, with ``pipeline: sync``, whose
phases run one after the other), trains a few iterations, and times each phase by wrapping the
learner's named steps and the runner's sample call:

    sample (generate + verify) | learner: flow_pass, token_weights, accumulate_gradients
    (forward + backward), optimizer_step, realized_change, batch_metrics | weight sync | rest

    python benchmarks/iteration_profile.py [--config FILE ...] [--set KEY=VALUE ...] [--iterations 12]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

LEARNER_STEPS = ("flow_pass", "token_weights", "accumulate_gradients", "optimizer_step", "realized_change",
                 "batch_metrics")


def _timed(obj, name: str, times: dict[str, list[float]]) -> None:
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            times[name][-1] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--iterations", type=int, default=12)
    args = ap.parse_args()
    import ray

    from opefo_rllib.run_config import apply_overrides, build_algo_config, load_run_config

    configs = args.config or [str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")]
    data = apply_overrides(load_run_config(configs), ["eval_before_train=false", "eval_every=0", "pipeline=sync",
                                                      *args.set])
    config = build_algo_config(data)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    algo = config.build_algo()
    learner = algo.learner_group._learner  # the local learner (num_learners = 0)
    times: dict[str, list[float]] = defaultdict(list)
    for name in LEARNER_STEPS:
        _timed(learner, name, times)
    _timed(algo.env_runner, "sample", times)
    _timed(algo, "sync_fleet_weights", times)
    for _ in range(args.iterations):
        for key in (*LEARNER_STEPS, "sample", "sync_fleet_weights", "iteration"):
            times[key].append(0.0)
        start = time.perf_counter()
        algo.train()
        times["iteration"][-1] = time.perf_counter() - start
    algo.stop()
    ray.shutdown()
    skip = min(2, args.iterations - 1)  # the first iterations warm up
    med = {k: statistics.median(v[skip:]) for k, v in times.items()}
    rest = med["iteration"] - sum(med[k] for k in (*LEARNER_STEPS, "sample", "sync_fleet_weights"))
    print(f"median over iterations {skip + 1}-{args.iterations} ({', '.join(configs)} {' '.join(args.set)})")
    print(f"{'phase':24s} {'seconds':>9s} {'share':>7s}")
    for key in ("sample", *LEARNER_STEPS, "sync_fleet_weights"):
        print(f"{key:24s} {med[key]:9.4f} {med[key] / med['iteration']:7.1%}")
    print(f"{'rest (batch, metrics, TB)':24s} {rest:9.4f} {rest / med['iteration']:7.1%}")
    print(f"{'iteration':24s} {med['iteration']:9.4f}")


if __name__ == "__main__":
    main()
