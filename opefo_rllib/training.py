"""``train()``: the training loop of ``opefo train``, callable from Python.

    from opefo_rllib.training import train

    result = train("tiny_cpu", overrides={"iterations": 2, "prompts_per_batch": 4})
    result.run_dir, result.checkpoint, result.iterations, result.metrics

It merges the run config (a path, a shipped name, a mapping or a list of them) with
``overrides``, checks it and opens what the run will open (model directory, env, eval sets)
before Ray starts, starts Ray (or uses the running session), builds the Algorithm, resumes from
``resume`` when given, trains to ``iterations``, checkpoints every ``checkpoint_every`` and at
the end, and prints one progress line per iteration. Bad input raises ConfigError (a config key
or value; ConfigNotFound for a missing config), DatasetError (a dataset row), CheckpointError (a
checkpoint or run directory) or InsufficientResources (the cluster is too small), each before
any training; a run whose steps stay non-finite raises TrainingStopped naming its last finite
checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from opefo_rllib.checkpoints import CheckpointError, latest_checkpoint, plan_resume, save_checkpoint
from opefo_rllib.config import ConfigError
from opefo_rllib.run_config import RunConfigSource, build_algo_config, check_fields, run_config_of, set_values

__all__ = ["train", "TrainResult", "TrainingStopped", "prepare", "preflight", "max_failures_of"]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished ``train()`` left: its run directory, the checkpoint it wrote last, the
    iteration it reached and that iteration's metrics (RLlib's result dict)."""

    run_dir: Path
    checkpoint: Path | None
    iterations: int
    metrics: dict[str, Any]


class TrainingStopped(RuntimeError):
    """Training stopped before ``iterations``: the updates stayed non-finite; ``checkpoint`` is
    the last finite checkpoint (None when there is none)."""

    def __init__(self, reason: str, checkpoint: Path | None):
        self.checkpoint = checkpoint
        super().__init__(f"stopped: {reason}; last finite checkpoint: {checkpoint or 'none'}")


def preflight(config) -> None:
    """Open what the run will open (the model directory, the env and its data files, the eval
    sets) and turn a failure into a ConfigError naming the field, before Ray starts."""
    from opefo_rllib.envs import make_env
    from opefo_rllib.envs.datasets import DatasetError
    from opefo_rllib.envs.registry import import_env_modules
    from opefo_rllib.models.loading import resolve_model_path
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
    except (ConfigError, DatasetError, CheckpointError):
        raise  # already names the field, file or row
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


def prepare(config: RunConfigSource | None = None, overrides: Mapping[str, Any] | None = None):
    """(merged run config, validated GRPOConfig / OPEFOConfig) of ``config`` with ``overrides``,
    after ``preflight``; what ``opefo config`` prints and a fresh ``train()`` runs."""
    _quiet_api_stack_notice()
    data = set_values(run_config_of(config), overrides)
    algo_config = build_algo_config(data)
    preflight(algo_config)
    return data, algo_config


def _quiet_api_stack_notice() -> None:
    logging.getLogger("ray.rllib.algorithms.algorithm_config").setLevel(logging.ERROR)  # "new API stack" notice


def _run_name(data: dict, config) -> str:
    """The run's TensorBoard name, ``OPEFO-<model>-seed<N>`` (algorithm, model and seed are
    fixed on resume, so a resumed run gets the name it started with)."""
    from opefo_rllib.logging_tb import run_name

    return run_name(str(data.get("algorithm") or "OPEFO"), config.model_path, config.seed)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """A run about to start: its merged run config, algorithm config, run directory and, when
    it resumes, the checkpoint plan."""

    data: dict
    config: Any
    run_dir: Path
    resume: Any  # checkpoints.ResumePlan | None


def max_failures_of(config: RunConfigSource | None, overrides: Mapping[str, Any] | None,
                    resume: str | os.PathLike | None) -> int:
    """The ``max_failures`` a run would have: from its config files and ``overrides``, or on
    resume from the checkpoint's config (read as ``_setup`` reads it). A bad key, value or
    checkpoint raises here as it would in ``train()``; the checks that span fields, and opening
    the model and env, are left to ``train()``."""
    if resume is not None:
        data = plan_resume(resume, None if config is None else run_config_of(config), set_values({}, overrides),
                           None).config
    else:
        data = set_values(run_config_of(config), overrides)
    check_fields(data)
    return int(data.get("max_failures", 0))


def _setup(config, overrides, logdir, resume) -> _Setup:
    if resume is not None:
        _quiet_api_stack_notice()
        plan = plan_resume(resume, None if config is None else run_config_of(config), set_values({}, overrides),
                           None if logdir is None else str(logdir))
        algo_config = build_algo_config(plan.config)
        preflight(algo_config)
        return _Setup(plan.config, algo_config, plan.run_dir, plan)
    data, algo_config = prepare(config, overrides)
    if logdir is not None:
        data["logdir"] = str(logdir)
    default = Path("opefo_runs") / f"{_run_name(data, algo_config)}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(data["logdir"] or default).expanduser().resolve()
    if (run_dir / "checkpoints" / "latest").exists():
        raise CheckpointError(f"{run_dir} already holds a run's checkpoints; resume from one of them "
                              f"({run_dir / 'checkpoints' / '<iter_N>'}: --resume / resume=) or choose another logdir")
    data["logdir"] = str(run_dir)
    return _Setup(data, algo_config, run_dir, None)


def _start_ray(data: dict, verbose: bool) -> bool:
    """Start Ray with the run's ``ray:`` keyword arguments; False when a session is running
    already (a call from a Ray program: use it, and leave it running)."""
    import ray

    from opefo_rllib.quiet import ray_env_vars

    if ray.is_initialized():
        return False
    # Ray's token authentication stays on (its default): Ray 2.60's own servers listen on every
    # interface and the token is what guards them. A local run advertises loopback.
    ray_kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
                  **(data.get("ray") or {})}
    if "address" not in ray_kwargs:
        # A Ray of its own: without an address, ray.init joins the cluster a `ray start` (or a
        # cluster_utils.Cluster) left in /tmp/ray/ray_current_cluster, and refuses num_cpus there.
        ray_kwargs["address"] = "local"
        ray_kwargs.setdefault("_node_ip_address", "127.0.0.1")
    ray.init(**ray_env_vars(ray_kwargs, verbose))
    return True


def _iteration_line(result: dict, i: int, iterations: int, eta_s: float) -> str:
    from opefo_rllib.progress import fmt_duration

    return (f"  iter {i:4d}/{iterations}  reward {result.get('rollout/reward_mean', float('nan')):.3f}  "
            f"entropy {result.get('policy/entropy', float('nan')):.3f}  "
            f"lambda {result.get('entropy_flow/lambda', float('nan')):+.3f}  "
            f"{result.get('time/step_s', 0):.2f}s/it  left {fmt_duration(eta_s)}"
            + ("  [step skipped: non-finite]" if result.get("learner/nonfinite_in_a_row") else ""))


def _eval_line(result: dict, iteration: int) -> str:
    """The accuracies of an in-training evaluation, one line, in a fixed order (all of it is in
    TensorBoard and RUN/eval/)."""
    from opefo_rllib.evaluation.compare import eval_metric_rank

    keys = sorted((k for k in result if k.startswith("eval/") and eval_metric_rank(k)[1] is not None),
                  key=eval_metric_rank)
    return f"  eval {iteration:4d}  " + "  ".join(f"{k[len('eval/'):]} {result[k]:.3f}" for k in keys)


def _print_build_stages(stages, algo, config) -> None:
    """The "learners up" and "engines up" lines of a built algorithm (RLlib's setup starts the
    learners; GRPO.setup then starts the fleet's engines)."""
    learners = f"learners up ({max(1, config.num_learners)})"
    engines = f"engines up ({config.num_engines} {config.engine})"
    fleet, learners_at = getattr(algo, "fleet", None), getattr(algo, "learners_ready_at", None)
    if fleet is not None and learners_at is not None:
        stages.done(learners, at=learners_at)
        stages.done(engines, at=fleet.ready_at)
    else:
        stages.done(f"{learners}, {engines}")


def _print_header(setup: _Setup, iterations: int, tb_run: Path) -> None:
    from opefo_rllib.logging_tb import TB_DIR

    data, config, run_dir = setup.data, setup.config, setup.run_dir
    print(f"opefo train: {data['algorithm']} on {config.env} with {config.model_path}, {iterations} iterations")
    print(f"  logs:        {run_dir}")
    print(f"  TensorBoard: tensorboard --logdir {run_dir / TB_DIR}"
          + (f"  (run {tb_run.name})" if tb_run.parent.name == TB_DIR else "")
          + "; its Custom Scalars tab (http://localhost:6006/#custom_scalars) has P and N, entropy, reward, "
            "lambda and held-out accuracy")


def _loop(algo, setup: _Setup, iterations: int, every: int, recoveries: int) -> tuple[Path | None, dict]:
    """Train to ``iterations``; (the last checkpoint written, the last result)."""
    if setup.resume is not None:
        algo.restore_from_path(str(setup.resume.checkpoint))
        print(f"  resumed from {setup.resume.checkpoint} at iteration {algo.iteration}"
              + (" (an older checkpoint: this run continues in a new branch)" if setup.resume.branched else ""))
    # The supervisor's restarts before this driver (opefo_rllib/supervisor.py), at the first step it
    # trains: a later recovery from the same checkpoint hides it with the rest of that step.
    algo.log_scalars({"fault/recoveries": recoveries}, algo.iteration + 1)
    checkpoint, result = None, {}
    first_iter, start = algo.iteration, time.time()
    while algo.iteration < iterations:
        result = algo.train()
        i = algo.iteration
        eta = (time.time() - start) / max(i - first_iter, 1) * (iterations - i)
        print(_iteration_line(result, i, iterations, eta), flush=True)
        if algo.evaluator is not None and algo.evaluator.due(i):
            print(_eval_line(result, i), flush=True)
        if (every and i % every == 0) or i == iterations:
            checkpoint = save_checkpoint(algo, setup.run_dir, i, setup.data, int(setup.data.get("keep_checkpoints") or 0))
            print(f"  checkpoint:  {checkpoint}")
    return checkpoint, result


def train(config: RunConfigSource | None = None, overrides: Mapping[str, Any] | None = None,
          logdir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          verbose: bool = False, on_setup: Callable[[Path, dict], None] | None = None,
          recoveries: int = 0) -> TrainResult:
    """Train a run config to its ``iterations`` and return where it ended.

    Args:
        config: a run config file or shipped name (``"tiny_cpu"``), a mapping of config keys, or
            a list of them overlaid in order; None: the shipped tiny CPU default (on resume: the
            checkpoint's own config).
        overrides: config keys -> values, applied last (``{"iterations": 2}``).
        logdir: the run directory (default: the config's ``logdir``, else
            ``opefo_runs/<run name>-<time>``); one that holds checkpoints already is refused.
        resume: a checkpoint directory to continue from (its run directory, unless ``logdir``).
        verbose: keep the libraries' start-up notices.
        on_setup: called with (run directory, merged run config) once the run is set up, before
            Ray starts (``opefo train``'s driver reports to its supervisor here).
        recoveries: restarts of this run before this call (``fault/recoveries`` in TensorBoard).

    ``train()`` itself does not recover from failures: ``opefo train`` does, by restarting it
    (``max_failures``, opefo_rllib/supervisor.py).
    """
    from opefo_rllib.quiet import silence_known_notices

    silence_known_notices(verbose)
    setup = _setup(config, overrides, logdir, resume)
    iterations, every = int(setup.data["iterations"]), int(setup.data.get("checkpoint_every") or 0)
    setup.run_dir.mkdir(parents=True, exist_ok=True)
    if on_setup is not None:
        on_setup(setup.run_dir, setup.data)

    from opefo_rllib.logging_tb import TB_DIR, tensorboard_run_dir

    tb_run = tensorboard_run_dir(setup.run_dir, _run_name(setup.data, setup.config))
    setup.config.tensorboard_dir = str(tb_run)

    import ray

    from opefo_rllib.algorithms.grpo.grpo import NonFiniteTrainingError
    from opefo_rllib.progress import Stages, fmt_duration
    from opefo_rllib.resources import wait_for_resources

    stages = Stages()
    started_ray = _start_ray(setup.data, verbose)
    algo = None
    try:
        wait_for_resources(setup.config, setup.config.resource_wait_timeout_s)
        _print_header(setup, iterations, tb_run)
        stages.done("Ray up")
        print(f"  starting {max(1, setup.config.num_learners)} learner(s), then "
              f"{setup.config.num_engines} {setup.config.engine} engine(s) ...", flush=True)
        algo = setup.config.build_algo()
        _print_build_stages(stages, algo, setup.config)
        start = time.time()
        try:
            checkpoint, metrics = _loop(algo, setup, iterations, every, recoveries)
        except NonFiniteTrainingError as e:
            raise TrainingStopped(str(e), latest_checkpoint(setup.run_dir)) from e
        print(f"done in {fmt_duration(time.time() - start)}; view: tensorboard --logdir {setup.run_dir / TB_DIR}")
        return TrainResult(setup.run_dir, checkpoint or latest_checkpoint(setup.run_dir), algo.iteration, metrics)
    finally:
        if algo is not None:
            algo.stop()
        if started_ray:
            ray.shutdown()
