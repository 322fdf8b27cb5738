"""Export the policy in Hugging Face format: config.json + model.safetensors + tokenizer,
loadable with ``AutoModelForCausalLM.from_pretrained(dir)`` and by vLLM."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

import torch

__all__ = ["export_hf_policy"]


def export_hf_policy(base_model_path: str, weights: Mapping[str, torch.Tensor], directory: str) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    from opefo_rllib.models.loading import load_policy_weights, resolve_model_path

    src = resolve_model_path(base_model_path)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_config(config)
    load_policy_weights(model, weights, "export_hf_policy")
    model.save_pretrained(out, safe_serialization=True)
    for f in src.iterdir():  # tokenizer files travel with the weights
        if f.is_file() and ("tokenizer" in f.name or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt")):
            shutil.copy2(f, out / f.name)
    return str(out)
