"""End to end on CPU with real Ray, RLlib, DeepSpeed and TensorBoard: build_algo().train(),
Tune, the `opefo` CLI with checkpoint and resume in new processes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REQUIRED_TAGS = [
    "policy/entropy", "entropy_flow/P", "entropy_flow/N", "entropy_flow/lambda", "entropy_flow/frac_increase",
    "entropy_flow/frac_decrease", "rollout/reward_mean", "rollout/accuracy", "rollout/response_length_mean",
    "learner/grad_norm", "learner/lr", "time/generate_s", "time/verify_s", "time/learn_s", "time/weight_sync_s",
    "throughput/tokens_per_s", "quadrant/pos_adv_likely", "quadrant/pos_adv_rare", "quadrant/neg_adv_likely",
    "quadrant/neg_adv_rare", "predicted_entropy_change/exact", "rollout/logprob_gap_max",
]
SMALL = {"prompts_per_batch": 4, "group_size": 4, "max_new_tokens": 6}


def _event_tags(root: Path) -> tuple[set[str], dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, other = set(), {"histograms": set(), "text": set()}
    files = list(root.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event files under {root}"
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        scalars |= set(tags.get("scalars", []))
        other["histograms"] |= set(tags.get("histograms", []))
        other["text"] |= set(tags.get("tensors", []))
    return scalars, other


def _assert_all_tags(scalars: set[str]) -> None:
    missing = [t for t in REQUIRED_TAGS if not any(s.endswith(t) for s in scalars)]
    assert not missing, f"missing TensorBoard tags: {missing}"


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    import opefo_rllib  # noqa: F401

    yield
    ray.shutdown()


def _small_config(tmp_path, cls_name="OPEFOConfig"):
    from opefo_rllib.algorithms import grpo, opefo

    cls = getattr(opefo, cls_name, None) or getattr(grpo, cls_name)
    config = cls().generation(prompts_per_batch=SMALL["prompts_per_batch"], group_size=SMALL["group_size"],
                              max_new_tokens=SMALL["max_new_tokens"])
    config.logging(tensorboard_dir=str(tmp_path / "tb"), log_text_every=1)
    config.fleet(generate_timeout_s=120, weight_sync_timeout_s=60)  # fail fast instead of hanging
    return config


@pytest.mark.parametrize("cls_name", ["OPEFOConfig", "GRPOConfig"])
def test_two_iterations_with_build_algo_log_every_tag(ray_session, tmp_path, cls_name):
    config = _small_config(tmp_path, cls_name)
    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(2)]
        if cls_name == "OPEFOConfig":  # an engine dies: the next iteration still gets its full batch
            import ray

            ray.kill(algo.fleet.actors[0])
            killed = algo.train()
            assert killed["fleet/engine_restarts"] == 1
            assert killed["rollout/num_samples"] == SMALL["prompts_per_batch"] * SMALL["group_size"]
            assert killed["rollout/logprob_gap_max"] < 1e-4  # the restarted engine has the current weights
    finally:
        algo.stop()
    assert algo.iteration == (3 if cls_name == "OPEFOConfig" else 2)
    for r in results:
        assert 0.0 <= r["rollout/reward_mean"] <= 1.0 and r["learner/optimizer_steps"] == 1
    # The batch of iteration 2 was sampled after the first weight sync: engine == learner.
    assert results[1]["rollout/logprob_gap_max"] < 1e-4
    if cls_name == "GRPOConfig":  # the baseline logs the flows it does not balance
        assert results[0]["entropy_flow/lambda"] == 0.0 and results[0]["entropy_flow/N"] > 0
    else:
        assert results[0]["entropy_flow/lambda"] == pytest.approx(results[0]["entropy_flow/lambda_star"])
    scalars, other = _event_tags(tmp_path / "tb")
    _assert_all_tags(scalars)
    assert "entropy_flow/delta" in other["histograms"] and "samples/text_summary" in other["text"]


def test_colocated_layout_releases_engine_memory_around_each_update(ray_session, tmp_path):
    import ray

    config = _small_config(tmp_path).fleet(colocate_engines=True)
    algo = config.build_algo()
    engines = list(algo.fleet.actors)
    try:
        results = [algo.train() for _ in range(2)]
    finally:
        algo.stop()
    # The Algorithm owns the fleet: stop() ends its engines. ray.kill is asynchronous: a call sent
    # at once may still be answered (a loaded CI machine saw it), so the engine must be gone within 30 s.
    deadline = time.time() + 30
    with pytest.raises(ray.exceptions.RayActorError):
        while time.time() < deadline:
            ray.get(engines[0].weight_version.remote(), timeout=30)
            time.sleep(0.5)
    assert [r["fleet/memory_releases"] for r in results] == [1.0, 2.0]
    assert results[1]["rollout/logprob_gap_max"] < 1e-4  # resumed engines sample the updated policy


def test_tune_tuner_runs_opefo_by_name(ray_session, tmp_path):
    from ray import tune

    config = _small_config(tmp_path)
    config.tensorboard_dir = None  # under Tune: the trial's own directory
    tuner = tune.Tuner("OPEFO", param_space=config,
                       run_config=tune.RunConfig(stop={"training_iteration": 2}, storage_path=str(tmp_path / "tune"),
                                                 verbose=0))
    results = tuner.fit()
    assert not results.errors
    best = results[0]
    assert best.metrics["training_iteration"] == 2
    scalars, _ = _event_tags(Path(best.path))
    _assert_all_tags(scalars)


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _iteration_line(stdout: str, i: int) -> str:
    """The numbers of iteration i's progress line (reward, entropy, lambda), without timings."""
    line = next(line for line in stdout.splitlines() if line.strip().startswith(f"iter {i:4d}/"))
    return line.split("s/it")[0].rsplit(" ", 1)[0]


def test_cli_trains_checkpoints_and_resumes_in_a_new_process(tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"{i}+{i % 7}", "answer": str(i + i % 7)}) + "\n"
                            for i in range(40)))
    common = ["--set", "env=opefo/Math-v0", "--set",
              f"env_config={{data_files: {data}, template: '{{problem}}='}}",
              "--set", "prompts_per_batch=4", "--set", "group_size=4", "--set", "max_new_tokens=6",
              "--set", "checkpoint_every=2", "--set", "ray={num_cpus: 2}"]
    straight = _cli(*common, "--set", "iterations=3", "--logdir", str(tmp_path / "a"), cwd=tmp_path)
    assert "tensorboard --logdir" in straight
    ckpt2 = tmp_path / "a" / "checkpoints" / "iter_000002"
    assert (ckpt2 / "hf_policy" / "model.safetensors").exists()
    resumed = _cli("--resume", str(ckpt2), "--set", "iterations=3", cwd=tmp_path)
    assert "resumed from" in resumed and "at iteration 2" in resumed
    # Iteration 3 after resuming is iteration 3 of the uninterrupted run: same data, same numbers.
    assert _iteration_line(resumed, 3) == _iteration_line(straight, 3)
    run = json.loads((tmp_path / "a" / "checkpoints" / "iter_000003" / "opefo_run.json").read_text())
    assert run["iteration"] == 3

    from ray.rllib.algorithms.algorithm import Algorithm  # noqa: F401 (checkpoint format is RLlib's)

    state_file = next((tmp_path / "a" / "checkpoints" / "iter_000003" / "env_runner").glob("state.*"))
    import pickle

    with open(state_file, "rb") as f:
        state = pickle.load(f)
    # The dataset continued with unseen items: 3 batches of 4 drawn from epoch 0.
    assert state["dataset"]["epoch"] == 0 and state["dataset"]["position"] == 12

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "checkpoints" / "iter_000003" / "hf_policy")


def test_cli_rejects_an_unknown_config_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", "--set", "lrr=1e-3"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "unknown key 'lrr'" in proc.stderr and "did you mean 'lr'" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("balance_mode: sideways\n")
    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", "--config", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "'balance_mode'" in proc.stderr and "two_sided" in proc.stderr
