"""The learner's forward with each prompt computed once, not once per sample (shared-prompt forward).

A GRPO batch holds every prompt ``group_size`` times, and the plain forward runs the transformer
over prompt + response of every row. On the default workload (prompts of ~6 characters, answers
of ~3) that is 7/8 of the prompt work done again for nothing: most of the learner's time
(benchmarks/iteration_profile.py). Here, per micro-batch:

1. each distinct prompt runs once (right-padded), with its key/value cache kept;
2. the cache is copied to the rows that share the prompt (``index_select``: differentiable, so
   the prompt's gradient is the sum over its rows, exactly as in the plain forward);
3. only the responses run per row, at their true positions (``position_ids`` = prompt length + j),
   attending to their prompt's cache through the attention mask;
4. the hidden state that predicts response token j is the prompt's last one for j = 0 and the
   response's (j - 1)-th after that.

Response tokens get the plain forward's log pi, H and S up to float summation order; prompt
positions, which no loss reads, come back as 0. Any Hugging Face causal LM whose forward takes
``past_key_values`` and ``position_ids`` works; ``HFCausalLMModule`` checks a model once against
the plain forward before using this path and falls back when it disagrees.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["ResponseLayout", "distinct_prompts", "response_layout", "response_positions", "right_padded",
           "shared_prompt_hidden", "scatter_to_rows"]


class ResponseLayout(NamedTuple):
    """Where each response token sits: row-aligned [N, R] tensors."""

    targets: torch.Tensor  # the response's token ids (0 past its end)
    valid: torch.Tensor  # bool: a real response token
    columns: torch.Tensor  # its column in the plain layout's [N, L-1] stats (target t at column t - 1)


def distinct_prompts(input_ids: torch.Tensor, prompt_lengths: torch.Tensor):
    """The distinct prompts of right-padded rows [N, L]: ``(prompts [G, P], prompt_mask [G, P],
    inverse [N])`` with row i's prompt = prompts[inverse[i]] (compared token by token)."""
    width = int(prompt_lengths.max())
    inside = torch.arange(width, device=input_ids.device) < prompt_lengths[:, None]
    marked = torch.where(inside, input_ids[:, :width], -1)  # -1: past the prompt (no token id is < 0)
    unique, inverse = torch.unique(marked, dim=0, return_inverse=True)
    return unique.clamp(min=0), (unique >= 0).long(), inverse


def response_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_lengths: torch.Tensor) -> ResponseLayout:
    n, width = input_ids.shape
    lengths = attention_mask.sum(-1)
    longest = max(int((lengths - prompt_lengths).max()), 1)
    step = torch.arange(longest, device=input_ids.device)
    position = prompt_lengths[:, None] + step  # [N, R] positions in the full row
    valid = position < lengths[:, None]
    targets = torch.where(valid, input_ids.gather(1, position.clamp(max=width - 1)), 0)
    # Padding goes to columns width - 1 + j, past the plain layout, so no two tokens share a column.
    columns = torch.where(valid, position - 1, width - 1 + step)
    return ResponseLayout(targets, valid, columns)


def shared_prompt_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         prompt_lengths: torch.Tensor, distinct: tuple | None = None,
                         ) -> tuple[torch.Tensor, ResponseLayout]:
    """The last hidden states that predict each row's response tokens, [N, R, D], computed with
    each distinct prompt once; ``model`` is the transformer body (``lm.base_model``), rows right-padded
    prompt + response with ``prompt_lengths`` [N] (every prompt at least one token); ``distinct``:
    ``distinct_prompts`` of these rows, when the caller has it already."""
    prompts, prompt_mask, inverse = distinct if distinct is not None else distinct_prompts(input_ids, prompt_lengths)
    out = model(input_ids=prompts, attention_mask=prompt_mask, use_cache=True)
    cache = out.past_key_values
    cache.reorder_cache(inverse)  # [G, ...] -> [N, ...]: each row gets its prompt's keys and values
    last = out.last_hidden_state[torch.arange(len(prompts), device=input_ids.device),
                                 prompt_mask.sum(-1) - 1][inverse]  # predicts token 0
    layout = response_layout(input_ids, attention_mask, prompt_lengths)
    if layout.targets.shape[1] == 1:  # one response token: the prompt's last state predicts it
        return last[:, None], layout
    inputs = layout.targets[:, :-1]  # response token j is the input that predicts token j + 1
    positions = prompt_lengths[:, None] + torch.arange(inputs.shape[1], device=input_ids.device)
    mask = torch.cat([prompt_mask[inverse], layout.valid[:, :-1].long()], dim=1)
    hidden = model(input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=False).last_hidden_state
    return torch.cat([last[:, None], hidden], dim=1), layout


def response_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       prompt_lengths: torch.Tensor) -> torch.Tensor:
    """bool [N, L-1]: the plain layout's columns that predict a response token (target t at t - 1)."""
    column = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
    return (column >= prompt_lengths[:, None] - 1) & (column < attention_mask.sum(-1, keepdim=True) - 1)


def scatter_to_rows(values: torch.Tensor, layout: ResponseLayout, width: int) -> torch.Tensor:
    """Response-aligned values [N, R] into the plain layout [N, width] (0 off the responses);
    differentiable in ``values``."""
    n, longest = values.shape
    out = values.new_zeros(n, width + longest)
    return out.scatter(1, layout.columns, torch.where(layout.valid, values, 0))[:, :width]


def right_padded(sequences, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, response ids) pairs as right-padded rows: ``(input_ids [N, L],
    attention_mask [N, L], prompt_lengths [N])``."""
    rows = [list(p) + list(r) for p, r in sequences]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attn[i, :len(row)] = 1
    return ids, attn, torch.tensor([len(p) for p, _ in sequences], dtype=torch.long)
