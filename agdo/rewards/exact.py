"""Exact match: for generated tasks whose answer is a fixed string (the quickstart's addition)."""

from __future__ import annotations


def exact_reward(completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, equals the gold ``answer``."""
    return [float(completion.strip() == str(gold).strip()) for completion, gold in zip(completions, answer, strict=True)]
