"""The tiny model builder, the RLModule, the HF engine and the engine fleet."""

import hashlib

import pytest
import torch

from opefo_rllib.fleet.engine import SamplingConfig
from opefo_rllib.fleet.hf_engine import HFEngine
from opefo_rllib.models.loading import resolve_model_path
from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
from opefo_rllib.models.tokenizer import CharTokenizer

TOK = CharTokenizer.load(TINY_DEFAULT_PATH)


def test_tokenizer_round_trips_and_rejects_foreign_files(tmp_path):
    ids = TOK.encode("12+34=")
    assert ids[0] == TOK.bos_token_id and TOK.decode(ids[1:] + [TOK.eos_token_id, 9]) == "12+34="
    (tmp_path / "opefo_char_tokenizer.json").write_text('{"type": "bpe"}')
    with pytest.raises(ValueError, match="not a character tokenizer"):
        CharTokenizer.load(tmp_path)


def test_shipped_tiny_model_is_small_and_loads_offline():
    size = sum(f.stat().st_size for f in TINY_DEFAULT_PATH.iterdir())
    assert size < 10 * 2**20
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_DEFAULT_PATH)
    assert model.config.vocab_size == len(TOK)
    with pytest.raises(FileNotFoundError, match="local directories or .gguf files only"):
        resolve_model_path("Qwen/Qwen2.5-0.5B")


@pytest.mark.slow
def test_make_tiny_is_deterministic(tmp_path):
    from opefo_rllib.tools.make_tiny import main

    digests = []
    for run in ("a", "b"):
        main(["--out", str(tmp_path / run), "--steps", "3", "--batch", "8"])
        digests.append(hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_hf_engine_samples_are_seeded_and_logprobs_are_of_the_sampled_distribution():
    engine = HFEngine(str(TINY_DEFAULT_PATH), eos_token_id=TOK.eos_token_id)
    prompts = [TOK.encode("12+3="), TOK.encode("7*8=")]
    cfg = SamplingConfig(temperature=0.7, max_new_tokens=5)
    a, b = engine.generate(prompts, 3, cfg, seed=5), engine.generate(prompts, 3, cfg, seed=5)
    assert [[r.response_ids for r in g] for g in a] == [[r.response_ids for r in g] for g in b]
    res = a[1][2]
    assert res.prompt_index == 1 and res.sample_index == 2 and len(res.sampling_logp) == len(res.response_ids)
    # Recompute the log-prob of each sampled token at temperature 0.7 with a plain forward pass.
    ids = torch.tensor([prompts[1] + res.response_ids])
    with torch.no_grad():
        logits = engine.model(ids).logits[0, len(prompts[1]) - 1:-1] / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(res.response_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(res.sampling_logp), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="full distribution"):
        engine.generate(prompts, 1, SamplingConfig(top_p=0.9))


def test_rl_module_builds_from_a_config_without_weights():
    from opefo_rllib.envs import ArithmeticEnv
    from opefo_rllib.models.rl_module import HFCausalLMModule

    env = ArithmeticEnv()
    module = HFCausalLMModule(observation_space=env.observation_space, action_space=env.action_space,
                              model_config={"hf_config": {"model_type": "qwen2", "vocab_size": 40, "hidden_size": 16,
                                                          "intermediate_size": 32, "num_hidden_layers": 1,
                                                          "num_attention_heads": 2, "num_key_value_heads": 1}})
    ids = torch.randint(40, (2, 7))
    out = module.sequence_token_stats(ids, torch.ones_like(ids))
    assert out.logp.shape == (2, 6) and bool((out.entropy > 0).all())


@pytest.mark.slow
def test_fleet_of_two_engines_keeps_every_group_on_one_engine():
    import ray

    from opefo_rllib.fleet.fleet import EngineFleet, _split

    assert [list(r) for r in _split(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [len(r) for r in _split(1, 3)] == [1, 0, 0]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        fleet = EngineFleet("hf", num_engines=2, engine_kwargs={"model_path": str(TINY_DEFAULT_PATH),
                                                                  "eos_token_id": TOK.eos_token_id})
        prompts = [TOK.encode(f"{i}+1=") for i in range(5)]
        pending = fleet.submit(prompts, 3, SamplingConfig(max_new_tokens=4), seed=0)
        assert [list(entry[0]) for entry in pending] == [[0, 1, 2], [3, 4]]
        seen = []
        while pending:
            idx, results, seconds, pending, _ = fleet.wait_any(pending, step=0)
            assert len(results) == len(idx) and all(len(group) == 3 for group in results)
            seen += list(idx)
        assert sorted(seen) == list(range(5))
        from transformers import AutoModelForCausalLM

        # New weights reach both engines: their log-probs of what they now sample are the new model's.
        model = AutoModelForCausalLM.from_pretrained(TINY_DEFAULT_PATH).eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        fleet.sync_weights(model.state_dict(), version=7, step=0)
        assert fleet.version == 7
        pending = fleet.submit(prompts, 2, SamplingConfig(max_new_tokens=4), seed=1)
        while pending:
            idx, results, _, pending, _ = fleet.wait_any(pending, step=1)
            for k, group in zip(idx, results):
                for r in group:
                    ids = torch.tensor([prompts[k] + list(r.response_ids)])
                    with torch.no_grad():
                        logp = torch.log_softmax(model(ids).logits[0, len(prompts[k]) - 1:-1].float(), -1)
                    ref = logp.gather(-1, torch.tensor(r.response_ids)[:, None])[:, 0]
                    assert torch.allclose(ref, torch.tensor(r.sampling_logp), atol=1e-4), (k, ref, r.sampling_logp)
        fleet.shutdown()
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_killed_engine_is_restarted_and_its_groups_generated_again():
    import ray

    from opefo_rllib.fleet.fleet import EngineFleet

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        kwargs = {"model_path": str(TINY_DEFAULT_PATH), "eos_token_id": TOK.eos_token_id}
        fleet = EngineFleet("hf", num_engines=2, engine_kwargs=kwargs, sync_timeout_s=60)
        from transformers import AutoModelForCausalLM

        state = {k: v * 1.0 for k, v in AutoModelForCausalLM.from_pretrained(TINY_DEFAULT_PATH).state_dict().items()}
        fleet.sync_weights(state, version=3, step=0)
        prompts = [TOK.encode(f"{i}*2=") for i in range(6)]
        cfg = SamplingConfig(max_new_tokens=4)

        def run(kill: bool, engines=(0,)):
            if kill:  # before the calls: killed after, a tiny generation may finish first (a race)
                for e in engines:
                    ray.kill(fleet.actors[e])
            pending = fleet.submit(prompts, 2, cfg, seed=11)
            out = {}
            while pending:
                idx, results, _, pending, _ = fleet.wait_any(pending, step=1)
                out.update({k: [(r.response_ids, r.weight_version) for r in g] for k, g in zip(idx, results)})
            return out

        clean = run(kill=False)
        killed = run(kill=True)
        assert fleet.restarts == 1
        assert killed == clean  # same samples, none lost or duplicated, same weight version
        assert {v for group in killed.values() for _, v in group} == {3}
        ray.kill(fleet.actors[1])  # a dead engine during a weight sync comes back too
        fleet.sync_weights(state, version=4, step=2)
        assert fleet.restarts == 2 and fleet.version == 4
        # both engines gone at once (their node lost): the first failure restarts both, together
        assert run(kill=True, engines=(0, 1)) == {k: [(ids, 4) for ids, _ in g] for k, g in clean.items()}
        assert fleet.restarts == 4
        fleet.shutdown()
    finally:
        ray.shutdown()
