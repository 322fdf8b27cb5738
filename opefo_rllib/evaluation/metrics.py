"""Evaluation metrics, pure numpy: pass@k, avg@K with a bootstrap interval, maj@K, and the
summary of one problem set.

Notation: P problems, K samples each; ``correct`` is a [P, K] 0/1 matrix and c_i = sum_j correct[i, j].

    avg@K   = (1/P) sum_i c_i / K                                   mean accuracy of one sample
    pass@k  = (1/P) sum_i [1 - C(K - c_i, k) / C(K, k)]             unbiased, k <= K (Chen et al. 2021)
    maj@K   = (1/P) sum_i correct(majority answer of problem i)     majority vote over extracted answers

No Ray, no engines: these functions see arrays and strings only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["pass_at_k", "avg_at_k", "bootstrap_ci", "majority_answer", "maj_at_k", "summarize"]


def pass_at_k(num_samples: np.ndarray | int, num_correct: np.ndarray | int, k: int) -> np.ndarray:
    """Unbiased pass@k of each problem: 1 - C(n - c, k) / C(n, k).

    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which never forms the (huge) binomials;
    it is 1 when n - c < k (every k-subset holds a correct sample). Shapes broadcast; k <= n.
    """
    n = np.asarray(num_samples, dtype=np.int64)
    c = np.asarray(num_correct, dtype=np.int64)
    n, c = np.broadcast_arrays(n, c)
    if k < 1 or np.any(k > n):
        raise ValueError(f"pass@k needs 1 <= k <= samples; got k={k} with samples {int(n.min())}")
    out = np.ones(n.shape, dtype=np.float64)
    for idx in np.ndindex(n.shape):
        ni, ci = int(n[idx]), int(c[idx])
        if ni - ci >= k:
            out[idx] = 1.0 - float(np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1)))
    return out


def avg_at_k(correct: np.ndarray) -> np.ndarray:
    """Per-problem accuracy c_i / K of a [P, K] 0/1 matrix (avg@K is its mean)."""
    correct = np.asarray(correct, dtype=np.float64)
    return correct.mean(axis=1)


def bootstrap_ci(per_problem: np.ndarray, level: float = 0.95, num_resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``per_problem`` (problems resampled with
    replacement ``num_resamples`` times; fixed seed, so a report is reproducible)."""
    x = np.asarray(per_problem, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    Answers are compared after stripping whitespace; samples without an answer do not vote. A
    tie goes to the answer that appears first (lowest sample index), so the result does not
    depend on dict or set order.
    """
    votes: dict[str, list[int]] = {}
    for j, a in enumerate(answers):
        if a is not None and a.strip():
            votes.setdefault("".join(a.split()), []).append(j)
    if not votes:
        return None
    # max over (count, -first index): most votes, then earliest first appearance
    best = max(votes.values(), key=lambda idx: (len(idx), -idx[0]))
    return best[0]


def maj_at_k(answers: Sequence[Sequence[str | None]], correct: np.ndarray) -> np.ndarray:
    """Per-problem 0/1: is the majority answer correct (0 when no sample has an answer)."""
    correct = np.asarray(correct)
    out = np.zeros(len(answers), dtype=np.float64)
    for i, row in enumerate(answers):
        j = majority_answer(row)
        out[i] = 0.0 if j is None else float(correct[i, j])
    return out


def summarize(correct: np.ndarray, answers: Sequence[Sequence[str | None]], lengths: np.ndarray,
              finished: np.ndarray, format_ok: np.ndarray, pass_k: Sequence[int],
              greedy_correct: np.ndarray | None = None) -> dict[str, float | list[float]]:
    """The metrics of one problem set.

    Args:
        correct, lengths, finished, format_ok: [P, K] per sample (K may be 0 with greedy only).
        answers: [P][K] extracted answers (None: nothing extracted).
        pass_k: the k of each pass@k (each <= K).
        greedy_correct: [P] 0/1 of the greedy response, or None.

    Lengths, truncation and format are over the sampled responses, or the greedy ones when K = 0.
    """
    correct = np.asarray(correct, dtype=np.float64)
    num_problems, k_samples = correct.shape
    out: dict[str, float | list[float]] = {"num_problems": num_problems, "samples": k_samples}
    if greedy_correct is not None:
        out["greedy_acc"] = float(np.mean(greedy_correct)) if num_problems else float("nan")
    if k_samples:
        per_problem = avg_at_k(correct)
        out[f"avg@{k_samples}"] = float(per_problem.mean())
        out[f"avg@{k_samples}_ci95"] = list(bootstrap_ci(per_problem))
        c = correct.sum(axis=1).astype(np.int64)
        for k in pass_k:
            out[f"pass@{k}"] = float(pass_at_k(k_samples, c, k).mean())
        out[f"maj@{k_samples}"] = float(maj_at_k(answers, correct).mean())
    lengths, finished, format_ok = (np.asarray(a, dtype=np.float64) for a in (lengths, finished, format_ok))
    out["response_length_mean"] = float(lengths.mean()) if lengths.size else float("nan")
    out["truncated_frac"] = float(1.0 - finished.mean()) if finished.size else float("nan")
    out["format_ok_frac"] = float(format_ok.mean()) if format_ok.size else float("nan")
    return out
