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

``--cli`` measures what a user sees as well: ``opefo train`` (a subprocess, its own Ray) for each of
sync, streaming and async on the same workload (evaluation and text samples off, no checkpoint
before the end), the medians of its ``time/step_s`` (TensorBoard) and of the wall time between
its iterations, beside the in-process figures (each pipeline's pair back to back, with the load
average), and says where the two disagree by more than 10%. The overlapped pipelines need the
second core: on a machine shared with other jobs, compare figures taken at the same load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
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


CLI_PIPELINES = {"sync": "sync", "streaming": "streaming", "async (k = 1)": "async"}
# The settings the in-process variants run with, so both columns measure one workload.
CLI_SETTINGS = ["eval_every=0", "eval_before_train=false", "log_text_every=0", "checkpoint_every=0"]


def run_cli(base: list[Path], overrides: list[str], iterations: int, warmup: int) -> dict[str, float]:
    """``opefo train`` of one variant in a subprocess; medians over the iterations after ``warmup``
    of its logged time/step_s and of the wall time between its TensorBoard events."""
    from opefo_rllib.evaluation.compare import read_scalars

    logdir = Path(tempfile.mkdtemp(prefix="opefo_bench_cli_"))
    cmd = [sys.executable, "-m", "opefo_rllib.cli", "train", *sum((["--config", str(p)] for p in base), []),
           *sum((["--set", s] for s in [*CLI_SETTINGS, *overrides, f"iterations={warmup + iterations}"]), []),
           "--logdir", str(logdir / "run")]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    steps, values = read_scalars(logdir / "run")["time/step_s"]
    kept = [v for step, v in zip(steps, values) if step > warmup]
    walls = _wall_per_iteration(logdir / "run", warmup)
    return {"step_s": statistics.median(kept), "wall_s": statistics.median(walls) if walls else float("nan")}


def _wall_per_iteration(run_dir: Path, warmup: int) -> list[float]:
    """Seconds between the time/step_s events of consecutive iterations (after ``warmup``): the
    whole iteration as the user waits for it, logging and RLlib's own bookkeeping included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opefo_rllib.evaluation.compare import event_dir

    acc = EventAccumulator(str(event_dir(run_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    events = sorted((e.step, e.wall_time) for e in acc.Scalars("time/step_s"))
    return [b[1] - a[1] for a, b in zip(events, events[1:]) if a[0] >= warmup]


def main_cli(args, base: list[Path]) -> None:
    """In-process and CLI figures of sync, streaming and async, side by side. Each pipeline's two
    runs go back to back (the in-process one in a Ray session of its own), so both see the same
    load from other jobs; the 1-minute load average before each pair is printed."""
    import ray

    rows = {}
    for name in CLI_PIPELINES:
        load = os.getloadavg()[0]
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            inside = run_variant(base, VARIANTS[name], args.iterations, args.warmup)["step_s"]
        finally:
            ray.shutdown()
        cli = run_cli(base, VARIANTS[name], args.iterations, args.warmup)
        rows[name] = {"in": inside, "cli": cli["step_s"], "wall": cli["wall_s"], "load": load}
        print(f"{name:14s} in-process {inside:.3f} s  opefo train {cli['step_s']:.3f} s "
              f"(wall per iteration {cli['wall_s']:.3f} s)  load {load:.1f}", flush=True)
    sync = rows["sync"]
    print(f"\nworkload: {' + '.join(p.name for p in base)}; medians of {args.iterations} iterations after {args.warmup}")
    print(f"  {'pipeline':14s} {'in-process':>18s} {'opefo train':>18s} {'wall/iter':>18s}  load (2 cores)")
    for name, r in rows.items():
        cells = [f"{r[k]:.3f} s = {r[k] / sync[k]:.2f}x" for k in ("in", "cli", "wall")]
        print(f"  {name:14s} " + " ".join(f"{c:>18s}" for c in cells) + f"  {r['load']:.1f}")
        ratio_in, ratio_cli = r["in"] / sync["in"], r["cli"] / sync["cli"]
        if abs(ratio_cli - ratio_in) > 0.1 * ratio_in:
            print(f"    disagree: {name} is {ratio_in:.2f}x sync in-process but {ratio_cli:.2f}x through opefo train")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--overlay", default=str(ROOT / "configs" / "overlays" / "grpo_strict.yaml"))
    ap.add_argument("--only", action="append", default=None, help="run only these variants (repeatable)")
    ap.add_argument("--reference", type=float, default=0.42,
                    help="the sync iteration time when issue 14 was filed (s), for the x-times-faster line")
    ap.add_argument("--cli", action="store_true", help="also run opefo train for sync, streaming and async "
                    "and print its time/step_s beside the in-process one")
    args = ap.parse_args()
    if args.cli:
        main_cli(args, [ROOT / "configs" / "tiny_cpu.yaml", Path(args.overlay)])
        return
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only or k == "sync"}

    import ray

    base = [ROOT / "configs" / "tiny_cpu.yaml", Path(args.overlay)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
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
