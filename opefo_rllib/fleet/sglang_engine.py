"""SGLangEngine: the Engine protocol over SGLang's offline ``sglang.Engine`` (GPU only).

NOT RUN on the project's machines: SGLang's runtime needs CUDA (sglang-kernel). What is tested
here is our side of its API: every call this module makes to ``sglang.Engine`` is listed in
``SGLANG_CALLS``, a test checks that table against the installed package's real method names
and parameters (by reading its source), and another checks that the code below makes no call
outside the table. An upstream API change therefore fails CI.

Weights: ``update_weights_from_tensor`` (colocated, CUDA tensors) or, for disaggregated
engines, ``init_weights_update_group`` + ``update_weights_from_distributed`` (NCCL broadcast
from the learner); the KV/prefix cache is flushed with every update. ``release_memory`` /
``resume_memory`` free the GPU while a colocated learner trains.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from opefo_rllib.fleet.engine import GenerationResult, SamplingConfig

__all__ = ["SGLangEngine", "SGLANG_CALLS"]

# method of sglang.Engine -> keyword arguments this module passes to it.
SGLANG_CALLS: dict[str, tuple[str, ...]] = {
    "generate": ("input_ids", "sampling_params", "return_logprob"),
    "update_weights_from_tensor": ("named_tensors", "flush_cache"),
    "init_weights_update_group": ("master_address", "master_port", "rank_offset", "world_size", "group_name",
                                  "backend"),
    "update_weights_from_distributed": ("names", "dtypes", "shapes", "group_name", "flush_cache"),
    "flush_cache": (),
    "release_memory_occupation": (),
    "resume_memory_occupation": (),
    "shutdown": (),
}


class SGLangEngine:
    """Generate with SGLang from token ids (``skip_tokenizer_init``: the driver tokenizes)."""

    def __init__(self, model_path: str, eos_token_id: int, pad_token_id: int = 0, dtype: str = "bfloat16",
                 seed: int = 0, **engine_kwargs: Any):
        import sglang

        from opefo_rllib.models.tiny import resolve_model_path

        self.eos, self.pad = int(eos_token_id), int(pad_token_id)
        self.engine = sglang.Engine(model_path=str(resolve_model_path(model_path)), skip_tokenizer_init=True,
                                    dtype=dtype, random_seed=seed, **engine_kwargs)
        self._version = 0

    def weight_version(self) -> int:
        return self._version

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig,
                 seed: int | None = None) -> list[list[GenerationResult]]:
        if not sampling.is_full_distribution:
            raise ValueError("strict on-policy: SGLangEngine samples the full distribution (top_p=1, top_k=0)")
        rows = [list(p) for p in prompts for _ in range(n)]
        params = {"temperature": sampling.temperature, "max_new_tokens": sampling.max_new_tokens, "top_p": 1.0,
                  "top_k": -1, "stop_token_ids": [self.eos]}
        outputs = self.engine.generate(input_ids=rows, sampling_params=params, return_logprob=True)
        results: list[list[GenerationResult]] = [[] for _ in prompts]
        for row, out in enumerate(outputs):
            k, s = divmod(row, n)
            logprobs = out["meta_info"]["output_token_logprobs"]  # [(logprob, token_id, text), ...]
            ids = [int(t) for _, t, _ in logprobs]
            results[k].append(GenerationResult(
                prompt_index=k, sample_index=s, response_ids=ids, sampling_logp=[float(lp) for lp, _, _ in logprobs],
                weight_version=self._version, finished=bool(ids) and ids[-1] == self.eos))
        return results

    def load_weights(self, weights: Mapping[str, Any], version: int) -> None:
        """Colocated update from tensors (the cache is flushed with it)."""
        self.engine.update_weights_from_tensor(named_tensors=list(weights.items()), flush_cache=True)
        self._version = int(version)

    def init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          group_name: str = "opefo_weights", backend: str = "nccl") -> None:
        """Join the learner's broadcast group (disaggregated engines)."""
        self.engine.init_weights_update_group(master_address=master_address, master_port=master_port,
                                              rank_offset=rank_offset, world_size=world_size,
                                              group_name=group_name, backend=backend)

    def load_weights_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]], version: int,
                                 group_name: str = "opefo_weights") -> None:
        """Receive a broadcast of the named tensors from the learner (NCCL)."""
        self.engine.update_weights_from_distributed(names=names, dtypes=dtypes, shapes=shapes,
                                                    group_name=group_name, flush_cache=True)
        self._version = int(version)

    def flush_cache(self) -> None:
        self.engine.flush_cache()

    def release_memory(self) -> None:
        self.engine.release_memory_occupation()

    def resume_memory(self) -> None:
        self.engine.resume_memory_occupation()

    def shutdown(self) -> None:
        self.engine.shutdown()
