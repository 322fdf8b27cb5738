"""Evaluation output: ``{"model", "config", "results": {NAME: metrics}}`` as JSON, the
per-problem records as JSONL beside it, and a table for the terminal."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from opefo_rllib.evaluation.runner import TaskReport

__all__ = ["records_path", "write_report", "format_table", "scalar_metrics"]

# Columns of the terminal table, in this order when present (pass@k and friends are matched by prefix).
_COLUMNS = ("num_problems", "samples", "greedy_acc", "avg@", "pass@", "maj@", "response_length_mean",
            "truncated_frac", "format_ok_frac")


# Sizes and bookkeeping: in the JSON, not worth a TensorBoard curve.
_NOT_CURVES = ("num_problems", "samples", "excluded_training_draws", "seconds")


def records_path(out: str | Path) -> Path:
    """Where the per-problem records of ``out`` (FILE.json) go: FILE.problems.jsonl."""
    out = Path(out)
    return out.with_name(out.stem + ".problems.jsonl")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader never sees half a report


def write_report(out: str | Path, model: str, config: dict[str, Any], reports: Sequence[TaskReport]) -> Path:
    """Write ``out`` (JSON) and its records JSONL (one line per problem, with its set's name)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"dataset": r.name, **rec}) for r in reports for rec in r.records]
    _write_atomic(records_path(out), "".join(line + "\n" for line in lines))
    body = {"model": model, "config": config, "results": {r.name: r.metrics for r in reports}}
    _write_atomic(out, json.dumps(body, indent=1, default=str) + "\n")
    return out


def scalar_metrics(reports: Sequence[TaskReport], prefix: str = "eval") -> dict[str, float]:
    """``{prefix/NAME/metric: value}`` for every numeric metric (the TensorBoard scalars)."""
    return {f"{prefix}/{r.name}/{k}": float(v) for r in reports for k, v in r.metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_CURVES}


def _cell(value: Any) -> str:
    if isinstance(value, list):  # a confidence interval
        return "[" + ", ".join(f"{v:.3f}" for v in value) + "]"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def format_table(reports: Sequence[TaskReport]) -> str:
    """A markdown table: one row per problem set, the metrics as columns."""
    keys: list[str] = []
    for col in _COLUMNS:
        for r in reports:
            for k in r.metrics:
                if (k == col or (col.endswith("@") and k.startswith(col))) and k not in keys:
                    keys.append(k)
    rows = ["| set | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in reports:
        rows.append(f"| {r.name} | " + " | ".join(_cell(r.metrics.get(k, "")) for k in keys) + " |")
    return "\n".join(rows)
