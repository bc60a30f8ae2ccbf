"""Torch backend for the attention statistics: chunked over query blocks, float64-capable.

It is the CPU path and the test oracle. Memory is ``O(B * H * block_rows * N)``: the probabilities of
one block of query rows at a time, never the whole ``H x N x N``. Inputs arrive validated
(``agdo_kernels._checks``); masks are bool ``(B, N)`` tensors or ``None``.
"""

from __future__ import annotations

import torch

# Query rows per chunk; B*H*BLOCK_ROWS*N floats are alive at once.
BLOCK_ROWS = 128


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _key_bias(attention_mask, B: int, N: int, device, dtype) -> torch.Tensor:
    """``(B, 1, 1, 1, N)`` additive bias: 0 at real keys, -inf at padding."""
    bias = torch.zeros(B, N, device=device, dtype=dtype)
    if attention_mask is not None:
        bias = bias.masked_fill(~attention_mask, float("-inf"))
    return bias[:, None, None, None, :]


def _block_probs(q_rows, k, bias, scale):
    """Probabilities of a block of query rows, grouped by KV head.

    q_rows ``(B, H, m, d)``, k ``(B, Hkv, N, d)`` → ``(P, lse)`` with P ``(B, Hkv, g, m, N)`` and
    lse ``(B, Hkv, g, m)``. Rows with no real key get P = 0 and lse = -inf. Only those rows are zeroed:
    a NaN or overflowed (``+inf``) row stays non-finite, so the public wrapper sees it (``_nonfinite``).
    """
    B, H, m, d = q_rows.shape
    Hkv = k.shape[1]
    qg = q_rows.reshape(B, Hkv, H // Hkv, m, d)
    logits = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None])
    return torch.where(torch.isneginf(lse)[..., None], 0.0, probs), lse


def _row_blocks(rows: torch.Tensor):
    for start in range(0, rows.numel(), BLOCK_ROWS):
        yield rows[start : start + BLOCK_ROWS]


def valid_attention(q, k, v, unmasked, attention_mask, scale, return_output, return_lse):
    """``(s, out, lse)``; ``q`` may hold only the last ``Nq`` of the ``N`` key positions (``(B, N)`` masks)."""
    B, H, Nq, d = q.shape
    N = k.shape[2]
    dtype = _compute_dtype(q.dtype)
    device = q.device
    qc, kc = q.to(dtype), k.to(dtype)
    vc = v.to(dtype) if return_output else None
    bias = _key_bias(attention_mask, B, N, device, dtype)
    in_u = unmasked if attention_mask is None else unmasked & attention_mask
    in_u = in_u.to(dtype)[:, None, None, None, :]

    s = torch.zeros(B, Nq, device=device, dtype=dtype)
    out = torch.zeros(B, H, Nq, v.shape[-1], device=device, dtype=q.dtype) if return_output else None
    lse = torch.zeros(B, H, Nq, device=device, dtype=dtype) if return_lse else None
    for rows in _row_blocks(torch.arange(Nq, device=device)):
        probs, block_lse = _block_probs(qc[:, :, rows], kc, bias, scale)
        m = rows.numel()
        s[:, rows] = (probs * in_u).sum(-1).reshape(B, H, m).mean(1)
        if return_output:
            o = torch.matmul(probs, vc[:, :, None])  # (B, Hkv, g, m, dv)
            out[:, :, rows] = o.reshape(B, H, m, -1).to(q.dtype)
        if return_lse:
            block_lse = block_lse.reshape(B, H, m)
            lse[:, :, rows] = torch.where(torch.isneginf(block_lse), torch.zeros_like(block_lse), block_lse)
    if attention_mask is not None:
        s = s * attention_mask[:, N - Nq :]
    return s, out, lse


def influence_sum(q, k, lse, attention_mask, query_mask, scale):
    """``I_k = sum over valid query rows i of Abar[i, k]`` (norm="sum"), using the rows' lse."""
    B, H, N, d = q.shape
    Hkv = k.shape[1]
    dtype = _compute_dtype(q.dtype)
    qc, kc, lsec = q.to(dtype), k.to(dtype), lse.to(dtype)
    bias = _key_bias(attention_mask, B, N, q.device, dtype)
    rows_valid = torch.ones(B, N, dtype=torch.bool, device=q.device)
    for mask in (attention_mask, query_mask):
        if mask is not None:
            rows_valid = rows_valid & mask
    total = torch.zeros(B, N, device=q.device, dtype=dtype)
    for rows in _row_blocks(torch.arange(N, device=q.device)):
        m = rows.numel()
        qg = qc[:, :, rows].reshape(B, Hkv, H // Hkv, m, d)
        logits = torch.matmul(qg, kc[:, :, None].transpose(-1, -2)) * scale + bias
        probs = torch.exp(logits - lsec[:, :, rows].reshape(B, Hkv, H // Hkv, m)[..., None])
        weight = rows_valid[:, rows].to(dtype)[:, None, None, :, None]
        total += (probs * weight).sum(dim=(1, 2, 3))
    return total / H


def response_block(q, k, lse, response_start, attention_mask, shift, scale):
    """``Abar_RR[b, i, j] = Abar[predictor row of token P+i, P+j]`` with the rows' lse, ``(B, R, R)``."""
    B, H, N, d = q.shape
    Hkv = k.shape[1]
    P = response_start
    R = N - P
    dtype = _compute_dtype(q.dtype)
    qc, kc, lsec = q.to(dtype), k.to(dtype)[:, :, P:], lse.to(dtype)
    bias = _key_bias(None if attention_mask is None else attention_mask[:, P:], B, R, q.device, dtype)
    abar = torch.zeros(B, R, R, device=q.device, dtype=dtype)
    for rows in _row_blocks(torch.arange(R, device=q.device)):
        m = rows.numel()
        pred = rows + P - int(shift)
        qg = qc[:, :, pred].reshape(B, Hkv, H // Hkv, m, d)
        logits = torch.matmul(qg, kc[:, :, None].transpose(-1, -2)) * scale + bias
        probs = torch.exp(logits - lsec[:, :, pred].reshape(B, Hkv, H // Hkv, m)[..., None])
        abar[:, rows] = probs.sum(dim=(1, 2)) / H
    return abar
