"""A resource request the cluster cannot meet is an error naming what is missing, not a hang."""

import time
from pathlib import Path

import pytest

from opefo_rllib.resources import InsufficientResources, labelled_shortfall, shortfall, wait_for_resources
from opefo_rllib.run_config import apply_overrides, build_algo_config, load_run_config
from paths import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"


def _config(*overrides, base="tiny_cpu.yaml"):
    return build_algo_config(apply_overrides(load_run_config([CONFIGS / base]), list(overrides)))


def test_shortfall_spells_out_the_arithmetic():
    config = _config("num_engines=8")
    assert shortfall(config, {"CPU": 2.0}) == \
        "8 engines x 0.5 CPU + 1 driver/learner CPU = 5 CPUs; the cluster has 2"
    assert shortfall(_config(), {"CPU": 2.0}) is None
    learners = _config("num_engines=8", "num_learners=2", "num_cpus_per_learner=1")
    assert shortfall(learners, {"CPU": 2.0}) == \
        "8 engines x 0.5 CPU + 2 learners x 1 CPU + 1 driver CPU = 7 CPUs; the cluster has 2"
    one_gpu = _config(base="qwen2.5-math-1.5b_opefo_1gpu.yaml")
    assert "GPUs; the cluster has 0" in shortfall(one_gpu, {"CPU": 16.0})
    assert shortfall(one_gpu, {"CPU": 16.0, "GPU": 1.0}) is None


def test_wait_gives_up_after_the_timeout_and_names_what_is_missing():
    start = time.monotonic()
    with pytest.raises(InsufficientResources, match="5 CPUs; the cluster has 2.*resource_wait_timeout_s"):
        wait_for_resources(_config("num_engines=8"), timeout_s=0.3, cluster_resources=lambda: {"CPU": 2.0},
                           poll_s=0.1)
    assert time.monotonic() - start < 5


def test_wait_returns_when_an_autoscaling_cluster_grows():
    polls = []
    sizes = [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 8.0}, {"CPU": 2.0}]

    def cluster():
        polls.append(time.monotonic())
        return sizes[len(polls) - 1]

    wait_for_resources(_config("num_engines=8"), timeout_s=30, cluster_resources=cluster, poll_s=0.01)
    assert len(polls) == 3  # returned at the first poll that covered the request, without waiting for the timeout
    assert polls[-1] - polls[0] < 5


@pytest.mark.slow
def test_train_stops_naming_what_the_cluster_lacks(tmp_path):
    """Before: `opefo train --set num_engines=8` on 2 CPUs waited silently until killed."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", "--set", "num_engines=8",
                           "--set", "resource_wait_timeout_s=1", "--logdir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "8 engines x 0.5 CPU + 1 driver/learner CPU = 5 CPUs; the cluster has 2" in last
    assert "Traceback" not in proc.stderr


def _node(cpus, alive=True, **labels):
    return {"Alive": alive, "Labels": labels, "Resources": {"CPU": float(cpus)}}


def test_engines_with_node_labels_must_fit_on_the_labelled_nodes():
    config = _config("num_engines=2", "engine_node_labels={opefo-role: engines}")
    head, dead = _node(8), _node(4, alive=False, **{"opefo-role": "engines"})
    assert labelled_shortfall(config, [head, dead]) == (
        "2 engines x 0.5 CPU = 1 CPUs on nodes labelled {'opefo-role': 'engines'} (engine_node_labels); "
        "those nodes have 0")
    assert labelled_shortfall(config, [head, _node(1, **{"opefo-role": "engines"})]) is None
    # with the fallback any node will do: the cluster's totals are the whole check
    assert labelled_shortfall(_config("num_engines=2", "engine_node_labels={opefo-role: engines}",
                                      "engine_node_fallback=true"), [head]) is None
    assert labelled_shortfall(_config(), [head]) is None
    with pytest.raises(InsufficientResources, match="on nodes labelled .* those nodes have 0.*resource_wait_timeout_s"):
        wait_for_resources(config, timeout_s=0.2, cluster_resources=lambda: {"CPU": 8.0}, poll_s=0.05,
                           nodes=lambda: [head])
