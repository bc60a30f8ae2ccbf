"""Influence ``I_k = sum over valid query rows i of Abar[i, k]`` (norm "sum") from the rows' ``lse``.

FlashAttention-backward structure: one program per (block of ``BLOCK_N`` keys, batch, query head) keeps
its key tile resident and streams every query block of that head, recomputing
``p = exp2(k.q * qk_scale - lse2)`` transposed (keys x queries) so the column sums it needs are row
sums, which stay inside a warp. Column sums accumulate in fp32 registers; each program writes its
head's partial ``(B, H, N)`` row and one more launch averages over heads (:func:`.nonfinite.finish_rows`,
with the non-finite row rule): deterministic, no atomics on the statistics.

Why one program per query head rather than per GQA group: the key tile is loaded once either way and
the streamed queries are the same, but a group-per-program grid has ``g`` times fewer programs, which
leaves most SMs idle for Dream-like shapes (Hkv = 4, B = 1) unless N is very long.

Rows that do not count (padding, ``query_mask`` False, past N) get ``lse = +inf`` so their ``p`` is
exactly 0; padded keys are zeroed once at the end (with a given ``lse`` they do not affect other keys).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    as_bytes,
    check_supported,
    dot_precision,
    launch,
    load_tile,
    lse_log2,
    real_keys,
    tuning_bucket,
    tuning_configs,
)
from .nonfinite import finish_rows, flag_if_nonfinite, flag_nonfinite_rows

# (BLOCK_M query rows per step, BLOCK_N keys per program, num_warps, num_stages) for H100.
_GPU_CONFIGS = [
    (64, 128, 8, 3),
    (128, 128, 8, 3),
    (64, 128, 4, 3),
    (128, 64, 4, 3),
    (64, 64, 4, 4),
    (128, 128, 8, 2),
    (64, 64, 4, 2),
]


@triton.jit
def _query_block_mass(
    k,
    q_base,
    lse2_row,
    start_m,
    N,
    stride_qn,
    stride_qd,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BOUNDARY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``sum_i p[i, key]`` over query rows ``[start_m, start_m + BLOCK_M)`` for every key of the tile."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = load_tile(q_base, offs_m, N, stride_qn, tl.arange(0, HEAD_DIM), stride_qd, BOUNDARY)
    if BOUNDARY:
        lse2 = tl.load(lse2_row + offs_m, mask=offs_m < N, other=float("inf"))
    else:
        lse2 = tl.load(lse2_row + offs_m)
    logits_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (keys, queries)
    p_t = tl.math.exp2(logits_t * qk_scale - lse2[None, :])
    return tl.sum(p_t, 1)


@triton.autotune(configs=tuning_configs(_GPU_CONFIGS), key=["N_BUCKET", "HEAD_DIM", "HAS_KEY_MASK"])
@triton.jit
def _influence_kernel(
    q_ptr,
    k_ptr,
    lse2_ptr,
    key_mask_ptr,
    part_ptr,
    flags_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    H,
    GROUP,
    N,
    N_BUCKET,  # autotuning key only
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tiles = tl.cdiv(N, BLOCK_N)  # one flat grid axis, key tiles of one head adjacent (see valid_attention)
    bh = (tl.program_id(0) // tiles).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = (tl.program_id(0) % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    k = load_tile(k_base, offs_n, N, stride_kn, tl.arange(0, HEAD_DIM), stride_kd, True)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    lse2_row = lse2_ptr + bh * N

    col_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        col_sum += _query_block_mass(
            k, q_base, lse2_row, start_m, N, stride_qn, stride_qd, qk_scale, HEAD_DIM, BLOCK_M, False, DOT_PRECISION
        )
    if m_full < N:
        col_sum += _query_block_mass(
            k, q_base, lse2_row, m_full, N, stride_qn, stride_qd, qk_scale, HEAD_DIM, BLOCK_M, True, DOT_PRECISION
        )
    keys = real_keys(key_mask_ptr + b * N, offs_n, N, HAS_KEY_MASK)
    col_sum = tl.where(keys, col_sum, 0.0)
    tl.store(part_ptr + bh * N + offs_n, col_sum, mask=offs_n < N)
    flag_if_nonfinite(flags_ptr, b, col_sum)  # an overflow poisons the row


def influence_sum(q, k, lse, attention_mask, query_mask, scale):
    """Triton twin of ``reference.attention.influence_sum``: float32 ``(B, N)``, not normalised."""
    check_supported(q)
    B, H, N, d = q.shape
    Hkv = k.shape[1]
    if B * H * N == 0:
        return torch.zeros(B, N, dtype=torch.float32, device=q.device)

    flags = flag_nonfinite_rows(B, q, k, lse, device=q.device)  # the non-finite row rule, on the inputs
    lse2 = lse_log2(lse)
    rows = None
    for mask in (attention_mask, query_mask):
        if mask is not None:
            rows = mask if rows is None else rows & mask
    if rows is not None:
        lse2.masked_fill_(~rows[:, None, :], float("inf"))
    key_mask = as_bytes(attention_mask)
    part = torch.empty(B, H, N, dtype=torch.float32, device=q.device)  # every element written

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * B * H,)

    launch(
        _influence_kernel, grid,
        q, k, lse2, key_mask if key_mask is not None else part, part, flags,
        *q.stride(), *k.stride(),
        H, H // Hkv, N, tuning_bucket(N), scale * LOG2E,
        HEAD_DIM=d, HAS_KEY_MASK=key_mask is not None, DOT_PRECISION=dot_precision(q.dtype),
        gpu_configs=_GPU_CONFIGS, dtype=q.dtype, head_dim=d, device=q.device,
    )  # fmt: skip
    return finish_rows(part, flags)
