"""The DeepSpeed engine of a learner: its config, its build around the module's Hugging Face model
and registered AdamW (``deepspeed.initialize``, ZeRO stage 0-3, optional bf16 and offload,
gradient clipping), and the optimizer step with its finite-step guard.

Gradient accumulation is caller-managed: any number of micro-batch ``backward`` calls, then
exactly one ``step``. RLlib's gradient path (``compute_gradients`` / ``apply_gradients``) is
replaced by the subclass's ``update_from_rollouts``. CPU (gloo) here, NCCL on GPUs; a
single-process group is created when none exists.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override

from opefo_rllib.learner.data_parallel import all_reduce_sum, reduce_floats, world_and_rank

__all__ = ["DeepSpeedEngine", "ensure_process_group"]


def ensure_process_group(backend: str) -> None:
    """Create a one-process torch.distributed group if none exists.

    Its store is an in-process ``HashStore``: one rank needs no rendezvous, so no port is picked
    (none to race for) and nothing goes in MASTER_ADDR / MASTER_PORT for child processes to inherit.
    """
    import torch.distributed as dist

    import deepspeed

    from opefo_rllib.quiet import quiet_stdout

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it (a learner actor sees its own device)
    has_group = dist.is_available() and dist.is_initialized()  # RLlib's learner group made it (num_learners > 1)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # by a distributed launcher
    if not (has_group or launched):
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    with quiet_stdout():  # DeepSpeed prints "... shm_comm_op built successfully" on CPU
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the group



class DeepSpeedEngine:
    """TorchLearner mixin: the module trains under a DeepSpeed engine. Config fields read:
    zero_stage, bf16, offload_optimizer, offload_params, lr, grad_clip, weight_decay, adam_betas,
    adam_eps, lr_warmup_steps, learner_num_threads."""

    ds_engine: Any = None
    dp_world: int = 1  # learners in the data-parallel group
    dp_rank: int = 0

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
            "zero_optimization": {"stage": int(c.zero_stage), **self._bucket_config(), **self._offload_config()},
            # check_grad_overflow: ZeRO 2 skips a bf16 step whose gradient norm is not finite
            # (it always does in fp32); see optimizer_step.
            "bf16": {"enabled": bool(c.bf16), "check_grad_overflow": True},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def _bucket_config(self) -> dict:
        """Communication buckets no larger than the model. DeepSpeed's defaults (5e8 elements)
        suit billions of parameters; ZeRO-3 allocates its reduce bucket eagerly, so a small model
        paid 1.9 GB of host memory per learner for a bucket it never fills (and the tests, which
        build many learners in one process, ran out of memory)."""
        n = sum(p.numel() for p in self._module[DEFAULT_MODULE_ID].lm.parameters())
        size = int(min(5e8, max(n, 1_000_000)))
        return {"reduce_bucket_size": size, "allgather_bucket_size": size, "stage3_prefetch_bucket_size": size}

    def _offload_config(self) -> dict:
        """ZeRO-Offload of the optimizer (fp32 master weights + Adam states) to CPU memory, and
        under ZeRO-3 of the parameter partitions too. The registered torch AdamW then steps on
        CPU: correct but slower than DeepSpeed's CPUAdam (which needs a compiled op);
        ``zero_force_ds_cpu_optimizer: false`` allows it."""
        pin = torch.cuda.is_available()
        out = {}
        if getattr(self.config, "offload_optimizer", False):
            out["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if getattr(self.config, "offload_params", False):
            out["offload_param"] = {"device": "cpu", "pin_memory": pin}
        return out

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
        self.dp_world, self.dp_rank = world_and_rank()

    def begin_training_forward(self) -> None:
        """Call before each forward whose backward accumulates into this update. The policy runs
        the Hugging Face model directly (the chunked head needs its hidden states), not through
        ``ds_engine.forward``, so this does that forward's bookkeeping: ZeRO's micro-step counter.
        Without it ZeRO-3 *copies* each micro-batch's gradient partition over the last one
        instead of adding it (only the last micro-batch of an update counted)."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        if isinstance(self.ds_optimizer, ZeROOptimizer):
            self.ds_optimizer.clear_backward_seen_flag()

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
        stage = int(self.config.zero_stage)
        norm = self._grad_norm() if stage != 2 else 0.0
        if not (loss_finite and math.isfinite(norm)):
            self.ds_engine.zero_grad()
            optimizer_zero = getattr(self.ds_optimizer, "zero_grad", None)
            if optimizer_zero is not None:
                optimizer_zero()
            return {"grad_norm": norm if not math.isfinite(norm) else float("nan"), "lr": self._lr(), "skipped": 1.0}
        skipped_before = self.ds_engine.skipped_steps
        self.ds_engine.step()
        if stage == 2 or (self.dp_world > 1 and stage != 0):
            reported = self.ds_engine.get_global_grad_norm()
            norm = float(reported) if reported is not None else float("nan")
        skipped = float(self.ds_engine.skipped_steps > skipped_before)
        return {"grad_norm": norm, "lr": self._lr(), "skipped": skipped}

    def adam_state(self, params: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], list[dict | None]]:
        """Each parameter's fp32 value and AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``; None
        before the first step), whole, whichever of ZeRO 0-2 (fp32 or bf16) keeps them. ZeRO 1-2
        and bf16 hold them in flat fp32 partitions; DeepSpeed's ``safe_get_full_*`` assembles each
        parameter's piece with an all-reduce over the learners, so every learner must call this
        with the same ``params`` in the same order. Costs two fp32 copies of the model (three with
        the master weights). ZeRO-3 partitions the parameters themselves: not supported."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if int(self.config.zero_stage) == 3:
            raise ValueError("adam_state: ZeRO-3 partitions the parameters; zero_stage must be 0, 1 or 2")
        if not any(hasattr(p, "_hp_mapping") for p in params):  # ZeRO-0 fp32: the torch AdamW's own state
            opt = self.get_optimizer(DEFAULT_MODULE_ID)
            return [p.detach() for p in params], [opt.state.get(p) or None for p in params]
        inner = getattr(self.ds_optimizer, "optimizer", self.ds_optimizer)  # the AdamW over the flat partitions
        steps = [float(st["step"]) for st in inner.state.values() if "step" in st]
        values = [safe_get_full_fp32_param(p) for p in params]
        if not steps:  # before the first step (the same on every learner: they step together)
            return values, [None] * len(params)
        return values, [{"exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                         "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq"), "step": max(steps)}
                        for p in params]

    def _lr(self) -> float:
        groups = getattr(self.ds_optimizer, "param_groups", None)
        return float(groups[0]["lr"] if groups else self.config.lr)

    def _grad_norm(self) -> float:
        """L2 norm of the accumulated gradient before clipping (ZeRO 0, 1, 3: whole gradients).

        With several learners DeepSpeed reduces the gradients inside ``step`` (the caller-owned
        accumulation boundary). ZeRO-0 sums them here first (DeepSpeed's own average of equal
        gradients then changes nothing; one extra all-reduce), so the guard sees the global
        gradient; under ZeRO 1 and 3 this is a local finiteness check (all learners agree, one
        scalar reduce) and the logged norm is DeepSpeed's, after its step."""
        stage = int(self.config.zero_stage)
        if stage == 0:
            grads = [p.grad for p in self.ds_engine.module.parameters() if p.grad is not None]
            if self.dp_world > 1:
                for g in grads:  # the loss was scaled by world: the sum / world is the global gradient
                    all_reduce_sum(g).div_(self.dp_world)
        else:
            from deepspeed.utils import safe_get_full_grad

            grads = [g for g in (safe_get_full_grad(p) for p in self.ds_engine.module.parameters()) if g is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if self.dp_world > 1 and stage != 0:
            norm = math.sqrt(reduce_floats([norm * norm])[0])  # not finite on any learner: not finite on all
        return norm
