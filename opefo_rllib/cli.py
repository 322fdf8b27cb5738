"""The ``opefo`` command.

    opefo train [--config FILE ...] [--set key=value ...] [--resume DIR] [--logdir DIR]
    opefo envs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


def _default_config() -> Path:
    """configs/tiny_cpu.yaml of the source checkout (the README installs it editable)."""
    if not DEFAULT_CONFIG.exists():
        from opefo_rllib.run_config import ConfigError

        raise ConfigError(f"default config {DEFAULT_CONFIG} not found (not a source checkout?); pass --config FILE")
    return DEFAULT_CONFIG


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m}m{s:02d}s"


def cmd_train(args: argparse.Namespace) -> int:
    from opefo_rllib.run_config import ConfigError, apply_overrides, build_algo_config, load_run_config

    try:
        data = load_run_config(args.config or [_default_config()])
        data = apply_overrides(data, args.set or [])
        if args.logdir:
            data["logdir"] = args.logdir
        config = build_algo_config(data)
    except ConfigError as e:
        print(f"opefo train: {e}", file=sys.stderr)
        return 2
    iterations = int(data["iterations"])
    every = int(data.get("checkpoint_every") or 0)
    logdir = Path(data["logdir"] or Path("opefo_runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if args.resume:
        state = json.loads((Path(args.resume) / "opefo_run.json").read_text())
        logdir = Path(state["logdir"])
    logdir.mkdir(parents=True, exist_ok=True)
    config.tensorboard_dir = str(logdir / "tensorboard")

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, single-user cluster
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **(data.get("ray") or {}))
    import opefo_rllib  # noqa: F401  (registers the algorithms)

    print(f"opefo train: {data['algorithm']} on {config.env} with {config.model_path}, {iterations} iterations")
    print(f"  logs:        {logdir}")
    print(f"  TensorBoard: tensorboard --logdir {logdir / 'tensorboard'}")
    if args.resume:
        from ray.rllib.algorithms.algorithm import Algorithm

        algo = Algorithm.from_checkpoint(str(Path(args.resume).resolve()))
        print(f"  resumed from {args.resume} at iteration {algo.iteration}")
    else:
        algo = config.build_algo()
    start, first_iter = time.time(), algo.iteration
    try:
        while algo.iteration < iterations:
            result = algo.train()
            i = algo.iteration
            done = i - first_iter
            eta = (time.time() - start) / max(done, 1) * (iterations - i)
            print(f"  iter {i:4d}/{iterations}  reward {result.get('rollout/reward_mean', float('nan')):.3f}  "
                  f"entropy {result.get('policy/entropy', float('nan')):.3f}  "
                  f"lambda {result.get('entropy_flow/lambda', float('nan')):+.3f}  "
                  f"{result.get('time/step_s', 0):.2f}s/it  left {_fmt_eta(eta)}", flush=True)
            if (every and i % every == 0) or i == iterations:
                ckpt = logdir / "checkpoints" / f"iter_{i:06d}"
                algo.save_to_path(str(ckpt))
                algo.export_policy(str(ckpt / "hf_policy"))
                (ckpt / "opefo_run.json").write_text(json.dumps({"logdir": str(logdir), "iteration": i}))
                print(f"  checkpoint:  {ckpt}")
    finally:
        algo.stop()
        ray.shutdown()
    print(f"done in {_fmt_eta(time.time() - start)}; view: tensorboard --logdir {logdir / 'tensorboard'}")
    return 0


def cmd_envs(args: argparse.Namespace) -> int:
    from opefo_rllib.envs import list_envs

    for name in list_envs():
        print(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opefo", description="OPEFO / GRPO training of language models on RLlib")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train (default: configs/tiny_cpu.yaml, OPEFO on arithmetic, CPU)")
    train.add_argument("--config", action="append", help="YAML run config; repeat to overlay")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (value is YAML)")
    train.add_argument("--resume", metavar="DIR", help="checkpoint directory to resume from")
    train.add_argument("--logdir", help="where logs, TensorBoard files and checkpoints go")
    train.set_defaults(func=cmd_train)
    envs = sub.add_parser("envs", help="list the registered environments")
    envs.set_defaults(func=cmd_envs)
    args = parser.parse_args(argv)
    if args.version:
        from opefo_rllib import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
