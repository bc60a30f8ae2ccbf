"""Decoding speed: the block KV cache (none / prefix / dual) and Max-S against Max-Prob, in tokens per second.

Every case decodes the same prompts (64 tokens; in batches, row 0 left-padded) with block 32, a static
linear schedule of 4 steps per block (8 tokens per step) and no EOS rule, so the arms of a group run the
same number of forward passes; only the cost of a pass differs: the whole sequence (``none``, and the
first step of every block with a cache), the block and what follows it (``prefix``), or the block alone
(``dual``), or the block and the next block (``prefix+32``: ``cache_lookahead=32``). Groups are one
response length and batch ("one" sequence, "many" = 4); the baseline is ``none`` with Max-Prob. The note
gives tokens/s (batch x response length / median time), ms per sequence and the positions the model
computed per sequence (summed over its calls, counted by a hook): what a cache saves, whatever the device;
and the rows the LM head computed per sequence (a step needs the logits of the block it decodes only).

- CPU (every run): a tiny randomly initialised bidirectional Llama (hidden 64, 2 layers), float32.
- GPU (skipped without CUDA): a Dream-shaped random-init Qwen2 in bf16 (hidden 3584, 28 heads / 4 KV
  heads, head dim 128, vocab 152064, shifted, all 28 layers). Targets: ``prefix`` >= 3x faster than
  ``none`` at 1,024 tokens; Max-S <= 1.05x Max-Prob with the same cache and length.

The models come from ``agdo.models.load_adapter``; the bench skips, saying why, where it cannot import.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from agdo.sampling import SamplerConfig, generate

ON_GPU = torch.cuda.is_available()
GPU_LAYERS = 28  # Dream-7B depth: the S overhead is one last-layer kernel, so it is judged against the full model
PROMPT_LENGTH, BLOCK, STEPS_PER_BLOCK, MANY = 64, 32, 4, 4


def _cases(one_lengths, many_lengths, max_s_one):
    """``(gen_length, batch, cache, alg)``: every cache with Max-Prob for one sequence at ``one_lengths`` (and
    the prefix cache with a lookahead window of one block, "prefix+32") and for many at ``many_lengths``;
    Max-S for many, and for one at ``max_s_one``."""
    caches = ("none", "prefix", "dual")
    cases = [(length, 1, cache, "max_prob") for length in one_lengths for cache in caches + (f"prefix+{BLOCK}",)]
    cases += [(length, 1, cache, "max_s") for length in max_s_one for cache in caches]
    cases += [(length, MANY, cache, alg) for length in many_lengths for cache in caches for alg in ("max_prob", "max_s")]
    return cases


# Timed CPU runs take the whole grid: 256/512/1,024 tokens, one and many sequences, Max-Prob and Max-S.
CPU_CASES = _cases(one_lengths=(256, 512, 1024), many_lengths=(256, 512, 1024), max_s_one=(256, 512, 1024))
# CI runs the benchmarks once each (--benchmark-disable, a smoke test): of the CPU grid only 256 tokens, and
# 1,024 for one sequence with Max-Prob so that the positions each cache computes at the GPU target's length
# are counted every run (28 s on 2 cores); the rest is skipped there.
CPU_SMOKE_CASES = _cases(one_lengths=(256, 1024), many_lengths=(256,), max_s_one=())
# 4 decodes per case (warm-up, peak memory, warm-up round, timed round), cut to what one device call holds:
# from ~61 ms per uncached step of the 28-layer model at B=4, 512 tokens on an H200, ~150 s in all (not yet
# measured). run_gpu.sh runs the 1,024-token cases (the targets' length) first.
GPU_CASES = _cases(one_lengths=(256, 512, 1024), many_lengths=(256, 512), max_s_one=(1024,))


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
        num_key_value_heads=4, max_position_embeddings=2048, mask_token_id=511, pad_token_id=0, eos_token_id=[1],
        is_causal=False,
    )
    adapter = load_adapter(LlamaForCausalLM(config).eval())
    return adapter, _prompts(MANY, PROMPT_LENGTH, config.vocab_size, "cpu")


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
    return adapter, _prompts(MANY, PROMPT_LENGTH, config.vocab_size, "cuda")


def _decode(measure, model_and_prompts, case, device: str, rounds: int):
    adapter, (ids, mask) = model_and_prompts
    gen_length, batch, cache, alg = case
    ids, mask = ids[-batch:], mask[-batch:]  # one sequence: an unpadded row
    mode, _, lookahead = cache.partition("+")
    config = SamplerConfig(gen_length=gen_length, steps=STEPS_PER_BLOCK * gen_length // BLOCK, block_length=BLOCK,
                           alg=alg, cache=mode, cache_lookahead=int(lookahead) if lookahead else None,
                           stop_at_eos=False)
    seconds, forwarded, head_rows = [], [], []

    def count_positions(module, args, kwargs):  # every model call, cached or not: the positions it computes
        ids_in = kwargs.get("input_ids", args[0] if args else None)
        shape = ids_in.shape if ids_in is not None else kwargs["inputs_embeds"].shape[:2]
        forwarded[-1] += shape[0] * shape[1]

    def count_head_rows(module, args, output):  # the rows the LM head computes logits for
        head_rows[-1] += output.shape[0] * output.shape[1]

    def decode():
        forwarded.append(0)
        head_rows.append(0)
        hooks = [adapter.model.register_forward_pre_hook(count_positions, with_kwargs=True),
                 adapter.model.get_output_embeddings().register_forward_hook(count_head_rows)]
        start = time.perf_counter()
        try:
            generate(adapter, ids, mask, config)
            if ids.is_cuda:
                torch.cuda.synchronize()
        finally:
            for hook in hooks:
                hook.remove()
        seconds.append(time.perf_counter() - start)

    def note():
        median = statistics.median(seconds[-rounds:])  # the timed rounds come last
        return (f"{batch * gen_length / median:,.0f} tok/s, {1e3 * median / batch:,.0f} ms/seq, "
                f"{forwarded[-1] / batch:,.0f} positions computed/seq, {head_rows[-1] / batch:,.0f} LM-head rows/seq")

    label = "one" if batch == 1 else f"many (B={batch})"
    measure(decode, group=f"decode {device} R={gen_length} {label} P={PROMPT_LENGTH} block={BLOCK} "
                          f"{STEPS_PER_BLOCK} steps/block", impl=f"{cache} {alg}",
            baseline=(cache, alg) == ("none", "max_prob"), rounds=rounds, note=note)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda case: "-".join(map(str, case)))
def test_decoding_cpu(measure, benchmark, tiny_cpu, case):
    if benchmark.disabled and case not in CPU_SMOKE_CASES:
        pytest.skip("timed runs only: the smoke run (--benchmark-disable) takes CPU_SMOKE_CASES")
    _decode(measure, tiny_cpu, case, "cpu tiny-llama", rounds=3)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: "-".join(map(str, case)))
def test_decoding_gpu(measure, dream_shaped_gpu, case):
    _decode(measure, dream_shaped_gpu, case, "gpu dream-shaped bf16", rounds=1)
