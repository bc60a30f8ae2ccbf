"""Logits of a span of tokens only (``adapter.forward(logits_span=...)``) and the sampler that asks for them.

A decoding step reads the logits of the block it decodes; the ``N x vocab`` logits of every other position
(8% of a Dream-7B forward's FLOPs at N = 1,088, and 0.3 GB per sequence in bf16) were computed and dropped.
The judge is the full forward: the span's logits must be its slice (to the rounding of the LM head's matmul
over fewer rows), the LM head must see only the span's predictor rows, and decoding with narrowed logits
must equal decoding with full ones (float64 models, where rounding cannot flip a choice).
"""

import copy
import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from agdo.models import load_adapter
from agdo.sampling import SamplerConfig, generate

sys.path.insert(0, str(Path(__file__).parent))
from test_models import FAMILY_CASES, B, N, P, batch, family_adapters, remote_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    # float64, so that decoding cannot flip on rounding (LLaDA float32: test_models.family_adapters)
    adapters = family_adapters(tmp_path_factory.mktemp("checkpoints"), float64=True)
    # The output head is the input embedding (LLaDA's weight_tying): no head of its own to narrow.
    adapters["llada_tied"] = load_adapter(remote_model_dir(tmp_path_factory.mktemp("tied"), "tiny_llada",
                                                           weight_tying=True))
    return adapters


def close(actual, expected, adapter):
    """The head's matmul over fewer rows may round differently, even on CPU."""
    tolerance = 1e-12 if adapter.model.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance, equal_nan=True)


def head_rows(adapter, calls: list):
    """Records the number of rows (dim 1) each call of the model's output head computes."""
    head = adapter.model.get_output_embeddings()
    return head.register_forward_hook(lambda module, args, output: calls.append(output.shape[1]))


@pytest.mark.parametrize("case", FAMILY_CASES + ["llada_tied"])
@pytest.mark.parametrize("span", [(0, 5), (P, N), (P + 3, P + 7), (N - 1, N)], ids=str)
@torch.no_grad()
def test_span_logits_are_the_slice_of_the_full_logits(adapters, case, span):
    """Token 0 included (shifted models give it row 0), with and without S, padded rows; S unchanged."""
    adapter = adapters[case]
    input_ids, attention_mask, unmasked, _ = batch(seed=3)
    first, end = span
    full = adapter.forward(input_ids, attention_mask, unmasked=unmasked)
    calls = []
    hook = head_rows(adapter, calls)
    try:
        plain = adapter.forward(input_ids, attention_mask, logits_span=span)
        with_s = adapter.forward(input_ids, attention_mask, unmasked=unmasked, logits_span=span)
    finally:
        hook.remove()
    assert plain.logits.shape == (B, end - first, adapter.vocab_size)
    close(plain.logits, full.logits[:, first:end], adapter)
    assert torch.equal(with_s.logits, plain.logits)  # S asked or not, the same logits (Max-S vs Max-Prob)
    assert torch.equal(with_s.s, full.s)
    if case == "llada_tied":  # the "head" is the embedding: called on the ids, the head itself is F.linear
        assert calls == [N, N]
    else:
        assert calls == [end - first] * 2


@pytest.mark.parametrize(
    "span,error",
    [((3, 3), ValueError), ((5, 2), ValueError), ((0, N + 1), ValueError), ((-1, 4), ValueError),
     ([0, 4], TypeError), ((0.0, 4), TypeError), ((True, 4), TypeError)],
    ids=str,
)  # fmt: skip
def test_bad_span_names_the_argument(adapters, span, error):
    input_ids, attention_mask, unmasked, _ = batch()
    with pytest.raises(error, match="logits_span"):
        adapters["dream"].forward(input_ids, attention_mask, logits_span=span)


def test_span_without_logits_is_refused(adapters):
    input_ids, attention_mask, unmasked, _ = batch()
    with pytest.raises(ValueError, match="logits_span.*return_logits=False"):
        adapters["dream"].forward(input_ids, attention_mask, unmasked=unmasked, return_logits=False,
                                  logits_span=(P, N))


class FullLogits:
    """The adapter without ``logits_span``: the sampler then takes every position's logits (the reference)."""

    def __init__(self, adapter):
        self._adapter = adapter

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def forward(self, input_ids, attention_mask=None, *, unmasked=None):
        return self._adapter.forward(input_ids, attention_mask, unmasked=unmasked)


R, L = 16, 4
SETTINGS = {
    "max_prob": dict(),
    "max_s": dict(alg="max_s", candidate_threshold=0.0),
    "rcr": dict(alg="rcr"),
    "threshold": None,  # rows drift apart: blocks differ, one row finishes before the other (DRIFTING)
    "stop_at_eos": dict(alg="max_s", stop_at_eos=True),
}


# Per family, a threshold at which the two rows finish at different steps (asserted below).
DRIFTING = {"qwen2_gqa_shifted": 0.2, "llama_mha": 0.2, "dream": 0.5, "llada": 0.2}


def prompts():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :3] = False
    return ids, mask


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_decoding_with_span_logits_equals_decoding_with_full_logits(adapters, case, setting):
    adapter = adapters[case]
    ids, mask = prompts()
    settings = dict(threshold=DRIFTING[case]) if setting == "threshold" else SETTINGS[setting]
    config = SamplerConfig(gen_length=R, steps=R, block_length=L, **settings)
    calls = []
    hook = head_rows(adapter, calls)
    try:
        narrowed = generate(adapter, ids, mask, config)
        rows_narrowed, calls[:] = list(calls), []
        full = generate(FullLogits(adapter), ids, mask, config)
    finally:
        hook.remove()
    assert torch.equal(narrowed.sequences, full.sequences)
    assert torch.equal(narrowed.trace, full.trace)
    assert narrowed.num_steps == full.num_steps
    assert all(rows == ids.shape[1] + R for rows in calls)  # the reference: every row through the head
    # Narrowed: the span of the active blocks, one block while both rows are on the same one.
    assert len(rows_narrowed) == narrowed.num_steps and all(rows % L == 0 and rows <= R for rows in rows_narrowed)
    if setting == "threshold":
        # The finished row sits on block 0, outside the span of the other's last block (the clamped gather).
        last_step = narrowed.trace.max(1).values
        assert last_step[0] != last_step[1], "the rows finished together: pick another DRIFTING threshold"
    else:
        assert rows_narrowed == [L] * narrowed.num_steps


@pytest.mark.parametrize("record", ["return_predictions", "return_token_probs"])
def test_records_of_every_position_take_the_whole_response(adapters, record):
    adapter = adapters["dream"]
    ids, mask = prompts()
    config = SamplerConfig(gen_length=R, steps=R, block_length=L, **{record: True})
    calls = []
    hook = head_rows(adapter, calls)
    try:
        narrowed = generate(adapter, ids, mask, config)
    finally:
        hook.remove()
    full = generate(FullLogits(adapter), ids, mask, config)
    assert calls == [R] * narrowed.num_steps  # the response, not the prompt
    name = "predictions" if record == "return_predictions" else "token_probs"
    close(getattr(narrowed, name), getattr(full, name), adapter)


CACHED = [("qwen2_gqa_shifted", "prefix"), ("qwen2_gqa_shifted", "dual"), ("dream", "prefix"), ("dream", "dual"),
          ("llama_mha", "prefix"), ("llada", "prefix"), ("llada_tied", "prefix")]


@pytest.mark.parametrize("setting", ["max_prob", "max_s", "threshold"])
@pytest.mark.parametrize("case,cache", CACHED)
def test_cached_decoding_with_fresh_logits_equals_the_full_length_cache(adapters, case, cache, setting):
    """The reference: the same cached decoding with a record that needs every position's logits, which keeps
    the cache's full-length logits (records never change what is decoded)."""
    adapter = adapters[case]
    ids, mask = prompts()
    settings = dict(threshold=DRIFTING.get(case, 0.2)) if setting == "threshold" else SETTINGS[setting]
    config = SamplerConfig(gen_length=R, steps=R, block_length=L, cache=cache, **settings)
    calls = []
    hook = head_rows(adapter, calls) if case != "llada_tied" else None
    try:
        fresh_only = generate(adapter, ids, mask, config)
    finally:
        if hook is not None:
            hook.remove()
    full_length = generate(adapter, ids, mask, dataclasses.replace(config, return_token_probs=True))
    assert torch.equal(fresh_only.sequences, full_length.sequences)
    assert torch.equal(fresh_only.trace, full_length.trace)
    if hook is not None:  # every call, full forwards included, computes the fresh blocks' rows only
        assert len(calls) == fresh_only.num_steps and all(rows % L == 0 and rows <= R for rows in calls)
        if setting != "threshold":
            assert calls == [L] * fresh_only.num_steps


def test_a_head_called_on_another_layout_is_left_whole_and_its_logits_sliced(adapters):
    """A model that flattens the hidden states before its head (and restores the layout after) computes every
    row; the span's logits are then cut from them."""
    adapter = adapters["qwen2_gqa_shifted"]
    input_ids, attention_mask, _, _ = batch()
    head = adapter.model.get_output_embeddings()
    full = adapter.forward(input_ids, attention_mask).logits
    hooks = [head.register_forward_pre_hook(lambda module, args: (args[0].flatten(0, 1),)),
             head.register_forward_hook(lambda module, args, output: output.view(B, -1, output.shape[-1]))]
    try:
        part = adapter.forward(input_ids, attention_mask, logits_span=(P, N)).logits
    finally:
        for hook in hooks:
            hook.remove()
    assert part.shape == (B, N - P, adapter.vocab_size)
    assert torch.equal(part, full[:, P:])  # the same rows computed: bit for bit


class Wrapper(torch.nn.Module):
    """Stands in for DDP / FSDP / DeepSpeed: the model as ``.module``, the forward passed through."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("wrapped", [False, True], ids=["another_model", "another_model_wrapped"])
@torch.no_grad()
def test_span_of_the_module_run_is_narrowed_there(adapters, wrapped):
    """``model=``: the head narrowed is that of the module run (looking through a wrapper), e.g. RL's
    reference model, a copy with other weights."""
    adapter = adapters["dream"]
    other = copy.deepcopy(adapter.model)
    for parameter in other.parameters():
        parameter.add_(0.01 * torch.randn_like(parameter))
    runner = Wrapper(other) if wrapped else other
    input_ids, attention_mask, _, _ = batch(seed=4)
    full = adapter.forward(input_ids, attention_mask, model=runner).logits
    calls = []
    hook = head_rows(SimpleNamespace(model=other), calls)
    try:
        part = adapter.forward(input_ids, attention_mask, model=runner, logits_span=(P, N)).logits
    finally:
        hook.remove()
    assert calls == [N - P]
    close(part, full[:, P:], adapter)
    assert not torch.allclose(part, adapter.forward(input_ids, attention_mask, logits_span=(P, N)).logits)
