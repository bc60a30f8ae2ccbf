"""Cost of capturing last-layer statistics: one adapter forward with ``S`` vs the alternatives.

Variants, same model and batch:

- ``sdpa``: ``adapter.forward`` with nothing asked (every layer SDPA) — the baseline;
- ``capture``: ``adapter.forward(unmasked=U)`` — last layer through ``valid_attention(return_output=True)``;
- ``eager_attentions``: the model switched to eager with ``output_attentions=True``, ``S`` from the returned
  last-layer probabilities (what one would do without the adapter).

Padded batches (``test_padded_batch``; half the rows left-padded by 25% / 50%): the adapter's
``padded_attention`` routes — ``mask`` (the model's masked SDPA in every layer, the baseline), ``nested``
(jagged SDPA, no mask) and ``varlen`` (flash-attn, else torch's own varlen kernel, named in the note;
CUDA only) — for a forward (``logits``), a forward with ``S`` (``capture``) and a forward + backward
(``train``).

Order build (``test_order_build``): the forward AGDO's order takes (``response_start`` + the influence over
every real row), ``whole`` (the model runs to its logits, then they are dropped: the baseline) against
``statistics_only`` (``return_logits=False``: the forward stops after the last layer's statistics, so that
layer's own attention, its MLP, the final norm and the LM head never run). What it saves is one layer's
attention and MLP plus the LM head: with this bench's 4 layers a larger share than in 28-layer Dream.

Time and peak memory come from the ``measure`` fixture (bench/conftest.py). Cases: a tiny model on
CPU, and on a GPU (skipped without one) a Dream-shaped bf16 model: the real last-layer shape (H=28,
Hkv=4, d=128, hidden 3584, vocab 152064) with few layers, so that random init is quick. Capture costs
one layer's attention statistics whatever the depth, so its share of a 28-layer forward is roughly
``layers / 28`` of the share measured here. Target: capture within 5% of ``sdpa``.

Run: ``pytest bench/bench_capture.py``.
"""

import copy
from contextlib import contextmanager

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import agdo_kernels
from agdo.models import load_adapter
from agdo.models._padded_attention import flash_varlen_function, torch_varlen_function

VARIANTS = ["sdpa", "capture", "eager_attentions"]
PADDED_ROUTES = ["mask", "nested", "varlen"]
PADDED_MODES = ["logits", "capture", "train"]

CASES = {
    "cpu-tiny": dict(
        device="cpu", dtype=torch.float32, batch=4, length=256, layers=2,
        hidden=112, heads=7, kv_heads=1, intermediate=256, vocab=512,
    ),
    "cuda-dream-shaped": dict(
        device="cuda", dtype=torch.bfloat16, batch=4, length=1024, layers=4,
        hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
    ),
}


def build_adapter(case):
    config = Qwen2Config(
        vocab_size=case["vocab"], hidden_size=case["hidden"], intermediate_size=case["intermediate"],
        num_hidden_layers=case["layers"], num_attention_heads=case["heads"], num_key_value_heads=case["kv_heads"],
        is_causal=False, diffusion_shift=True, mask_token_id=case["vocab"] - 1, pad_token_id=0, eos_token_id=0,
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(case["dtype"])  # initialise directly in the target dtype, on the device
    try:
        with torch.device(case["device"]):
            model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    adapter = load_adapter(model)
    adapter.kernel_backend = _working_backend(case["device"])
    return adapter


def _working_backend(device):
    """``auto`` when its kernels run here, else the torch reference (recorded in the results)."""
    q = torch.randn(1, 2, 8, 16, device=device)
    try:
        agdo_kernels.valid_attention(q, q, unmasked=torch.ones(1, 8, dtype=torch.bool, device=device))
        return "auto"
    except (ImportError, AttributeError, ValueError):
        return "torch"


@contextmanager
def eager_attention(model):
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(original)


def make_step(adapter, variant, case):
    gen = torch.Generator().manual_seed(0)
    B, N = case["batch"], case["length"]
    input_ids = torch.randint(1, case["vocab"] - 1, (B, N), generator=gen).to(case["device"])
    attention_mask = torch.ones(B, N, dtype=torch.bool, device=case["device"])
    attention_mask[0, : N // 8] = False  # one left-padded row, as in a real batch
    unmasked = (torch.rand(B, N, generator=gen) < 0.5).to(case["device"])

    def sdpa():
        return adapter.forward(input_ids, attention_mask).logits

    def capture():
        return adapter.forward(input_ids, attention_mask, unmasked=unmasked).s

    def eager_attentions():
        with eager_attention(adapter.model):
            out = adapter.model(input_ids, attention_mask=attention_mask.long(), output_attentions=True)
        abar = out.attentions[-1].float().mean(1)
        return (abar * unmasked[:, None, :]).sum(-1)

    return {"sdpa": sdpa, "capture": capture, "eager_attentions": eager_attentions}[variant]


def make_padded_step(adapter, route, mode, case):
    """One step on a batch whose first half of rows is left-padded by 25% / 50% (alternately)."""
    gen = torch.Generator().manual_seed(0)
    B, N = case["batch"], case["length"]
    input_ids = torch.randint(1, case["vocab"] - 1, (B, N), generator=gen).to(case["device"])
    attention_mask = torch.ones(B, N, dtype=torch.bool, device=case["device"])
    for row in range(B // 2):
        attention_mask[row, : N // 4 * (1 + row % 2)] = False
    unmasked = (torch.rand(B, N, generator=gen) < 0.5).to(case["device"])
    routed = copy.copy(adapter)  # same model and hooks, another route
    routed.padded_attention = route

    def logits():
        with torch.no_grad():
            return routed.forward(input_ids, attention_mask).logits

    def capture():
        with torch.no_grad():
            return routed.forward(input_ids, attention_mask, unmasked=unmasked).s

    def train():
        out = routed.forward(input_ids, attention_mask).logits
        (out.float().logsumexp(-1) * attention_mask).sum().backward()
        adapter.model.zero_grad(set_to_none=True)

    return {"logits": logits, "capture": capture, "train": train}[mode]


_ADAPTERS = {}


def case_adapter(case_name):
    """The case's adapter (one model alive at a time); skips a CUDA case without a CUDA device."""
    case = CASES[case_name]
    if case["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if case_name not in _ADAPTERS:
        _ADAPTERS.clear()
        _ADAPTERS[case_name] = build_adapter(case)
    return _ADAPTERS[case_name]


def shape_of(case):
    return f"B={case['batch']} N={case['length']} H={case['heads']} Hkv={case['kv_heads']}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_capture_overhead(measure, case_name, variant):
    case = CASES[case_name]
    adapter = case_adapter(case_name)
    step = make_step(adapter, variant, case)
    with torch.no_grad():
        measure(step, group=f"capture: {case_name}", impl=variant, baseline=variant == "sdpa",
                rounds=5 if case["device"] == "cpu" else 10, kernel_backend=adapter.kernel_backend,
                layers=case["layers"], shape=shape_of(case))


@pytest.mark.parametrize("variant", ["whole", "statistics_only"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_order_build(measure, case_name, variant):
    case = CASES[case_name]
    adapter = case_adapter(case_name)
    gen = torch.Generator().manual_seed(0)
    B, N = case["batch"], case["length"]
    input_ids = torch.randint(1, case["vocab"] - 1, (B, N), generator=gen).to(case["device"])
    attention_mask = torch.ones(B, N, dtype=torch.bool, device=case["device"])
    attention_mask[0, : N // 8] = False

    def step():
        out = adapter.forward(input_ids, attention_mask, response_start=N // 4, influence_query_mask=attention_mask,
                              return_logits=variant == "whole")
        return out.abar_rr, out.influence

    with torch.no_grad():
        measure(step, group=f"order build: {case_name}", impl=variant, baseline=variant == "whole",
                rounds=5 if case["device"] == "cpu" else 10, kernel_backend=adapter.kernel_backend,
                layers=case["layers"], shape=shape_of(case))


@pytest.mark.parametrize("route", PADDED_ROUTES)
@pytest.mark.parametrize("mode", PADDED_MODES)
@pytest.mark.parametrize("case_name", list(CASES))
def test_padded_batch(measure, case_name, mode, route):
    case = CASES[case_name]
    note = None
    if route == "varlen":
        if case["device"] != "cuda" or (flash_varlen_function() or torch_varlen_function()) is None:
            pytest.skip("varlen needs CUDA and flash-attn (`pip install agdo[flash]`) or torch >= 2.11")
        note = "flash-attn" if flash_varlen_function() else "torch varlen_attn"
    adapter = case_adapter(case_name)
    measure(make_padded_step(adapter, route, mode, case), group=f"padded batch, {mode}: {case_name}", impl=route,
            baseline=route == "mask", rounds=5 if case["device"] == "cpu" else 10, note=note, layers=case["layers"],
            shape=shape_of(case))
