"""A generated task where the decoding order matters, with its tokenizer and a tiny model to learn it.

Multi-digit addition ``a+b=`` → the sum, written most significant digit first and zero-padded to
``digits + 1`` characters. Each answer digit depends on the carries from the digits to its RIGHT, so
left-to-right decoding commits digits before the evidence exists, while an order that follows the
dependencies decodes right to left. Everything here is built offline: a character-level
``PreTrainedTokenizerFast`` and a small bidirectional Llama initialised from scratch.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[MASK]", "[EOS]"]
CHARACTERS = list("0123456789+=")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ``[PAD]``, ``[MASK]`` and ``[EOS]`` as special tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", mask_token="[MASK]", eos_token="[EOS]")


def addition_problems(count: int, *, digits: int, seed: int, exclude=frozenset()) -> list[dict]:
    """``count`` distinct problems ``{prompt, response, answer}``, none of them in ``exclude`` (prompts)."""
    rng = random.Random(seed)
    low, high = 10 ** (digits - 1), 10**digits - 1
    if count > (high - low + 1) ** 2 - len(exclude):
        raise ValueError(f"cannot draw {count} distinct {digits}-digit problems")
    problems, seen = [], set(exclude)
    while len(problems) < count:
        a, b = rng.randint(low, high), rng.randint(low, high)
        prompt = f"{a}+{b}="
        if prompt in seen:
            continue
        seen.add(prompt)
        answer = str(a + b).zfill(digits + 1)
        problems.append({"prompt": prompt, "response": answer, "answer": answer})
    return problems


def build_tiny_model(tokenizer, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                     num_kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A small bidirectional Llama (GQA 2:1) with random weights; ids come from the tokenizer."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        mask_token_id=tokenizer.mask_token_id,
        is_causal=False,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)
