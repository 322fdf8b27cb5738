"""Weight access of a DeepSpeed learner: the policy's Hugging Face model with whole parameters
(ZeRO-3 gathers them for the duration, every learner taking part), and a CPU copy of its weights."""

from __future__ import annotations

import contextlib

import torch
from ray.rllib.core import DEFAULT_MODULE_ID

__all__ = ["WeightAccess"]


class WeightAccess:
    """TorchLearner mixin (with ``DeepSpeedEngine``): the policy weights, gathered."""

    def policy_weights(self) -> dict[str, torch.Tensor] | None:
        """A CPU copy of the Hugging Face model's state dict (gathered under ZeRO-3), from rank 0;
        None on the other learners (which take part in the gather)."""
        with self._gathered_policy() as lm:
            if self.dp_rank != 0:
                return None
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
