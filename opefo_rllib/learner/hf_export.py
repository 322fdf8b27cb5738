"""Export the policy in Hugging Face format: config.json + model.safetensors + the base model's
tokenizer, chat template and generation config, loadable with ``AutoTokenizer`` /
``AutoModelForCausalLM.from_pretrained(dir)`` and by vLLM."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

import torch

__all__ = ["export_hf_policy", "export_adapter"]

# Files of the base model directory that travel with the weights (names, and name prefixes).
_COPIED_NAMES = ("special_tokens_map.json", "added_tokens.json", "merges.txt", "generation_config.json")
_COPIED_PREFIXES = ("tokenizer", "vocab.", "chat_template", "opefo_char_tokenizer")


def _travels_with_weights(name: str) -> bool:
    """A tokenizer file (Hugging Face's or the character one), a chat template, or generation_config.json."""
    return name in _COPIED_NAMES or name.startswith(_COPIED_PREFIXES)


def export_hf_policy(base_model_path: str, weights: Mapping[str, torch.Tensor], directory: str) -> str:
    """Write ``weights`` as a model of ``base_model_path``'s architecture into ``directory``, with
    the base directory's tokenizer files and generation config (so every EOS id it lists, e.g.
    Qwen's two, stays). Returns ``directory``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from opefo_rllib.models.loading import load_policy_weights, resolve_model_path

    src = resolve_model_path(base_model_path)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config)
    load_policy_weights(model, weights, "export_hf_policy")
    model.save_pretrained(out, safe_serialization=True)
    for f in src.iterdir():  # after save_pretrained: the base's generation_config.json replaces the derived one
        if f.is_file() and _travels_with_weights(f.name):
            shutil.copy2(f, out / f.name)
    return str(out)


def export_adapter(base_model_path: str, state: Mapping[str, torch.Tensor], lora_config, directory: str) -> str:
    """Write a LoRA adapter in peft's format (adapter_model.safetensors + adapter_config.json naming
    the base model) with the base's tokenizer files: ``PeftModel.from_pretrained(base, directory)``
    loads it. Returns ``directory``."""
    from safetensors.torch import save_file

    from opefo_rllib.models.loading import resolve_model_path

    src = resolve_model_path(base_model_path)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lora_config.base_model_name_or_path = str(src)
    lora_config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    for f in src.iterdir():
        if f.is_file() and _travels_with_weights(f.name):
            shutil.copy2(f, out / f.name)
    return str(out)
