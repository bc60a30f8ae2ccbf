"""Masked training rows: what is hidden, what is supervised, and with which weight."""

import torch

from agdo.orders import left_to_right_order, trained_positions
from agdo.training.masking import order_rows, random_rows, weighted_nll

MASK = 99


def _batch():
    # Row 0: prompt of 3, response of 5 then 2 pads; row 1: left-padded prompt of 2, response of 3.
    input_ids = torch.tensor([[1, 2, 3, 10, 11, 12, 13, 14, 0, 0], [0, 4, 5, 20, 21, 22, 0, 0, 0, 0]])
    attention_mask = torch.tensor([[1] * 10, [0] + [1] * 9], dtype=torch.bool)
    trained = trained_positions(input_ids[:, 3:], stop_token_ids=[0], post_num=1, pad_token_id=0)
    return input_ids, attention_mask, trained


def test_trained_positions_include_post_num_stops():
    _, _, trained = _batch()
    assert trained.tolist() == [
        [True, True, True, True, True, True, False],
        [True, True, True, True, False, False, False],
    ]


def test_order_rows_follow_algorithm_2():
    input_ids, attention_mask, trained = _batch()
    steps = left_to_right_order(trained, step_size=2)
    gen = torch.Generator().manual_seed(0)
    rows = order_rows(input_ids, attention_mask, response_start=3, steps=steps, mask_token_id=MASK, generator=gen)
    # Every step of every sample becomes one row: 3 steps for row 0, 2 for row 1.
    assert sorted(zip(rows.sample_index.tolist(), rows.step.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    for r in range(rows.input_ids.shape[0]):
        b, t = int(rows.sample_index[r]), int(rows.step[r])
        row_steps = steps[b].long()
        hidden = rows.input_ids[r, 3:] == MASK
        supervised = rows.weights[r, 3:] > 0
        assert (rows.input_ids[r, :3] == input_ids[b, :3]).all(), "the prompt is never masked"
        assert hidden[(row_steps > t) | (row_steps < 0)].all(), "later steps and untrained positions are masked"
        assert not hidden[(row_steps < t) & (row_steps >= 0)].any(), "earlier steps are clean"
        assert supervised.any() and (supervised == (hidden & (row_steps == t))).all()
        torch.testing.assert_close(rows.weights[r].sum(), torch.tensor(1.0))  # mean over M_sub
        assert (rows.targets[r] == input_ids[b]).all()


def test_order_rows_weights_and_step_cap():
    input_ids, attention_mask, trained = _batch()
    steps = left_to_right_order(trained, step_size=1)
    influence = torch.rand(2, 7, generator=torch.Generator().manual_seed(1))
    gamma = 100.0
    rows = order_rows(input_ids, attention_mask, response_start=3, steps=steps, mask_token_id=MASK,
                      token_weights=1 + gamma * influence, max_steps_per_sample=2,
                      generator=torch.Generator().manual_seed(2))
    assert rows.input_ids.shape[0] == 4 and (rows.sample_index.bincount() == 2).all()
    for r in range(4):
        b = int(rows.sample_index[r])
        supervised = rows.weights[r, 3:] > 0
        expected = (1 + gamma * influence[b][supervised]) / supervised.sum()
        torch.testing.assert_close(rows.weights[r, 3:][supervised], expected)


def test_order_rows_exact_rows_per_sample_cycle_the_steps():
    # Blockwise with 2-token blocks: row 0 has 3 blocks, row 1 has 2; 7 rows each, every block at least 2x.
    input_ids, attention_mask, trained = _batch()
    steps = left_to_right_order(trained, step_size=2)
    rows = order_rows(input_ids, attention_mask, response_start=3, steps=steps, mask_token_id=MASK,
                      rows_per_sample=7, generator=torch.Generator().manual_seed(4))
    assert rows.sample_index.bincount().tolist() == [7, 7]
    for b, num in ((0, 3), (1, 2)):
        counts = rows.step[rows.sample_index == b].bincount(minlength=num).tolist()
        assert sorted(counts) == sorted([7 // num + (i < 7 % num) for i in range(num)])
    for r in range(rows.input_ids.shape[0]):  # every row is still an Algorithm-2 row of its step
        b, t = int(rows.sample_index[r]), int(rows.step[r])
        row_steps, hidden = steps[b].long(), rows.input_ids[r, 3:] == MASK
        supervised = rows.weights[r, 3:] > 0
        assert hidden[(row_steps > t) | (row_steps < 0)].all() and not hidden[(row_steps < t) & (row_steps >= 0)].any()
        assert supervised.any() and (supervised == (hidden & (row_steps == t))).all()
    # Fewer rows than steps: a uniform subset, one row per chosen step.
    rows = order_rows(input_ids, attention_mask, response_start=3, steps=steps, mask_token_id=MASK,
                      rows_per_sample=1, generator=torch.Generator().manual_seed(5))
    assert rows.sample_index.tolist() == [0, 1]


def test_random_rows_follow_the_llada_recipe():
    input_ids, attention_mask, trained = _batch()
    rows = random_rows(input_ids, attention_mask, response_start=3, trained=trained, mask_token_id=MASK,
                       masks_per_sample=50, generator=torch.Generator().manual_seed(3))
    assert rows.input_ids.shape[0] == 100
    hidden = rows.input_ids[:, 3:] == MASK
    row_trained = trained[rows.sample_index]
    assert hidden[~row_trained].all()
    supervised = rows.weights[:, 3:] > 0
    assert (supervised == (hidden & row_trained)).all()
    # weight = 1 / (t * n): identical inside a row, and at least 1/n since t <= 1.
    n = row_trained.sum(-1, keepdim=True).float()
    assert (rows.weights[:, 3:][supervised] >= (1 / n).expand_as(supervised)[supervised] - 1e-6).all()


def test_weighted_nll_matches_a_naive_sum():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 11, generator=gen)
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    weights = torch.rand(3, 5, generator=gen) * (torch.rand(3, 5, generator=gen) < 0.5)
    expected = sum(
        -weights[r, k] * torch.log_softmax(logits[r, k], -1)[targets[r, k]]
        for r in range(3) for k in range(5) if weights[r, k] > 0
    )
    torch.testing.assert_close(weighted_nll(logits, targets, weights), expected)
