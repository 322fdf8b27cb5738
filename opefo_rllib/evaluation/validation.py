"""Validation during training: the config's ``eval_tasks`` on the training fleet.

The GRPO algorithm calls ``TrainingEvaluator.run`` right after a training step's weight sync,
so the fleet's engines hold exactly the learner's current weights: no second copy of the model
is loaded. The schedule is a function of the algorithm's iteration only (restored on resume):

    due(i) = (i == 0 and eval_before_train) or (eval_every > 0 and i > 0 and i % eval_every == 0)

Each evaluation writes ``RUN/eval/iter_NNNNNN.json`` (with its per-problem JSONL) and returns the
scalars the algorithm logs to TensorBoard as ``eval/NAME/<metric>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opefo_rllib.evaluation.codec import Codec
from opefo_rllib.evaluation.report import scalar_metrics, write_report
from opefo_rllib.evaluation.runner import evaluate_task
from opefo_rllib.config.eval_spec import TaskEntry, parse_eval_task
from opefo_rllib.evaluation.tasks import EvalTask, env_task, file_task

__all__ = ["TrainingEvaluator", "eval_dir"]


def eval_dir(tensorboard_dir: str | Path) -> Path:
    """RUN/eval when TensorBoard writes to RUN/tensorboard/NAME (``opefo train``) or to
    RUN/tensorboard (runs started before run names), else TB_DIR/eval: the reports sit beside
    the checkpoints, where ``opefo study``'s report looks for them."""
    tb = Path(tensorboard_dir)
    if tb.name == "tensorboard":
        return tb.parent / "eval"
    if tb.parent.name == "tensorboard":
        return tb.parent.parent / "eval"
    return tb / "eval"


class TrainingEvaluator:
    """The eval tasks of one training run; problem sets are drawn once, at construction.

    Args:
        config: the algorithm config (eval_every, eval_before_train, eval_tasks, eval_exclude_draws;
            temperature, max_new_tokens, stop_token_ids, seed, prompt_format, system_prompt as in training).
        out_dir: where iter_NNNNNN.json files go.
    """

    def __init__(self, config: Any, out_dir: str | Path):
        self.every, self.before_train = int(config.eval_every), bool(config.eval_before_train)
        self.out_dir = Path(out_dir)
        self.model = config.model_path
        self.prompt_format, self.system_prompt = config.prompt_format, config.system_prompt
        seed = config.seed or 0
        self.entries: list[TaskEntry] = [
            parse_eval_task(e, i, temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=seed,
                            stop_token_ids=config.stop_token_ids or ())
            for i, e in enumerate(config.eval_tasks or [])]
        self.tasks: list[EvalTask] = [self._task(e, seed, config.eval_exclude_draws) for e in self.entries]

    @staticmethod
    def _task(entry: TaskEntry, train_seed: int, exclude_draws: int) -> EvalTask:
        if entry.task is not None:  # a generated task's held-out set leaves out this run's stream
            return env_task(entry.task, entry.env_config, entry.num_problems, entry.name, train_seed=train_seed,
                            exclude_draws=exclude_draws)
        return file_task(list(entry.data), entry.num_problems, entry.name)

    def due(self, iteration: int) -> bool:
        if iteration == 0:
            return self.before_train
        return self.every > 0 and iteration % self.every == 0

    def run(self, fleet: Any, tokenizer: Any, iteration: int) -> dict[str, float]:
        """Evaluate every task with the fleet's current weights; write the JSON; return the scalars."""
        codec = Codec(tokenizer, self.prompt_format, self.system_prompt)
        reports = [evaluate_task(fleet, codec, task, entry.spec, step=iteration)
                   for entry, task in zip(self.entries, self.tasks)]
        config = {"iteration": iteration, "weight_version": fleet.version,
                  "tasks": [{"name": e.name, "task": e.task, "data": list(e.data), "env_config": e.env_config,
                             "num_problems": e.num_problems, "samples": e.spec.samples,
                             "pass_k": list(e.spec.pass_k), "greedy": e.spec.greedy,
                             "temperature": e.spec.temperature, "max_new_tokens": e.spec.max_new_tokens}
                            for e in self.entries]}
        write_report(self.out_dir / f"iter_{iteration:06d}.json", self.model, config, reports)
        scalars = scalar_metrics(reports)
        scalars["time/eval_s"] = sum(r.seconds for r in reports)
        return scalars

    def close(self) -> None:
        for task in self.tasks:
            task.close()
