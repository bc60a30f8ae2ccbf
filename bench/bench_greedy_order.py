"""greedy_order (AGDO Algorithm 1): the kernels against plain torch loops.

GPU: the paper's RL batch, 256 sequences x R in {256, 1024, 2048} x step_size in {1, 16}; the Triton and
CUDA kernels against the torch reference (a torch loop on the same device, one pick per iteration,
vectorised over the batch; the time baseline). Targets: >= 50x the torch loop at R=1024, step_size=1,
and < 10 ms for the whole 256 x 1024 batch on an H100.
CPU: the incremental torch reference against the naive loop that recomputes S from scratch every round
(a batched mat-vec over the picked set), at small sizes so ``pytest bench/`` stays quick.
"""

from __future__ import annotations

import pytest
import torch

import agdo_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
SIZES = [(256, r, k) for r in (256, 1024, 2048) for k in (1, 16)] if ON_GPU else [(8, 128, 1), (8, 128, 16)]
IMPLS = ["torch_loop", "triton", "cuda"] if ON_GPU else ["torch_naive", "torch_loop"]


def _inputs(B, R):
    """Row-stochastic Abar (like head-averaged probabilities), prompt mass s0, and an invalid tail of
    0..R/4 positions per row (responses that stopped early)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    abar = torch.rand(B, R, R, device=DEVICE, generator=gen)
    abar /= abar.sum(-1, keepdim=True)
    s0 = torch.rand(B, R, device=DEVICE, generator=gen)
    lengths = R - torch.randint(0, R // 4 + 1, (B, 1), device=DEVICE, generator=gen)
    valid = torch.arange(R, device=DEVICE) < lengths
    return abar, s0, valid


def naive_greedy_ranks(abar, s0, valid, step_size):
    """The straightforward loop: each round, S = s0 + Abar @ picked, then the top step_size candidates
    (stable sort: lower position first on ties). O(R^3 / step_size) per sequence."""
    B, R = s0.shape
    picked = torch.zeros_like(valid)
    rank = torch.full((B, R), -1, dtype=torch.int64, device=s0.device)
    for round_index in range(-(-R // step_size)):
        score = s0 + torch.bmm(abar, picked.to(abar.dtype)[..., None])[..., 0]
        candidate = valid & ~picked
        ordered = torch.sort(score.masked_fill(~candidate, float("-inf")), dim=-1, descending=True, stable=True)
        top = ordered.indices[:, :step_size]
        take = candidate.gather(1, top)
        picked.scatter_(1, top, take | picked.gather(1, top))
        rank.scatter_(1, top, torch.where(take, round_index, rank.gather(1, top)))
    return rank


@pytest.mark.parametrize("B,R,step_size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_order(measure, B, R, step_size, impl):
    if impl == "cuda":
        reason = agdo_kernels.available_backends(DEVICE)["greedy_order"]["cuda"]
        if reason is not None:
            pytest.skip(reason)
    abar, s0, valid = _inputs(B, R)
    options = dict(valid=valid, step_size=step_size)
    fns = {
        "torch_naive": lambda: naive_greedy_ranks(abar, s0, valid, step_size),
        "torch_loop": lambda: agdo_kernels.greedy_order(abar, s0, backend="torch", **options),
        "triton": lambda: agdo_kernels.greedy_order(abar, s0, backend="triton", **options),
        "cuda": lambda: agdo_kernels.greedy_order(abar, s0, backend="cuda", **options),
    }
    baseline = "torch_naive" if "torch_naive" in IMPLS else "torch_loop"
    measure(
        fns[impl],
        group=f"greedy_order B={B} R={R} step_size={step_size} float32",
        impl=impl,
        baseline=impl == baseline,
        rounds=3 if impl.startswith("torch") else 10,
        shape=[B, R, R],
        backend=impl,
        B=B,
        R=R,
        step_size=step_size,
    )
