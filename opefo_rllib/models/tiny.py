"""The tiny default policy: a small Qwen2-architecture causal LM with a character tokenizer.

``opefo_rllib/models/tiny_default/`` ships a checkpoint warm-started by a short supervised
phase on the arithmetic task (``python -m opefo_rllib.models.make_tiny`` rebuilds it,
deterministically), so the default run needs no download and no warm-up.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opefo_rllib.models.tokenizer import CharTokenizer

__all__ = ["TINY_DEFAULT_PATH", "tiny_qwen2_config", "load_policy", "load_policy_weights", "resolve_model_path"]

TINY_DEFAULT_PATH = Path(__file__).resolve().parent / "tiny_default"
TINY_DEFAULT = "tiny-default"


def tiny_qwen2_config(vocab_size: int, hidden_size: int = 128, layers: int = 4, heads: int = 4,
                      kv_heads: int = 2, intermediate_size: int = 384, max_positions: int = 128):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="float32",
    )


def resolve_model_path(path: str | Path) -> Path:
    """``"tiny-default"`` means the shipped checkpoint; anything else is a local directory."""
    p = TINY_DEFAULT_PATH if str(path) == TINY_DEFAULT else Path(path).expanduser()
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"model path {str(path)!r}: no config.json in {p} (models load from local "
                                f"directories only; use 'tiny-default' for the shipped tiny model)")
    return p


def load_policy(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) from a local directory; the tokenizer is the character one if
    present, else the directory's Hugging Face tokenizer."""
    from transformers import AutoModelForCausalLM

    p = resolve_model_path(path)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    try:
        tokenizer = CharTokenizer.load(p)
    except FileNotFoundError:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(p)
    return model, tokenizer


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
