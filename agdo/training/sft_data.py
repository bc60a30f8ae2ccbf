"""SFT examples → token ids with the model's chat template → left-padded batches.

The prompt is rendered with the tokenizer's own chat template (Dream's and LLaDA's checkpoints ship
one) and a generation prompt; the response is what the template adds for the assistant turn (its
end-of-turn marker included) followed by EOS. Tokenizers without a chat template (tiny test tokenizers,
base models) use the plain texts. Nothing is truncated: an example over the length limits is an error
that names it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset


def chat_token_ids(tokenizer, messages, *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template (a plain list in every
    transformers version: 5.x returns a BatchEncoding unless ``return_dict=False``)."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                              return_dict=False))


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_ids = chat_token_ids(tokenizer, user, add_generation_prompt=True)
        full = chat_token_ids(tokenizer, user + [{"role": "assistant", "content": response}])
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template renders the prompt differently with and without the answer")
        response_ids = full[len(prompt_ids) :]
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not response_ids or response_ids[-1] != tokenizer.eos_token_id):
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


class SFTDataset(Dataset):
    """Pre-tokenised ``(prompt_ids, response_ids)`` pairs; items carry their index (it keys randomness)."""

    def __init__(self, pairs: Sequence[tuple[list[int], list[int]]]):
        self.pairs = list(pairs)

    @classmethod
    def from_records(cls, records, tokenizer, max_prompt_length: int, max_response_length: int) -> "SFTDataset":
        pairs = []
        for i, record in enumerate(records):
            prompt_ids, response_ids = encode_example(tokenizer, record["prompt"], record["response"])
            if len(prompt_ids) > max_prompt_length or len(response_ids) > max_response_length:
                raise ValueError(
                    f"example {i}: prompt has {len(prompt_ids)} tokens (max_prompt_length={max_prompt_length}), "
                    f"response {len(response_ids)} (max_response_length={max_response_length}); raise the limits "
                    f"or filter the data — nothing is truncated silently"
                )
            pairs.append((prompt_ids, response_ids))
        return cls(pairs)

    @classmethod
    def from_jsonl(cls, path, tokenizer, max_prompt_length: int, max_response_length: int) -> "SFTDataset":
        from ..data import read_sft_jsonl

        return cls.from_records(read_sft_jsonl(path), tokenizer, max_prompt_length, max_response_length)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        prompt_ids, response_ids = self.pairs[index]
        return {"index": index, "prompt_ids": prompt_ids, "response_ids": response_ids}


def collate_sft(items: Sequence[dict], *, pad_token_id: int, post_num: int) -> dict:
    """``[left pad | prompt | response | right pad]``; the response region has room for ``post_num`` pads.

    Left pads are padding (``attention_mask`` False); right pads are stop tokens the model attends to and
    learns to emit (the first ``post_num`` of them are trained).
    """
    P = max(len(item["prompt_ids"]) for item in items)
    R = max(len(item["response_ids"]) for item in items) + post_num
    input_ids = torch.full((len(items), P + R), pad_token_id, dtype=torch.long)
    attention_mask = torch.ones((len(items), P + R), dtype=torch.bool)
    for b, item in enumerate(items):
        prompt, response = item["prompt_ids"], item["response_ids"]
        input_ids[b, P - len(prompt) : P] = torch.tensor(prompt, dtype=torch.long)
        input_ids[b, P : P + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[b, : P - len(prompt)] = False
    index = torch.tensor([item["index"] for item in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_start": P, "index": index}
