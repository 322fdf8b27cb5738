"""Compare the TensorBoard scalars of two runs, tag by tag (e.g. before and after a refactor
that must not change behaviour): prints the largest absolute difference of each shared tag
and the tags only one run has. Timing tags (time/, throughput/, the engines' busy time and idle
fraction) are skipped.

    python benchmarks/compare_runs.py RUN_A RUN_B   (or their tensorboard/ folders)
"""

from __future__ import annotations

import argparse
import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opefo_rllib.evaluation.compare import event_dir


def scalars(logdir: str) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(event_dir(logdir)), size_guidance={"scalars": 0})  # RUN/tensorboard/NAME
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]
            if not tag.startswith(("time/", "throughput/", "fleet/engine_busy_s", "fleet/engine_idle_frac"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    a, b = scalars(args.a), scalars(args.b)
    worst = 0.0
    for tag in sorted(set(a) & set(b)):
        steps = sorted(set(a[tag]) & set(b[tag]))
        diffs = [abs(a[tag][s] - b[tag][s]) for s in steps
                 if not (math.isnan(a[tag][s]) and math.isnan(b[tag][s]))]
        diff = max(diffs, default=0.0)
        worst = max(worst, diff)
        print(f"{tag:45s} steps {len(steps):4d}  max |a - b| = {diff:.3g}")
    print(f"only in A: {sorted(set(a) - set(b))}")
    print(f"only in B: {sorted(set(b) - set(a))}")
    print(f"largest difference over shared tags: {worst:.3g}")


if __name__ == "__main__":
    main()
