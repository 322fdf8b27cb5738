"""A user's own Hugging Face model, without Ray: its tokenizer, prompts (raw, chat, too long),
stopping at every EOS id, and the text the verifier reads. The model is a small random Qwen2
with a trained byte-level BPE tokenizer (tests/support/bpe_fixture.py)."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from bpe_fixture import bpe_model_dir, build_bpe_model, without_tokenizer  # noqa: F401 (fixture)
from opefo_rllib.config.fields import ConfigError
from opefo_rllib.config.sections import PromptSettings
from opefo_rllib.envs.base import Problem
from opefo_rllib.fleet.engine import SamplingConfig
from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
from opefo_rllib.models.tokenizer import CharTokenizer, TokenizerError, load_tokenizer
from opefo_rllib.rollout.prompts import (MAX_DRAWS_PER_PROMPT, PromptBuilder, PromptTooLongError, draw_prompts,
                                         response_text)


@pytest.fixture(scope="module")
def tok(bpe_model_dir):
    return load_tokenizer(bpe_model_dir)


def test_hf_model_dir_loads_its_own_tokenizer_with_every_eos_id_and_a_pad_fallback(bpe_model_dir, tok):
    im_end, endoftext = tok.hf.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    # generation_config.json lists both (Qwen-style); config.json and the tokenizer name one each.
    assert tok.eos_token_ids == (im_end, endoftext)
    assert tok.hf.pad_token_id is None and tok.pad_token_id == im_end  # no pad token: the first EOS id
    assert len(tok) == json.loads((bpe_model_dir / "config.json").read_text())["vocab_size"]
    text = "Natalia sold clips to 48 of her friends. What is 12+7?"
    assert tok.decode(tok.encode(text)) == text


def test_tiny_model_dir_keeps_its_character_tokenizer():
    # A qwen2 config.json beside opefo_char_tokenizer.json: AutoTokenizer would build an empty BPE.
    tok = load_tokenizer(TINY_DEFAULT_PATH)
    assert tok.encode("12+3=") == CharTokenizer.load(TINY_DEFAULT_PATH).encode("12+3=")
    assert tok.eos_token_ids == (2,) and tok.pad_token_id == 0 and tok.chat_template is None


def test_a_model_dir_without_a_tokenizer_is_an_error_naming_it(bpe_model_dir, tmp_path):
    bare = without_tokenizer(bpe_model_dir, tmp_path / "weights_only")
    with pytest.raises(TokenizerError, match=rf"model dir {bare} has no tokenizer: neither opefo_char_tokenizer.json"):
        load_tokenizer(bare)


def test_a_tokenizer_that_transformers_rebuilds_differently_is_refused(tmp_path):
    # GPT-2's pre-tokenizer in a qwen2 dir: AutoTokenizer builds Qwen2Tokenizer (Qwen's split) instead.
    odd = build_bpe_model(tmp_path / "gpt2_split", qwen2_split=False)
    with pytest.raises(TokenizerError, match=r"Qwen2Tokenizer that tokenizes differently from the directory's "
                                             r"tokenizer.json"):
        load_tokenizer(odd)


def _settings(**kwargs):
    return PromptSettings(**kwargs)


def test_raw_prompts_are_the_env_text_and_chat_prompts_go_through_the_template(tok):
    assert PromptBuilder(tok, _settings()).encode("3+4=", "p1") == tok.encode("3+4=")
    chat = PromptBuilder(tok, _settings(prompt_format="chat", system_prompt="Be brief.")).encode("3+4=", "p1")
    assert tok.decode(chat, skip_special_tokens=False) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                                           "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n")
    plain = PromptBuilder(tok, _settings(prompt_format="chat")).encode("3+4=", "p1")
    assert tok.decode(plain, skip_special_tokens=False) == "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"


def test_chat_without_a_chat_template_is_an_error_naming_the_model_dir_and_field(bpe_model_dir, tmp_path, tok):
    no_template = tmp_path / "no_template"
    shutil.copytree(bpe_model_dir, no_template, ignore=shutil.ignore_patterns("chat_template*"))
    plain = load_tokenizer(no_template)
    assert plain.chat_template is None
    with pytest.raises(ConfigError, match=rf"'prompt_format' = 'chat': the tokenizer of model dir {no_template} "
                                          "has no chat template"):
        PromptBuilder(plain, _settings(prompt_format="chat"))
    with pytest.raises(ConfigError, match="'system_prompt' is set but prompt_format is 'raw'"):
        PromptBuilder(tok, _settings(system_prompt="Be brief."))


def test_a_prompt_over_max_prompt_tokens_is_skipped_and_counted_or_names_its_problem(tok):
    long_text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May."
    n = len(tok.encode(long_text))
    skip = PromptBuilder(tok, _settings(max_prompt_tokens=n - 1))
    assert skip.encode(long_text, "gsm8k-7") is None and skip.skipped_too_long == 1
    assert skip.encode("3+4=", "short") == tok.encode("3+4=")  # never cut: short ones pass as they are
    assert PromptBuilder(tok, _settings(max_prompt_tokens=n)).encode(long_text, "gsm8k-7") == tok.encode(long_text)
    strict = PromptBuilder(tok, _settings(max_prompt_tokens=n - 1, on_long_prompt="error"))
    with pytest.raises(PromptTooLongError, match=rf"problem 'gsm8k-7': its prompt is {n} tokens \(raw format\), "
                                                 rf"over max_prompt_tokens = {n - 1}"):
        strict.encode(long_text, "gsm8k-7")


class _Env:
    """Draws problems in order from a list, cycling; long ones are over the limit used below."""

    def __init__(self, prompts):
        self.prompts, self.drawn = prompts, 0

    def sample_problems(self, n):
        out = [Problem(id=f"q{self.drawn + i}", prompt=self.prompts[(self.drawn + i) % len(self.prompts)], answer="1")
               for i in range(n)]
        self.drawn += n
        return out


def test_draw_prompts_replaces_skipped_problems_and_bounds_the_retries(tok):
    short, long = "1+1=", "What is the sum of one hundred and twenty three and four hundred and fifty six?"
    builder = PromptBuilder(tok, _settings(max_prompt_tokens=len(tok.encode(short))))
    env = _Env([short, long, long, short])
    draw = draw_prompts(env, builder, 3)
    assert [p.id for p in draw.problems] == ["q0", "q3", "q4"]  # q1, q2 skipped; replacements drawn in order
    assert draw.skipped_too_long == 2 and len(draw.prompt_ids) == 3
    with pytest.raises(PromptTooLongError, match=rf"env 'my/Env-v0': drew {MAX_DRAWS_PER_PROMPT * 2} problems for "
                                                 rf"a batch of 2 prompts and {MAX_DRAWS_PER_PROMPT * 2} were over"):
        draw_prompts(_Env([long]), builder, 2, env_name="my/Env-v0")


def test_response_text_drops_the_stop_token_and_special_tokens(tok):
    answer = tok.encode(" The answer is 42.")
    dot = tok.encode(".")[-1]
    assert response_text(tok, answer + [tok.eos_token_ids[1]], finished=True) == " The answer is 42."
    assert response_text(tok, answer[:-1] + [dot], finished=True) == " The answer is 42"  # a plain stop token too
    assert response_text(tok, answer, finished=False) == " The answer is 42."  # cut at max_new_tokens: all of it
    chat_markers = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert "<|im_start|>" not in response_text(tok, chat_markers, finished=False)


def test_hf_engine_stops_at_every_eos_id_and_at_stop_token_ids(bpe_model_dir, tok):
    from opefo_rllib.fleet.hf_engine import HFEngine

    engine = HFEngine(str(bpe_model_dir), eos_token_id=list(tok.eos_token_ids), pad_token_id=tok.pad_token_id)
    prompts = [tok.encode("3+4="), tok.encode("What is 12 times 8?")]
    free = engine.generate(prompts, 2, SamplingConfig(max_new_tokens=8), seed=3)[0][0].response_ids
    pos = next(i for i in range(1, len(free)) if free[i] not in free[:i] and free[i] not in tok.eos_token_ids)
    target = free[pos]
    # The same seed samples the same tokens up to the stop: a stop id ends the response right there.
    stopped = engine.generate(prompts, 2, SamplingConfig(max_new_tokens=8, stop_token_ids=[target]), seed=3)[0][0]
    assert stopped.response_ids == free[:pos + 1] and stopped.finished
    # The same as the model's second EOS id (of two): every EOS id ends a response.
    second = HFEngine(str(bpe_model_dir), eos_token_id=[tok.eos_token_ids[0], target], pad_token_id=tok.pad_token_id)
    res = second.generate(prompts, 2, SamplingConfig(max_new_tokens=8), seed=3)[0][0]
    assert res.response_ids == free[:pos + 1] and res.finished
    # Its log-probs are those of a plain forward pass (left padding with the EOS pad id is masked).
    ids = torch.tensor([prompts[0] + res.response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(ids).logits[0, len(prompts[0]) - 1:-1].float(), -1)
    ref = logp.gather(-1, torch.tensor(res.response_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(res.sampling_logp), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="SamplingConfig.stop_token_ids must be token ids"):
        SamplingConfig(stop_token_ids=[-1])


def test_prompt_builder_takes_any_object_with_the_prompt_fields(tok):
    # Evaluation passes its own settings object; the algorithm config works the same way.
    fields = SimpleNamespace(prompt_format="raw", system_prompt=None, max_prompt_tokens=None, on_long_prompt="skip")
    assert PromptBuilder(tok, fields).encode("2+2=", "x") == tok.encode("2+2=")
