"""Valid attention ``S`` (with SDPA's output ``O`` and ``lse`` on request) in one FlashAttention pass.

One program per (block of ``BLOCK_M`` query rows, batch, query head) streams the key blocks with an
online softmax. Beside the denominator ``l = sum_k p`` it keeps ``u = sum_{k in U} p``, rescaled by the
same ``exp2(m_old - m_new)`` factor whenever the running max moves, so ``S_h = u / l`` is exact at the
end. Each program writes its head's ``S_h`` to a small fp32 ``(B, H, N)`` buffer that one more launch
averages over heads (:func:`.nonfinite.finish_rows`, which also applies the non-finite row rule):
deterministic, no atomics on the statistics.

Keys are visited in the row's *key order* (:func:`key_order`, one launch per call): the real keys of ``U``
first, then the other real keys, each group ascending; padding is not visited at all. Softmax, ``O`` and
``lse`` do not depend on the order in which keys are summed (their rounding does: the same ``q, k, v`` under
another ``U`` can differ in the last bits, deterministically), and in that order every key block is all in
``U`` (it adds the row sum it already has) or all out (it adds nothing), except the one block where ``U``
ends: S costs no per-key work on any other block, whatever ``U`` looks like (pure diffusion scatters it),
and padding costs neither a mask nor a visit. K and V rows are gathered through the order (16-byte
``cp.async`` copies as before, one more pipelined load for the block's indices). Compile-only cost against
the plain FlashAttention loop: bench/RESULTS.md.

Why not one program per GQA group: packing the ``g`` heads of a group into one tile does not cut K/V
traffic (the number of (query tile, key block) pairs is the same), while programs of the same head run
side by side on axis 0 of the grid, so a head's K/V blocks are served from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FP_FUSION,
    LOG2E,
    as_bytes,
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
# without register spills on sm_90 at head dim 128 (bench/compile_report.py: 128-key tiles spill); the last
# one is what fp32 and d = 256 run. The K/V loads depend on the loaded key order, and Triton's pipeliner
# splits the stages between the two loads: K/V run ceil((stages - 2) / 2) blocks ahead, so 5 stages keep
# them 2 ahead (3 buffers, the shared memory of a plain 3-stage loop) and 7 stages 3 ahead.
_GPU_CONFIGS = [
    (128, 64, 8, 5),
    (128, 64, 8, 7),
    (64, 64, 4, 7),
    (64, 64, 4, 4),
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
    order_row,
    start_n,
    n_real,
    n_u,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BOUNDARY: tl.constexpr,
    RETURN_OUTPUT: tl.constexpr,
    COMPUTE_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold the keys at positions ``[start_n, start_n + BLOCK_N)`` of the key order into the running softmax
    state of the query tile; ``BOUNDARY``: the block holds positions past ``n_real`` (no key there)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if COMPUTE_S:
        if BOUNDARY:
            key = tl.load(order_row + offs_n, mask=offs_n < n_real, other=0)
        else:
            key = tl.load(order_row + offs_n)
    else:  # the FlashAttention floor (bench/ only): keys in place, no gather
        key = offs_n
    k = load_tile(k_base, key, n_real, stride_kn, tl.arange(0, HEAD_DIM), stride_kd, BOUNDARY and not COMPUTE_S)
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if BOUNDARY:
        logits = logits + tl.where(offs_n < n_real, 0.0, float("-inf"))[None, :]
    new_max = tl.maximum(row_max, tl.max(logits, 1) * qk_scale)
    # A row max still at -inf (no finite logit seen yet) subtracts 0 instead, so exp2 gives 0, not NaN.
    ref = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.math.exp2(row_max - ref)
    p = tl.math.exp2(logits * qk_scale - ref[:, None])
    tile_sum = tl.sum(p, 1)
    row_sum = row_sum * alpha + tile_sum
    if COMPUTE_S:
        unmasked_sum = unmasked_sum * alpha
        if start_n + BLOCK_N <= n_u:  # every key in U
            unmasked_sum += tile_sum
        elif start_n < n_u:  # the one block where U ends
            in_u = tl.arange(0, BLOCK_N) < (n_u - start_n).to(tl.int32)  # 32-bit compares, not 64-bit
            unmasked_sum += tl.sum(tl.where(in_u[None, :], p, 0.0), 1)
    if RETURN_OUTPUT:
        v = load_tile(v_base, key, n_real, stride_vn, tl.arange(0, DV), stride_vd, BOUNDARY and not COMPUTE_S)
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
    key_order_ptr,
    key_counts_ptr,
    key_mask_ptr,
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
    qk_scale,
    HEAD_DIM: tl.constexpr,
    DV: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    RETURN_OUTPUT: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    COMPUTE_S: tl.constexpr,  # False only in bench/: the FlashAttention floor
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
    order_row = key_order_ptr + b * N
    n_u = tl.load(key_counts_ptr + 2 * b)
    n_real = tl.load(key_counts_ptr + 2 * b + 1)

    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    unmasked_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Whole blocks skip bounds checks; the ragged tail (if any) comes last, with them.
    n_full = (n_real // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, row_sum, row_max, unmasked_sum = _attend_key_block(
            acc, row_sum, row_max, unmasked_sum, q, k_base, v_base, order_row, start_n, n_real, n_u,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, DV, BLOCK_N, False, RETURN_OUTPUT, COMPUTE_S, DOT_PRECISION,
        )  # fmt: skip
    if n_full < n_real:
        acc, row_sum, row_max, unmasked_sum = _attend_key_block(
            acc, row_sum, row_max, unmasked_sum, q, k_base, v_base, order_row, n_full, n_real, n_u,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, DV, BLOCK_N, True, RETURN_OUTPUT, COMPUTE_S, DOT_PRECISION,
        )  # fmt: skip

    # Rows without a real key have row_sum 0 (no key was visited): they report S = O = lse = 0.
    has_keys = row_sum > 0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    rows_inside = offs_m < N_Q
    if COMPUTE_S:
        s_head = unmasked_sum / safe_sum
        if HAS_KEY_MASK:  # padded query rows get S = 0 (their O and lse stay SDPA's); row i is key N - N_Q + i
            query_key = offs_m + (N - N_Q)
            padded_row = tl.load(key_mask_ptr + b * N + query_key, mask=rows_inside, other=1) == 0
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
def _key_order_kernel(unmasked_ptr, mask_ptr, order_ptr, counts_ptr, flags_ptr, N, HAS_KEY_MASK: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    """Row ``b``'s key order (the real keys of ``U``, then the other real keys, each ascending) and its
    ``[keys of U, real keys]`` counts; the row's non-finite flag zeroed. Two passes: U's size places the rest."""
    b = tl.program_id(0).to(tl.int64)
    tl.store(flags_ptr + b, 0)
    n_u = 0
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_u = tl.load(unmasked_ptr + b * N + offs, mask=offs < N, other=0) != 0
        if HAS_KEY_MASK:
            in_u = in_u & (tl.load(mask_ptr + b * N + offs, mask=offs < N, other=0) != 0)
        n_u += tl.sum(in_u.to(tl.int32), 0)
    u_before = 0
    rest_before = n_u
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        real = offs < N
        if HAS_KEY_MASK:
            real = tl.load(mask_ptr + b * N + offs, mask=real, other=0) != 0
        in_u = real & (tl.load(unmasked_ptr + b * N + offs, mask=offs < N, other=0) != 0)
        in_u = in_u.to(tl.int32)
        rest = real.to(tl.int32) - in_u
        position = tl.where(in_u != 0, u_before + tl.cumsum(in_u, 0), rest_before + tl.cumsum(rest, 0)) - 1
        tl.store(order_ptr + b * N + position, offs, mask=real)
        u_before += tl.sum(in_u, 0)
        rest_before += tl.sum(rest, 0)
    tl.store(counts_ptr + 2 * b, n_u)
    tl.store(counts_ptr + 2 * b + 1, rest_before)


def key_order(unmasked: torch.Tensor, attention_mask: torch.Tensor | None, flags: torch.Tensor):
    """From one launch: the order in which the kernel visits each row's keys, int32 ``(B, N)`` (the real keys
    of ``U`` ascending, then the other real keys ascending; the entries past a row's real keys are not
    written), and int32 ``(B, 2)`` counts ``[keys of U, real keys]``. The same launch zeroes the int32
    non-finite ``flags (B,)`` (no memset of their own)."""
    B, N = unmasked.shape
    device = unmasked.device
    order = torch.empty(B, N, dtype=torch.int32, device=device)
    counts = torch.empty(B, 2, dtype=torch.int32, device=device)
    with device_guard(device):
        _key_order_kernel[(B,)](
            as_bytes(unmasked), as_bytes(attention_mask) if attention_mask is not None else order, order, counts,
            flags, N, HAS_KEY_MASK=attention_mask is not None, BLOCK=min(1024, next_power_of_2(N)),
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return order, counts


def valid_attention(q, k, v, unmasked, attention_mask, scale, return_output, return_lse, *, compute_s=True):
    """Triton twin of ``reference.attention.valid_attention``: ``(s, out, lse)`` from one pass.

    ``compute_s=False`` runs the FlashAttention floor for bench/ (the same launches, the kernel without S and
    without the gather: ``O`` and ``lse`` are right only without padding, ``s`` is meaningless)."""
    check_supported(q, v if return_output else None)
    B, H, Nq, d = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    dv = v.shape[-1] if return_output else d
    device = q.device
    if B * H * Nq == 0:
        return empty_valid_attention(q, dv, return_output, return_lse)

    # The non-finite row rule (agdo_kernels docstring) is applied here: inputs scanned first (key_order zeroes
    # the flags), the kernel flags overflowing statistics, finish_rows poisons flagged rows while it averages
    # S over heads.
    flags = torch.empty(B, dtype=torch.int32, device=device)
    order, counts = key_order(unmasked, attention_mask, flags)
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
        q, k, v_arg, order, counts, as_bytes(attention_mask) if attention_mask is not None else order,
        s_part, out_arg, lse if return_lse else s_part, flags,
        *q.stride(), *k.stride(), *v_arg.stride(),
        *(out.stride() if return_output else (0, 0, 0, 0)),
        H, H // Hkv, Nq, N, tuning_bucket(N), scale * LOG2E,
        HEAD_DIM=d, DV=dv, HAS_KEY_MASK=attention_mask is not None,
        RETURN_OUTPUT=bool(return_output), RETURN_LSE=bool(return_lse), COMPUTE_S=compute_s,
        DOT_PRECISION=dot_precision(q.dtype),
        gpu_configs=_GPU_CONFIGS, sm80_fp32_config=_SM80_FP32_CONFIG, dtype=q.dtype, head_dim=d, device=device,
    )  # fmt: skip
    return finish_rows(s_part, flags, lse, out), out, lse
