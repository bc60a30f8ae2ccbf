"""Block KV cache (``SamplerConfig.cache``, ``agdo.models._block_cache``): exactness where it must be exact,
completeness where it is an approximation, and the errors.

The judge of a cached forward is the uncached ``adapter.forward`` of the same sequence: a cached step fed
the SAME state as its block's first step must reproduce it to rounding (float64: 1e-10; LLaDA, float32:
2e-5), for every family
(test_models.py's tiny generic Qwen2 GQA 7:1 shifted and Llama MHA unshifted, the Dream fixture, and the
LLaDA fixture, whose blocks take ``layer_past`` as the published file's do), with and
without left padding, for logits and S. In decoding the cache is an approximation after each full forward
(a new fed window), so there decoding must complete, fill every position and keep the uncached records'
shapes; with one step per block (every step a block's first) it must decode exactly as uncached; in a
multi-step static decode every block's first step must be the uncached forward of its state. Early stop:
a row settled by it (its logits scripted toward the pad token) leaves the window with a full forward, its
records are NaN where it settled, and static decoding stays exact / row-independent. Dynamic decoding can
start a row's block on a cached step (the documented caveat).
"""

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import pytest
import torch

from agdo.models import load_adapter
from agdo.models._block_cache import LLADA_IGNORES_LAYER_PAST
from agdo.models._capture import LayerCapture, StatisticsRequest
from agdo.sampling import SamplerConfig, generate

sys.path.insert(0, str(Path(__file__).parent))
from test_models import edited_llada_dir, family_adapters  # noqa: E402

CASES = ["qwen2_gqa_shifted", "llama_mha", "dream", "llada"]
# A mode is a cache setting: "prefix+3" = cache="prefix" with cache_lookahead=3 (not LLaDA, like "dual").
CACHED = [(case, mode) for case in CASES for mode in ("prefix", "dual", "prefix+3") if case != "llada" or mode == "prefix"]
P, R, L = 6, 16, 4  # prompt, response, block
TOLERANCE = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=1e-4)}
RECORDS = ("confidences", "predictions", "masked", "prediction_probs", "s", "token_probs")
RECORD_DTYPES = {"predictions": torch.int64, "masked": torch.bool}  # the others float32


def llada_ignoring_layer_past(root: Path) -> Path:
    """A copy of the LLaDA fixture whose blocks drop ``layer_past`` (as some modified files do)."""
    return edited_llada_dir(root, "tiny_llada_no_layer_past", "        if layer_past is not None:", "        if False:")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return family_adapters(tmp_path_factory.mktemp("checkpoints"), float64=True)  # float64: exactness checks


def state(padded: bool):
    """A half-decoded batch ``(x, real, unmasked)``: prompts (row 1 left-padded by 3 when ``padded``), the
    first block decoded, the rest masked (95) with a few tokens already committed."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 90, (2, P + R), generator=gen)
    x[:, P + L:] = torch.where(torch.rand(2, R - L, generator=gen) < 0.2, x[:, P + L:], 95)
    real = torch.ones(2, P + R, dtype=torch.bool)
    if padded:
        real[1, :3] = False
    return x, real, real & (x != 95)


def prompts():
    """The padded prompts of :func:`state`."""
    x, real, _ = state(padded=True)
    return x[:, :P], real[:, :P]


def counted(calls: list, name: str, function):
    def counted_function(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)

    return counted_function


def cache_settings(mode: str) -> dict:
    """``SamplerConfig`` fields of a test mode."""
    cache, _, lookahead = mode.partition("+")
    return dict(cache=cache, cache_lookahead=int(lookahead) if lookahead else None)


def make_cache(adapter, mode: str, attention_mask=None):
    settings = cache_settings(mode)
    return adapter.block_cache(settings["cache"], attention_mask, lookahead=settings["cache_lookahead"])


def close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, equal_nan=True, **TOLERANCE[dtype])


# ------------------------------------------------------------------------------------------ forwards


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("case,mode", CACHED)
def test_cached_step_in_the_same_state_reproduces_the_full_forward(adapters, case, mode, padded, monkeypatch):
    adapter = adapters[case]
    dtype = adapter.model.dtype
    x, real, unmasked = state(padded)
    full = adapter.forward(x, real, unmasked=unmasked)
    cache = make_cache(adapter, mode, real)
    calls = []
    for name in ("prefill", "step"):
        monkeypatch.setattr(cache.runner, name, counted(calls, name, getattr(cache.runner, name)))
    first, end = P + L, P + 2 * L

    block_start = cache.forward(x, (first, end), unmasked=unmasked)
    close(block_start.logits, full.logits, dtype)
    close(block_start.s, full.s, dtype)
    # Shifted models: the fed window starts one row before the block, its first token's predictor.
    assert cache.fed == (first - adapter.shift, {"prefix": P + R, "dual": end, "prefix+3": end + 3}[mode])

    # The kept K/V are those of the block's first step: a kept token changed since is not read again.
    changed = x.clone()
    changed[:, P - 1] = (changed[:, P - 1] + 1) % 90
    cached = cache.forward(changed, (first, end), unmasked=unmasked)
    assert calls == ["prefill", "step"]
    fresh = slice(first, cache.fed[1])
    close(cached.logits[:, fresh], full.logits[:, fresh], dtype)
    close(cached.s[:, fresh], full.s[:, fresh], dtype)


def test_a_changed_window_or_a_first_request_for_s_starts_a_block(adapters):
    adapter = adapters["qwen2_gqa_shifted"]
    x, real, unmasked = state(padded=True)
    cache = adapter.block_cache("dual", real)
    cache.forward(x, (P, P + L))
    cache.forward(x, (P, P + 2 * L))  # a row moved past the highest block
    assert cache.fed == (P - 1, P + 2 * L)
    full = adapter.forward(x, real, unmasked=unmasked)
    asked = cache.forward(x, (P, P + 2 * L), unmasked=unmasked)  # S asked for the first time: a full forward
    close(asked.s, full.s, torch.float64)


def test_statistics_other_than_s_are_refused_against_cached_keys():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    request = StatisticsRequest(attention_mask=None, unmasked=torch.ones(1, 5, dtype=torch.bool), response_start=2,
                                influence_rows=None, influence_norm="sum", shift=False, num_heads=2, backend="torch")
    capture = LayerCapture(request, where="test")
    with pytest.raises(ValueError, match="response_start not supported with a KV cache"):
        capture.attend(q, k, k, attn_mask=None, is_causal=False, dropout_p=0.0, scale=None, delegate=lambda: None)


# ------------------------------------------------------------------------------------------ decoding


def decode(adapter, mode, steps=R, **settings):
    ids, mask = prompts()
    config = SamplerConfig(gen_length=R, steps=steps, block_length=L, **cache_settings(mode), return_confidences=True,
                           return_predictions=True, return_s=True, return_token_probs=True, **settings)
    return generate(adapter, ids, mask, config)


@pytest.mark.parametrize("case,mode", CACHED)
def test_one_step_per_block_decodes_exactly_as_uncached(adapters, case, mode):
    """Every step is then its block's first: a full forward, the uncached one."""
    adapter = adapters[case]
    uncached = decode(adapter, "none", steps=R // L, alg="max_s")
    cached = decode(adapter, mode, steps=R // L, alg="max_s")
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.trace, uncached.trace)
    for name in RECORDS:
        close(getattr(cached, name), getattr(uncached, name), adapter.model.dtype)


SETTINGS = {
    "max_prob": dict(),
    "max_s": dict(alg="max_s", candidate_threshold=0.0),
    "rcr": dict(alg="rcr"),
    "threshold": dict(threshold=0.2),
    "stop_at_eos": dict(alg="max_s", stop_at_eos=True),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("case,mode", CACHED)
def test_cached_decoding_fills_every_position_with_the_uncached_records(adapters, case, mode, setting):
    adapter = adapters[case]
    cached = decode(adapter, mode, **SETTINGS[setting])
    assert not (cached.response == adapter.mask_token_id).any()
    assert ((cached.trace >= 0) | cached.settled).all()
    if "threshold" not in SETTINGS[setting]:
        assert cached.num_steps == R
    for name in RECORDS:  # the uncached records' (T, B, R) and dtypes
        record = getattr(cached, name)
        assert record.shape == (cached.num_steps, 2, R) and record.dtype == RECORD_DTYPES.get(name, torch.float32)
    # Every masked position of an unfinished row has its prediction's probability and its S at every step.
    assert torch.isfinite(cached.prediction_probs[cached.masked]).all()
    assert torch.isfinite(cached.s[cached.masked]).all()


def test_dual_keeps_the_block_start_values_after_the_block_and_prefix_recomputes_them(adapters):
    adapter = adapters["qwen2_gqa_shifted"]
    steps_per_block = 4
    after = slice(L, R)  # the masked blocks after block 0, during block 0's steps 0..3
    dual = decode(adapter, "dual", steps=steps_per_block * R // L)
    prefix = decode(adapter, "prefix", steps=steps_per_block * R // L)
    first_step = dual.prediction_probs[0, :, after]
    for step in range(1, steps_per_block):
        assert torch.equal(dual.prediction_probs[step, :, after], first_step)
    assert not torch.equal(prefix.prediction_probs[1, :, after], prefix.prediction_probs[0, :, after])


@pytest.mark.parametrize("case", ["qwen2_gqa_shifted", "dream"])
def test_a_lookahead_window_spans_prefix_and_dual(adapters, case):
    """cache_lookahead=0 decodes exactly as dual, a window past the response exactly as prefix; a window in
    between keeps the values past it from the block's first step and recomputes those inside it."""
    adapter = adapters[case]
    steps = 4 * R // L
    for lookahead, same_as in ((0, "dual"), (R, "prefix")):
        windowed, reference = decode(adapter, f"prefix+{lookahead}", steps), decode(adapter, same_as, steps)
        assert torch.equal(windowed.sequences, reference.sequences) and torch.equal(windowed.trace, reference.trace)
        for name in RECORDS:  # bit for bit (NaN where not recorded)
            torch.testing.assert_close(getattr(windowed, name), getattr(reference, name), equal_nan=True, atol=0, rtol=0)
    windowed = decode(adapter, "prefix+3", steps)
    inside, past = slice(L, L + 3), slice(L + 3, R)  # during block 0's steps
    for step in range(1, 4):
        assert torch.equal(windowed.prediction_probs[step, :, past], windowed.prediction_probs[0, :, past])
    assert not torch.equal(windowed.prediction_probs[1, :, inside], windowed.prediction_probs[0, :, inside])


def test_the_fed_window_spans_the_active_blocks_of_the_unfinished_rows(adapters, monkeypatch):
    """Dynamic unmasking moves rows through their blocks at their own pace: every step's fresh positions
    run from the lowest to the highest active block of the rows still decoding."""
    adapter = adapters["llama_mha"]
    windows = []
    make_cache = adapter.block_cache

    def recording_block_cache(mode, attention_mask=None, lookahead=None):
        cache = make_cache(mode, attention_mask, lookahead)
        forward = cache.forward

        def recording_forward(x, fresh, **kwargs):
            windows.append((x.clone(), fresh))
            return forward(x, fresh, **kwargs)

        cache.forward = recording_forward
        return cache

    monkeypatch.setattr(adapter, "block_cache", recording_block_cache)
    decode(adapter, "dual", threshold=0.15)
    spread = 0
    for x, (first, end) in windows:
        masked = x[:, P:] == adapter.mask_token_id
        unfinished = masked.any(1)
        active = masked[unfinished].int().argmax(1) // L
        assert (first, end) == (P + int(active.min()) * L, P + (int(active.max()) + 1) * L)
        spread = max(spread, int(active.max() - active.min()))
    assert spread > 0, "the rows never were on different blocks: the test lost its point"


def test_cache_none_never_builds_a_cache(adapters, monkeypatch):
    adapter = adapters["llama_mha"]

    def no_cache(*args, **kwargs):
        raise AssertionError("cache='none' built a block cache")

    monkeypatch.setattr(adapter, "block_cache", no_cache)
    result = decode(adapter, "none")
    assert not (result.response == adapter.mask_token_id).any()


# ------------------------------------------------------------------------------------------ block starts, early stop


class Call:
    """One ``BlockCache.forward`` call of a decode (one sampler step): the state, the fresh window, whether it
    ran a full forward, what it returned (cloned: a cache updates its full-length values in place) and, as
    ``reference``, the uncached ``adapter.forward`` of the same state (S over its unmasked real tokens)."""

    def __init__(self, adapter, real, script, step, x, fresh, prefill, out):
        self.adapter, self.real, self.script = adapter, real, script
        self.step, self.x, self.fresh, self.prefill = step, x, fresh, prefill
        self.logits, self.s = out.logits.clone(), None if out.s is None else out.s.clone()

    @property
    def fresh_logits(self):
        """The logits of the fresh window (the sampler asks for them alone unless a record needs all)."""
        first, end = self.fresh
        return self.logits if self.logits.shape[1] == end - first else self.logits[:, first:end]

    @cached_property
    def reference(self):
        with self.script.at(self.step) if self.script is not None else nullcontext():
            return self.adapter.forward(self.x, self.real, unmasked=self.real & (self.x != self.adapter.mask_token_id))


def spied_block_caches(monkeypatch, adapter, real, script=None):
    """The :class:`Call` list of the block caches ``generate`` builds (``real``: the batch's real tokens;
    ``script``: the :class:`ScriptedLogits` of the decode, for the references)."""
    calls = []
    make = adapter.block_cache

    def spied_block_cache(mode, attention_mask=None, lookahead=None):
        cache = make(mode, attention_mask, lookahead)
        forward, prefill, prefilled = cache.forward, cache.runner.prefill, []

        def recording_prefill(*args, **kwargs):
            prefilled.append(True)
            return prefill(*args, **kwargs)

        def recording_forward(x, fresh, **kwargs):
            prefilled.clear()
            out = forward(x, fresh, **kwargs)
            calls.append(Call(adapter, real, script, len(calls), x.clone(), fresh, bool(prefilled), out))
            return out

        cache.runner.prefill = recording_prefill
        cache.forward = recording_forward
        return cache

    monkeypatch.setattr(adapter, "block_cache", spied_block_cache)
    return calls


class ScriptedLogits:
    """Overrides rows of the model's logits by sampler step (one model forward per step, cached or not), as a
    forward hook on ``adapter.model``: ``rules(step) -> {row: (how, token, value)}``; ``how`` = ``"set"`` (the
    row's logits become ``value`` at ``token``, 0 elsewhere: ``p(token) = e^value / (e^value + V - 1)`` at every
    position, exactly) or ``"add"`` (``value`` added to the model's logit of ``token``)."""

    def __init__(self, adapter, rules):
        self.model, self.rules, self.step, self.hold, self.handles = adapter.model, rules, -1, False, None

    def __enter__(self):
        def count(module, args, kwargs):
            self.step += not self.hold

        def override(module, args, kwargs, output):
            for row, (how, token, value) in self.rules(self.step).items():
                logits = output.logits[row]
                if how == "set":
                    logits.zero_()
                    logits[..., token] = value
                else:
                    logits[..., token] += value

        self.handles = [self.model.register_forward_pre_hook(count, with_kwargs=True),
                        self.model.register_forward_hook(override, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = None

    @contextmanager
    def at(self, step: int):
        """A forward outside the decode (a reference) under step ``step``'s rules, not counted as a step."""
        self.hold, kept, self.step = True, self.step, step
        try:
            with self if self.handles is None else nullcontext():
                yield
        finally:
            self.hold, self.step = False, kept


def batch_real():
    _, mask = prompts()
    return torch.cat([mask, torch.ones(2, R, dtype=torch.bool)], dim=1)


def block_window(block: int) -> tuple:
    return P + block * L, P + (block + 1) * L


def active_blocks(x, mask_id):
    """Each row's active block (None: finished)."""
    masked = x[:, P:] == mask_id
    return [int(row.int().argmax()) // L if row.any() else None for row in masked]


@pytest.mark.parametrize("case,mode", CACHED)
def test_every_block_start_of_a_multi_step_decode_agrees_with_the_uncached_forward(adapters, case, mode, monkeypatch):
    """4 steps per block, Max-S: every block's first step is a full forward whose logits of the block and
    whose S (every position) are the uncached forward's of the same state; the other steps are cached."""
    adapter = adapters[case]
    steps_per_block = 4
    calls = spied_block_caches(monkeypatch, adapter, batch_real())
    ids, mask = prompts()
    config = SamplerConfig(gen_length=R, steps=steps_per_block * R // L, block_length=L, alg="max_s",
                           candidate_threshold=0.0, **cache_settings(mode))
    result = generate(adapter, ids, mask, config)
    assert not (result.response == adapter.mask_token_id).any() and len(calls) == result.num_steps == R
    assert [call.prefill for call in calls] == [call.step % steps_per_block == 0 for call in calls]
    for call in calls[::steps_per_block]:
        first, end = call.fresh
        assert (first, end) == block_window(call.step // steps_per_block)
        close(call.fresh_logits, call.reference.logits[:, first:end], adapter.model.dtype)
        close(call.s, call.reference.s, adapter.model.dtype)


def pad_row_0(adapter):
    """Row 0 writes the pad token at every position, ``p = 1`` to rounding."""
    return lambda step: {0: ("set", adapter.pad_token_id, 50.0)}


@pytest.mark.parametrize("case,mode", CACHED)
def test_a_row_stopped_early_with_one_step_per_block_decodes_exactly_as_uncached(adapters, case, mode, monkeypatch):
    """Row 0 writes a block of pads at step 0 and settles; row 1 decodes on, every step a full forward that
    leaves row 0 out of the window. Records are NaN at the settled positions; all equals the uncached decode."""
    adapter = adapters[case]
    with ScriptedLogits(adapter, pad_row_0(adapter)):
        uncached = decode(adapter, "none", steps=R // L, alg="max_s", stop_at_eos=True)
    with ScriptedLogits(adapter, pad_row_0(adapter)) as script:
        calls = spied_block_caches(monkeypatch, adapter, batch_real(), script)
        cached = decode(adapter, mode, steps=R // L, alg="max_s", stop_at_eos=True)
    after = torch.arange(R) >= L
    assert torch.equal(cached.settled, torch.stack([after, torch.zeros(R, dtype=torch.bool)]))
    assert (cached.response[0] == adapter.pad_token_id).all() and torch.equal(cached.trace[0], torch.zeros(R).long())
    assert cached.num_steps == R // L and all(call.prefill for call in calls)
    assert [call.fresh for call in calls] == [block_window(block) for block in range(R // L)]
    for name in ("s", "token_probs"):  # the settling step: finite in row 0's block, NaN where it settled
        record = getattr(cached, name)
        assert torch.isfinite(record[0, 0, :L]).all() and torch.isnan(record[0, 0, L:]).all()
    for name in ("confidences", "prediction_probs", "s", "token_probs"):
        assert torch.isnan(getattr(cached, name)[1:, 0]).all()  # row 0 finished
    assert torch.equal(cached.sequences, uncached.sequences) and torch.equal(cached.trace, uncached.trace)
    assert torch.equal(cached.settled, uncached.settled)
    for name in RECORDS:
        close(getattr(cached, name), getattr(uncached, name), adapter.model.dtype)


@pytest.mark.parametrize("case,mode", [("qwen2_gqa_shifted", "prefix"), ("qwen2_gqa_shifted", "dual"),
                                       ("dream", "prefix+3"), ("llada", "prefix")])
def test_a_row_stopping_early_leaves_the_window_with_a_full_forward(adapters, case, mode, monkeypatch):
    """Dynamic decoding: row 0 (pads, p = 0.61 < threshold: one per step) stays on block 0 for 4 steps while
    row 1 (block 0 at once, then the model's own pace) decodes ahead, on cached steps; row 0 completes its block
    of pads at step 3 and settles. Step 4 is a full forward on row 1's block alone, the uncached forward's."""
    adapter = adapters[case]
    pad = adapter.pad_token_id

    def rules(step):
        return {0: ("set", pad, 5.0), **({1: ("add", 7, 50.0)} if step == 0 else {})}

    ids, mask = prompts()
    config = SamplerConfig(gen_length=R, steps=R, block_length=L, **cache_settings(mode), threshold=0.9,
                           stop_at_eos=True, return_s=True, return_token_probs=True, return_confidences=True)
    with ScriptedLogits(adapter, rules) as script:
        calls = spied_block_caches(monkeypatch, adapter, batch_real(), script)
        cached = generate(adapter, ids, mask, config)
    with ScriptedLogits(adapter, rules):
        uncached = generate(adapter, ids, mask, replace(config, cache="none", cache_lookahead=None))
    after = torch.arange(R) >= L
    assert torch.equal(cached.settled[0], after) and not cached.settled[1].any()
    assert (cached.response[0] == pad).all() and (cached.response[1, :L] == 7).all()
    assert sorted(cached.trace[0, :L].tolist()) == [0, 1, 2, 3] and (cached.trace[0, L:] == 3).all()
    for name in ("response", "settled"):  # row 0 is scripted: the same uncached
        assert torch.equal(getattr(cached, name)[0], getattr(uncached, name)[0])
    assert torch.equal(cached.trace[0], uncached.trace[0])

    assert [active_blocks(call.x, adapter.mask_token_id)[0] for call in calls[:5]] == [0, 0, 0, 0, None]
    assert not all(call.prefill for call in calls[1:4]), "no cached step while row 0 decoded: the test lost its point"
    leaving = calls[4]  # the first step without row 0
    assert leaving.prefill
    assert leaving.fresh == block_window(active_blocks(leaving.x, adapter.mask_token_id)[1])
    first, end = leaving.fresh
    close(leaving.fresh_logits, leaving.reference.logits[:, first:end], adapter.model.dtype)
    close(leaving.s, leaving.reference.s, adapter.model.dtype)
    for name in ("s", "token_probs"):  # the settling step: finite in row 0's block, NaN where it settled
        record = getattr(cached, name)
        assert torch.isfinite(record[3, 0, :L]).all() and torch.isnan(record[3, 0, L:]).all()
    for name in ("confidences", "s", "token_probs"):
        assert torch.isnan(getattr(cached, name)[4:, 0]).all()


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_static_early_stop_with_a_cache_leaves_the_other_rows_as_decoded_alone(adapters, mode):
    """Static schedules move every row through its blocks in step: a row stopping early changes no other row's
    window, so row 1 decodes (4 steps per block, cached) exactly as it does alone."""
    adapter = adapters["qwen2_gqa_shifted"]
    steps = 4 * R // L
    with ScriptedLogits(adapter, pad_row_0(adapter)):
        batch = decode(adapter, mode, steps=steps, alg="max_s", stop_at_eos=True)
    assert torch.equal(batch.settled[0], torch.arange(R) >= L) and not batch.settled[1].any()
    ids, mask = prompts()
    config = SamplerConfig(gen_length=R, steps=steps, block_length=L, alg="max_s", stop_at_eos=True,
                           **cache_settings(mode), return_confidences=True, return_predictions=True, return_s=True,
                           return_token_probs=True)
    alone = generate(adapter, ids[1:], mask[1:], config)
    assert torch.equal(batch.sequences[1:], alone.sequences) and torch.equal(batch.trace[1:], alone.trace)
    for name in RECORDS:
        close(getattr(batch, name)[:, 1:], getattr(alone, name), adapter.model.dtype)


@pytest.mark.parametrize("case", ["qwen2_gqa_shifted", "llada"])
def test_dynamic_decoding_can_start_a_rows_block_on_a_cached_step(adapters, case, monkeypatch):
    """The caveat of the docstrings: with a prefix cache, rows moving at their own pace (threshold) and the
    window held by the slowest, a row ahead enters its next blocks on cached steps, with the K/V kept at the
    window's full forward — not the uncached logits — and those then depend on its batch-mates."""
    adapter = adapters[case]
    row_1 = ("add", 7, 50.0)  # a block per step

    def rules(step):
        return {0: ("set", 5, 5.0), 1: row_1}  # row 0: one token per step (p = 0.61 < 0.9)

    ids, mask = prompts()
    config = SamplerConfig(gen_length=R, steps=R, block_length=L, threshold=0.9, cache="prefix", return_s=True)
    with ScriptedLogits(adapter, rules) as script:
        calls = spied_block_caches(monkeypatch, adapter, batch_real(), script)
        together = generate(adapter, ids, mask, config)
    assert [active_blocks(call.x, adapter.mask_token_id)[1] for call in calls[:4]] == [0, 1, 2, 3]
    assert [call.prefill for call in calls[:4]] == [True, False, False, False]
    assert all(call.fresh[0] == P for call in calls[:4])  # row 0 holds the window on block 0
    close(calls[0].fresh_logits, calls[0].reference.logits[:, slice(*block_window(0))], adapter.model.dtype)
    for call in calls[1:4]:
        block = slice(*(bound - P for bound in block_window(call.step)))
        cached, uncached = call.fresh_logits[1, block], call.reference.logits[1, P:][block]
        assert not torch.allclose(cached, uncached, **TOLERANCE[adapter.model.dtype])
    with ScriptedLogits(adapter, lambda step: {0: row_1}):
        alone = generate(adapter, ids[1:], mask[1:], config)
    assert torch.equal(together.sequences[1], alone.sequences[0])  # the same tokens (scripted) ...
    assert not torch.allclose(together.s[1:4, 1], alone.s[1:4, 0], equal_nan=True)  # ... read otherwise


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cuda_bf16_cached_step_and_its_triton_s_follow_the_full_forward(mode):
    """On a GPU: SDPA kernels for fewer queries than keys, the Triton S over cached keys, bf16 rounding."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=96, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, diffusion_shift=True, mask_token_id=95,
                         pad_token_id=90, eos_token_id=[90, 91], is_causal=False)
    adapter = load_adapter(Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).eval())
    x, real, unmasked = (tensor.cuda() for tensor in state(padded=True))
    full = adapter.forward(x, real, unmasked=unmasked)
    cache = adapter.block_cache(mode, real)
    first, end = P + L, P + 2 * L
    cache.forward(x, (first, end), unmasked=unmasked)
    cached = cache.forward(x, (first, end), unmasked=unmasked)
    fresh = slice(first, cache.fed[1])
    scale = full.logits[:, fresh].abs().max()
    assert (cached.logits[:, fresh] - full.logits[:, fresh]).abs().max() <= 0.05 * scale
    torch.testing.assert_close(cached.s[:, fresh], full.s[:, fresh], atol=2e-2, rtol=0)
    ids, mask = (tensor.cuda() for tensor in prompts())
    config = SamplerConfig(gen_length=R, steps=R // 2, block_length=L, alg="max_s", cache=mode, return_s=True,
                           return_predictions=True)
    result = generate(adapter, ids, mask, config)
    assert not (result.response == 95).any() and torch.isfinite(result.s[result.masked]).all()


# ------------------------------------------------------------------------------------------ errors


def test_bad_cache_value_names_the_field():
    with pytest.raises(ValueError, match="cache must be one of"):
        SamplerConfig(cache="full")


def test_eval_and_rl_configs_hand_the_cache_to_the_sampler(tmp_path):
    from agdo.eval import EvalConfig
    from agdo.training.rl import RLConfig

    assert EvalConfig(cache="dual").sampler_config("max_s").cache == "dual"
    assert EvalConfig(cache="prefix", cache_lookahead=8).sampler_config("max_s").cache_lookahead == 8
    rl = RLConfig(output_dir=str(tmp_path), cache="prefix", cache_lookahead=4, report_to=[]).sampler_config()
    assert (rl.cache, rl.cache_lookahead) == ("prefix", 4)
    assert RLConfig(output_dir=str(tmp_path), cache="prefix", report_to=[]).sampler_config().cache == "prefix"
    with pytest.raises(ValueError, match="cache must be one of"):
        EvalConfig(cache="full")


def test_dual_and_a_lookahead_window_are_refused_for_llada(adapters):
    with pytest.raises(ValueError, match="cache='dual' is not supported for llada"):
        adapters["llada"].block_cache("dual")
    with pytest.raises(ValueError, match="a prefix-cache lookahead window is not supported for llada"):
        adapters["llada"].block_cache("prefix", lookahead=8)


@pytest.mark.parametrize("cache,lookahead", [("dual", 3), ("none", 3), ("prefix", -1), ("prefix", 2.5),
                                             ("prefix", True)])
def test_bad_cache_lookahead_names_the_field(cache, lookahead):
    with pytest.raises(ValueError, match="cache_lookahead must be None or an int >= 0, and only with cache='prefix'"):
        SamplerConfig(cache=cache, cache_lookahead=lookahead)


def test_bad_lookahead_of_the_block_cache_names_the_argument(adapters):
    with pytest.raises(ValueError, match="`lookahead` must be None or an int >= 0 with cache='prefix'"):
        adapters["llama_mha"].block_cache("dual", lookahead=2)


def test_a_llada_file_whose_blocks_ignore_layer_past_is_refused(tmp_path):
    adapter = load_adapter(llada_ignoring_layer_past(tmp_path))
    with pytest.raises(NotImplementedError) as error:
        adapter.block_cache("prefix")
    assert str(error.value) == LLADA_IGNORES_LAYER_PAST


def test_an_adapter_without_block_cache_is_refused():
    class LogitsOnly:
        mask_token_id, pad_token_id, eos_token_ids = 3, 0, (1,)

        def forward(self, input_ids, attention_mask=None, *, unmasked=None):
            raise AssertionError("not reached")

    config = SamplerConfig(gen_length=4, steps=4, cache="prefix")
    with pytest.raises(ValueError, match="block_cache"):
        generate(LogitsOnly(), torch.tensor([[2, 2]]), None, config)
