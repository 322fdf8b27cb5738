"""HFEngine: a Hugging Face transformers model with a KV cache, sampling from the full
distribution at the configured temperature. The CPU engine and the deterministic test engine.

Each prompt is prefilled once and its cache copied to its n samples (on the default workload:
generation 0.083 -> 0.033 s per batch of 32 x 8, the same samples for the same seed).

Beyond the Engine protocol, ``response_entropy`` scores finished answers: the policy entropy of
every response token under the engine's current weights (the async pipeline measures a step's
realized entropy change this way, on an engine that would otherwise wait for the learner).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch

from opefo_rllib.fleet.engine import GenerationResult, NoNativeTransfer, SamplingConfig, as_token_ids

__all__ = ["HFEngine"]


class HFEngine(NoNativeTransfer):
    """Generate with a local Hugging Face causal LM (weights through ``load_weights`` only).

    Args:
        model_path: local model directory ("tiny-default" for the shipped tiny model).
        eos_token_id: the model's EOS id, or all of them (each ends a response, as do the
            ``stop_token_ids`` of each call's SamplingConfig).
        pad_token_id: fills prompts' left padding and finished rows (masked: any id is safe).
        dtype: parameter dtype ("float32" for exact agreement with a float32 learner).
        num_threads: torch threads in this process (1 avoids oversubscribing small machines).
        device: where the model runs ("cpu", "cuda"); sampling uses a generator on that device.
        token_delay_s: seconds slept before each decoding step: a slow (or, with a large value,
            stalled) engine for the stall-deadline tests; 0 in real runs.
        lora: ``{"rank", "alpha", "target_modules"}``: the engine carries the learner's LoRA adapter
            (peft, injected in place) and ``load_weights`` takes the adapter tensors alone.

    ``generated_tokens`` counts the tokens sampled so far, over the engine's life: the fleet's
    stall deadline reads it (through ``EngineActor.progress``) while a ``generate`` call runs.
    """

    def __init__(self, model_path: str, eos_token_id: int | Sequence[int], pad_token_id: int = 0,
                 dtype: str = "float32", num_threads: int | None = 1, device: str = "cpu",
                 token_delay_s: float = 0.0, lora: dict | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        from opefo_rllib.models.loading import load_model

        self.device = torch.device(device)
        self.model = load_model(model_path, dtype=getattr(torch, dtype)).to(self.device)
        self.lora = bool(lora)
        if lora:  # B = 0: the base model until the first adapter arrives, as on the learner
            from opefo_rllib.models.lora import apply_lora

            apply_lora(self.model, lora["rank"], lora["alpha"], 0.0, lora.get("target_modules"))
        self.model.eval()
        self.eos_ids = as_token_ids(eos_token_id, "HFEngine eos_token_id")
        self.pad = int(pad_token_id)
        self._version = 0
        self._tokens = 0  # sampled tokens over the engine's life (read mid-call from another thread)
        self.token_delay_s = float(token_delay_s)
        self._shared_scoring: bool | None = None  # response_entropy: the shared-prompt forward agrees (checked once)

    def weight_version(self) -> int:
        return self._version

    def generated_tokens(self) -> int:
        """Tokens sampled so far (every row's, finished rows excluded), over the engine's life."""
        return self._tokens

    def release_memory(self) -> None:
        """Colocation: move the weights off the accelerator while the learner trains."""
        self.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        self.model.to(self.device)

    def shutdown(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load_weights(self, weights: Mapping[str, Any], version: int) -> None:
        """The policy's weights (a full state dict), or with ``lora`` its adapter tensors alone."""
        from opefo_rllib.models.loading import load_policy_weights

        if self.lora:
            from opefo_rllib.models.lora import load_adapter_state

            load_adapter_state(self.model, weights, "HFEngine.load_weights")
        else:
            load_policy_weights(self.model, {k: torch.as_tensor(v) for k, v in weights.items()},
                                "HFEngine.load_weights")
        self._version = int(version)

    @torch.no_grad()
    def probe_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """Log-probs of a fixed sequence under the served weights (the weights check's fingerprint)."""
        ids = torch.tensor([list(token_ids)], device=self.device)
        logp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), -1)
        return logp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()

    @torch.no_grad()
    def response_entropy(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                         temperature: float = 1.0) -> tuple[float, int]:
        """The sum of the policy entropy H_t (logits / ``temperature``) over every response token of
        ``sequences`` ((prompt ids, response ids) pairs), and how many tokens that is. Rows that share
        a prompt share its forward once a first call has checked that path against the plain one."""
        from opefo_rllib.models.shared_prompt import response_positions, right_padded, shared_prompt_hidden

        if not sequences:
            return 0.0, 0
        ids, attn, plens = right_padded(sequences, self.pad)
        ids, attn, plens = ids.to(self.device), attn.to(self.device), plens.to(self.device)
        body, head = self.model.base_model, self.model.get_output_embeddings().weight

        def entropy_sum(hidden, valid):
            z = (hidden[valid] @ head.T).float() / temperature
            logp = torch.log_softmax(z, -1)
            return float(-(logp.exp() * logp).sum()), int(valid.sum())

        def plain():
            hidden = body(input_ids=ids[:, :-1], attention_mask=attn[:, :-1]).last_hidden_state
            return entropy_sum(hidden, response_positions(ids, attn, plens))

        def shared():
            hidden, layout = shared_prompt_hidden(body, ids, attn, plens)
            return entropy_sum(hidden, layout.valid)

        if self._shared_scoring is None:
            reference = plain()
            try:
                agrees = abs(shared()[0] - reference[0]) <= 1e-4 * max(1.0, abs(reference[0]))
            except Exception:  # noqa: BLE001 - a model without this cache path scores the plain way
                agrees = False
            self._shared_scoring = agrees
            return reference
        return shared() if self._shared_scoring else plain()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig,
                 seed: int | None = None) -> list[list[GenerationResult]]:
        if not sampling.is_full_distribution:
            raise ValueError("HFEngine samples from the full distribution only (top_p=1, top_k=0): "
                             "the learner scores the full distribution")
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(sampling.seed if seed is None else seed)
        stops = torch.tensor(sampling.stop_ids(self.eos_ids), dtype=torch.long, device=dev)
        width = max(map(len, prompts))
        # Left-pad so every row's next token is at the last position.
        ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in prompts], device=dev)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        # Prefill each prompt once, then give its n rows (prompt k: rows k n ... k n + n - 1) its cache.
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        past, last_logits = out.past_key_values, out.logits[:, -1].repeat_interleave(n, 0)
        past.batch_repeat_interleave(n)
        attn, step_pos = attn.repeat_interleave(n, 0), pos[:, -1:].repeat_interleave(n, 0)
        rows = len(prompts) * n
        done = torch.zeros(rows, dtype=torch.bool, device=dev)
        out_ids = torch.full((rows, sampling.max_new_tokens), self.pad, device=dev)
        out_logp = torch.zeros(rows, sampling.max_new_tokens, device=dev)
        lengths = torch.full((rows,), sampling.max_new_tokens, device=dev)
        zero = torch.zeros((), device=dev)
        for t in range(sampling.max_new_tokens):
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            if sampling.greedy:  # the argmax; log-probs of the untempered distribution
                logp = torch.log_softmax(last_logits.float(), -1)
                nxt = logp.argmax(-1)
            else:
                logp = torch.log_softmax(last_logits.float() / sampling.temperature, -1)
                nxt = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            out_ids[:, t] = nxt
            out_logp[:, t] = torch.where(done, zero, logp.gather(-1, nxt[:, None]).squeeze(-1))
            newly = ~done & torch.isin(nxt, stops)
            self._tokens += rows - int(done.sum())  # this step's tokens, before newly finished rows join
            lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
            done |= newly
            if done.all() or t + 1 == sampling.max_new_tokens:
                break
            attn = torch.cat([attn, torch.ones(rows, 1, dtype=attn.dtype, device=dev)], 1)  # finished rows: ignored
            step_pos = step_pos + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=step_pos,
                             past_key_values=past, use_cache=True)
            past, last_logits = out.past_key_values, out.logits[:, -1]
        results: list[list[GenerationResult]] = [[] for _ in prompts]
        for row in range(rows):
            k, s = divmod(row, n)
            length = int(lengths[row])
            results[k].append(GenerationResult(
                prompt_index=k, sample_index=s, response_ids=out_ids[row, :length].tolist(),
                sampling_logp=out_logp[row, :length].tolist(), weight_version=self._version,
                finished=bool(done[row])))
        return results
