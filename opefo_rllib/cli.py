"""The ``opefo`` command: the leaf of the package (nothing imports it), argument parsing over
the library (``opefo train`` is ``opefo_rllib.training.train``) and exit statuses.

    opefo [--version] [--debug] [--verbose] COMMAND ...
    opefo train  [--config FILE ...] [--set key=value ...] [--resume DIR] [--logdir DIR]
    opefo config [--config FILE ...] [--set key=value ...] [--markdown]
    opefo envs
    opefo eval MODEL (--task ENV | --data FILE ... | --suite math6 --data-dir DIR) [options]
    opefo compare RUN_DIR ... [--out compare.png]
    opefo study STUDY.yaml [--out DIR] [--parallel N] [--dry-run] [--report-only]

Bad input (a config value, a missing file or directory, a bad dataset row) ends in one line
naming what is wrong and where, and exit status 2. A run that fails on its way (a stalled engine,
a weight sync, verifier or learner past its deadline) ends in one line too, exit status 1;
``opefo train`` first restarts a run whose driver or learner died, or that missed a deadline,
from its latest checkpoint, up to ``max_failures`` times (opefo_rllib/supervisor.py).
``--debug`` shows the traceback instead; ``--verbose`` shows the libraries' start-up notices
(both go before or after the command).
"""

from __future__ import annotations

import argparse
import collections.abc
import os
import sys
from pathlib import Path


class UserError(Exception):
    """Bad command-line input (a combination of options): printed as one line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Bad input, each reported as one line and exit status 2 (the library's typed errors)."""
    from opefo_rllib.checkpoints import CheckpointError
    from opefo_rllib.config import ConfigError
    from opefo_rllib.envs.datasets import DatasetError
    from opefo_rllib.resources import InsufficientResources

    return UserError, ConfigError, DatasetError, CheckpointError, InsufficientResources


def _run_failures() -> tuple[type[BaseException], ...]:
    """Failures of a run on its way, each reported as one line and exit status 1: every deadline
    (engine stall, generate cap, weight sync, verifier: TimeoutError), a failed learner and a
    run stopped by non-finite updates, an engine serving other weights than the learner's, and a
    Ray actor killed where nothing restarts it (an engine while the fleet starts)."""
    from ray.exceptions import RayActorError

    from opefo_rllib.algorithms.grpo.grpo import LearnerFailedError
    from opefo_rllib.fleet.weight_sync import WeightsMismatchError
    from opefo_rllib.training import TrainingStopped

    return TimeoutError, LearnerFailedError, TrainingStopped, WeightsMismatchError, RayActorError


_ACTOR_ROLES = {"_WrappedExecutable": "a learner actor", "EngineActor": "an engine actor"}  # RLlib's learner class


def _actor_death_line(error: BaseException) -> str:
    """A dead actor's error in one line: which actor class and process, and why (Ray's message
    spreads them over a dozen lines)."""
    import re

    text = str(error)
    cls, pid = re.search(r"class_name: (\S+)", text), re.search(r"\bpid: (\d+)", text)
    name = cls[1].rsplit(".", 1)[-1] if cls else ""
    who = _ACTOR_ROLES.get(name, f"Ray actor {name}" if name else "a Ray actor") + (f" (pid {pid[1]})" if pid else "")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__)
    return f"{who} died: {first}"


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
            from ray.exceptions import RayActorError

            if isinstance(e, RayActorError):
                return _actor_death_line(e)
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            return lines[0] if lines else type(e).__name__
    return None


def _run_config_args(args: argparse.Namespace) -> tuple[list[str] | None, dict]:
    """(``--config`` values or None for the default, ``--set`` values parsed) of ``train`` / ``config``."""
    from opefo_rllib.run_config import parse_overrides

    return args.config, parse_overrides(args.set or [])


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config, section by section, each field with its value and its doc."""
    from opefo_rllib.config import RLLIB_SECTION, RUN_SECTION, SECTIONS, markdown_table
    from opefo_rllib.run_config import default_config, resolve_config
    from opefo_rllib.training import prepare

    if args.markdown:
        print(markdown_table([RUN_SECTION, RLLIB_SECTION, *SECTIONS.values()]))
        return 0
    data, config = prepare(*_run_config_args(args))
    paths = [resolve_config(c) for c in args.config] if args.config else [default_config()]
    print(f"# {type(config).__name__}: resolved from {', '.join(str(p) for p in paths)}"
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


def cmd_train(args: argparse.Namespace) -> int:
    """``opefo train``: the library's train() with the command's config, values, run directory
    and checkpoint. With ``max_failures`` > 0 (the default) it runs in a driver process under a
    supervisor that restarts it from the latest checkpoint when it dies (opefo_rllib/supervisor.py);
    with 0, in this process."""
    from opefo_rllib.training import max_failures_of, train

    config, overrides = _run_config_args(args)
    if args.supervisor_state is None and max_failures_of(config, overrides, args.resume) > 0:
        from opefo_rllib.supervisor import supervise

        prefix = [flag for flag, on in (("--debug", args.debug), ("--verbose", args.verbose)) if on]
        train_args = [a for c in args.config or [] for a in ("--config", c)]
        train_args += [a for v in args.set or [] for a in ("--set", v)]
        return supervise(prefix, train_args, args.resume, args.logdir)

    report = None
    if args.supervisor_state is not None:  # a driver: tell the supervisor where the run lives
        from opefo_rllib.supervisor import write_driver_state

        def report(run_dir: Path, data: dict) -> None:
            write_driver_state(args.supervisor_state, run_dir, int(data["max_failures"]), int(data["iterations"]))

    train(config, overrides, logdir=args.logdir, resume=args.resume, verbose=args.verbose, on_setup=report,
          recoveries=args.recoveries)
    return 0


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
    from opefo_rllib.config.eval_spec import EvalSpec, default_pass_k, parse_pass_k

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
        ray.init(**ray_env_vars({"address": "local", "num_cpus": cpus, "include_dashboard": False, "log_to_driver": False,
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
        config = {k: v for k, v in vars(args).items() if k not in ("func", "debug", "verbose", "command", "out")}
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


class _EngineKinds(collections.abc.Sequence):
    """The engines the fleet has, read from the one declaration of the config field ``engine``
    when argparse first looks (the config imports torch: ``opefo --version`` need not wait)."""

    def _kinds(self) -> tuple[str, ...]:
        from opefo_rllib.config import all_fields

        return all_fields()["engine"].choices()

    def __getitem__(self, index):
        return self._kinds()[index]

    def __len__(self) -> int:
        return len(self._kinds())


def _shared_options(top_level: bool) -> argparse.ArgumentParser:
    """``--debug`` and ``--verbose``, accepted before the subcommand and after it. Given after
    it, they must not reset what was given before it: a subcommand's copy has no default."""
    default = {} if top_level else {"default": argparse.SUPPRESS}
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--debug", action="store_true", help="show the traceback of an error", **default)
    shared.add_argument("--verbose", action="store_true", help="show the libraries' start-up notices and bars "
                        "(Ray, RLlib, transformers, DeepSpeed), hidden by default", **default)
    return shared


def _run_config_options() -> argparse.ArgumentParser:
    """``--config`` and ``--set`` of the commands that read a run config (train, config)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", action="append", help="YAML run config, a path or a shipped name "
                         "(tiny_cpu, overlays/grpo_strict); repeat to overlay")
    options.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (value is YAML)")
    return options


def _add_eval_parser(sub, shared: argparse.ArgumentParser) -> None:
    ev = sub.add_parser("eval", parents=[shared], help="evaluate a model: greedy / avg@K / pass@k / maj@K on tasks or datasets")
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
    # a metavar of its own: argparse would otherwise list the choices (and import the config) at once
    ev.add_argument("--engine", choices=_EngineKinds(), default="hf", metavar="ENGINE",
                    help="engine kind, one of the fleet's engines: %(choices)s (default hf)")
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


def _parser() -> argparse.ArgumentParser:
    from opefo_rllib import __version__

    parser = argparse.ArgumentParser(prog="opefo", parents=[_shared_options(top_level=True)],
                                     description="OPEFO / GRPO training of language models on RLlib")
    parser.add_argument("--version", action="version", version=__version__)
    shared, run_config = _shared_options(top_level=False), _run_config_options()
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", parents=[shared, run_config],
                           help="train (default: configs/tiny_cpu.yaml, OPEFO on arithmetic, CPU)")
    train.add_argument("--resume", metavar="DIR", help="checkpoint directory to resume from")
    train.add_argument("--logdir", help="where logs, TensorBoard files and checkpoints go")
    # The supervisor's driver (opefo_rllib/supervisor.py): not for users.
    train.add_argument("--supervisor-state", help=argparse.SUPPRESS)
    train.add_argument("--recoveries", type=int, default=0, help=argparse.SUPPRESS)
    train.set_defaults(func=cmd_train)
    config = sub.add_parser("config", parents=[shared, run_config],
                            help="print the resolved config with each field's doc (and check it)")
    config.add_argument("--markdown", action="store_true", help="print the field table of docs/configuration.md (defaults)")
    config.set_defaults(func=cmd_config)
    envs = sub.add_parser("envs", parents=[shared], help="list the registered environments")
    envs.set_defaults(func=cmd_envs)
    _add_eval_parser(sub, shared)
    compare = sub.add_parser("compare", parents=[shared],
                             help="plot reward, entropy, lambda and eval metrics of several runs")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or their tensorboard/)")
    compare.add_argument("--out", default="compare.png", help="the figure (PNG; default compare.png)")
    compare.set_defaults(func=cmd_compare)
    study = sub.add_parser("study", parents=[shared],
                           help="a grid of configs x seeds: run, resume, and tabulate mean ± std over seeds")
    study.add_argument("study", metavar="STUDY.yaml", help="the study file (or a shipped one: studies/entropy_rules)")
    study.add_argument("--out", metavar="DIR", help="where the runs and results.md go (default study_runs/<study>)")
    study.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at a time (default 1: one run "
                       "uses both cores of a 2-core machine; raise it only with cores to spare)")
    study.add_argument("--dry-run", action="store_true", help="print which runs are done, resumable or new, and "
                       "the commands; run nothing")
    study.add_argument("--report-only", action="store_true", help="run nothing; rewrite results.md from the runs")
    study.set_defaults(func=cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from opefo_rllib.quiet import silence_known_notices

    silence_known_notices(args.verbose)  # before Ray, RLlib, transformers, DeepSpeed are imported
    # Our commands start Ray themselves. Without this, an RLlib object collected after ray.shutdown()
    # (a LearnerGroup half-built when its learner was killed) calls an actor, which starts a new Ray
    # at interpreter exit and hangs there (benchmarks/chaos.py found it).
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    try:
        return args.func(args)
    except _user_errors() as e:
        if args.debug:
            raise
        print(f"opefo {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only run failures become one line; the rest re-raise
        line = failure_line(e)
        state = getattr(args, "supervisor_state", None)
        if state and line is not None:
            from opefo_rllib.supervisor import RECOVERABLE_EXIT, record_failure, recoverable

            if recoverable(e, _causes):  # the supervisor says it: once, with what it does next
                record_failure(state, line)
                if args.debug:
                    import traceback

                    traceback.print_exc()
                # Out at once: the supervisor restarts the run and ends what this driver started;
                # the interpreter's exit would run the dead actors' finalizers, which can block.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(RECOVERABLE_EXIT)
        if line is None or args.debug:
            raise
        print(f"opefo {args.command}: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
