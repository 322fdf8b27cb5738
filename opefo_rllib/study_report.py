"""OUT/results.md and OUT/curves.png of ``opefo study``, from the run files only.

Each seed's run directory gives one value per column (``seed_summary``); a run name's row is the
mean ± sample standard deviation (ddof 1) of its seeds' values. Read from RUN/tensorboard (the
same reader as ``opefo compare``) and RUN/eval/iter_*.json:

- held-out eval at the last eval: ``greedy_acc``, ``avg@K`` and the largest ``pass@k`` of each
  task (RUN/eval/iter_*.json, the newest; else the eval/... TensorBoard tags at their last step);
- ``policy/entropy`` and ``rollout/reward_mean``, start -> end: means over the first and the last
  10% of the logged iterations (at least one);
- mean ``entropy_flow/lambda_star`` (NaN steps, the one-sided batches, left out);
- the share of steps with ``entropy_flow/N`` > ``entropy_flow/P``;
- mean ``entropy_flow/realized_change`` and its Pearson correlation, step by step, with
  ``predicted_entropy_change/exact``, when the run logs both.

A value a run does not log is "—" in the table, never an error. Running the report again on the
same files gives the same text.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from opefo_rllib.config import ConfigError
from opefo_rllib.evaluation.compare import TRAINING_TAGS, Series, eval_metric_rank, plot_runs, read_scalars
from opefo_rllib.study_state import run_state

__all__ = ["seed_summary", "summary_table", "mean_curves", "write_report", "DASH"]

DASH = "—"
ENTROPY, REWARD = "policy/entropy", "rollout/reward_mean"
LAMBDA_STAR, P, N = "entropy_flow/lambda_star", "entropy_flow/P", "entropy_flow/N"
REALIZED, PREDICTED = "entropy_flow/realized_change", "predicted_entropy_change/exact"
# Training columns: (key in a seed's summary, header, how a value is shown)
TRAINING_COLUMNS = (
    ("reward_start", "reward start", "num"), ("reward_end", "reward end", "num"),
    ("entropy_start", "entropy start", "num"), ("entropy_end", "entropy end", "num"),
    ("lambda_star_mean", "mean λ*", "num"), ("n_gt_p_share", "steps N > P", "pct"),
    ("realized_change_mean", "realized ΔH mean", "sci"),
    ("realized_vs_predicted_corr", "corr(realized, predicted)", "num"),
)


_SCALARS: dict[tuple, Series] = {}  # (run dir, its event files' sizes) -> scalars: a report reads each run once


def _scalars(run_dir: Path) -> Series:
    files = sorted(run_dir.rglob("events.out.tfevents.*"))
    if not files:
        return {}
    key = (str(run_dir.resolve()), tuple((str(f), f.stat().st_size) for f in files))
    if key not in _SCALARS:
        _SCALARS[key] = read_scalars(run_dir)
    return _SCALARS[key]


def _nanmean(values) -> float:
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def _ends(series: Series, tag: str) -> tuple[float, float]:
    """Means of the first and last 10% of a tag's logged steps (at least one step each)."""
    if tag not in series:
        return math.nan, math.nan
    values = series[tag][1]
    k = max(1, round(len(values) / 10))
    return _nanmean(values[:k]), _nanmean(values[-k:])


def _paired(series: Series, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Values of two tags at the steps where both are logged and finite."""
    if a not in series or b not in series:
        return np.array([]), np.array([])
    va, vb = dict(zip(*series[a])), dict(zip(*series[b]))
    steps = [s for s in sorted(set(va) & set(vb)) if math.isfinite(va[s]) and math.isfinite(vb[s])]
    return np.array([va[s] for s in steps], dtype=float), np.array([vb[s] for s in steps], dtype=float)


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _keep_eval_metric(metric: str, largest_k: int) -> bool:
    return metric == "greedy_acc" or (metric.startswith("avg@") and not metric.endswith("_ci95")) \
        or metric == f"pass@{largest_k}"


def _last_eval(run_dir: Path, series: Series) -> tuple[int | None, dict[str, float]]:
    """(iteration, {"eval/TASK/metric": value}) of the run's last evaluation."""
    files = sorted((run_dir / "eval").glob("iter_*.json"), key=lambda p: int(p.stem.split("_")[-1]))
    raw: dict[str, float] = {}
    iteration = None
    if files:
        iteration = int(files[-1].stem.split("_")[-1])
        results = json.loads(files[-1].read_text()).get("results", {})
        raw = {f"eval/{task}/{k}": float(v) for task, metrics in results.items() for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    else:
        tags = [t for t in series if t.startswith("eval/")]
        if tags:
            iteration = max(series[t][0][-1] for t in tags)
            raw = {t: series[t][1][-1] for t in tags if series[t][0][-1] == iteration}
    by_task: dict[str, dict[str, float]] = {}
    for key, value in raw.items():
        task, metric = key[len("eval/"):].rsplit("/", 1)
        by_task.setdefault(task, {})[metric] = value
    kept = {}
    for task, metrics in by_task.items():
        largest_k = max((int(m[5:]) for m in metrics if m.startswith("pass@") and m[5:].isdigit()), default=0)
        kept.update({f"eval/{task}/{m}": v for m, v in metrics.items() if _keep_eval_metric(m, largest_k)})
    return iteration, kept


def seed_summary(run_dir: str | Path) -> dict[str, float]:
    """One seed's values (NaN where the run does not log what a value needs)."""
    run_dir = Path(run_dir)
    series = _scalars(run_dir)
    out: dict[str, float] = {}
    out["reward_start"], out["reward_end"] = _ends(series, REWARD)
    out["entropy_start"], out["entropy_end"] = _ends(series, ENTROPY)
    out["lambda_star_mean"] = _nanmean(series[LAMBDA_STAR][1]) if LAMBDA_STAR in series else math.nan
    n, p = _paired(series, N, P)
    out["n_gt_p_share"] = float(np.mean(n > p)) if len(n) else math.nan
    out["realized_change_mean"] = _nanmean(series[REALIZED][1]) if REALIZED in series else math.nan
    out["realized_vs_predicted_corr"] = _correlation(*_paired(series, REALIZED, PREDICTED))
    iteration, evals = _last_eval(run_dir, series)
    out["eval_iteration"] = math.nan if iteration is None else float(iteration)
    out.update(evals)
    out["logged_iterations"] = float(len(series[REWARD][0])) if REWARD in series else math.nan
    return out


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan, 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan, int(a.size)


def _fmt(x: float, kind: str, scale: float) -> str:
    """``scale``: the mean, so that a mean and its std are written alike."""
    if kind == "pct":
        return f"{100 * x:.0f}%"
    if kind == "sci" and scale != 0 and abs(scale) < 1e-2:
        return f"{x:.2e}"
    return f"{x:.3f}"


def _cell(values: Sequence[float], kind: str = "num", seeds: int | None = None) -> str:
    """'mean ± std' over the seeds that have the value; '—' when none has it; '(n=k)' when
    fewer seeds than the row's have it."""
    mean, std, n = _stats(values)
    if n == 0:
        return DASH
    text = _fmt(mean, kind, mean) + (f" ± {_fmt(std, kind, mean)}" if n > 1 else "")
    return text + (f" (n={n})" if seeds is not None and n < seeds else "")


def _eval_columns(summaries: dict[str, list[dict[str, float]]]) -> list[str]:
    keys = {k for rows in summaries.values() for row in rows for k in row if k.startswith("eval/")}
    return sorted(keys, key=eval_metric_rank)


def _pair(col: dict[str, str], metric: str) -> str:
    start, end = col[f"{metric}_start"], col[f"{metric}_end"]
    return DASH if start == end == DASH else f"{start} → {end}"


def summary_table(summaries: dict[str, list[dict[str, float]]], done: dict[str, int] | None = None) -> str:
    """The two markdown tables of results.md, from each run name's per-seed summaries."""
    done = done or {}
    evals = _eval_columns(summaries)
    lines = ["### Held-out evaluation at the last eval", ""]
    if evals:
        lines += ["| run | seeds | iteration | " + " | ".join(k[len("eval/"):] for k in evals) + " |",
                  "|---|---|---|" + "---|" * len(evals)]
        for name, rows in summaries.items():
            seeds = len(rows)
            iters = sorted({int(r["eval_iteration"]) for r in rows if math.isfinite(r.get("eval_iteration", math.nan))})
            it = DASH if not iters else str(iters[0]) if len(iters) == 1 else f"{iters[0]}-{iters[-1]}"
            lines.append(f"| {name} | {seeds} | {it} | "
                         + " | ".join(_cell([r.get(k, math.nan) for r in rows], seeds=seeds) for k in evals) + " |")
    else:
        lines.append("No run has evaluated yet (no RUN/eval/iter_*.json, no eval/... TensorBoard tags).")
    lines += ["", "### Training", "",
              "| run | seeds (done) | reward start → end | entropy start → end | "
              + " | ".join(h for _, h, _ in TRAINING_COLUMNS[4:]) + " |",
              "|---|---|---|---|" + "---|" * len(TRAINING_COLUMNS[4:])]
    for name, rows in summaries.items():
        seeds = len(rows)
        col = {key: _cell([r.get(key, math.nan) for r in rows], kind, seeds) for key, _, kind in TRAINING_COLUMNS}
        lines.append(f"| {name} | {seeds} ({done.get(name, 0)}) | {_pair(col, 'reward')} | {_pair(col, 'entropy')} | "
                     + " | ".join(col[key] for key, _, _ in TRAINING_COLUMNS[4:]) + " |")
    return "\n".join(lines)


def mean_curves(run_dirs: Sequence[Path], tags: Sequence[str] | None = None) -> Series:
    """Each tag's mean over seeds at every logged step (NaN-aware; a step counts the seeds that
    logged it)."""
    per_seed = [_scalars(Path(d)) for d in run_dirs]
    wanted = tags if tags is not None else sorted({t for s in per_seed for t in s})
    curves: Series = {}
    for tag in wanted:
        points: dict[int, list[float]] = {}
        for series in per_seed:
            if tag in series:
                for step, value in zip(*series[tag]):
                    points.setdefault(step, []).append(value)
        if points:
            steps = sorted(points)
            curves[tag] = (steps, [_nanmean(points[s]) for s in steps])
    return curves


def _curve_tags(run_dirs: Sequence[Path]) -> list[str]:
    tags = set()
    for d in run_dirs:
        tags |= {t for t in _scalars(Path(d)) if t in TRAINING_TAGS or t.startswith("eval/")}
    return sorted(tags)


def write_report(out: str | Path, runs: dict[str, list[Path]], iterations: int, title: str = "study") -> Path:
    """Write OUT/results.md (and OUT/curves.png when any run has curves) from ``runs``: each run
    name's seed directories (those that do not exist are left out)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    present = {name: [d for d in dirs if Path(d).is_dir()] for name, dirs in runs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        summaries = {name: [seed_summary(d) for d in dirs] for name, dirs in present.items()}
        done = {name: sum(run_state(Path(d), iterations).kind == "done" for d in dirs)
                for name, dirs in present.items()}
        curves = {name: mean_curves(dirs, _curve_tags(dirs)) for name, dirs in present.items() if dirs}
    curves = {name: c for name, c in curves.items() if c}
    figure = False
    if curves:
        try:
            plot_runs(curves, out / "curves.png", where=str(out))
            figure = True
        except ConfigError:  # curves, but none that compare draws (reward, entropy, lambda, eval accuracies)
            pass
    if not figure:
        (out / "curves.png").unlink(missing_ok=True)  # never leave a figure of older files beside the table
    text = [f"# Study {title}: {len(runs)} run{'s' * (len(runs) != 1)} x seeds, {iterations} iterations each", "",
            ("Each cell: mean ± sample standard deviation (ddof 1) over the run's seeds; (n=k) when only k "
             "seeds log the value; — when none does. Start/end: means over the first and last 10% of "
             "the logged iterations. Computed from the run directories only (OUT/NAME/seed_S)."), "",
            summary_table(summaries, done), ""]
    if figure:
        text += ["![reward, entropy, lambda and eval curves, mean over seeds](curves.png)", ""]
    path = out / "results.md"
    path.write_text("\n".join(text))
    return path
