"""DeepSpeedTorchLearner: an RLlib TorchLearner whose module trains under DeepSpeed.

RLlib's TorchLearner assumes torch.optim optimizers and DDP (``no_sync``); DeepSpeed's ZeRO
optimizers are neither. This base keeps RLlib's module building, optimizer registration and
checkpointing, and replaces the rest:

* ``_make_modules_ddp_if_necessary``: instead of DDP, wrap the module's Hugging Face model and
  its registered AdamW in ``deepspeed.initialize`` (ZeRO stage 0-3, optional bf16, gradient
  clipping), with caller-managed gradient accumulation: any number of micro-batch
  ``backward`` calls, then exactly one ``step``.
* ``compute_gradients`` / ``apply_gradients`` / ``_uncompiled_update``: not used; subclasses
  implement ``update_from_rollouts`` (called through ``LearnerGroup.foreach_learner``).
* CPU (gloo) here, NCCL on GPUs; a single-process group is created when none exists.
"""

from __future__ import annotations

import contextlib
import math

import os
from typing import Any

import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override

__all__ = ["DeepSpeedTorchLearner", "ensure_process_group"]

_ZERO3_OPTIMIZER = "zero3_optimizer"  # learner-state key of the ZeRO-3 optimizer's own state dict


def ensure_process_group(backend: str) -> None:
    """Create a one-process torch.distributed group if none exists.

    Its store is an in-process ``HashStore``: one rank needs no rendezvous, so no port is picked
    (none to race for) and nothing goes in MASTER_ADDR / MASTER_PORT for child processes to inherit.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by a distributed launcher
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        return
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the group above


class DeepSpeedTorchLearner(TorchLearner):
    """TorchLearner + DeepSpeed. Config fields read: zero_stage, bf16, lr, grad_clip,
    weight_decay, adam_betas, adam_eps, lr_warmup_steps, learner_num_threads."""

    ds_engine: Any = None

    @override(TorchLearner)
    def build(self) -> None:
        threads = getattr(self.config, "learner_num_threads", None)
        if threads:
            torch.set_num_threads(int(threads))
        super().build()

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self._module[module_id]
        params = [p for p in module.parameters() if p.requires_grad]
        c = self.config
        optimizer = torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.adam_betas), eps=c.adam_eps,
                                      weight_decay=c.weight_decay)
        self.register_optimizer(module_id=module_id, optimizer=optimizer, params=params, lr_or_lr_schedule=c.lr)

    def deepspeed_config(self) -> dict:
        c = self.config
        return {
            "train_micro_batch_size_per_gpu": 1,  # informational: accumulation is caller-managed
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": float(c.grad_clip) if c.grad_clip else 0.0,
            "zero_optimization": {"stage": int(c.zero_stage), **self._offload_config()},
            # check_grad_overflow: ZeRO 2 skips a bf16 step whose gradient norm is not finite
            # (it always does in fp32); see optimizer_step.
            "bf16": {"enabled": bool(c.bf16), "check_grad_overflow": True},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def _offload_config(self) -> dict:
        """ZeRO-Offload of the optimizer (fp32 master weights + Adam states) to CPU memory. The
        registered torch AdamW then steps on CPU: correct but slower than DeepSpeed's CPUAdam
        (which needs a compiled op); ``zero_force_ds_cpu_optimizer: false`` allows it."""
        if not getattr(self.config, "offload_optimizer", False):
            return {}
        return {"offload_optimizer": {"device": "cpu", "pin_memory": torch.cuda.is_available()}}

    @override(TorchLearner)
    def _make_modules_ddp_if_necessary(self) -> None:
        import deepspeed

        on_gpu = torch.cuda.is_available() and self._device.type == "cuda"
        ensure_process_group("nccl" if on_gpu else "gloo")
        module = self._module[DEFAULT_MODULE_ID]
        optimizer = self.get_optimizer(DEFAULT_MODULE_ID)
        warmup = max(0, int(getattr(self.config, "lr_warmup_steps", 0)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.ds_engine, self.ds_optimizer, _, self.ds_scheduler = deepspeed.initialize(
            model=module.lm, optimizer=optimizer, lr_scheduler=scheduler, config=self.deepspeed_config())

    # RLlib's gradient path is replaced by update_from_rollouts.
    @override(TorchLearner)
    def compute_gradients(self, loss_per_module, **kwargs):
        raise NotImplementedError("DeepSpeedTorchLearner trains through update_from_rollouts()")

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        raise NotImplementedError("DeepSpeedTorchLearner trains through update_from_rollouts()")

    @override(TorchLearner)
    def apply_gradients(self, gradients_dict) -> None:
        raise NotImplementedError("DeepSpeedTorchLearner trains through update_from_rollouts()")

    def optimizer_step(self, loss_finite: bool = True) -> dict[str, float]:
        """The one optimizer step after all micro-batch backward passes of an update.

        Finite-step guard: a non-finite loss or gradient norm skips the step (gradients zeroed,
        no parameter, optimizer or scheduler change) and returns ``skipped`` = 1, so the caller
        keeps the weight version and counts it. The norm is measured before the step under ZeRO
        0, 1 and 3; under ZeRO 2 the gradients exist only inside DeepSpeed's step, which itself
        skips a step whose norm is not finite (``check_grad_overflow``), and that is read back."""
        norm = self._grad_norm() if int(self.config.zero_stage) != 2 else 0.0
        if not (loss_finite and math.isfinite(norm)):
            self.ds_engine.zero_grad()
            optimizer_zero = getattr(self.ds_optimizer, "zero_grad", None)
            if optimizer_zero is not None:
                optimizer_zero()
            return {"grad_norm": norm if not math.isfinite(norm) else float("nan"), "lr": self._lr(), "skipped": 1.0}
        skipped_before = self.ds_engine.skipped_steps
        self.ds_engine.step()
        if int(self.config.zero_stage) == 2:
            reported = self.ds_engine.get_global_grad_norm()
            norm = float(reported) if reported is not None else float("nan")
        skipped = float(self.ds_engine.skipped_steps > skipped_before)
        return {"grad_norm": norm, "lr": self._lr(), "skipped": skipped}

    def _lr(self) -> float:
        groups = getattr(self.ds_optimizer, "param_groups", None)
        return float(groups[0]["lr"] if groups else self.config.lr)

    def _grad_norm(self) -> float:
        """L2 norm of the accumulated gradient before clipping (ZeRO 0, 1, 3: whole gradients)."""
        if int(self.config.zero_stage) == 0:
            grads = [p.grad for p in self.ds_engine.module.parameters() if p.grad is not None]
        else:
            from deepspeed.utils import safe_get_full_grad

            grads = [g for g in (safe_get_full_grad(p) for p in self.ds_engine.module.parameters()) if g is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the Hugging Face model's state dict (gathered under ZeRO-3)."""
        with self._gathered_policy() as lm:
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

    @override(TorchLearner)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        if int(self.config.zero_stage) == 3:
            state = self._get_state_zero3(components, not_components, **kwargs)
        else:
            state = super().get_state(components, not_components=not_components, **kwargs)
        state["torch_rng"] = torch.get_rng_state().numpy()
        state["lr_scheduler"] = self.ds_scheduler.state_dict() if self.ds_scheduler is not None else None
        return state

    def _get_state_zero3(self, components, not_components, **kwargs) -> dict:
        """ZeRO-3 partitions the parameters, and RLlib's path reads the client optimizer, whose
        parameters DeepSpeed replaced (a KeyError): save whole (gathered) module weights, and
        the ZeRO-3 optimizer's own state (its fp32 master partitions and Adam states)."""
        from ray.rllib.core import COMPONENT_OPTIMIZER

        skip = [*(not_components or []), COMPONENT_OPTIMIZER]
        with self._gathered_policy():
            state = super().get_state(components, not_components=skip, **kwargs)
        if self._check_component(COMPONENT_OPTIMIZER, components, not_components):
            state[_ZERO3_OPTIMIZER] = self.ds_optimizer.state_dict()
        return state

    @override(TorchLearner)
    def set_state(self, state) -> None:
        if int(self.config.zero_stage) == 3:
            self._set_state_zero3(state)
        else:
            super().set_state(state)
        if state.get("torch_rng") is not None:
            torch.set_rng_state(torch.as_tensor(state["torch_rng"], dtype=torch.uint8))
        if state.get("lr_scheduler") is not None and self.ds_scheduler is not None:
            self.ds_scheduler.load_state_dict(state["lr_scheduler"])
        restore = getattr(self.ds_engine.optimizer, "_restore_from_bit16_weights", None)
        if restore is not None and int(self.config.zero_stage) in (1, 2):
            restore()  # ZeRO keeps flat fp32 copies: refresh them from the loaded weights

    def _set_state_zero3(self, state) -> None:
        """Load whole module weights into the partitioned parameters, then the ZeRO-3
        optimizer state (which also restores the fp32 master partitions)."""
        from ray.rllib.core import COMPONENT_OPTIMIZER

        rest = {k: v for k, v in state.items() if k not in (COMPONENT_OPTIMIZER, _ZERO3_OPTIMIZER)}
        if self._restoring_zero3:  # restore_from_path holds the gathered parameters already
            super().set_state(rest)
            self._pending_zero3_optimizer = state.get(_ZERO3_OPTIMIZER)
            return
        with self._gathered_for_loading():
            super().set_state(rest)
        if state.get(_ZERO3_OPTIMIZER) is not None:
            self.ds_optimizer.load_state_dict([state[_ZERO3_OPTIMIZER]])

    _restoring_zero3 = False
    _pending_zero3_optimizer = None

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
            self.ds_optimizer.load_state_dict([self._pending_zero3_optimizer])
            self._pending_zero3_optimizer = None

    def _gathered_for_loading(self):
        import deepspeed

        lm = self._module[DEFAULT_MODULE_ID].lm
        return deepspeed.zero.GatheredParameters(list(lm.parameters()), modifier_rank=0)
