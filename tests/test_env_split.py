"""A finite task split by problem id: the train and held-out parts are disjoint and cover the
task, the same in every process and for every seed; evaluation reads a held-out part whole."""

import pytest

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
    with pytest.raises(Exception, match="in its held-out split"):
        heldout_problems(task.env, len(heldout) + 1)
    task.close()


@pytest.mark.parametrize("kwargs, message", [({"split": "test"}, "split must be one of all, train, heldout"),
                                             ({"heldout_fraction": 1.0}, r"heldout_fraction must be in \(0, 1\)")])
def test_bad_split_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_env("opefo/Arithmetic-v0", **SUMS, **kwargs)
