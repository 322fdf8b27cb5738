"""The curves of a multi-turn run: reward, turns and tool calls per episode, the env's token share,
entropy, and held-out accuracy, read from the run's TensorBoard log.

    python benchmarks/episode_curves.py RUN_DIR [--png docs/tool_run.png] [--every 1]

Prints one row per iteration (every ``--every``-th) and the evaluations; with ``--png``, draws
them (reward and held-out accuracy; turns and tool calls; entropy and lambda*).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opefo_rllib.evaluation.compare import read_scalars

COLUMNS = {"reward": "rollout/reward_mean", "turns": "episode/turns_mean", "tool calls": "episode/tool_calls_mean",
           "tool errors": "episode/tool_errors", "env tokens": "episode/env_token_frac", "cut": "episode/cut_frac",
           "entropy": "policy/entropy", "lambda*": "entropy_flow/lambda", "length": "rollout/response_length_mean"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--every", type=int, default=1)
    args = parser.parse_args()
    series = read_scalars(args.run / "tensorboard")
    present = {name: dict(zip(*series[tag])) for name, tag in COLUMNS.items() if tag in series}
    steps = sorted(present["reward"])
    print("iter " + " ".join(f"{name:>11s}" for name in present))
    for step in steps[::args.every]:
        print(f"{step:4d} " + " ".join(f"{present[name].get(step, float('nan')):11.3f}" for name in present))
    evals = {tag: dict(zip(*values)) for tag, values in series.items() if tag.startswith("eval/")
             and tag.rsplit("/", 1)[1] in ("greedy_acc", "pass@1", "avg@2", "pass@2")}
    for tag, points in sorted(evals.items()):
        print(f"{tag}: " + ", ".join(f"iter {s}: {v:.3f}" for s, v in sorted(points.items())))
    if args.png:
        _plot(present, evals, args.png)
        print(f"wrote {args.png}")


def _plot(present: dict, evals: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [(axes[0], ["reward"], "reward and held-out accuracy"), (axes[1], ["turns", "tool calls"], "per episode"),
              (axes[2], ["entropy", "lambda*"], "policy entropy and lambda*")]
    for ax, names, title in panels:
        for name in names:
            if name in present:
                steps = sorted(present[name])
                ax.plot(steps, [present[name][s] for s in steps], label=name)
        ax.set_title(title)
        ax.set_xlabel("iteration")
    for tag, points in sorted(evals.items()):
        steps = sorted(points)
        axes[0].plot(steps, [points[s] for s in steps], "o--", label=tag.split("/", 1)[1])
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
