"""LoRA through `opefo train`: the HF engines get the adapter alone after every step and serve
the learner's policy (the log-prob gap of every batch), checkpoints are the adapter, a resumed run
reproduces the straight one, and the export is the adapter in peft's format; vLLM engines serve
the adapter through vLLM's LoRA API, or take the merged weights (the fallback, named in the log)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SMALL = ["--set", "prompts_per_batch=4", "--set", "group_size=4", "--set", "max_new_tokens=6",
         "--set", "ray={num_cpus: 2}", "--set", "log_text_every=0", "--set", "eval_before_train=false",
         "--set", "eval_every=0", "--set", "lora_rank=4", "--set", "lora_alpha=8", "--set", "lr=1.0e-2"]


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opefo_rllib.evaluation.compare import event_dir

    acc = EventAccumulator(str(event_dir(run / "tensorboard")), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def test_lora_run_syncs_the_adapter_checkpoints_it_and_resumes_the_straight_run(tmp_path):
    straight = _cli(*SMALL, "--set", "iterations=3", "--set", "checkpoint_every=2", "--set", "export_adapter=true",
                    "--logdir", str(tmp_path / "a"), cwd=tmp_path)
    assert "the hf engines get the adapter alone" in straight.stderr
    s = _scalars(tmp_path / "a")
    # every batch after the first was sampled by the engine with the adapter of the step before
    assert max(s["rollout/logprob_gap_max"].values()) < 1e-4, s["rollout/logprob_gap_max"]
    assert s["learner/weight_version"][3] == 3
    assert 0 < s["fleet/weight_sync_mb"][3] < 0.5  # rank 4 on the 0.8M model: ~0.15 MB (full weights: 3 MB)
    ckpt2 = tmp_path / "a" / "checkpoints" / "iter_000002"
    assert (ckpt2 / "hf_policy" / "adapter_model.safetensors").exists()
    assert not (ckpt2 / "hf_policy" / "model.safetensors").exists()
    module_state = sum(f.stat().st_size for f in (ckpt2 / "learner_group").rglob("*rl_module*/**/*") if f.is_file())
    assert 0 < module_state < 1_000_000, module_state  # the adapter, not the 3 MB model
    resumed = _cli("--resume", str(ckpt2), "--set", "iterations=3", cwd=tmp_path)  # continues in a branch
    assert "at iteration 2" in resumed.stdout
    assert _iteration_line(resumed.stdout, 3) == _iteration_line(straight.stdout, 3)  # reward, entropy, lambda


def _iteration_line(stdout: str, i: int) -> str:
    """Iteration i's progress line (reward, entropy, lambda) without its timings."""
    line = next(line for line in stdout.splitlines() if line.strip().startswith(f"iter {i:4d}/"))
    return line.split("s/it")[0].rsplit(" ", 1)[0]


@pytest.mark.parametrize("lora_sync", ["auto", "merged"])
def test_lora_with_vllm_engines_serves_the_adapter_or_the_merged_weights(tmp_path, lora_sync):
    pytest.importorskip("vllm")
    proc = _cli(*SMALL, "--set", "engine=vllm", "--set", f"lora_sync={lora_sync}", "--set", "iterations=3",
                "--logdir", str(tmp_path / "v"), cwd=tmp_path)
    what = "the adapter alone" if lora_sync == "auto" else "the merged weights"
    assert f"the vllm engines get {what}" in proc.stderr
    s = _scalars(tmp_path / "v")
    assert s["learner/weight_version"][3] == 3
    # batches 2 and 3 were sampled with the adapter (or merged weights) of the step before
    assert max(s["rollout/logprob_gap_max"].values()) < 1e-4, s["rollout/logprob_gap_max"]
    if lora_sync == "auto":
        assert 0 < s["fleet/weight_sync_mb"][3] < 0.5  # the adapter, not the 3 MB model
