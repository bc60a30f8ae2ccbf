"""The sampler against a scripted fake model: hand-computed picks for every strategy, plus properties.

Vocabulary of the fake: 0 = pad, 1 = EOS, 2..6 = content, 7 = mask. A *table* gives each response
position a fixed distribution (so a step commits the best-scoring masked positions in a known order);
a *script* picks the table from the current response (state-dependent, for RCR); the *random model*
is a deterministic pseudo-random function of the real prompt tokens and the committed response, so it
does not see padding.
"""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from agdo.sampling import SCHEDULES, SamplerConfig, generate, tokens_per_step
from agdo.sampling.categorical import filter_logits

PAD, EOS, MASK, V = 0, 1, 7, 8
CONTENT = (2, 3, 4, 5, 6)


def dist(top, p, runner_up=None, p2=0.0, others=CONTENT):
    """Probabilities over V: ``top`` gets ``p``, ``runner_up`` ``p2``, the rest of ``others`` share what is left."""
    probs = torch.zeros(V, dtype=torch.float64)
    probs[top] = p
    if runner_up is not None:
        probs[runner_up] = p2
    rest = [t for t in others if t not in (top, runner_up)]
    probs[rest] = (1.0 - p - p2) / len(rest)
    return probs


def table(*rows):
    return torch.stack(rows)


class FakeAdapter:
    """Adapter contract: token-aligned logits ``(B, N, V)`` and ``s (B, N)`` only when ``unmasked`` is given."""

    mask_token_id, pad_token_id, eos_token_ids = MASK, PAD, (EOS,)

    def __init__(self, gen_length, script, s=None):
        self.gen_length, self.script, self.s = gen_length, script, s
        self.calls, self.unmasked_seen = 0, []

    def forward(self, input_ids, attention_mask=None, *, unmasked=None):
        self.calls += 1
        B, N = input_ids.shape
        P = N - self.gen_length
        prompt_mask = torch.ones(B, P, dtype=torch.bool) if attention_mask is None else attention_mask[:, :P]
        probs, s = self.script(input_ids[:, P:], input_ids[:, :P], prompt_mask)
        logits = torch.zeros(B, N, V)
        logits[:, P:] = probs.clamp_min(1e-12).log().float()
        if unmasked is None:
            return SimpleNamespace(logits=logits, s=None)
        self.unmasked_seen.append(unmasked.clone())
        full_s = torch.zeros(B, N)
        full_s[:, P:] = (s if s is not None else self.s).float()
        return SimpleNamespace(logits=logits, s=full_s)


def fixed(probs, s=None):
    """Script: the same table (R, V) and S (R,) for every row and step."""
    def script(resp, prompt, mask):
        return probs.expand(len(resp), -1, -1), None if s is None else s.expand(len(resp), -1)

    return script


def run(script_or_table, config, *, s=None, prompts=None, mask=None, generator=None):
    script = fixed(script_or_table, s) if isinstance(script_or_table, torch.Tensor) else script_or_table
    adapter = FakeAdapter(config.gen_length, script, s=s)
    prompts = torch.tensor([[2, 3]]) if prompts is None else prompts
    return generate(adapter, prompts, mask, config, generator=generator), adapter


# Four positions, one distinct order per strategy (hand-computed below).
#   pos  token  p     margin  entropy(nats)
#   0    2      0.50  0.05    0.911
#   1    3      0.60  0.50    1.228
#   2    4      0.95  0.9375  0.268
#   3    5      0.70  0.40    0.611
TABLE = table(dist(2, 0.50, 3, 0.45), dist(3, 0.60), dist(4, 0.95), dist(5, 0.70, 6, 0.30))
S = torch.tensor([0.9, 0.8, 0.1, 0.3])


@pytest.mark.parametrize(
    "alg, expected_trace",
    [
        ("max_prob", [3, 2, 0, 1]),  # by p: 2 (.95), 3 (.70), 1 (.60), 0 (.50)
        ("low_confidence", [3, 2, 0, 1]),  # LLaDA's name for the same rule
        ("margin", [3, 1, 0, 2]),  # by margin: 2, 1, 3, 0
        ("entropy", [2, 3, 0, 1]),  # by entropy, lowest first: 2, 3, 0, 1
    ],
)
def test_static_strategies_pick_in_hand_computed_order(alg, expected_trace):
    result, _ = run(TABLE, SamplerConfig(gen_length=4, steps=4, alg=alg))
    assert result.trace.tolist() == [expected_trace]
    assert result.response.tolist() == [[2, 3, 4, 5]]


@pytest.mark.parametrize(
    "threshold, steps, expected_trace",
    [
        # p > .65: candidates 2 (S .1) and 3 (S .3) → 3 then 2; then none → max_prob: 1, 0.
        (0.65, 4, [3, 2, 1, 0]),
        # p > 0: every position is a candidate → pure S order 0 (.9), 1 (.8), 3 (.3), 2 (.1).
        (0.0, 4, [0, 1, 3, 2]),
        # k = 2, p > .9: the one candidate (2) plus the most probable other (3), though 0 has the top S.
        (0.9, 2, [1, 1, 0, 0]),
    ],
)
def test_max_s_candidates_then_highest_s(threshold, steps, expected_trace):
    config = SamplerConfig(gen_length=4, steps=steps, alg="max_s", candidate_threshold=threshold)
    result, _ = run(TABLE, config, s=S)
    assert result.trace.tolist() == [expected_trace]


def probs_of(pairs, rest_tokens=(0, 1, 2, 3, 4, 5, 6)):
    """Probabilities over V: the given ``{token: p}``, the rest shared equally by the other real tokens."""
    probs = torch.zeros(V, dtype=torch.float64)
    for token, p in pairs.items():
        probs[token] = p
    rest = [t for t in rest_tokens if t not in pairs]
    probs[rest] = (1.0 - sum(pairs.values())) / len(rest)
    return probs


# Four positions whose order flips between the conventions at temperature 0 with top_k = 2 (Dream then
# renormalises the two best: q = p1 / (p1 + p2)).
#   pos  p1   p2   raw: p    margin  entropy   top-2: q     margin  entropy (binary)
#   0    .50  .44       .50  .06     .973             .5319  .0638   .6911
#   1    .55  .15       .55  .40     1.457            .7857  .5714   .5196
#   2    .30  .25       .30  .05     1.791            .5455  .0909   .6890
#   3    .60  .39       .60  .21     .736             .6061  .2121   .6705
FLIP = table(probs_of({2: 0.50, 3: 0.44}), probs_of({3: 0.55, 4: 0.15}), probs_of({4: 0.30, 5: 0.25}),
             probs_of({5: 0.60, 6: 0.39}))


@pytest.mark.parametrize(
    "alg, raw_trace, sampling_trace",
    [
        ("max_prob", [2, 1, 3, 0], [3, 0, 2, 1]),  # raw: 3, 1, 0, 2; top-2: 1, 3, 2, 0
        ("margin", [2, 0, 3, 1], [3, 0, 2, 1]),  # raw: 1, 3, 0, 2; top-2: 1, 3, 2, 0
        ("entropy", [1, 2, 3, 0], [3, 0, 2, 1]),  # raw: 3, 0, 1, 2; top-2: 1, 3, 2, 0
    ],
)
def test_confidence_conventions_by_hand(alg, raw_trace, sampling_trace):
    base = SamplerConfig(gen_length=4, steps=4, top_k=2, alg=alg)
    raw, _ = run(FLIP, dataclasses.replace(base, confidence_from="raw"))
    dream, _ = run(FLIP, dataclasses.replace(base, confidence_from="sampling"))
    assert raw.trace.tolist() == [raw_trace]
    assert dream.trace.tolist() == [sampling_trace]
    # Without filters at temperature 0 the two conventions agree (Dream's softmax of the raw logits).
    plain = SamplerConfig(gen_length=4, steps=4, alg=alg)
    a, _ = run(FLIP, dataclasses.replace(plain, confidence_from="raw"))
    b, _ = run(FLIP, dataclasses.replace(plain, confidence_from="sampling"))
    assert a.trace.tolist() == b.trace.tolist() == [raw_trace]


def test_confidence_convention_defaults_to_the_adapter_family():
    config = SamplerConfig(gen_length=4, steps=4, top_k=2)  # confidence_from=None: the family default

    def trace_with(**attributes):
        adapter = FakeAdapter(4, fixed(FLIP))
        for name, value in attributes.items():
            setattr(adapter, name, value)
        return generate(adapter, torch.tensor([[2, 3]]), None, config).trace.tolist()

    raw, dream = [[2, 1, 3, 0]], [[3, 0, 2, 1]]
    assert trace_with() == raw  # no attribute: LLaDA's convention
    assert trace_with(family="llada") == raw
    assert trace_with(family="dream") == dream
    assert trace_with(confidence_from="sampling") == dream
    assert trace_with(family="dream", confidence_from="raw") == raw  # the explicit attribute wins
    adapter = FakeAdapter(4, fixed(FLIP))
    adapter.family = "dream"
    forced = generate(adapter, torch.tensor([[2, 3]]), None, dataclasses.replace(config, confidence_from="raw"))
    assert forced.trace.tolist() == raw  # the config wins over the adapter


def naive_sampling_distribution(probs, temperature, top_p=None, top_k=None):
    """Dream's sample_tokens distribution with plain Python: temperature, top-p, top-k, softmax."""
    logits = [math.log(max(p, 1e-12)) for p in probs.tolist()]
    if temperature > 0:
        logits = [l / temperature for l in logits]
    if top_p is not None and top_p < 1:
        order = sorted(range(len(logits)), key=lambda v: -logits[v])
        total = sum(math.exp(logits[v]) for v in order)
        cumulative, keep = 0.0, set()
        for v in order:
            if cumulative <= top_p:  # Dream drops a token once the mass before it exceeds top_p
                keep.add(v)
            cumulative += math.exp(logits[v]) / total
        logits = [l if v in keep else -math.inf for v, l in enumerate(logits)]
    if top_k is not None:
        kth = sorted(logits, reverse=True)[top_k - 1]
        logits = [l if l >= kth else -math.inf for l in logits]
    total = sum(math.exp(l) for l in logits)
    return [math.exp(l) / total for l in logits]


@pytest.mark.parametrize("convention", ["raw", "sampling"])
def test_confidence_is_the_convention_probability_of_the_drawn_token(convention):
    # A fixed table from the random model; every step draws afresh at the masked positions.
    probs = random_model(torch.full((1, 6), MASK), torch.tensor([[2, 3]]), torch.ones(1, 2, dtype=torch.bool))[0][0]
    temperature, top_p, top_k = 0.7, 0.8, 4
    config = SamplerConfig(gen_length=6, steps=6, temperature=temperature, top_p=top_p, top_k=top_k,
                           confidence_from=convention, return_confidences=True, return_predictions=True)
    checked = 0
    for seed in range(4):
        result, _ = run(probs, config, generator=[torch.Generator().manual_seed(seed)])
        for t, i in result.confidences[:, 0].isnan().logical_not().nonzero().tolist():
            token = int(result.predictions[t, 0, i])
            if convention == "sampling":
                q = naive_sampling_distribution(probs[i], temperature, top_p, top_k)
                assert q[token] > 0  # drawn from the filtered distribution
                expected = q[token]
            else:
                expected = float(probs[i, token] / probs[i].sum())
            assert abs(float(result.confidences[t, 0, i]) - expected) < 1e-5
            checked += 1
    assert checked == 4 * (6 + 5 + 4 + 3 + 2 + 1)


def test_filter_order_follows_the_convention():
    # p = .4, .3, .2, .1 with top_k = 2, top_p = .5. HF order: top-2 → .571, .429, then top-p drops the
    # second (mass before .571 >= .5). Dream: top-p first keeps 0 and 1 (mass before 1 is .4 <= .5), then
    # top-2 keeps both.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert filter_logits(logits, top_k=2, top_p=0.5).isinf().tolist() == [[False, True, True, True]]
    assert filter_logits(logits, top_k=2, top_p=0.5, dream_order=True).isinf().tolist() == [[False, False, True, True]]
    q = naive_sampling_distribution(logits[0].exp().double(), 1.0, 0.5, 2)
    assert [v > 0 for v in q] == [True, True, False, False]


def test_max_s_asks_for_s_with_the_unmasked_tokens_and_others_do_not():
    prompts, mask = torch.tensor([[PAD, 2, 3]]), torch.tensor([[False, True, True]])
    _, adapter = run(TABLE, SamplerConfig(gen_length=4, steps=4, alg="max_s"), s=S, prompts=prompts, mask=mask)
    # U at step 1 = real prompt tokens + position 2 (committed at step 0; only candidate above .9).
    assert adapter.unmasked_seen[1].tolist() == [[False, True, True, False, False, True, False]]
    _, plain = run(TABLE, SamplerConfig(gen_length=4, steps=4, alg="max_prob"))
    assert plain.unmasked_seen == []


def test_random_strategy_follows_the_row_generator():
    config = SamplerConfig(gen_length=4, steps=4, alg="random")
    result, _ = run(TABLE, config, generator=[torch.Generator().manual_seed(3)])
    replay, masked, expected = torch.Generator().manual_seed(3), torch.ones(4, dtype=torch.bool), [-1] * 4
    for step in range(4):  # one (L,) draw per step; the best masked position is committed
        position = int(torch.rand(4, generator=replay).masked_fill(~masked, -1).argmax())
        expected[position], masked[position] = step, False
    assert result.trace.tolist() == [expected]


@pytest.mark.parametrize(
    "block_length, steps, still_masked",
    [
        # One block, linspace(1, .001, 5): a position is still masked after step i with probability
        # prod (s/t) = timesteps[i + 1] = .75025, .5005, .25075, then 0 (the last step takes all).
        (4, 4, [0.75025, 0.5005, 0.25075, 0.0]),
        # Two blocks of 2 steps, linspace(1, .001, 3) = 1, .5005, .001 per block: block 0 after its two
        # steps .5005, 0; block 1 is untouched until then, then the same.
        (2, 4, [0.5005, 0.0]),
    ],
)
def test_origin_commits_each_position_with_probability_one_minus_s_over_t(block_length, steps, still_masked):
    rows = 4000
    config = SamplerConfig(gen_length=4, steps=steps, block_length=block_length, alg="origin",
                           return_predictions=True)
    prompts = torch.tensor([[2, 3]]).expand(rows, -1)
    result, _ = run(TABLE, config, prompts=prompts, generator=torch.Generator().manual_seed(0))
    block0 = result.masked[:, :, :block_length].float()  # (T, B, L) masked going into each step
    after = torch.cat([block0[1:], torch.zeros_like(block0[:1])])  # masked after each step
    for step, expected in enumerate(still_masked):
        assert abs(float(after[step].mean()) - expected) < 0.02
    assert (result.response != MASK).all()
    # Each position is an independent coin, not a fixed count: the number committed at step 0 is
    # Binomial(L, 1 - t1/t0), so a row commits nothing at step 0 with probability t1^L.
    committed0 = block_length - after[0].sum(-1)
    nothing = float((committed0 == 0).float().mean())
    assert abs(nothing - still_masked[0] ** block_length) < 0.03
    assert len(set(committed0.tolist())) == block_length + 1


def test_alg_temp_draws_positions_from_a_softmax_of_the_scores():
    # Three positions, p = .9, .6, .3 (temperature 0, max_prob), k = 1 per step, alg_temp = .5:
    # weights w = exp(p / .5) = e^1.8, e^1.2, e^.6. Dream draws with torch.multinomial (no replacement), so
    # P(order i, j, then the last) = w_i / W * w_j / (W - w_i).
    rows = 20000
    probs = table(dist(2, 0.9), dist(3, 0.6), dist(4, 0.3))
    config = SamplerConfig(gen_length=3, steps=3, alg="max_prob", alg_temp=0.5)
    prompts = torch.tensor([[2, 3]]).expand(rows, -1)
    result, _ = run(probs, config, prompts=prompts, generator=torch.Generator().manual_seed(0))
    w = [math.exp(p / 0.5) for p in (0.9, 0.6, 0.3)]
    total = sum(w)
    orders = [tuple(sorted(range(3), key=lambda i: row[i])) for row in result.trace.tolist()]
    for first in range(3):
        for second in range(3):
            if first == second:
                continue
            third = 3 - first - second
            expected = w[first] / total * w[second] / (total - w[first])
            observed = orders.count((first, second, third)) / rows
            assert abs(observed - expected) < 0.012, (first, second, observed, expected)
    # alg_temp = 0 (or None, Dream's default) is the deterministic top-k.
    for off in (0.0, None):
        plain, _ = run(probs, dataclasses.replace(config, alg_temp=off))
        assert plain.trace.tolist() == [[0, 1, 2]]


def test_semi_ar_blocks_go_left_to_right():
    # Block 0 = positions 0, 1 (1 before 0 by p), then block 1 = 2, 3, although 2 is the most confident.
    result, _ = run(TABLE, SamplerConfig(gen_length=4, steps=4, block_length=2))
    assert result.trace.tolist() == [[1, 0, 2, 3]]


def test_static_schedule_commits_k_per_step():
    result, _ = run(TABLE, SamplerConfig(gen_length=4, steps=2))  # linear: 2 + 2
    assert result.trace.tolist() == [[1, 1, 0, 0]]


def test_dynamic_unmasking_commits_all_confident_or_the_best_one():
    # Step 0: p >= .65 at 2 and 3; step 1: none, so the best (1); step 2: the last (0).
    result, _ = run(TABLE, SamplerConfig(gen_length=4, threshold=0.65))
    assert result.trace.tolist() == [[2, 1, 0, 0]]
    assert result.num_steps == 3


def rcr_script(resp, prompt, mask):
    """Step 0 (all masked): p = .5/.3/.2; after pos 0 alone is committed: pos 1, 2 reach .9/.8;
    otherwise (pos 0 masked again): pos 0 predicts a different token (5) with p .6."""
    rows = []
    for r in resp:
        m = (r == MASK).tolist()
        if all(m):
            rows.append(table(dist(2, 0.5), dist(3, 0.3), dist(4, 0.2)))
        elif m == [False, True, True]:
            rows.append(table(dist(2, 0.5), dist(3, 0.9), dist(4, 0.8)))
        else:
            rows.append(table(dist(5, 0.6), dist(3, 0.9), dist(4, 0.8)))
    return torch.stack(rows), None


def test_rcr_remasks_a_committed_token_with_low_running_confidence():
    # Step 0: fill all, running c = [.5, .3, .2]; 2 must stay masked → re-mask 2 and 1; keep 0 (token 2).
    # Step 1: fill 1, 2 → c = [.5, .9, .8]; 1 must stay masked → re-mask 0, committed at step 0.
    # Step 2: fill 0 with its new prediction (5), c0 = max(.5, .6); nothing stays masked.
    config = SamplerConfig(gen_length=3, steps=3, alg="rcr", return_predictions=True)
    result, _ = run(rcr_script, config)
    assert result.masked[:, 0].tolist() == [[True] * 3, [False, True, True], [True, False, False]]
    # Predictions: an argmax at masked positions (temperature 0); position 2's .2 is not its top at step 0,
    # the tokens sharing the rest tie above it.
    weak = dist(4, 0.2)
    top_p = float(weak.max())
    assert weak[int(result.predictions[0, 0, 2])] == top_p
    assert result.predictions[:, 0, :2].tolist() == [[2, 3], [2, 3], [5, 3]]
    assert result.predictions[1:, 0, 2].tolist() == [4, 4]
    nan = float("nan")
    torch.testing.assert_close(result.prediction_probs[:, 0].double(),
                               torch.tensor([[0.5, 0.3, top_p], [nan, 0.9, 0.8], [0.6, nan, nan]], dtype=torch.float64),
                               equal_nan=True, rtol=1e-5, atol=1e-6)
    assert result.response.tolist() == [[5, 3, 4]]
    assert result.trace.tolist() == [[2, 1, 1]]
    # Low-confidence remasking freezes the early token 2 instead.
    lcr, _ = run(rcr_script, SamplerConfig(gen_length=3, steps=3, alg="max_prob"))
    assert lcr.response.tolist()[0][0] == 2


def test_rcr_running_confidence_is_a_maximum():
    # Like rcr_script, but position 0's second prediction is weaker (.4 < .5): its running c stays .5,
    # which beats nothing else at step 2 (only 0 is masked), so it is committed with c = .5, not .4.
    def script(resp, prompt, mask):
        probs, _ = rcr_script(resp, prompt, mask)
        probs[:, 0] = torch.where((resp[:, :1] == MASK) & (resp[:, 1:2] != MASK), dist(5, 0.4), probs[:, 0])
        return probs, None

    result, _ = run(script, SamplerConfig(gen_length=3, steps=3, alg="rcr"))
    assert result.response.tolist() == [[5, 3, 4]]


def test_end_tokens_are_decoded_like_any_token_by_default():
    # The old default (stop_at_eos=True, "pad everything after the first committed EOS") overwrote
    # positions 2 and 3 here — position 3 had already been committed (step 0) — so the model then
    # conditioned on padding it never wrote. LLaDA's and Dream's samplers decode every position: so do we.
    probs = table(dist(2, 0.6), dist(EOS, 0.9), dist(3, 0.8), dist(4, 0.95))
    result, adapter = run(probs, SamplerConfig(gen_length=4, steps=4))
    assert result.response.tolist() == [[2, EOS, 3, 4]]
    assert result.trace.tolist() == [[3, 1, 2, 0]]
    assert result.num_steps == adapter.calls == 4
    assert not result.settled.any()
    # Early stop on: an EOS inside a single block (pure diffusion) stops nothing either.
    stopped, _ = run(probs, SamplerConfig(gen_length=4, steps=4, stop_at_eos=True))
    assert stopped.response.tolist() == [[2, EOS, 3, 4]] and not stopped.settled.any()


# Three blocks of two. Block 0 holds an EOS but also content: the row goes on. Block 1 is EOS + PAD:
# with the early stop, block 2 (which the model would fill with 3, 4) becomes padding.
#   block 0: pos 1 EOS (.9) at step 0, pos 0 (.6) at step 1
#   block 1: pos 2 EOS (.9) at step 2, pos 3 PAD (.8) at step 3 → block complete, all end tokens
#   block 2: settled at step 3 (stop) — or pos 4/5 (.95/.7) at steps 4/5 (no stop)
STOP_TABLE = table(dist(2, 0.6), dist(EOS, 0.9), dist(EOS, 0.9), dist(PAD, 0.8), dist(3, 0.95), dist(4, 0.7))
S6 = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


def test_stop_at_eos_follows_traceRL_a_finished_all_end_block_ends_the_row():
    config = SamplerConfig(gen_length=6, steps=6, block_length=2, stop_at_eos=True, return_s=True,
                           return_token_probs=True)
    result, adapter = run(STOP_TABLE, config, s=S6)
    assert result.response.tolist() == [[2, EOS, EOS, PAD, PAD, PAD]]
    assert result.trace.tolist() == [[1, 0, 2, 3, 3, 3]]
    assert result.settled.tolist() == [[False] * 4 + [True] * 2]
    assert result.num_steps == adapter.calls == 4
    # Settled positions never enter the statistics records; decoded ones do.
    assert result.s[3, 0, 4:].isnan().all() and torch.allclose(result.s[3, 0, :4], S6[:4])
    assert result.token_probs[3, 0, 4:].isnan().all()
    assert torch.allclose(result.token_probs[3, 0, :4], torch.tensor([0.6, 0.9, 0.9, 0.8]))
    # Without the early stop the model writes block 2 itself.
    plain, _ = run(STOP_TABLE, dataclasses.replace(config, stop_at_eos=False), s=S6)
    assert plain.response.tolist() == [[2, EOS, EOS, PAD, 3, 4]] and plain.num_steps == 6
    assert not plain.settled.any()


def test_stop_at_eos_is_per_row():
    # Row with prompt [2, 3] gets STOP_TABLE; the other row's block 1 is content: only row 0 stops.
    other = table(dist(2, 0.6), dist(EOS, 0.9), dist(5, 0.9), dist(PAD, 0.8), dist(3, 0.95), dist(4, 0.7))

    def script(resp, prompt, mask):
        return torch.stack([STOP_TABLE if row[-1] == 3 else other for row in prompt]), None

    config = SamplerConfig(gen_length=6, steps=6, block_length=2, stop_at_eos=True)
    result, _ = run(script, config, prompts=torch.tensor([[2, 3], [2, 4]]))
    assert result.response.tolist() == [[2, EOS, EOS, PAD, PAD, PAD], [2, EOS, 5, PAD, 3, 4]]
    assert result.settled.tolist() == [[False] * 4 + [True] * 2, [False] * 6]
    assert result.trace.tolist() == [[1, 0, 2, 3, 3, 3], [1, 0, 2, 3, 4, 5]]


def test_early_stop_when_every_row_is_done():
    result, adapter = run(TABLE, SamplerConfig(gen_length=4, steps=8))  # k = 1,1,1,1,0,0,0,0
    assert result.num_steps == adapter.calls == 4


def test_records_per_step():
    config = SamplerConfig(
        gen_length=4, steps=4, block_length=2, alg="max_s", candidate_threshold=0.0,
        return_confidences=True, return_predictions=True, return_s=True, return_token_probs=True,
    )
    result, _ = run(TABLE, config, s=S)
    assert result.predictions.shape == result.confidences.shape == result.s.shape == (4, 1, 4)
    # Step 0: block 0 drawn, block 1 argmax: the top token everywhere.
    assert result.predictions[0].tolist() == [[2, 3, 4, 5]]
    assert result.masked[1].tolist() == [[False, True, True, True]]  # max-S committed 0 (S .9) first
    conf0 = result.confidences[0, 0]
    assert torch.allclose(conf0[:2], torch.tensor([0.5, 0.6])) and conf0[2:].isnan().all()
    assert result.confidences[1, 0, 0].isnan()  # committed: no longer predicted
    assert torch.allclose(result.s[0, 0], S)
    probs1 = result.token_probs[1, 0]  # after step 1: positions 0, 1 hold tokens 2, 3
    assert torch.allclose(probs1[:2], torch.tensor([0.5, 0.6])) and probs1[2:].isnan().all()


def random_model(resp, prompt, prompt_mask):
    """Deterministic pseudo-random logits and S from the real prompt tokens and the committed response.

    Integer features (exact whatever the padding), distances counted from the response start.
    """
    B, P = prompt.shape
    R = resp.shape[1]
    distance = torch.arange(P, 0, -1)
    context = (prompt * prompt_mask * distance).sum(1)
    committed = torch.where(resp == MASK, 0, resp + 1)
    state = (committed * torch.arange(1, R + 1)).sum(1)
    i = torch.arange(R, dtype=torch.float64).view(1, R, 1)
    v = torch.arange(V, dtype=torch.float64).view(1, 1, V)
    phase = 0.37 * context.view(B, 1, 1) + 0.011 * state.view(B, 1, 1) * (i + 1)
    logits = 3.0 * torch.sin(phase + 1.3 * i + 0.71 * v)
    s = torch.sigmoid(torch.cos(phase[..., 0] + 0.9 * i[..., 0]))
    return logits.softmax(-1), s


CONFIGS = {
    "max_prob": SamplerConfig(gen_length=8, steps=4, block_length=4, temperature=1.0),
    "random": SamplerConfig(gen_length=8, steps=8, block_length=4, temperature=0.7, alg="random"),
    "max_s": SamplerConfig(gen_length=8, steps=8, temperature=1.0, top_k=4, alg="max_s", candidate_threshold=0.3),
    "rcr": SamplerConfig(gen_length=8, steps=6, block_length=4, temperature=1.0, alg="rcr", schedule="cosine"),
    "dynamic": SamplerConfig(gen_length=8, block_length=4, temperature=1.0, top_p=0.9, alg="margin", threshold=0.5),
    "origin": SamplerConfig(gen_length=8, steps=8, block_length=4, temperature=1.0, alg="origin"),
    "dream": SamplerConfig(gen_length=8, steps=8, temperature=0.8, top_p=0.9, top_k=5, alg="entropy", alg_temp=0.3,
                           schedule="dream", confidence_from="sampling"),
    "stop_at_eos": SamplerConfig(gen_length=8, steps=8, block_length=2, temperature=1.5, stop_at_eos=True),
}
# Dream's origin rule and Dream's schedule may commit nothing at a step (as in Dream).
MAY_SKIP = {"origin", "dream"}


@pytest.mark.parametrize("name", CONFIGS)
def test_rows_do_not_depend_on_padding_or_neighbours(name):
    config = CONFIGS[name]
    prompts = [[2, 3, 4], [5, 6, 2, 3, 4], [3]]
    solo = []
    for index, prompt in enumerate(prompts):
        generator = [torch.Generator().manual_seed(index)]
        result, _ = run(random_model, config, prompts=torch.tensor([prompt]), generator=generator)
        solo.append((result.response[0], result.trace[0]))
    width = 7  # batch: left-padded to a width none of them had alone
    batch = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = batch != PAD
    generators = [torch.Generator().manual_seed(index) for index in range(len(prompts))]
    batched, _ = run(random_model, config, prompts=batch, mask=mask, generator=generators)
    for row, (response, trace) in enumerate(solo):
        assert torch.equal(batched.response[row], response)
        assert torch.equal(batched.trace[row], trace)


@pytest.mark.parametrize("name", CONFIGS)
def test_trace_covers_every_position_once_and_every_step_commits(name):
    config = dataclasses.replace(CONFIGS[name], return_predictions=True)
    prompts = torch.tensor([[2, 3, 4], [5, 6, 2], [4, 4, 4], [6, 5, 2]])
    result, _ = run(random_model, config, prompts=prompts, generator=torch.Generator().manual_seed(0))
    assert (result.response != MASK).all() and (result.trace >= 0).all()
    assert (result.trace < result.num_steps).all()
    # Every step of an unfinished row leaves fewer masked positions (at least one commit per step).
    masked_counts = torch.cat([result.masked.sum(-1), torch.zeros(1, len(prompts), dtype=torch.long)])
    live = masked_counts[:-1] > 0
    if name in MAY_SKIP:
        assert (masked_counts[1:][live] <= masked_counts[:-1][live]).all()
    else:
        assert (masked_counts[1:][live] < masked_counts[:-1][live]).all()


def test_rcr_keeps_the_schedule_count_committed():
    config = SamplerConfig(gen_length=8, steps=8, block_length=8, temperature=1.0, alg="rcr", schedule="sqrt",
                           stop_at_eos=False, return_predictions=True)
    prompts = torch.tensor([[2, 3], [4, 5]])
    result, _ = run(random_model, config, prompts=prompts, generator=torch.Generator().manual_seed(1))
    left_masked = 8 - tokens_per_step("sqrt", 8, 8).cumsum(0)
    masked_before = result.masked.sum(-1)  # (T, B)
    assert (masked_before[1:] == left_masked[: result.num_steps - 1].unsqueeze(1)).all()


def test_temperature_zero_is_deterministic():
    config = SamplerConfig(gen_length=8, steps=8, block_length=4)
    first, _ = run(random_model, config, generator=torch.Generator().manual_seed(0))
    second, _ = run(random_model, config, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first.sequences, second.sequences) and torch.equal(first.trace, second.trace)


def drawn_tokens(temperature=1.0, **sampling):
    probs = dist(2, 0.5, 3, 0.3, others=(2, 3, 4)).expand(16, V)  # token 4 gets .2
    config = SamplerConfig(gen_length=16, steps=16, temperature=temperature, **sampling)
    tokens = set()
    for seed in range(3):
        result, _ = run(probs, config, generator=torch.Generator().manual_seed(seed))
        tokens |= set(result.response.flatten().tolist())
    return tokens


def test_top_k_and_top_p_restrict_sampling():
    assert drawn_tokens() == {2, 3, 4}
    assert drawn_tokens(top_k=2) == {2, 3}
    assert drawn_tokens(top_p=0.7) == {2, 3}  # mass before token 4 is .8 >= .7
    assert drawn_tokens(top_p=0.5) == {2}  # mass before token 3 is .5 >= .5
    assert drawn_tokens(top_k=1, temperature=5.0) == {2}


def test_filter_logits_keeps_the_top_token_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0]])
    assert filter_logits(logits, top_k=2).isinf().tolist() == [[True, False, False, False]]  # tie at the 2nd
    assert filter_logits(logits, top_p=1e-6).isinf().tolist() == [[True, False, True, True]]


def test_schedules_sum_to_the_block_and_commit_every_step():
    assert tokens_per_step("linear", 10, 4).tolist() == [3, 3, 2, 2]  # LLaDA's split
    assert tokens_per_step("cosine", 8, 4).tolist() == [2, 2, 3, 1]  # masked left: 6, 4, 1, 0
    assert tokens_per_step("sqrt", 8, 4).tolist() == [4, 2, 1, 1]  # 4, 2, 1, 0
    assert tokens_per_step("exp", 8, 4).tolist() == [2, 2, 2, 2]  # 6, 4, 2, 0
    assert tokens_per_step("log", 8, 4).tolist() == [3, 2, 2, 1]  # 5, 3, 1, 0
    assert tokens_per_step("square", 8, 4).tolist() == [1, 1, 3, 3]  # 7, 6, 3, 0
    assert tokens_per_step("cubic", 8, 4).tolist() == [1, 1, 2, 4]  # 7, floor(7.0) = 7 → at least one: 6, 4, 0
    for schedule in SCHEDULES:
        for length, steps in [(32, 8), (7, 7), (5, 8), (64, 3), (1, 1)]:
            k = tokens_per_step(schedule, length, steps)
            assert int(k.sum()) == length
            if schedule == "dream":  # Dream's counts as they are: a step may commit 0 (next test)
                continue
            done = k.cumsum(0) >= length
            assert (k[~done] >= 1).all() and (k[1:][done[:-1]] == 0).all()


def test_dream_schedule_counts_by_hand():
    # timesteps = linspace(1, .001, 5) = 1, .75025, .5005, .25075, .001; k_i = int(n_i (1 - s/t)), last: all.
    # L = 8: 8 * .24975 = 1.998 → 1; 7 * (1 - .5005/.75025 = .33289) = 2.33 → 2; 5 * (1 - .25075/.5005
    # = .49900) = 2.495 → 2; the last 3.
    assert tokens_per_step("dream", 8, 4).tolist() == [1, 2, 2, 3]
    # L = 4: 4 * .24975 = .999 → 0 (Dream wastes its first step), 4 * .33289 → 1, 3 * .499 → 1, last 2.
    assert tokens_per_step("dream", 4, 4).tolist() == [0, 1, 1, 2]
    # L = 10, T = 3: linspace(1, .001, 4) = 1, .667, .3340, .001: 10 * .333 → 3, 7 * (1 - .3340/.667 =
    # .49925) = 3.49 → 3, last 4.
    assert tokens_per_step("dream", 10, 3).tolist() == [3, 3, 4]
    # eps is Dream's: with eps = .5, linspace(1, .5, 3) = 1, .75, .5: 8 * .25 = 2, then the 6 left.
    assert tokens_per_step("dream", 8, 2, eps=0.5).tolist() == [2, 6]


def naive_dream_counts(length, steps, eps=1e-3):
    """Dream's loop literally, in float64 (independent of the float32 implementation; same here)."""
    masked, counts = length, []
    for i in range(steps):
        t, s = 1 - i * (1 - eps) / steps, 1 - (i + 1) * (1 - eps) / steps
        k = int(masked * (1 - s / t)) if i < steps - 1 else masked
        counts.append(k)
        masked -= k
    return counts


@pytest.mark.parametrize("length, steps", [(32, 8), (64, 64), (128, 32), (256, 256), (12, 5)])
def test_dream_schedule_matches_a_naive_loop(length, steps):
    assert tokens_per_step("dream", length, steps).tolist() == naive_dream_counts(length, steps)


def test_sampler_follows_the_dream_schedule():
    # TABLE with k = 0, 1, 1, 2: step 0 commits nothing, then 2 (.95), 3 (.70), then 1 and 0 together.
    config = SamplerConfig(gen_length=4, steps=4, schedule="dream", return_predictions=True)
    result, adapter = run(TABLE, config)
    assert result.trace.tolist() == [[3, 3, 1, 2]]
    assert result.masked.sum(-1)[:, 0].tolist() == [4, 4, 3, 2]
    assert result.num_steps == adapter.calls == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(gen_length=8, block_length=3),
        dict(gen_length=8, block_length=4, steps=3),
        dict(alg="greedy"),
        dict(schedule="quadratic"),
        dict(alg="rcr", threshold=0.9),
        dict(top_p=0.0),
        dict(temperature=-1.0),
        dict(confidence_from="dream"),
        dict(alg="random", alg_temp=0.5),
        dict(alg="max_s", alg_temp=0.5),
        dict(alg="max_prob", alg_temp=0.5, threshold=0.9),
        dict(alg_temp=-0.1),
        dict(alg="origin", threshold=0.9),
        dict(eps=0.0),
    ],
)
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplerConfig(**kwargs)


def test_right_padded_prompts_are_rejected():
    with pytest.raises(ValueError, match="left-padded"):
        prompts, mask = torch.tensor([[2, PAD]]), torch.tensor([[True, False]])
        run(TABLE, SamplerConfig(gen_length=4, steps=4), prompts=prompts, mask=mask)


@pytest.mark.parametrize("alg", ["max_prob", "max_s", "rcr", "origin"])
def test_runs_on_a_real_adapter(alg):
    """Smoke: a tiny bidirectional Llama through ``agdo.models.load_adapter`` (logits + S from one forward)."""
    models = pytest.importorskip("agdo.models")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, mask_token_id=63, pad_token_id=0, eos_token_id=[1], is_causal=False,
    )
    adapter = models.load_adapter(LlamaForCausalLM(config).eval())
    prompts, mask = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]), torch.tensor([[False, False, True, True], [True] * 4])
    sampler = SamplerConfig(gen_length=8, steps=4, block_length=4, alg=alg, candidate_threshold=0.0, return_s=True)
    result = generate(adapter, prompts, mask, sampler)
    assert (result.trace >= 0).all() and (result.response != 63).all()
    assert result.s.shape == (result.num_steps, 2, 8)
