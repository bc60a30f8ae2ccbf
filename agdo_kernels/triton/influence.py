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

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .._backends import triton_interpreted, warp_specialize
from ._common import (
    FP_FUSION,
    LOG2E,
    as_bytes,
    cdiv,
    check_supported,
    descriptor_scratch,
    device_guard,
    dot_precision,
    launch,
    load_tile,
    next_power_of_2,
    real_keys,
    tuning_bucket,
    tuning_configs,
)
from .nonfinite import finish_rows, flag_each_nonfinite, flag_nonfinite_rows

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
# fp32 on sm_80 (bench/compile_report.py --arch 80 --dtype fp32): spills 700 B at head dim 128, none in the
# hot loop (the smallest tile of the list spills 20 KB there: ptxas falls back to 32 registers).
_SM80_FP32_CONFIG = (64, 32, 8, 1)
# The warp-specialised variant (``set_warp_specialize``): Triton 3.6/3.9 specialise its loop only with 4 warps
# (8 warps compile unchanged), which become 12: a TMA producer warp group and two consumers.
_WARP_SPECIALIZED_CONFIGS = [
    (64, 128, 4, 3),
    (64, 64, 4, 3),
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
    return _tile_mass(k, q, lse2_row, offs_m, N, qk_scale, BOUNDARY, DOT_PRECISION)


@triton.jit
def _tile_mass(k, q, lse2_row, offs_m, N, qk_scale, BOUNDARY: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``sum_i p[i, key]`` of the loaded query tile ``q`` (rows ``offs_m``) for every key of ``k``."""
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
    extent_ptr,
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
    HAS_EXTENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,  # Hopper: Q and K through TMA descriptors, the query loop warp-specialised
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tiles = tl.cdiv(N, BLOCK_N)  # one flat grid axis, key tiles of one head adjacent (see valid_attention)
    bh = (tl.program_id(0) // tiles).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = (tl.program_id(0) % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    q_base = q_ptr + b * stride_qb + h * stride_qh
    if WARP_SPECIALIZE:
        # Rows past N read as zeros (TMA's bounds), and their lse2 as +inf: p = 0 without a masked tile.
        k_desc = tl.make_tensor_descriptor(k_base, shape=[N, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])  # fmt: skip
        q_desc = tl.make_tensor_descriptor(q_base, shape=[N, HEAD_DIM], strides=[stride_qn, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])  # fmt: skip
        k = k_desc.load([(tl.program_id(0) % tiles) * BLOCK_N, 0])
    else:
        k = load_tile(k_base, offs_n, N, stride_kn, tl.arange(0, HEAD_DIM), stride_kd, True)
    lse2_row = lse2_ptr + bh * N

    # Only the query blocks from the one holding the first counted row to the last counted row (the others
    # have p = 0), and none for a key tile that is all padding (its keys are zeroed below).
    if HAS_EXTENT:
        lo = (tl.load(extent_ptr + 4 * b) // BLOCK_M) * BLOCK_M
        hi = tl.load(extent_ptr + 4 * b + 1)
        tile_start = (tl.program_id(0) % tiles) * BLOCK_N
        outside = (tile_start + BLOCK_N <= tl.load(extent_ptr + 4 * b + 2)) | (tile_start >= tl.load(extent_ptr + 4 * b + 3))
        hi = tl.where(outside, lo, hi)
    else:
        lo = 0
        hi = N
    col_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    if WARP_SPECIALIZE:
        # One loop with no tail: Triton's warp specialisation leaves a loop followed by a ragged block alone.
        for start_m in tl.range(lo, hi, BLOCK_M, warp_specialize=True):
            q = q_desc.load([start_m, 0])
            col_sum += _tile_mass(k, q, lse2_row, start_m + tl.arange(0, BLOCK_M), N, qk_scale, True, DOT_PRECISION)
    else:
        m_full = lo + (tl.maximum(hi - lo, 0) // BLOCK_M) * BLOCK_M
        for start_m in range(lo, m_full, BLOCK_M):
            col_sum += _query_block_mass(k, q_base, lse2_row, start_m, N, stride_qn, stride_qd, qk_scale, HEAD_DIM,
                                         BLOCK_M, False, DOT_PRECISION)  # fmt: skip
        if m_full < hi:
            col_sum += _query_block_mass(k, q_base, lse2_row, m_full, N, stride_qn, stride_qd, qk_scale, HEAD_DIM,
                                         BLOCK_M, True, DOT_PRECISION)  # fmt: skip
    keys = real_keys(key_mask_ptr + b * N, offs_n, N, HAS_KEY_MASK)
    col_sum = tl.where(keys, col_sum, 0.0)
    tl.store(part_ptr + bh * N + offs_n, col_sum, mask=offs_n < N)
    flag_each_nonfinite(flags_ptr, b, col_sum)  # an overflow poisons the row


@triton.jit
def _counted_rows_kernel(lse_ptr, stride_lb, stride_lh, stride_ln, key_mask_ptr, query_mask_ptr, lse2_ptr,
                         extent_ptr, flags_ptr, H, N, HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Head ``h`` of row ``b``: ``lse2`` = the base-2 lse of counted rows (``+inf`` elsewhere, so their p is
    0); head 0 also writes ``[first counted row, last + 1, first real key, last + 1)`` and zeroes the row's
    non-finite flag."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    if bh % H == 0:
        tl.store(flags_ptr + b, 0)
    first_row = tl.full([BLOCK], N, tl.int32)
    last_row = tl.full([BLOCK], -1, tl.int32)
    first_key = tl.full([BLOCK], N, tl.int32)
    last_key = tl.full([BLOCK], -1, tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < N
        real = inside
        if HAS_KEY_MASK:
            real = real & (tl.load(key_mask_ptr + b * N + offs, mask=inside, other=0) != 0)
        counted = real
        if HAS_QUERY_MASK:
            counted = counted & (tl.load(query_mask_ptr + b * N + offs, mask=inside, other=0) != 0)
        lse = tl.load(lse_ptr + b * stride_lb + (bh % H) * stride_lh + offs * stride_ln, mask=inside, other=0.0)
        lse2 = tl.where(counted, lse.to(tl.float32) * 1.4426950408889634, float("inf"))  # x log2(e)
        tl.store(lse2_ptr + bh * N + offs, lse2, mask=inside)
        first_row = tl.minimum(first_row, tl.where(counted, offs, N))
        last_row = tl.maximum(last_row, tl.where(counted, offs, -1))
        first_key = tl.minimum(first_key, tl.where(real, offs, N))
        last_key = tl.maximum(last_key, tl.where(real, offs, -1))
    if bh % H == 0:
        tl.store(extent_ptr + 4 * b, tl.min(first_row))
        tl.store(extent_ptr + 4 * b + 1, tl.max(last_row) + 1)
        tl.store(extent_ptr + 4 * b + 2, tl.min(first_key))
        tl.store(extent_ptr + 4 * b + 3, tl.max(last_key) + 1)


def counted_rows(lse, attention_mask, query_mask, flags):
    """``(lse2 (B, H, N), extent (B, 4) int32)`` for :func:`_counted_rows_kernel`, and the int32 non-finite
    ``flags (B,)`` zeroed: one launch."""
    B, H, N = lse.shape
    lse2 = torch.empty(B, H, N, dtype=torch.float32, device=lse.device)
    extent = torch.empty(B, 4, dtype=torch.int32, device=lse.device)
    masks = [as_bytes(m) if m is not None else lse2 for m in (attention_mask, query_mask)]
    with device_guard(lse.device):
        _counted_rows_kernel[(B * H,)](lse, *lse.stride(), *masks, lse2, extent, flags, H, N,
                                       HAS_KEY_MASK=attention_mask is not None,
                                       HAS_QUERY_MASK=query_mask is not None,
                                       BLOCK=min(1024, next_power_of_2(N)), enable_fp_fusion=FP_FUSION)
    return lse2, extent


def _warp_specializable(q, k) -> bool:
    """Whether this call may take the warp-specialised variant: asked for, fp16/bf16, Hopper or later (or the
    interpreter, which checks its arithmetic), a Triton with device-side TMA descriptors, and rows TMA can
    address (unit stride along the head dim, 16-byte aligned row, head and batch starts)."""
    if not warp_specialize() or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not (triton_interpreted() or (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9)):
        return False
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    size = q.element_size()
    return all(
        t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all(t.stride(i) * size % 16 == 0 for i in range(3))
        for t in (q, k)
    )


def influence_sum(q, k, lse, attention_mask, query_mask, scale):
    """Triton twin of ``reference.attention.influence_sum``: float32 ``(B, N)``, not normalised."""
    check_supported(q)
    B, H, N, d = q.shape
    Hkv = k.shape[1]
    if B * H * N == 0:
        return torch.zeros(B, N, dtype=torch.float32, device=q.device)

    # The non-finite row rule on the inputs: counted_rows zeroes the flags, the scan raises them.
    flags = torch.empty(B, dtype=torch.int32, device=q.device)
    lse2, extent = counted_rows(lse, attention_mask, query_mask, flags)
    flag_nonfinite_rows(B, q, k, lse, flags=flags)
    key_mask = as_bytes(attention_mask)
    part = torch.empty(B, H, N, dtype=torch.float32, device=q.device)  # every element written

    def grid(meta):
        return (cdiv(N, meta["BLOCK_N"]) * B * H,)

    specialized = _warp_specializable(q, k)
    with descriptor_scratch(q.device) if specialized else nullcontext():
        launch(
            _influence_kernel, grid,
            q, k, lse2, key_mask if key_mask is not None else part, part, flags, extent,
            *q.stride(), *k.stride(),
            H, H // Hkv, N, tuning_bucket(N), scale * LOG2E,
            HEAD_DIM=d, HAS_KEY_MASK=key_mask is not None,
            HAS_EXTENT=attention_mask is not None or query_mask is not None,
            DOT_PRECISION=dot_precision(q.dtype), WARP_SPECIALIZE=specialized,
            gpu_configs=_WARP_SPECIALIZED_CONFIGS if specialized else _GPU_CONFIGS,
            sm80_fp32_config=_SM80_FP32_CONFIG, dtype=q.dtype, head_dim=d, device=q.device,
        )  # fmt: skip
    return finish_rows(part, flags)
