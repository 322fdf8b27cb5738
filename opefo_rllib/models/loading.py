"""Loading a policy from a local Hugging Face directory: the path rule, the model (and its
tokenizer, through :func:`opefo_rllib.models.tokenizer.load_tokenizer`), and a full state dict
into a model (tied ``lm_head`` allowed to be absent).

Models load from local directories only (no hub downloads at run time); ``"tiny-default"``
names the shipped tiny checkpoint (:mod:`opefo_rllib.models.tiny`), and a ``.gguf`` file (a path
or ``pkg:PACKAGE/FILE``) its dequantized directory (:mod:`opefo_rllib.models.gguf`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from opefo_rllib.models.gguf import gguf_model_dir, is_gguf
from opefo_rllib.models.tiny import TINY_DEFAULT, TINY_DEFAULT_PATH
from opefo_rllib.models.tokenizer import ModelTokenizer, load_tokenizer

__all__ = ["resolve_model_path", "load_model", "load_policy", "load_policy_weights"]


def resolve_model_path(path: str | Path) -> Path:
    """``"tiny-default"`` means the shipped checkpoint; a ``.gguf`` file its converted directory
    (converted on first use); anything else is a local directory."""
    if is_gguf(path):
        return gguf_model_dir(path)
    p = TINY_DEFAULT_PATH if str(path) == TINY_DEFAULT else Path(path).expanduser()
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"model path {str(path)!r}: no config.json in {p} (models load from local "
                                f"directories or .gguf files only; use 'tiny-default' for the shipped tiny model)")
    return p


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The causal LM of a local directory (engines and the learner need no tokenizer)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=dtype, local_files_only=True)


def load_policy(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, ModelTokenizer]:
    """Load (model, tokenizer) from a local directory; the tokenizer is the character one if
    present, else the directory's Hugging Face tokenizer (see ``load_tokenizer``)."""
    directory = resolve_model_path(path)
    return load_model(directory, dtype), load_tokenizer(directory)


def load_policy_weights(model, weights, where: str) -> None:
    """Load a full state dict into ``model``; a tied ``lm_head.weight`` may be absent. Any other
    missing or unexpected key is an error naming ``where``."""
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (m == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise ValueError(f"{where}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
