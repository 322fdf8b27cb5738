"""Build the tiny default policy: a Qwen2-architecture LM warm-started on arithmetic.

    python -m opefo_rllib.tools.make_tiny [--out DIR] [--steps 700]

Deterministic (fixed seeds, one torch thread): the same command writes the same weights. The
supervised phase is short on purpose: the model should start with partial accuracy and real
uncertainty, which is where RL (and entropy collapse) has something to do.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from opefo_rllib.envs import ArithmeticEnv
from opefo_rllib.models.tiny import TINY_DEFAULT_PATH, tiny_qwen2_config
from opefo_rllib.models.tokenizer import CharTokenizer


def _batch(env: ArithmeticEnv, tok: CharTokenizer, rng: np.random.Generator, n: int):
    seqs, masks = [], []
    for p in (env.sample_problem(rng) for _ in range(n)):
        prompt, answer = tok.encode(p.prompt), tok.encode(p.answer, add_bos=False) + [tok.eos_token_id]
        seqs.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, attn, loss_mask


@torch.no_grad()
def evaluate(model, tok, env, n=256, samples=8, seed=123):
    """Greedy accuracy, pass@samples and per-sample accuracy at temperature 1, and entropy."""
    rng = np.random.default_rng(seed)
    problems = [env.sample_problem(rng) for _ in range(n)]
    greedy = sampled = passk = 0
    ent_sum = ent_n = 0.0
    gen = torch.Generator().manual_seed(seed)
    for p in problems:
        prompt = torch.tensor([tok.encode(p.prompt)])
        ids = prompt.repeat(samples + 1, 1)
        done = torch.zeros(samples + 1, dtype=torch.bool)
        for _ in range(8):
            logits = model(ids).logits[:, -1].float()
            logp = torch.log_softmax(logits, -1)
            ent = -(logp.exp() * logp).sum(-1)
            ent_sum += float(ent[1:][~done[1:]].sum())
            ent_n += int((~done[1:]).sum())
            nxt = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
            nxt[0] = logits[0].argmax()
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
            done |= nxt == tok.eos_token_id
            ids = torch.cat([ids, nxt[:, None]], 1)
            if done.all():
                break
        outs = [tok.decode(row[prompt.shape[1]:]) for row in ids]
        ok = [env.score(p, o).correct for o in outs]
        greedy += ok[0]
        sampled += sum(ok[1:])
        passk += any(ok[1:])
    return {"greedy_acc": greedy / n, "sample_acc": sampled / (n * samples), f"pass@{samples}": passk / n,
            "entropy": ent_sum / max(ent_n, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(TINY_DEFAULT_PATH))
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    tok = CharTokenizer()
    env = ArithmeticEnv()  # the default task: 1-2 digit +, -, and x by one digit
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_qwen2_config(len(tok)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        ids, attn, loss_mask = _batch(env, tok, rng, args.batch)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none").view_as(loss_mask[:, 1:])
        loss = (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.eval_every and step % args.eval_every == 0:
            model.eval()
            print(step, f"loss {loss.item():.3f}", evaluate(model, tok, env, n=128), f"{time.time() - start:.0f}s",
                  flush=True)
            model.train()
    model.eval()
    metrics = evaluate(model, tok, env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save(out)
    (out / "warmstart.json").write_text(json.dumps({"steps": args.steps, "batch": args.batch, "lr": args.lr,
                                                    "seed": args.seed, "task": "opefo/Arithmetic-v0", **metrics},
                                                   indent=1))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"saved {out} ({n_params / 1e6:.2f}M parameters, {time.time() - start:.0f}s): {metrics}")


if __name__ == "__main__":
    main()
