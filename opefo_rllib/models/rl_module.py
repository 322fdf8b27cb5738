"""HFCausalLMModule: an RLlib TorchRLModule wrapping a Hugging Face causal LM (learner only).

RLlib's catalogs and connectors know nothing about text, so the module is built with
``learner_only=True`` (EnvRunners never build it: engines generate) and exposes what the
learner needs: per-token log pi, entropy and the exact-flow term of given response tokens,
computed with the memory-efficient chunked head (``token_stats_from_hidden``). It has no RLlib
``_forward``: the learner trains through ``update_from_rollouts``, never RLlib's forward passes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override

from opefo_rllib.core.token_stats import TokenStats, token_stats, token_stats_from_hidden
from opefo_rllib.models.shared_prompt import (distinct_prompts, response_positions, scatter_to_rows,
                                              shared_prompt_hidden)

logger = logging.getLogger(__name__)

__all__ = ["HFCausalLMModule", "causal_lm_token_stats"]


def causal_lm_token_stats(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float,
                          chunk_size: int | None, use_full_logits: bool = False) -> TokenStats:
    """Stats of tokens 1..L-1 of right-padded rows [N, L] under the causal LM ``lm``, every row
    running its whole prefix; the LM head in chunks unless ``use_full_logits``."""
    inputs, targets = input_ids[:, :-1], input_ids[:, 1:]
    mask = attention_mask[:, :-1]
    if use_full_logits:  # e.g. under ZeRO-3, where the head weight is partitioned
        logits = lm(input_ids=inputs, attention_mask=mask).logits
        return token_stats(logits, targets, temperature, chunk_size=chunk_size)
    hidden = lm.base_model(input_ids=inputs, attention_mask=mask).last_hidden_state
    return token_stats_from_hidden(hidden, lm.get_output_embeddings().weight, targets, temperature,
                                   chunk_size=chunk_size)


class HFCausalLMModule(TorchRLModule):
    """model_config keys: ``model_path`` (local dir or "tiny-default"), or ``hf_config`` (a dict of
    a transformers config, e.g. ``{"model_type": "qwen2", ...}``, to build a fresh model),
    ``dtype`` ("float32" | "bfloat16"), ``gradient_checkpointing`` (bool), ``logits_chunk_size``,
    ``share_prompt_forward`` (bool, default True); ``model_config_of`` takes them from a config."""

    # model_config key -> the config field (policy_model section) it comes from
    CONFIG_FIELDS = {"model_path": "model_path", "dtype": "model_dtype", "gradient_checkpointing": "gradient_checkpointing",
                     "logits_chunk_size": "logits_chunk_size", "share_prompt_forward": "share_prompt_forward",
                     "lora_rank": "lora_rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                     "lora_target_modules": "lora_target_modules"}

    @classmethod
    def model_config_of(cls, config) -> dict[str, Any]:
        """The module's model_config from a GRPOConfig's policy_model fields."""
        return {key: getattr(config, field) for key, field in cls.CONFIG_FIELDS.items()}

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
        # LoRA (peft): adapters injected into self.lm in place, everything else frozen; peft's
        # wrapper is kept outside the module tree (its parameters are self.lm's).
        self.__dict__["peft_model"] = None
        if cfg.get("lora_rank"):
            from opefo_rllib.models.lora import apply_lora

            self.__dict__["peft_model"] = apply_lora(self.lm, cfg["lora_rank"], cfg.get("lora_alpha", 16.0),
                                                     cfg.get("lora_dropout", 0.0), cfg.get("lora_target_modules"))
        if cfg.get("gradient_checkpointing"):
            if self.peft_model is not None:  # the frozen embeddings' output must carry a graph to the adapters
                self.lm.enable_input_require_grads()
            self.lm.gradient_checkpointing_enable()
            self.lm.config.use_cache = False
        self.logits_chunk_size = int(cfg.get("logits_chunk_size", 1024))
        self.share_prompt_forward = bool(cfg.get("share_prompt_forward", True))
        self._prompt_sharing_checked = False

    @override(TorchRLModule)
    def get_state(self, *args, **kwargs):
        """Under LoRA the adapter alone (the base model is ``model_path``'s, rebuilt on restore)."""
        state = super().get_state(*args, **kwargs)
        if self.peft_model is None:
            return state
        from opefo_rllib.models.lora import LORA_KEY

        return {k: v for k, v in state.items() if LORA_KEY in k}

    def sequence_token_stats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                             use_full_logits: bool = False, prompt_lengths: torch.Tensor | None = None) -> TokenStats:
        """Stats of tokens 1..L-1 of right-padded sequences [N, L] given their prefixes ([N, L-1] each).

        With ``prompt_lengths`` [N], rows that share a prompt share its forward (shared_prompt.py)
        when the model passed the one-time check (``share_prompt_forward``); the stats of prompt
        positions are then 0 (no loss reads them)."""
        if prompt_lengths is not None and not use_full_logits and self._may_share_prompts(prompt_lengths):
            distinct = distinct_prompts(input_ids, prompt_lengths)
            if len(distinct[0]) < len(input_ids) and self._passes_sharing_check(
                    input_ids, attention_mask, temperature, prompt_lengths, distinct):
                return self._shared_prompt_stats(input_ids, attention_mask, temperature, prompt_lengths, distinct)
        return self._plain_stats(input_ids, attention_mask, temperature, use_full_logits)

    def _plain_stats(self, input_ids, attention_mask, temperature, use_full_logits=False) -> TokenStats:
        return causal_lm_token_stats(self.lm, input_ids, attention_mask, temperature, self.logits_chunk_size,
                                     use_full_logits)

    def _shared_prompt_stats(self, input_ids, attention_mask, temperature, prompt_lengths, distinct) -> TokenStats:
        hidden, layout = shared_prompt_hidden(self.lm.base_model, input_ids, attention_mask, prompt_lengths, distinct)
        stats = token_stats_from_hidden(hidden, self.lm.get_output_embeddings().weight, layout.targets, temperature,
                                        chunk_size=self.logits_chunk_size)
        width = input_ids.shape[1] - 1
        return TokenStats(*(scatter_to_rows(v, layout, width) for v in stats))

    def _may_share_prompts(self, prompt_lengths) -> bool:
        """Switched on, no gradient checkpointing (its forward keeps no cache), every prompt a token."""
        return (self.share_prompt_forward and not getattr(self.lm, "is_gradient_checkpointing", False)
                and int(prompt_lengths.min()) >= 1)

    def _passes_sharing_check(self, input_ids, attention_mask, temperature, prompt_lengths, distinct) -> bool:
        """The model's one-time check, on the first micro-batch with a repeated prompt, in eval mode:
        the response tokens' log pi and H of both forwards must agree; a model that disagrees or
        fails keeps the plain forward, with a warning."""
        if self._prompt_sharing_checked:
            return self.share_prompt_forward
        self._prompt_sharing_checked = True
        training = self.lm.training
        self.lm.eval()
        try:
            with torch.no_grad():
                plain = self._plain_stats(input_ids, attention_mask, temperature)
                shared = self._shared_prompt_stats(input_ids, attention_mask, temperature, prompt_lengths, distinct)
            on = response_positions(input_ids, attention_mask, prompt_lengths)
            gap = max(float((a - b)[on].abs().max()) if bool(on.any()) else 0.0
                      for a, b in zip(plain[:2], shared[:2]))
            tolerance = 1e-4 if self.lm.dtype in (torch.float32, torch.float64) else 0.1
            if not gap <= tolerance:
                raise ValueError(f"log pi / entropy differ by {gap:.3g} from the plain forward (tolerance {tolerance})")
        except Exception as err:  # noqa: BLE001 - any failure means: do not use this path for this model
            logger.warning("share_prompt_forward is off for %s: the shared-prompt forward failed its check (%s); "
                           "every row runs its whole prompt", type(self.lm).__name__, err)
            self.share_prompt_forward = False
        finally:
            self.lm.train(training)
        return self.share_prompt_forward
