"""``opefo study``: a grid of run configs x seeds, each one ``opefo train`` in its own process.

A study file names the runs, the seeds and the length of every run:

    base: [tiny_cpu]                     # configs applied to every run (optional)
    set: {eval_every: 100}               # --set values applied to every run (optional)
    runs:
      grpo_strict: {config: [overlays/grpo_strict]}
      opefo_closed_loop: {set: {balance_mode: closed_loop}}
    seeds: [0, 1, 2]
    iterations: 500
    order: seed                          # optional: every run's seed 0 first, then seed 1, ...;
                                         # default "run": each run's seeds one after the other

Run (NAME, S) is ``opefo train --config BASE... --config CONFIG... --set KEY=VALUE...
--set seed=S --set iterations=N --logdir OUT/NAME/seed_S``. A config is a file (relative to the
study file, or to the current directory) or the name of a shipped config.

The study is resumable, one run at a time (``study_state.run_state``): a done run is not run
again, a resumable one runs the same command with ``--resume`` its latest checkpoint, a restart
(an attempt without a checkpoint) is moved to OUT/.attempts/ and starts again, a new one starts.

A run that fails is reported (exit status and the last lines of its stderr) and the others go
on; the study then exits with status 1. Each run's output goes to RUN/train.log and
RUN/train.stderr.log. At the end ``study_report.write_report`` writes OUT/results.md and
OUT/curves.png from the run files only.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from opefo_rllib.config import ConfigError
from opefo_rllib.run_config import (ConfigNotFound, apply_overrides, default_config, load_run_config, resolve_config,
                                   shipped_configs)
from opefo_rllib.study_state import DONE_FILE, RunState, run_state

__all__ = ["Study", "StudyRun", "RunState", "load_study", "run_state", "train_command", "run_study", "DONE_FILE"]

STDOUT_LOG, STDERR_LOG = "train.log", "train.stderr.log"
STUDY_KEYS = ("runs", "seeds", "iterations", "base", "set", "order")
ORDERS = ("run", "seed")  # the grid's order: run by run, or seed by seed (a study stopped early has every run)
RUN_KEYS = ("config", "set")
SET_BY_THE_STUDY = ("seed", "iterations", "logdir")  # from seeds:, iterations: and the run's directory
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One (run name, seed) of a study: its configs, its --set values and its directory."""

    name: str
    seed: int
    configs: tuple[Path, ...]
    sets: tuple[tuple[str, Any], ...]

    def run_dir(self, out: Path) -> Path:
        return out / self.name / f"seed_{self.seed}"


@dataclasses.dataclass
class Study:
    """A parsed study file."""

    path: Path
    runs: dict[str, tuple[tuple[Path, ...], dict[str, Any]]]  # name -> (configs, --set values)
    seeds: list[int]
    iterations: int
    order: str = "run"

    def grid(self) -> list[StudyRun]:
        """Every (run, seed): run by run in the file's order, or (``order: seed``) every run's
        first seed, then every run's second seed, ..."""
        runs = [StudyRun(name, seed, configs, tuple(sets.items()))
                for name, (configs, sets) in self.runs.items() for seed in self.seeds]
        return sorted(runs, key=lambda r: self.seeds.index(r.seed)) if self.order == "seed" else runs


# ------------------------------------------------------------------ the study file

def _fail(where: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: {what}")


def _check_keys(data: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            raise _fail(where, f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; a study has {', '.join(allowed)}")


def _as_list(value: Any, where: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [value]
    if isinstance(value, list):
        return value
    raise _fail(where, f"expected a list, got {type(value).__name__}")


def _resolve_config(name: str, study_dir: Path, where: str) -> Path:
    """A config of the study: a file beside the study file, a path, or a shipped config name."""
    for candidate in (study_dir / name, study_dir / f"{name}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    try:
        return resolve_config(name).resolve()
    except ConfigNotFound as e:
        raise _fail(where, str(e)) from None


def _set_value(value: Any) -> str:
    """A value as ``--set`` text (YAML): bare when it reads back the same, else JSON (valid YAML)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _set_mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, f"expected a mapping of config keys, got {type(value).__name__}")
    for key in value:
        if key in SET_BY_THE_STUDY:
            raise _fail(where, f"{key!r} is set by the study (seeds:, iterations: and OUT/NAME/seed_S); remove it")
    return dict(value)


def _find_study(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    stem = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    for shipped in (shipped_configs() / stem, shipped_configs() / "studies" / stem):
        if shipped.is_file():
            return shipped
    raise ConfigError(f"study {name}: no such file, and no shipped study of that name "
                      f"(shipped: {', '.join(sorted(p.stem for p in (shipped_configs() / 'studies').glob('*.yaml')))})")


def load_study(name: str | os.PathLike) -> Study:
    """Read and check a study file (a path, or a shipped study such as ``studies/entropy_rules``).

    Every run's configs and --set keys are checked as ``opefo train`` would (an unknown key or a
    missing file is a ConfigError naming the run), before anything starts."""
    path = _find_study(str(name))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _fail(str(path), f"invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise _fail(str(path), "a study is a mapping with runs:, seeds: and iterations:")
    _check_keys(data, STUDY_KEYS, str(path))
    for key in ("runs", "seeds", "iterations"):
        if key not in data:
            raise _fail(str(path), f"missing {key}:")
    iterations = data["iterations"]
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise _fail(str(path), f"iterations: {iterations!r}: must be an integer >= 1")
    seeds = _as_list(data["seeds"], f"{path}: seeds")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise _fail(str(path), f"seeds: {data['seeds']!r}: must be distinct integers >= 0, at least one")
    order = data.get("order", "run")
    if order not in ORDERS:
        raise _fail(str(path), f"order: {order!r}: must be one of {', '.join(ORDERS)}")
    if not isinstance(data["runs"], dict) or not data["runs"]:
        raise _fail(str(path), "runs: must map each run's name to {config: [...], set: {...}}")
    base = [_resolve_config(str(c), path.parent, f"{path}: base") for c in _as_list(data.get("base"), f"{path}: base")]
    common = _set_mapping(data.get("set"), f"{path}: set")
    runs = {}
    for run_name, spec in data["runs"].items():
        where = f"{path}: run {run_name!r}"
        if not isinstance(run_name, str) or not _NAME.match(run_name):
            raise _fail(where, "a run's name is its directory: letters, digits, '_', '-', '.'")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise _fail(where, "expected {config: [...], set: {...}}")
        _check_keys(spec, RUN_KEYS, where)
        configs = base + [_resolve_config(str(c), path.parent, where) for c in _as_list(spec.get("config"), where)]
        if not configs:
            configs = [default_config()]  # what `opefo train` runs without --config
        sets = {**common, **_set_mapping(spec.get("set"), f"{where}: set")}
        try:
            apply_overrides(load_run_config(configs), [f"{k}={_set_value(v)}" for k, v in sets.items()])
        except ConfigError as e:
            raise _fail(where, str(e)) from None
        runs[run_name] = (tuple(configs), sets)
    return Study(path, runs, list(seeds), iterations, order)


# ------------------------------------------------------------------ one run

def train_command(run: StudyRun, out: Path, iterations: int, resume: Path | None = None) -> list[str]:
    """The ``opefo train`` command of a run: a fresh start in its directory, or ``--resume``
    from a checkpoint with the same configs and values (a resume checks them against it)."""
    cmd = [sys.executable, "-m", "opefo_rllib.cli", "train"]
    for config in run.configs:
        cmd += ["--config", str(config)]
    for key, value in run.sets:
        cmd += ["--set", f"{key}={_set_value(value)}"]
    cmd += ["--set", f"seed={run.seed}", "--set", f"iterations={iterations}"]
    return cmd + (["--resume", str(resume)] if resume is not None else ["--logdir", str(run.run_dir(out))])


def _tail(path: Path, offset: int, lines: int = 8) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class _Job:
    """One running ``opefo train``: its process, log files and where its stderr began."""

    def __init__(self, run: StudyRun, out: Path, iterations: int, state: RunState):
        self.run, self.state = run, state
        self.run_dir = run.run_dir(out)
        if state.kind == "restart":  # an attempt without a checkpoint: keep it aside, start clean
            aside = out / ".attempts" / f"{run.name}-seed_{run.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.run_dir), str(aside))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / DONE_FILE).unlink(missing_ok=True)
        self.command = train_command(run, out, iterations, state.checkpoint if state.kind == "resumable" else None)
        header = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(self.command)}\n"
        self.stdout = open(self.run_dir / STDOUT_LOG, "a")
        self.stderr = open(self.run_dir / STDERR_LOG, "a")
        for f in (self.stdout, self.stderr):
            f.write(header)
            f.flush()
        self.stderr_from = self.stderr.tell()
        self.started = time.time()
        self.proc = subprocess.Popen(self.command, stdout=self.stdout, stderr=self.stderr, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def finish(self, iterations: int) -> int:
        code = self.proc.wait()
        self.stdout.close()
        self.stderr.close()
        if code == 0:
            (self.run_dir / DONE_FILE).write_text(json.dumps({
                "iterations": iterations, "seconds": round(time.time() - self.started, 1),
                "command": self.command}, indent=1) + "\n")
        return code

    def stderr_tail(self) -> str:
        return _tail(self.run_dir / STDERR_LOG, self.stderr_from)


def _label(run: StudyRun) -> str:
    return f"{run.name} seed {run.seed}"


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def _print_plan(study: Study, out: Path, states: list[tuple[StudyRun, RunState]]) -> None:
    counts = {k: sum(s.kind == k for _, s in states) for k in ("done", "resumable", "restart", "new")}
    print(f"opefo study: {study.path.name}: {len(study.runs)} runs x {len(study.seeds)} seeds, "
          f"{study.iterations} iterations each, in {out}")
    print("  " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    for run, state in states:
        what = {"done": "done", "new": "new", "restart": "restart (an attempt without a checkpoint)",
                "resumable": f"resume from {state.checkpoint.name if state.checkpoint else '?'}"}[state.kind]
        print(f"  {_label(run):<32} {what}")
        if state.kind != "done":
            print(f"    {shlex.join(train_command(run, out, study.iterations, state.checkpoint))}")


# ------------------------------------------------------------------ the study

def run_study(study: Study, out: Path, parallel: int = 1, dry_run: bool = False, report_only: bool = False) -> int:
    """Run every unfinished (run, seed), ``parallel`` at a time, then write OUT/results.md.

    Returns 0 when every run is done, 1 when one failed (the others still ran), 130 on Ctrl-C
    (the runs stop; the same command resumes them)."""
    from opefo_rllib.study_report import write_report

    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: must be >= 1")
    out = Path(out).expanduser().resolve()
    states = [(run, run_state(run.run_dir(out), study.iterations)) for run in study.grid()]
    if dry_run:
        _print_plan(study, out, states)
        return 0
    failed: list[tuple[StudyRun, int, str]] = []
    if not report_only:
        failed = _execute(study, out, [(r, s) for r, s in states if s.kind != "done"], parallel)
        if failed is None:
            return 130
    report = write_report(out, {name: [out / name / f"seed_{s}" for s in study.seeds] for name in study.runs},
                          study.iterations, title=study.path.name)
    figure = report.with_name("curves.png")
    print(f"wrote {report}" + (f" and {figure}" if figure.is_file() else " (no curves yet)"))
    if failed:
        print(f"opefo study: {len(failed)} of {len(states)} runs failed:", file=sys.stderr)
        for run, code, tail in failed:
            print(f"  {_label(run)}: exit status {code}; log {run.run_dir(out) / STDERR_LOG}", file=sys.stderr)
            for line in tail.splitlines():
                print(f"    | {line}", file=sys.stderr)
        return 1
    return 0


def _execute(study: Study, out: Path, todo: list[tuple[StudyRun, RunState]], parallel: int):
    """Run ``todo``, ``parallel`` at a time; the failed runs, or None after Ctrl-C."""
    done_before = len(study.grid()) - len(todo)
    print(f"opefo study: {study.path.name}: {len(todo)} to run ({done_before} done already), "
          f"{parallel} at a time, in {out}", flush=True)
    pending, running, failed, finished = list(todo), [], [], 0
    try:
        while pending or running:
            while pending and len(running) < parallel:
                run, state = pending.pop(0)
                job = _Job(run, out, study.iterations, state)
                how = f"resume from {state.checkpoint.name}" if state.kind == "resumable" else state.kind
                print(f"  start  {_label(run)} ({how})", flush=True)
                running.append(job)
            time.sleep(0.5)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                code = job.finish(study.iterations)
                finished += 1
                took = _fmt_s(time.time() - job.started)
                if code == 0:
                    print(f"  done   {_label(job.run)} in {took} [{finished}/{len(todo)}]", flush=True)
                else:
                    tail = job.stderr_tail()
                    failed.append((job.run, code, tail))
                    last = tail.splitlines()[-1] if tail else "(no stderr)"
                    print(f"  FAILED {_label(job.run)}: exit status {code} after {took}: {last} "
                          f"[{finished}/{len(todo)}]", flush=True)
    except KeyboardInterrupt:
        for job in running:  # Ctrl-C reached them too (same process group); give them time to stop
            try:
                job.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()
            job.stdout.close()
            job.stderr.close()
        print("opefo study: interrupted; run the same command again to resume", file=sys.stderr)
        return None
    return failed
