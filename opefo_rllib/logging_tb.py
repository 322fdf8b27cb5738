"""TensorBoard output of a run: scalars, the delta histogram, prompt/response/reward samples.

Written by the Algorithm itself, so a plain ``algo.train()`` loop gets event files too (RLlib
writes none outside Tune); under Tune the directory is the trial's logdir.
"""

from __future__ import annotations

import html
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    def __init__(self, logdir: str, purge_step: int | None = None):
        """``purge_step``: a resumed run's first step; events at or after it from an earlier,
        interrupted writer are hidden, so no step has two values."""
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = str(logdir)
        self.writer = SummaryWriter(self.logdir, purge_step=purge_step)

    def scalars(self, metrics: Mapping[str, Any], step: int) -> None:
        # NaN and inf are written as they are (TensorBoard shows them): a diverging run must
        # show on its curves, not vanish from them.
        for tag, value in metrics.items():
            if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, float(value), step)

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        if len(values):
            self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), step)

    def samples(self, rollouts: Sequence[Any], step: int) -> None:
        rows = ["| prompt | response | reward |", "|---|---|---|"]
        for r in rollouts:
            cells = [html.escape(x).replace("|", "\\|").replace("\n", " ")[:500] for x in (r.prompt_text, r.response_text)]
            rows.append(f"| {cells[0]} | {cells[1]} | {r.reward:g} |")
        self.writer.add_text("samples", "\n".join(rows), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
