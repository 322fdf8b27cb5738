"""The tables of a finished (or partly finished) entropy-rules study, for docs/results.md.

    python benchmarks/real_lm_study.py study_runs/smollm2_entropy_rules [--window 25] [--finished] [--seeds 0 1]

Read from the run directories only (RUN/tensorboard, RUN/eval/iter_*.problems.jsonl); a seed that
has not trained an iteration is left out, one that stopped early counts with the iterations it
logged (``--finished``: only the seeds the study marked done, so that every seed of every rule
covers the same iterations; ``--seeds``: only these seeds). Prints
markdown: for each rule (a run name of the study), over its seeds,

1. the diagnosis: the shares of steps without signal (P = N = 0) and one-sided; over the
   two-sided steps, the share with N > P and the lambda* distribution (10th / 50th / 90th
   percentile, their mean, the share above the 0.3 cap); P and N over training (means per window);
2. prediction against reality, for each estimator (exact, single_logit, paper): the per-batch
   Pearson correlation over steps of the predicted change (``predicted_entropy_change/EST``, sum
   over the batch's tokens of delta_t) and the realized change of the batch's mean entropy, and the
   mean over steps of the per-token correlation (``entropy_flow/token_corr/EST``);
3. entropy, reward and response length per window;
4. held-out greedy, avg@k and pass@k at each evaluation, with 95% bootstrap intervals: each
   problem's value averaged over the seeds, problems resampled (``bootstrap_ci``);
5. each rule against the reference (``--reference``, strict GRPO by default) at the last
   evaluation both reached with every seed: the per-problem difference of the seed means, with its
   interval, and each seed's avg@k;
6. seed by seed, for the rules with more than one: N > P, lambda*, the realized change, the
   per-token correlation (exact), entropy and reward over the last window, held-out at the seed's
   last evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from opefo_rllib.core.entropy_flow import ESTIMATORS
from opefo_rllib.evaluation.compare import read_scalars
from opefo_rllib.evaluation.metrics import bootstrap_ci, pass_at_k
from opefo_rllib.study_state import seed_dirs

REALIZED = "entropy_flow/realized_change"


def _seeds(run: Path, finished: bool, only: list[int] | None = None) -> list[Path]:
    return [d for d in seed_dirs(run, finished, only) if any(d.rglob("events.out.tfevents.*"))]


def _values(series: dict, tag: str, finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    if tag not in series:
        return np.array([], dtype=int), np.array([])
    steps, values = np.asarray(series[tag][0]), np.asarray(series[tag][1], dtype=float)
    keep = np.isfinite(values) if finite else np.ones_like(values, dtype=bool)
    return steps[keep], values[keep]


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _paired(series: dict, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    sa, va = _values(series, a)
    sb, vb = _values(series, b)
    common = np.intersect1d(sa, sb)
    return va[np.isin(sa, common)], vb[np.isin(sb, common)]


def _fmt(x: float, digits: int = 3, fixed: bool = False) -> str:
    """``fixed``: always ``digits`` decimals (correlations); otherwise small values in e-notation."""
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.2e}" if not fixed and x != 0 and abs(x) < 10 ** -(digits - 1) else f"{x:.{digits}f}"


def _mean_sd(values: list[float], digits: int = 3, pct: bool = False, fixed: bool = False) -> str:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if a.size == 0:
        return "—"
    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: _fmt(v, digits, fixed))
    return f(a.mean()) + (f" ± {f(a.std(ddof=1))}" if a.size > 1 else "")


def windows(last: int, width: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + width - 1, last)) for lo in range(1, last + 1, width)]


def _tag_mean(series: dict, tag: str) -> float:
    """The mean of a tag's finite values over the run, NaN if it logged none."""
    values = _values(series, tag)[1]
    return float(values.mean()) if values.size else math.nan


def window_mean(series: dict, tag: str, lo: int, hi: int) -> float:
    steps, values = _values(series, tag)
    sel = values[(steps >= lo) & (steps <= hi)]
    return float(sel.mean()) if sel.size else math.nan


def _diagnose(s: dict) -> dict[str, float]:
    """One seed's flows: the shares of steps without signal and one-sided; over the two-sided steps
    the share with N > P, the lambda* percentiles, mean and share above the 0.3 cap; the mean lambda used."""
    n, p = _paired(s, "entropy_flow/N", "entropy_flow/P")
    steps, _ = _values(s, "entropy_flow/N")
    star_steps, star_values = _values(s, "entropy_flow/lambda_star", finite=False)
    star = dict(zip(star_steps.tolist(), star_values.tolist()))
    two_sided = (n > 0) & (p > 0)
    values = np.array([star.get(t, math.nan) for t in steps[two_sided].tolist()], dtype=float)
    values = values[np.isfinite(values)]
    q = np.percentile(values, [10, 50, 90]) if values.size else [math.nan] * 3
    return {"none": float(np.mean((n == 0) & (p == 0))) if n.size else math.nan,
            "one": float(np.mean((n == 0) != (p == 0))) if n.size else math.nan,
            "share": float(np.mean(n[two_sided] > p[two_sided])) if two_sided.any() else math.nan,
            **{key: float(v) for key, v in zip(("p10", "p50", "p90"), q)},
            "mean": float(values.mean()) if values.size else math.nan,
            "capped": float(np.mean(np.abs(values) > 0.3)) if values.size else math.nan,
            "lam": _tag_mean(s, "entropy_flow/lambda")}


def diagnosis(runs: dict[str, list[dict]]) -> list[str]:
    """Steps without signal (P = N = 0: every group all right or all wrong), one-sided steps (one
    of P, N is 0: lambda* NaN), and over the two-sided steps the share with N > P and the lambda*
    distribution."""
    lines = ["### The diagnosis: N > P, λ\\*", "",
             "Over the steps with both flows (P > 0 and N > 0); P = N = 0 when every group is all right or all "
             "wrong (no advantage), one-sided when one of them is 0.", "",
             "| rule | seeds | iterations | no signal | one-sided | N > P | λ\\* p10 / p50 / p90 | mean λ\\* | \\|λ\\*\\| > 0.3 | mean λ used |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, seeds in runs.items():
        per_seed = [_diagnose(s) for s in seeds]
        col = lambda key: [d[key] for d in per_seed]  # noqa: E731
        iters = [len(_values(s, "rollout/reward_mean")[0]) for s in seeds]
        lines.append(f"| {name} | {len(seeds)} | {'/'.join(map(str, iters))} | {_mean_sd(col('none'), pct=True)} "
                     f"| {_mean_sd(col('one'), pct=True)} | {_mean_sd(col('share'), pct=True)} "
                     f"| {_mean_sd(col('p10'))} / {_mean_sd(col('p50'))} / {_mean_sd(col('p90'))} "
                     f"| {_mean_sd(col('mean'))} | {_mean_sd(col('capped'), pct=True)} | {_mean_sd(col('lam'))} |")
    return lines


def over_training(runs: dict[str, list[dict]], width: int, tags: list[tuple[str, str, int]], title: str) -> list[str]:
    last = max((int(_values(s, "rollout/reward_mean")[0].max(initial=0)) for seeds in runs.values() for s in seeds),
               default=0)
    spans = windows(last, width)
    lines = [f"### {title}", "", "| rule | " + " | ".join(h for _, h, _ in tags) + " |",
             "|---|" + "---|" * len(tags)]
    for name, seeds in runs.items():
        cells = []
        for tag, _, digits in tags:
            per_window = [_mean_sd([window_mean(s, tag, lo, hi) for s in seeds], digits) for lo, hi in spans]
            cells.append(" → ".join(per_window))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.insert(2, "Means over iterations " + ", ".join(f"{lo}-{hi}" for lo, hi in spans)
                 + " (each: mean ± sd over seeds).\n")
    return lines


def prediction(runs: dict[str, list[dict]]) -> list[str]:
    heads = [f"per-batch {e}" for e in ESTIMATORS] + [f"per-token {e}" for e in ESTIMATORS]
    lines = ["### Prediction against reality", "",
             "Per batch: Pearson correlation over a run's steps of Σ_t δ_t (each estimator) and the realized change "
             "of the batch's mean entropy; per token: the mean over steps of the correlation over the batch's "
             "response tokens of δ_t and the realized change of H_t. Mean ± sd over seeds.", "",
             "| rule | realized ΔH / step | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for name, seeds in runs.items():
        realized = [_tag_mean(s, REALIZED) for s in seeds]
        batch = [_mean_sd([_corr(*_paired(s, f"predicted_entropy_change/{e}", REALIZED)) for s in seeds], 2, fixed=True)
                 for e in ESTIMATORS]
        token = [_mean_sd([_tag_mean(s, f"entropy_flow/token_corr/{e}") for s in seeds], 2, fixed=True)
                 for e in ESTIMATORS]
        lines.append(f"| {name} | {_mean_sd(realized)} | " + " | ".join(batch + token) + " |")
    return lines


def _problems(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines()) if row.get("id")}


METRICS = ("greedy", "avg", "pass")


def _evals(seeds_of_rule: list[Path]) -> dict[int, dict[str, dict[str, dict]]]:
    """Each evaluated iteration: {seed directory name: {problem id: row}} of the seeds that reached it."""
    by_iter: dict[int, dict[str, dict[str, dict]]] = {}
    for seed in seeds_of_rule:
        for f in sorted((seed / "eval").glob("iter_*.problems.jsonl")):
            by_iter.setdefault(int(f.name.split("_")[1].split(".")[0]), {})[seed.name] = _problems(f)
    return by_iter


def _per_problem(seeds: list[dict[str, dict]], ids: list[str], metric: str) -> np.ndarray:
    """A metric (greedy, avg@k or pass@k with k = the samples) of each problem, averaged over the seeds."""
    out = []
    for pid in ids:
        vals = []
        for s in seeds:
            row = s[pid]
            correct = np.asarray(row["rewards"], dtype=float) >= 1.0
            k = len(correct)
            vals.append(float(row.get("greedy_reward", math.nan)) >= 1.0 if metric == "greedy"
                        else correct.mean() if metric == "avg" else float(pass_at_k(k, int(correct.sum()), k)))
        out.append(float(np.mean(vals)))
    return np.asarray(out)


def _ci(x: np.ndarray) -> str:
    lo, hi = bootstrap_ci(x)
    f2 = lambda v: f"{v + 0.0:.2f}" if abs(v) >= 0.005 else "0.00"  # noqa: E731 (no "-0.00")
    return f"{np.mean(x) + 0.0:.3f} [{f2(lo)}, {f2(hi)}]"


def heldout(seed_dirs: dict[str, list[Path]]) -> list[str]:
    lines = ["### Held-out accuracy with 95% bootstrap intervals", "",
             "Each problem's value averaged over the seeds that reached the iteration, the problems resampled "
             "(2,000 resamples).", "", "| rule | iteration | seeds | greedy | avg@k | pass@k |", "|---|---|---|---|---|---|"]
    for name, seeds_of_rule in seed_dirs.items():
        for iteration, by_seed in sorted(_evals(seeds_of_rule).items()):
            seeds = list(by_seed.values())
            ids = sorted(set.intersection(*(set(s) for s in seeds)))
            cols = [_ci(_per_problem(seeds, ids, metric)) for metric in METRICS]
            lines.append(f"| {name} | {iteration} | {len(seeds)} | " + " | ".join(cols) + " |")
    return lines


def against(seed_dirs: dict[str, list[Path]], reference: str) -> list[str]:
    """Each rule minus the reference, like for like: the seeds both have, at the last evaluation all
    of them reached. Per problem, the rule's seed mean minus the reference's (paired by problem),
    problems resampled; then each seed's avg@k (rule, reference), the seed-to-seed spread that
    the problem intervals leave out."""
    ref = _evals(seed_dirs[reference])
    lines = [f"### Held-out against {reference}, like for like", "",
             f"The seeds both rules have, at the last evaluation all of them reached. Per problem: the rule's "
             f"value averaged over those seeds minus {reference}'s, the problems resampled (2,000 resamples); "
             "then avg@k of each seed, the rule's and the reference's.", "",
             "| rule | iteration | seeds | greedy − ref | avg@k − ref | pass@k − ref | avg@k per seed: rule; ref |",
             "|---|---|---|---|---|---|---|"]
    for name, seeds_of_rule in seed_dirs.items():
        if name == reference:
            continue
        mine = _evals(seeds_of_rule)
        names = sorted({d.name for d in seeds_of_rule} & {d.name for d in seed_dirs[reference]})
        reached = [i for i in sorted(set(mine) & set(ref)) if set(names) <= set(mine[i]) & set(ref[i])]
        if not names or not reached:
            continue
        i = reached[-1]
        rule_seeds, ref_seeds = [mine[i][n] for n in names], [ref[i][n] for n in names]
        ids = sorted(set.intersection(*(set(s) for s in rule_seeds + ref_seeds)))
        cols = [_ci(_per_problem(rule_seeds, ids, m) - _per_problem(ref_seeds, ids, m)) for m in METRICS]
        spread = "; ".join(", ".join(f"{_per_problem([s], ids, 'avg').mean():.3f}" for s in seeds)
                           for seeds in (rule_seeds, ref_seeds))
        lines.append(f"| {name} | {i} | {len(names)} | " + " | ".join(cols) + f" | {spread} |")
    return lines


def seed_by_seed(runs: dict[str, list[dict]], seed_dirs: dict[str, list[Path]], width: int) -> list[str]:
    """One row a seed (the rules with more than one): the spread that the tables' means over seeds
    summarize. Held-out values at the seed's last evaluation."""
    lines = ["### Seed by seed", "",
             f"The rules with more than one seed. Entropy and reward: means over the last {width} iterations; "
             "held-out: the seed's last evaluation.", "",
             "| rule | seed | N > P | λ\\* median | \\|λ\\*\\| > 0.3 | realized ΔH / step | per-token corr (exact) "
             f"| entropy, last {width} | reward, last {width} | held-out iteration | greedy | avg@k | pass@k |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, seeds in runs.items():
        if len(seeds) < 2:
            continue
        for series, seed_dir in zip(seeds, seed_dirs[name]):
            d = _diagnose(series)
            last = int(_values(series, "rollout/reward_mean")[0].max(initial=0))
            lo = max(1, last - width + 1)
            cells = [_mean_sd([d["share"]], pct=True), _fmt(d["p50"]), _mean_sd([d["capped"]], pct=True),
                     _fmt(_tag_mean(series, REALIZED)), _fmt(_tag_mean(series, "entropy_flow/token_corr/exact"), 2, fixed=True),
                     _fmt(window_mean(series, "policy/entropy", lo, last)),
                     _fmt(window_mean(series, "rollout/reward_mean", lo, last))]
            evals = _evals([seed_dir])
            if evals:
                iteration = max(evals)
                rows = evals[iteration][seed_dir.name]
                ids = sorted(rows)
                cells += [str(iteration)] + [f"{_per_problem([rows], ids, m).mean():.3f}" for m in METRICS]
            else:
                cells += ["—"] * 4
            lines.append(f"| {name} | {seed_dir.name.removeprefix('seed_')} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study_dir", type=Path)
    ap.add_argument("--window", type=int, default=25, help="iterations per window of the over-training tables")
    ap.add_argument("--finished", action="store_true", help="only the seeds the study marked done")
    ap.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: all)")
    ap.add_argument("--reference", default="grpo_strict",
                    help="the rule the held-out differences are taken against (default grpo_strict)")
    args = ap.parse_args()
    # A seed counts once it has trained an iteration (a run just started has only its iteration-0 eval).
    trained_dirs, runs = {}, {}
    for run in sorted(d for d in args.study_dir.iterdir() if d.is_dir()):
        trained = [(d, s) for d, s in ((d, read_scalars(d)) for d in _seeds(run, args.finished, args.seeds))
                   if "rollout/reward_mean" in s]
        if trained:
            trained_dirs[run.name], runs[run.name] = [d for d, _ in trained], [s for _, s in trained]
    if not runs:
        raise SystemExit(f"{args.study_dir}: no run has trained yet")
    out = diagnosis(runs) + [""]
    out += over_training(runs, args.window, [("entropy_flow/P", "P", 3), ("entropy_flow/N", "N", 3)],
                         "P and N over training") + [""]
    out += prediction(runs) + [""]
    out += over_training(runs, args.window, [("policy/entropy", "entropy", 3), ("rollout/reward_mean", "reward", 3),
                                             ("rollout/response_length_mean", "answer tokens", 1)],
                         "Entropy, reward and answer length over training") + [""]
    out += heldout(trained_dirs)
    if args.reference in trained_dirs:
        out += [""] + against(trained_dirs, args.reference)
    out += [""] + seed_by_seed(runs, trained_dirs, args.window)
    print("\n".join(out))


if __name__ == "__main__":
    main()
