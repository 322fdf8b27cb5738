"""DeepSpeedTorchLearner: an RLlib TorchLearner whose module trains under DeepSpeed.

RLlib's TorchLearner assumes torch.optim optimizers and DDP (``no_sync``); DeepSpeed's ZeRO
optimizers are neither. This learner keeps RLlib's module building, optimizer registration and
checkpointing, and replaces the rest, in three parts:

* ``DeepSpeedEngine`` (deepspeed_engine.py): instead of DDP, the module's Hugging Face model and
  its registered AdamW in ``deepspeed.initialize``, caller-managed gradient accumulation and the
  one optimizer step per update (with the finite-step guard); RLlib's ``compute_gradients`` /
  ``apply_gradients`` are not used (subclasses implement ``update_from_rollouts``).
* ``WeightAccess`` (weight_access.py): the policy weights, gathered under ZeRO-3.
* ``ZeroCheckpointState`` (checkpoint_state.py): get / set state and restore with ZeRO's shards.

Several learners (``num_learners`` > 1): RLlib's learner group starts them as Ray Train workers
in one torch.distributed group; DeepSpeed data-parallelises over it (ZeRO 1-3 shard the
optimizer state, gradients and, at stage 3, parameters across them).
"""

from __future__ import annotations

from ray.rllib.core.learner.torch.torch_learner import TorchLearner

from opefo_rllib.learner.checkpoint_state import LearnerStateError, ZeroCheckpointState
from opefo_rllib.learner.deepspeed_engine import DeepSpeedEngine, ensure_process_group
from opefo_rllib.learner.weight_access import WeightAccess

__all__ = ["DeepSpeedTorchLearner", "LearnerStateError", "ensure_process_group"]


class DeepSpeedTorchLearner(ZeroCheckpointState, WeightAccess, DeepSpeedEngine, TorchLearner):
    """TorchLearner + DeepSpeed (engine, weight access, checkpoint state)."""
