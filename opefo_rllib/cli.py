"""The ``opefo`` command.

    opefo train  [--config FILE ...] [--set key=value ...] [--resume DIR] [--logdir DIR]
    opefo config [--config FILE ...] [--set key=value ...]
    opefo envs

Bad input (a config value, a missing file or directory, a bad dataset row) ends in one line
naming what is wrong and where, and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

def shipped_configs() -> Path:
    """The folder of the shipped run configs (package data of ``opefo_rllib.configs``)."""
    import importlib.resources

    return Path(str(importlib.resources.files("opefo_rllib.configs")))


def _default_config() -> Path:
    return shipped_configs() / "tiny_cpu.yaml"


def resolve_config(name: str) -> Path:
    """A ``--config`` value: a path, or the name of a shipped config (``tiny_cpu``,
    ``overlays/grpo_strict``, with or without ``.yaml``)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    shipped = shipped_configs() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(str(p.relative_to(shipped_configs()).with_suffix("")) for p in shipped_configs().rglob("*.yaml"))
    raise UserError(f"--config {name}: no such file, and no shipped config of that name (shipped: {', '.join(names)})")


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from opefo_rllib.checkpoints import CheckpointError
    from opefo_rllib.envs.datasets import DatasetError
    from opefo_rllib.run_config import ConfigError

    return UserError, ConfigError, DatasetError, CheckpointError


def _config_paths(args: argparse.Namespace) -> list[Path]:
    return [resolve_config(c) for c in args.config] if args.config else [_default_config()]


def _resolve(args: argparse.Namespace):
    """The merged run config and the validated algorithm config of ``--config`` / ``--set``,
    after a pre-flight check that the model directory and the env can be opened."""
    import logging

    from opefo_rllib.run_config import apply_overrides, build_algo_config, load_run_config

    logging.getLogger("ray.rllib.algorithms.algorithm_config").setLevel(logging.ERROR)  # "new API stack" notice
    data = apply_overrides(load_run_config(_config_paths(args)), args.set or [])
    config = build_algo_config(data)
    preflight(config)
    return data, config


def preflight(config) -> None:
    """Open what the run will open (the model directory, the env and its data files) and turn a
    failure into a ConfigError naming the field, before Ray starts."""
    from opefo_rllib.envs import make_env
    from opefo_rllib.envs.registry import import_env_modules
    from opefo_rllib.models.loading import resolve_model_path
    from opefo_rllib.run_config import ConfigError

    try:
        resolve_model_path(config.model_path)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError(f"config field 'model_path' = {config.model_path!r}: {e}") from None
    try:
        import_env_modules(config.imports)
        env = make_env(config.env, **dict(config.env_config or {}))
    except _user_errors():
        raise
    except Exception as e:  # noqa: BLE001 - any failure to build the env is the env config's fault
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(f"config field 'env' = {config.env!r} with env_config {dict(config.env_config or {})}: "
                          f"{type(e).__name__}: {msg}") from None
    close = getattr(env, "close", None)
    if close is not None:
        close()


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config, section by section, each field with its value and its doc."""
    from opefo_rllib.config import RLLIB_SECTION, RUN_SECTION, SECTIONS, markdown_table

    if args.markdown:
        print(markdown_table([RUN_SECTION, RLLIB_SECTION, *SECTIONS.values()]))
        return 0
    data, config = _resolve(args)
    print(f"# {type(config).__name__}: resolved from {', '.join(str(p) for p in _config_paths(args))}"
          + (f" with --set {' '.join(args.set)}" if args.set else ""))
    for section in [RUN_SECTION, RLLIB_SECTION, *SECTIONS.values()]:
        specs = section.fields()
        if not specs:
            continue
        print(f"\n[{section.name}]  {section.doc}")
        for f in specs:
            value = data.get(f.name, f.default) if section is RUN_SECTION else getattr(config, f.name)
            print(f"  {f.name:<26} = {value!r:<24} # {f.doc}")
    return 0


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m}m{s:02d}s"


def _train_setup(args: argparse.Namespace):
    """(run config, algorithm config, run directory, resume plan or None) of ``opefo train``."""
    from opefo_rllib.checkpoints import plan_resume
    from opefo_rllib.run_config import apply_overrides, build_algo_config, load_run_config

    if args.resume:
        plan = plan_resume(args.resume, load_run_config(_config_paths(args)) if args.config else None,
                           apply_overrides({}, args.set or []), args.logdir)
        config = build_algo_config(plan.config)
        preflight(config)
        return plan.config, config, plan.run_dir, plan
    data, config = _resolve(args)
    if args.logdir:
        data["logdir"] = args.logdir
    logdir = Path(data["logdir"] or Path("opefo_runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if (logdir / "checkpoints" / "latest").exists():
        raise UserError(f"{logdir} already holds a run's checkpoints; continue it with --resume "
                        f"{logdir / 'checkpoints' / '<iter_N>'} or choose another --logdir")
    data["logdir"] = str(logdir)
    return data, config, logdir, None


def cmd_train(args: argparse.Namespace) -> int:
    from opefo_rllib.checkpoints import latest_checkpoint, save_checkpoint

    data, config, logdir, plan = _train_setup(args)
    iterations = int(data["iterations"])
    every = int(data.get("checkpoint_every") or 0)
    logdir.mkdir(parents=True, exist_ok=True)
    config.tensorboard_dir = str(logdir / "tensorboard")

    import ray

    # Ray's token authentication stays on (its default): Ray 2.60's own servers listen on every
    # interface and the token is what guards them. A local run advertises loopback.
    ray_kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
                  **(data.get("ray") or {})}
    if "address" not in ray_kwargs:
        ray_kwargs.setdefault("_node_ip_address", "127.0.0.1")
    ray.init(**ray_kwargs)
    from opefo_rllib.algorithms.grpo.grpo import NonFiniteTrainingError

    print(f"opefo train: {data['algorithm']} on {config.env} with {config.model_path}, {iterations} iterations")
    print(f"  logs:        {logdir}")
    print(f"  TensorBoard: tensorboard --logdir {logdir / 'tensorboard'}")
    algo = config.build_algo()
    start = time.time()
    try:
        if plan is not None:
            algo.restore_from_path(str(plan.checkpoint))
            print(f"  resumed from {plan.checkpoint} at iteration {algo.iteration}"
                  + (" (an older checkpoint: this run continues in a new branch)" if plan.branched else ""))
        first_iter = algo.iteration
        while algo.iteration < iterations:
            result = algo.train()
            i = algo.iteration
            eta = (time.time() - start) / max(i - first_iter, 1) * (iterations - i)
            print(f"  iter {i:4d}/{iterations}  reward {result.get('rollout/reward_mean', float('nan')):.3f}  "
                  f"entropy {result.get('policy/entropy', float('nan')):.3f}  "
                  f"lambda {result.get('entropy_flow/lambda', float('nan')):+.3f}  "
                  f"{result.get('time/step_s', 0):.2f}s/it  left {_fmt_eta(eta)}"
                  + ("  [step skipped: non-finite]" if result.get("learner/nonfinite_in_a_row") else ""), flush=True)
            if (every and i % every == 0) or i == iterations:
                print(f"  checkpoint:  {save_checkpoint(algo, logdir, i, data)}")
    except NonFiniteTrainingError as e:
        last = latest_checkpoint(logdir)
        print(f"opefo train: stopped: {e}; last finite checkpoint: {last or 'none'}", file=sys.stderr)
        return 1
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
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train (default: configs/tiny_cpu.yaml, OPEFO on arithmetic, CPU)")
    train.add_argument("--config", action="append", help="YAML run config; repeat to overlay")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (value is YAML)")
    train.add_argument("--resume", metavar="DIR", help="checkpoint directory to resume from")
    train.add_argument("--logdir", help="where logs, TensorBoard files and checkpoints go")
    train.set_defaults(func=cmd_train)
    config = sub.add_parser("config", help="print the resolved config with each field's doc (and check it)")
    config.add_argument("--config", action="append", help="YAML run config; repeat to overlay")
    config.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (value is YAML)")
    config.add_argument("--markdown", action="store_true", help="print the field table of the README (defaults)")
    config.set_defaults(func=cmd_config)
    envs = sub.add_parser("envs", help="list the registered environments")
    envs.set_defaults(func=cmd_envs)
    args = parser.parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: your env modules in the current directory import
    if args.version:
        from opefo_rllib import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except _user_errors() as e:
        if args.debug:
            raise
        print(f"opefo {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
