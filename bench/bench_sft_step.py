"""Cost of one AGDO-SFT optimizer step vs one random-masking SFT step with the same number of rows.

Both go through ``agdo.training.sft.SFTTrainer.step`` with a real (single-process) ``accelerate.Accelerator``:
rows, chunked forward/backward, clipping, ``optimizer.step()`` (AdamW) and ``zero_grad``:

- ``random`` (baseline): LLaDA-style random masks, ``K`` rows per sample, forward/backward;
- ``agdo``: the same plus the order forward (no-grad adapter forward capturing the last layer's
  ``S0``, ``Abar_RR`` and influence ``I``), the greedy order, and ``K`` order steps per sample
  (``max_steps_per_sample=K``), so both train on exactly ``K`` rows per sample.

The ratio agdo/random is the price of the attention-guided order at equal training compute: one extra
forward over the clean sequence (without grad) per batch, amortised over ``K`` forward/backward rows.

Cases: a tiny generic model on CPU (``agdo.tasks.build_tiny_model``); on a GPU (skipped without CUDA) a
random-init Dream-shaped Qwen2 in bf16 — hidden 3584, 28 heads / 4 KV heads, head dim 128, intermediate
18944, vocab 152064, bidirectional and shifted like Dream — with only 4 of Dream's 28 layers so that it
initialises quickly; sequence 1024 = prompt 256 + response 768, ``K = 39`` rows per sample (the paper's
~39 forward passes per sample), step size 16. With 28 layers the forward/backward grows ~7x while the
order forward grows by the same factor, so the ratio is roughly depth-independent.

Run: ``pytest bench/bench_sft_step.py`` (``--bench-report FILE`` for the Markdown table).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import agdo_kernels
from agdo.models import load_adapter
from agdo.training.sft import SFTConfig, SFTTrainer

CASES = {
    "cpu-tiny": dict(model="tiny", device="cpu", dtype=torch.float32, batch=2, prompt=16, response=32, stop_tail=8,
                     rows_per_sample=6, step_size=4, post_num=4, forward_batch_size=12, hidden=64, layers=2),
    # Dream-v0-Instruct-7B's shapes, 4 layers instead of 28.
    "cuda-dream-shaped-4l": dict(model="qwen2", device="cuda", dtype=torch.bfloat16, batch=1, prompt=256, response=768,
                                 stop_tail=32, rows_per_sample=39, step_size=16, post_num=16,
                                 forward_batch_size=4, layers=4, hidden=3584, heads=28, kv_heads=4,
                                 intermediate=18944, vocab=152064),
}
METHODS = ["random", "agdo"]


def _working_backend(device):
    """``auto`` when the fused kernels run here, else the torch reference."""
    q = torch.randn(1, 2, 8, 16, device=device)
    try:
        agdo_kernels.valid_attention(q, q, unmasked=torch.ones(1, 8, dtype=torch.bool, device=device))
        return "auto"
    except (ImportError, AttributeError, ValueError, RuntimeError):
        return "torch"


def _build_adapter(case):
    if case["model"] == "tiny":
        from agdo.tasks import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, hidden_size=case["hidden"], num_layers=case["layers"])
        adapter = load_adapter(model, tokenizer=tokenizer)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=case["vocab"], hidden_size=case["hidden"], intermediate_size=case["intermediate"],
            num_hidden_layers=case["layers"], num_attention_heads=case["heads"],
            num_key_value_heads=case["kv_heads"], head_dim=case["hidden"] // case["heads"],
            max_position_embeddings=4096, is_causal=False, diffusion_shift=True,
            mask_token_id=case["vocab"] - 1, pad_token_id=0, eos_token_id=0,
        )
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(case["dtype"])  # initialise directly in bf16 on the GPU
        try:
            with torch.device(case["device"]):
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
        adapter = load_adapter(model)
    adapter.kernel_backend = _working_backend(case["device"])
    return adapter


def _batch(adapter, case):
    """``[left pad | prompt | response | stop tokens]`` like ``collate_sft``; the last row left-padded."""
    gen = torch.Generator().manual_seed(0)
    B, P, R = case["batch"], case["prompt"], case["response"]
    special = {adapter.mask_token_id, *adapter.stop_token_ids}
    ordinary = torch.tensor([t for t in range(adapter.vocab_size) if t not in special][:4096])
    input_ids = ordinary[torch.randint(len(ordinary), (B, P + R), generator=gen)]
    input_ids[:, P + R - case["stop_tail"]:] = adapter.pad_token_id  # the response ends, then pads
    attention_mask = torch.ones(B, P + R, dtype=torch.bool)
    if B > 1:
        attention_mask[-1, : P // 4] = False
        input_ids[-1, : P // 4] = adapter.pad_token_id
    device = case["device"]
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "response_start": P,
            "index": torch.arange(B, device=device)}


def _config(method, case, output_dir):
    K = case["rows_per_sample"]
    return SFTConfig(output_dir=str(output_dir), method=method, step_size=case["step_size"], post_num=case["post_num"],
                     max_steps_per_sample=K, random_masks_per_sample=K,
                     forward_batch_size=case["forward_batch_size"], gamma=100.0, learning_rate=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_sft_step(measure, tmp_path, case_name, method):
    case = CASES[case_name]
    if case["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # A fresh accelerate state per case: the CPU case needs cpu=True even on a CUDA machine.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    adapter = _build_adapter(case)
    batch = _batch(adapter, case)
    trainer = SFTTrainer(_config(method, case, tmp_path), adapter, [None],
                         accelerator=Accelerator(cpu=case["device"] == "cpu"))
    expected_rows = case["batch"] * case["rows_per_sample"]

    def step():
        return trainer.step([batch], epoch=0)

    metrics = step()  # also checks both methods really train on the same number of rows
    assert metrics["rows"] == expected_rows, (method, metrics)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    measure(step, group=f"sft_step/{case_name}", impl=method, baseline=method == "random",
            rows=expected_rows, seq_len=case["prompt"] + case["response"], backend=adapter.kernel_backend,
            rounds=5 if case["device"] == "cpu" else 3)
