"""The shared-prompt forward (opefo_rllib/models/shared_prompt.py): each distinct prompt of a
micro-batch runs once. It must give the plain forward's stats and gradients on every response
token, for the models users bring (a BPE Qwen2 with chat prompts, Llama, GPT-2's absolute
positions), leave the update unchanged, and fall back when a model's cache path disagrees."""

import logging

import pytest
import torch
from bpe_fixture import bpe_model_dir  # noqa: F401 (fixture)

from opefo_rllib.envs import ArithmeticEnv
from opefo_rllib.models.rl_module import HFCausalLMModule
from opefo_rllib.models.shared_prompt import distinct_prompts

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
ARCHS = {
    "llama": {"model_type": "llama", "vocab_size": 50, "num_key_value_heads": 1, **SMALL},
    "gpt2": {"model_type": "gpt2", "vocab_size": 50, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64},
}


def _module(model_config) -> HFCausalLMModule:
    env = ArithmeticEnv()
    torch.manual_seed(0)
    module = HFCausalLMModule(observation_space=env.observation_space, action_space=env.action_space,
                              model_config={"logits_chunk_size": 7, **model_config})
    module.lm.double()  # float order aside, the two forwards are the same function: compare them in float64
    module.lm.eval()  # GPT-2's dropout would make any two forwards differ
    return module


def _grouped_rows(vocab, groups=5, group_size=4, prompt_len=(2, 9), response_len=(1, 12), seed=0, prompts=None):
    """Right-padded prompt + response rows, group_size rows per prompt, prompts and answers of
    different lengths (one answer of a single token)."""
    g = torch.Generator().manual_seed(seed)
    prompts = prompts or [torch.randint(3, vocab, (int(torch.randint(*prompt_len, (1,), generator=g)),), generator=g)
                          for _ in range(groups)]
    rows = []
    for p in prompts:
        for _ in range(group_size):
            r = torch.randint(3, vocab, (int(torch.randint(*response_len, (1,), generator=g)),), generator=g)
            rows.append((p, r))
    rows[1] = (rows[1][0], rows[1][1][:1])
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn, response = torch.zeros_like(ids), torch.zeros(len(rows), width - 1)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.cat([p, r])
        attn[i, :len(p) + len(r)] = 1
        response[i, len(p) - 1:len(p) - 1 + len(r)] = 1
    return ids, attn, torch.tensor([len(p) for p, _ in rows]), response


def _assert_same_stats_and_gradients(module, ids, attn, plens, response):
    params = [p for p in module.lm.parameters() if p.requires_grad]
    outs = []
    for lengths in (None, plens):
        stats = module.sequence_token_stats(ids, attn, 0.7, prompt_lengths=lengths)
        loss = sum((v * response * w).sum() for v, w in zip(stats, (1.0, 0.3, -2.0)))
        outs.append((stats, torch.autograd.grad(loss, params)))
    (plain, g_plain), (shared, g_shared) = outs
    for a, b in zip(plain, shared):
        torch.testing.assert_close(b * response, a * response, rtol=1e-10, atol=1e-10)
        assert float((b * (1 - response)).abs().max()) == 0.0  # prompt and padding positions: 0
    # Llama's and Qwen2's RMSNorm compute in float32 even on float64 inputs: the gradient a shared
    # prompt receives (the sum over its rows, then cast) and the plain forward's (each row cast, then
    # summed in the weights) round differently, ~1e-7 of the gradient's scale (GPT-2: ~1e-14).
    for a, b in zip(g_plain, g_shared):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.abs().max()))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shared_prompt_stats_and_gradients_equal_the_plain_forward(arch):
    module = _module({"hf_config": ARCHS[arch]})
    ids, attn, plens, response = _grouped_rows(50)
    assert len(distinct_prompts(ids, plens)[0]) == 5
    _assert_same_stats_and_gradients(module, ids, attn, plens, response)
    assert module.share_prompt_forward and module._prompt_sharing_checked  # it did take the shared path


def test_shared_prompt_forward_of_a_bpe_model_with_chat_prompts(bpe_model_dir):
    """A user's Qwen2 with a BPE tokenizer and a chat template: long templated prompts, answers
    from one token to ~60, two prompts that share all but their last tokens."""
    from opefo_rllib.models.loading import load_tokenizer

    tok = load_tokenizer(bpe_model_dir)
    texts = ["What is 12 times 8?", "What is 12 times 9?", "A train leaves at 3 pm and travels 240 km at 80 km/h. "
             "When does it arrive? Put the answer in \\boxed{}."]
    prompts = [torch.tensor(tok.encode_chat([{"role": "user", "content": t}])) for t in texts]
    module = _module({"model_path": str(bpe_model_dir)})
    ids, attn, plens, response = _grouped_rows(len(tok), group_size=3, response_len=(1, 60), prompts=prompts)
    assert int(plens.max()) > 20
    _assert_same_stats_and_gradients(module, ids, attn, plens, response)


def test_rows_without_a_repeated_prompt_or_with_sharing_off_take_the_plain_forward(monkeypatch):
    module = _module({"hf_config": ARCHS["llama"]})
    calls = []
    monkeypatch.setattr(module, "_shared_prompt_stats", lambda *a: calls.append(a))
    ids, attn, plens, _ = _grouped_rows(50, group_size=1)  # every prompt once: nothing to share
    module.sequence_token_stats(ids, attn, prompt_lengths=plens)
    off = _module({"hf_config": ARCHS["llama"], "share_prompt_forward": False})
    monkeypatch.setattr(off, "_shared_prompt_stats", lambda *a: calls.append(a))
    ids, attn, plens, _ = _grouped_rows(50)
    off.sequence_token_stats(ids, attn, prompt_lengths=plens)
    assert calls == []


def test_a_model_whose_cache_path_disagrees_keeps_the_plain_forward_with_a_warning(caplog):
    """A model that ignores position_ids in its cached forward (as a broken custom model might)
    fails the one-time check: a warning names the field, and the stats are the plain forward's."""
    module = _module({"hf_config": {**ARCHS["llama"], "initializer_range": 0.2}})  # positions matter
    body = module.lm.base_model
    forward = body.forward

    def ignores_positions(*args, position_ids=None, **kwargs):
        return forward(*args, **kwargs)

    body.forward = ignores_positions
    ids, attn, plens, response = _grouped_rows(50)
    with caplog.at_level(logging.WARNING):
        stats = module.sequence_token_stats(ids, attn, prompt_lengths=plens)
    assert "share_prompt_forward is off" in caplog.text and not module.share_prompt_forward
    plain = module.sequence_token_stats(ids, attn)
    torch.testing.assert_close(stats.logp, plain.logp)
    assert float((stats.logp * (1 - response)).abs().sum()) > 0  # the plain forward fills prompt positions too


@pytest.mark.slow
def test_the_update_with_shared_prompts_is_the_plain_update():
    """One OPEFO step (and the realized-change re-score) of the learner on a real rollout batch:
    the same loss, lambda and weights with the shared-prompt forward as without it."""
    from learner_fixtures import build_learner, rollout_batch, make_engine

    batch = rollout_batch(make_engine(), prompts=6, group=4, seed=3)
    shared, plain = build_learner(adam_eps=1e-3), build_learner(adam_eps=1e-3, share_prompt_forward=False)
    m_shared = shared.update_from_rollouts(batch, 0).metrics
    m_plain = plain.update_from_rollouts(batch, 0).metrics
    assert shared._module["default_policy"]._prompt_sharing_checked
    assert not plain._module["default_policy"]._prompt_sharing_checked
    for key in ("learner/loss", "learner/grad_norm", "entropy_flow/lambda_star", "policy/entropy",
                "entropy_flow/realized_change"):
        assert m_shared[key] == pytest.approx(m_plain[key], rel=1e-5, abs=1e-7), key
    for k, w in plain.policy_weights().items():
        torch.testing.assert_close(shared.policy_weights()[k], w, rtol=1e-5, atol=1e-7)
