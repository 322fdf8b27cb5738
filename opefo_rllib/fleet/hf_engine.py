"""HFEngine: a Hugging Face transformers model with a KV cache, sampling from the full
distribution at the configured temperature. The CPU engine and the deterministic test engine.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from opefo_rllib.fleet.engine import GenerationResult, NoNativeTransfer, SamplingConfig

__all__ = ["HFEngine"]


class HFEngine(NoNativeTransfer):
    """Generate with a local Hugging Face causal LM (weights through ``load_weights`` only).

    Args:
        model_path: local model directory ("tiny-default" for the shipped tiny model).
        eos_token_id, pad_token_id: ids that end / pad a response.
        dtype: parameter dtype ("float32" for exact agreement with a float32 learner).
        num_threads: torch threads in this process (1 avoids oversubscribing small machines).
    """

    def __init__(self, model_path: str, eos_token_id: int, pad_token_id: int = 0, dtype: str = "float32",
                 num_threads: int | None = 1):
        if num_threads:
            torch.set_num_threads(num_threads)
        from opefo_rllib.models.loading import load_policy

        self.model, _ = load_policy(model_path, dtype=getattr(torch, dtype))
        self.model.eval()
        self.eos, self.pad = int(eos_token_id), int(pad_token_id)
        self._version = 0

    def weight_version(self) -> int:
        return self._version

    def release_memory(self) -> None:
        """Colocation: move the weights off the accelerator while the learner trains."""
        self._device = next(self.model.parameters()).device
        self.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        self.model.to(getattr(self, "_device", "cpu"))

    def shutdown(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load_weights(self, weights: Mapping[str, Any], version: int) -> None:
        from opefo_rllib.models.loading import load_policy_weights

        load_policy_weights(self.model, {k: torch.as_tensor(v) for k, v in weights.items()}, "HFEngine.load_weights")
        self._version = int(version)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig,
                 seed: int | None = None) -> list[list[GenerationResult]]:
        if not sampling.is_full_distribution:
            raise ValueError("HFEngine samples from the full distribution only (top_p=1, top_k=0): "
                             "the learner scores the full distribution")
        gen = torch.Generator().manual_seed(sampling.seed if seed is None else seed)
        rows = [list(p) for p in prompts for _ in range(n)]
        width = max(map(len, rows))
        # Left-pad so every row's next token is at the last position.
        ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows])
        attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(rows), dtype=torch.bool)
        out_ids = torch.full((len(rows), sampling.max_new_tokens), self.pad)
        out_logp = torch.zeros(len(rows), sampling.max_new_tokens)
        lengths = torch.full((len(rows),), sampling.max_new_tokens)
        past, step_ids, step_pos = None, ids, pos
        for t in range(sampling.max_new_tokens):
            out = self.model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos,
                             past_key_values=past, use_cache=True)
            past = out.past_key_values
            logp = torch.log_softmax(out.logits[:, -1].float() / sampling.temperature, -1)
            nxt = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            out_ids[:, t] = nxt
            out_logp[:, t] = torch.where(done, torch.zeros(()), logp.gather(-1, nxt[:, None]).squeeze(-1))
            newly = ~done & (nxt == self.eos)
            lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
            done |= newly
            if done.all():
                break
            attn = torch.cat([attn, torch.ones(len(rows), 1, dtype=attn.dtype)], 1)  # finished rows are ignored
            step_pos = step_pos[:, -1:] + 1
            step_ids = nxt[:, None]
        results: list[list[GenerationResult]] = [[] for _ in prompts]
        for row in range(len(rows)):
            k, s = divmod(row, n)
            length = int(lengths[row])
            results[k].append(GenerationResult(
                prompt_index=k, sample_index=s, response_ids=out_ids[row, :length].tolist(),
                sampling_logp=out_logp[row, :length].tolist(), weight_version=self._version,
                finished=bool(done[row]) and int(out_ids[row, length - 1]) == self.eos))
        return results
