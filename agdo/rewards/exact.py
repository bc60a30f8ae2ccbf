"""Exact match: for generated tasks whose answer is a fixed string (the quickstart's addition).

Also the argument checks every reward shares: a malformed task (a gold answer that is ``None`` or empty, a
column of the wrong length) raises ``TypeError``/``ValueError`` naming the reward, the field and the sample
index, instead of being graded (``str(None) == "None"`` would otherwise match the completion ``"None"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def check_columns(reward: str, completions, **columns) -> None:
    """``completions`` must be a list of strings and every column a list with one entry per completion."""
    if isinstance(completions, (str, bytes, Mapping)) or not hasattr(completions, "__len__"):
        raise TypeError(f"{reward}: `completions` must be a list of strings, got {type(completions).__name__}")
    for index, completion in enumerate(completions):
        if not isinstance(completion, str):
            raise TypeError(f"{reward}: completions[{index}] must be a string, got {type(completion).__name__}")
    for name, column in columns.items():
        if isinstance(column, (str, bytes, Mapping)) or not hasattr(column, "__len__"):
            raise TypeError(
                f"{reward}: `{name}` must be a list with one entry per completion, got {type(column).__name__}"
            )
        if len(column) != len(completions):
            raise ValueError(f"{reward}: `{name}` has {len(column)} entries for {len(completions)} completions")


def gold_text(reward: str, field: str, index: int, value) -> str:
    """A gold answer as text: a non-empty string, or an int/finite float (``None``, bools, others raise)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"{reward}: {field}[{index}] must be a non-empty string, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{reward}: {field}[{index}] must be a non-empty string, got {value!r}")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{reward}: {field}[{index}] is empty: a task needs a gold answer")
    return text


def exact_reward(completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, equals the gold ``answer``.

    Raises ``TypeError``/``ValueError`` naming ``answer[i]`` when a gold answer is missing (``None``),
    empty, or not text/number, and when the columns do not line up with ``completions``.
    """
    check_columns("exact_reward", completions, answer=answer)
    golds = [gold_text("exact_reward", "answer", index, gold).strip() for index, gold in enumerate(answer)]
    return [float(completion.strip() == gold) for completion, gold in zip(completions, golds, strict=True)]
