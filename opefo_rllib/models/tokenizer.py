"""A character-level tokenizer for the tiny default model.

Token ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then one id per character of the vocabulary.
The engines and the learner exchange token ids only, so no Hugging Face tokenizer quirk
(transformers 5.x rebuilding a byte-level BPE for a qwen2 folder) can change what is scored.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

__all__ = ["CharTokenizer", "TOKENIZER_FILE"]

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
