"""Rewards: math (math-verify in a child with our deadline), Countdown/Sudoku checkers (the code sandbox: test_code_sandbox.py)."""

from __future__ import annotations

import time

import pytest

from agdo.rewards import (
    check_countdown,
    check_sudoku,
    generate_countdown,
    generate_sudoku,
    get_reward,
    gsm8k_gold,
    last_boxed,
    math_reward,
)
from agdo.rewards.math import MathVerifier

pytest.importorskip("math_verify")


@pytest.fixture(scope="module")
def verifier():
    checker = MathVerifier(timeout=10.0)
    yield checker
    checker.close()


# ----------------------------------------------------------------------------------------------- math


def test_last_boxed_balances_braces_and_skips_unclosed_box():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\boxed{3} and a truncated \boxed{\frac{1") == "3"
    assert last_boxed("no box here") is None


def test_gsm8k_gold_takes_text_after_last_marker_without_commas():
    assert gsm8k_gold("She pays 2 * 500 = <<2*500=1000>>1000.\n#### 1,000") == "1000"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no final answer line")


def test_math_reward_equivalent_forms_wrong_answers_and_missing_box(verifier):
    completions = [
        r"So the answer is \boxed{0.5}.",
        r"\boxed{\dfrac{2}{4}}",
        r"\boxed{\frac{1}{3}}",
        "The answer is 1/2 but not boxed.",
        r"\boxed{1,000}",
        r"\boxed{27}",
    ]
    gold = [r"\frac{1}{2}", r"\frac{1}{2}", r"\frac{1}{2}", r"\frac{1}{2}", "1000", "27.0"]
    assert math_reward(completions, answer=gold, verifier=verifier) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_pathological_expression_hits_our_timeout_and_scores_zero():
    checker = MathVerifier(timeout=1.0)
    try:
        started = time.monotonic()
        # SymPy tries to evaluate the power tower exactly: a single C-level computation no signal interrupts.
        assert math_reward([r"\boxed{9^{9^{9^{9}}}}"], answer=["5"], verifier=checker) == [0.0]
        assert time.monotonic() - started < 5.0
        # The killed child is replaced transparently.
        assert math_reward([r"\boxed{5}"], answer=["5"], verifier=checker) == [1.0]
    finally:
        checker.close()


# ----------------------------------------------------------------------------------------------- puzzles


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>(3 + 5) * 2</answer>", True),
        ("reasoning... <answer>2 * (5 + 3) = 16</answer>", True),
        ("<answer>(3 + 5) * 2 = 17</answer>", False),  # claimed value is wrong
        ("<answer>3 * 5 + 2</answer>", False),  # wrong value
        ("<answer>(3 + 5) * 2 * 1</answer>", False),  # 1 is not given
        ("<answer>(3 + 3) * 2</answer>", False),  # 3 used twice, 5 unused
        ("<answer>16</answer>", False),
        ("<answer>(3 + 5) ** 2</answer>", False),
        ("<answer>-3 + 5 * 2 + 9</answer>", False),
        ("<answer>__import__('os').system('true')</answer>", False),
        ("<answer>(lambda: 16)()</answer>", False),
        ("<answer>" + "(" * 150 + "3" + ")" * 150 + "</answer>", False),
        ("(3 + 5) * 2 without tags", False),
    ],
)
def test_countdown_checker(completion, expected):
    assert check_countdown(completion, numbers=[3, 5, 2], target=16) is expected


def test_countdown_division_is_exact():
    assert check_countdown("<answer>(8 / 3) * 3</answer>", numbers=[8, 3, 3], target=8)
    assert not check_countdown("<answer>8 / (3 - 3)</answer>", numbers=[8, 3, 3], target=8)


def test_countdown_generator_is_seeded_and_solvable():
    tasks = generate_countdown(20, seed=7)
    assert tasks == generate_countdown(20, seed=7)
    assert tasks != generate_countdown(20, seed=8)
    for task in tasks:
        assert str(task["target"]) in task["prompt"]
        assert check_countdown(f"<answer>{task['solution']}</answer>", task["numbers"], task["target"])


SOLVED_4X4 = "1234341221434321"


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("1234\n3412\n2143\n4321", True),
        ("1 2 3 4 | 3 4 1 2 | 2 1 4 3 | 4 3 2 1", True),
        ("1234\n3412\n2143\n4312", False),  # columns repeat
        ("1234\n2341\n3412\n4123", False),  # rows and columns fine, 2x2 boxes not
        ("1234\n3412\n2143", False),  # too few cells
        ("__import__('os')", False),
    ],
)
def test_sudoku_checker_4x4(answer, expected):
    puzzle = "1030040020004300"
    assert check_sudoku(f"<answer>{answer}</answer>", puzzle, 4) is expected


def test_sudoku_checker_rejects_changed_givens():
    # A valid grid, but the puzzle fixed cell 0 to 2.
    assert not check_sudoku(f"<answer>{SOLVED_4X4}</answer>", "2000000000000000", 4)


def test_sudoku_generator_unique_and_checkable():
    for size in (4, 9):
        tasks = generate_sudoku(2, size=size, seed=3)
        assert tasks == generate_sudoku(2, size=size, seed=3)
        for task in tasks:
            assert len(task["puzzle"]) == size * size and task["puzzle"].count("0") > 0
            assert check_sudoku(f"<answer>{task['solution']}</answer>", task["puzzle"], size)
            assert not check_sudoku(f"<answer>{task['puzzle']}</answer>", task["puzzle"], size)


def test_registry():
    assert get_reward("countdown")(["<answer>1 + 2</answer>"], numbers=[[1, 2]], target=[3], unused=[None]) == [1.0]
    with pytest.raises(KeyError, match="available"):
        get_reward("nope")
