"""The async pipeline's batch ahead in a checkpoint: ``env_runner/batch_ahead.json``.

Under ``pipeline: async`` a checkpoint falls between two iterations while the next batch is
already generated (with the weights before the last update). The env runner's state then holds
the counters after that batch's draw, and this record holds the batch itself: every rollout
(prompt and response token ids, sampling log-probs, reward, weight version, group id, masks,
texts, verifier flags) with the batch's counters and timings, so a resumed run trains on exactly
that batch once and goes on as the uninterrupted run would have. JSON (Python writes floats
exactly, and reads back the same values): nothing in it is code, unlike a pickle.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from opefo_rllib.rollout.batch import Rollout

__all__ = ["AHEAD_FILE", "RecordError", "to_record", "from_record", "write_record", "read_record"]

AHEAD_FILE = "batch_ahead.json"
FORMAT = 1
_FIELDS = tuple(f.name for f in dataclasses.fields(Rollout))


class RecordError(ValueError):
    """A batch-ahead record that cannot be read back; the message names the file and why."""


def to_record(rollouts: list[Rollout], metrics: dict[str, float], timings: dict[str, float]) -> dict[str, Any]:
    """A finished batch as plain JSON data."""
    # a shallow dict per rollout: dataclasses.asdict deep-copies every token list (10x slower)
    return {"format": FORMAT, "rollouts": [{name: getattr(r, name) for name in _FIELDS} for r in rollouts],
            "metrics": {k: float(v) for k, v in metrics.items()},
            "timings": {k: float(v) for k, v in timings.items()}}


def from_record(record: dict[str, Any], where: str = AHEAD_FILE) -> tuple[list[Rollout], dict, dict]:
    """(rollouts, metrics, timings) of a record written by :func:`to_record`."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise RecordError(f"{where}: not a batch-ahead record of format {FORMAT} (format {got!r})")
    rollouts = []
    for i, row in enumerate(record["rollouts"]):
        unknown = sorted(set(row) - set(_FIELDS))
        if unknown:
            raise RecordError(f"{where}: rollout {i} has fields {unknown} that a Rollout does not")
        rollouts.append(Rollout(**row))
    return rollouts, dict(record["metrics"]), dict(record["timings"])


def _filesystem(path: str | pathlib.Path, filesystem):
    """The pyarrow filesystem and the path in it, as RLlib's checkpoints resolve them."""
    if filesystem is not None:
        return filesystem, str(path)
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(str(path))


def write_record(directory: str | pathlib.Path, record: dict[str, Any], filesystem=None) -> None:
    """Write ``record`` as ``directory/batch_ahead.json``."""
    fs, root = _filesystem(directory, filesystem)
    with fs.open_output_stream(f"{root}/{AHEAD_FILE}") as f:
        f.write(json.dumps(record, separators=(",", ":")).encode())


def read_record(directory: str | pathlib.Path, filesystem=None) -> dict[str, Any] | None:
    """The record in ``directory`` (None: there is none)."""
    import pyarrow.fs

    fs, root = _filesystem(directory, filesystem)
    target = f"{root}/{AHEAD_FILE}"
    if fs.get_file_info(target).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(target) as f:
        try:
            return json.loads(f.read().decode())
        except ValueError as e:
            raise RecordError(f"{target}: not valid JSON ({e})") from None
