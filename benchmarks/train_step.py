"""Seconds per training iteration of the default config, and its phase breakdown.

    python benchmarks/train_step.py [--iterations 20] [--warmup 2] [--config configs/tiny_cpu.yaml]

Builds the Algorithm from the run config (real Ray, RLlib, DeepSpeed, HF engine), runs
``warmup`` iterations untimed, then prints the mean of each phase over ``iterations``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PHASES = ["time/generate_s", "time/verify_s", "time/rollout_s", "time/learn_s", "time/weight_sync_s", "time/step_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"))
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    import ray

    from opefo_rllib.run_config import apply_overrides, build_algo_config, load_run_config

    data = apply_overrides(load_run_config([args.config]), args.set)
    config = build_algo_config(data)
    config.tensorboard_dir = "/tmp/opefo_bench_train_step"
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    algo = config.build_algo()
    build_s = time.perf_counter() - t0
    try:
        first = time.perf_counter()
        for _ in range(args.warmup):
            algo.train()
        warm_s = time.perf_counter() - first
        results = [algo.train() for _ in range(args.iterations)]
    finally:
        algo.stop()
        ray.shutdown()
    print(f"config {args.config} {' '.join(args.set)}: {config.prompts_per_batch} prompts x {config.group_size} "
          f"samples, max {config.max_new_tokens} new tokens, {config.num_engines} HF engine(s), ZeRO {config.zero_stage}")
    print(f"  start-up (ray.init + build_algo): {build_s:.1f} s; first {args.warmup} iterations: {warm_s:.1f} s")
    for key in PHASES:
        values = [r[key] for r in results]
        print(f"  {key:20s} mean {statistics.mean(values):.3f} s   (min {min(values):.3f}, max {max(values):.3f})")
    tps = statistics.mean(r["throughput/tokens_per_s"] for r in results)
    print(f"  throughput: {tps:.0f} response tokens/s;  {statistics.mean(r['time/step_s'] for r in results):.3f} s/iteration")


if __name__ == "__main__":
    main()
