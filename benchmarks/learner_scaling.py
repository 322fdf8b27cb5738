"""1 learner vs 2 data-parallel learners (DeepSpeed over RLlib's learner group) on CPU.

    python benchmarks/learner_scaling.py [--layers 8 --hidden 512] [--rows 64] [--repeats 3]

A Qwen2 model large enough that the learner dominates (default ~25M parameters, random init,
the tiny model's character vocabulary) and a synthetic rollout batch (random tokens, answers of
uneven length, +-1 advantages) stand in for a real iteration's learner work: one full
``update_from_rollouts`` (flow pass, forward/backward, optimizer step, realized-change pass).
Prints, per layout and ZeRO stage: median learn time per update and training tokens/s; then the
optimizer state each learner holds against the cost model's 12 bytes x params / N.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_model(directory: Path, layers: int, hidden: int) -> int:
    """A random-init Qwen2 with the tiny model's vocabulary in ``directory``; its parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opefo_rllib.models.tiny import TINY_DEFAULT_PATH

    base = json.loads((Path(TINY_DEFAULT_PATH) / "config.json").read_text())
    cfg = Qwen2Config(vocab_size=base["vocab_size"], hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(directory)
    for name in ("opefo_char_tokenizer.json", "generation_config.json"):
        shutil.copy(Path(TINY_DEFAULT_PATH) / name, directory / name)
    return sum(p.numel() for p in model.parameters())


def make_batch(rows: int, prompt_len: int, max_response: int, seed: int = 0) -> dict:
    """A collated batch of the learner's layout: random tokens, uneven answer lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max_response // 4, max_response + 1, (rows,), generator=g)
    width = prompt_len + max_response
    ids = torch.randint(3, 100, (rows, width), generator=g)
    attn = torch.zeros(rows, width, dtype=torch.long)
    resp = torch.zeros(rows, width - 1)
    for i, n in enumerate(lengths.tolist()):
        attn[i, :prompt_len + n] = 1
        resp[i, prompt_len - 1:prompt_len - 1 + n] = 1.0
    ids = ids * attn
    group = torch.arange(rows) // 8
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp, "sampling_logp": torch.zeros(rows, width - 1),
            "advantages": torch.where(torch.arange(rows) % 2 == 0, 1.0, -1.0), "rewards": torch.zeros(rows),
            "group_ids": group, "weight_versions": torch.zeros(rows, dtype=torch.long)}


def _config(model_dir: Path, stage: int, learners: int, threads: int):
    from opefo_rllib.algorithms.opefo import OPEFOConfig

    c = OPEFOConfig()
    for k, v in {"model_path": str(model_dir), "zero_stage": stage, "num_learners": learners, "learner_num_threads": threads,
                 "num_cpus_per_learner": 1, "strict_on_policy": False, "max_tokens_per_micro_batch": 4096,
                 "learner_timeout_s": 600.0, "seed": 0}.items():
        setattr(c, k, v)
    return c


def _spaces():
    from ray.rllib.core import DEFAULT_MODULE_ID

    from opefo_rllib.envs import ArithmeticEnv

    env = ArithmeticEnv()
    return {DEFAULT_MODULE_ID: (env.observation_space, env.action_space)}


def _optimizer_numel(learner) -> int:
    """fp32 elements of the optimizer state this learner holds: master weights + Adam m and v."""
    opt = learner.ds_optimizer
    inner = getattr(opt, "optimizer", opt)
    states = sum(t.numel() for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    masters = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat", None)
    master = sum(t.numel() for t in masters) if masters else 0
    return states + master


def timed_updates(run_update, repeats: int) -> list[float]:
    run_update(0)  # warm-up (allocations, DeepSpeed's first step)
    out = []
    for i in range(repeats):
        t0 = time.perf_counter()
        run_update(i + 1)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-response", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stages", default="1,3")
    args = ap.parse_args()

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="opefo_scaling_"))
    params = make_model(tmp, args.layers, args.hidden)
    batch = make_batch(args.rows, args.prompt_len, args.max_response)
    tokens = int(batch["attention_mask"].sum())
    print(f"model: Qwen2 {args.layers} layers x {args.hidden}, {params / 1e6:.1f}M parameters; batch: {args.rows} rows, "
          f"{tokens} tokens ({int(batch['response_mask'].sum())} response tokens); {torch.get_num_threads()} CPU threads here")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for stage in [int(s) for s in args.stages.split(",")]:
            for label, learners, threads in (("1 learner, 1 thread", 0, 1), ("1 learner, 2 threads", 0, 2),
                                             ("2 learners x 1 thread", 2, 1)):
                config = _config(tmp, stage, learners, threads)
                if learners == 0:
                    learner = config.build_learner(spaces=_spaces())
                    times = timed_updates(lambda i: learner.update_from_rollouts(batch, i), args.repeats)
                    held = [_optimizer_numel(learner)]
                    del learner
                else:
                    group = config.build_learner_group(env=None, spaces=_spaces())
                    try:
                        times = timed_updates(lambda i: [r.get() for r in group.foreach_learner(
                            lambda lr, s=i: lr.update_from_rollouts(batch, s))], args.repeats)
                        held = [r.get() for r in group.foreach_learner(_optimizer_numel)]
                    finally:
                        group.shutdown()
                med = statistics.median(times)
                rows.append((stage, label, med, tokens / med, held))
                print(f"  ZeRO {stage}  {label:24s} learn {med:6.2f} s/update  {tokens / med:7.0f} tokens/s   "
                      f"optimizer state per learner {[f'{4 * h / 1e6:.0f} MB' for h in held]} "
                      f"(cost model: {12 * params / max(learners, 1) / 1e6:.0f} MB)", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    for stage in sorted({r[0] for r in rows}):
        base = next(r[2] for r in rows if r[0] == stage and r[1].startswith("1 learner, 1"))
        two = next(r[2] for r in rows if r[0] == stage and r[1].startswith("2 learners"))
        print(f"ZeRO {stage}: 2 learners take {two / base:.2f}x the time of 1 learner with 1 thread "
              f"(speed-up {base / two:.2f}x)")


if __name__ == "__main__":
    main()
