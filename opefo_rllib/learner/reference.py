"""The reference policy of the KL penalty (``kl_coef`` > 0): a frozen copy of the policy as the
learner built it, before any step, so the base model (a resumed run builds its learner from
``model_path`` before it loads its state, so its reference is the same base model).

It lives beside the policy, outside the RLModule: no optimizer, no checkpoint (it is rebuilt),
never wrapped by DeepSpeed (under ZeRO-3 it is copied from the gathered policy and kept whole on
every learner: one more model in memory per learner, the price of a frozen copy). Under LoRA the
reference is the policy itself with its adapter switched off (peft's ``disable_adapter``): the
frozen base, no extra memory.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from opefo_rllib.models.loading import load_policy_weights
from opefo_rllib.models.rl_module import causal_lm_token_stats

__all__ = ["ReferencePolicy"]


class ReferencePolicy:
    """A frozen causal LM that scores response tokens: log pi_ref(y_t), no gradients."""

    def __init__(self, lm: torch.nn.Module, logits_chunk_size: int = 1024,
                 switch: Callable[[], Any] = contextlib.nullcontext):
        self.lm, self.logits_chunk_size, self._switch = lm, logits_chunk_size, switch
        if switch is contextlib.nullcontext:  # a copy of its own: frozen for good
            self.lm.eval()
            for p in self.lm.parameters():
                p.requires_grad_(False)

    @classmethod
    def adapter_disabled(cls, peft_model: Any, lm: torch.nn.Module, logits_chunk_size: int = 1024) -> "ReferencePolicy":
        """The LoRA policy ``lm`` (wrapped by ``peft_model``) scored with its adapter off: the base model."""
        return cls(lm, logits_chunk_size, switch=peft_model.disable_adapter)

    @classmethod
    def copy_of(cls, lm: torch.nn.Module, logits_chunk_size: int = 1024) -> "ReferencePolicy":
        """A copy of ``lm`` (whole parameters: gather them first under ZeRO-3), on its device."""
        from transformers import AutoModelForCausalLM

        first = next(lm.parameters())
        ref = AutoModelForCausalLM.from_config(lm.config, dtype=first.dtype)
        load_policy_weights(ref, {k: v.detach().to("cpu", copy=True) for k, v in lm.state_dict().items()},
                            "the KL reference policy")
        return cls(ref.to(first.device), logits_chunk_size)

    @torch.no_grad()
    def token_logp(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float) -> torch.Tensor:
        """log pi_ref of tokens 1..L-1 of right-padded rows [n, L] given their prefixes: [n, L-1]
        (the tempered distribution, as the policy's log-probs are)."""
        with self._switch():
            return causal_lm_token_stats(self.lm, input_ids, attention_mask, temperature, self.logits_chunk_size).logp
