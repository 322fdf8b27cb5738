"""The reference policy of the KL penalty (``kl_coef`` > 0): a frozen copy of the policy as the
learner built it, before any step, so the base model (a resumed run builds its learner from
``model_path`` before it loads its state, so its reference is the same base model).

It lives beside the policy, outside the RLModule: no optimizer, no checkpoint (it is rebuilt),
never wrapped by DeepSpeed (under ZeRO-3 it is copied from the gathered policy and kept whole on
every learner: one more model in memory per learner, the price of a frozen copy). Under LoRA the
reference is the policy itself with its adapter switched off (peft's ``disable_adapter``): the
frozen base, no extra memory. With ``kl_reference: actor`` it is a Ray actor of its own per
learner (``RemoteReference``), loaded from ``model_path``: the learner's memory holds one model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from opefo_rllib.models.loading import load_policy_weights
from opefo_rllib.models.rl_module import causal_lm_token_stats

__all__ = ["ReferencePolicy", "RemoteReference"]


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


class RemoteReference:
    """``kl_reference: actor``: the reference in a Ray actor of its own, loaded from ``model_path``
    (so the starting model), with ``ReferencePolicy``'s ``token_logp``. The actor is scheduled
    outside the run's placement group and dies with the learner that made it."""

    def __init__(self, model_path: str, dtype: str = "float32", logits_chunk_size: int = 1024, num_cpus: float = 0.0,
                 num_gpus: float = 0.0):
        import ray

        worker = ray.remote(_ReferenceWorker).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                      scheduling_strategy="DEFAULT")
        self.actor = worker.remote(str(model_path), dtype, logits_chunk_size)
        ray.get(self.actor.ready.remote())  # a model that does not load fails the learner's build, here

    def token_logp(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float) -> torch.Tensor:
        import ray

        return ray.get(self.actor.token_logp.remote(input_ids, attention_mask, temperature))


class _ReferenceWorker:
    """The actor's side: the starting model, frozen, on the actor's device."""

    def __init__(self, model_path: str, dtype: str, logits_chunk_size: int):
        from opefo_rllib.models.loading import load_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.reference = ReferencePolicy(load_model(model_path, dtype=getattr(torch, dtype)).to(self.device),
                                         logits_chunk_size)

    def ready(self) -> bool:
        return True

    def token_logp(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float) -> torch.Tensor:
        logp = self.reference.token_logp(input_ids.to(self.device), attention_mask.to(self.device), temperature)
        return logp.cpu()
