"""HFCausalLMModule: an RLlib TorchRLModule wrapping a Hugging Face causal LM (learner only).

RLlib's catalogs and connectors know nothing about text, so the module is built with
``learner_only=True`` (EnvRunners never build it: engines generate) and exposes what the
learner needs: per-token log pi, entropy and the exact-flow term of given response tokens,
computed with the memory-efficient chunked head (``token_stats_from_hidden``).
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override

from opefo_rllib.algorithms.opefo.token_stats import TokenStats, token_stats, token_stats_from_hidden

__all__ = ["HFCausalLMModule"]


class HFCausalLMModule(TorchRLModule):
    """model_config keys: ``model_path`` (local dir or "tiny-default"), or ``hf_config`` (a dict of
    a transformers config, e.g. ``{"model_type": "qwen2", ...}``, to build a fresh model),
    ``dtype`` ("float32" | "bfloat16"), ``gradient_checkpointing`` (bool), ``logits_chunk_size``."""

    @override(TorchRLModule)
    def setup(self) -> None:
        from opefo_rllib.models.loading import load_model

        cfg = self.model_config or {}
        dtype = getattr(torch, cfg.get("dtype", "float32"))
        if cfg.get("hf_config"):
            from transformers import AutoConfig, AutoModelForCausalLM

            hf = dict(cfg["hf_config"])
            self.lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf), dtype=dtype)
        else:
            self.lm = load_model(cfg.get("model_path", "tiny-default"), dtype=dtype)
        if cfg.get("gradient_checkpointing"):
            self.lm.gradient_checkpointing_enable()
            self.lm.config.use_cache = False
        self.logits_chunk_size = int(cfg.get("logits_chunk_size", 1024))

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        stats = self.sequence_token_stats(batch["input_ids"], batch["attention_mask"], batch.get("temperature", 1.0))
        return {"logp": stats.logp, "entropy": stats.entropy}

    def sequence_token_stats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                             use_full_logits: bool = False) -> TokenStats:
        """Stats of tokens 1..L-1 of right-padded sequences [N, L] given their prefixes ([N, L-1] each)."""
        inputs, targets = input_ids[:, :-1], input_ids[:, 1:]
        mask = attention_mask[:, :-1]
        if use_full_logits:  # e.g. under ZeRO-3, where the head weight is partitioned
            logits = self.lm(input_ids=inputs, attention_mask=mask).logits
            return token_stats(logits, targets, temperature, chunk_size=self.logits_chunk_size)
        hidden = self.lm.model(input_ids=inputs, attention_mask=mask).last_hidden_state
        return token_stats_from_hidden(hidden, self.lm.get_output_embeddings().weight, targets, temperature,
                                       chunk_size=self.logits_chunk_size)
