"""Rewards for RL post-training, all with one TRL-style signature::

    reward(completions: list[str], **fields) -> list[float]

``fields`` are the per-sample dataset columns the reward needs, each a list aligned with ``completions``
(unknown columns are ignored, so a trainer can pass every column of its batch):

* ``math``      - ``answer`` (gold): 1.0 if the last ``\\boxed{}`` matches it under math-verify.
* ``countdown`` - ``numbers``, ``target``: 1.0 if the final ``<answer>`` equation solves the task.
* ``sudoku``    - ``puzzle``, ``size``: 1.0 if the final ``<answer>`` grid solves the puzzle.
* ``code``      - ``prompt``, ``test``, ``entry_point`` (HumanEval format): fraction of tests passed.
* ``exact``     - ``answer``: 1.0 if the stripped completion equals it (generated tasks).
"""

from __future__ import annotations

from collections.abc import Callable

from agdo.rewards.code import SandboxLimits, code_reward, run_tests_in_sandbox, split_humaneval_tests
from agdo.rewards.exact import exact_reward
from agdo.rewards.math import MathVerifier, gsm8k_gold, last_boxed, math_reward
from agdo.rewards.puzzles import (
    check_countdown,
    check_sudoku,
    countdown_reward,
    generate_countdown,
    generate_sudoku,
    sudoku_reward,
)

RewardFunction = Callable[..., list[float]]

REWARDS: dict[str, RewardFunction] = {
    "math": math_reward,
    "countdown": countdown_reward,
    "sudoku": sudoku_reward,
    "code": code_reward,
    "exact": exact_reward,
}


def get_reward(name: str) -> RewardFunction:
    """The reward function registered as ``name``."""
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}") from None


__all__ = [
    "REWARDS",
    "MathVerifier",
    "RewardFunction",
    "SandboxLimits",
    "check_countdown",
    "check_sudoku",
    "code_reward",
    "countdown_reward",
    "exact_reward",
    "generate_countdown",
    "generate_sudoku",
    "get_reward",
    "gsm8k_gold",
    "last_boxed",
    "math_reward",
    "run_tests_in_sandbox",
    "split_humaneval_tests",
    "sudoku_reward",
]
