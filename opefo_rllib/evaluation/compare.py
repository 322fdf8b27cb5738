"""``opefo compare``: several runs' curves in one figure, and their first/last values.

Reads the TensorBoard event files of each run (tensorboard's EventAccumulator) and plots the
training reward, policy entropy, lambda and the eval accuracies (``eval/NAME/greedy_acc``,
``avg@K``, ``pass@k``, ``maj@K``) against iteration, one panel per metric and one line per run
(matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Sequence

from opefo_rllib.config.fields import ConfigError

__all__ = ["TRAINING_TAGS", "EVAL_METRICS", "RUN_CURVES", "event_dir", "read_scalars", "repeated_steps",
           "curve_gaps", "compare_runs", "plot_runs", "first_last_table", "eval_metric_rank"]

TRAINING_TAGS = ("rollout/reward_mean", "policy/entropy", "entropy_flow/lambda")
Series = dict[str, tuple[list[int], list[float]]]  # tag -> (steps, values)


def event_dir(run_dir: str | Path) -> Path:
    """The folder of a run's event files: the shallowest below ``run_dir`` that has any
    (RUN/tensorboard/NAME, or RUN/tensorboard for runs from before run names; not a branch's)."""
    folders = {f.parent for f in Path(run_dir).expanduser().rglob("events.out.tfevents.*")}
    if not folders:
        raise ConfigError(f"compare: {run_dir}: no TensorBoard event files (give run directories of `opefo train`)")
    return min(folders, key=lambda d: (len(d.parts), str(d)))


def read_scalars(run_dir: str | Path) -> Series:
    """Every scalar of a run, sorted by step, from its ``event_dir``; reading the folder as one
    log applies TensorBoard's own rule for a resumed run (later events purge a restarted step)."""
    series: Series = {}
    for tag, events in _scalar_events(run_dir).items():
        points = dict(events)  # a repeated step keeps its last value
        series[tag] = (sorted(points), [points[s] for s in sorted(points)])
    return series


# The curves of the training itself; time/, throughput/ and fleet/ measure the machine and the
# engines' lives, fault/ the faults, eval/ the evaluations.
RUN_CURVES = ("rollout/", "learner/", "policy/", "entropy_flow/", "predicted_entropy_change/", "quadrant/")


def _scalar_events(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar event as written, a repeated step included (after
    TensorBoard's purge of a resumed run's later steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir(run_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def repeated_steps(run_dir: str | Path) -> dict[str, list[int]]:
    """tag -> the steps a run's TensorBoard shows more than once (a recovery that re-ran an
    iteration without hiding its first events); empty when each step appears once."""
    out = {}
    for tag, events in _scalar_events(run_dir).items():
        steps = [step for step, _ in events]
        twice = sorted({step for step in steps if steps.count(step) > 1})
        if twice:
            out[tag] = twice
    return out


def curve_gaps(run_dir: str | Path, reference_dir: str | Path, prefixes: Sequence[str] = RUN_CURVES) -> dict[str, float]:
    """tag -> the largest |difference| between two runs' curves at the same steps, for the tags of
    ``prefixes`` either run has (inf: a tag or a step only one run has; a NaN equals a NaN)."""
    got, want = read_scalars(run_dir), read_scalars(reference_dir)
    gaps = {}
    for tag in sorted(t for t in set(got) | set(want) if t.startswith(tuple(prefixes))):
        (steps_a, values_a), (steps_b, values_b) = got.get(tag, ([], [])), want.get(tag, ([], []))
        if steps_a != steps_b:
            gaps[tag] = math.inf
            continue
        gaps[tag] = max((0.0 if (math.isnan(a) and math.isnan(b)) else abs(a - b)
                         for a, b in zip(values_a, values_b)), default=0.0)
    return gaps


EVAL_METRICS = ("greedy_acc", "avg@", "pass@", "maj@")  # the eval/NAME/<metric> curves worth a panel
_ACCURACIES = ("greedy_acc", "avg@", "pass@")  # the ones a one-line summary or a study table shows


def eval_metric_rank(key: str) -> tuple[str, int | None, str]:
    """Sort key of an ``eval/NAME/metric`` tag: by task, then greedy, avg@, pass@ (kind None for
    any other metric)."""
    name, metric = key[len("eval/"):].rsplit("/", 1)
    kind = next((i for i, prefix in enumerate(_ACCURACIES) if metric.startswith(prefix)), None)
    return name, kind, metric


def _tags(runs: dict[str, Series]) -> list[str]:
    evals = sorted({t for series in runs.values() for t in series
                    if t.startswith("eval/") and t.rsplit("/", 1)[-1].startswith(EVAL_METRICS)})
    return [t for t in TRAINING_TAGS if any(t in s for s in runs.values())] + evals


def first_last_table(runs: dict[str, Series], tags: Sequence[str]) -> str:
    """Markdown: one row per run and metric, with its first and last value (and their steps)."""
    rows = ["| run | metric | first (iteration) | last (iteration) |", "|---|---|---|---|"]
    for name, series in runs.items():
        for tag in tags:
            if tag in series:
                steps, values = series[tag]
                rows.append(f"| {name} | {tag} | {_num(values[0])} ({steps[0]}) | {_num(values[-1])} ({steps[-1]}) |")
    return "\n".join(rows)


def _num(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


def _run_dir(path: Path) -> Path:
    """The run directory (``OPEFO-<model>-seed<N>-<time>`` by default), whether given as RUN,
    RUN/tensorboard or RUN/tensorboard/NAME."""
    if path.name == "tensorboard":
        return path.parent
    if path.parent.name == "tensorboard":
        return path.parent.parent
    return path


def _names(dirs: Sequence[str]) -> list[str]:
    """Short labels: the run directory's name; PARENT/NAME where runs share a name (a study's
    RULE/seed_0 runs); numbered where even that is shared (one run given twice)."""
    run_dirs = [_run_dir(Path(d).expanduser().resolve()) for d in dirs]
    uses = Counter(r.name for r in run_dirs)
    names = []
    for r in run_dirs:
        label = f"{r.parent.name}/{r.name}" if uses[r.name] > 1 else r.name
        names.append(label if label not in names else f"{label} ({len(names)})")
    return names


def compare_runs(run_dirs: Sequence[str], out: str | Path) -> str:
    """Write the figure to ``out`` and return the markdown table."""
    runs = {name: read_scalars(d) for name, d in zip(_names(run_dirs), run_dirs)}
    return plot_runs(runs, out, where=", ".join(map(str, run_dirs)))


def plot_runs(runs: dict[str, Series], out: str | Path, where: str = "the runs") -> str:
    """Draw already-read curves (one line per entry of ``runs``) to ``out``; return the markdown
    table. ``opefo study`` passes each run's mean over seeds."""
    tags = _tags(runs)
    if not tags:
        raise ConfigError(f"compare: none of {list(TRAINING_TAGS)} or eval/... in {where}")
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        for color, (name, series) in enumerate(runs.items()):  # a run keeps its colour in every panel
            if tag in series:
                steps, values = series[tag]
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=name,
                        color=f"C{color % 10}")
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return first_last_table(runs, tags)
