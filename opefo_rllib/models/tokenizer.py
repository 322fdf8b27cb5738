"""Tokenizers of policy models: the tiny model's character tokenizer, and ``load_tokenizer``,
the one seam that opens any model directory's tokenizer.

Character tokenizer ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then one id per character of the
vocabulary. The engines and the learner exchange token ids only. A Hugging Face directory's
tokenizer is checked against its own tokenizer.json (``_check_agrees_with_tokenizer_json``): a
loader quirk (transformers 5.x rebuilding a byte-level BPE for a qwen2 folder) would otherwise
change the ids, and so what is scored.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

__all__ = ["CharTokenizer", "TOKENIZER_FILE", "ModelTokenizer", "TokenizerError", "load_tokenizer"]

TOKENIZER_FILE = "opefo_char_tokenizer.json"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class CharTokenizer:
    """Maps each character of ``chars`` to one token id."""

    def __init__(self, chars: str = string.printable[:95] + "\n"):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer chars must be unique")
        self.chars = chars
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2, 3
        self._to_id = {c: i + len(SPECIALS) for i, c in enumerate(chars)}

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self._to_id.get(c, self.unk_token_id) for c in text]
        return [self.bos_token_id] + ids if add_bos else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < len(SPECIALS):
                if i == self.eos_token_id and skip_special:
                    break
                if not skip_special:
                    out.append(SPECIALS[i])
                continue
            out.append(self.chars[i - len(SPECIALS)] if i - len(SPECIALS) < len(self.chars) else "")
        return "".join(out)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(json.dumps({"type": "char", "specials": list(SPECIALS), "chars": self.chars}))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "CharTokenizer":
        path = Path(directory) / TOKENIZER_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}") from None
        if data.get("type") != "char" or "chars" not in data:
            raise ValueError(f"{path}: not a character tokenizer file (keys: {sorted(data)})")
        return cls(data["chars"])


# ---------------------------------------------------------------------------------------------
# The seam: one model directory -> one tokenizer with one interface.

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# Text on which a Hugging Face tokenizer must agree with the directory's own tokenizer.json.
AGREEMENT_PROBE = "What is 12 + 7? Let's think step by step.\n  The answer is \\boxed{19}. 3.5x-2=y"


class TokenizerError(ValueError):
    """A model directory's tokenizer is missing or unusable; the message names the directory."""


class ModelTokenizer:
    """A model directory's tokenizer behind the one interface the rollout uses.

    ``encode`` / ``encode_chat`` give the token ids the engines see, ``decode`` turns ids back into
    text. ``eos_token_ids`` are every id that ends a response: the EOS ids of the directory's
    ``generation_config.json`` (Qwen's lists several) and ``config.json``, and the tokenizer's own.
    ``pad_token_id`` is the tokenizer's pad id, or the first EOS id when it has none: padding is
    always masked out (attention mask 0 in the engines, response mask 0 in the learner), so any id
    of the vocabulary is safe there.
    """

    def __init__(self, source: Path, eos_token_ids: tuple[int, ...], pad_token_id: int | None,
                 chat_template: str | None):
        if not eos_token_ids:
            raise TokenizerError(f"model dir {source}: no EOS token id in generation_config.json, config.json or "
                                 "the tokenizer, so no response could end; set eos_token_id in generation_config.json")
        self.source = source
        self.eos_token_ids = eos_token_ids
        self.eos_token_id = eos_token_ids[0]  # the first, for code that takes one id
        self.pad_token_id = eos_token_ids[0] if pad_token_id is None else int(pad_token_id)
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as a base model reads it (the tokenizer's own BOS, if any, first)."""
        raise NotImplementedError

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` continuing a sequence: no BOS or other added special token (a
        multi-turn episode's env observation; chat markers written in ``text`` still map to theirs)."""
        raise NotImplementedError

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the chat template, ending with the assistant's turn."""
        raise TokenizerError(f"model dir {self.source}: its tokenizer has no chat template")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ``skip_special_tokens`` drops special tokens (EOS, chat markers, padding)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class CharModelTokenizer(ModelTokenizer):
    """The character tokenizer of the tiny model (``opefo_char_tokenizer.json``); no chat template."""

    def __init__(self, source: Path, char: CharTokenizer, eos_token_ids: tuple[int, ...]):
        super().__init__(source, eos_token_ids, char.pad_token_id, None)
        self.char = char

    def encode(self, text: str) -> list[int]:
        return self.char.encode(text)

    def encode_plain(self, text: str) -> list[int]:
        return self.char.encode(text, add_bos=False)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.char.decode(ids, skip_special=skip_special_tokens)

    def __len__(self) -> int:
        return len(self.char)


class HFModelTokenizer(ModelTokenizer):
    """A Hugging Face tokenizer (``AutoTokenizer``, local files only)."""

    def __init__(self, source: Path, hf, eos_token_ids: tuple[int, ...]):
        super().__init__(source, eos_token_ids, hf.pad_token_id, hf.chat_template or None)
        self.hf = hf

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def encode_plain(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """``messages`` through the chat template, as text."""
        return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.chat_template:
            return super().encode_chat(messages)  # raises
        # Render, then tokenize without adding specials again: the template writes its own (as
        # transformers' apply_chat_template(tokenize=True) does).
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return len(self.hf)


def load_tokenizer(model_dir: str | Path) -> ModelTokenizer:
    """The tokenizer of a local model directory: the character tokenizer when
    ``opefo_char_tokenizer.json`` is there (checked first and explicitly: transformers 5 would
    silently build a different tokenizer for a qwen2 directory), else the directory's Hugging Face
    tokenizer (``AutoTokenizer``, ``local_files_only=True``: never a hub download).

    Raises TokenizerError naming the directory when it has neither, or when transformers builds
    a tokenizer that does not tokenize like the directory's own ``tokenizer.json``.
    """
    source = Path(model_dir)
    if (source / TOKENIZER_FILE).exists():
        char = CharTokenizer.load(source)
        return CharModelTokenizer(source, char, _eos_ids(source, char.eos_token_id))
    present = [f for f in HF_TOKENIZER_FILES if (source / f).exists()]
    if not present:
        # Checked here: for a qwen2 config without tokenizer files, AutoTokenizer returns a tokenizer
        # with an empty vocabulary instead of failing.
        raise TokenizerError(f"model dir {source} has no tokenizer: neither {TOKENIZER_FILE} nor a Hugging Face "
                             f"tokenizer ({', '.join(HF_TOKENIZER_FILES)}); save one beside the weights "
                             "(tokenizer.save_pretrained(dir))")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is the directory's tokenizer's
        raise TokenizerError(f"model dir {source}: its Hugging Face tokenizer ({', '.join(present)}) does not load: "
                             f"{type(e).__name__}: {e}") from e
    _check_agrees_with_tokenizer_json(source, hf)
    return HFModelTokenizer(source, hf, _eos_ids(source, hf.eos_token_id))


def _check_agrees_with_tokenizer_json(source: Path, hf) -> None:
    """transformers 5 may rebuild a tokenizer from its model type's class (vocab and merges kept,
    pre-tokenizer replaced) instead of loading tokenizer.json as saved: refuse when that changes
    the token ids, rather than train on a tokenization the model never saw."""
    path = source / "tokenizer.json"
    if not path.exists():
        return
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(path)).encode(AGREEMENT_PROBE, add_special_tokens=False).ids
    loaded = list(hf.encode(AGREEMENT_PROBE, add_special_tokens=False))
    if saved != loaded:
        raise TokenizerError(f"model dir {source}: transformers' AutoTokenizer builds a {type(hf).__name__} that "
                             f"tokenizes differently from the directory's {path.name} ({loaded[:8]} vs {saved[:8]} "
                             f"for {AGREEMENT_PROBE[:24]!r}); training on its ids would feed the model text it was "
                             f"not trained on. Use the tokenizer the model was trained with, saved so that "
                             f"{type(hf).__name__} reproduces it")


def _eos_ids(source: Path, tokenizer_eos: int | None) -> tuple[int, ...]:
    """Every EOS id the model directory names, in order: generation_config.json (an int or a
    list), config.json, then the tokenizer's; duplicates dropped."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = source / name
        if path.exists():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids += [value] if isinstance(value, int) else list(value or [])
    if tokenizer_eos is not None:
        ids.append(tokenizer_eos)
    return tuple(dict.fromkeys(int(i) for i in ids))
