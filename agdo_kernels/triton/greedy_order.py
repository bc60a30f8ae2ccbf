"""Triton greedy order (AGDO Algorithm 1): one persistent program per sequence.

The program keeps the whole row on chip: ``S``, the round's column sum ``delta``, the candidate mask and
the ranks are ``BLOCK_R``-wide registers (``BLOCK_R`` = next power of two >= R). Each pick is the largest
``S`` among the candidates (a max, then a min over the positions holding it: lowest position on ties)
followed by one contiguous load of the picked column, so every column of ``Abar`` is read once. ``Abar``
is transposed once up front to make a column contiguous. The summation order matches the torch reference
(see ``agdo_kernels.reference.ordering``), so float32 results are identical bit for bit. Non-finite
scores follow the reference's rule: NaN counts as ``-inf``, and ``-inf`` candidates are still picked
(lowest position first), so every valid token gets a rank.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.ordering import dense_steps, greedy_window
from ._common import FP_FUSION, device_guard, next_power_of_2


@triton.jit
def _greedy_rank_kernel(columns_ptr, s0_ptr, valid_ptr, rank_ptr, R, step_size, window, BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * R
    offs = tl.arange(0, BLOCK_R)
    in_row = offs < R
    score = tl.load(s0_ptr + row + offs, mask=in_row, other=0.0)
    valid = tl.load(valid_ptr + row + offs, mask=in_row, other=0) != 0
    rank = tl.full([BLOCK_R], -1, tl.int32)
    round_index = tl.zeros([], tl.int32)
    for start in range(0, R, window):
        candidate = valid & (offs >= start) & (offs < start + window)
        left = tl.sum(candidate.to(tl.int32), axis=0)
        while left > 0:
            take = tl.minimum(left, step_size)
            delta = tl.zeros([BLOCK_R], tl.float32)
            for _ in range(take):
                key = tl.where(candidate & (score == score), score, float("-inf"))  # noqa: PLR0124 (NaN counts as -inf)
                best = tl.max(key, axis=0)
                picked = tl.min(tl.where(candidate & (key == best), offs, BLOCK_R), axis=0)
                is_picked = offs == picked
                candidate = candidate & ~is_picked
                rank = tl.where(is_picked, round_index, rank)
                delta += tl.load(columns_ptr + (row + picked) * R + offs, mask=in_row, other=0.0)
            score += delta
            left -= take
            round_index += 1
    tl.store(rank_ptr + row + offs, rank, mask=in_row)


def _num_warps(block_r: int) -> int:
    # About 8 elements of each row-wide vector per thread: small rows reduce within one warp.
    return min(16, max(1, block_r // 256))


def greedy_order(abar_rr, s0, valid, step_size, block_size, block_mode):
    B, R = s0.shape
    rank = torch.empty((B, R), dtype=torch.int32, device=s0.device)
    if B > 0 and R > 0:
        with device_guard(s0.device):
            columns = abar_rr.to(torch.float32).transpose(1, 2).contiguous()
            block_r = next_power_of_2(R)
            _greedy_rank_kernel[(B,)](
                columns,
                s0.to(torch.float32).contiguous(),
                valid.contiguous().view(torch.uint8),
                rank,
                R,
                step_size,
                greedy_window(R, block_size, block_mode),
                BLOCK_R=block_r,
                num_warps=_num_warps(block_r),
                enable_fp_fusion=FP_FUSION,
            )
    return dense_steps(rank, block_size)
