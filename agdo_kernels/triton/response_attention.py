"""Response block ``Abar_RR (B, R, R)``: head-averaged probabilities of the response predictor rows on
the response keys, recomputed tile by tile from the rows' ``lse``.

One program per (block of ``BLOCK_M`` response rows, block of ``BLOCK_N`` response keys, batch) sums
``p = exp2(q.k * qk_scale - lse2)`` over all ``H`` heads in an fp32 register tile, loading each KV
head's key tile once for the ``g`` query heads of its group (the loop over those heads is software
pipelined, and on sm_90+ the next group's key tile loads while this group's heads compute; without GQA,
one pipelined loop over the heads prefetches query and key tiles alike), and
writes its tile of the output once: memory ``O(B * R^2)``, deterministic. Row ``i`` reads query row
``P + i - shift`` (its predictor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    as_bytes,
    cdiv,
    check_supported,
    cuda_arch,
    dot_precision,
    launch,
    load_tile,
    lse_log2,
    real_keys,
    tuning_bucket,
    tuning_configs,
)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for H100, the first one pinned. Only configs without register
# spills on sm_90 at head dim 128 (bench/compile_report.py; 128-row tiles spill since the column-major store).
# The last (smallest) one is fp32's: 8 warps keep its tf32x3 tiles in registers.
_GPU_CONFIGS = [
    (64, 128, 8, 3),
    (64, 64, 4, 3),
    (64, 64, 4, 2),
    (64, 32, 8, 1),
]


@triton.jit
def _add_head(total, q_rows, lse2_rows, k, h, offs_i, offs_d, R, N, stride_qh, stride_qn, stride_qd, qk_scale,
              DOT_PRECISION: tl.constexpr):  # fmt: skip
    """``total + p`` of query head ``h`` on the key tile ``k``, from the rows' base-2 lse."""
    q = load_tile(q_rows + h * stride_qh, offs_i, R, stride_qn, offs_d, stride_qd, True)
    lse2 = tl.load(lse2_rows + h * N + offs_i, mask=offs_i < R, other=float("inf"))
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    return total + tl.math.exp2(logits * qk_scale - lse2[:, None])


@triton.autotune(
    configs=tuning_configs(_GPU_CONFIGS), key=["R_BUCKET", "HEAD_DIM", "HAS_KEY_MASK", "ONE_HEAD_PER_KV"]
)
@triton.jit
def _response_block_kernel(
    q_ptr,
    k_ptr,
    lse2_ptr,
    key_mask_ptr,
    abar_ptr,
    stride_ab,
    stride_ai,
    stride_aj,
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
    R,
    R_BUCKET,  # autotuning key only
    first_key,
    first_row,
    qk_scale,
    ONE_HEAD_PER_KV: tl.constexpr,  # GROUP == 1: the single pipelined loop over heads
    PREFETCH_NEXT_KV: tl.constexpr,  # GQA on sm_90+: the next group's key tile loaded during this group's heads
    HEAD_DIM: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    offs_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_inside = offs_i < R
    q_rows = q_ptr + b * stride_qb + first_row * stride_qn
    k_rows = k_ptr + b * stride_kb + first_key * stride_kn
    lse2_rows = lse2_ptr + b * H * N + first_row

    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ONE_HEAD_PER_KV:
        # One query head per key head (LLaDA): a single loop over heads, so the software pipeliner prefetches
        # the next head's query and key tiles while this one computes.
        for h in range(0, H):
            k = load_tile(k_rows + h * stride_kh, offs_j, R, stride_kn, offs_d, stride_kd, True)
            total = _add_head(total, q_rows, lse2_rows, k, h, offs_i, offs_d, R, N, stride_qh, stride_qn, stride_qd,
                              qk_scale, DOT_PRECISION)  # fmt: skip
    else:
        # GQA: each key tile loaded once for the GROUP query heads of its group (their loop is pipelined). On
        # Hopper the next group's tile is requested before that loop, so its load overlaps this group's heads
        # (the last group re-requests its own tile: an L2 hit, no branch); before sm_90 the extra registers
        # cost more than the wait (bench/compile_report.py).
        kv_heads = H // GROUP
        if PREFETCH_NEXT_KV:
            k_next = load_tile(k_rows, offs_j, R, stride_kn, offs_d, stride_kd, True)
        for kv in range(0, kv_heads):
            if PREFETCH_NEXT_KV:
                k = k_next
                k_next = load_tile(k_rows + tl.minimum(kv + 1, kv_heads - 1) * stride_kh, offs_j, R, stride_kn,
                                   offs_d, stride_kd, True)  # fmt: skip
            else:
                k = load_tile(k_rows + kv * stride_kh, offs_j, R, stride_kn, offs_d, stride_kd, True)
            for h in range(kv * GROUP, (kv + 1) * GROUP):
                total = _add_head(total, q_rows, lse2_rows, k, h, offs_i, offs_d, R, N, stride_qh, stride_qn,
                                  stride_qd, qk_scale, DOT_PRECISION)  # fmt: skip
    # With the rows' lse given, padded keys do not change the other keys' p: zero them once here.
    keys = real_keys(key_mask_ptr + b * N + first_key, offs_j, R, HAS_KEY_MASK)
    abar = tl.where(keys[None, :], total / H, 0.0)
    abar_ptrs = abar_ptr + b * stride_ab + offs_i[:, None] * stride_ai + offs_j[None, :] * stride_aj
    tl.store(abar_ptrs, abar, mask=rows_inside[:, None] & (offs_j < R)[None, :])


def response_block(q, k, lse, response_start, attention_mask, shift, scale):
    """Triton twin of ``reference.attention.response_block``: float32 ``(B, R, R)``."""
    check_supported(q)
    B, H, N, d = q.shape
    Hkv = k.shape[1]
    R = N - response_start
    if B * H * R == 0:
        return torch.zeros(B, R, R, dtype=torch.float32, device=q.device)

    key_mask = as_bytes(attention_mask)
    # Written column-major (``columns[b, j, i] = Abar_RR[b, i, j]``) and returned as the transposed view: the
    # greedy order reads whole columns, so its ``transpose(1, 2).contiguous()`` is then free, not a B·R² copy.
    columns = torch.empty(B, R, R, dtype=torch.float32, device=q.device)  # every element written
    abar = columns.transpose(1, 2)

    def grid(meta):
        return (cdiv(R, meta["BLOCK_M"]), cdiv(R, meta["BLOCK_N"]), B)

    launch(
        _response_block_kernel, grid,
        q, k, lse_log2(lse), key_mask if key_mask is not None else columns, columns, *abar.stride(),
        *q.stride(), *k.stride(),
        H, H // Hkv, N, R, tuning_bucket(R), response_start, response_start - int(shift), scale * LOG2E,
        ONE_HEAD_PER_KV=H == Hkv, PREFETCH_NEXT_KV=cuda_arch(q.device) >= 90, HEAD_DIM=d,
        HAS_KEY_MASK=key_mask is not None, DOT_PRECISION=dot_precision(q.dtype),
        gpu_configs=_GPU_CONFIGS, dtype=q.dtype, head_dim=d, device=q.device,
    )  # fmt: skip
    return abar
