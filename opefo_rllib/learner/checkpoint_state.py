"""Checkpoint state of a DeepSpeed learner: RLlib's ``get_state`` / ``set_state`` /
``restore_from_path`` with ZeRO's sharded state.

ZeRO-3 (and ZeRO 1-2 with several learners) save whole (gathered) module weights and every rank's
ZeRO optimizer state, gathered on rank 0; loading partitions them again, each rank taking its
shard. What needs every rank at once happens in ``stage_state``, which the Algorithm runs on
every learner before RLlib asks learner 0 for ``get_state``.
"""

from __future__ import annotations

import torch
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override

__all__ = ["ZeroCheckpointState", "LearnerStateError"]

_ZERO_SHARDS = "zero_optimizer_shards"  # learner-state key: every rank's ZeRO optimizer state dict, by rank


class LearnerStateError(RuntimeError):
    """The learner state was asked of one learner where it needs all of them."""


class ZeroCheckpointState:
    """TorchLearner mixin (with ``DeepSpeedEngine`` and ``WeightAccess``): the learner state."""

    _staged_state: dict | None = None
    _restoring_zero3 = False
    _pending_zero3_optimizer = None

    def stage_state(self) -> None:
        """Collect the whole learner state now, on every learner at once (the collectives need all
        ranks), and keep it on rank 0 for the next ``get_state()``. The Algorithm calls this on
        every learner before a checkpoint; with one learner there is nothing to stage (no copy kept)."""
        if self.dp_world == 1:
            self._staged_state = None
            return
        state = self._collect_state(None, None)
        self._staged_state = state if self.dp_rank == 0 else None

    def clear_staged_state(self) -> None:
        self._staged_state = None

    def _needs_all_ranks(self, components, not_components) -> bool:
        from ray.rllib.core import COMPONENT_OPTIMIZER, COMPONENT_RL_MODULE

        if self.dp_world == 1:
            return False
        stage = int(self.config.zero_stage)
        return ((stage == 3 and self._check_component(COMPONENT_RL_MODULE, components, not_components))
                or (stage >= 1 and self._check_component(COMPONENT_OPTIMIZER, components, not_components)))

    @override(TorchLearner)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        if self._staged_state is not None and components is None and not not_components:
            state, self._staged_state = self._staged_state, None
            return state
        if kwargs.get("inference_only") and self.dp_world > 1 and int(self.config.zero_stage) == 3:
            # RLlib syncing its EnvRunners (Algorithm.setup asks learner 0 alone): they hold no copy
            # of this learner-only module (the engines get weights through WeightSync), so the
            # module is left out rather than gathered, which would need every learner.
            from ray.rllib.core import COMPONENT_OPTIMIZER, COMPONENT_RL_MODULE

            skip = [*(not_components or []), COMPONENT_RL_MODULE, COMPONENT_OPTIMIZER]
            return TorchLearner.get_state(self, components, not_components=skip, **kwargs)
        if self._needs_all_ranks(components, not_components):
            raise LearnerStateError(
                f"learner {self.dp_rank} of {self.dp_world}: with ZeRO stage {self.config.zero_stage} the module "
                "weights / optimizer state are sharded over the learners; collect them on every learner at once "
                "with stage_state() first (GRPO.save_to_path does)")
        return self._collect_state(components, not_components, **kwargs)

    def _collect_state(self, components, not_components, **kwargs) -> dict:
        """The learner state. ZeRO-3 (and ZeRO 1-2 with several learners) save whole (gathered)
        module weights and every rank's ZeRO optimizer state (its fp32 master partition and Adam
        states), gathered on rank 0: RLlib's optimizer path reads the client optimizer, whose
        parameters DeepSpeed replaced (a KeyError under ZeRO-3) or holds only this rank's shard."""
        from ray.rllib.core import COMPONENT_OPTIMIZER

        stage = int(self.config.zero_stage)
        if stage == 3 or (stage >= 1 and self.dp_world > 1):
            skip = [*(not_components or []), COMPONENT_OPTIMIZER]
            with self._gathered_policy():
                state = super().get_state(components, not_components=skip, **kwargs)
            if self._check_component(COMPONENT_OPTIMIZER, components, not_components):
                state[_ZERO_SHARDS] = self._gather_to_rank0(self.ds_optimizer.state_dict())
        else:
            state = super().get_state(components, not_components=not_components, **kwargs)
        state["torch_rng"] = torch.get_rng_state().numpy()
        state["lr_scheduler"] = self.ds_scheduler.state_dict() if self.ds_scheduler is not None else None
        state["num_learners"] = self.dp_world
        return state

    def _gather_to_rank0(self, obj) -> list | None:
        """[rank 0's obj, rank 1's, ...] on rank 0 (None elsewhere); [obj] in one process."""
        if self.dp_world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.dp_world if self.dp_rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    @override(TorchLearner)
    def set_state(self, state) -> None:
        saved_world = int(state.get("num_learners", 1))
        shards = state.get(_ZERO_SHARDS)
        if shards is not None and len(shards) != self.dp_world:
            raise LearnerStateError(f"the checkpoint holds the ZeRO optimizer shards of {saved_world} learner(s); this "
                                    f"run has {self.dp_world}: resume with num_learners = {saved_world if saved_world > 1 else 0}")
        if int(self.config.zero_stage) == 3:
            self._set_state_zero3(state, shards)
        elif shards is not None:  # ZeRO 1-2 over several learners: weights as usual, then each rank's shard
            super().set_state({k: v for k, v in state.items() if k != _ZERO_SHARDS})
            self.ds_optimizer.load_state_dict(shards, load_from_fp32_weights=True)
        else:
            super().set_state(state)
            restore = getattr(self.ds_engine.optimizer, "_restore_from_bit16_weights", None)
            if restore is not None and int(self.config.zero_stage) in (1, 2):
                restore()  # ZeRO keeps flat fp32 copies: refresh them from the loaded weights
        if state.get("torch_rng") is not None:
            torch.set_rng_state(torch.as_tensor(state["torch_rng"], dtype=torch.uint8))
        if state.get("lr_scheduler") is not None and self.ds_scheduler is not None:
            self.ds_scheduler.load_state_dict(state["lr_scheduler"])

    def _set_state_zero3(self, state, shards) -> None:
        """Load whole module weights into the partitioned parameters, then the ZeRO-3
        optimizer state (which also restores the fp32 master partitions); each rank takes its shard."""
        from ray.rllib.core import COMPONENT_OPTIMIZER

        rest = {k: v for k, v in state.items() if k not in (COMPONENT_OPTIMIZER, _ZERO_SHARDS)}
        if self._restoring_zero3:  # restore_from_path holds the gathered parameters already
            super().set_state(rest)
            self._pending_zero3_optimizer = shards
            return
        with self._gathered_for_loading():
            super().set_state(rest)
        if shards is not None:
            self.ds_optimizer.load_state_dict(shards)

    @override(TorchLearner)
    def restore_from_path(self, path, *args, **kwargs):
        """RLlib restores the RL module from its own sub-directory, straight into the module:
        under ZeRO-3 that happens with the parameters gathered (whole), and the ZeRO-3
        optimizer state is loaded after they are partitioned again."""
        if int(self.config.zero_stage) != 3:
            return super().restore_from_path(path, *args, **kwargs)
        self._restoring_zero3, self._pending_zero3_optimizer = True, None
        try:
            with self._gathered_for_loading():
                super().restore_from_path(path, *args, **kwargs)
        finally:
            self._restoring_zero3 = False
        if self._pending_zero3_optimizer is not None:
            self.ds_optimizer.load_state_dict(self._pending_zero3_optimizer)
            self._pending_zero3_optimizer = None
