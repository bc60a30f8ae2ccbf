"""Denoising orders and the public step numbering, against naive per-row loops."""

import pytest
import torch

import agdo_kernels
from agdo.orders import blockwise_order, left_to_right_order, random_order, trace_order, trained_positions


def _naive_dense(rank, block_size):
    out = []
    for row in rank.tolist():
        pairs = sorted({((i // block_size) if block_size else 0, r) for i, r in enumerate(row) if r >= 0})
        number = {pair: n for n, pair in enumerate(pairs)}
        out.append([number[((i // block_size) if block_size else 0, r)] if r >= 0 else -1 for i, r in enumerate(row)])
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("block_size", [None, 1, 3, 7, 50])
def test_dense_steps_matches_naive(block_size):
    gen = torch.Generator().manual_seed(0)
    rank = torch.randint(-1, 9, (4, 23), generator=gen)
    rank[2] = -1
    got = agdo_kernels.dense_steps(rank, block_size=block_size)
    assert got.dtype == torch.int32
    assert torch.equal(got, _naive_dense(rank, block_size))


def test_dense_steps_bad_input():
    with pytest.raises(TypeError, match="`rank` must have dtype"):
        agdo_kernels.dense_steps(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`block_size` must be >= 1"):
        agdo_kernels.dense_steps(torch.zeros(2, 3, dtype=torch.long), block_size=0)


def _trained():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([13, 7, 0, 20])
    return torch.arange(20)[None, :] < lengths[:, None], gen


@pytest.mark.parametrize("step_size", [1, 3, 16])
def test_orders_group_tokens_into_steps(step_size):
    trained, gen = _trained()
    for steps in (left_to_right_order(trained, step_size=step_size),
                  random_order(trained, step_size=step_size, generator=gen)):
        assert (steps[~trained] == -1).all() and (steps[trained] >= 0).all()
        for b in range(trained.shape[0]):
            n = int(trained[b].sum())
            counts = torch.bincount(steps[b][trained[b]].long(), minlength=0) if n else torch.zeros(0)
            # Dense steps, each with step_size tokens except possibly the last.
            assert counts.numel() == -(-n // step_size)
            assert (counts[:-1] == step_size).all() if n else True
    l2r = left_to_right_order(trained, step_size=step_size)
    expected = torch.where(trained, torch.arange(20) // step_size, -1).to(torch.int32)
    assert torch.equal(l2r, expected)


def test_blockwise_and_trace_orders():
    trained, _ = _trained()
    assert torch.equal(blockwise_order(trained, block_size=4), torch.where(trained, torch.arange(20) // 4, -1).int())
    trace = torch.tensor([[5, 0, 0, 9, 2, 2, 7, -1]])
    got = trace_order(trace, torch.ones(1, 8, dtype=torch.bool), shrink=2)
    # merged commit steps 2,0,0,4,1,1,3 → dense 2,0,0,4,1,1,3; never-committed stays -1
    assert got.tolist() == [[2, 0, 0, 4, 1, 1, 3, -1]]


def test_trained_positions_post_num():
    """SPEC §4: the end-of-turn token (2) is an ordinary response token; post_num counts the pads (0) after it.
    A row that stops with a pad (no end-of-turn) counts that pad as the first of its post_num."""
    response = torch.tensor([[7, 8, 2, 0, 0, 0, 0], [7, 8, 9, 9, 9, 9, 9], [7, 0, 0, 0, 0, 0, 0],
                             [2, 0, 0, 0, 0, 0, 0], [7, 2, 5, 0, 2, 0, 0]])
    got = trained_positions(response, stop_token_ids=[0, 2], post_num=2, pad_token_id=0)
    assert got.int().tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7, [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0],
                                  [1, 1, 1, 1, 0, 0, 0]]  # after the first end: post_num positions, whatever they hold
    none = trained_positions(response, stop_token_ids=[0, 2], post_num=0, pad_token_id=0)
    assert none.int().tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7, [1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0, 0, 0]]
    # post_num running past the end is clipped to the response; an end-of-turn that is also the pad id is a pad.
    assert trained_positions(response[:1], stop_token_ids=[0, 2], post_num=9, pad_token_id=0).all()
    assert trained_positions(response[:1], stop_token_ids=[2], post_num=1, pad_token_id=2).int().tolist() == [
        [1, 1, 1, 0, 0, 0, 0]]
