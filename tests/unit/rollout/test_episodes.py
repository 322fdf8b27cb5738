"""Multi-turn episodes without engines: the tokens, masks, versions and rewards an episode gets
turn by turn, and what the learner's tensors and the OPEFO math make of the env's tokens."""

from types import SimpleNamespace

import pytest
import torch

from opefo_rllib.core import entropy_flow, opefo_loss
from opefo_rllib.envs import ArithmeticEnv, RetryWithFeedback, make_env
from opefo_rllib.fleet.engine import GenerationResult
from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
from opefo_rllib.models.tokenizer import load_tokenizer
from opefo_rllib.rollout.batch import Rollout, collate, learner_batch, rollout_metrics
from opefo_rllib.rollout.episodes import EpisodeStepper, episode_limits, episode_metrics, is_multi_turn
from opefo_rllib.rollout.prompts import PromptBuilder

TOK = load_tokenizer(TINY_DEFAULT_PATH)
EOS = TOK.eos_token_id


def _settings(**overrides):
    base = dict(prompt_format="raw", system_prompt=None, max_prompt_tokens=None, on_long_prompt="skip",
                max_turns=None, max_episode_tokens=None, episode_reward="final", env_step_workers=2)
    return SimpleNamespace(**{**base, **overrides})


def _turn(text: str, version: int = 0, finished: bool = True) -> GenerationResult:
    ids = TOK.encode_plain(text) + ([EOS] if finished else [])
    return GenerationResult(0, 0, ids, [-0.5] * len(ids), version, finished)


def _episodes(env, settings, n=1):
    builder = PromptBuilder(TOK, settings)
    stepper = EpisodeStepper(builder, episode_limits(env, settings), settings.env_step_workers)
    env.seed_problems(3)
    problems = env.sample_problems(n)
    prompts = [builder.encode(p.prompt, p.id) for p in problems]
    return stepper, stepper.start(env, problems, list(range(n)), prompts, [""] * n, 1), problems


def test_a_wrong_then_right_episode_has_the_model_and_env_tokens_in_order():
    env = RetryWithFeedback(ArithmeticEnv(), max_retries=2)
    assert is_multi_turn(env) and not is_multi_turn(ArithmeticEnv())
    stepper, (ep,), (problem,) = _episodes(env, _settings())
    stepper.advance([ep], [_turn("0" if problem.answer != "0" else "1")])
    assert not ep.done and ep.turns == 1
    feedback = TOK.encode_plain(env.feedback)
    first = len(TOK.encode_plain("0")) + 1
    assert ep.ids[first:] == feedback and ep.action_mask == [1] * first + [0] * len(feedback)
    assert ep.context() == ep.prompt_ids + ep.ids  # the next turn sees the whole conversation
    stepper.advance([ep], [_turn(problem.answer, version=0)])
    assert ep.done and not ep.cut and ep.rewards == [0.0, 1.0]
    rollout = ep.to_rollout("final")
    assert rollout.reward == 1.0 and rollout.correct and rollout.info["turns"] == 2
    assert rollout.model_tokens == first + len(TOK.encode_plain(problem.answer)) + 1
    assert rollout.sampling_logp.count(0.0) == len(feedback)  # env tokens carry no sampling log-prob
    stepper.close()


def test_max_turns_caps_the_env_and_episode_reward_sum_adds_the_steps():
    env = RetryWithFeedback(ArithmeticEnv(), max_retries=3, retry_discount=0.5)
    settings = _settings(max_turns=2, episode_reward="sum")
    assert episode_limits(env, settings).max_turns == 2 and episode_limits(env, _settings()).max_turns == 4
    stepper, (ep,), _ = _episodes(env, settings)
    stepper.advance([ep], [_turn("x")])
    stepper.advance([ep], [_turn("y")])
    assert ep.done and ep.cut and ep.turns == 2  # cut by max_turns: the env would have taken 4
    assert ep.to_rollout("sum").reward == 0.0 and not ep.to_rollout("sum").finished
    stepper.close()


def test_a_turn_reaching_max_episode_tokens_is_cut_there():
    env = RetryWithFeedback(ArithmeticEnv(), max_retries=3)
    stepper, (ep,), _ = _episodes(env, _settings(max_episode_tokens=5))
    stepper.advance([ep], [_turn("1234567", finished=False)])
    assert ep.done and ep.cut and len(ep.ids) == 5 and ep.action_mask == [1] * 5 and len(ep.logp) == 5
    assert episode_metrics([ep.to_rollout("final")])["episode/cut_frac"] == 1.0
    stepper.close()


def test_an_observation_that_leaves_no_room_ends_the_episode():
    env = RetryWithFeedback(ArithmeticEnv(), max_retries=3)
    stepper, (ep,), (problem,) = _episodes(env, _settings(max_episode_tokens=10))
    wrong = "0" if problem.answer != "0" else "1"
    stepper.advance([ep], [_turn(wrong)])  # the feedback (33 tokens) does not fit in 10
    assert ep.done and ep.cut and all(ep.action_mask)
    stepper.close()


def _two_turn_rollout(version_2: int = 0) -> Rollout:
    """A hand-built episode: prompt "2+2=", turn "5<eos>", feedback "no\\n", turn "4<eos>"."""
    turn_1, obs, turn_2 = TOK.encode_plain("5") + [EOS], TOK.encode_plain("no\n"), TOK.encode_plain("4") + [EOS]
    return Rollout(group_id=0, prompt_ids=TOK.encode("2+2="), response_ids=turn_1 + obs + turn_2,
                   sampling_logp=[-0.1, -0.2, 0.0, 0.0, 0.0, -0.3, -0.4], reward=1.0,
                   weight_version=min(0, version_2), correct=True,
                   action_mask=[1] * len(turn_1) + [0] * len(obs) + [1] * len(turn_2))


def test_collate_masks_exactly_the_model_tokens_of_a_two_turn_episode():
    rollout = _two_turn_rollout()
    other = Rollout(group_id=0, prompt_ids=TOK.encode("2+2="), response_ids=TOK.encode_plain("4") + [EOS],
                    sampling_logp=[-0.5, -0.6], reward=0.0, weight_version=0)
    batch = learner_batch([rollout, other], TOK.pad_token_id, "grpo")
    p = len(rollout.prompt_ids) - 1  # response token j is the target at position p + j
    expected = [0.0] * p + [1, 1, 0, 0, 0, 1, 1]
    assert batch["response_mask"][0].tolist() == expected
    assert batch["response_mask"][1].tolist() == [0.0] * p + [1, 1] + [0.0] * 5
    assert batch["sampling_logp"][0, p:].tolist() == pytest.approx(rollout.sampling_logp)
    assert rollout_metrics([rollout, other], batch)["rollout/response_tokens"] == 6  # 4 model + 2
    assert batch["advantages"][0] > 0 > batch["advantages"][1]


def test_loss_flow_and_gap_ignore_everything_on_the_env_tokens():
    batch = collate([_two_turn_rollout(), _two_turn_rollout()], TOK.pad_token_id)
    mask = batch["response_mask"]
    gen = torch.Generator().manual_seed(0)
    shape = mask.shape
    logp = (-torch.rand(shape, generator=gen) - 0.1).requires_grad_()
    entropy, expected_s = torch.rand(shape, generator=gen) + 0.5, -torch.rand(shape, generator=gen)
    adv = torch.tensor([0.7, -0.4])  # both flow sides present
    loss, stats = opefo_loss(logp, entropy, adv, mask, expected_s)
    loss.backward()
    env_positions = (mask == 0)
    assert float(logp.grad[env_positions].abs().sum()) == 0.0 and float(logp.grad[mask == 1].abs().sum()) > 0
    # Changing anything on an env token changes neither the loss nor the flows.
    noisy = torch.where(env_positions, torch.full_like(entropy, 9.0), entropy)
    loss_2, stats_2 = opefo_loss(logp.detach(), noisy, adv, mask, torch.where(env_positions, 5.0, expected_s))
    assert float(loss_2) == pytest.approx(float(loss)) and stats["P"] > 0 and stats["N"] > 0
    assert stats_2 == pytest.approx(stats)
    delta = entropy_flow(logp.detach(), entropy, adv, "exact", expected_s) * mask
    assert int((delta != 0).sum()) == int(mask.sum())  # one flow per model token, none on the env's
    # The log-prob gap the learner logs compares the model's tokens only (env tokens: no sampling log-prob).
    gap = ((logp.detach() - batch["sampling_logp"]).abs() * mask)
    assert float(gap[env_positions].sum()) == 0.0


def test_chat_observations_make_the_conversation_the_chat_template_renders(smollm2_dir):
    """SmolLM2's template: prompt + turn + observation tokens == the template's whole conversation."""
    tok = load_tokenizer(smollm2_dir)
    builder = PromptBuilder(tok, _settings(prompt_format="chat", system_prompt="Use Python."))
    prompt = builder.encode("What is 17*23?", "p")
    code = "```python\nprint(17*23)\n```"
    turn = tok.encode_plain(code) + [tok.eos_token_ids[0]]  # the model ended its turn with <|im_end|>
    observation = builder.encode_observation("```output\n391\n```", turn[-1])
    conversation = [{"role": "system", "content": "Use Python."}, {"role": "user", "content": "What is 17*23?"},
                    {"role": "assistant", "content": code}, {"role": "user", "content": "```output\n391\n```"}]
    assert prompt + turn + observation == tok.encode_chat(conversation)
    # A turn cut at max_new_tokens (no stop id) gets the template's end of turn from the env.
    cut = builder.encode_observation("x", None)
    assert tok.decode(cut, skip_special_tokens=False).startswith("<|im_end|>")


class _StopAtBar(RetryWithFeedback):
    """The retry env with a turn-end marker: a turn ends right after its first "|"."""

    def turn_end(self, text):
        return text.index("|") + 1 if "|" in text else None


def test_the_envs_turn_end_marker_drops_the_rest_of_the_turn():
    env = _StopAtBar(ArithmeticEnv(), max_retries=2)
    stepper, (ep,), _ = _episodes(env, _settings())
    stepper.advance([ep], [_turn("12|345")])
    kept = TOK.encode_plain("12|")
    assert ep.ids[:len(kept)] == kept and ep.action_mask[:len(kept)] == [1] * len(kept)
    assert ep.ids[len(kept):] == TOK.encode_plain(env.feedback)  # "345" and the stop id are gone
    assert len(ep.logp) == len(ep.ids) and not ep.done and ep.ended_by_marker == 1
    stepper.advance([ep], [_turn("7")])  # no marker: the turn is kept whole
    assert ep.ended_by_marker == 1
    assert episode_metrics([ep.to_rollout("final")])["episode/turns_ended_by_marker"] == 1.0
    stepper.close()
