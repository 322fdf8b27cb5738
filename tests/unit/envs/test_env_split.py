"""A finite task split by problem id: the train and held-out parts are disjoint and cover the
task, the same in every process and for every seed; evaluation reads a held-out part whole."""

import json

import pytest

from opefo_rllib.config.fields import ConfigError
from opefo_rllib.envs import make_env
from opefo_rllib.evaluation.tasks import env_task, heldout_problems

SUMS = {"ops": ["+"], "min_digits": 1, "max_digits": 1}  # 100 problems: 0+0 .. 9+9


def _ids(split: str, seed: int, n: int = 2000, **extra) -> set[str]:
    env = make_env("opefo/Arithmetic-v0", **SUMS, split=split, heldout_fraction=0.25, **extra)
    env.seed_problems(seed)
    return {p.id for p in env.sample_problems(n)}


def test_train_and_heldout_are_disjoint_and_cover_the_task():
    train, heldout, everything = _ids("train", 0), _ids("heldout", 0), _ids("all", 0)
    assert len(everything) == 100
    assert train.isdisjoint(heldout) and train | heldout == everything
    assert 15 <= len(heldout) <= 35  # a hash split: about a quarter
    assert _ids("train", 7) == train and _ids("heldout", 3) == heldout  # any seed: the same parts


def test_reset_poses_problems_of_its_split_only():
    env = make_env("opefo/Arithmetic-v0", **SUMS, split="heldout", heldout_fraction=0.25)
    heldout = _ids("heldout", 0)
    seen = {env.reset(seed=s)[1]["task_id"] for s in range(50)}
    assert seen <= heldout


def test_evaluation_reads_the_heldout_part_whole_without_exclusions():
    heldout = _ids("heldout", 0)
    task = env_task("opefo/Arithmetic-v0", {**SUMS, "split": "heldout", "heldout_fraction": 0.25},
                    num_problems=len(heldout))
    assert {p.id for p in task.problems} == heldout and task.excluded == 0
    with pytest.raises(ConfigError, match="in its held-out split"):
        heldout_problems(task.env, len(heldout) + 1)
    task.close()


@pytest.mark.parametrize("kwargs, message", [({"split": "test"}, "split must be one of all, train, heldout"),
                                             ({"heldout_fraction": 1.0}, r"heldout_fraction must be in \(0, 1\)")])
def test_bad_split_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_env("opefo/Arithmetic-v0", **SUMS, **kwargs)


def test_the_multi_turn_wrapper_keeps_its_inner_envs_split():
    kwargs = {**SUMS, "heldout_fraction": 0.25}
    train = make_env("opefo/ArithmeticRetry-v0", **kwargs, split="train")
    heldout = make_env("opefo/ArithmeticRetry-v0", **kwargs, split="heldout")
    assert train.split == "train" and heldout.split == "heldout"
    train.seed_problems(0)
    heldout.seed_problems(0)
    assert {p.id for p in train.sample_problems(1000)} == _ids("train", 0)
    assert {p.id for p in heldout.sample_problems(1000)} == _ids("heldout", 0)


def test_a_dataset_splits_by_row_id_and_evaluates_each_heldout_row_once(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "problem": f"{i}+1", "answer": str(i + 1)}) + "\n"
                            for i in range(40)))
    task = env_task("opefo/Math-v0", {"data_files": str(data), "split": "heldout", "heldout_fraction": 0.25})
    ids = [p.id for p in task.problems]
    assert len(ids) == len(set(ids)) and 3 <= len(ids) <= 20  # each held-out row once, none twice
    train = make_env("opefo/Math-v0", data_files=str(data), split="train", heldout_fraction=0.25)
    train.seed_problems(0)
    assert not {p.id for p in train.sample_problems(200)} & set(ids)
    train.close()
    task.close()
