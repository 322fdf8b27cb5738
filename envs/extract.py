"""Pull a final answer out of an untrusted model response, without evaluating anything.

Extractors are tried in a configurable order; the first that finds something wins:

    "boxed"        content of the last \\boxed{...} (or \\fbox{...}), braces balanced
    "hash"         text after the last "####" on its line (GSM8K style)
    "answer_is"    text after the last "the answer is" / "answer:" (case-insensitive)
    "last_number"  the last number in the text (thousands separators allowed)

Everything here is linear-time string scanning or simple regular expressions, so a
hostile response cannot make extraction slow.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

__all__ = ["EXTRACTORS", "DEFAULT_ORDER", "extract_answer", "sanitize_text", "normalize_number"]

DEFAULT_ORDER = ("boxed", "hash", "answer_is", "last_number")

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:)\s*:?\s*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SCI = re.compile(r"^(-?\d+(?:\.\d+)?)[eE]([+-]?\d+)$")


def sanitize_text(text: object, max_chars: int | None = None) -> str:
    """Make any model output a safe str: replace lone surrogates, keep the last max_chars."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    text = text.encode("utf-8", "replace").decode("utf-8")
    if max_chars is not None and len(text) > max_chars:
        text = text[-max_chars:]  # the final answer is at the end
    return text


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def _hash(text: str) -> str | None:
    found = _HASH.findall(text)
    return found[-1].strip() or None if found else None


def _answer_is(text: str) -> str | None:
    found = _ANSWER_IS.findall(text)
    if not found:
        return None
    ans = found[-1].strip().rstrip(".").strip()
    if ans.startswith("$") and ans.endswith("$") and len(ans) > 1:
        ans = ans.strip("$").strip()
    return ans or None


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": _last_boxed,
    "hash": _hash,
    "answer_is": _answer_is,
    "last_number": _last_number,
}


def extract_answer(text: str, order: Sequence[str] = DEFAULT_ORDER) -> tuple[str | None, str | None]:
    """Return (answer, name of the extractor that found it), or (None, None)."""
    for name in order:
        try:
            fn = EXTRACTORS[name]
        except KeyError:
            raise ValueError(f"unknown answer extractor {name!r}; choose from {sorted(EXTRACTORS)}") from None
        ans = fn(text)
        if ans:
            return ans, name
    return None, None


def normalize_number(ans: str) -> str:
    """Plain-number spellings that math-verify reads differently: 1,000 -> 1000; 2.5e-6 -> LaTeX."""
    s = ans.strip()
    if _THOUSANDS.match(s):
        return s.replace(",", "")
    m = _SCI.match(s)
    if m:
        return f"{m.group(1)}\\times 10^{{{int(m.group(2))}}}"
    return s
