"""A generated task where the decoding order matters, with its tokenizer and a tiny model to learn it.

Multi-digit addition ``a+b=`` → the sum, written most significant digit first and zero-padded to
``digits + 1`` characters. Each answer digit depends on the carries from the digits to its RIGHT, so
left-to-right decoding commits digits before the evidence exists, while an order that follows the
dependencies decodes right to left. Everything here is built offline: a character-level
``PreTrainedTokenizerFast`` and a small bidirectional Llama initialised from scratch.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[MASK]", "[EOS]"]
CHARACTERS = list("0123456789+=")


class CharTokenizer(PreTrainedTokenizerFast):
    """The character tokenizer of :func:`build_tokenizer`: text with a character outside the vocabulary is
    a ``ValueError`` naming the character, never silently mapped to ``[PAD]``.

    The check runs on every encoding path (``tokenizer(text)``, ``encode``, ``tokenize``,
    ``apply_chat_template(tokenize=True)``); special tokens written in the text (``[MASK]``) are allowed.
    ``save_pretrained`` writes a plain ``PreTrainedTokenizerFast`` config, so a saved checkpoint reloads
    with ``AutoTokenizer.from_pretrained`` everywhere; the reloaded tokenizer is a plain
    ``PreTrainedTokenizerFast`` WITHOUT this check (its WordLevel model still maps unknown characters to
    ``[PAD]``): wrap it with :func:`as_char_tokenizer` to get the check back.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._known = frozenset(token for token in self.backend_tokenizer.get_vocab(with_added_tokens=False)
                                if len(token) == 1)

    def check_text(self, text: str) -> None:
        """Raise ``ValueError`` naming the first character of ``text`` that is not in the vocabulary."""
        specials = sorted((t for t in self.get_added_vocab() if t), key=len, reverse=True)
        rest = re.sub("|".join(map(re.escape, specials)), "", text) if specials else text
        for char in rest:
            if char not in self._known:
                position = text.find(char)
                raise ValueError(
                    f"character {char!r} (U+{ord(char):04X}) at index {position} of the text {text[:80]!r} is not "
                    f"in the tokenizer's vocabulary {''.join(sorted(self._known))!r} (plus special tokens "
                    f"{specials})"
                )

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        for value in (text, text_pair):
            for piece in _strings(value):
                self.check_text(piece)
        return super()._encode_plus(text, text_pair, *args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        files = super().save_pretrained(*args, **kwargs)
        # Reload as the plain class (this subclass is not registered with transformers' Auto classes).
        for name in files:
            if Path(name).name == "tokenizer_config.json":
                config = json.loads(Path(name).read_text())
                config["tokenizer_class"] = PreTrainedTokenizerFast.__name__  # what the base class writes
                Path(name).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return files


def _strings(value) -> list[str]:
    """Every string in a tokenizer input (a str, a batch of str, pre-tokenized lists, pairs)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [piece for item in value for piece in _strings(item)]
    return []


def as_char_tokenizer(tokenizer: PreTrainedTokenizerFast) -> CharTokenizer:
    """``tokenizer`` (e.g. reloaded from a checkpoint) as a :class:`CharTokenizer`, which checks characters."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer
    wrapped = CharTokenizer(tokenizer_object=tokenizer.backend_tokenizer, pad_token=tokenizer.pad_token,
                            mask_token=tokenizer.mask_token, eos_token=tokenizer.eos_token)
    wrapped.chat_template = getattr(tokenizer, "chat_template", None)
    return wrapped


def build_tokenizer() -> CharTokenizer:
    """One token per character; ``[PAD]``, ``[MASK]`` and ``[EOS]`` as special tokens.

    Encoding text with a character outside ``0123456789+=`` raises ``ValueError`` (see
    :class:`CharTokenizer`, also for what a checkpoint reloaded from disk gives).
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return CharTokenizer(tokenizer_object=tokenizer, pad_token="[PAD]", mask_token="[MASK]", eos_token="[EOS]")


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


def sudoku_problems(count: int, *, blanks: int, seed: int, exclude=frozenset()) -> list[dict]:
    """``count`` distinct 4x4 Sudoku problems ``{prompt, response, answer}`` (none of them in ``exclude``), in
    the compact digits-only format of this tokenizer: the prompt is the 16-digit puzzle (row-major, ``0`` for a
    blank) then ``=``, the response the 16-digit solution. Every puzzle has a unique solution
    (:func:`agdo.rewards.puzzles.generate_sudoku`), so an exact match is the right reward."""
    from .rewards.puzzles import generate_sudoku

    problems, seen, batch = [], set(exclude), 0
    while len(problems) < count:
        if batch > 100:
            raise ValueError(f"cannot draw {count} distinct 4x4 Sudoku problems with {blanks} blanks")
        for task in generate_sudoku(count, size=4, blanks=blanks, seed=seed * 1_000 + batch):
            prompt = f"{task['puzzle']}="
            if prompt in seen or len(problems) == count:
                continue
            seen.add(prompt)
            problems.append({"prompt": prompt, "response": task["solution"], "answer": task["solution"]})
        batch += 1
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
