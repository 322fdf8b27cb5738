"""Weight access of a DeepSpeed learner: the policy's Hugging Face model with whole parameters
(ZeRO-3 gathers them for the duration, every learner taking part), and a CPU copy of its weights."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from ray.rllib.core import DEFAULT_MODULE_ID

__all__ = ["WeightAccess"]


class WeightAccess:
    """TorchLearner mixin (with ``DeepSpeedEngine``): the policy weights, gathered."""

    def policy_weights(self) -> dict[str, torch.Tensor] | None:
        """A CPU copy of the Hugging Face model's state dict (gathered under ZeRO-3; under LoRA
        with the adapter merged in, under the plain model's names), from rank 0; None on the other
        learners (which take part in the gather)."""
        with self._gathered_policy() as lm:
            if self.dp_rank != 0:
                return None
            return self._hf_state_dict(lm)

    def engine_weights(self) -> dict[str, torch.Tensor] | None:
        """What the engines load after a step: the adapter tensors alone where they take them
        (LoRA, ``lora_syncs_adapter``), else ``policy_weights()``."""
        from opefo_rllib.config.sections import lora_syncs_adapter
        from opefo_rllib.models.lora import adapter_state

        if not lora_syncs_adapter(self.config):
            return self.policy_weights()
        return adapter_state(self._module[DEFAULT_MODULE_ID].lm) if self.dp_rank == 0 else None

    def probe_logprobs(self, token_ids: list[int]) -> list[float] | None:
        """The log-prob of each token of ``token_ids`` after the ones before it, under the policy
        (temperature 1): what the engines' ``probe_logprobs`` must return after a sync; from rank 0.
        Every learner runs the forward (under ZeRO-3 its layers are gathered as in training)."""
        lm = self._module[DEFAULT_MODULE_ID].lm
        with torch.no_grad():
            ids = torch.tensor([list(token_ids)], device=next(lm.parameters()).device)
            logp = torch.log_softmax(lm(input_ids=ids).logits[0, :-1].float(), -1)
        if self.dp_rank != 0:
            return None
        return logp.gather(-1, ids[0, 1:, None]).squeeze(-1).cpu().tolist()

    def probe_ids(self, length: int = 64) -> list[int]:
        """A fixed sequence of the policy's vocabulary (spread over it, the same every call)."""
        vocab = int(self._module[DEFAULT_MODULE_ID].lm.config.vocab_size)
        return [(17 + 7919 * i) % vocab for i in range(length)]

    def adapter_export(self) -> tuple[dict[str, torch.Tensor], Any] | None:
        """LoRA: the adapter in peft's own format (its state dict and ``LoraConfig``), from rank 0."""
        from peft import get_peft_model_state_dict

        peft_model = self._module[DEFAULT_MODULE_ID].peft_model
        if self.dp_rank != 0:
            return None
        state = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model).items()}
        return state, peft_model.peft_config["default"]

    def _hf_state_dict(self, lm) -> dict[str, torch.Tensor]:
        if self._module[DEFAULT_MODULE_ID].peft_model is not None:
            from opefo_rllib.models.lora import merged_state_dict

            return merged_state_dict(lm)
        return {k: v.detach().to("cpu", copy=True) for k, v in lm.state_dict().items()}

    @contextlib.contextmanager
    def _gathered_policy(self):
        """The Hugging Face model with whole parameters (ZeRO-3 gathers them for the duration)."""
        lm = self._module[DEFAULT_MODULE_ID].lm
        if int(self.config.zero_stage) == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(lm.parameters()), modifier_rank=None):
                yield lm
        else:
            yield lm

    def _gathered_for_loading(self):
        """Whole parameters to load into; rank 0's values are partitioned to all on exit (ZeRO-3)."""
        import deepspeed

        lm = self._module[DEFAULT_MODULE_ID].lm
        return deepspeed.zero.GatheredParameters(list(lm.parameters()), modifier_rank=0)
