"""Iteration time of the rollout pipelines, in one run, on the default workload.

    python benchmarks/pipeline.py [--iterations 20] [--warmup 3] [--overlay configs/overlays/grpo_strict.yaml]

Workload: configs/tiny_cpu.yaml + an overlay (default grpo_strict: 32 prompts x 8 samples, up
to 8 new tokens, the tiny model, one HF engine), evaluation off. Variants, each a fresh Algorithm
in the same Ray session, medians over ``iterations`` after ``warmup``:

* sync, no fixes  - the sync pipeline without the learner's profile fixes: a separate no-grad flow
                    pass (fuse_flow_pass off) and every row's prompt run again (share_prompt_forward
                    off); the engine's one-prefill-per-prompt fix is code and stays in
* sync            - the sync pipeline with the profile's fixes (the flow pass's forward is the
                    training one; each prompt runs once per micro-batch)
* streaming       - strict on-policy: the learner's forward runs on each finished engine call's
                    groups (stream_chunks calls) while the rest are generated, and the realized-change
                    re-score during the next generation; the same update as sync
* streaming, backward too - stream_backward: each chunk's backward in flight as well, into two
                    gradient accumulators (a second backward per chunk: g_total and g_side)
* async (k = 1)   - one batch ahead: generation overlaps the update (strict_on_policy off); the
                    realized-change re-score runs on the (fp32 HF) engine, not the learner
* async, no re-score - the same without the re-score (measure_realized_change off): its cost
* ..., 2 thr      - the same with 2 torch threads in the learner (the default is 1: one core each
                    for the learner and the engine)

Prints seconds per iteration, engine idle fraction (1 - the engine's own generation time / the
iteration), learner time (streaming: with its work during generation), and each variant's time relative to both sync variants.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "sync, no fixes": ["pipeline=sync", "fuse_flow_pass=false", "share_prompt_forward=false"],
    "sync": ["pipeline=sync"],
    "streaming": ["pipeline=streaming", "stream_chunks=2"],
    "streaming, 4 ch": ["pipeline=streaming", "stream_chunks=4"],
    "streaming, 8 ch": ["pipeline=streaming", "stream_chunks=8"],
    "streaming, backward too": ["pipeline=streaming", "stream_chunks=2", "stream_backward=true"],
    "async (k = 1)": ["pipeline=async", "strict_on_policy=false", "max_staleness=1"],
    "async, no re-score": ["pipeline=async", "strict_on_policy=false", "max_staleness=1",
                           "measure_realized_change=false"],
    "sync, 2 thr": ["pipeline=sync", "learner_num_threads=2"],
    "streaming, 2 thr": ["pipeline=streaming", "stream_chunks=2", "learner_num_threads=2"],
    "async, 2 thr": ["pipeline=async", "strict_on_policy=false", "max_staleness=1", "learner_num_threads=2"],
}


def run_variant(base: list[Path], overrides: list[str], iterations: int, warmup: int) -> dict[str, float]:
    from opefo_rllib.run_config import apply_overrides, build_algo_config, load_run_config

    data = apply_overrides(load_run_config(base), ["eval_every=0", "eval_before_train=false", "log_text_every=0",
                                                   *overrides])
    config = build_algo_config(data)
    config.tensorboard_dir = f"/tmp/opefo_bench_pipeline/{time.time_ns()}"
    algo = config.build_algo()
    try:
        for _ in range(warmup):
            algo.train()
        results = [algo.train() for _ in range(iterations)]
    finally:
        algo.stop()
    med = lambda key: statistics.median(r[key] for r in results)  # noqa: E731
    return {"step_s": med("time/step_s"), "learn_s": med("time/learn_s") + med("time/learner_in_flight_s"), "engine_busy_s": med("fleet/engine_busy_s"),
            "idle": med("fleet/engine_idle_frac"), "sync_s": med("time/weight_sync_s"),
            "wait_s": med("time/ahead_wait_s"), "reward": statistics.mean(r["rollout/reward_mean"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--overlay", default=str(ROOT / "configs" / "overlays" / "grpo_strict.yaml"))
    ap.add_argument("--only", action="append", default=None, help="run only these variants (repeatable)")
    ap.add_argument("--reference", type=float, default=0.42,
                    help="the sync iteration time when issue 14 was filed (s), for the x-times-faster line")
    args = ap.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only or k == "sync"}

    import ray

    base = [ROOT / "configs" / "tiny_cpu.yaml", Path(args.overlay)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = {}
    try:
        for name, overrides in variants.items():
            rows[name] = run_variant(base, overrides, args.iterations, args.warmup)
            r = rows[name]
            print(f"{name:22s} {r['step_s']:.3f} s/iteration  learn {r['learn_s']:.3f} s  engine busy "
                  f"{r['engine_busy_s']:.3f} s (idle {100 * r['idle']:.0f}%)  sync {r['sync_s']:.3f} s  "
                  f"ahead-wait {r['wait_s']:.3f} s", flush=True)
    finally:
        ray.shutdown()
    old, new = rows.get("sync, no fixes", {}).get("step_s"), rows["sync"]["step_s"]
    print(f"\nworkload: {' + '.join(p.name for p in base)}; medians of {args.iterations} iterations after {args.warmup}")
    for name, r in rows.items():
        vs_old = f"{r['step_s'] / old:.2f}x sync without fixes, " if old else ""
        print(f"  {name:22s} {r['step_s']:.3f} s = {vs_old}{r['step_s'] / new:.2f}x sync; "
              f"{r['step_s'] / args.reference:.2f}x the filed {args.reference} s; {60 / r['step_s']:.0f} iterations/min")


if __name__ == "__main__":
    main()
