"""The ``opefo`` command.

    opefo train  [--config FILE ...] [--set key=value ...] [--resume DIR] [--logdir DIR]
    opefo config [--config FILE ...] [--set key=value ...]
    opefo envs
    opefo eval MODEL (--task ENV | --data FILE ... | --suite math6 --data-dir DIR) [options]
    opefo compare RUN_DIR ... [--out compare.png]
    opefo study STUDY.yaml [--out DIR] [--parallel N] [--dry-run] [--report-only]

Bad input (a config value, a missing file or directory, a bad dataset row) ends in one line
naming what is wrong and where, and exit status 2. A run that fails on its way (a stalled engine,
a weight sync, verifier or learner past its deadline) ends in one line too, exit status 1.
``--debug`` shows the traceback instead; ``--verbose`` shows the libraries' start-up notices.
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


def default_config() -> Path:
    """The run config ``opefo train`` uses without ``--config``: the tiny CPU default."""
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


def _run_failures() -> tuple[type[BaseException], ...]:
    """Failures of a run on its way, each reported as one line and exit status 1: every deadline
    (engine stall, generate cap, weight sync, verifier: TimeoutError) and a failed learner."""
    from opefo_rllib.algorithms.grpo.grpo import LearnerFailedError

    return TimeoutError, LearnerFailedError


def _causes(error: BaseException):
    """``error`` and what it wraps, outermost first: Ray's ``RayTaskError.cause`` (a remote
    error), ``__cause__`` and ``__context__`` (a re-raise)."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (getattr(e, "cause", None), e.__cause__, e.__context__) if isinstance(c, BaseException)]


def failure_line(error: BaseException) -> str | None:
    """The one-line message of a run failure found in ``error``'s causes, or None (then the
    traceback is shown: an unexpected error is a bug to report)."""
    failures = _run_failures()
    for e in _causes(error):
        if isinstance(getattr(e, "cause", None), BaseException):
            continue  # a Ray wrapper: its message holds the remote traceback; its cause is next
        if isinstance(e, failures):
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            return lines[0] if lines else type(e).__name__
    return None


def _config_paths(args: argparse.Namespace) -> list[Path]:
    return [resolve_config(c) for c in args.config] if args.config else [default_config()]


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

    from opefo_rllib.models.tokenizer import TokenizerError, load_tokenizer
    from opefo_rllib.rollout.prompts import PromptBuilder

    try:
        tokenizer = load_tokenizer(resolve_model_path(config.model_path))
    except (FileNotFoundError, NotADirectoryError, ImportError, TokenizerError) as e:
        raise ConfigError(f"config field 'model_path' = {config.model_path!r}: {e}") from None
    PromptBuilder(tokenizer, config)  # prompt_format chat without a chat template fails here
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
    if config.eval_tasks and (config.eval_every or config.eval_before_train):
        from opefo_rllib.evaluation.validation import TrainingEvaluator

        TrainingEvaluator(config, out_dir=".").close()  # opens every eval set: a missing file fails here


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
    from opefo_rllib.progress import fmt_duration

    return fmt_duration(seconds)


def _run_name(data: dict, config) -> str:
    """The run's TensorBoard name, ``OPEFO-<model>-seed<N>`` (algorithm, model and seed are
    fixed on resume, so a resumed run gets the name it started with)."""
    from opefo_rllib.logging_tb import run_name

    return run_name(str(data.get("algorithm") or "OPEFO"), config.model_path, config.seed)


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
    default = Path("opefo_runs") / f"{_run_name(data, config)}-{time.strftime('%Y%m%d-%H%M%S')}"
    logdir = Path(data["logdir"] or default).resolve()
    if (logdir / "checkpoints" / "latest").exists():
        raise UserError(f"{logdir} already holds a run's checkpoints; continue it with --resume "
                        f"{logdir / 'checkpoints' / '<iter_N>'} or choose another --logdir")
    data["logdir"] = str(logdir)
    return data, config, logdir, None


def _eval_line(result: dict, iteration: int) -> str:
    """The accuracies of an in-training evaluation, one line, in a fixed order (all of it is in
    TensorBoard and RUN/eval/)."""
    from opefo_rllib.evaluation.compare import eval_metric_rank

    keys = sorted((k for k in result if k.startswith("eval/") and eval_metric_rank(k)[1] is not None),
                  key=eval_metric_rank)
    return f"  eval {iteration:4d}  " + "  ".join(f"{k[len('eval/'):]} {result[k]:.3f}" for k in keys)


def cmd_train(args: argparse.Namespace) -> int:
    from opefo_rllib.checkpoints import latest_checkpoint, save_checkpoint
    from opefo_rllib.logging_tb import TB_DIR, tensorboard_run_dir

    data, config, logdir, plan = _train_setup(args)
    iterations = int(data["iterations"])
    every = int(data.get("checkpoint_every") or 0)
    logdir.mkdir(parents=True, exist_ok=True)
    tb_run = tensorboard_run_dir(logdir, _run_name(data, config))
    config.tensorboard_dir = str(tb_run)

    import ray

    from opefo_rllib.progress import Stages
    from opefo_rllib.quiet import ray_env_vars

    # Ray's token authentication stays on (its default): Ray 2.60's own servers listen on every
    # interface and the token is what guards them. A local run advertises loopback.
    ray_kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
                  **(data.get("ray") or {})}
    if "address" not in ray_kwargs:
        ray_kwargs.setdefault("_node_ip_address", "127.0.0.1")
    stages = Stages()
    ray.init(**ray_env_vars(ray_kwargs, args.verbose))
    from opefo_rllib.algorithms.grpo.grpo import NonFiniteTrainingError
    from opefo_rllib.resources import InsufficientResources, wait_for_resources

    try:
        wait_for_resources(config, config.resource_wait_timeout_s)
    except InsufficientResources as e:
        ray.shutdown()
        raise UserError(str(e)) from None

    print(f"opefo train: {data['algorithm']} on {config.env} with {config.model_path}, {iterations} iterations")
    print(f"  logs:        {logdir}")
    print(f"  TensorBoard: tensorboard --logdir {logdir / TB_DIR}"
          + (f"  (run {tb_run.name})" if tb_run.parent.name == TB_DIR else "")
          + "; its Custom Scalars tab (http://localhost:6006/#custom_scalars) has P and N, entropy, reward, "
            "lambda and held-out accuracy")
    stages.done("Ray up")
    print(f"  starting {config.num_engines} {config.engine} engine(s), then "
          f"{max(1, config.num_learners)} learner(s) ...", flush=True)
    algo = config.build_algo()
    _print_build_stages(stages, algo, config)
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
            if algo.evaluator is not None and algo.evaluator.due(i):
                print(_eval_line(result, i), flush=True)
            if (every and i % every == 0) or i == iterations:
                print(f"  checkpoint:  {save_checkpoint(algo, logdir, i, data)}")
    except NonFiniteTrainingError as e:
        last = latest_checkpoint(logdir)
        print(f"opefo train: stopped: {e}; last finite checkpoint: {last or 'none'}", file=sys.stderr)
        return 1
    finally:
        algo.stop()
        ray.shutdown()
    print(f"done in {_fmt_eta(time.time() - start)}; view: tensorboard --logdir {logdir / TB_DIR}")
    return 0


def _print_build_stages(stages, algo, config) -> None:
    """The "engines up" and "learners up" lines of a built algorithm (RLlib starts the env
    runner, whose fleet starts the engines, before the learners)."""
    fleet = getattr(getattr(algo, "env_runner", None), "fleet", None)
    engines = f"engines up ({config.num_engines} {config.engine})"
    if fleet is not None:
        stages.done(engines, at=fleet.ready_at)
        stages.done(f"learners up ({max(1, config.num_learners)})")
    else:
        stages.done(f"{engines}, learners up ({max(1, config.num_learners)})")


def _eval_tasks(args: argparse.Namespace, exclude_draws: int) -> list:
    """The problem sets of ``opefo eval`` (opened before Ray starts, so bad input fails fast)."""
    from opefo_rllib.evaluation.tasks import env_task, file_task, suite_tasks

    chosen = [name for name, value in (("--task", args.task), ("--data", args.data), ("--suite", args.suite))
              if value]
    if len(chosen) != 1:
        raise UserError("give exactly one of --task ENV, --data FILE ..., --suite NAME --data-dir DIR"
                        + (f" (got {' and '.join(chosen)})" if chosen else ""))
    if args.suite:
        if not args.data_dir:
            raise UserError(f"--suite {args.suite} needs --data-dir DIR (the folder of its files)")
        return suite_tasks(args.suite, args.data_dir, args.num_problems)
    if args.data:
        return [file_task(f, args.num_problems) for f in args.data]
    return [env_task(args.task, _env_config(args.env_config), args.num_problems, exclude_draws=exclude_draws)]


def _eval_spec(args: argparse.Namespace):
    """The EvalSpec of ``opefo eval``'s options; errors name the options."""
    from opefo_rllib.evaluation.spec import EvalSpec, default_pass_k, parse_pass_k

    if args.num_engines < 1 or (args.num_problems is not None and args.num_problems < 1):
        raise UserError("--num-engines and --num-problems must be >= 1")
    pass_k = parse_pass_k(args.pass_k if args.pass_k else default_pass_k(args.samples))
    try:
        return EvalSpec(samples=args.samples, pass_k=pass_k, greedy=args.greedy, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens, seed=args.seed)
    except ValueError as e:
        raise UserError(f"{e} (--samples {args.samples}, --pass-k {','.join(map(str, pass_k))})") from None


def _env_config(text: str | None) -> dict:
    """``--env-config``: a YAML file, or an inline YAML mapping such as '{max_digits: 3}'."""
    return _yaml_mapping(text, "--env-config", "{max_digits: 3}")


def _yaml_mapping(text: str | None, option: str, example: str) -> dict:
    """An option's YAML mapping: a YAML file, or inline YAML such as ``example``; errors name ``option``."""
    import yaml

    if not text:
        return {}
    path = Path(text).expanduser()
    try:
        value = yaml.safe_load(path.read_text() if path.is_file() else text)
    except yaml.YAMLError as e:
        raise UserError(f"{option} {text}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise UserError(f"{option} {text}: expected a mapping (a YAML file or e.g. '{example}')")
    return value


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model on problem sets: a table on stdout, and --out FILE.json (+ FILE.problems.jsonl)."""
    from opefo_rllib.evaluation.codec import Codec, model_tokenizer
    from opefo_rllib.evaluation.model import resolve_eval_model
    from opefo_rllib.evaluation.report import format_table, records_path, write_report
    from opefo_rllib.evaluation.runner import eval_fleet, evaluate_task
    from opefo_rllib.evaluation.tasks import TRAIN_EPOCH_DRAWS

    model_dir = resolve_eval_model(args.model)
    spec = _eval_spec(args)
    exclude_draws = TRAIN_EPOCH_DRAWS if args.exclude_draws is None else args.exclude_draws
    if exclude_draws < 0:
        raise UserError(f"--exclude-draws {exclude_draws}: must be >= 0")
    if not args.stall_timeout_s > 0:
        raise UserError(f"--stall-timeout-s {args.stall_timeout_s:g}: must be > 0")
    engine_kwargs = _yaml_mapping(args.engine_kwargs, "--engine-kwargs", "{token_delay_s: 0.1}")
    codec = Codec(model_tokenizer(model_dir), args.prompt_format, args.system_prompt)
    tasks = _eval_tasks(args, exclude_draws)
    import ray

    from opefo_rllib.progress import EvalProgressBar, Stages
    from opefo_rllib.quiet import ray_env_vars

    cpus = os.cpu_count() or 2
    started = not ray.is_initialized()  # called from Python inside a Ray session: use that one
    stages = Stages(sys.stderr)
    if started:
        ray.init(**ray_env_vars({"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False,
                                 "configure_logging": False, "_node_ip_address": "127.0.0.1"}, args.verbose))
    fleet, reports, bar = None, [], EvalProgressBar()
    try:
        print(f"opefo eval: {args.model} ({model_dir}) with {args.num_engines} {args.engine} engine(s)",
              file=sys.stderr)
        stages.done("Ray up")
        fleet = eval_fleet(args.engine, args.num_engines, model_dir, codec, min(1.0, cpus / args.num_engines),
                           stall_timeout_s=args.stall_timeout_s, extra_engine_kwargs=engine_kwargs)
        stages.done(f"engines up ({args.num_engines} {args.engine})")
        reports = [evaluate_task(fleet, codec, task, spec, progress=bar) for task in tasks]
    finally:
        bar.close()
        for task in tasks:
            task.close()
        if fleet is not None:
            fleet.shutdown()
        if started:
            ray.shutdown()
    print(format_table(reports))
    for r in reports:
        if r.metrics.get("truncated_frac", 0.0) > 0.5:
            print(f"note: {r.name}: {r.metrics['truncated_frac']:.0%} of responses stopped at --max-new-tokens "
                  f"{spec.max_new_tokens}; raise it", file=sys.stderr)
    if args.out:
        config = {k: v for k, v in vars(args).items()
                  if k not in ("func", "debug", "verbose", "version", "command", "out")}
        config.update(model_dir=str(model_dir), pass_k=list(spec.pass_k), exclude_draws=exclude_draws)
        out = write_report(args.out, args.model, config, reports)
        print(f"wrote {out} and {records_path(out)}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Plot several runs' curves in one figure and print a table of first/last values."""
    from opefo_rllib.evaluation.compare import compare_runs

    table = compare_runs(args.runs, args.out)
    print(table)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """Run a grid of configs x seeds (each an `opefo train` process), resuming what is unfinished,
    then write OUT/results.md and OUT/curves.png."""
    from opefo_rllib.study import load_study, run_study

    study = load_study(args.study)
    out = Path(args.out) if args.out else Path("study_runs") / study.path.stem
    return run_study(study, out, parallel=args.parallel, dry_run=args.dry_run, report_only=args.report_only)


def cmd_envs(args: argparse.Namespace) -> int:
    from opefo_rllib.envs import list_envs

    for name in list_envs():
        print(name)
    return 0


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model: greedy / avg@K / pass@k / maj@K on tasks or datasets")
    ev.add_argument("model", metavar="MODEL", help="tiny-default, a Hugging Face model directory, a checkpoint "
                    "directory (its hf_policy/) or a run directory (its latest checkpoint)")
    ev.add_argument("--task", metavar="ENV", help="a registered env (see `opefo envs`)")
    ev.add_argument("--env-config", metavar="YAML", help="keyword arguments of --task: a YAML file or '{key: value}'")
    ev.add_argument("--data", nargs="+", metavar="FILE", help="problem files (JSONL / Parquet / CSV), each its own "
                    "set, posed and verified like opefo/Math-v0")
    ev.add_argument("--suite", help="a benchmark suite (math6: math500, aime24, aime25, amc23, minerva_math, "
                    "olympiadbench), its files found by name in --data-dir")
    ev.add_argument("--data-dir", metavar="DIR", help="the folder of the suite's files")
    ev.add_argument("--num-problems", type=int, metavar="N", help="problems per set (default: all; a generated "
                    "task: a fixed held-out set of 512)")
    ev.add_argument("--exclude-draws", type=int, metavar="N",
                    help="a generated task's held-out set leaves out the first N problems of the training stream "
                    "(seed 0; default 8000, the default run's 250 iterations x 32 prompts; 0: none)")
    ev.add_argument("--samples", type=int, default=8, metavar="K", help="samples per problem (default 8)")
    ev.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature (default 1)")
    ev.add_argument("--pass-k", metavar="K1,K2", help="pass@k to report (default: 1 and --samples)")
    ev.add_argument("--greedy", action="store_true", help="also decode greedily (greedy_acc)")
    ev.add_argument("--max-new-tokens", type=int, default=8, metavar="M",
                    help="longest response (default 8, as `opefo train`; math datasets need e.g. 2048)")
    ev.add_argument("--prompt-format", choices=("raw", "chat"), default="raw",
                    help="raw text, or the tokenizer's chat template")
    ev.add_argument("--system-prompt", help="system message of --prompt-format chat")
    ev.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="engine kind (default hf)")
    ev.add_argument("--num-engines", type=int, default=1, metavar="E", help="engine actors (default 1)")
    ev.add_argument("--engine-kwargs", metavar="YAML", help="extra keyword arguments of each engine: a YAML file "
                    "or '{key: value}' (vLLM: max_model_len, ...)")
    ev.add_argument("--stall-timeout-s", type=float, default=180.0, metavar="S",
                    help="end the evaluation when an engine produced no token for S seconds (default 180); "
                    "a long generation still producing tokens runs on")
    ev.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    ev.add_argument("--out", metavar="FILE.json", help="write the results here, and per-problem records to "
                    "FILE.problems.jsonl")
    ev.set_defaults(func=cmd_eval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opefo", description="OPEFO / GRPO training of language models on RLlib")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' start-up notices and bars "
                        "(Ray, RLlib, transformers, DeepSpeed), hidden by default")
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
    _add_eval_parser(sub)
    compare = sub.add_parser("compare", help="plot reward, entropy, lambda and eval metrics of several runs")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or their tensorboard/)")
    compare.add_argument("--out", default="compare.png", help="the figure (PNG; default compare.png)")
    compare.set_defaults(func=cmd_compare)
    study = sub.add_parser("study", help="a grid of configs x seeds: run, resume, and tabulate mean ± std over seeds")
    study.add_argument("study", metavar="STUDY.yaml", help="the study file (or a shipped one: studies/entropy_rules)")
    study.add_argument("--out", metavar="DIR", help="where the runs and results.md go (default study_runs/<study>)")
    study.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at a time (default 1: one run "
                       "uses both cores of a 2-core machine; raise it only with cores to spare)")
    study.add_argument("--dry-run", action="store_true", help="print which runs are done, resumable or new, and "
                       "the commands; run nothing")
    study.add_argument("--report-only", action="store_true", help="run nothing; rewrite results.md from the runs")
    study.set_defaults(func=cmd_study)
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
    from opefo_rllib.quiet import silence_known_notices

    silence_known_notices(args.verbose)  # before Ray, RLlib, transformers, DeepSpeed are imported
    try:
        return args.func(args)
    except _user_errors() as e:
        if args.debug:
            raise
        print(f"opefo {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only run failures become one line; the rest re-raise
        line = None if args.debug else failure_line(e)
        if line is None:
            raise
        print(f"opefo {args.command}: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
