"""Rewards: math (math-verify in a child with our deadline), Countdown/Sudoku checkers, and the code sandbox."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from agdo.rewards import (
    SandboxLimits,
    check_countdown,
    check_sudoku,
    code_reward,
    generate_countdown,
    generate_sudoku,
    get_reward,
    gsm8k_gold,
    last_boxed,
    math_reward,
    run_tests_in_sandbox,
    split_humaneval_tests,
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


# ----------------------------------------------------------------------------------------------- code sandbox

FAST = SandboxLimits(test_timeout=1.0, total_timeout=4.0, startup_timeout=3.0)
RUNNER_NAME = b"_sandbox_runner.py"


def sandbox_processes() -> list[int]:
    """Pids of any process still running our sandbox runner (forked children keep the parent's cmdline)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and RUNNER_NAME in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.fixture
def sandbox_root(tmp_path, monkeypatch):
    """Sandbox temporary directories go under a fresh folder, so the test can check they are removed."""
    root = tmp_path / "sandboxes"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield root
    assert list(root.iterdir()) == []
    assert sandbox_processes() == []


def test_sandbox_scores_per_test_and_survives_a_hanging_test(sandbox_root):
    program = "def f(x):\n    while x == 2:\n        pass\n    return x + 1\n"
    tests = ["assert f(1) == 2", "assert f(2) == 3", "assert f(3) == 4", "assert f(4) == 0"]
    assert run_tests_in_sandbox(program, tests, FAST) == [True, False, True, False]


@pytest.mark.parametrize(
    "name, program",
    [
        ("infinite loop", "def f():\n    while True:\n        pass\n"),
        ("fork bomb", "import os\ndef f():\n    while True:\n        os.fork()\n"),
        ("fork via ctypes", "def f():\n    import ctypes\n    while True:\n        ctypes.CDLL(None).fork()\n"),
        ("subprocess", "import subprocess\ndef f():\n    subprocess.run(['sleep', '100'])\n"),
        ("huge allocation", "def f():\n    return bytearray(10**11)\n"),
        ("exit the runner", "import os\ndef f():\n    os._exit(0)\n"),
        ("sleep at import", "import time\ntime.sleep(100)\ndef f():\n    pass\n"),
    ],
)
def test_sandbox_contains_hostile_code(sandbox_root, name, program):
    started = time.monotonic()
    assert run_tests_in_sandbox(program, ["f()", "f()"], FAST) == [False, False], name
    assert time.monotonic() - started < 2 * (FAST.startup_timeout + FAST.test_timeout) + 1


def test_sandbox_blocks_writes_outside_its_directory_but_allows_inside(sandbox_root, tmp_path):
    target = tmp_path / "escaped.txt"
    program = (
        "import os\n"
        f"def outside():\n    open({str(target)!r}, 'w').write('x')\n"
        f"def shell():\n    os.system('touch {target}')\n"
        "def inside():\n    open('scratch.txt', 'w').write('ok')\n    return open('scratch.txt').read()\n"
    )
    tests = ["outside()", "shell()", "assert inside() == 'ok'"]
    assert run_tests_in_sandbox(program, tests, FAST) == [False, False, True]
    assert not target.exists()


def test_sandbox_environment_is_minimal(sandbox_root, monkeypatch):
    monkeypatch.setenv("AGDO_TEST_SECRET", "do-not-leak")
    program = "import os, sys\ndef env():\n    return dict(os.environ)\n"
    tests = ["assert 'AGDO_TEST_SECRET' not in env()", "assert sys.stdin is None or sys.stdin.read() == ''"]
    assert run_tests_in_sandbox(program, tests, FAST) == [True, True]


HUMANEVAL_TEST = '''

METADATA = {'author': 'test'}


def check(candidate):
    import math
    assert candidate(1, 2) == 3
    assert candidate(0, 0) == 0
    scale = 10
    for i in range(3):
        assert candidate(i, scale) == i + scale
    assert candidate(-1, 1) == 0
    assert True, "free point"
'''
HUMANEVAL_PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'


def test_split_humaneval_tests_keeps_setup_and_drops_free_asserts():
    tests = split_humaneval_tests(HUMANEVAL_TEST, "add")
    assert len(tests) == 4
    assert all(test.rstrip().endswith("check(add)") for test in tests)
    assert "scale = 10" in tests[2] and "import math" in tests[0]


def test_code_reward_fractions(sandbox_root):
    completions = [
        "    return a + b\n",
        "    return abs(a) + b if a != -1 else 5\n",  # fails only the last test
        "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n",
        "    return a - b\n",  # passes only candidate(0, 0)
        "    while True:\n        pass\n",
    ]
    n = len(completions)
    rewards = code_reward(
        completions, prompt=[HUMANEVAL_PROMPT] * n, test=[HUMANEVAL_TEST] * n, entry_point=["add"] * n, limits=FAST
    )
    assert rewards == [1.0, 0.75, 1.0, 0.25, 0.0]
