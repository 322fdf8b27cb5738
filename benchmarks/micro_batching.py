"""Padding overhead of the learner's micro-batching on a length-skewed batch.

Response lengths are drawn like real math answers (most short, a tail up to the 3,000-token
limit the paper samples with): lognormal around ~300 tokens, 5% of responses cut at the limit.
Prompts are 60-200 tokens. For each micro-batching scheme this prints

    tokens the learner computes (rows x longest row, per micro-batch, summed)
    / real response tokens, and / real (prompt + response) tokens

for the whole batch padded to its longest row (the first wave's behaviour), fixed-size
micro-batches in sampling order, and ``max_tokens_per_micro_batch`` (rows sorted by length and
packed under a token budget; ``pack_by_tokens`` in the learner).

    python benchmarks/micro_batching.py [--batch 512] [--budget 16384] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from opefo_rllib.algorithms.grpo.grpo_torch_learner import pack_by_tokens


def skewed_lengths(n: int, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    response = torch.exp(torch.randn(n, generator=g) * 0.8 + 5.6).round().clamp(8, limit)
    truncated = torch.rand(n, generator=g) < 0.05
    response[truncated] = limit
    prompt = torch.randint(60, 200, (n,), generator=g).float()
    return prompt.long(), response.long()


def computed_tokens(micro_batches, lengths: torch.Tensor) -> int:
    return sum(len(mb) * int(lengths[mb].max()) for mb in micro_batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512, help="responses per batch (e.g. 64 prompts x 8)")
    ap.add_argument("--limit", type=int, default=3000, help="max new tokens")
    ap.add_argument("--budget", type=int, default=16384, help="max_tokens_per_micro_batch")
    ap.add_argument("--micro", type=int, default=8, help="micro_batch_size of the fixed-size scheme")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prompt, response = skewed_lengths(args.batch, args.limit, args.seed)
    lengths = prompt + response
    rows = torch.arange(args.batch)
    real_response, real_all = int(response.sum()), int(lengths.sum())
    schemes = {
        "whole batch, padded to the longest": [rows],
        f"micro_batch_size={args.micro}, sampling order": list(rows.split(args.micro)),
        f"max_tokens_per_micro_batch={args.budget}": list(pack_by_tokens(rows, lengths, args.budget)),
        f"max_tokens_per_micro_batch={args.budget}, micro_batch_size={args.micro}":
            list(pack_by_tokens(rows, lengths, args.budget, args.micro)),
    }
    print(f"batch {args.batch}: response tokens mean {response.float().mean():.0f}, median "
          f"{response.float().median():.0f}, max {int(response.max())}, {(response == args.limit).float().mean():.1%} "
          f"at the limit; prompt mean {prompt.float().mean():.0f}")
    print(f"{'scheme':58s} {'micro-batches':>13s} {'computed/response':>18s} {'computed/real':>14s}")
    for name, mbs in schemes.items():
        computed = computed_tokens(mbs, lengths)
        print(f"{name:58s} {len(mbs):13d} {computed / real_response:18.2f} {computed / real_all:14.3f}")


if __name__ == "__main__":
    main()
