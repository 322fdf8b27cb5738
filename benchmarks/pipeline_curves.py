"""Do two pipelines train alike? Reward, entropy and held-out accuracy of run groups, seed by seed,
over their first ``--until`` iterations (issue 14: streaming's curves against sync's).

    python benchmarks/pipeline_curves.py --until 250 \
        sync=study_runs/entropy_rules/opefo_exact \
        streaming=study_runs/streaming_3seeds/opefo_exact_streaming

Each NAME=DIR holds seed_*/ run directories. Prints, per group, mean ± standard deviation over
its seeds of: reward and entropy over the first and last 10% of the iterations, and the held-out
evaluation at iteration ``until``; then the difference of the group means in units of the larger
seed-to-seed standard deviation (|z| < 2: within seed noise).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from opefo_rllib.evaluation.compare import read_scalars

TAGS = {"reward start": ("rollout/reward_mean", "start"), "reward end": ("rollout/reward_mean", "end"),
        "entropy start": ("policy/entropy", "start"), "entropy end": ("policy/entropy", "end")}
EVAL = ("greedy_acc", "avg@8", "pass@8")


def seed_numbers(run_dir: Path, until: int) -> dict[str, float]:
    series = read_scalars(run_dir)
    out = {}
    for name, (tag, end) in TAGS.items():
        points = [(s, v) for s, v in zip(*series[tag]) if 1 <= s <= until]
        tenth = max(1, len(points) // 10)
        window = points[:tenth] if end == "start" else points[-tenth:]
        out[name] = statistics.fmean(v for _, v in window)
    for metric in EVAL:
        tag = next((t for t in series if t.startswith("eval/") and t.endswith("/" + metric)), None)
        if tag is not None:
            at = dict(zip(*series[tag]))
            if until in at:
                out[f"held-out {metric}"] = at[until]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="+", help="NAME=DIR (DIR holds seed_*/)")
    ap.add_argument("--until", type=int, default=250)
    args = ap.parse_args()
    groups = {}
    for spec in args.groups:
        name, _, folder = spec.partition("=")
        seeds = sorted(Path(folder).glob("seed_*"))
        if not name or not seeds:
            raise SystemExit(f"pipeline_curves: {spec!r}: give NAME=DIR where DIR holds seed_*/ run directories")
        groups[name] = [seed_numbers(d, args.until) for d in seeds]
        print(f"{name}: {len(seeds)} seeds from {folder}")
    keys = [k for k in groups[next(iter(groups))][0]]
    print("\n| quantity | " + " | ".join(groups) + " | difference / seed std |")
    print("|---|" + "---|" * (len(groups) + 1))
    for key in keys:
        cells, means, stds = [], [], []
        for per_seed in groups.values():
            values = [s[key] for s in per_seed if key in s]
            m, sd = statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))
            means.append(m)
            stds.append(sd)
            cells.append(f"{m:.3f} ± {sd:.3f}")
        spread = max((sd for sd in stds if sd == sd), default=0.0)  # the larger seed std (a 1-seed group has none)
        z = (means[1] - means[0]) / spread if len(means) == 2 and spread > 0 else float("nan")
        print(f"| {key} | " + " | ".join(cells) + f" | {z:+.1f} |")


if __name__ == "__main__":
    main()
