"""The RL baselines and MDPO: their rows and losses against independent hand computations (float64 loops,
naive re-implementations of each paper's formula), on scripted inputs with odd sizes.

End-to-end runs of every method (smoke, bit-exact resume, reward rising): tests/test_rl.py.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from agdo import orders
from agdo.training import mdpo
from agdo.training.masking import coupled_rows, mean_field_rows
from agdo.training.rl import (RLConfig, RLRows, _Clock, coupled_loss, group_advantages,
                              weighted_logp_loss, wd1_weights)

sys.path.insert(0, str(Path(__file__).parent))
from test_rl import _one_step_trainer  # noqa: E402
from training_helpers import fresh_accelerate, one_thread, script_forward  # noqa: E402,F401  (autouse fixtures)

MASK = 99


def _batch(seed=0, B=3, P=5, R=7):
    """Left-padded prompts (real lengths 5, 3, 4) and responses with a few untrained positions at the end."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (B, P + R), generator=gen)
    mask = torch.ones(B, P + R, dtype=torch.bool)
    for b, real in enumerate([5, 3, 4][:B]):
        mask[b, : P - real] = False
    trained = torch.ones(B, R, dtype=torch.bool)
    trained[1, 5:] = False
    trained[2, 6:] = False
    return ids, mask, trained, P


# ------------------------------------------------------------------------------------ d1 / wd1 rows


def test_mean_field_rows_mask_the_completion_and_a_fraction_of_the_real_prompt():
    ids, mask, trained, P = _batch()
    rows = mean_field_rows(ids, mask, response_start=P, trained=trained, mask_token_id=MASK, masks_per_sample=400,
                           p_mask_prompt=0.3, generator=torch.Generator().manual_seed(1))
    assert rows.sample_index.tolist() == [b for b in range(3) for _ in range(400)]
    assert (rows.input_ids[:, P:] == MASK).all()  # the whole completion, trained or not
    prompt_hidden = rows.input_ids[:, :P] == MASK
    real = mask[rows.sample_index, :P]
    assert not prompt_hidden[~real].any()  # left padding is never masked
    rate = prompt_hidden[real].float().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / int(real.sum()))
    assert (rows.targets == ids[rows.sample_index]).all()
    for r in (0, 400, 800):
        b = int(rows.sample_index[r])
        n = int(trained[b].sum())
        assert torch.equal(rows.weights[r, P:] > 0, trained[b])
        assert rows.weights[r, P:][trained[b]].tolist() == pytest.approx([1 / n] * n)
    # Masks differ between rows of one sample; p = 0 leaves the prompt whole; wd1 sums (weight 1).
    assert len({tuple(row.tolist()) for row in prompt_hidden[:400]}) > 20  # of the 32 patterns of 5 tokens
    plain = mean_field_rows(ids, mask, response_start=P, trained=trained, mask_token_id=MASK, masks_per_sample=1,
                            p_mask_prompt=0.0, token_mean=False)
    assert torch.equal(plain.input_ids[:, :P], ids[:, :P])
    assert torch.equal(plain.weights[:, P:], trained.float())


def test_coupled_rows_are_the_full_mask_a_mask_and_its_complement():
    ids, mask, trained, P = _batch(seed=2)
    rows = coupled_rows(ids, mask, response_start=P, trained=trained, mask_token_id=MASK, masks_per_sample=50,
                        generator=torch.Generator().manual_seed(3))
    assert rows.input_ids.shape[0] == 3 * 3 * 50
    assert torch.equal(rows.input_ids[:, :P], ids[rows.sample_index, :P])  # the prompt is never masked
    ts = []
    for u in range(rows.input_ids.shape[0] // 3):
        full, first, second = (rows.input_ids[3 * u + k, P:] == MASK for k in range(3))
        w = rows.weights[3 * u : 3 * u + 3, P:]
        b = int(rows.sample_index[3 * u])
        assert rows.sample_index[3 * u : 3 * u + 3].tolist() == [b] * 3
        assert full.all()
        # The draw's mask and its complement split the trained tokens; untrained ones are masked in both.
        assert torch.equal(first & trained[b], (w[1] > 0)) and torch.equal(second & trained[b], (w[2] > 0))
        assert not ((w[1] > 0) & (w[2] > 0)).any() and torch.equal((w[1] > 0) | (w[2] > 0), trained[b])
        assert (first[~trained[b]]).all() and (second[~trained[b]]).all()
        n = int(trained[b].sum())
        assert w[0][trained[b]].tolist() == pytest.approx([1 / n] * n)
        if (w[1] > 0).any() and (w[2] > 0).any():
            t = 1 / float(w[1][w[1] > 0][0])
            assert 0.2 <= t <= 0.8 and float(w[2][w[2] > 0][0]) == pytest.approx(1 / (1 - t), rel=1e-5)
            ts.append(t)
    assert 0.4 < statistics.fmean(ts) < 0.6 and min(ts) < 0.3 and max(ts) > 0.7  # t ~ U(0.2, 0.8)


# ------------------------------------------------------------------------------------ losses


def _coupled_scripted(seed=0, units=3, N=6, V=5):
    gen = torch.Generator().manual_seed(seed)
    trained = torch.rand(units, N, generator=gen) < 0.8
    trained[:, 0] = True
    t = 0.2 + 0.6 * torch.rand(units, 1, generator=gen)
    first = trained & (torch.rand(units, N, generator=gen) < t)
    second = trained & ~first
    weights = torch.stack([trained / trained.sum(1, keepdim=True), first / t, second / (1 - t)], 1).flatten(0, 1)
    targets = torch.randint(0, V, (units * 3, N), generator=gen)
    targets.view(units, 3, N)[:, 1:] = targets.view(units, 3, N)[:, :1]  # one sequence per triple
    advantages = (torch.randn(units, 1, generator=gen) * 2).expand(units, N).repeat_interleave(3, 0)
    supervised = weights > 0
    old = torch.log(torch.rand(units * 3, N, generator=gen) * 0.6 + 0.05) * supervised
    ref = torch.log(torch.rand(units * 3, N, generator=gen) * 0.6 + 0.05) * supervised
    rows = RLRows(torch.zeros(units * 3, N, dtype=torch.long), torch.ones(units * 3, N, dtype=torch.bool), targets,
                  weights.float(), torch.arange(units).repeat_interleave(3), advantages.contiguous(), old, ref)
    logits = torch.randn(units * 3, N, V, generator=gen, dtype=torch.float64).float()
    return logits, rows, trained, first, t


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_coupled_loss_and_gradient_match_a_token_by_token_computation(beta):
    logits, rows, trained, first, t = _coupled_scripted()
    ours = logits.clone().requires_grad_(True)
    loss, stats = coupled_loss(ours, rows, epsilon=0.2, epsilon_high=0.28, beta=beta)
    loss.backward()

    naive = logits.double().clone().requires_grad_(True)
    expected, clipped = 0.0, 0
    units, N = trained.shape
    for u in range(units):
        n = int(trained[u].sum())
        for k in range(N):
            if not trained[u, k]:
                continue
            target = int(rows.targets[3 * u, k])
            lp = [torch.log_softmax(naive[3 * u + j, k], -1)[target] for j in range(3)]
            scale = 1 / float(t[u]) if first[u, k] else 1 / (1 - float(t[u]))
            j = 1 if first[u, k] else 2
            combined = 0.5 * (lp[0] + lp[j] * scale)
            old = 0.5 * (float(rows.old_logp[3 * u, k]) + float(rows.old_logp[3 * u + j, k]) * scale)
            ref = 0.5 * (float(rows.ref_logp[3 * u, k]) + float(rows.ref_logp[3 * u + j, k]) * scale)
            a = float(rows.advantages[3 * u, k])
            ratio = torch.exp(combined - old)
            term = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
            r = ratio.item()
            clipped += int((r < 0.8 and a < 0) or (r > 1.28 and a > 0))
            if beta:
                term = term + beta * (torch.exp(ref - combined) - (ref - combined) - 1)
            expected = expected + term / n
    expected = 3 * expected  # a triple counts as three rows of the update
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.grad.double(), naive.grad, rtol=1e-4, atol=1e-6)
    assert int(stats["supervised_tokens"]) == int(trained.sum()) and int(stats["clipped_tokens"]) == clipped > 0
    with pytest.raises(ValueError, match="triples"):
        coupled_loss(logits[:4], RLRows(*(None if x is None else x[:4] for x in rows)), epsilon=0.2,
                     epsilon_high=0.2, beta=0.0)


@pytest.mark.parametrize("forward_batch_size", [1, 2, 4, 64])
def test_coupled_update_keeps_triples_together_and_averages_over_them(tmp_path, forward_batch_size):
    """A scripted model (fixed logits per row) through Trainer.optimizer_update: whatever forward_batch_size,
    chunks hold whole triples and the logged loss is the mean over triples of the coupled loss."""
    logits, rows, *_ = _coupled_scripted(seed=9, units=4)
    M = rows.input_ids.shape[0]
    rows = rows._replace(input_ids=torch.arange(M)[:, None].expand(M, rows.input_ids.shape[1]).contiguous())
    trainer = _one_step_trainer(tmp_path, "coupled", forward_batch_size=forward_batch_size, beta=0.05)
    chunk_sizes = []
    script_forward(trainer, logits, chunk_sizes)
    try:
        result = trainer.optimizer_update([rows], trainer._loss)
    finally:
        trainer.rewards.close()
    assert all(size % 3 == 0 for size in chunk_sizes) and sum(chunk_sizes) == M
    expected = sum(coupled_loss(logits[3 * u : 3 * u + 3], RLRows(*(None if x is None else x[3 * u : 3 * u + 3]
                                                                    for x in rows)),
                                epsilon=0.2, epsilon_high=0.2, beta=0.05)[0].item() / 3 for u in range(4)) / 4
    assert result["rows"] == M and result["loss"] == pytest.approx(expected, rel=1e-5)


def test_wd1_weights_and_loss_match_the_papers_objective():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 0.2, 0.0, 0.0, 0.0]])
    advantages, keep, _ = group_advantages(rewards, scale_rewards=False)
    w = wd1_weights(advantages, keep)
    for g in range(3):
        a = [float(x) for x in advantages[g]]
        plus = [math.exp(x) / sum(math.exp(y) for y in a) for x in a]
        minus = [math.exp(-x) / sum(math.exp(-y) for y in a) for x in a]
        expected = [p - m for p, m in zip(plus, minus)] if keep[g] else [0.0] * 5
        assert w[g].tolist() == pytest.approx(expected, abs=1e-6)
    assert keep.tolist() == [True, False, True] and advantages[0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0])

    # The loss: -sum_i w_i * sum_t logp_it (+ beta k3), with token weight 1 (a sum, not a mean).
    gen = torch.Generator().manual_seed(4)
    M, N, V = 5, 7, 6
    targets = torch.randint(0, V, (M, N), generator=gen)
    supervised = torch.rand(M, N, generator=gen) < 0.7
    ref = torch.log(torch.rand(M, N, generator=gen) * 0.5 + 0.1) * supervised
    rows = RLRows(torch.zeros(M, N, dtype=torch.long), torch.ones(M, N, dtype=torch.bool), targets,
                  supervised.float(), torch.arange(M), w[0][:, None].expand(M, N).contiguous(), None, ref)
    logits = torch.randn(M, N, V, generator=gen)
    loss, stats = weighted_logp_loss(logits, rows, beta=0.04)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    expected = sum(float(-w[0, m] * logp[m][supervised[m]].sum() + 0.04 * k3[m][supervised[m]].sum()) for m in range(M))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert int(stats["supervised_tokens"]) == int(supervised.sum()) and int(stats["clipped_tokens"]) == 0


# ------------------------------------------------------------------------------------ MDPO


def _naive_scores(rewards: list[float]) -> list[float]:
    """Paper 003 Eq. 6 indexed forward: a_n = R_n - R_{n-1} + mean(R_{n+1..}); the last step's mean is R_last."""
    scores = []
    for n, r in enumerate(rewards):
        previous = rewards[n - 1] if n else 0.0
        later = rewards[n + 1 :]
        scores.append(r - previous + (statistics.fmean(later) if later else rewards[-1]))
    return scores


def test_step_scores_and_advantages_by_hand():
    nan = float("nan")
    rewards = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, nan, nan], [1, 0, 0, 0, nan], [0.5, 0.5, 0.5, 0.5, 0.5],
                            [1, nan, nan, nan, nan], [0, 0, 0, 0, 1]], dtype=torch.float64)
    scores = mdpo.step_scores(rewards)
    for b in range(6):
        live = [float(x) for x in rewards[b] if not math.isnan(x)]
        assert scores[b, : len(live)].tolist() == pytest.approx(_naive_scores(live))
        assert torch.isnan(scores[b, len(live):]).all()
    # The released MDPO code gives [1.75, 2.67, 1.5, 1, 3] here: the same plus a constant 1, which the
    # per-step normalisation removes.
    assert _naive_scores([0, 1, 1, 0, 1]) == pytest.approx([0 + 0.75, 1 + 2 / 3, 0 + 0.5, -1 + 1, 1 + 1])

    advantages = mdpo.step_advantages(scores, group_size=3)
    for group in range(2):
        for n in range(5):
            members = [b for b in range(3 * group, 3 * group + 3) if not math.isnan(scores[b, n])]
            values = [float(scores[b, n]) for b in members]
            mean, std = statistics.fmean(values), statistics.pstdev(values)
            for b in range(3 * group, 3 * group + 3):
                expected = (float(scores[b, n]) - mean) / (std + 1e-4) if b in members else 0.0
                assert float(advantages[b, n]) == pytest.approx(expected, abs=1e-9)
    unscaled = mdpo.step_advantages(scores, group_size=3, scale_rewards=False)
    assert float(unscaled[0, 0]) == pytest.approx(float(scores[0, 0]) - statistics.fmean(
        [float(scores[b, 0]) for b in range(3)]))


def test_top_steps_take_the_largest_absolute_advantages_and_skip_zeros():
    advantages = torch.tensor([[0.1, -2.0, 0.5, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.3, 0.2, 0.1]])
    sample, step = mdpo.top_steps(advantages, 2)
    assert list(zip(sample.tolist(), step.tolist())) == [(0, 1), (0, 4), (2, 0), (2, 1)]  # ties: earlier step
    sample, step = mdpo.top_steps(advantages, None)
    assert sorted(zip(sample.tolist(), step.tolist())) == [(0, 0), (0, 1), (0, 2), (0, 4), (2, 0), (2, 1), (2, 2),
                                                           (2, 3), (2, 4)]


@pytest.mark.parametrize("weighting", ["released", "mean"])
def test_step_rows_are_the_state_entering_the_step_with_its_predictions_as_targets(weighting):
    gen = torch.Generator().manual_seed(5)
    T, B, P, R = 4, 3, 3, 6
    sequences = torch.randint(0, 50, (B, P + R), generator=gen)
    attention_mask = torch.ones(B, P + R, dtype=torch.bool)
    attention_mask[1, 0] = False
    predictions = torch.randint(0, 50, (T, B, R), generator=gen)
    masked = torch.rand(T, B, R, generator=gen) < 0.5
    masked[:, :, 0] = True
    probs = torch.where(masked, torch.rand(T, B, R, generator=gen), float("nan"))
    sample, step = torch.tensor([2, 0, 2]), torch.tensor([1, 3, 0])
    rows = mdpo.step_rows(sequences, attention_mask, response_start=P, predictions=predictions, masked=masked,
                          sample=sample, step=step, mask_token_id=MASK, weighting=weighting, prediction_probs=probs)
    for r, (b, t) in enumerate(zip(sample.tolist(), step.tolist())):
        m = masked[t, b]
        assert torch.equal(rows.input_ids[r, :P], sequences[b, :P])
        assert torch.equal(rows.input_ids[r, P:], torch.where(m, MASK, predictions[t, b]))
        assert torch.equal(rows.targets[r, P:], predictions[t, b]) and torch.equal(rows.attention_mask[r], attention_mask[b])
        count = int(m.sum())
        for k in range(R):
            if not m[k]:
                assert rows.weights[r, P + k] == 0
            elif weighting == "mean":
                assert float(rows.weights[r, P + k]) == pytest.approx(1 / count)
            else:  # the released code: confidence x lambda_t (= R / #masked), then the mean over the masked
                assert float(rows.weights[r, P + k]) == pytest.approx(float(probs[t, b, k]) * (R / count) / count)
    assert rows.sample_index.tolist() == sample.tolist() and rows.step.tolist() == step.tolist()


def test_step_rewards_score_each_distinct_prediction_once():
    # predictions[t][b] as text; a row's last step is its final response (rewarded with `finals`, not scored).
    text = [["123", "123", "444", "123"],
            ["123", "555", "444", "666"],
            ["666", "555", "444", "666"],
            ["666", "888", "444", "666"]]
    predictions = torch.tensor([[[int(ch) for ch in cell] for cell in row] for row in text])  # (T, B, R)
    T, B, R = predictions.shape
    masked = torch.zeros(T, B, R, dtype=torch.bool)
    for b, steps in enumerate([3, 4, 1, 2]):
        masked[:steps, b, 0] = True
    first, second = {"id": 0}, {"id": 1}
    records = [first, first, second, second]
    calls = []

    def score(recs, completions):
        calls.append(list(zip([r["id"] for r in recs], completions)))
        return [float(len(set(c))) + 10 * r["id"] for r, c in zip(recs, completions)]

    decode = lambda tokens: "".join(str(int(t)) for t in tokens)  # noqa: E731
    finals = torch.tensor([7.0, 8.0, 9.0, 6.0], dtype=torch.float64)
    rewards = mdpo.step_rewards(score, records, predictions, masked, finals, decode)
    assert len(calls) == 1
    assert sorted(calls[0]) == sorted({(0, "123"), (0, "555"), (1, "123")})  # "123" of record 0 scored once
    nan = float("nan")
    expected = torch.tensor([[3, 3, 7, nan], [3, 1, 1, 8], [9, nan, nan, nan], [13, 6, nan, nan]], dtype=torch.float64)
    torch.testing.assert_close(rewards, expected, equal_nan=True)


# ------------------------------------------------------------------------------------ trainer rows


@pytest.mark.parametrize("method", ["diffu_grpo", "wd1", "coupled"])
def test_fresh_masks_per_iteration_and_the_sequence_advantage(tmp_path, method):
    trainer = _one_step_trainer(tmp_path, method, masks_per_sample=2, num_iterations=2, p_mask_prompt=0.5,
                                scale_rewards=False)
    try:
        records = [trainer.dataset[i] for i in range(4)]
        rollouts = trainer._rollout(records, epoch=0)
        rewards = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1]])
        advantages, keep, _ = group_advantages(rewards, scale_rewards=False)
        sets, counts = trainer._training_rows(rollouts, advantages, keep, records, 0, _Clock(), {})
    finally:
        trainer.rewards.close()
    P, G = rollouts.response_start, 4
    kept = [c for c in range(16) if keep[c // G]]
    per_draw = 3 if method == "coupled" else 1
    assert len(sets) == 2 and sets[0] is not sets[1]
    assert counts["training_rows"] == 2 * len(kept) * 2 * per_draw
    assert not torch.equal(sets[0].input_ids, sets[1].input_ids)  # a fresh mask for each inner iteration
    trained = orders.trained_positions(rollouts.sequences[:, P:], trainer.adapter.stop_token_ids, 1,
                                       pad_token_id=trainer.adapter.pad_token_id)
    weights = wd1_weights(advantages, keep).flatten() * G if method == "wd1" else advantages.flatten()
    for rows in sets:
        assert rows.completion.tolist() == [c for c in kept for _ in range(2 * per_draw)]
        for r, c in enumerate(rows.completion.tolist()):
            assert (rows.advantages[r, P:] == float(weights[c])).all()
            if method != "coupled":
                assert (rows.input_ids[r, P:] == trainer.adapter.mask_token_id).all()
                expected = trained[c].float() / (1 if method == "wd1" else int(trained[c].sum()))
                torch.testing.assert_close(rows.weights[r, P:], expected)


def test_mdpo_rows_train_the_top_steps_of_each_rollout(tmp_path):
    trainer = _one_step_trainer(tmp_path, "mdpo", max_steps_per_sample=2, mdpo_weighting="mean")
    try:
        records = [trainer.dataset[i] for i in range(4)]
        rollouts = trainer._rollout(records, epoch=0)
        T = rollouts.predictions.shape[0]
        step_advantages = torch.randn(16, T, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        step_advantages[4:8] = 0  # a group without signal
        keep = torch.tensor([True, False, True, True])
        rows, _ = trainer._rows(rollouts, torch.zeros(4, 4), keep, records, 0, _Clock(), 0,
                                {"step_advantages": step_advantages})
    finally:
        trainer.rewards.close()
    P = rollouts.response_start
    expected = []
    for c in [c for c in range(16) if keep[c // 4]]:
        top = sorted(range(T), key=lambda n: -abs(float(step_advantages[c, n])))[:2]
        expected += [(c, n) for n in top]
    assert list(zip(rows.completion.tolist(), (rows.input_ids[:, P:] == trainer.adapter.mask_token_id)
                    .sum(1).tolist())) == [(c, int(rollouts.masked[n, c].sum())) for c, n in expected]
    for r, (c, n) in enumerate(expected):
        masked = rollouts.masked[n, c]
        assert torch.equal(rows.targets[r, P:], rollouts.predictions[n, c])
        assert torch.equal(rows.weights[r, P:] > 0, masked)
        assert (rows.advantages[r, P:] == float(step_advantages[c, n])).all()


def test_block_length_mixture_decodes_each_prompt_with_its_block_length(tmp_path):
    """MDPO's mixture of semi-AR and pure-diffusion rollouts: prompt i decodes with block_length_mixture[i % 2];
    each response equals the one a whole batch decoded with that block length gives for its row."""
    from agdo.eval import encode_prompts, prompt_text
    from agdo.sampling import generate
    from agdo.training.masking import sample_generator

    trainer = _one_step_trainer(tmp_path, "mdpo", block_length_mixture=[1, 3], generation_batch_size=3)
    try:
        records = [trainer.dataset[i] for i in range(4)]
        rollouts = trainer._rollout(records, epoch=0)
    finally:
        trainer.rewards.close()
    config, G = trainer.config, 4
    ids, mask = encode_prompts(trainer.adapter.tokenizer, [prompt_text(r) for r in records], "cpu")
    ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    for block_length in (1, 3):
        generators = [sample_generator(config.seed, 0, r["index"], g, 0) for r in records for g in range(G)]
        whole = generate(trainer.adapter, ids, mask, config.sampler_config(block_length), generator=generators)
        rows = [i * G + g for i, r in enumerate(records) if [1, 3][r["index"] % 2] == block_length for g in range(G)]
        assert torch.equal(rollouts.sequences[rows], whole.sequences[rows])
        assert torch.equal(rollouts.trace[rows], whole.trace[rows])
        T = whole.predictions.shape[0]
        assert torch.equal(rollouts.predictions[:T, rows], whole.predictions[:, rows])
        assert not rollouts.masked[T:, rows].any()  # padded steps of a shorter schedule mask nothing
    # Block length 1 is one token per block: left to right (an EOS settles what follows in its step).
    semi_ar = [i * G + g for i, r in enumerate(records) if r["index"] % 2 == 0 for g in range(G)]
    trace = rollouts.trace[semi_ar]
    assert semi_ar and (trace[:, 1:] >= trace[:, :-1]).all() and (trace[:, 0] == 0).all()
    with pytest.raises(ValueError, match="block_length must divide"):
        RLConfig(max_completion_length=4, block_length_mixture=[4, 3])


# ------------------------------------------------------------------------------------ over-denoising


def test_filter_overdenoising_keeps_prompts_right_in_the_middle_and_wrong_at_the_end(tmp_path, capsys):
    """A scripted model: the answer "1" is predicted from the fully masked state, and once the first position
    is committed (with a wrong digit), the predictions change — correct at step 0, wrong at the end."""
    from agdo import tasks
    from agdo.cli import main
    from agdo.models.adapter import AdapterOutput
    from agdo.rewards.pool import RewardPool
    from agdo.sampling import SamplerConfig

    tokenizer = tasks.build_tokenizer()
    vocab = tokenizer.get_vocab()
    digit = {d: vocab[str(d)] for d in range(10)}
    eos = tokenizer.eos_token_id

    class Scripted:
        mask_token_id, pad_token_id = tokenizer.mask_token_id, tokenizer.pad_token_id
        eos_token_ids = stop_token_ids = (eos,)
        device = torch.device("cpu")
        model = torch.nn.Linear(1, 1)

        def __init__(self):
            self.tokenizer = tokenizer

        def forward(self, input_ids, attention_mask=None, **_):
            B, N = input_ids.shape
            V = len(tokenizer)
            logits = torch.zeros(B, N, V)
            response = input_ids[:, -2:]
            fresh = (response == self.mask_token_id).all(1)
            # Fully masked: "1" then EOS with p ~ .6 / .9 (EOS committed first); then the first position
            # is filled with "7" (wrong) for the prompts whose answer is not 7.
            logits[:, -2, digit[1]] = torch.where(fresh, 3.0, 0.0)
            logits[:, -2, digit[7]] = torch.where(fresh, 2.5, 5.0)
            logits[:, -1, eos] = 6.0
            return AdapterOutput(logits)

    records = [{"prompt": "1+0=", "answer": "1", "reward": "exact"}, {"prompt": "3+4=", "answer": "7", "reward": "exact"},
               {"prompt": "2+2=", "answer": "4", "reward": "exact"}]
    sampler = SamplerConfig(gen_length=2, steps=2, return_predictions=True, stop_at_eos=False)
    categories = mdpo.classify_trajectories(Scripted(), records, sampler, score=RewardPool(0).score, seed=0,
                                            batch_size=2)
    assert categories == ["over_denoising", "correct", "never_correct"]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = mdpo.OverdenoisingConfig(train_file=str(prompts), output_file=str(tmp_path / "od.jsonl"), gen_length=2,
                                      steps=2, reward_workers=0)
    counts = mdpo.filter_overdenoising(config, adapter=Scripted())
    assert counts == {"correct": 1, "over_denoising": 1, "never_correct": 1}
    assert [json.loads(line) for line in (tmp_path / "od.jsonl").read_text().splitlines()] == records[:1]
    with pytest.raises(SystemExit):
        main(["filter-overdenoising", "gen_length=2"])  # neither a prompt file nor benchmarks
    assert "exactly one of `train_file`" in capsys.readouterr().err


def test_filter_overdenoising_command_on_a_model_directory(tmp_path, capsys):
    """The CLI end to end: a saved model, a prompt file; the printed counts add up to the prompts and the
    written file holds exactly the over-denoising ones, as records the RL config reads."""
    from agdo.cli import main
    from agdo.data import read_task_jsonl
    from train_worker import build_tiny_rl_run

    adapter, prompts = build_tiny_rl_run(num_problems=16, pretrain_steps=60)
    adapter.model.save_pretrained(tmp_path / "model")
    adapter.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    main(["filter-overdenoising", f"model_name_or_path={tmp_path / 'model'}", f"train_file={tmp_path / 'prompts.jsonl'}",
          f"output_file={tmp_path / 'od.jsonl'}", "gen_length=3", "steps=3", "temperature=1.0", "reward_workers=0"])
    printed = capsys.readouterr().out
    parts = [part.split(": ") for part in printed.splitlines()[0].split(" | ")]  # "correct: 3 (18.8%) | ..."
    counts = {name.strip(): int(rest.split()[0]) for name, rest in parts}
    assert set(counts) == set(mdpo.CATEGORIES) and sum(counts.values()) == 16
    assert counts["over_denoising"] > 0  # sampled at temperature 1, a weak model over-denoises now and then
    kept = read_task_jsonl(tmp_path / "od.jsonl")
    assert len(kept) == counts["over_denoising"] and all(record in prompts for record in kept)
    assert f"wrote {counts['over_denoising']} over-denoising prompts" in printed


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides, message", [
    (dict(masks_per_sample=0), "masks_per_sample"),
    (dict(p_mask_prompt=1.5), "p_mask_prompt"),
    (dict(mdpo_weighting="confidence"), "mdpo_weighting"),
    (dict(method="wd1", beta=0.04, reference="old"), "wd1 has no old policy"),
])
def test_method_config_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        RLConfig(**overrides)


def test_mdpo_trains_eight_steps_by_default_and_records_predictions():
    config = RLConfig(method="mdpo")
    assert config.steps_per_sample == 8 and config.sampler_config().return_predictions
    assert RLConfig(method="agdo").steps_per_sample is None and not RLConfig().sampler_config().return_predictions
    assert RLConfig(method="mdpo", max_steps_per_sample=3).steps_per_sample == 3
