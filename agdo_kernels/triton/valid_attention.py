"""Valid attention ``S`` (with SDPA's output ``O`` and ``lse`` on request) in one FlashAttention pass.

One program per (block of ``BLOCK_M`` query rows, batch, query head) streams the key blocks with an
online softmax. Beside the denominator ``l = sum_k p`` it keeps ``u = sum_{k in U} p``, rescaled by the
same ``exp2(m_old - m_new)`` factor whenever the running max moves, so ``S_h = u / l`` is exact at the
end. A whole key block whose keys are all in ``U`` (the prompt, decoded blocks) or none (the masked suffix)
adds the block's row sum or nothing, with no per-key work; only blocks that mix both multiply ``p`` by
``U`` (compile-only cost: bench/RESULTS.md). Each program writes its head's ``S_h`` to a small fp32
``(B, H, N)`` buffer that one more launch averages over heads (:func:`.nonfinite.finish_rows`, which also
applies the non-finite row rule): deterministic, no atomics on the statistics.

Why not one program per GQA group: packing the ``g`` heads of a group into one tile does not cut K/V
traffic (the number of (query tile, key block) pairs is the same), while programs of the same head run
side by side on axis 0 of the grid, so a head's K/V blocks are served from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    cdiv,
    check_supported,
    device_guard,
    dot_precision,
    launch,
    load_tile,
    next_power_of_2,
    tuning_bucket,
    tuning_configs,
)
from .._checks import empty_valid_attention
from .nonfinite import finish_rows, flag_if_nonfinite, flag_nonfinite_rows

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for H100, head dims 64/128, the first one pinned. Only configs
# without register spills on sm_90 at head dim 128 (bench/compile_report.py: 128x128 tiles spill 48 B, and
# 64x128 with 4 warps under a key mask); the last one is what fp32 and d = 256 run.
_GPU_CONFIGS = [
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (64, 64, 4, 4),
    (64, 64, 4, 2),
    (64, 32, 4, 1),
]
# fp32 on sm_80 (bench/compile_report.py --arch 80 --dtype fp32): spills 1 KB at head dim 128, none in the
# hot loop (the smallest tile of the list spills 5 KB there, 400 spill instructions in the hot loop).
_SM80_FP32_CONFIG = (32, 32, 4, 1)


@triton.jit
def _attend_key_block(
    acc,
    row_sum,
    row_max,
    unmasked_sum,
    q,
    k_base,
    v_base,
    key_bias_row,
    unmasked_row,
    unmasked_count_row,
    start_n,
    N,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    BOUNDARY: tl.constexpr,
    RETURN_OUTPUT: tl.constexpr,
    COMPUTE_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold key block ``[start_n, start_n + BLOCK_N)`` into the running softmax state of the query tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(k_base, offs_n, N, stride_kn, tl.arange(0, HEAD_DIM), stride_kd, BOUNDARY)
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_KEY_MASK:  # the padding as an additive float32 bias (0 / -inf): one add, no compare and select
        if BOUNDARY:
            key_bias = tl.load(key_bias_row + offs_n, mask=offs_n < N, other=float("-inf"))
        else:
            key_bias = tl.load(key_bias_row + offs_n)
        logits = logits + key_bias[None, :]
    elif BOUNDARY:
        logits = logits + tl.where(offs_n < N, 0.0, float("-inf"))[None, :]
    new_max = tl.maximum(row_max, tl.max(logits, 1) * qk_scale)
    # A row that has only seen padded keys keeps max -inf: subtract 0 instead so exp2 gives 0, not NaN.
    ref = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.math.exp2(row_max - ref)
    p = tl.math.exp2(logits * qk_scale - ref[:, None])
    tile_sum = tl.sum(p, 1)
    row_sum = row_sum * alpha + tile_sum
    if COMPUTE_S:
        if BOUNDARY:
            in_u = tl.load(unmasked_row + offs_n, mask=offs_n < N, other=0.0)
            unmasked_sum = unmasked_sum * alpha + tl.sum(p * in_u[None, :], 1)
        else:
            # A whole block with every key in U (the prompt, decoded blocks) or none (the masked suffix) adds
            # the row sum it already has, or nothing; only blocks that mix both multiply p by U key by key.
            in_u_count = tl.load(unmasked_count_row + start_n + BLOCK_N) - tl.load(unmasked_count_row + start_n)
            unmasked_sum = unmasked_sum * alpha
            if (in_u_count > 0) & (in_u_count < BLOCK_N):
                in_u = tl.load(unmasked_row + offs_n)  # U as float32: no per-element conversion
                unmasked_sum += tl.sum(p * in_u[None, :], 1)
            elif in_u_count == BLOCK_N:
                unmasked_sum += tile_sum
    if RETURN_OUTPUT:
        v = load_tile(v_base, offs_n, N, stride_vn, tl.arange(0, DV), stride_vd, BOUNDARY)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, row_sum, new_max, unmasked_sum


@triton.autotune(
    configs=tuning_configs(_GPU_CONFIGS),
    key=["N_BUCKET", "HEAD_DIM", "DV", "HAS_KEY_MASK", "RETURN_OUTPUT", "RETURN_LSE"],
)
@triton.jit
def _valid_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    key_bias_ptr,
    key_extent_ptr,
    unmasked_ptr,
    unmasked_count_ptr,
    s_part_ptr,
    out_ptr,
    lse_ptr,
    flags_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    H,
    GROUP,
    N_Q,
    N,
    N_BUCKET,  # autotuning key only
    KEY_ROW_STRIDE,  # row stride of the per-key rows (bias, U): N rounded up to 16, so pairs load as one
    qk_scale,
    HEAD_DIM: tl.constexpr,
    DV: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    RETURN_OUTPUT: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    COMPUTE_S: tl.constexpr,  # False only in bench/compile_report.py: the FlashAttention floor
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One flat grid axis (axis 1 caps at 65,535 programs): query tiles of one head are neighbours, so they
    # share that head's K/V in L2.
    tiles = tl.cdiv(N_Q, BLOCK_M)
    bh = (tl.program_id(0) // tiles).to(tl.int64)
    b = bh // H
    h = bh % H
    kv = h // GROUP
    offs_m = (tl.program_id(0) % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, N_Q, stride_qn, tl.arange(0, HEAD_DIM), stride_qd, True)
    k_base = k_ptr + b * stride_kb + kv * stride_kh
    v_base = v_ptr + b * stride_vb + kv * stride_vh
    key_bias_row = key_bias_ptr + b * KEY_ROW_STRIDE
    unmasked_row = unmasked_ptr + b * KEY_ROW_STRIDE
    unmasked_count_row = unmasked_count_ptr + b * (KEY_ROW_STRIDE + 1)  # N + 1 counts per row (key_rows)

    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    unmasked_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Only the key blocks from the one holding the row's first real key to its last real key: the others are
    # all padding (p = 0). Whole blocks skip bounds checks; the ragged tail (if any) comes last, with them.
    if HAS_KEY_MASK:
        lo = (tl.load(key_extent_ptr + 2 * b) // BLOCK_N) * BLOCK_N
        hi = tl.load(key_extent_ptr + 2 * b + 1)
    else:
        lo = 0
        hi = N
    n_full = lo + (tl.maximum(hi - lo, 0) // BLOCK_N) * BLOCK_N
    for start_n in range(lo, n_full, BLOCK_N):
        acc, row_sum, row_max, unmasked_sum = _attend_key_block(
            acc, row_sum, row_max, unmasked_sum, q, k_base, v_base, key_bias_row, unmasked_row, unmasked_count_row,
            start_n, N,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, DV, BLOCK_N, HAS_KEY_MASK, False, RETURN_OUTPUT, COMPUTE_S, DOT_PRECISION,
        )  # fmt: skip
    if n_full < hi:
        acc, row_sum, row_max, unmasked_sum = _attend_key_block(
            acc, row_sum, row_max, unmasked_sum, q, k_base, v_base, key_bias_row, unmasked_row, unmasked_count_row,
            n_full, N,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, DV, BLOCK_N, HAS_KEY_MASK, True, RETURN_OUTPUT, COMPUTE_S, DOT_PRECISION,
        )  # fmt: skip

    # Rows without a real key have row_sum 0 (every p was exp2(-inf)): they report S = O = lse = 0.
    has_keys = row_sum > 0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    rows_inside = offs_m < N_Q
    if COMPUTE_S:
        s_head = unmasked_sum / safe_sum
        if HAS_KEY_MASK:  # padded query rows get S = 0 (their O and lse stay SDPA's); row i is key N - N_Q + i
            query_key = offs_m + (N - N_Q)
            padded_row = tl.load(key_bias_row + query_key, mask=query_key < N, other=0.0) != 0.0
            s_head = tl.where(padded_row, 0.0, s_head)
        tl.store(s_part_ptr + bh * N_Q + offs_m, s_head, mask=rows_inside)
        flag_if_nonfinite(flags_ptr, b, tl.where(rows_inside, s_head, 0.0))  # an overflow poisons the row
    if RETURN_LSE:
        lse = tl.where(has_keys, (row_max + tl.math.log2(safe_sum)) * 0.6931471805599453, 0.0)  # natural log
        tl.store(lse_ptr + bh * N_Q + offs_m, lse, mask=rows_inside)
        flag_if_nonfinite(flags_ptr, b, tl.where(rows_inside, lse, 0.0))
    if RETURN_OUTPUT:
        out = acc / safe_sum[:, None]
        offs_dv = tl.arange(0, DV)
        out_ptrs = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=rows_inside[:, None])


@triton.jit
def _key_rows_kernel(unmasked_ptr, mask_ptr, u_ptr, count_ptr, bias_ptr, extent_ptr, flags_ptr, N, ROW_STRIDE,
                     HAS_KEY_MASK: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Row ``b`` of the per-key inputs: ``U`` as float32, the running count of ``U`` keys before each position
    (``N + 1`` entries, so a key block's count is two loads), and with a mask the additive bias (0 real, -inf
    padding) and ``[first real key, last real key + 1)``; the row's non-finite flag zeroed."""
    b = tl.program_id(0).to(tl.int64)
    tl.store(flags_ptr + b, 0)
    in_u_before = 0
    first = tl.full([BLOCK], N, tl.int32)
    last = tl.full([BLOCK], -1, tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < N
        in_u = (tl.load(unmasked_ptr + b * N + offs, mask=inside, other=0) != 0).to(tl.int32)
        tl.store(u_ptr + b * ROW_STRIDE + offs, in_u.to(tl.float32), mask=inside)
        # count[j + 1] = keys of U in [0, j]; count[0] = 0 is written below
        tl.store(count_ptr + b * (ROW_STRIDE + 1) + offs + 1, in_u_before + tl.cumsum(in_u, 0), mask=inside)
        in_u_before += tl.sum(in_u, 0)
        if HAS_KEY_MASK:
            real = tl.load(mask_ptr + b * N + offs, mask=inside, other=0) != 0
            tl.store(bias_ptr + b * ROW_STRIDE + offs, tl.where(real, 0.0, float("-inf")), mask=inside)
            first = tl.minimum(first, tl.where(real, offs, N))
            last = tl.maximum(last, tl.where(real, offs, -1))
    tl.store(count_ptr + b * (ROW_STRIDE + 1), 0)
    if HAS_KEY_MASK:
        tl.store(extent_ptr + 2 * b, tl.min(first))
        tl.store(extent_ptr + 2 * b + 1, tl.max(last) + 1)  # 0 for a row without real keys: no block visited


def key_rows(unmasked: torch.Tensor, attention_mask: torch.Tensor | None, flags: torch.Tensor):
    """The per-key rows the kernel reads, from one launch: ``U`` as float32 ``(B, S)``, the running count of
    ``U`` keys ``(B, S + 1)`` int32, and (``None`` without a mask) the key bias ``(B, S)`` float32 and the
    real-key extent ``(B, 2)`` int32, where ``S`` is ``N`` rounded up to 16 (pairs of keys load as one 64-bit
    load) and only the first ``N`` (``N + 1``) entries of a row are written.
    The same launch zeroes the int32 non-finite ``flags (B,)`` (no memset of their own)."""
    B, N = unmasked.shape
    device = unmasked.device
    row_stride = cdiv(N, 16) * 16
    # Whole padded rows (no [:, :N] views: each view costs the host ~3 us); the kernels read only the first N.
    u = torch.empty(B, row_stride, dtype=torch.float32, device=device)
    count = torch.empty(B, row_stride + 1, dtype=torch.int32, device=device)
    bias = extent = None
    if attention_mask is not None:
        bias = torch.empty(B, row_stride, dtype=torch.float32, device=device)
        extent = torch.empty(B, 2, dtype=torch.int32, device=device)
    with device_guard(device):
        _key_rows_kernel[(B,)](
            unmasked.contiguous().view(torch.uint8),
            u if attention_mask is None else attention_mask.contiguous().view(torch.uint8),
            u, count, u if bias is None else bias, count if extent is None else extent, flags, N, row_stride,
            HAS_KEY_MASK=attention_mask is not None, BLOCK=min(1024, next_power_of_2(N)),
        )  # fmt: skip
    return u, count, bias, extent


def valid_attention(q, k, v, unmasked, attention_mask, scale, return_output, return_lse):
    """Triton twin of ``reference.attention.valid_attention``: ``(s, out, lse)`` from one pass."""
    check_supported(q, v if return_output else None)
    B, H, Nq, d = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    dv = v.shape[-1] if return_output else d
    device = q.device
    if B * H * Nq == 0:
        return empty_valid_attention(q, dv, return_output, return_lse)

    # The non-finite row rule (agdo_kernels docstring) is applied here: inputs scanned first (key_rows zeroes
    # the flags), the kernel flags overflowing statistics, finish_rows poisons flagged rows while it averages
    # S over heads.
    flags = torch.empty(B, dtype=torch.int32, device=device)
    u, u_count, key_bias, key_extent = key_rows(unmasked, attention_mask, flags)
    flag_nonfinite_rows(B, q, k, v, flags=flags)
    # The kernel writes every element of these (each row once, masked only past Nq).
    s_part = torch.empty(B, H, Nq, dtype=torch.float32, device=device)
    out = torch.empty(B, H, Nq, dv, dtype=q.dtype, device=device) if return_output else None
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=device) if return_lse else None
    v_arg = v if return_output else k  # unused stand-ins keep the signature fixed
    out_arg = out if return_output else s_part

    def grid(meta):
        return (cdiv(Nq, meta["BLOCK_M"]) * B * H,)

    launch(
        _valid_attention_kernel, grid,
        q, k, v_arg,
        key_bias if key_bias is not None else s_part, key_extent if key_extent is not None else s_part,
        u, u_count, s_part, out_arg,
        lse if return_lse else s_part, flags,
        *q.stride(), *k.stride(), *v_arg.stride(),
        *(out.stride() if return_output else (0, 0, 0, 0)),
        H, H // Hkv, Nq, N, tuning_bucket(N), u.stride(0), scale * LOG2E,
        HEAD_DIM=d, DV=dv, HAS_KEY_MASK=key_bias is not None,
        RETURN_OUTPUT=bool(return_output), RETURN_LSE=bool(return_lse), COMPUTE_S=True,
        DOT_PRECISION=dot_precision(q.dtype),
        gpu_configs=_GPU_CONFIGS, sm80_fp32_config=_SM80_FP32_CONFIG, dtype=q.dtype, head_dim=d, device=device,
    )  # fmt: skip
    return finish_rows(s_part, flags, lse, out), out, lse
