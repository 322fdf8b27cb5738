"""Checkpoints of an `opefo train` run: atomic, never overwritten, resumed honestly.

Layout of a run directory:

    RUN/checkpoints/iter_000050/      one complete checkpoint (RLlib state, hf_policy/, opefo_run.json)
    RUN/checkpoints/latest            the name of the newest complete checkpoint
    RUN/tensorboard/                  event files
    RUN/branches/<name>/              a run resumed from an older checkpoint continues here

A checkpoint is written into ``checkpoints/.tmp-iter_NNNNNN-<pid>``, flushed to disk, and renamed
into place: the rename is the commit, so a directory named ``iter_*`` is always whole, and a save
killed half-way leaves only a ``.tmp-*`` directory that ``--resume`` refuses and the next save
removes. ``opefo_run.json`` (written last, before the rename) records the run's resolved config,
which a resume compares with the new command's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "ResumePlan", "save_checkpoint", "plan_resume", "latest_checkpoint", "RUN_FILE",
           "SAFE_ON_RESUME"]

RUN_FILE = "opefo_run.json"
LATEST = "latest"
FORMAT = 2
# Keys a resumed run may change: how long it runs, where and how often it logs, saves and
# evaluates, which sets it evaluates, and timeouts. Anything else (model, env, batch shape, objective, optimiser) would make the resumed
# run a different experiment, so it is refused naming the field.
SAFE_ON_RESUME = frozenset({
    "iterations", "checkpoint_every", "keep_checkpoints", "max_failures", "logdir", "ray", "base", "tensorboard_dir", "log_text_every",
    "num_text_samples", "export_hf_on_checkpoint", "stall_timeout_s", "generate_timeout_s", "weight_sync_timeout_s",
    "resource_wait_timeout_s", "learner_timeout_s", "eval_every", "eval_before_train", "eval_tasks",
})


class CheckpointError(Exception):
    """A checkpoint that cannot be written, or resumed from; the message says which and why."""


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_finite(weights: dict) -> None:
    import torch

    bad = [name for name, t in weights.items() if torch.is_floating_point(t) and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"refusing to checkpoint non-finite weights ({len(bad)} tensors, e.g. {bad[0]!r})")


def save_checkpoint(algo, run_dir: Path, iteration: int, run_config: dict[str, Any], keep: int = 0) -> Path:
    """Write ``run_dir/checkpoints/iter_<iteration>`` atomically and point ``latest`` at it; then,
    ``keep`` > 0, remove all but the ``keep`` newest complete checkpoints (after ``latest`` moved,
    so a crash while removing leaves the newest whole).

    Refuses to overwrite an existing checkpoint and to save non-finite weights."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"iter_{iteration:06d}"
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists; checkpoints are never overwritten")
    for stale in ckpt_root.glob(".tmp-*"):  # a save that was killed half-way
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    _check_finite(algo.policy_weights())
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    algo.save_to_path(str(tmp))
    if algo.config.export_hf_on_checkpoint:
        algo.export_policy(str(tmp / "hf_policy"))
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    (tmp / RUN_FILE).write_text(json.dumps({
        "format": FORMAT, "complete": True, "iteration": iteration, "saved_at": time.time(),
        "config": _jsonable(run_config), "files": files}, indent=1))
    _fsync_tree(tmp)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    _write_atomic(ckpt_root / LATEST, final.name + "\n")
    if keep > 0:
        complete = sorted((p for p in ckpt_root.glob("iter_*") if p.is_dir()), key=lambda p: _iteration_of(p.name))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data, default=list))


def _iteration_of(name: str) -> int:
    return int(name.split("_")[-1])


@dataclasses.dataclass
class ResumePlan:
    """Where a resumed run continues and with which config."""

    checkpoint: Path
    iteration: int
    run_dir: Path
    config: dict[str, Any]
    branched: bool


def _open(path: str | os.PathLike) -> tuple[Path, dict]:
    ckpt = Path(path).expanduser().resolve()
    if not ckpt.is_dir():
        raise CheckpointError(f"--resume {path}: no such checkpoint directory")
    if ckpt.name.startswith(".tmp-"):
        raise CheckpointError(f"--resume {path}: an incomplete checkpoint (its save was interrupted)")
    run_file = ckpt / RUN_FILE
    if not run_file.is_file():
        raise CheckpointError(f"--resume {path}: not a complete opefo checkpoint (no {RUN_FILE})")
    try:
        info = json.loads(run_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"--resume {path}: {RUN_FILE} is not valid JSON ({e})") from None
    if info.get("format") != FORMAT or not info.get("complete"):
        raise CheckpointError(f"--resume {path}: written by an older opefo-rllib or incomplete "
                              f"({RUN_FILE} format {info.get('format')!r}); it cannot be resumed")
    missing = [f for f in info.get("files", []) if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(f"--resume {path}: incomplete, {len(missing)} files missing (e.g. {missing[0]})")
    return ckpt, info


def plan_resume(path: str | os.PathLike, new_config: dict[str, Any] | None, overrides: dict[str, Any],
                logdir: str | None) -> ResumePlan:
    """Check a checkpoint and the new command against it.

    Args:
        path: the checkpoint directory given to ``--resume``.
        new_config: the merged ``--config`` files of the new command (None: the checkpoint's config).
        overrides: the new command's ``--set`` values (already parsed).
        logdir: the new command's ``--logdir`` (None: continue where the checkpoint lives).

    The run directory is taken from the checkpoint's location (a moved run resumes). A checkpoint
    older than its run's ``latest`` continues in a new branch (``RUN/branches/from_iter_N-<time>``),
    never over the newer checkpoints or TensorBoard steps. A change of a key outside
    ``SAFE_ON_RESUME`` is refused, naming the key.
    """
    ckpt, info = _open(path)
    saved = info["config"]
    config = dict(saved if new_config is None else new_config)
    config.update(overrides)
    config = _jsonable(config)
    for key in sorted(set(saved) | set(config)):
        if key in SAFE_ON_RESUME:
            continue
        if saved.get(key) != config.get(key):
            raise CheckpointError(f"--resume {path}: config field {key!r} = {config.get(key)!r} differs from the "
                                  f"checkpoint's {saved.get(key)!r}; only {sorted(SAFE_ON_RESUME)} may change "
                                  "when resuming")
    iteration = int(info["iteration"])
    run_dir = ckpt.parent.parent
    latest = ckpt.parent / LATEST
    newest = _iteration_of(latest.read_text().strip()) if latest.is_file() else iteration
    branched = False
    if logdir:
        run_dir = Path(logdir).expanduser().resolve()
    elif newest > iteration:
        run_dir = run_dir / "branches" / f"from_{ckpt.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        branched = True
    config["logdir"] = str(run_dir)
    if int(config.get("iterations") or 0) <= iteration:
        raise CheckpointError(f"--resume {path}: the checkpoint is at iteration {iteration} and iterations = "
                              f"{config.get('iterations')}; raise it with --set iterations=N")
    return ResumePlan(ckpt, iteration, run_dir, config, branched)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if pointer.is_file():
        path = pointer.parent / pointer.read_text().strip()
        return path if path.is_dir() else None
    return None

