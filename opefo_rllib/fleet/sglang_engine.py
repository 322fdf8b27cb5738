"""SGLangEngine: the Engine protocol over SGLang's offline ``sglang.Engine`` (GPU only).

NOT RUN on the project's machines: SGLang's runtime needs CUDA (sglang-kernel). What is tested
here is our side of its API: every call this module makes to ``sglang.Engine`` is listed in
``SGLANG_CALLS``, a test checks that table against the installed package's real method names
and parameters (by reading its source), and another checks that the code below makes no call
outside the table. An upstream API change therefore fails CI.

Weights: ``load_weights`` only (the fleet's object-store path): the state dict goes to
``update_weights_from_tensor``, which flushes the KV/prefix cache with it. With ``lora`` the
engine starts with ``enable_lora`` and ``load_weights`` takes the adapter tensors alone: they go
in memory to ``load_lora_adapter_from_tensors`` under a new name per weight version, every
generate names it (``lora_path``), and the previous version's is unloaded. SGLang engines have no
native transfer here (``weight_transfer_backend`` is None, :class:`NoNativeTransfer`).
``release_memory`` / ``resume_memory`` free the GPU while a colocated learner trains.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from opefo_rllib.fleet.engine import GenerationResult, NoNativeTransfer, SamplingConfig, as_token_ids

__all__ = ["SGLangEngine", "SGLANG_CALLS", "sglang_sampling_params"]

# method of sglang.Engine -> keyword arguments this module passes to it.
SGLANG_CALLS: dict[str, tuple[str, ...]] = {
    "generate": ("input_ids", "sampling_params", "return_logprob", "logprob_start_len", "lora_path"),
    "update_weights_from_tensor": ("named_tensors", "flush_cache"),
    "load_lora_adapter_from_tensors": ("lora_name", "tensors", "config_dict"),
    "unload_lora_adapter": ("lora_name",),
    "release_memory_occupation": (),
    "resume_memory_occupation": (),
    "shutdown": (),
}


def sglang_sampling_params(sampling: SamplingConfig, stop_token_ids: Sequence[int]) -> dict[str, Any]:
    """The ``sampling_params`` of ``sglang.Engine.generate`` (keys are fields of SGLang's
    ``SamplingParams``; a test checks them against the installed package): the full distribution
    at ``sampling.temperature``, ending at any of ``stop_token_ids``."""
    return {"temperature": sampling.temperature, "max_new_tokens": sampling.max_new_tokens, "top_p": 1.0,
            "top_k": -1, "stop_token_ids": list(stop_token_ids)}


class SGLangEngine(NoNativeTransfer):
    """Generate with SGLang from token ids (``skip_tokenizer_init``: the driver tokenizes).

    ``eos_token_id``: the model's EOS id, or all of them; each ends a response, as do the
    ``stop_token_ids`` of each call's SamplingConfig (SGLang keeps the stop token in the output).
    """

    _tokens = 0  # tokens of the calls that returned (SGLang's offline generate is one blocking call)
    adapter: str | None = None  # with lora: the adapter name of the version served (None: the base model)

    def __init__(self, model_path: str, eos_token_id: int | Sequence[int], pad_token_id: int = 0,
                 dtype: str = "bfloat16", seed: int = 0, lora: dict | None = None, **engine_kwargs: Any):
        import sglang

        from opefo_rllib.models.loading import resolve_model_path

        self.eos_ids = as_token_ids(eos_token_id, "SGLangEngine eos_token_id")
        self.pad = int(pad_token_id)
        path = str(resolve_model_path(model_path))
        self.lora_config = None  # with lora: the adapter config SGLang reads (peft's keys)
        if lora:
            from opefo_rllib.models.lora import adapter_config

            self.lora_config = adapter_config(lora["rank"], lora["alpha"], lora["target_modules"], path)
        if self.lora_config:
            engine_kwargs.update(enable_lora=True, max_lora_rank=self.lora_config["r"],
                                 lora_target_modules=self.lora_config["target_modules"])
        self.engine = sglang.Engine(model_path=path, skip_tokenizer_init=True, dtype=dtype, random_seed=seed,
                                    **engine_kwargs)
        self._version = 0

    def weight_version(self) -> int:
        return self._version

    def generated_tokens(self) -> int:
        """Tokens of the calls that returned: progress moves per call here, so stall_timeout_s
        bounds one SGLang generate call."""
        return self._tokens

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig,
                 seed: int | None = None) -> list[list[GenerationResult]]:
        if not sampling.is_full_distribution:
            raise ValueError("strict on-policy: SGLangEngine samples the full distribution (top_p=1, top_k=0)")
        rows = [list(p) for p in prompts for _ in range(n)]
        stops = sampling.stop_ids(self.eos_ids)
        params = sglang_sampling_params(sampling, stops)
        outputs = self.engine.generate(input_ids=rows, sampling_params=params, return_logprob=True,
                                       lora_path=[self.adapter] * len(rows) if self.adapter else None)
        results: list[list[GenerationResult]] = [[] for _ in prompts]
        for row, out in enumerate(outputs):
            k, s = divmod(row, n)
            logprobs = out["meta_info"]["output_token_logprobs"]  # [(logprob, token_id, text), ...]
            ids = [int(t) for _, t, _ in logprobs]
            results[k].append(GenerationResult(
                prompt_index=k, sample_index=s, response_ids=ids, sampling_logp=[float(lp) for lp, _, _ in logprobs],
                weight_version=self._version, finished=bool(ids) and ids[-1] in stops))
            self._tokens += len(ids)
        return results

    def probe_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """Log-probs of a fixed sequence under the served weights (SGLang's input-token log-probs;
        the weights check's fingerprint); the adapter too, with lora."""
        (out,) = self.engine.generate(input_ids=[list(token_ids)], sampling_params={"max_new_tokens": 1,
                                                                                   "temperature": 1.0},
                                      return_logprob=True, logprob_start_len=0,
                                      lora_path=[self.adapter] if self.adapter else None)
        logprobs = out["meta_info"]["input_token_logprobs"]  # [(logprob, token_id, text)]; the first has none
        return [float(lp) for lp, _, _ in logprobs[1:]]

    def load_weights(self, weights: Mapping[str, Any], version: int) -> None:
        """Update from a state dict of tensors (the cache is flushed with it); with ``lora`` from
        the adapter tensors alone, loaded in memory as this version's adapter."""
        if self.lora_config is None:
            self.engine.update_weights_from_tensor(named_tensors=list(weights.items()), flush_cache=True)
        else:
            from opefo_rllib.models.lora import peft_format

            name, old = f"opefo-v{int(version)}", self.adapter
            if old == name:  # the same version again: replace it
                self.engine.unload_lora_adapter(lora_name=old)
                old = None
            self.engine.load_lora_adapter_from_tensors(lora_name=name, tensors=dict(peft_format(weights)),
                                                       config_dict=self.lora_config)
            self.adapter = name
            if old is not None:
                self.engine.unload_lora_adapter(lora_name=old)
        self._version = int(version)

    def release_memory(self) -> None:
        self.engine.release_memory_occupation()

    def resume_memory(self) -> None:
        self.engine.resume_memory_occupation()

    def shutdown(self) -> None:
        self.engine.shutdown()
