"""Cost model of the learner side at the paper's scale: GPU memory per learner and weight-sync time.

    python benchmarks/cost_model.py [--learners 1,4,8] [--tokens 16384]

Printed and explained in docs/scaling.md. Arithmetic, not a measurement: the assumptions are
stated beside each formula, and ``--check`` compares the formulas with what this repository
measures on CPU (benchmarks/learner_scaling.py, benchmarks/weight_sync.py).

Memory per learner (N learners, P parameters, bf16 mixed precision; ZeRO paper's accounting):
    parameters       2 P          (stage 3: 2 P / N; offload_params: ~0 resident, one layer gathered)
    gradients        2 P          (stage 2, 3: 2 P / N)
    optimizer       12 P          fp32 master + Adam m, v (stage >= 1: 12 P / N; offload_optimizer: 0)
    activations      L x T x h x 2    gradient-checkpointed layer inputs of one micro-batch of T tokens
                   + 16 x T x h x 2   one layer recomputed (attention + MLP intermediates, rough)
                   + 3 x C x V x 4    the chunked LM head: C tokens x vocabulary, fp32 (logits, softmax, grad)
Weight sync (rank 0 -> engines, bf16): 2 P bytes / bandwidth, plus under ZeRO-3 an all-gather of
the parameters on the learners first (2 P (N - 1) / N bytes per learner / bandwidth).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Model:
    name: str
    params: float  # P
    hidden: int  # h
    layers: int  # L
    vocab: int  # V


MODELS = [  # from the models' Hugging Face configs
    Model("Qwen2.5-Math-1.5B", 1.54e9, 1536, 28, 151936),
    Model("Qwen3-4B-Base", 4.02e9, 2560, 36, 151936),
    Model("Qwen2.5-Math-7B", 7.62e9, 3584, 28, 152064),
]

# Stated bandwidths (bytes/s) for the weight sync; effective, not peak.
LINKS = {"NVLink (H100 node, ~150 GB/s effective broadcast)": 150 * GB,
         "PCIe 4 x16 (~20 GB/s)": 20 * GB,
         "InfiniBand 4 x 200 Gb/s between nodes (~80 GB/s)": 80 * GB,
         "Ethernet 100 Gb/s between nodes (~11 GB/s)": 11 * GB}


def state_bytes(m: Model, n: int, stage: int, offload_optimizer: bool = False, offload_params: bool = False) -> dict:
    """Per-learner bytes of parameters, gradients and optimizer state."""
    p = m.params
    params = 2 * p / n if stage == 3 else 2 * p
    if offload_params:
        params = 2 * p / m.layers  # roughly one layer gathered at a time
    grads = 2 * p / n if stage >= 2 else 2 * p
    optim = 0.0 if offload_optimizer else (12 * p / n if stage >= 1 else 12 * p)
    return {"params": params, "grads": grads, "optimizer": optim}


def activation_bytes(m: Model, tokens: int, chunk: int = 1024) -> float:
    return m.layers * tokens * m.hidden * 2 + 16 * tokens * m.hidden * 2 + 3 * chunk * m.vocab * 4


def sync_seconds(m: Model, bandwidth: float, learners: int = 1, stage: int = 0) -> float:
    gather = 2 * m.params * (learners - 1) / learners / bandwidth if stage == 3 and learners > 1 else 0.0
    return 2 * m.params / bandwidth + gather


def memory_table(learners: list[int], tokens: int) -> list[str]:
    out = [f"Per-learner GPU memory (GB): bf16 params/grads, fp32 master + Adam; activations for {tokens} tokens "
           "per micro-batch with gradient checkpointing, logits chunk 1024", ""]
    layouts = [(0, False, False), (1, False, False), (2, False, False), (3, False, False), (3, True, False),
               (3, True, True)]
    names = {(0, False, False): "ZeRO-0", (1, False, False): "ZeRO-1", (2, False, False): "ZeRO-2",
             (3, False, False): "ZeRO-3", (3, True, False): "ZeRO-3 + offload_optimizer",
             (3, True, True): "ZeRO-3 + offload_optimizer + offload_params"}
    header = "| model | layout | " + " | ".join(f"N = {n}" for n in learners) + " |"
    out += [header, "|" + "---|" * (2 + len(learners))]
    for m in MODELS:
        act = activation_bytes(m, tokens)
        for stage, off_opt, off_par in layouts:
            cells = []
            for n in learners:
                s = state_bytes(m, n, stage, off_opt, off_par)
                cells.append(f"{(sum(s.values()) + act) / GB:.1f}")
            out.append(f"| {m.name} | {names[(stage, off_opt, off_par)]} | " + " | ".join(cells) + " |")
        out.append(f"| {m.name} | (of which activations) | " + " | ".join(f"{act / GB:.1f}" for _ in learners) + " |")
    return out


def sync_table(learners: list[int]) -> list[str]:
    m = MODELS[-1]
    out = ["", f"Weight sync of {m.name} (bf16, {2 * m.params / GB:.1f} GB) from learner rank 0 to the engines:", "",
           "| link | ZeRO 0-2 | " + " | ".join(f"ZeRO-3, N = {n} (gather + send)" for n in learners if n > 1) + " |",
           "|" + "---|" * (2 + len([n for n in learners if n > 1]))]
    for name, bw in LINKS.items():
        cells = [f"{sync_seconds(m, bw, n, 3):.2f} s" for n in learners if n > 1]
        out.append(f"| {name} | {sync_seconds(m, bw):.2f} s | " + " | ".join(cells) + " |")
    return out


def check_against_cpu() -> list[str]:
    """The formulas against this repository's CPU measurements (figures from the benchmarks' runs)."""
    p = 25.2e6  # benchmarks/learner_scaling.py's model
    tiny = Model("bench", p, 512, 8, 100)
    lines = ["", "Check against CPU measurements (fp32 on CPU: the optimizer term is the same 12 bytes/param):"]
    for n, measured in ((1, 303e6), (2, 151e6)):
        model = state_bytes(tiny, n, 1)["optimizer"]
        lines.append(f"  optimizer state per learner, 25.2M params, ZeRO-1, N = {n}: model {model / 1e6:.0f} MB, "
                     f"measured {measured / 1e6:.0f} MB (benchmarks/learner_scaling.py)")
    # benchmarks/weight_sync.py, native gloo path, 442 MiB random Qwen2: 1.18 s and 1.80 s (two runs).
    size = 442 * 2**20
    for measured in (1.182, 1.795):
        lines.append(f"  weight sync, 442 MiB over gloo on loopback: {measured:.2f} s measured -> an effective "
                     f"{size / measured / GB:.2f} GB/s; at that rate the model puts the 3.1 MiB tiny model at "
                     f"{3.1 * 2**20 / (size / measured) * 1e3:.0f} ms (measured 43-66 ms: below ~10 MB, "
                     "fixed costs dominate and the model does not apply)")
    return lines


def pipeline_table(learners: int = 4, engines: int = 4) -> list[str]:
    """Iteration time of the sync, streaming and async pipelines for the 7B recipe (4 learners + 4
    engines on one node), from stated rates; see docs/pipeline.md for what each assumption stands
    on. Streaming assumes groups finish spread over the generation (so the learner's in-flight
    work can hide under it), which the longest-answer bound makes likely."""
    m = MODELS[-1]
    samples, prompt, mean_resp, max_resp = 256, 200, 1500, 3000  # 32 prompts x 8; DAPO-Math answer lengths
    tokens = samples * (prompt + mean_resp)
    peak, mfu = 989e12, 0.35  # H100 bf16 dense peak, a typical learner MFU with gradient checkpointing
    fwd_bwd = 8 * m.params * tokens  # 2 fwd + 4 bwd + 2 recompute (gradient checkpointing) per token
    flow_fwd = 2 * m.params * tokens  # the flow pass (0 when fused: one micro-batch only, not at 7B)
    realized_fwd = 2 * m.params * tokens  # measure_realized_change's re-scoring
    learn = (fwd_bwd + flow_fwd + realized_fwd) / (learners * peak * mfu)
    per_engine_tps, per_seq_tps = 2500.0, 35.0  # vLLM decode, 64 sequences per engine; one sequence's speed
    gen = max(samples * mean_resp / (engines * per_engine_tps), max_resp / per_seq_tps)
    sync = sync_seconds(m, LINKS["NVLink (H100 node, ~150 GB/s effective broadcast)"], learners, 3)
    out = ["", f"Pipelines, {m.name}, {learners} learners + {engines} engines (stated rates: learner MFU {mfu:.0%} "
           f"of {peak / 1e12:.0f} TFLOP/s, vLLM {per_engine_tps:.0f} tokens/s per engine and {per_seq_tps:.0f} tokens/s "
           f"per sequence, {samples} answers of {mean_resp} tokens on average, {max_resp} at most):", "",
           "| pipeline | generate | learn | sync | iteration | engine idle |", "|---|---|---|---|---|---|"]
    rate = learners * peak * mfu
    # streaming as built: the training forward of each finished group (it is the flow pass too) and
    # the last step's re-score run during generation; the backward (+ recompute) after the last group.
    in_flight, after_last = (2 * m.params * tokens + realized_fwd) / rate, 6 * m.params * tokens / rate
    # streaming with stream_backward (two gradient accumulators, g_total and g_side): forward + two
    # backward passes per group in flight (one under GRPO), then only the combine and the step.
    two_acc = (2 * m.params * tokens + 2 * 6 * m.params * tokens + realized_fwd) / rate
    rows = (("sync", learn, gen + learn + sync),
            ("streaming, forward in flight (built for ZeRO 0-2)", in_flight + after_last, max(gen, in_flight) + after_last + sync),
            ("streaming, stream_backward (built for ZeRO 0-2)", two_acc, max(gen, two_acc) + sync),
            ("async (k = 1)", learn, max(gen, learn) + sync))
    for name, work, step in rows:
        out.append(f"| {name} | {gen:.1f} s | {work:.1f} s | {sync:.2f} s | {step:.1f} s | {1 - gen / step:.0%} |")
    out.append(f"async / sync = {(max(gen, learn) + sync) / (gen + learn + sync):.2f}: the overlap pays most when "
               "generation and learning take similar times; the longest answer bounds generation "
               f"({max_resp / per_seq_tps:.0f} s here), so more engines stop helping before more learners do.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--learners", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (max_tokens_per_micro_batch)")
    args = ap.parse_args()
    learners = [int(x) for x in args.learners.split(",")]
    print("\n".join(memory_table(learners, args.tokens) + sync_table(learners) + check_against_cpu()
                    + pipeline_table()))


if __name__ == "__main__":
    main()
