"""One-GPU check of the pieces a real-model run uses, without Ray and without vLLM.

Sized for one H200-class GPU with torch (CUDA) and transformers installed, no downloads, under
10 minutes: a random-weight model shaped like Qwen2.5-1.5B (built here, with a byte-level BPE
tokenizer trained by the `tokenizers` library on generated text), HFEngine generation in bf16,
then OPEFO learner steps in bf16 (flow pass, balancing weights, weighted policy-gradient loss with
the chunked LM head, AdamW; DeepSpeed when it imports). It prints generation tokens/s, learner
tokens/s and MFU, peak GPU memory, and the engine/learner log-prob gap on the sampled tokens.

    python benchmarks/gpu_check.py                      # Qwen2.5-1.5B shape, CUDA
    python benchmarks/gpu_check.py --tiny --device cpu  # a small shape: checks the code path here

A random model's numbers say nothing about learning; they measure speed, memory and agreement.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

QWEN25_1P5B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
               "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 4096,
               "tie_word_embeddings": True}
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 1024, "tie_word_embeddings": True}


def build_model_dir(root: Path, shape: dict, seed: int = 0) -> Path:
    """A random Qwen2 model and a BPE tokenizer (trained on generated arithmetic text) in ``root``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    corpus = [f"What is {a} + {b}? The answer is {a + b}." for a in range(300) for b in range(0, 300, 7)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=min(2000, shape["vocab_size"]),
                                                        special_tokens=["<|endoftext|>", "<|im_end|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(root)
    torch.manual_seed(seed)
    config = Qwen2Config(**shape, bos_token_id=fast.pad_token_id, eos_token_id=[fast.eos_token_id, fast.pad_token_id])
    AutoModelForCausalLM.from_config(config).save_pretrained(root)
    return root


def generate(model_dir: Path, tokenizer, args) -> tuple[list, float, object]:
    from opefo_rllib.fleet.engine import SamplingConfig
    from opefo_rllib.fleet.hf_engine import HFEngine

    engine = HFEngine(str(model_dir), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      dtype=args.dtype, num_threads=None, device=args.device)
    prompts = [tokenizer.encode(f"What is {i} + {2 * i}?") for i in range(args.prompts)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    start = time.perf_counter()
    groups = engine.generate(prompts, args.group_size, sampling, seed=0)
    _sync(args.device)
    seconds = time.perf_counter() - start
    return [(prompts[k], r) for k, g in enumerate(groups) for r in g], seconds, engine


def learner_steps(model_dir: Path, samples: list, args) -> dict:
    from transformers import AutoModelForCausalLM

    from opefo_rllib.core import aggregate_loss, group_advantages, policy_loss
    from opefo_rllib.core import balance_weights, entropy_flow, flow_totals, token_stats_from_hidden

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device)
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rows = [p + r.response_ids for p, r in samples]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros(len(rows), width - 1)
    sampling_logp = torch.zeros(len(rows), width - 1)
    for i, ((p, r), row) in enumerate(zip(samples, rows)):
        ids[i, :len(row)], attn[i, :len(row)] = torch.tensor(row), 1
        mask[i, len(p) - 1:len(row) - 1] = 1
        sampling_logp[i, len(p) - 1:len(row) - 1] = torch.tensor(r.sampling_logp)
    ids, attn, mask, sampling_logp = (t.to(args.device) for t in (ids, attn, mask, sampling_logp))
    rewards = torch.tensor([float(r.response_ids[0] % 2) for _, r in samples])  # a stand-in reward
    adv = group_advantages(rewards, [i // args.group_size for i in range(len(samples))]).to(args.device)

    def stats():
        hidden = model.model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1]).last_hidden_state
        return token_stats_from_hidden(hidden, model.get_output_embeddings().weight, ids[:, 1:], 1.0,
                                       chunk_size=args.chunk)

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times, gap = [], None
    for step in range(args.steps):
        _sync(args.device)
        start = time.perf_counter()
        with torch.no_grad():  # flow pass: the batch's entropy flow and totals before any backward
            s = stats()
            delta = entropy_flow(s.logp.float(), s.entropy.float(), adv, "exact", s.expected_s.float())
            if step == 0:
                gap = float(((s.logp.float() - sampling_logp).abs() * mask).max())
        weights, bstats = balance_weights(delta, mask, "two_sided", totals=flow_totals(delta, mask))
        s = stats()
        loss_mat, _ = policy_loss("pg", s.logp.float(), None, adv, mask, weights=weights)
        loss = aggregate_loss(loss_mat, mask, "token-mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(args.device)
        step_times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    tokens = int(attn.sum())
    step_s = min(step_times[1:] or step_times)
    # FLOPs of one step: flow pass (forward, 2 N T) + training pass with recompute (forward twice,
    # backward once: 2 N T + 2 N T + 4 N T); attention FLOPs left out (short sequences).
    flops = 10 * params * tokens
    return {"params": params, "tokens_per_step": tokens, "step_s": step_s, "learner_tokens_per_s": tokens / step_s,
            "learner_tflops": flops / step_s / 1e12, "mfu": flops / step_s / (args.peak_tflops * 1e12),
            "lambda": bstats["lambda"], "logprob_gap_max": gap,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small shape (checks the code path on CPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1024, help="logits_chunk_size of the LM head")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    args = ap.parse_args()
    shape = TINY if args.tiny else QWEN25_1P5B
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoTokenizer

        model_dir = build_model_dir(Path(tmp), shape)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        samples, gen_s, engine = generate(model_dir, tokenizer, args)
        new_tokens = sum(len(r.response_ids) for _, r in samples)
        del engine
        report = {"device": args.device, "dtype": args.dtype, "shape": "tiny" if args.tiny else "Qwen2.5-1.5B",
                  "gen_sequences": len(samples), "gen_new_tokens": new_tokens, "gen_s": gen_s,
                  "gen_tokens_per_s": new_tokens / gen_s}
        if args.device == "cuda":
            report["gen_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        report.update(learner_steps(model_dir, samples, args))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
