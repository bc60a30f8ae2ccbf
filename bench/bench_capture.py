"""Cost of capturing last-layer statistics: one adapter forward with ``S`` vs the alternatives.

Variants, same model and batch:

- ``sdpa``: ``adapter.forward`` with nothing asked (every layer SDPA) — the baseline;
- ``capture``: ``adapter.forward(unmasked=U)`` — last layer through ``valid_attention(return_output=True)``;
- ``eager_attentions``: the model switched to eager with ``output_attentions=True``, ``S`` from the returned
  last-layer probabilities (what one would do without the adapter).

Time and peak memory come from the ``measure`` fixture (bench/conftest.py). Cases: a tiny model on
CPU, and on a GPU (skipped without one) a Dream-shaped bf16 model: the real last-layer shape (H=28,
Hkv=4, d=128, hidden 3584, vocab 152064) with few layers, so that random init is quick. Capture costs
one layer's attention statistics whatever the depth, so its share of a 28-layer forward is roughly
``layers / 28`` of the share measured here. Target: capture within 5% of ``sdpa``.

Run: ``pytest bench/bench_capture.py``.
"""

from contextlib import contextmanager

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import agdo_kernels
from agdo.models import load_adapter

VARIANTS = ["sdpa", "capture", "eager_attentions"]

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


_ADAPTERS = {}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_capture_overhead(measure, case_name, variant):
    case = CASES[case_name]
    if case["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if case_name not in _ADAPTERS:
        _ADAPTERS.clear()  # one model alive at a time
        _ADAPTERS[case_name] = build_adapter(case)
    adapter = _ADAPTERS[case_name]
    step = make_step(adapter, variant, case)
    with torch.no_grad():
        measure(step, group=f"capture: {case_name}", impl=variant, baseline=variant == "sdpa",
                rounds=5 if case["device"] == "cpu" else 10, kernel_backend=adapter.kernel_backend,
                layers=case["layers"],
                shape=f"B={case['batch']} N={case['length']} H={case['heads']} Hkv={case['kv_heads']}")
