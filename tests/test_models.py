"""agdo.models: ids, token alignment, and last-layer statistics checked against EAGER attention in float64.

Fully offline: generic models are built from configs; Dream and LLaDA from the local stand-ins in
``tests/fixtures`` loaded with ``trust_remote_code`` from a directory.
"""

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from agdo.models import AdapterOutput, _compat, load_adapter
from agdo.models._families import position_ids_for

FIXTURES = Path(__file__).parent / "fixtures"
B, N, P = 2, 12, 5
VOCAB = 96


# ------------------------------------------------------------------------------------------- models


def generic_model(kind: str):
    """Bidirectional tiny transformers models: a Dream-like shifted GQA 7:1 and a LLaDA-like unshifted MHA."""
    common = dict(
        vocab_size=VOCAB, intermediate_size=128, num_hidden_layers=2, initializer_range=0.2,
        mask_token_id=95, pad_token_id=90, eos_token_id=[90, 91], is_causal=False,
    )
    torch.manual_seed(0)
    if kind == "qwen2_gqa_shifted":
        config = Qwen2Config(
            hidden_size=112, num_attention_heads=7, num_key_value_heads=1, diffusion_shift=True, **common
        )
        model = Qwen2ForCausalLM(config)
    else:
        config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, **common)
        model = LlamaForCausalLM(config)
    return model.eval()


def remote_model_dir(root: Path, name: str, *, seed: int = 0, **config_changes) -> Path:
    """A local checkpoint directory of a fixture family: its code, its config (with ``config_changes``) and
    random weights drawn with ``seed``."""
    directory = root / name
    shutil.copytree(FIXTURES / name, directory)
    if config_changes:
        config_file = directory / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config_changes}))
    write_random_weights(directory, seed)
    return directory


def edited_llada_dir(root: Path, name: str, old: str, new: str, *, seed: int = 0) -> Path:
    """A copy of ``tiny_llada`` named ``name`` whose modeling file has its one ``old`` replaced by ``new``."""
    directory = root / name
    shutil.copytree(FIXTURES / "tiny_llada", directory)
    modeling = directory / "modeling_llada.py"
    source = modeling.read_text()
    assert source.count(old) == 1, f"the LLaDA fixture changed: {old!r} is no longer there once"
    modeling.write_text(source.replace(old, new))
    write_random_weights(directory, seed)
    return directory


def pre_october_llada_dir(root: Path, *, seed: int = 0) -> Path:
    """``tiny_llada`` as LLaDA's modeling file was before October 2025: every block calls SDPA with
    ``attn_mask=None``, whatever mask it was given (the only difference)."""
    call = "F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,"
    return edited_llada_dir(root, "tiny_llada_pre_oct2025", call, call.replace("attn_mask=attn_mask", "attn_mask=None"),
                            seed=seed)


def remote_model_class(directory: Path):
    """The model class of a checkpoint directory, loaded by path with the adapter's class repairs (the
    published code cannot even be built on transformers 5 without them)."""
    reference = json.loads((directory / "config.json").read_text())["auto_map"]["AutoModel"]
    model_class = get_class_from_dynamic_module(reference, str(directory), local_files_only=True)
    _compat.repair_classes(model_class)
    return model_class


def write_random_weights(directory: Path, seed: int) -> None:
    """``model.safetensors`` beside the published-layout config and code: every linear / embedding weight
    (and bias) drawn from N(0, 0.2²) with ``seed``, whatever the code's own initialisation."""
    model_class = remote_model_class(directory)
    model = model_class(model_class.config_class.from_pretrained(directory))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                for weight in (module.weight, getattr(module, "bias", None)):
                    if weight is not None:
                        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():  # a tied weight under its first name (the embedding)
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor.contiguous()
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def family_adapters(root: Path, *, float64: bool = False) -> dict:
    """An adapter per family case (``FAMILY_CASES``), remote-code checkpoints written under ``root``.
    ``float64``: the models in float64 (exactness checks), except LLaDA, whose fixture builds its padding bias
    in float32 — a minimum the capture would not recognise as a mask in float64."""
    adapters = {
        "qwen2_gqa_shifted": load_adapter(generic_model("qwen2_gqa_shifted")),
        "llama_mha": load_adapter(generic_model("llama_mha")),
        "dream": load_adapter(remote_model_dir(root, "tiny_dream")),
        "llada": load_adapter(remote_model_dir(root, "tiny_llada")),
    }
    if float64:
        for name, adapter in adapters.items():
            adapter.model.to(torch.float32 if name == "llada" else torch.float64)
    return adapters


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return family_adapters(tmp_path_factory.mktemp("checkpoints"))


FAMILY_CASES = ["qwen2_gqa_shifted", "llama_mha", "dream", "llada"]
SHIFTED = {"qwen2_gqa_shifted": True, "llama_mha": False, "dream": True, "llada": False}


def batch(seed=0):
    """Left-padded prompts (row 1 has 3 pads) and a random unmasked set / query selection."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 90, (B, N), generator=gen)
    attention_mask = torch.ones(B, N, dtype=torch.bool)
    attention_mask[1, :3] = False
    unmasked = torch.rand(B, N, generator=gen) < 0.5
    queries = torch.rand(B, N, generator=gen) < 0.5
    queries[:, :P] = False
    return input_ids, attention_mask, unmasked, queries


# --------------------------------------------------------------------------- eager attention, float64


def last_layer_probabilities(adapter, input_ids, attention_mask):
    """``(B, H, N, N)`` float64 probabilities of the last layer, from eager attention (no adapter code)."""
    model, family = adapter.model, adapter.family
    if family == "llada":  # LLaDA has no output_attentions: softmax of the q/k its block receives
        recorded = {}
        block = model.model.transformer.blocks[-1]
        original = block._scaled_dot_product_attention

        def recording(q, k, v, **kwargs):
            recorded["q"], recorded["k"] = q, k
            return original(q, k, v, **kwargs)

        block._scaled_dot_product_attention = recording
        try:
            model(input_ids, attention_mask=attention_mask.long())
        finally:
            del block._scaled_dot_product_attention
        q, k = recorded["q"].double(), recorded["k"].double()
        logits = q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-1, -2) / q.shape[-1] ** 0.5
        return torch.softmax(logits.masked_fill(~attention_mask[:, None, None, :], float("-inf")), dim=-1)
    B, N = attention_mask.shape  # noqa: N806  (the batch's own sizes, not this module's)
    positions = position_ids_for(attention_mask)
    # A 4D key-padding bias: transformers 4.x would turn a 2D mask of a generic model into a causal one.
    bias = torch.zeros(B, 1, 1, N).masked_fill(~attention_mask[:, None, None, :], float("-inf")).expand(B, 1, N, N)
    if family == "dream":  # its SDPA class falls back to eager for output_attentions
        out = model(input_ids, attention_mask=bias, position_ids=positions, output_attentions=True)
    else:
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        out = eager(input_ids, attention_mask=bias, position_ids=positions, output_attentions=True)
    return out.attentions[-1].double()


def expected_statistics(probs, attention_mask, unmasked, queries, shift, norm, heads_per_row=None, response_start=P):
    """Per-token S, (S0, Abar_RR) and I straight from the definitions (SPEC §1-§2); Abar averages every head,
    or the heads ``heads_per_row[b]`` of each row (the head ablations)."""
    B, N = attention_mask.shape  # noqa: N806  (the batch's own sizes, not this module's)
    P = response_start  # noqa: N806
    if heads_per_row is None:
        abar = probs.mean(1)
    else:
        abar = torch.stack([probs[b, heads_per_row[b]].mean(0) for b in range(probs.shape[0])])
    abar = abar * attention_mask[:, None, :]
    rows_valid = attention_mask.double()
    s_rows = (abar * unmasked[:, None, :]).sum(-1) * rows_valid
    s = torch.cat([torch.zeros(B, 1, dtype=s_rows.dtype), s_rows[:, :-1]], 1) if shift else s_rows
    s = s * attention_mask
    predictor = torch.arange(P, N) - int(shift)
    both_real = (attention_mask[:, P:] & attention_mask[:, predictor]).double()
    s0 = abar[:, predictor, :P].sum(-1) * both_real
    abar_rr = abar[:, predictor, P:] * both_real[..., None]
    rows = torch.cat([queries[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], 1) if shift else queries
    rows = (rows & attention_mask).double()
    influence = (abar * rows[:, :, None]).sum(1)
    if norm == "mean":
        influence = influence / rows.sum(-1, keepdim=True)
    elif norm == "max":
        influence = influence / influence.amax(-1, keepdim=True)
    return dict(s=s, s0=s0, abar_rr=abar_rr, influence=influence)


# -------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", FAMILY_CASES)
@pytest.mark.parametrize("norm", ["mean", "sum", "max"])
@torch.no_grad()
def test_statistics_match_eager_attention(adapters, case, norm):
    adapter = adapters[case]
    input_ids, attention_mask, unmasked, queries = batch()
    out = adapter.forward(
        input_ids, attention_mask, unmasked=unmasked, response_start=P,
        influence_query_mask=queries, influence_norm=norm,
    )
    probs = last_layer_probabilities(adapter, input_ids, attention_mask)
    expected = expected_statistics(probs, attention_mask, unmasked, queries, SHIFTED[case], norm)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(out, name).double(), value, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", ["qwen2_gqa_shifted", "llama_mha"])
@torch.no_grad()
def test_generic_forward_without_padding_is_bidirectional(adapters, case):
    """transformers 4.x builds a causal mask when none is given, whatever ``config.is_causal`` says: the
    adapter's unpadded forward must equal the model run with an explicit all-visible mask on every version."""
    adapter = adapters[case]
    input_ids = batch()[0]
    visible = torch.zeros(B, 1, N, N, dtype=adapter.model.dtype)
    causal = visible.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), -1e9)
    expected = adapter.token_logits(adapter.model(input_ids=input_ids, attention_mask=visible, use_cache=False).logits)
    causal_logits = adapter.token_logits(adapter.model(input_ids=input_ids, attention_mask=causal, use_cache=False).logits)
    assert not torch.allclose(expected, causal_logits)  # the check can tell the two apart
    torch.testing.assert_close(adapter.forward(input_ids).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", FAMILY_CASES)
@torch.no_grad()
def test_logits_with_capture_equal_plain_forward_and_are_token_aligned(adapters, case):
    adapter = adapters[case]
    input_ids, attention_mask, unmasked, queries = batch(seed=1)
    plain = adapter.forward(input_ids, attention_mask)
    assert plain.s is plain.s0 is plain.abar_rr is plain.influence is None
    for request in (dict(unmasked=unmasked), dict(response_start=P, influence_query_mask=queries)):
        captured = adapter.forward(input_ids, attention_mask, **request)
        assert torch.equal(captured.logits, plain.logits)  # bitwise: Max-S and Max-Prob see the same logits
    # No padding: the model's own rows, for the alignment check. Generic models get an explicit all-visible
    # mask: without one transformers 4.x runs them causally (see the test above).
    visible = {} if case in ("dream", "llada") else {"attention_mask": torch.zeros(B, 1, N, N)}
    raw = adapter.model(input_ids, use_cache=False, **visible).logits
    aligned = adapter.forward(input_ids).logits
    torch.testing.assert_close(adapter.token_logits(raw), aligned)
    if SHIFTED[case]:
        torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])
        torch.testing.assert_close(aligned[:, 0], raw[:, 0])
    else:
        torch.testing.assert_close(aligned, raw)


def test_ids_shift_and_shapes_come_from_the_config(adapters):
    expected = {
        "qwen2_gqa_shifted": (95, 90, (90, 91), True, (7, 1, 16)),
        "llama_mha": (95, 90, (90, 91), False, (4, 4, 16)),
        "dream": (95, 90, (90,), True, (7, 1, 16)),
        "llada": (95, 91, (91,), False, (4, 4, 16)),
    }
    for case, (mask_id, pad_id, eos_ids, shift, shape) in expected.items():
        adapter = adapters[case]
        got = (adapter.mask_token_id, adapter.pad_token_id, adapter.eos_token_ids, adapter.shift)
        assert got == (mask_id, pad_id, eos_ids, shift), case
        assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == shape, case
        assert adapter.stop_token_ids == tuple(dict.fromkeys(eos_ids + (pad_id,)))
        assert adapter.vocab_size == VOCAB and adapter.device == torch.device("cpu")
    assert adapters["dream"].family == "dream" and adapters["llada"].family == "llada"


def test_family_defaults_fill_only_missing_fields_and_tokenizer_adds_end_of_turn(adapters):
    tokenizer = SimpleNamespace(
        mask_token_id=None, pad_token_id=None, eos_token_id=92, unk_token_id=0,
        convert_tokens_to_ids=lambda token: {"<|eot_id|>": 93}.get(token, 0),
    )
    model = copy.deepcopy(adapters["llada"].model)
    del model.config.mask_token_id
    adapter = load_adapter(model, tokenizer=tokenizer)
    assert adapter.mask_token_id == 126336  # LLaDA's default: neither config nor tokenizer has one
    assert adapter.eos_token_ids == (91, 92, 93)  # config, tokenizer, end-of-turn token by its string

    generic = generic_model("llama_mha")
    generic.config.mask_token_id = None
    with pytest.raises(ValueError, match="mask token"):
        load_adapter(generic)


def test_one_forward_sdpa_on_every_layer_and_one_statistics_pass(adapters, monkeypatch):
    from transformers import AttentionInterface

    import agdo_kernels

    adapter = adapters["qwen2_gqa_shifted"]
    calls = {"sdpa": 0, "forward": 0, "valid_attention": 0}
    sdpa = AttentionInterface._global_mapping["sdpa"]
    valid_attention = agdo_kernels.valid_attention

    def counting_valid_attention(*args, **kwargs):
        calls["valid_attention"] += 1
        return valid_attention(*args, **kwargs)

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    forward = adapter.model.forward

    def counting_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counting_sdpa)
    monkeypatch.setattr(adapter.model, "forward", counting_forward)
    monkeypatch.setattr(agdo_kernels, "valid_attention", counting_valid_attention)
    input_ids, attention_mask, unmasked, _ = batch()
    with torch.no_grad():
        adapter.forward(input_ids, attention_mask, unmasked=unmasked)
    # The model's own SDPA gives every layer's output (the hooked one too); S comes from one S-only pass.
    assert calls == {"sdpa": adapter.model.config.num_hidden_layers, "forward": 1, "valid_attention": 1}
    assert adapter.model.config._attn_implementation == "sdpa"


def parameter_gradients(adapter, forwards, loss):
    """For each callable in ``forwards`` (returning an ``AdapterOutput``), the model's parameter gradients of
    ``loss(output)`` in training mode; the model is left in eval mode without gradients."""
    adapter.model.train()
    try:
        gradients = []
        for forward in forwards:
            adapter.model.zero_grad()
            loss(forward()).backward()
            gradients.append([p.grad.clone() for p in adapter.model.parameters() if p.grad is not None])
    finally:
        adapter.model.eval()
        adapter.model.zero_grad(set_to_none=True)
    assert len(gradients[0]) == len(gradients[-1]) > 0
    return gradients


@pytest.mark.parametrize("case", ["qwen2_gqa_shifted", "dream", "llada"])
def test_training_gradients_unchanged_by_capture(adapters, case):
    adapter = adapters[case]
    input_ids, attention_mask, unmasked, queries = batch(seed=2)

    def loss(out):
        assert out.s is None or not out.s.requires_grad
        return out.logits.float().logsumexp(-1).mean()

    plain, captured = parameter_gradients(adapter, [
        lambda: adapter.forward(input_ids, attention_mask),
        lambda: adapter.forward(input_ids, attention_mask, unmasked=unmasked, response_start=P,
                                influence_query_mask=queries),
    ], loss)
    for plain_grad, captured_grad in zip(plain, captured):
        torch.testing.assert_close(captured_grad, plain_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_hooks_are_removed_even_when_the_capture_fails(adapters, case):
    adapter = adapters[case]
    target = adapter._target
    before = dict(vars(target)), adapter.model.config._attn_implementation
    sdpa = torch.nn.functional.scaled_dot_product_attention
    input_ids, attention_mask, unmasked, _ = batch()
    adapter.kernel_backend = "no-such-backend"
    try:
        with pytest.raises(ValueError, match="backend"):
            adapter.forward(input_ids, attention_mask, unmasked=unmasked)
    finally:
        adapter.kernel_backend = "auto"
    assert (dict(vars(target)), adapter.model.config._attn_implementation) == before
    assert torch.nn.functional.scaled_dot_product_attention is sdpa


@pytest.mark.parametrize("case", FAMILY_CASES)
@pytest.mark.parametrize("layer", ["last", "first"])
@torch.no_grad()
def test_statistics_only_forward_stops_at_the_chosen_layer(adapters, case, layer):
    """``return_logits=False`` (the order build): the same statistics bit for bit, no logits, and nothing after
    the chosen layer's statistics runs (not the last layer's attention when the first is chosen, never the LM
    head); the hooks are gone afterwards as after a whole forward."""
    adapter = adapters[case]
    input_ids, attention_mask, unmasked, queries = batch(seed=2)
    request = dict(unmasked=unmasked, response_start=P, influence_query_mask=queries, attention_layer=layer)
    last_attention = adapter._layer_target(adapter.num_layers - 1)
    calls = {"lm_head": 0, "last attention": 0}

    def counter(name):
        def count(*_):
            calls[name] += 1

        return count

    hooks = [adapter.model.get_output_embeddings().register_forward_pre_hook(counter("lm_head")),
             last_attention.register_forward_pre_hook(counter("last attention"))]
    before = dict(vars(adapter._target)), torch.nn.functional.scaled_dot_product_attention
    try:
        whole = adapter.forward(input_ids, attention_mask, **request)
        assert calls == {"lm_head": 1, "last attention": 1}
        stopped = adapter.forward(input_ids, attention_mask, return_logits=False, **request)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"lm_head": 1, "last attention": 1 if layer == "first" else 2}
    assert stopped.logits is None and whole.logits is not None
    for name in ("s", "s0", "abar_rr", "influence"):
        assert torch.equal(getattr(stopped, name), getattr(whole, name)), name
    assert (dict(vars(adapter._target)), torch.nn.functional.scaled_dot_product_attention) == before


@torch.no_grad()
def test_statistics_only_forward_runs_whole_where_it_must(adapters, monkeypatch):
    """A sharded model (FSDP / ZeRO-3 hooks must see the forward end) or a caller's wrapper runs the whole
    forward and drops the logits; asking for neither logits nor a statistic is an error."""
    import agdo.models.adapter as adapter_module

    adapter = adapters["llama_mha"]
    input_ids, attention_mask, unmasked, _ = batch()
    calls = []
    hook = adapter.model.get_output_embeddings().register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        adapter.forward(input_ids, attention_mask, unmasked=unmasked, return_logits=False)
        assert calls == []
        out = adapter.forward(input_ids, attention_mask, unmasked=unmasked, return_logits=False, model=adapter.model)
        assert calls == [1] and out.logits is None and out.s is not None
        monkeypatch.setattr(adapter_module, "_forward_must_finish", lambda model: True)
        out = adapter.forward(input_ids, attention_mask, unmasked=unmasked, return_logits=False)
        assert calls == [1, 1] and out.logits is None and out.s is not None
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="return_logits=False needs a statistic"):
        adapter.forward(input_ids, attention_mask, return_logits=False)


def test_models_whose_hooks_need_the_whole_forward_are_detected():
    """``_forward_must_finish``: DeepSpeed ZeRO-3 marks its parameters with ``ds_id``, accelerate's device-map
    dispatch adds an ``_hf_hook`` to modules; a plain model is neither."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    from agdo.models.adapter import _forward_must_finish

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert not _forward_must_finish(model)
    add_hook_to_module(model[0], ModelHook())
    assert _forward_must_finish(model)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].weight.ds_id = 7
    assert _forward_must_finish(model)


def test_bad_inputs_give_clear_errors(adapters, tmp_path):
    adapter = adapters["llama_mha"]
    input_ids, attention_mask, unmasked, _ = batch()
    with pytest.raises(ValueError, match="attention_mask.*shape"):
        adapter.forward(input_ids, attention_mask[:, :-1])
    with pytest.raises(ValueError, match="unmasked.*shape"):
        adapter.forward(input_ids, attention_mask, unmasked=unmasked.T)
    with pytest.raises(TypeError, match="unmasked.*bool"):
        adapter.forward(input_ids, attention_mask, unmasked=unmasked.float())
    with pytest.raises(ValueError, match="input_ids"):
        adapter.forward(input_ids[0])
    with pytest.raises(ValueError, match="influence_norm"):
        adapter.forward(input_ids, influence_query_mask=unmasked, influence_norm="median")
    with pytest.raises(ValueError, match="family"):
        load_adapter(adapter.model, family="gpt")
    with pytest.raises(FileNotFoundError, match="local"):
        load_adapter(tmp_path / "missing")
    with pytest.raises(ValueError, match="LLaDA blocks"):
        load_adapter(adapter.model, family="llada")


def test_generic_model_loads_from_a_local_directory(tmp_path):
    generic_model("qwen2_gqa_shifted").save_pretrained(tmp_path)
    adapter = load_adapter(tmp_path)
    assert (adapter.family, adapter.shift, adapter.mask_token_id) == ("generic", True, 95)
    assert type(adapter.model).__name__ == "Qwen2ForCausalLM"


def test_causal_generic_model_is_rejected():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, mask_token_id=95))
    with pytest.raises(ValueError, match="causal"):
        load_adapter(model)


def test_output_is_a_named_tuple():
    assert AdapterOutput._fields == ("logits", "s", "s0", "abar_rr", "influence")


def test_mask_check_accepts_key_padding_and_rejects_other_masks():
    from agdo.models._capture import check_key_padding_only

    B, N = 2, 6
    lowest = torch.finfo(torch.float32).min
    real = torch.ones(B, N, dtype=torch.bool)
    real[1, :2] = False
    padding = torch.zeros(B, 1, N, N).masked_fill(~real[:, None, None, :], lowest)
    check_key_padding_only(padding, False, real, "test")
    check_key_padding_only(padding[:, :, :1], False, real, "test")  # one row broadcast to all queries
    causal = padding.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), lowest)
    sliding = padding.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(3), lowest)
    unpadded = torch.zeros(B, 1, 1, N)
    for mask in (causal, sliding, unpadded):
        with pytest.raises(ValueError, match="not bidirectional key padding"):
            check_key_padding_only(mask, False, real, "test")
    with pytest.raises(ValueError, match="attends causally"):
        check_key_padding_only(None, True, None, "test")
