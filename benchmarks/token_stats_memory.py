"""Peak memory and time of naive logits vs the chunked ``token_stats_from_hidden``.

Forward and backward of sum(logp + entropy + expected_s) for a Qwen2.5-sized head
(V = 151,936, hidden 896) on 4,096 tokens by default. Each variant runs in its own
subprocess so its peak resident memory (ru_maxrss) is its own; the figure printed is the
peak minus the resident memory just before the measured step (inputs already allocated).

    python benchmarks/token_stats_memory.py [--tokens 4096] [--vocab 151936] [--hidden 896]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(args) -> None:
    import torch

    from opefo_rllib.core import token_stats, token_stats_from_hidden

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(1, args.tokens, args.hidden, generator=g)).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).requires_grad_()
    tokens = torch.randint(args.vocab, (1, args.tokens), generator=g)

    def step():
        if args.variant == "naive":
            s = token_stats(hidden @ weight.t(), tokens, args.temperature)
        else:
            s = token_stats_from_hidden(hidden, weight, tokens, args.temperature, chunk_size=args.chunk_size)
        (s.logp + s.entropy + s.expected_s).sum().backward()

    times = []
    base = _rss_mib()
    for _ in range(args.repeat):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"variant": args.variant, "time_s": min(times), "peak_extra_mib": peak - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        _child(args)
        return
    print(f"token_stats forward+backward: {args.tokens} tokens, V={args.vocab}, D={args.hidden}, "
          f"fp32, chunk_size={args.chunk_size}, {args.threads} threads, best of {args.repeat}")
    results = {}
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "variant"
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
        r = results[variant]
        print(f"  {variant:8s} time {r['time_s']:8.2f} s   peak extra memory {r['peak_extra_mib']:9.0f} MiB")
    n, c = results["naive"], results["chunked"]
    print(f"  chunked / naive: memory {c['peak_extra_mib'] / n['peak_extra_mib']:.3f}x, "
          f"time {c['time_s'] / n['time_s']:.2f}x  (goal: <= 0.25x memory at <= 1.5x time)")


if __name__ == "__main__":
    main()
