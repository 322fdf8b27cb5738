"""A chaos run: the default run trained while a killer SIGKILLs its engine and learner actors.

    python benchmarks/chaos.py                       # 60 iterations, a kill every 20-40 s
    python benchmarks/chaos.py --iterations 60 --every 20 40 --seed 0 --out chaos_runs

Two ``opefo train`` runs of the shipped default (configs/tiny_cpu.yaml) with the sync pipeline,
one remote learner (so there is a learner actor to kill) and a checkpoint every
``--checkpoint-every`` iterations: first undisturbed, then under a killer, a bounded loop that
every 20-40 s (uniform, seeded) picks one live engine or learner actor of that run (found by pid
under its supervisor: opefo_rllib/tools/run_processes.py) and SIGKILLs it, until the run ends or
``--max-kills``. An engine killed is restarted by the fleet within the iteration (its calls
resent with their seeds); a learner killed ends the driver, and the supervisor resumes the run
from its latest checkpoint (``max_failures``).

Prints the kills, the recoveries, the engine restarts, the time lost (the chaos run's wall time
less the undisturbed run's) and the largest difference between the two runs' curves (0: the
chaos run trained exactly what the undisturbed one did), and whether TensorBoard shows any step
twice. Both runs go through ``opefo train`` (where users see recovery); there is no in-process
variant: recovery is the command's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from opefo_rllib.evaluation.compare import curve_gaps, read_scalars, repeated_steps
from opefo_rllib.tools.run_processes import RunProcesses, kill


def run(out: Path, args: argparse.Namespace, chaos: bool) -> dict:
    cmd = [sys.executable, "-m", "opefo_rllib.cli", "train", "--logdir", str(out),
           "--set", f"iterations={args.iterations}", "--set", "pipeline=sync", "--set", "num_learners=1",
           "--set", f"checkpoint_every={args.checkpoint_every}", "--set", f"max_failures={args.max_failures}",
           "--set", f"seed={args.run_seed}", "--set", "ray={num_cpus: 3}"]
    start = time.time()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        kills: list[dict] = []
        done = threading.Event()
        killer = threading.Thread(target=_killer, args=(proc.pid, args, kills, done, start), daemon=True)
        if chaos:
            killer.start()
        returncode = proc.wait()
        done.set()
        if chaos:
            killer.join()
    wall = time.time() - start
    if returncode != 0:
        raise SystemExit(f"chaos: the {'chaos' if chaos else 'undisturbed'} run failed (exit {returncode}); "
                         f"see {out.with_suffix('.log')}")
    records = out / "recoveries.jsonl"
    scalars = read_scalars(out)
    restarts = scalars.get("fleet/engine_restarts", ([], []))[1]
    return {"wall_s": wall, "kills": kills, "engine_restarts": _increments(restarts),
            "recoveries": [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []}


def _increments(counter: list[float]) -> float:
    """What a per-driver cumulative counter added over the run: it restarts at 0 with each driver
    (a drop is a new driver's count). Steps a recovery re-ran show their second life only."""
    total, last = 0.0, 0.0
    for value in counter:
        total += value - last if value >= last else value
        last = value
    return total


def _killer(pid: int, args: argparse.Namespace, kills: list, done: threading.Event, start: float) -> None:
    """Every ``args.every`` seconds (uniform in the range), SIGKILL one live engine or learner of
    the run under ``pid``; stop when the run ends or after ``args.max_kills``."""
    rng, procs = random.Random(args.seed), RunProcesses(pid)
    while len(kills) < args.max_kills and not done.wait(rng.uniform(*args.every)):
        targets = procs.targets(("engine", "learner"))
        if not targets:
            continue  # between drivers: nothing of the run to kill yet
        kind, proc = rng.choice(targets)
        if kill(proc):
            kills.append({"at_s": round(time.time() - start, 1), "kind": kind, "pid": proc.pid})
            print(f"  kill {len(kills)}: {kind} pid {proc.pid} at {kills[-1]['at_s']} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--every", type=float, nargs=2, default=(20.0, 40.0), metavar=("LOW", "HIGH"),
                        help="seconds between kills, uniform in [LOW, HIGH] (default 20 40)")
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--max-failures", type=int, default=20, help="the run's max_failures (default 20)")
    parser.add_argument("--max-kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the killer's seed")
    parser.add_argument("--run-seed", type=int, default=0, help="the runs' seed")
    parser.add_argument("--out", default="chaos_runs", help="where both runs go (replaced)")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    for name in ("undisturbed", "chaos"):
        shutil.rmtree(root / name, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    print(f"undisturbed: {args.iterations} iterations of the default run (sync, 1 learner actor) ...", flush=True)
    calm = run(root / "undisturbed", args, chaos=False)
    print(f"  {calm['wall_s']:.0f} s")
    print(f"chaos: the same run, a kill every {args.every[0]:g}-{args.every[1]:g} s ...", flush=True)
    wild = run(root / "chaos", args, chaos=True)

    gaps = curve_gaps(root / "chaos", root / "undisturbed")
    twice = repeated_steps(root / "chaos")
    kinds = [k["kind"] for k in wild["kills"]]
    print(f"\nchaos run: {args.iterations} iterations, finished (exit 0)")
    print(f"  kills:            {len(kinds)} ({kinds.count('engine')} engine, {kinds.count('learner')} learner)")
    print(f"  recoveries:       {len(wild['recoveries'])} (driver restarts from the latest checkpoint)")
    print(f"  engine restarts:  {wild['engine_restarts']:.0f} (by the fleet, within an iteration; seen in "
          "TensorBoard's surviving steps)")
    print(f"  wall time:        {wild['wall_s']:.0f} s against {calm['wall_s']:.0f} s undisturbed: "
          f"{wild['wall_s'] - calm['wall_s']:.0f} s lost")
    print(f"  curves:           {len(gaps)} tags compared, largest difference {max(gaps.values(), default=0.0):g}"
          + ("" if not any(gaps.values()) else f" (differing: {[t for t, g in gaps.items() if g]})"))
    print(f"  TensorBoard:      {'each step once' if not twice else f'steps shown twice: {twice}'}")
    (root / "chaos.json").write_text(json.dumps({"args": vars(args), "undisturbed": calm, "chaos": wild,
                                                 "gaps": gaps, "repeated_steps": twice}, indent=1))
    print(f"wrote {root / 'chaos.json'}")


if __name__ == "__main__":
    main()
