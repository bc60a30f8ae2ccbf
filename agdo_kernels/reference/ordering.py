"""Greedy attention-guided order (AGDO Algorithm 1): the torch backend and the shared step numbering.

Every backend splits the work the same way:

1. ``rank (B, R)``: the greedy round at which each valid token is picked (``-1`` where not valid). Ranks
   only have to grow with the rounds of one row; gaps are allowed.
2. :func:`dense_steps` turns ranks into the public dense steps (Alg. 1 lines 11-15); all backends call it.

The float summation order of ``S`` is part of the contract, so that every float32 backend makes the same
picks bit for bit: ``S <- S + delta`` once per round, where ``delta = ((0 + c_1) + c_2) + ... + c_k`` adds the
round's columns in pick order (highest ``S`` first, lower position first on ties).

Non-finite scores (the same rule on every backend): when picking, a NaN in ``S`` counts as ``-inf``; a
pick is the largest ``S`` among the candidates, ties (``-inf`` ones included) to the lowest position. So a
row whose scores are all ``-inf``/NaN is ordered by position, and every valid token gets exactly one
rank, ``-1`` exactly where not valid. ``+inf`` is an ordinary largest score. ``S`` itself keeps the
NaN (a NaN column makes the scores it is added to NaN, i.e. ``-inf`` for later picks).
"""

from __future__ import annotations

import torch


def greedy_window(R: int, block_size, block_mode: str) -> int:
    """Length of the windows the greedy runs over, one after another: the whole row for
    ``block_mode="global"`` (or no blocks), one block for ``"within"``."""
    if block_mode == "within" and block_size is not None:
        return block_size
    return max(R, 1)


def dense_steps(rank: torch.Tensor, block_size) -> torch.Tensor:
    """Order tokens by ``(position // block_size, rank)`` and number the distinct pairs densely per row.

    ``rank (B, R)`` integer, ``-1`` where not valid (those stay ``-1``). Returns int32 ``(B, R)``.
    """
    B, R = rank.shape
    steps = torch.full((B, R), -1, dtype=torch.int32, device=rank.device)
    if R == 0:
        return steps
    rank = rank.to(torch.int64)
    valid = rank >= 0
    positions = torch.arange(R, device=rank.device)
    block = positions // block_size if block_size is not None else torch.zeros_like(positions)
    # span > every rank of the row, so block * span + rank is one-to-one on (block, rank) pairs.
    span = rank.amax(-1, keepdim=True).clamp_min(0) + 1
    key = torch.where(valid, block * span + rank, torch.iinfo(torch.int64).max)
    sorted_key, order = torch.sort(key, dim=-1, stable=True)
    starts_new_step = torch.zeros_like(sorted_key, dtype=torch.int32)
    starts_new_step[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    steps.scatter_(1, order, torch.cumsum(starts_new_step, dim=-1, dtype=torch.int32))
    return steps.masked_fill_(~valid, -1)


def greedy_ranks(abar_rr, s0, valid, step_size: int, window: int) -> torch.Tensor:
    """Incremental greedy, vectorised over the batch: ``S`` only gains the picked columns, so a sequence
    costs ``O(R^2)``. Rows advance in lockstep, one pick per iteration; a row with nothing left to pick
    in the current round does nothing. Computes in float64 if either input is float64, else float32."""
    B, R = s0.shape
    device = s0.device
    dtype = torch.promote_types(torch.promote_types(abar_rr.dtype, s0.dtype), torch.float32)
    columns = abar_rr.to(dtype).transpose(1, 2).contiguous()  # columns[b, j] = abar_rr[b, :, j]
    score = s0.to(dtype).clone()
    rank = torch.full((B, R), -1, dtype=torch.int64, device=device)
    rows = torch.arange(B, device=device)
    positions = torch.arange(R, device=device)
    round_index = 0
    for start in range(0, R, window):
        candidate = valid & (positions >= start) & (positions < start + window)
        # One host sync per window: enough rounds for the row with the most tokens in it.
        rounds = -(-int(candidate.sum(-1).max()) // step_size) if B else 0
        for _ in range(rounds):
            delta = torch.zeros_like(score)
            for _ in range(step_size):
                has_pick = candidate.any(-1)
                # NaN counts as -inf; the first candidate holding the best key (also when it is -inf).
                key = torch.where(candidate & ~torch.isnan(score), score, float("-inf"))
                best = key.amax(-1, keepdim=True)
                picked = (candidate & (key == best)).to(torch.uint8).argmax(-1)  # first maximum on ties
                candidate[rows, picked] = False
                rank[rows, picked] = torch.where(has_pick, round_index, rank[rows, picked])
                delta += torch.where(has_pick[:, None], columns[rows, picked], 0.0)
            score += delta
            round_index += 1
    return rank


def greedy_order(abar_rr, s0, valid, step_size, block_size, block_mode):
    window = greedy_window(s0.shape[1], block_size, block_mode)
    return dense_steps(greedy_ranks(abar_rr, s0, valid, step_size, window), block_size)
