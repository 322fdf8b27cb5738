"""Issue 13's goal for a recommended entropy rule, checked run by run on a study.

    python benchmarks/entropy_goal.py study_runs/entropy_rules [--reference grpo_strict]
    python benchmarks/entropy_goal.py study_runs/smollm2_entropy_rules     # the real model's study

A study still running (or stopped) is read as it stands: the "iterations" column gives each
seed's logged iterations and the iteration of its last held-out evaluation, which the held-out
goals compare; compare rules only where those agree (``--finished``: only the seeds the study
marked done; ``--seeds 0 1``: only these seeds).

For each run (mean over its seeds, from the run directories via the study report's own
``seed_summary``), against the reference (strict GRPO):
  entropy      the end within ±15% of the start;
  pass@k       held-out pass@k (the largest k) >= the reference's;
  greedy, avg  held-out greedy accuracy and avg@k no more than 0.02 below the reference's;
  realized     |mean realized entropy change per step| <= 10% of the reference's mean |change|
               (the mean over its steps of |change|; the share of |the reference's mean change|,
               a stricter reading, is printed beside it).
Prints one markdown table: each value, and whether it meets its goal.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from opefo_rllib.study_report import REALIZED, _scalars, seed_summary
from opefo_rllib.study_state import seed_dirs


def _metric(summary: dict, suffix: str) -> float:
    keys = [k for k in summary if k.startswith("eval/") and k.rsplit("/", 1)[-1].startswith(suffix)]
    return summary[sorted(keys)[-1]] if keys else float("nan")


def run_means(run: Path, finished: bool = False, only: list[int] | None = None) -> dict[str, float]:
    # A seed counts once it has trained an iteration (a run just started has only its iteration-0 eval).
    sums_by_seed = {d: seed_summary(d) for d in seed_dirs(run, finished, only)}
    seeds = [d for d, s in sums_by_seed.items() if s["logged_iterations"] > 0]
    sums = [sums_by_seed[d] for d in seeds]
    realized = [series[REALIZED][1] for series in map(_scalars, seeds) if REALIZED in series]
    abs_change = [float(np.mean(np.abs(values))) for values in realized]
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    progress = "/".join(f"{s['logged_iterations']:.0f}@{s['eval_iteration']:.0f}" for s in sums)
    return {"seeds": len(seeds), "progress": progress, "entropy_start": mean([s["entropy_start"] for s in sums]),
            "entropy_end": mean([s["entropy_end"] for s in sums]),
            "greedy": mean([_metric(s, "greedy_acc") for s in sums]), "avg": mean([_metric(s, "avg@") for s in sums]),
            "pass": mean([_metric(s, "pass@") for s in sums]),
            "realized": mean([s["realized_change_mean"] for s in sums]), "abs_realized": mean(abs_change)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study_dir")
    ap.add_argument("--reference", default="grpo_strict")
    ap.add_argument("--finished", action="store_true", help="only the seeds the study marked done")
    ap.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: all)")
    args = ap.parse_args()
    runs = {d.name: run_means(d, args.finished, args.seeds) for d in sorted(Path(args.study_dir).iterdir()) if any(d.glob("seed_*"))}
    runs = {name: r for name, r in runs.items() if r["seeds"]}
    if args.reference not in runs:
        raise SystemExit(f"{args.study_dir}: the reference run {args.reference} has no trained seed"
                         + (" among the seeds asked for" if args.seeds or args.finished else ""))
    ref = runs[args.reference]
    ok = lambda flag: "yes" if flag else "**no**"  # noqa: E731
    print(f"reference {args.reference}: greedy {ref['greedy']:.3f}, avg {ref['avg']:.3f}, pass {ref['pass']:.3f}, "
          f"mean |realized change| {ref['abs_realized']:.2e}\n")
    print("| run | seeds | iterations (logged@eval) | entropy start → end (change) | greedy | avg@k | pass@k | realized ΔH mean (/ GRPO mean \\|ΔH\\|; "
          "/ \\|GRPO mean ΔH\\|) | goals met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        change = r["entropy_end"] / r["entropy_start"] - 1
        share = abs(r["realized"]) / ref["abs_realized"]
        goals = [abs(change) <= 0.15, r["pass"] >= ref["pass"], r["greedy"] >= ref["greedy"] - 0.02,
                 r["avg"] >= ref["avg"] - 0.02, share <= 0.10]
        print(f"| {name} | {r['seeds']} | {r['progress']} | {r['entropy_start']:.3f} → {r['entropy_end']:.3f} ({change:+.0%}) {ok(goals[0])} "
              f"| {r['greedy']:.3f} {ok(goals[2])} | {r['avg']:.3f} {ok(goals[3])} | {r['pass']:.3f} {ok(goals[1])} "
              f"| {r['realized']:+.2e} ({share:.0%}; {abs(r['realized'] / ref['realized']):.0%}) {ok(goals[4])} "
              f"| {sum(goals)}/5 |")


if __name__ == "__main__":
    main()
