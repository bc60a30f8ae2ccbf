"""The sampler against a scripted fake model: hand-computed picks for every strategy, plus properties.

Vocabulary of the fake: 0 = pad, 1 = EOS, 2..6 = content, 7 = mask. A *table* gives each response
position a fixed distribution (so a step commits the best-scoring masked positions in a known order);
a *script* picks the table from the current response (state-dependent, for RCR); the *random model*
is a deterministic pseudo-random function of the real prompt tokens and the committed response, so it
does not see padding.
"""

import dataclasses
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


def test_eos_pads_what_follows_and_stops_early():
    # Step 0: pos 3 (.95); step 1: EOS at pos 1 (.9) → 2 (masked) and 3 (committed) become padding at
    # step 1; step 2: pos 0. Three of four steps.
    probs = table(dist(2, 0.6), dist(EOS, 0.9), dist(3, 0.8), dist(4, 0.95))
    result, adapter = run(probs, SamplerConfig(gen_length=4, steps=4))
    assert result.response.tolist() == [[2, EOS, PAD, PAD]]
    assert result.trace.tolist() == [[2, 1, 1, 1]]
    assert result.num_steps == adapter.calls == 3
    kept, _ = run(probs, SamplerConfig(gen_length=4, steps=4, stop_at_eos=False))
    assert kept.response.tolist() == [[2, EOS, 3, 4]] and kept.num_steps == 4


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
}


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
            done = k.cumsum(0) >= length
            assert (k[~done] >= 1).all() and (k[1:][done[:-1]] == 0).all()


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
    ],
)
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplerConfig(**kwargs)


def test_right_padded_prompts_are_rejected():
    with pytest.raises(ValueError, match="left-padded"):
        prompts, mask = torch.tensor([[2, PAD]]), torch.tensor([[True, False]])
        run(TABLE, SamplerConfig(gen_length=4, steps=4), prompts=prompts, mask=mask)


@pytest.mark.parametrize("alg", ["max_prob", "max_s", "rcr"])
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
