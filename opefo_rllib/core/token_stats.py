"""Per-token policy statistics: log pi(a_t), entropy H_t and the exact-flow term S_t.

For one state with logits z (already divided by the sampling temperature tau) and
p = softmax(z):

    logp_t      = log p_{a_t}                                  (log-prob of the sampled token)
    H_t         = -sum_b p_b log p_b                           (policy entropy)
    expected_s  = S_t = sum_b p_b^2 (log p_b + H_t)            (used by the "exact" flow estimator)

All three are differentiable. Two paths compute them:

* ``token_stats(logits, tokens)``: from materialised logits [B, T, V].
* ``token_stats_from_hidden(hidden, lm_head_weight, tokens)``: from the last hidden states
  [B, T, D] and the output projection [V, D], ``chunk_size`` rows at a time, so the [B*T, V]
  logits never exist at once. The backward pass recomputes each chunk's logits and applies the
  closed-form gradient below, so peak memory is one chunk of logits plus the weight gradient.

Closed-form gradients with respect to the scaled logits z (used by the chunked paths):

    d logp_a / dz_c = [c = a] - p_c
    d H      / dz_c = -p_c (log p_c + H)
    d S      / dz_c = p_c^2 (2 log p_c + 1) - p_c (2 R + Q) - Q p_c (log p_c + H)
                      + 2 H (p_c^2 - p_c Q)
    with Q = sum_b p_b^2 and R = sum_b p_b^2 log p_b.

Everything is accumulated in float32 (or float64 when the inputs are float64), also for bf16
inputs; gradients come back in the dtype of the inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["TokenStats", "token_stats", "token_stats_from_hidden"]

DEFAULT_CHUNK_SIZE = 1024


class TokenStats(NamedTuple):
    """Per-token statistics, each of shape [B, T]."""

    logp: torch.Tensor
    entropy: torch.Tensor
    expected_s: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats_of_scaled_logits(z: torch.Tensor, tokens: torch.Tensor):
    """Stats for rows of scaled logits z [N, V] (compute dtype). Returns (logp, H, S, logp_all)."""
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    expected_s = (p * p * (logp_all + entropy.unsqueeze(-1))).sum(-1)
    return logp, entropy, expected_s, logp_all


def _lean_stats_(z: torch.Tensor, tokens: torch.Tensor):
    """No-grad stats of scaled logits z [N, V], overwriting z with log p.

    Returns (logp, H, S, logp_all, p) with logp_all aliasing z. At most three [N, V] buffers
    exist at once (z, p, and one product), which bounds the chunked paths' peak memory.
    """
    z.sub_(z.amax(-1, keepdim=True))
    p = z.exp()
    denom = p.sum(-1, keepdim=True)
    p.div_(denom)
    z.sub_(denom.log_())  # z is now log p
    pl = p * z
    entropy = -pl.sum(-1)
    r = torch.bmm(p.unsqueeze(1), pl.unsqueeze(2)).view(-1)  # sum_b p_b^2 log p_b
    del pl
    q = torch.bmm(p.unsqueeze(1), p.unsqueeze(2)).view(-1)  # sum_b p_b^2
    logp = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logp, entropy, r + entropy * q, z, p


def _grad_of_scaled_logits_(z: torch.Tensor, tokens, g_logp, g_entropy, g_s) -> torch.Tensor:
    """Gradient of sum(g_logp*logp + g_entropy*H + g_s*S) w.r.t. scaled logits z [N, V].

    Uses the closed forms of the module docstring, rearranged as
        g_z = p * (c0 + cL * log p + g_s * p * (2 log p + 1 + 2H)) + g_logp * onehot(a)
    with per-row c0 = -g_logp - g_entropy H - g_s (2R + Q (1 + 3H)) and cL = -g_entropy - g_s Q.
    Overwrites z; returns a new [N, V] tensor.
    """
    _, entropy, s, logp_all, p = _lean_stats_(z, tokens)
    q = torch.bmm(p.unsqueeze(1), p.unsqueeze(2)).view(-1, 1)
    g_logp, g_entropy, g_s, h = g_logp.unsqueeze(-1), g_entropy.unsqueeze(-1), g_s.unsqueeze(-1), entropy.unsqueeze(-1)
    r = s.unsqueeze(-1) - h * q  # R = S - H Q
    c0 = -g_logp - g_entropy * h - g_s * (2 * r + q * (1 + 3 * h))
    c_l = -g_entropy - g_s * q
    out = torch.addcmul(c0.expand_as(logp_all), c_l, logp_all)
    logp_all.mul_(2).add_(1 + 2 * h).mul_(p).mul_(g_s)
    out.add_(logp_all).mul_(p)
    out.scatter_add_(-1, tokens.unsqueeze(-1), g_logp)
    return out


def _dense_grads(g_logp, g_entropy, g_s, tokens, dtype):
    """Cotangents of the three outputs, with None (output unused) replaced by zeros."""
    return [torch.zeros(tokens.shape, dtype=dtype, device=tokens.device) if g is None else g.to(dtype)
            for g in (g_logp, g_entropy, g_s)]


def _row_chunks(n_rows: int, chunk_size: int):
    for start in range(0, n_rows, chunk_size):
        yield start, min(start + chunk_size, n_rows)


class _ChunkedLogitStats(torch.autograd.Function):
    """token_stats over flat logits [N, V], chunk by chunk, with the closed-form backward."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature: float, chunk_size: int):
        cdt = _compute_dtype(logits.dtype)
        n = logits.shape[0]
        outs = torch.empty(3, n, dtype=cdt, device=logits.device)
        for s, e in _row_chunks(n, chunk_size):
            z = logits[s:e].to(cdt, copy=True).div_(temperature)
            lp, h, es, _, _ = _lean_stats_(z, tokens[s:e])
            outs[0, s:e], outs[1, s:e], outs[2, s:e] = lp, h, es
        ctx.save_for_backward(logits, tokens)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return outs[0], outs[1], outs[2]

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_s):
        logits, tokens = ctx.saved_tensors
        cdt = _compute_dtype(logits.dtype)
        grads = _dense_grads(g_logp, g_entropy, g_s, tokens, cdt)
        grad_logits = torch.empty_like(logits)
        for s, e in _row_chunks(logits.shape[0], ctx.chunk_size):
            z = logits[s:e].to(cdt, copy=True).div_(ctx.temperature)
            g_z = _grad_of_scaled_logits_(z, tokens[s:e], *(g[s:e] for g in grads))
            grad_logits[s:e] = g_z.div_(ctx.temperature)
        return grad_logits, None, None, None


class _ChunkedHiddenStats(torch.autograd.Function):
    """token_stats from hidden [N, D] and lm-head weight [V, D]; logits recomputed per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature: float, chunk_size: int):
        cdt = _compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        outs = torch.empty(3, n, dtype=cdt, device=hidden.device)
        for s, e in _row_chunks(n, chunk_size):
            z = (hidden[s:e] @ weight.t()).to(cdt).div_(temperature)
            lp, h, es, _, _ = _lean_stats_(z, tokens[s:e])
            outs[0, s:e], outs[1, s:e], outs[2, s:e] = lp, h, es
        ctx.save_for_backward(hidden, weight, tokens)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return outs[0], outs[1], outs[2]

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_s):
        hidden, weight, tokens = ctx.saved_tensors
        cdt = _compute_dtype(hidden.dtype)
        grads = _dense_grads(g_logp, g_entropy, g_s, tokens, cdt)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        # The weight gradient is accumulated in the compute dtype, then cast once.
        grad_weight = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        w_c = weight.to(cdt)
        for s, e in _row_chunks(hidden.shape[0], ctx.chunk_size):
            h_c = hidden[s:e].to(cdt)
            z = (h_c @ w_c.t()).div_(ctx.temperature)
            g_z = _grad_of_scaled_logits_(z, tokens[s:e], *(g[s:e] for g in grads))
            del z
            g_z.div_(ctx.temperature)
            if need_h:
                grad_hidden[s:e] = (g_z @ w_c).to(hidden.dtype)
            if need_w:
                grad_weight.addmm_(g_z.t(), h_c)
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _check_shapes(lead: torch.Tensor, tokens: torch.Tensor, what: str) -> None:
    if lead.dim() != 3:
        raise ValueError(f"{what} must be [B, T, *] (3-D), got shape {tuple(lead.shape)}")
    if tuple(tokens.shape) != tuple(lead.shape[:2]):
        raise ValueError(
            f"tokens must be [B, T] = {tuple(lead.shape[:2])} to match {what}, got {tuple(tokens.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_stats(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> TokenStats:
    """Per-token log-prob, entropy and exact-flow term from logits.

    Args:
        logits: [B, T, V] raw logits (any float dtype; bf16 is accumulated in float32).
        tokens: [B, T] sampled token ids (int64).
        temperature: sampling temperature tau; stats are those of softmax(logits / tau).
        chunk_size: if set, process this many (b, t) rows at a time with a closed-form backward,
            so float32 intermediates exist for one chunk only.

    Returns:
        TokenStats(logp, entropy, expected_s), each [B, T] in float32 (float64 for float64 input).
    """
    _check_shapes(logits, tokens, "logits")
    _check_temperature(temperature)
    b, t, v = logits.shape
    if chunk_size is None:
        z = logits.to(_compute_dtype(logits.dtype)) / temperature
        lp, h, es, _ = _stats_of_scaled_logits(z.reshape(b * t, v), tokens.reshape(-1))
    else:
        lp, h, es = _ChunkedLogitStats.apply(
            logits.reshape(b * t, v), tokens.reshape(-1), float(temperature), int(chunk_size)
        )
    return TokenStats(lp.view(b, t), h.view(b, t), es.view(b, t))


def token_stats_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> TokenStats:
    """Per-token stats computed from last hidden states without materialising all logits.

    logits = hidden @ lm_head_weight.T, computed ``chunk_size`` rows at a time in the forward
    and recomputed per chunk in the backward. Gradients flow to ``hidden`` and
    ``lm_head_weight``. With ``chunk_size=None`` the full logits are built (reference path).

    Args:
        hidden: [B, T, D] final hidden states (after the final norm).
        lm_head_weight: [V, D] output projection (tied embeddings work the same way).
        tokens: [B, T] token ids whose log-prob is wanted.
        temperature: sampling temperature tau.
        chunk_size: rows per chunk; the peak extra memory is about chunk_size * V floats.

    Example:
        >>> h = torch.randn(2, 5, 8, requires_grad=True); w = torch.randn(50, 8)
        >>> s = token_stats_from_hidden(h, w, torch.randint(50, (2, 5)), chunk_size=4)
        >>> s.logp.shape
        torch.Size([2, 5])
    """
    _check_shapes(hidden, tokens, "hidden")
    _check_temperature(temperature)
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, D] with D = {hidden.shape[-1]}, got {tuple(lm_head_weight.shape)}"
        )
    b, t, d = hidden.shape
    if chunk_size is None:
        return token_stats(hidden @ lm_head_weight.t(), tokens, temperature)
    lp, h, es = _ChunkedHiddenStats.apply(
        hidden.reshape(b * t, d), lm_head_weight, tokens.reshape(-1), float(temperature), int(chunk_size)
    )
    return TokenStats(lp.view(b, t), h.view(b, t), es.view(b, t))
