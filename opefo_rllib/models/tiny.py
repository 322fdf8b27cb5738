"""The tiny default policy: a small Qwen2-architecture causal LM with a character tokenizer.

``opefo_rllib/models/tiny_default/`` ships a checkpoint warm-started by a short supervised
phase on the arithmetic task (``python -m opefo_rllib.tools.make_tiny`` rebuilds it,
deterministically), so the default run needs no download and no warm-up. Loading any policy
directory (this one included, as ``"tiny-default"``) is :mod:`opefo_rllib.models.loading`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TINY_DEFAULT_PATH", "TINY_DEFAULT", "tiny_qwen2_config"]

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
