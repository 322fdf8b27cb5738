"""Problem datasets: loaders for JSONL, Parquet, CSV and Hugging Face ``datasets``, and a
deterministically shuffled, checkpointable stream of problems.

A bad row (missing field, wrong type, empty answer, invalid JSON) raises ``DatasetError``
naming the file, the line (or row) and the field; with ``on_bad_row="skip"`` it is skipped
and recorded in ``LoadedProblems.skipped`` instead, with one warning logged per row.
Nothing disappears silently.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from opefo_rllib.envs.base import Problem

__all__ = ["DatasetError", "BadRow", "LoadedProblems", "load_problems", "ProblemDataset"]

FORMATS = ("jsonl", "parquet", "csv", "hf")
FINGERPRINT_VERSION = 2  # 1: ids only; 2: ids, problems and answers
DEFAULT_ID_FIELD = "id"  # optional in a file: rows without it are numbered "<stem>-<line>"

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A row of a dataset file is unusable; ``source``, ``line`` and ``field`` say where."""

    def __init__(self, source: str, line: int | None, field: str | None, message: str):
        where = f"{source}:{line}" if line is not None else source
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{message}")
        self.source, self.line, self.field = source, line, field


@dataclasses.dataclass(frozen=True)
class BadRow:
    source: str
    line: int
    field: str | None
    message: str


@dataclasses.dataclass
class LoadedProblems:
    problems: list[Problem]
    skipped: list[BadRow]

    def __len__(self) -> int:
        return len(self.problems)


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise DatasetError(str(path), None, None, f"cannot tell the format from suffix {suffix!r}; pass fmt= one of {FORMATS}")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, DatasetError(str(path), line_no, None, f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        for row in reader:
            yield reader.line_num, row


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet needs pyarrow: pip install 'opefo-rllib[data]'") from None
    for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield i, row


def _iter_hf(source: str, split: str) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise ImportError("Hugging Face datasets need the `datasets` package: pip install 'opefo-rllib[data]'") from None
    local = Path(source)
    if local.is_dir() and any((local / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(source)
    else:  # a local dataset script / data dir, or a hub name (needs a network)
        ds = datasets.load_dataset(source)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(source, None, None, f"no split {split!r}; splits: {sorted(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds, start=1):
        yield i, row


def _as_text(value: Any, source: str, line: int, field: str, allow_numbers: bool) -> str:
    if isinstance(value, str):
        text = value.strip()
    elif allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(value)
    else:
        kind = "missing" if value is None else f"wrong type {type(value).__name__}"
        raise DatasetError(source, line, field, f"{kind}; expected a string")
    if not text:
        raise DatasetError(source, line, field, "empty")
    return text


def _problem_id(row: dict, id_field: str | None, path: Path, name: str, line: int) -> str:
    """The row's id from ``id_field``, or "<stem>-<line>" (id_field None, or the default "id"
    column absent from the row: a user's own file need not number its problems)."""
    if id_field is None or (id_field == DEFAULT_ID_FIELD and id_field not in row):
        return f"{path.stem}-{line}"
    return _as_text(row.get(id_field), name, line, id_field, True)


def load_problems(
    source: str | os.PathLike,
    fmt: str | None = None,
    problem_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = DEFAULT_ID_FIELD,
    on_bad_row: str = "raise",
    split: str = "train",
    meta_fields: Iterable[str] | None = None,
    limit: int | None = None,
) -> LoadedProblems:
    """Load problems with reference answers from a file or a Hugging Face dataset.

    Args:
        source: a .jsonl / .parquet / .csv file, a ``save_to_disk`` directory, or a hub name.
        fmt: "jsonl", "parquet", "csv" or "hf" (default: from the suffix; directories are "hf").
        problem_field, answer_field: column names.
        id_field: column of the problem id. The default, "id", may be absent from a file: a row
            without that column gets "<stem>-<line>" (file stem and line or row number). Any other
            name is required in every row; None numbers every row "<stem>-<line>".
        on_bad_row: "raise" (DatasetError naming file, line, field) or "skip" (recorded in .skipped).
        split: split of a Hugging Face DatasetDict.
        meta_fields: other columns kept in ``Problem.meta`` (default: all other columns).
        limit: stop after this many good rows.
    """
    if on_bad_row not in ("raise", "skip"):
        raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
    path = Path(source)
    if fmt is None:
        fmt = _detect_format(path) if path.exists() else "hf"
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    name = str(source)
    if fmt != "hf" and not path.exists():
        raise FileNotFoundError(f"dataset file not found: {name}")
    rows = {"jsonl": _iter_jsonl, "csv": _iter_csv, "parquet": _iter_parquet}[fmt](path) if fmt != "hf" \
        else _iter_hf(name, split)
    keep = set(meta_fields) if meta_fields is not None else None
    problems: list[Problem] = []
    skipped: list[BadRow] = []
    for line, row in rows:
        try:
            if isinstance(row, DatasetError):
                raise row
            if not isinstance(row, dict):
                raise DatasetError(name, line, None, f"row is a {type(row).__name__}, expected an object")
            prompt = _as_text(row.get(problem_field), name, line, problem_field, allow_numbers=False)
            answer = _as_text(row.get(answer_field), name, line, answer_field, allow_numbers=True)
            pid = _problem_id(row, id_field, path, name, line)
        except DatasetError as e:
            if on_bad_row == "raise":
                raise
            skipped.append(BadRow(name, line, e.field, str(e)))
            log.warning("skipped bad dataset row (on_bad_row='skip'): %s", e)  # e names file:line and field
            continue
        meta = {k: v for k, v in row.items() if k not in (problem_field, answer_field, id_field)
                and (keep is None or k in keep)}
        problems.append(Problem(id=pid, prompt=prompt, answer=answer, meta=meta))
        if limit is not None and len(problems) >= limit:
            break
    return LoadedProblems(problems, skipped)


class ProblemDataset:
    """An endless, deterministically shuffled stream over a list of problems, checkpointable.

    Epoch e is the permutation drawn from ``seed + e``; ``state_dict()`` holds the epoch and the
    position within it, so a resumed run continues with the next unseen problem.
    """

    def __init__(self, problems: list[Problem], shuffle: bool = True, seed: int = 0):
        if not problems:
            raise ValueError("ProblemDataset needs at least one problem")
        self.problems, self.shuffle, self.seed = list(problems), shuffle, int(seed)
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.problems))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.problems))

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> "ProblemDataset":
        return self

    def __next__(self) -> Problem:
        if self.position >= len(self.problems):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        problem = self.problems[int(self._order[self.position])]
        self.position += 1
        return problem

    def take(self, n: int) -> list[Problem]:
        return [next(self) for _ in range(n)]

    def reseed(self, seed: int) -> None:
        """Start over (epoch 0, position 0) with a new shuffling seed."""
        self.seed, self.epoch, self.position = int(seed), 0, 0
        self._order = self._permutation(0)

    def fingerprint(self) -> str:
        """SHA-256 of every row's id, problem and answer, in order: an edited file (even one
        whose ids are line numbers) does not pass for the dataset a run was saved with."""
        h = hashlib.sha256()
        for p in self.problems:
            for text in (p.id, p.prompt, p.answer):
                data = text.encode("utf-8", "surrogatepass")
                h.update(len(data).to_bytes(8, "little"))  # length-prefixed: fields cannot run together
                h.update(data)
        return h.hexdigest()[:32]

    def _ids_fingerprint(self) -> str:
        """Version 1 (ids only), to resume checkpoints saved before contents were covered."""
        h = hashlib.sha1()
        for p in self.problems:
            h.update(p.id.encode("utf-8", "replace"))
            h.update(b"\0")
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "shuffle": self.shuffle,
                "size": len(self.problems), "fingerprint": self.fingerprint(),
                "fingerprint_version": FINGERPRINT_VERSION}

    def _saved_fingerprint_matches(self, state: dict) -> bool:
        if state.get("fingerprint_version", 1) >= FINGERPRINT_VERSION:
            return state["fingerprint"] == self.fingerprint()
        if state["fingerprint"] != self._ids_fingerprint():
            return False
        log.warning("ProblemDataset: resuming from a checkpoint whose fingerprint covers ids only; "
                    "problem and answer texts were not checked against it")
        return True

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "epoch", "position", "size", "fingerprint"):
            if key not in state:
                raise KeyError(f"ProblemDataset state is missing key {key!r}")
        if state["size"] != len(self.problems) or not self._saved_fingerprint_matches(state):
            raise ValueError(f"ProblemDataset state was saved for a different dataset "
                             f"(size {state['size']}, fingerprint {state['fingerprint']}; "
                             f"this one: size {len(self.problems)}, fingerprint {self.fingerprint()})")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self._order = self._permutation(self.epoch)
