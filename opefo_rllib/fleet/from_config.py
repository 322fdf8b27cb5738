"""The training fleet of a config: the engines the Algorithm owns and its env runner samples through."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from opefo_rllib.fleet.fleet import EngineFleet

__all__ = ["fleet_from_config"]


def fleet_from_config(c: Any, tokenizer: Any,
                      weights_source: Callable[[], tuple[Mapping[str, Any], int]]) -> EngineFleet:
    """Start ``c.num_engines`` engines of ``c.engine`` on ``c.model_path``. Engines get every EOS id
    of the model (each ends a response) and a pad id that is always masked; they see token ids
    only, never text. ``weights_source``: the learner's (weights, version), for a restarted engine."""
    from opefo_rllib.config.sections import lora_syncs_adapter
    from opefo_rllib.models.loading import resolve_model_path

    engine_kwargs = {"model_path": str(resolve_model_path(c.model_path)), "eos_token_id": list(tokenizer.eos_token_ids),
                     "pad_token_id": tokenizer.pad_token_id, "dtype": c.engine_dtype}
    if lora_syncs_adapter(c):  # the engines carry the adapter and get it alone after each step
        engine_kwargs["lora"] = {"rank": c.lora_rank, "alpha": c.lora_alpha,
                                 "target_modules": _lora_targets(c, engine_kwargs["model_path"])}
    if c.engine == "vllm":
        engine_kwargs["colocated"] = c.colocate_engines
        if c.weight_sync != "object_store" and not lora_syncs_adapter(c):  # an adapter goes the object-store way
            engine_kwargs["weight_transfer_backend"] = c.weight_transfer_backend
    engine_kwargs.update(c.engine_kwargs or {})  # e.g. vLLM's gpu_memory_utilization, HF's device
    fleet = EngineFleet(
        kind=c.engine, num_engines=c.num_engines, engine_kwargs=engine_kwargs,
        num_cpus_per_engine=c.num_cpus_per_engine, num_gpus_per_engine=c.num_gpus_per_engine,
        stall_timeout_s=c.stall_timeout_s, generate_timeout_s=c.generate_timeout_s,
        sync_timeout_s=c.weight_sync_timeout_s, weights_source=weights_source,
        node_labels=c.engine_node_labels, node_fallback=c.engine_node_fallback,
        # a replacement waits for a node as the start waits for resources, then starts like a sync
        restart_timeout_s=c.resource_wait_timeout_s + c.weight_sync_timeout_s)
    if c.weight_sync == "native" and fleet.native_backend is None:
        fleet.shutdown()
        raise ValueError("config field 'weight_sync' = 'native': the installed vLLM has no weight-transfer API "
                         "(LLM.init_weight_transfer_engine); use 'auto' or 'object_store'")
    return fleet


def _lora_targets(c: Any, model_dir: str) -> list[str]:
    """The adapted modules, resolved once here: ``lora_target_modules``, or the architecture's default."""
    from transformers import AutoConfig

    from opefo_rllib.models.lora import target_modules_of

    model_type = AutoConfig.from_pretrained(model_dir, local_files_only=True).model_type
    return target_modules_of(model_type, c.lora_target_modules)
