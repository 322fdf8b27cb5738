"""LoRA adapters on a Hugging Face causal LM, through peft (the well-kept implementation the
peers use; nothing of it is rewritten here).

``apply_lora`` injects peft's LoRA layers into the model in place and returns peft's wrapper;
the model object itself stays a transformers model (its ``base_model`` is still the transformer
body), so the learner's forwards, DeepSpeed and the engines use it unchanged. Around it:

* ``adapter_state``: the adapter tensors only (what the learner trains, checkpoints and syncs);
* ``load_adapter_state``: load such tensors into a model with the same adapter (an engine);
* ``merged_state_dict``: the plain Hugging Face state dict of base + scale x B A (what an engine
  without adapters, or an export, takes), computed out of place: training goes on unmerged;
* ``DEFAULT_TARGETS``: the projections adapted per architecture when ``lora_target_modules`` is None.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

__all__ = ["DEFAULT_TARGETS", "LORA_KEY", "adapter_config", "apply_lora", "adapter_state", "load_adapter_state",
           "merged_state_dict", "peft_format", "target_modules_of"]

LORA_KEY = ".lora_"  # in every adapter parameter's name (peft: ...q_proj.lora_A.default.weight)
_BASE_LAYER = ".base_layer"  # peft keeps the wrapped Linear as <module>.base_layer

# Attention and MLP projections of the decoder families this project runs (peft's own table has the
# attention ones only; adapting the MLP too is what the RL recipes with LoRA do).
_DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {"llama": _DECODER, "qwen2": _DECODER, "qwen3": _DECODER,
                                               "mistral": _DECODER, "gemma": _DECODER, "gemma2": _DECODER,
                                               "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
                                               "gpt2": ("c_attn", "c_proj", "c_fc")}


def target_modules_of(model_type: str, targets: Sequence[str] | None) -> list[str]:
    """``targets`` as given, else the architecture's default; an unknown architecture without
    targets is an error naming the field."""
    if targets:
        return list(targets)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"config field 'lora_target_modules': no default for model type {model_type!r} (known: "
                         f"{sorted(DEFAULT_TARGETS)}); name the Linear modules to adapt, e.g. [q_proj, v_proj]")
    return list(DEFAULT_TARGETS[model_type])


def adapter_config(rank: int, alpha: float, targets: Sequence[str], base_model: str | None = None) -> dict[str, Any]:
    """peft's adapter_config.json of an adapter (dropout 0: what an engine serves), the keys vLLM
    and SGLang read (r, lora_alpha, target_modules, ...)."""
    return {"peft_type": "LORA", "r": int(rank), "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none",
            "target_modules": list(targets), "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model}


def apply_lora(lm: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: Sequence[str] | None = None) -> Any:
    """Inject LoRA layers (rank ``rank``, scale alpha / rank, B = 0 so the model is unchanged)
    into ``lm`` in place and freeze every other parameter; returns peft's ``PeftModel`` around it
    (for ``disable_adapter`` and peft-format exports)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("lora_rank > 0 needs peft: pip install 'opefo-rllib[lora]'") from None
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), bias="none",
                        target_modules=target_modules_of(lm.config.model_type, targets), task_type="CAUSAL_LM")
    return get_peft_model(lm, config)


def adapter_state(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``lm`` (CPU copies), by their names in ``lm``."""
    return {k: v.detach().to("cpu", copy=True) for k, v in lm.state_dict().items() if LORA_KEY in k}


def load_adapter_state(lm: torch.nn.Module, state: Mapping[str, Any], where: str) -> None:
    """Load adapter tensors into ``lm``; they must be exactly its adapter's (names and shapes)."""
    own = {k: v for k, v in lm.state_dict().items() if LORA_KEY in k}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(torch.as_tensor(state[k]).shape))
    if missing or unexpected or reshaped:
        raise ValueError(f"{where}: the adapter does not match this model's (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {reshaped[:3]})")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(torch.as_tensor(v))


def peft_format(state: Mapping[str, Any], adapter: str = "default") -> dict[str, Any]:
    """Adapter tensors by the names of peft's saved format (what ``save_pretrained`` writes and
    vLLM reads): ``base_model.model.<module>.lora_A.weight``, the adapter name dropped."""
    return {"base_model.model." + k.replace(f".{adapter}.", "."): v for k, v in state.items()}


def merged_state_dict(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of ``lm`` with every adapter merged into its base weight
    (W + scale x B A, peft's ``get_delta_weight``), under the plain model's names; CPU copies."""
    from peft.tuners.lora import LoraLayer

    merged = {}
    for name, value in lm.state_dict().items():
        if LORA_KEY not in name:
            merged[name.replace(_BASE_LAYER, "")] = value.detach().to("cpu", copy=True)
    with torch.no_grad():
        for name, module in lm.named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    key = f"{name}.weight"
                    merged[key] = merged[key] + module.get_delta_weight(adapter).detach().to("cpu", merged[key].dtype)
    return merged
