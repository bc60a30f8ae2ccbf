"""Ablations as configuration (SPEC §4, arXiv paper Tables 5-7) and identical logits with/without statistics.

Every statistic is checked against an independent reference: the chosen layer's attention probabilities
from EAGER attention (``output_attentions``; LLaDA: softmax of the q/k its block receives) in float64,
head subsets and the local/global split recomputed from those probabilities, and the SFT ablations'
orders and weights rebuilt from the public building blocks with the same random streams. Odd sizes:
3 layers (first / middle / last all differ), B = 3, N = 13, P = 6, H = 7 / 6 / 7 / 6 with GQA groups
7 / 2 / 1 (Dream repeats k/v itself) / 3.
"""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import agdo_kernels
from agdo import orders
from agdo.models import load_adapter
from agdo.models._capture import head_split, mean_attention_distance
from agdo.models._families import additive_key_mask, position_ids_for

sys.path.insert(0, str(Path(__file__).parent))
from test_models import adapters  # noqa: E402,F401  (the 2-layer fixture models of every family)
from test_models import batch as two_layer_batch  # noqa: E402
from test_models import expected_statistics, remote_model_dir  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
B, N, P = 3, 13, 6
VOCAB = 96
LAYERS = 3
CASES = ["qwen2_gqa7", "llama_gqa2", "dream", "llada_gqa3"]
SHIFTED = {"qwen2_gqa7": True, "llama_gqa2": False, "dream": True, "llada_gqa3": False}


# ------------------------------------------------------------------------------------------- models


def generic_model(kind: str):
    common = dict(vocab_size=VOCAB, intermediate_size=96, num_hidden_layers=LAYERS, initializer_range=0.3,
                  mask_token_id=95, pad_token_id=90, eos_token_id=[90, 91], is_causal=False)
    torch.manual_seed(1)
    if kind == "qwen2_gqa7":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=112, num_attention_heads=7, num_key_value_heads=1,
                                             diffusion_shift=True, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=72, num_attention_heads=6, num_key_value_heads=3, **common))
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation_checkpoints")
    built = {
        "qwen2_gqa7": load_adapter(generic_model("qwen2_gqa7")),
        "llama_gqa2": load_adapter(generic_model("llama_gqa2")),
        "dream": load_adapter(remote_model_dir(root, "tiny_dream", seed=1, num_hidden_layers=LAYERS)),
        "llada_gqa3": load_adapter(remote_model_dir(root, "tiny_llada", seed=1, n_layers=LAYERS, d_model=72, n_heads=6,
                                                    n_kv_heads=2)),
    }
    for adapter in built.values():
        adapter.model.eval()
        assert adapter.num_layers == LAYERS
    return built


def make_batch(seed=0):
    """Left padding of different lengths (row 2 has none), a random key set U and query selection."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 90, (B, N), generator=gen)
    attention_mask = torch.ones(B, N, dtype=torch.bool)
    attention_mask[0, :2] = False
    attention_mask[1, :4] = False
    unmasked = torch.rand(B, N, generator=gen) < 0.5
    queries = torch.rand(B, N, generator=gen) < 0.6
    return input_ids, attention_mask, unmasked, queries


# --------------------------------------------------------------------- eager attention, float64


def all_layer_probabilities(adapter, input_ids, attention_mask):
    """``(L, B, H, N, N)`` float64 probabilities of every layer, from eager attention (no adapter code)."""
    model, family = adapter.model, adapter.family
    if family == "llada":
        recorded = []
        blocks = list(model.model.transformer.blocks)
        originals = [block._scaled_dot_product_attention for block in blocks]

        def recording(original):
            def attention(q, k, v, **kwargs):
                recorded.append((q.double(), k.double()))
                return original(q, k, v, **kwargs)
            return attention

        for block, original in zip(blocks, originals):
            block._scaled_dot_product_attention = recording(original)
        try:
            with torch.no_grad():
                model(input_ids, attention_mask=attention_mask.long())
        finally:
            for block in blocks:
                del block._scaled_dot_product_attention
        probs = []
        for q, k in recorded:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~attention_mask[:, None, None, :],
                                                                               float("-inf"))
            probs.append(torch.softmax(logits, dim=-1))
        return torch.stack(probs)
    positions = position_ids_for(attention_mask)
    # A 4D key-padding bias: a 2D mask is made causal by transformers 4.x for generic models.
    bias = additive_key_mask(attention_mask, torch.float32)
    with torch.no_grad():
        if family == "dream":
            out = model(input_ids, attention_mask=bias, position_ids=positions, output_attentions=True)
        else:
            eager = copy.deepcopy(model)
            eager.set_attn_implementation("eager")
            out = eager(input_ids, attention_mask=bias, position_ids=positions, output_attentions=True)
    return torch.stack([a.double() for a in out.attentions])


@pytest.fixture(scope="module")
def references(models):
    input_ids, attention_mask, _, _ = make_batch()
    return {case: all_layer_probabilities(adapter, input_ids, attention_mask) for case, adapter in models.items()}


def naive_distances(probs, attention_mask):
    """``(B, H)`` mean over real query rows of sum_k P[h,i,k] |i-k|, by plain loops over rows."""
    Bn, H, Nn, _ = probs.shape
    out = torch.zeros(Bn, H, dtype=torch.float64)
    for b in range(Bn):
        rows = [i for i in range(Nn) if attention_mask[b, i]]
        for h in range(H):
            out[b, h] = sum(sum(float(probs[b, h, i, k]) * abs(i - k) for k in range(Nn)) for i in rows) / len(rows)
    return out


def chosen_heads(probs, attention_mask, heads):
    """Per batch row, the list of query heads ``heads`` selects (split recomputed from the probabilities)."""
    H = probs.shape[1]
    if heads == "all":
        return [list(range(H))] * B
    if isinstance(heads, list):
        return [heads] * B
    distance = naive_distances(probs, attention_mask)
    result = []
    for b in range(B):
        ranked = sorted(range(H), key=lambda h: (float(distance[b, h]), h))
        result.append(ranked[: H // 2] if heads == "local" else ranked[H // 2 :])
    return result




# ----------------------------------------------------------------------- layer and head choice


LAYER_CHOICES = [("first", 0), ("middle", 1), ("last", 2), (0, 0), (-2, 1), (2, 2)]
HEAD_CHOICES = ["all", [4, 1, 3], "local", "global"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layer, index", LAYER_CHOICES[:3])
@pytest.mark.parametrize("heads", HEAD_CHOICES, ids=str)
@torch.no_grad()
def test_statistics_of_the_chosen_layer_and_heads_match_eager_attention(models, references, case, layer, index, heads):
    adapter = models[case]
    input_ids, attention_mask, unmasked, queries = make_batch()
    out = adapter.forward(input_ids, attention_mask, unmasked=unmasked, response_start=P,
                          influence_query_mask=queries, attention_layer=layer, attention_heads=heads)
    probs = references[case][index]
    expected = expected_statistics(probs, attention_mask, unmasked, queries, SHIFTED[case], "sum",
                                   chosen_heads(probs, attention_mask, heads), response_start=P)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(out, name).double(), value, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", ["llama_gqa2", "llada_gqa3"])
@torch.no_grad()
def test_int_layer_indices_equal_the_named_layers(models, case):
    adapter = models[case]
    input_ids, attention_mask, unmasked, queries = make_batch(seed=3)
    ask = dict(unmasked=unmasked, response_start=P, influence_query_mask=queries)
    named = {index: adapter.forward(input_ids, attention_mask, attention_layer=layer, **ask)
             for layer, index in LAYER_CHOICES[:3]}
    for layer, index in LAYER_CHOICES[3:] + [(-3, 0), (-1, 2)]:
        got = adapter.forward(input_ids, attention_mask, attention_layer=layer, **ask)
        for name in ("s", "s0", "abar_rr", "influence"):
            assert torch.equal(getattr(got, name), getattr(named[index], name)), (layer, name)
    # Different layers really give different statistics (the choice is not ignored).
    assert not torch.allclose(named[0].abar_rr, named[2].abar_rr, atol=1e-3)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_local_and_global_split_the_heads_by_mean_attention_distance(models, references, case):
    """The q heads the kernels receive for local / global are exactly the heads of the naive float64 split."""
    adapter = models[case]
    input_ids, attention_mask, _, _ = make_batch()
    recorded = []
    original = agdo_kernels.influence

    def recording(q, k, **kwargs):
        recorded.append((q, k))
        return original(q, k, **kwargs)

    agdo_kernels.influence = recording
    try:
        for heads in ("all", "local", "global"):
            adapter.forward(input_ids, attention_mask, influence_query_mask=attention_mask, attention_layer="first",
                            attention_heads=heads)
    finally:
        agdo_kernels.influence = original
    (q_all, k_all), *split = recorded
    H = adapter.num_heads
    g = H // k_all.shape[1]
    probs = references[case][0]
    distance = naive_distances(probs, attention_mask)
    ranked = distance.sort(-1).values
    assert (ranked[:, H // 2] - ranked[:, H // 2 - 1] > 1e-4).all()  # no near-tie at the boundary
    for heads, (q, k) in zip(("local", "global"), split):
        per_row = chosen_heads(probs, attention_mask, heads)
        assert q.shape[1] == k.shape[1] == (H // 2 if heads == "local" else H - H // 2)
        for b in range(B):
            # The same heads as a set (the kernels average over them, so their order does not matter).
            got = {tuple(q[b, j].flatten().tolist()) for j in range(q.shape[1])}
            assert got == {tuple(q_all[b, h].flatten().tolist()) for h in per_row[b]}, (heads, b)
            for j in range(q.shape[1]):  # each chosen q head comes with its own kv head h // g
                h = next(h for h in per_row[b] if torch.equal(q_all[b, h], q[b, j]))
                assert torch.equal(k[b, j], k_all[b, h // g])
    local_rows, global_rows = (chosen_heads(probs, attention_mask, h) for h in ("local", "global"))
    for b in range(B):
        assert sorted(local_rows[b] + global_rows[b]) == list(range(H))
        assert max(distance[b, local_rows[b]]) < min(distance[b, global_rows[b]])


def test_mean_attention_distance_is_chunked_gqa_aware_and_matches_loops():
    gen = torch.Generator().manual_seed(5)
    Bq, H, Hkv, Nq, d = 2, 6, 2, 11, 8
    q, k = torch.randn(Bq, H, Nq, d, generator=gen) * 2, torch.randn(Bq, Hkv, Nq, d, generator=gen)
    mask = torch.ones(Bq, Nq, dtype=torch.bool)
    mask[1, :3] = False
    k_full = k.double().repeat_interleave(H // Hkv, dim=1)
    logits = (q.double() @ k_full.transpose(-1, -2) * 0.3).masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, -1)
    expected = torch.zeros(Bq, H, dtype=torch.float64)
    for b in range(Bq):
        rows = [i for i in range(Nq) if mask[b, i]]
        for h in range(H):
            expected[b, h] = sum(float(probs[b, h, i, kk]) * abs(i - kk) for i in rows for kk in range(Nq)) / len(rows)
    whole = mean_attention_distance(q, k, mask, 0.3)
    for max_elements in (1, Bq * H * Nq * 3, 10**9):  # one query row, 3 rows, everything at once
        chunked = mean_attention_distance(q, k, mask, 0.3, max_elements=max_elements)
        torch.testing.assert_close(chunked.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole, mean_attention_distance(q, k.repeat_interleave(3, dim=1), mask, 0.3))
    # Ties go to the lower head index; odd H: the extra head is global.
    tied = torch.tensor([[3.0, 1.0, 1.0, 2.0, 1.0]])
    assert head_split(tied, "local").tolist() == [[1, 2]] and head_split(tied, "global").tolist() == [[4, 3, 0]]


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_attention_order_passes_the_choice_through(models, case):
    adapter = models[case]
    input_ids, attention_mask, _, _ = make_batch(seed=4)
    trained = torch.ones(B, N - P, dtype=torch.bool)
    trained[0, -2:] = False
    for layer, heads in (("middle", [0, 5]), (0, "global")):
        order = orders.attention_order(adapter, input_ids, attention_mask, response_start=P, trained=trained,
                                       step_size=2, attention_layer=layer, attention_heads=heads)
        out = adapter.forward(input_ids, attention_mask, response_start=P, influence_query_mask=attention_mask,
                              attention_layer=layer, attention_heads=heads)
        assert torch.equal(order.steps, agdo_kernels.greedy_order(out.abar_rr, out.s0, valid=trained, step_size=2))
        assert torch.equal(order.influence, out.influence)
        assert torch.equal(orders.attention_influence(adapter, input_ids, attention_mask, attention_layer=layer,
                                                      attention_heads=heads), out.influence)


def test_one_forward_sdpa_everywhere_and_the_kernels_on_the_chosen_layer(models, monkeypatch):
    from transformers import AttentionInterface

    adapter = models["qwen2_gqa7"]
    sdpa = AttentionInterface._global_mapping["sdpa"]
    calls = []

    def counting_sdpa(module, *args, **kwargs):
        calls.append(("sdpa", module.layer_idx))
        return sdpa(module, *args, **kwargs)

    original = agdo_kernels.valid_attention

    def counting_valid_attention(q, *args, **kwargs):
        calls.append(("kernel", q.shape[1]))
        return original(q, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counting_sdpa)
    monkeypatch.setattr(agdo_kernels, "valid_attention", counting_valid_attention)
    input_ids, attention_mask, unmasked, _ = make_batch()
    with torch.no_grad():
        adapter.forward(input_ids, attention_mask, unmasked=unmasked, attention_layer="middle", attention_heads=[2, 6])
    # Layer 1's SDPA call runs after the statistics pass beside it (on the 2 chosen heads); others untouched.
    assert calls == [("sdpa", 0), ("kernel", 2), ("sdpa", 1), ("sdpa", 2)]
    assert adapter.model.config._attn_implementation == "sdpa"
    assert all("_agdo_capture" not in vars(layer.self_attn) for layer in adapter.model.model.layers)


@pytest.mark.parametrize("case", CASES)
def test_bad_choices_are_value_errors_naming_the_argument(models, case):
    adapter = models[case]
    input_ids, attention_mask, unmasked, _ = make_batch()
    H = adapter.num_heads
    for layer in (LAYERS, -LAYERS - 1, "mid", "Last", True, 1.0, None, [0]):
        with pytest.raises(ValueError, match="attention_layer"):
            adapter.forward(input_ids, attention_mask, unmasked=unmasked, attention_layer=layer)
    for heads in ([], [H], [0, 0], [-1], [True], [0.5], "half", None, 3):
        with pytest.raises(ValueError, match="attention_heads"):
            adapter.forward(input_ids, attention_mask, unmasked=unmasked, attention_heads=heads)
    with pytest.raises(ValueError, match="attention_layer"):
        orders.attention_order(adapter, input_ids, attention_mask, response_start=P,
                               trained=torch.ones(B, N - P, dtype=torch.bool), attention_layer="deep")


def test_configs_carry_and_validate_the_choice():
    from agdo.config import build_config
    from agdo.training.rl import RLConfig
    from agdo.training.sft import SFTConfig

    for cls in (SFTConfig, RLConfig):
        default = cls()
        assert (default.attention_layer, default.attention_heads) == ("last", "all")
        built = build_config(cls, None, ["attention_layer=-2", "attention_heads=[3, 0]"])
        assert (built.attention_layer, built.attention_heads) == (-2, [3, 0])
        assert build_config(cls, None, ["attention_layer=middle", "attention_heads=local"]).attention_heads == "local"
        for name, value in (("attention_layer", "mid"), ("attention_layer", True), ("attention_heads", []),
                            ("attention_heads", [1, 1]), ("attention_heads", "heads"), ("attention_heads", [-1])):
            with pytest.raises(ValueError, match=name):
                cls(**{name: value})


# ------------------------------------------------------------------------- identical logits (item 5)


REQUESTS = [dict(unmasked=True), dict(response_start=True), dict(unmasked=True, response_start=True, influence=True)]


def _request(kind, unmasked, queries, p):
    out = {}
    if "unmasked" in kind:
        out["unmasked"] = unmasked
    if "response_start" in kind:
        out["response_start"] = p
    if "influence" in kind:
        out["influence_query_mask"] = queries
    return out


@pytest.mark.parametrize("case", ["qwen2_gqa_shifted", "llama_mha", "dream", "llada"])
@pytest.mark.parametrize("padded", [True, False])
@torch.no_grad()
def test_logits_are_bitwise_equal_with_and_without_statistics_fixture_models(adapters, case, padded):  # noqa: F811
    """Max-S (asks for S) and Max-Prob (asks for nothing) decoding see the same logits, every family."""
    adapter = adapters[case]
    input_ids, attention_mask, unmasked, queries = two_layer_batch(seed=6)
    mask = attention_mask if padded else None
    plain = adapter.forward(input_ids, mask).logits
    for kind in REQUESTS:
        for layer in ("last", "first"):
            got = adapter.forward(input_ids, mask, attention_layer=layer, **_request(kind, unmasked, queries, 5))
            assert torch.equal(got.logits, plain), (kind, layer)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_logits_are_bitwise_equal_with_and_without_statistics_any_choice(models, case):
    adapter = models[case]
    input_ids, attention_mask, unmasked, queries = make_batch(seed=7)
    plain = adapter.forward(input_ids, attention_mask).logits
    for layer, heads in (("last", "all"), ("middle", "local"), (0, [1, 2])):
        got = adapter.forward(input_ids, attention_mask, unmasked=unmasked, response_start=P,
                              influence_query_mask=queries, attention_layer=layer, attention_heads=heads)
        assert torch.equal(got.logits, plain), (layer, heads)


# ------------------------------------------------------------------------------ SFT ablations


def _sft_setup(num_layers=3):
    from agdo import tasks
    from agdo.training.sft_data import SFTDataset, collate_sft

    tokenizer = tasks.build_tokenizer()
    problems = tasks.addition_problems(5, digits=2, seed=3)
    dataset = SFTDataset.from_records(problems, tokenizer, max_prompt_length=64, max_response_length=64)
    model = tasks.build_tiny_model(tokenizer, hidden_size=48, num_layers=num_layers, num_heads=6, num_kv_heads=3,
                                   seed=2)
    adapter = load_adapter(model.eval(), tokenizer=tokenizer)
    items = [dataset[i] for i in (4, 0, 2)]
    items[1] = {**items[1], "prompt_ids": items[1]["prompt_ids"][2:]}  # one shorter prompt: left padding
    batch = collate_sft(items, pad_token_id=adapter.pad_token_id, post_num=2)
    return adapter, batch


def _reference_influence(adapter, batch, layer_index, heads):
    """``I`` ("sum") of every key from float64 eager attention of the chosen layer and heads."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    eager = copy.deepcopy(adapter.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_ids, attention_mask=additive_key_mask(attention_mask, torch.float32),
                    position_ids=position_ids_for(attention_mask), output_attentions=True)
    probs = out.attentions[layer_index].double()
    abar = probs[:, heads].mean(1) * attention_mask[:, None, :]
    return (abar * attention_mask[:, :, None]).sum(1)


def _rows(config, adapter, batch, epoch=1):
    from agdo.training.sft import build_rows

    return build_rows(config, adapter, batch, epoch)


def _expected_rows(config, adapter, batch, steps, token_weights, epoch=1):
    from agdo.training.masking import concat_rows, order_rows, sample_generator

    P_ = batch["response_start"]
    per_sample = []
    for b, index in enumerate(batch["index"].tolist()):
        one = slice(b, b + 1)
        per_sample.append(order_rows(
            batch["input_ids"][one], batch["attention_mask"][one], response_start=P_, steps=steps[one],
            mask_token_id=adapter.mask_token_id, token_weights=None if token_weights is None else token_weights[one],
            max_steps_per_sample=config.max_steps_per_sample, mask_ratio=(config.mask_ratio_min, config.mask_ratio_max),
            generator=sample_generator(config.seed, epoch, index)))
    return concat_rows(per_sample)


def _trained(adapter, batch, config):
    P_ = batch["response_start"]
    return orders.trained_positions(batch["input_ids"][:, P_:], adapter.stop_token_ids, config.post_num,
                                    pad_token_id=adapter.pad_token_id)


def test_sft_order_only_is_gamma_zero():
    from agdo.training.sft import SFTConfig

    adapter, batch = _sft_setup()
    config = SFTConfig(method="agdo", gamma=0.0, post_num=2, step_size=2, attention_layer="first")
    got = _rows(config, adapter, batch)
    trained = _trained(adapter, batch, config)
    steps = orders.attention_order(adapter, batch["input_ids"], batch["attention_mask"],
                                   response_start=batch["response_start"], trained=trained, step_size=2,
                                   attention_layer="first").steps
    expected = _expected_rows(config, adapter, batch, steps, None)  # weights all 1
    for name, a, b in zip(expected._fields, got, expected):
        assert torch.equal(a, b), name
    # The same masks as the full method (gamma 100): only the weights differ.
    full = _rows(SFTConfig(method="agdo", gamma=100.0, post_num=2, step_size=2, attention_layer="first"), adapter, batch)
    assert torch.equal(full.input_ids, got.input_ids) and not torch.equal(full.weights, got.weights)


@pytest.mark.parametrize("heads, head_list", [("all", [0, 1, 2, 3, 4, 5]), ([5, 0, 3], [5, 0, 3])])
def test_sft_weight_only_is_a_random_order_with_influence_weights(heads, head_list):
    from agdo.training.masking import sample_generator
    from agdo.training.sft import ORDER_STREAM, SFTConfig

    adapter, batch = _sft_setup()
    config = SFTConfig(method="agdo", ablation="weight_only", gamma=7.0, post_num=2, step_size=3, seed=11,
                       attention_layer=-2, attention_heads=heads)
    got = _rows(config, adapter, batch)
    trained = _trained(adapter, batch, config)
    steps = torch.cat([orders.random_order(trained[b : b + 1], step_size=3,
                                           generator=sample_generator(11, 1, index, ORDER_STREAM))
                       for b, index in enumerate(batch["index"].tolist())])
    influence = _reference_influence(adapter, batch, 1, head_list)[:, batch["response_start"]:]
    expected = _expected_rows(config, adapter, batch, steps, (1 + 7.0 * influence).float())
    for name in ("input_ids", "attention_mask", "targets", "sample_index", "step"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    torch.testing.assert_close(got.weights, expected.weights, atol=1e-5, rtol=1e-5)
    attention_steps = orders.attention_order(adapter, batch["input_ids"], batch["attention_mask"],
                                             response_start=batch["response_start"], trained=trained, step_size=3,
                                             attention_layer=-2, attention_heads=heads).steps
    assert not torch.equal(steps, attention_steps)  # the order really is not the attention order


def test_sft_random_weights_have_the_batch_mean_and_std_of_gamma_influence():
    from agdo.training.masking import sample_generator
    from agdo.training.sft import ORDER_STREAM, WEIGHT_STREAM, SFTConfig, lognormal_like

    adapter, batch = _sft_setup()
    gamma = 30.0
    config = SFTConfig(method="agdo", ablation="random_weights", gamma=gamma, post_num=2, seed=5)
    got = _rows(config, adapter, batch)
    trained = _trained(adapter, batch, config)
    indices = batch["index"].tolist()
    steps = torch.cat([orders.random_order(trained[b : b + 1], generator=sample_generator(5, 1, index, ORDER_STREAM))
                       for b, index in enumerate(indices)])
    gamma_i = gamma * _reference_influence(adapter, batch, LAYERS - 1, list(range(6)))[:, batch["response_start"]:]
    mean, std = float(gamma_i[trained].mean()), float(gamma_i[trained].std(unbiased=False))
    z = torch.cat([torch.randn(1, trained.shape[1], generator=sample_generator(5, 1, index, WEIGHT_STREAM))
                   for index in indices]).double()
    sigma = math.sqrt(math.log(1 + (std / mean) ** 2))
    draws = torch.exp(math.log(mean) - sigma**2 / 2 + sigma * z)  # log-normal with that mean and std
    expected = _expected_rows(config, adapter, batch, steps, (1 + draws).float())
    for name in ("input_ids", "attention_mask", "targets", "sample_index", "step"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    torch.testing.assert_close(got.weights, expected.weights, atol=1e-5, rtol=1e-4)

    # The distribution has exactly that mean and std (checked on many draws), positive like gamma * I.
    many = lognormal_like(mean, std, torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))).double()
    assert (many > 0).all()
    assert float(many.mean()) == pytest.approx(mean, rel=0.01)
    assert float(many.std()) == pytest.approx(std, rel=0.03)
    assert torch.equal(lognormal_like(0.0, 0.0, z), torch.zeros_like(z, dtype=torch.float32))
    assert torch.allclose(lognormal_like(-2.0, 0.0, z), torch.full_like(z, -2.0, dtype=torch.float32))


def test_sft_ablation_config_validation_and_training_smoke(tmp_path):
    from agdo.training.sft import SFTConfig, train_sft
    from training_helpers import reset_accelerate
    from train_worker import build_tiny_run

    with pytest.raises(ValueError, match="ablation"):
        SFTConfig(ablation="order_only")
    with pytest.raises(ValueError, match="ablation"):
        SFTConfig(method="left_to_right", ablation="weight_only")
    for ablation in ("weight_only", "random_weights"):
        reset_accelerate()
        torch.set_num_threads(1)
        adapter, dataset = build_tiny_run(num_problems=8)
        config = SFTConfig(output_dir=str(tmp_path / ablation), method="agdo", ablation=ablation, post_num=1,
                           max_steps=1, per_device_train_batch_size=4, forward_batch_size=16, learning_rate=1e-3,
                           attention_layer="first", attention_heads="global")
        train_sft(config, adapter=adapter, dataset=dataset)
        logged = [json.loads(line) for line in (tmp_path / ablation / "metrics.jsonl").read_text().splitlines()]
        assert len(logged) == 1 and math.isfinite(logged[0]["loss"]) and logged[0]["rows"] == 20  # 4 samples x 5 trained tokens
    reset_accelerate()
