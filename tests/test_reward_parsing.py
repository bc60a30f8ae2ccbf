"""Answer extraction on adversarial text (linear time) and malformed tasks (errors, never a reward).

The adversarial inputs are 100 KB - 1 MB: the former quadratic extractors (each unclosed ``\\boxed{`` or
``<answer>`` rescanning to the end) would take minutes to hours on them, the linear ones milliseconds, so
just running them is the check. No timing assertions. None of these tests needs math-verify: the math
reward gets a stub verifier.
"""

from __future__ import annotations

import random
import re

import pytest

from agdo.rewards import (
    check_countdown,
    check_sudoku,
    countdown_reward,
    exact_reward,
    last_boxed,
    math_reward,
    sudoku_reward,
)
from agdo.rewards.puzzles import final_answer, parse_grid

SOLVED_4X4 = "1234341221434321"
PUZZLE_4X4 = "1034300221404300"


class StubVerifier:
    """Plain string equality; counts the checks (to show malformed tasks fail before any check)."""

    def __init__(self):
        self.calls = 0

    def equivalent(self, gold: str, answer: str) -> bool:
        self.calls += 1
        return gold.strip() == answer.strip()


def naive_last_boxed(text: str):
    """The former (quadratic) definition: the last box start whose braces close, scanning from it."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, content = 1, start + len("\\boxed{")
        for position in range(content, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                return text[content:position]
        start = text.rfind("\\boxed{", 0, start)
    return None


def naive_final_answer(text: str):
    blocks = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return blocks[-1].strip() if blocks else None


# ----------------------------------------------------------------------------------------------- extraction


def test_last_boxed_matches_the_naive_definition_on_random_text():
    rng = random.Random(0)
    pieces = ["\\boxed{", "{", "}", "x", "\\{", "\\boxed"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert last_boxed(text) == naive_last_boxed(text), text


def test_last_boxed_examples():
    assert last_boxed(r"\boxed{\boxed{1}}") == "1"  # the last box to start
    assert last_boxed(r"\boxed{x \boxed{y} z") == "y"  # the outer one never closes
    assert last_boxed(r"}} \boxed{a} }") == "a"
    assert last_boxed(r"\boxed{}") == ""


def test_last_boxed_on_adversarial_text_is_linear():
    opened = "\\boxed{" * 50_000  # 350 KB of unclosed boxes
    assert last_boxed(opened) is None
    assert last_boxed("\\boxed{42} " + "\\boxed{" * 150_000) == "42"  # 1 MB
    nested = "\\boxed{" + "{" * 300_000 + "}" * 300_000 + "}"
    assert last_boxed(nested) == "{" * 300_000 + "}" * 300_000


def test_math_reward_on_adversarial_completions():
    verifier = StubVerifier()
    completions = ["\\boxed{" * 100_000, "\\boxed{7}" + "\\boxed{" * 100_000, "{" * 500_000 + "\\boxed{7}"]
    assert math_reward(completions, answer=["7", "7", "7"], verifier=verifier) == [0.0, 1.0, 1.0]
    assert verifier.calls == 2  # no box: no check


def test_final_answer_matches_the_regex_on_random_text():
    rng = random.Random(1)
    pieces = ["<answer>", "</answer>", "a", " ", "<", "answer>", "</", "\n"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert final_answer(text) == naive_final_answer(text), text


def test_final_answer_on_adversarial_text_is_linear():
    assert final_answer("<answer>" * 100_000) is None  # 800 KB of unclosed tags
    assert final_answer("<answer>1 + 2</answer>" + "<answer>" * 100_000) == "1 + 2"
    assert final_answer("<answer>" * 100_000 + "x</answer>") == "<answer>" * 99_999 + "x"
    assert final_answer("</answer>" * 100_000 + "<answer>5</answer>") == "5"


def test_countdown_on_adversarial_completions():
    tail = "<answer>" * 100_000
    assert check_countdown("<answer>1 + 2</answer>" + tail, [1, 2], 3)
    assert countdown_reward([tail, "<answer>(" * 100_000 + "</answer>"], numbers=[[1, 2], [1, 2]], target=[3, 3]) == [
        0.0,
        0.0,
    ]


def test_sudoku_on_adversarial_completions():
    huge_grid = "<answer>" + "1" * 1_000_000 + "</answer>"
    assert parse_grid("1" * 1_000_000, 4) is None
    assert sudoku_reward(
        [huge_grid, "<answer>" * 100_000, f"<answer>{SOLVED_4X4}</answer>" + "<answer>" * 100_000],
        puzzle=[PUZZLE_4X4] * 3,
        size=[4] * 3,
    ) == [0.0, 0.0, 1.0]


# ----------------------------------------------------------------------------------------------- malformed tasks
# Each case below scored 1.0 (or silently 0.0) before: e.g. str(None) == "None", size 0 has no units to
# violate, 1.0 == 1 and True == 1 make floats and bools pass as Countdown numbers.


@pytest.mark.parametrize(
    "completion, gold, error, message",
    [
        ("None", None, TypeError, r"exact_reward: answer\[1\] must be a non-empty string, got NoneType"),
        ("", "", ValueError, r"exact_reward: answer\[1\] is empty"),
        ("  ", " ", ValueError, r"exact_reward: answer\[1\] is empty"),
        ("True", True, TypeError, r"exact_reward: answer\[1\] must be a non-empty string, got bool"),
        ("[1]", [1], TypeError, r"exact_reward: answer\[1\]"),
    ],
)
def test_exact_reward_malformed_answer(completion, gold, error, message):
    with pytest.raises(error, match=message):
        exact_reward(["12", completion], answer=["12", gold])


def test_exact_reward_still_grades_and_checks_columns():
    assert exact_reward([" 046 ", "12"], answer=["046", 13]) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"`answer` has 1 entries for 2 completions"):
        exact_reward(["1", "2"], answer=["1"])
    with pytest.raises(TypeError, match=r"completions\[0\] must be a string"):
        exact_reward([None], answer=["1"])
    with pytest.raises(TypeError, match=r"`answer` must be a list"):
        exact_reward(["1"], answer="1")


@pytest.mark.parametrize(
    "gold, error, message",
    [
        (None, TypeError, r"math_reward: answer\[1\] must be a non-empty string, got NoneType"),
        ("", ValueError, r"math_reward: answer\[1\] is empty"),
        ("   ", ValueError, r"math_reward: answer\[1\] is empty"),
        (float("nan"), ValueError, r"math_reward: answer\[1\]"),
        ({"value": 1}, TypeError, r"math_reward: answer\[1\]"),
    ],
)
def test_math_reward_malformed_gold_raises_before_any_check(gold, error, message):
    verifier = StubVerifier()
    with pytest.raises(error, match=message):
        math_reward([r"\boxed{1}", r"\boxed{None}"], answer=["1", gold], verifier=verifier)
    assert verifier.calls == 0


def test_math_reward_numeric_gold_is_text():
    assert math_reward([r"\boxed{27}"], answer=[27], verifier=StubVerifier()) == [1.0]


@pytest.mark.parametrize(
    "completion, puzzle, size, error, message",
    [
        ("<answer></answer>", "", 0, ValueError, r"sudoku: size\[1\] must be one of \(4, 9\), got 0"),
        ("<answer>1</answer>", "0", 1, ValueError, r"sudoku: size\[1\] must be one of"),
        (f"<answer>{SOLVED_4X4}</answer>", PUZZLE_4X4, "4", TypeError, r"sudoku: size\[1\] must be an int"),
        (f"<answer>{SOLVED_4X4}</answer>", PUZZLE_4X4, 4.0, TypeError, r"sudoku: size\[1\] must be an int"),
        (f"<answer>{SOLVED_4X4}</answer>", PUZZLE_4X4, True, TypeError, r"sudoku: size\[1\] must be an int"),
        (f"<answer>{SOLVED_4X4}</answer>", PUZZLE_4X4[:-1], 4, ValueError, r"sudoku: puzzle\[1\] must hold 16 cells"),
        (f"<answer>{SOLVED_4X4}</answer>", PUZZLE_4X4 + "0", 4, ValueError, r"sudoku: puzzle\[1\] must hold 16 cells"),
        (f"<answer>{SOLVED_4X4}</answer>", "5" + PUZZLE_4X4[1:], 4, ValueError, r"sudoku: puzzle\[1\] has the digit 5"),
        (f"<answer>{SOLVED_4X4}</answer>", None, 4, TypeError, r"sudoku: puzzle\[1\] must be a string"),
    ],
)
def test_sudoku_malformed_task(completion, puzzle, size, error, message):
    good = f"<answer>{SOLVED_4X4}</answer>"
    with pytest.raises(error, match=message):
        sudoku_reward([good, completion], puzzle=[PUZZLE_4X4, puzzle], size=[4, size])
    with pytest.raises(error, match=message.replace(r"\[1\]", "")):
        check_sudoku(completion, puzzle, size)


def test_sudoku_well_formed_tasks_still_grade():
    separated = "\n".join(PUZZLE_4X4[r * 4 : r * 4 + 4] for r in range(4)).replace("0", ".")
    assert sudoku_reward(
        [f"<answer>{SOLVED_4X4}</answer>", "<answer>1234</answer>", f"<answer>{SOLVED_4X4}</answer>"],
        puzzle=[PUZZLE_4X4, PUZZLE_4X4, separated],
        size=[4, 4, 4],
    ) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "numbers, target, error, message",
    [
        ([1, 2], None, TypeError, r"countdown: target\[1\] must be an int, got NoneType"),
        ([1, 2], 3.0, TypeError, r"countdown: target\[1\] must be an int, got float"),
        ([1, 2], "3", TypeError, r"countdown: target\[1\] must be an int, got str"),
        ([1.0, 2.0], 3, TypeError, r"countdown: numbers\[1\]\[0\] must be a non-negative int, got float"),
        ([True, 2], 3, TypeError, r"countdown: numbers\[1\]\[0\] must be a non-negative int, got bool"),
        ([1, -2], 3, TypeError, r"countdown: numbers\[1\]\[1\] must be a non-negative int"),
        ("12", 3, TypeError, r"countdown: numbers\[1\] must be a non-empty list of ints"),
        ([], 3, TypeError, r"countdown: numbers\[1\] must be a non-empty list of ints"),
        (None, 3, TypeError, r"countdown: numbers\[1\] must be a non-empty list of ints"),
    ],
)
def test_countdown_malformed_task(numbers, target, error, message):
    completion = "<answer>1 + 2</answer>"
    with pytest.raises(error, match=message):
        countdown_reward([completion, completion], numbers=[[1, 2], numbers], target=[3, target])
    with pytest.raises(error, match=message.replace(r"\[1\]", "", 1)):
        check_countdown(completion, numbers, target)


def test_countdown_columns_must_line_up():
    with pytest.raises(ValueError, match=r"`target` has 1 entries for 2 completions"):
        countdown_reward(["a", "b"], numbers=[[1], [2]], target=[1])
