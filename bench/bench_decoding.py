"""Max-S decoding against Max-Prob decoding on the same model: what asking for S costs per generation.

Max-S needs the valid attention ``S`` of every token from the same forward pass (the adapter computes it
in the last layer with ``agdo_kernels.valid_attention``); Max-Prob needs logits only. Both decode the
same prompts with the same static schedule and without the EOS rule, so they run the same number of
forward passes and only the per-step cost differs.

- CPU: a tiny randomly initialised bidirectional Llama (hidden 64, 2 layers), float32.
- GPU (skipped without CUDA): a Dream-shaped random-init Qwen2 in bf16 (hidden 3584, 28 heads / 4 KV
  heads, head dim 128, vocab 152064, shifted) with ``GPU_LAYERS`` layers; target: Max-S <= 1.05x Max-Prob.

The models come from ``agdo.models.load_adapter``; the bench skips, saying why, where it cannot import.
"""

from __future__ import annotations

import pytest
import torch

from agdo.sampling import SamplerConfig, generate

ON_GPU = torch.cuda.is_available()
GPU_LAYERS = 28  # Dream-7B depth: the S overhead is one last-layer kernel, so it is judged against the full model


def _load_adapter():
    try:
        from agdo.models import load_adapter
    except ImportError as error:
        pytest.skip(f"agdo.models.load_adapter is not importable: {error}")
    return load_adapter


def _prompts(batch, length, vocab, device, padding=3):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab - 2, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :padding] = False  # one left-padded row, as in a real batch
    ids[~mask] = 0
    return ids.to(device), mask.to(device)


@pytest.fixture(scope="module")
def tiny_cpu():
    load_adapter = _load_adapter()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, mask_token_id=511, pad_token_id=0, eos_token_id=[1], is_causal=False,
    )
    adapter = load_adapter(LlamaForCausalLM(config).eval())
    return adapter, _prompts(4, 64, config.vocab_size, "cpu")


@pytest.fixture(scope="module")
def dream_shaped_gpu():
    if not ON_GPU:
        pytest.skip("needs a CUDA device")
    load_adapter = _load_adapter()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=GPU_LAYERS,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096, diffusion_shift=True,
        mask_token_id=151666, pad_token_id=151643, eos_token_id=[151643], is_causal=False,
    )
    with torch.device("cuda"):
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    adapter = load_adapter(model)
    return adapter, _prompts(4, 256, config.vocab_size, "cuda")


def _config(alg, gen_length, steps, block_length):
    return SamplerConfig(gen_length=gen_length, steps=steps, block_length=block_length, alg=alg, stop_at_eos=False)


@pytest.mark.parametrize("alg", ["max_prob", "max_s"])
def test_decoding_cpu(measure, tiny_cpu, alg):
    adapter, (ids, mask) = tiny_cpu
    config = _config(alg, gen_length=64, steps=32, block_length=32)
    measure(lambda: generate(adapter, ids, mask, config), group="decode cpu tiny-llama B=4 P=64 R=64 T=32",
            impl=alg, baseline=alg == "max_prob")


GPU_SHAPE = dict(gen_length=256, steps=64, block_length=32)


@pytest.mark.gpu
@pytest.mark.parametrize("alg", ["max_prob", "max_s"])
def test_decoding_gpu(measure, dream_shaped_gpu, alg):
    adapter, (ids, mask) = dream_shaped_gpu
    config = _config(alg, **GPU_SHAPE)
    measure(lambda: generate(adapter, ids, mask, config), group="decode gpu dream-shaped bf16 B=4 P=256 R=256 T=64",
            impl=alg, baseline=alg == "max_prob", rounds=3)
