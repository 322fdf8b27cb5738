"""Verified answers per second: math-verify called directly vs MathVerifier's worker pool.

Answers are distinct (no parse cache can hit; every pool starts fresh worker processes): random fractions, decimals and LaTeX forms,
half of them correct. The pool is started and warmed before timing (its start-up is a
one-time cost per run). Goal: the pool with W workers reaches at least 80% of W x the
direct single-process rate.

    python benchmarks/verifier_throughput.py [--answers 600]
"""

from __future__ import annotations

import argparse
import random
import time

from opefo_rllib.envs import MathVerifier
from opefo_rllib.envs.extract import DEFAULT_ORDER
from opefo_rllib.envs.verifier import _verify_job


def make_cases(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    cases, seen = [], set()
    while len(cases) < n:
        a, b = rng.randint(1, 10**6), rng.randint(2, 10**4)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        ref = f"\\frac{{{a}}}{{{b}}}"
        kind = len(cases) % 4
        if kind == 0:
            resp = f"Simplifying, we get \\boxed{{\\frac{{{2 * a}}}{{{2 * b}}}}}."
        elif kind == 1:
            resp = f"The answer is \\boxed{{{a}/{b}+1}}."  # wrong
        elif kind == 2:
            resp = f"#### {a / b:.10f}"
        else:
            resp = f"so x = \\boxed{{\\dfrac{{{a}}}{{{b + 1}}}}}"  # wrong
        cases.append((resp, ref))
    return cases


def direct_rate(cases) -> float:
    start = time.perf_counter()
    for resp, ref in cases:
        _verify_job(resp, ref, DEFAULT_ORDER, 20_000, 3, 6)
    return len(cases) / (time.perf_counter() - start)


def pool_rate(cases, workers: int) -> tuple[float, dict]:
    v = MathVerifier(num_workers=workers)
    try:
        v.verify_batch(["\\boxed{1}"] * (4 * workers), ["1"] * (4 * workers))  # start + warm the workers
        start = time.perf_counter()
        results = v.verify_batch([r for r, _ in cases], [a for _, a in cases])
        rate = len(cases) / (time.perf_counter() - start)
        return rate, {**v.stats(), "correct": sum(r.correct for r in results)}
    finally:
        v.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per variant (the machine is noisy)")
    args = ap.parse_args()
    _verify_job("\\boxed{1}", "1", DEFAULT_ORDER, 20_000, 3, 6)  # import + warm math-verify here too
    cases = make_cases(args.answers, args.seed)
    direct = max(direct_rate(make_cases(args.answers, args.seed + 1000 * r)) for r in range(args.repeat))
    print(f"{args.answers} distinct answers, best of {args.repeat}")
    print(f"math-verify directly, 1 process : {direct:7.1f} answers/s")
    for workers in (1, 2):
        runs = [pool_rate(cases, workers) for _ in range(args.repeat)]  # fresh workers: nothing cached
        rate, stats = max(runs, key=lambda r: r[0])
        goal = 0.8 * workers * direct
        print(f"MathVerifier pool, {workers} worker(s): {rate:7.1f} answers/s  "
              f"= {rate / (workers * direct):.2f} x ({workers} x direct)  goal >= {goal:.1f}  "
              f"[correct {stats['correct']}/{args.answers}, timeouts {stats['timeouts']}]")


if __name__ == "__main__":
    main()
