"""The non-finite row rule on the Triton backend, in three launches instead of a dozen torch ops per call.

The rule (``agdo_kernels`` module docstring): a batch row whose inputs hold a NaN or an infinity anywhere,
or whose statistics overflow, is NaN in every output of that row. Here it runs on the device as

1. :func:`flag_nonfinite_rows` — one launch scans every input (any strides, padded positions included)
   and raises ``flags[b]``;
2. the attention kernel raises ``flags[b]`` for a non-finite statistic in its epilogue
   (:func:`flag_if_nonfinite`), which sees only its own tile — hence the flags, read after it finished;
3. :func:`finish_rows` — one launch sums the per-head partials over heads (what ``part.sum(1) / H`` did)
   and writes NaN over every output of a flagged row; a clean row costs it one flag load.

Per call on an H200 this replaced ~30 small launches (aminmax per tensor, casts, stack, masked_fill per
output: ~0.4 ms of host time, bench/RESULTS.md) with these three; the flags are zeroed by the launch that
prepares the call's other per-row inputs (``key_order``, ``counted_rows``), so there is no memset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP_FUSION, cdiv, device_guard, next_power_of_2

_SCAN_ELEMENTS = 4096  # elements per scanning program
_FINISH_BLOCK = 128  # query rows per finishing program
_MAX_SCANNED = 3


@triton.jit
def flag_if_nonfinite(flags_ptr, b, values):
    """Raise ``flags[b]`` when any of ``values`` (float32) is NaN or infinite."""
    bad = tl.max(((values != values) | (tl.abs(values) == float("inf"))).to(tl.int32))
    if bad != 0:
        tl.atomic_max(flags_ptr + b, 1)


@triton.jit
def flag_each_nonfinite(flags_ptr, b, values):
    """``flag_if_nonfinite`` for a 1-D epilogue vector, with no reduction and no branch: every non-finite
    element stores 1 into ``flags[b]`` (the same value from every writer, so the race is benign). Triton's warp
    specialisation splits a tile between consumer warp groups and aborts on a reduction of it after the loop."""
    bad = (values != values) | (tl.abs(values) == float("inf"))
    tl.store(flags_ptr + b + tl.zeros_like(values).to(tl.int64), tl.full(values.shape, 1, tl.int32), mask=bad)


@triton.jit
def _scan_tile(flags_ptr, base, tile, b, Y, ROWS, Z, stride_b, stride_x, stride_y, stride_z,
               BLOCK_R: tl.constexpr, BLOCK_Z: tl.constexpr):
    """Flag row ``b`` if tile ``tile`` of the ``(ROWS = X * Y, Z)`` view of ``base[b]`` is non-finite."""
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    x = (rows // Y).to(tl.int64)
    y = (rows % Y).to(tl.int64)
    cols = tl.arange(0, BLOCK_Z)
    ptrs = base + b * stride_b + (x * stride_x + y * stride_y)[:, None] + cols[None, :] * stride_z
    values = tl.load(ptrs, mask=(rows < ROWS)[:, None] & (cols < Z)[None, :], other=0.0).to(tl.float32)
    flag_if_nonfinite(flags_ptr, b, values)


@triton.jit
def _scan_kernel(
    flags_ptr, B,
    a_ptr, a_y, a_rows, a_z, a_sb, a_sx, a_sy, a_sz, a_tiles,
    b_ptr, b_y, b_rows, b_z, b_sb, b_sx, b_sy, b_sz, b_tiles,
    c_ptr, c_y, c_rows, c_z, c_sb, c_sx, c_sy, c_sz, c_tiles,
    BR_A: tl.constexpr, BZ_A: tl.constexpr,
    BR_B: tl.constexpr, BZ_B: tl.constexpr,
    BR_C: tl.constexpr, BZ_C: tl.constexpr,
):  # fmt: skip
    # Programs [0, B*a_tiles) scan tensor a, the next B*b_tiles tensor b, the rest tensor c (an absent
    # tensor has 0 tiles); a tensor's tiles of one batch row are neighbours.
    pid = tl.program_id(0)
    if pid < B * a_tiles:
        _scan_tile(flags_ptr, a_ptr, pid % a_tiles, (pid // a_tiles).to(tl.int64), a_y, a_rows, a_z,
                   a_sb, a_sx, a_sy, a_sz, BR_A, BZ_A)
    elif pid < B * (a_tiles + b_tiles):
        pid -= B * a_tiles
        _scan_tile(flags_ptr, b_ptr, pid % b_tiles, (pid // b_tiles).to(tl.int64), b_y, b_rows, b_z,
                   b_sb, b_sx, b_sy, b_sz, BR_B, BZ_B)
    else:
        pid -= B * (a_tiles + b_tiles)
        _scan_tile(flags_ptr, c_ptr, pid % c_tiles, (pid // c_tiles).to(tl.int64), c_y, c_rows, c_z,
                   c_sb, c_sx, c_sy, c_sz, BR_C, BZ_C)


def _scan_arguments(t: torch.Tensor | None):
    """``(pointer, Y, rows, Z, strides b/x/y/z, tiles)`` and ``(BLOCK_R, BLOCK_Z)`` of ``t`` seen as
    ``(B, X, Y, Z)`` (a 3-D ``(B, Y, Z)`` tensor has ``X = 1``, a 2-D ``(B, Z)`` one ``X = Y = 1``)."""
    if t is None or t.numel() == 0:
        return (None, 1, 0, 1, 0, 0, 0, 0, 0), (1, 1)
    while t.dim() < 4:
        t = t.unsqueeze(1)
    if t.dim() > 4:
        raise ValueError(f"the non-finite scan takes tensors of rank <= 4, got shape {tuple(t.shape)}")
    X, Y, Z = t.shape[1:]
    block_z = next_power_of_2(Z)
    block_r = max(1, _SCAN_ELEMENTS // block_z)
    return (t, Y, X * Y, Z, *t.stride(), cdiv(X * Y, block_r)), (block_r, block_z)


def flag_nonfinite_rows(B: int, *tensors, flags: torch.Tensor) -> torch.Tensor:
    """Raise the int32 ``flags (B,)`` (zeroed by the caller's preparing launch: no memset of their own) where
    any of ``tensors`` (leading dim ``B``; ``None`` skipped; any strides) holds a NaN or an infinity in that
    batch row. At most three tensors, one launch. Returns ``flags``."""
    present = [t for t in tensors if t is not None and t.numel()]
    if len(present) > _MAX_SCANNED:
        raise ValueError(f"flag_nonfinite_rows scans at most {_MAX_SCANNED} tensors, got {len(present)}")
    if not present:
        return flags
    args, blocks = zip(*(_scan_arguments(t) for t in present + [None] * (_MAX_SCANNED - len(present))))
    args = [(a[0] if a[0] is not None else flags,) + a[1:] for a in args]  # absent: any pointer, 0 tiles
    programs = B * sum(a[-1] for a in args)
    with device_guard(flags.device):
        _scan_kernel[(programs,)](
            flags, B, *args[0], *args[1], *args[2],
            BR_A=blocks[0][0], BZ_A=blocks[0][1], BR_B=blocks[1][0], BZ_B=blocks[1][1],
            BR_C=blocks[2][0], BZ_C=blocks[2][1], enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return flags


@triton.jit
def _finish_rows_kernel(
    flags_ptr, part_ptr, result_ptr, lse_ptr, out_ptr,
    H, N, DV,
    stride_ob, stride_oh, stride_on, stride_od,
    inv_heads,
    HAS_LSE: tl.constexpr, HAS_OUT: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    tiles = tl.cdiv(N, BLOCK)
    b = (tl.program_id(0) // tiles).to(tl.int64)
    offs = (tl.program_id(0) % tiles) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for h in range(H):  # heads in order: deterministic
        total += tl.load(part_ptr + (b * H + h) * N + offs, mask=inside, other=0.0)
    bad = tl.load(flags_ptr + b) != 0
    tl.store(result_ptr + b * N + offs, tl.where(bad, float("nan"), total * inv_heads), mask=inside)
    if bad:  # a clean row stops here
        if HAS_LSE:
            for h in range(H):
                tl.store(lse_ptr + (b * H + h) * N + offs, tl.full([BLOCK], float("nan"), tl.float32), mask=inside)
        if HAS_OUT:  # 16 rows at a time: a (BLOCK, DV) pointer tile would not fit in registers
            cols = tl.arange(0, BLOCK_DV)
            nan = tl.full([16, BLOCK_DV], float("nan"), tl.float32).to(out_ptr.dtype.element_ty)
            for h in range(H):
                for first in tl.static_range(0, BLOCK, 16):
                    rows = (tl.program_id(0) % tiles) * BLOCK + first + tl.arange(0, 16)
                    ptrs = out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + cols[None, :] * stride_od
                    tl.store(ptrs, nan, mask=(rows < N)[:, None] & (cols < DV)[None, :])


def finish_rows(part: torch.Tensor, flags: torch.Tensor, lse: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``part (B, H, N)`` averaged over heads → float32 ``(B, N)``; every flagged row NaN there and in
    ``lse (B, H, N)`` / ``out (B, H, N, dv)`` (written in place). One launch."""
    B, H, N = part.shape
    result = torch.empty(B, N, dtype=torch.float32, device=part.device)
    if B * N == 0:
        return result
    with device_guard(part.device):
        _finish_rows_kernel[(B * cdiv(N, _FINISH_BLOCK),)](
            flags, part, result, lse if lse is not None else part, out if out is not None else part,
            H, N, out.shape[-1] if out is not None else 1, *(out.stride() if out is not None else (0, 0, 0, 0)),
            1.0 / H, HAS_LSE=lse is not None, HAS_OUT=out is not None,
            BLOCK_DV=next_power_of_2(out.shape[-1]) if out is not None else 1,
            BLOCK=_FINISH_BLOCK, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return result
