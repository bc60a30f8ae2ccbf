"""Countdown and Sudoku: exact checkers (rewards) and seeded generators of prompt-ready tasks.

Both puzzles expect the final answer inside ``<answer>...</answer>``; the last such block is graded.
Countdown equations are parsed with :mod:`ast` and evaluated over exact fractions by walking the tree;
nothing from a completion is ever passed to ``eval``.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction

from agdo.rewards.exact import check_columns

_OPEN, _CLOSE = "<answer>", "</answer>"
# Longer answers are not plausible equations; the cap also keeps ast.parse away from deep nesting.
_MAX_EQUATION_CHARS = 200
_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def final_answer(completion: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` block, stripped, or None.

    Blocks are found as ``re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)`` would find them
    (left to right, each from an opening tag to the first closing tag after it), but with ``str.find``
    in one pass: linear time on adversarial text such as ``"<answer>" * 100000``, where the regex retries
    every unclosed opening tag to the end of the string (quadratic).
    """
    if not isinstance(completion, str):
        raise TypeError(f"final_answer takes a string, got {type(completion).__name__}")
    last, position = None, 0
    while True:
        opened = completion.find(_OPEN, position)
        if opened == -1:
            break
        closed = completion.find(_CLOSE, opened + len(_OPEN))
        if closed == -1:  # no later opening tag can close either
            break
        last, position = (opened + len(_OPEN), closed), closed + len(_CLOSE)
    return None if last is None else completion[last[0] : last[1]].strip()


# ----------------------------------------------------------------------------------------------- Countdown


def evaluate_countdown_equation(equation: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and the integers used by ``equation`` (``+ - * /``, parentheses, non-negative integers).

    An optional ``= value`` suffix is dropped by the caller. Returns None for anything else: names, calls,
    attributes, unary minus, floats, exponents, division by zero, or syntax errors.
    """
    if len(equation) > _MAX_EQUATION_CHARS:
        return None
    try:
        tree = ast.parse(equation, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    numbers: list[int] = []

    def value_of(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value_of(node.left), value_of(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise ZeroDivisionError
            return left / right
        raise ValueError(f"disallowed syntax: {type(node).__name__}")

    try:
        return value_of(tree.body), numbers
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def check_countdown(completion: str, numbers: list[int], target: int) -> bool:
    """Whether the final ``<answer>`` is an equation using each of ``numbers`` exactly once that equals ``target``.

    ``<answer>(3 + 5) * 2</answer>`` and ``<answer>(3 + 5) * 2 = 16</answer>`` are both accepted.
    A malformed task raises (see :func:`check_countdown_task`).
    """
    check_countdown_task(numbers, target)
    answer = final_answer(completion)
    if answer is None:
        return False
    expression, *claimed = answer.split("=")
    if len(claimed) > 1 or (claimed and claimed[0].strip() != str(target)):
        return False
    evaluated = evaluate_countdown_equation(expression.strip())
    if evaluated is None:
        return False
    value, used = evaluated
    return value == target and Counter(used) == Counter(numbers)


def check_countdown_task(numbers, target, index: int | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``numbers`` is a non-empty list of non-negative ints and
    ``target`` an int (bools and floats are refused: ``1.0 == 1`` would grade them as if they were ints)."""
    at = "" if index is None else f"[{index}]"
    if not isinstance(numbers, (list, tuple)) or not numbers:
        raise TypeError(f"countdown: numbers{at} must be a non-empty list of ints, got {numbers!r:.80}")
    for position, number in enumerate(numbers):
        if type(number) is not int or number < 0:
            raise TypeError(
                f"countdown: numbers{at}[{position}] must be a non-negative int, got {type(number).__name__} {number!r}"
            )
    if type(target) is not int:
        raise TypeError(f"countdown: target{at} must be an int, got {type(target).__name__} {target!r:.60}")


def countdown_reward(completions: list[str], numbers: list[list[int]], target: list[int], **_) -> list[float]:
    """1.0 per completion whose final equation solves its Countdown task, else 0.0.

    A malformed task raises ``TypeError``/``ValueError`` naming ``numbers[i]``/``target[i]`` (see
    :func:`check_countdown_task`).
    """
    check_columns("countdown_reward", completions, numbers=numbers, target=target)
    for index, (task_numbers, task_target) in enumerate(zip(numbers, target, strict=True)):
        check_countdown_task(task_numbers, task_target, index)
    return [
        float(check_countdown(completion, task_numbers, task_target))
        for completion, task_numbers, task_target in zip(completions, numbers, target, strict=True)
    ]


def countdown_prompt(numbers: list[int], target: int) -> str:
    listed = ", ".join(map(str, numbers))
    return (
        f"Using the numbers [{listed}], create an equation that equals {target}. You can use basic arithmetic "
        "operations (+, -, *, /) and parentheses, and each number must be used exactly once. Show your reasoning, "
        "then give the final equation in <answer> </answer> tags, for example <answer>(1 + 2) / 3</answer>."
    )


def generate_countdown(
    count: int,
    seed: int = 0,
    num_numbers: tuple[int, int] = (3, 4),
    number_range: tuple[int, int] = (1, 99),
    target_range: tuple[int, int] = (1, 999),
) -> list[dict]:
    """``count`` solvable Countdown tasks: ``{id, prompt, numbers, target, solution}`` (seeded, deterministic).

    Each task is built backwards: random numbers are combined in random order with random operators (division
    only when exact), and the result becomes the target if it lies in ``target_range``.
    """
    rng = random.Random(seed)
    tasks = []
    while len(tasks) < count:
        numbers = [rng.randint(*number_range) for _ in range(rng.randint(*num_numbers))]
        built = _random_equation(numbers, rng)
        if built is None or not target_range[0] <= built[1] <= target_range[1]:
            continue
        solution, target = built
        tasks.append(
            {
                "id": f"countdown/{seed}/{len(tasks)}",
                "prompt": countdown_prompt(numbers, target),
                "numbers": numbers,
                "target": target,
                "solution": solution,
            }
        )
    return tasks


def _random_equation(numbers: list[int], rng: random.Random) -> tuple[str, int] | None:
    """A random equation over all of ``numbers`` with a non-negative integer value, or None if none came out."""
    terms = [(str(n), n) for n in numbers]
    while len(terms) > 1:
        (left_text, left), (right_text, right) = terms.pop(rng.randrange(len(terms))), terms.pop(rng.randrange(len(terms)))
        operator = rng.choice("+-*/")
        if operator == "-" and left < right:
            left_text, left, right_text, right = right_text, right, left_text, left
        if operator == "/":
            if right == 0 or left % right:
                return None
            value = left // right
        else:
            value = {"+": left + right, "-": left - right, "*": left * right}[operator]
        terms.append((f"({left_text} {operator} {right_text})", value))
    text, value = terms[0]
    return text[1:-1] if text.startswith("(") else text, value


# ----------------------------------------------------------------------------------------------- Sudoku


_CELLS = "0123456789."
SUDOKU_SIZES = (4, 9)  # perfect squares whose digits are single characters


def parse_grid(text: str, size: int) -> list[int] | None:
    """Digits of a ``size`` x ``size`` grid in row-major order (``0`` or ``.`` for blanks), separators ignored.

    Returns None unless exactly ``size * size`` cells are present. Linear time; it stops reading at the
    first cell past ``size * size``, so a huge answer costs no more than that.
    """
    cells: list[int] = []
    limit = size * size
    for char in text:
        if char in _CELLS:
            if len(cells) == limit:
                return None
            cells.append(0 if char == "." else ord(char) - 48)
    return cells if len(cells) == limit else None


def check_sudoku_task(puzzle, size, index: int | None = None) -> list[int]:
    """The givens of a Sudoku task; raises ``TypeError``/``ValueError`` naming ``size``/``puzzle`` unless
    ``size`` is an int in :data:`SUDOKU_SIZES` and ``puzzle`` holds exactly ``size * size`` cells, each a
    blank (``0``/``.``) or a digit ``1..size``."""
    at = "" if index is None else f"[{index}]"
    if type(size) is not int:
        raise TypeError(f"sudoku: size{at} must be an int in {SUDOKU_SIZES}, got {type(size).__name__} {size!r:.40}")
    if size not in SUDOKU_SIZES:
        raise ValueError(f"sudoku: size{at} must be one of {SUDOKU_SIZES}, got {size}")
    if not isinstance(puzzle, str):
        raise TypeError(f"sudoku: puzzle{at} must be a string of {size * size} cells, got {type(puzzle).__name__}")
    cells = sum(char in _CELLS for char in puzzle)
    if cells != size * size:
        raise ValueError(f"sudoku: puzzle{at} must hold {size * size} cells (digits, 0 or . for blanks), got {cells}")
    givens = parse_grid(puzzle, size)
    too_big = [digit for digit in givens if digit > size]
    if too_big:
        raise ValueError(f"sudoku: puzzle{at} has the digit {too_big[0]}, above size {size}")
    return givens


def check_sudoku(completion: str, puzzle: str, size: int) -> bool:
    """Whether the final ``<answer>`` is a complete, valid grid that keeps every given of ``puzzle``.

    A malformed task raises (see :func:`check_sudoku_task`).
    """
    givens = check_sudoku_task(puzzle, size)
    answer = final_answer(completion)
    if answer is None:
        return False
    grid = parse_grid(answer, size)
    if grid is None or any(given and given != cell for given, cell in zip(givens, grid)):
        return False
    digits = set(range(1, size + 1))
    return all(set(group) == digits for group in _units(grid, size))


def _units(grid: list[int], size: int):
    """The rows, columns and boxes of a flat grid."""
    box = _box_side(size)
    for i in range(size):
        yield grid[i * size : (i + 1) * size]
        yield grid[i::size]
        top, left = box * (i // box), box * (i % box)
        yield [grid[(top + r) * size + left + c] for r in range(box) for c in range(box)]


def _box_side(size: int) -> int:
    box = int(size**0.5)
    if box * box != size:
        raise ValueError(f"Sudoku size must be a square number, got {size}")
    return box


def sudoku_reward(completions: list[str], puzzle: list[str], size: list[int], **_) -> list[float]:
    """1.0 per completion whose final grid solves its Sudoku, else 0.0.

    A malformed task raises ``TypeError``/``ValueError`` naming ``size[i]``/``puzzle[i]`` (see
    :func:`check_sudoku_task`).
    """
    check_columns("sudoku_reward", completions, puzzle=puzzle, size=size)
    for index, (task_puzzle, task_size) in enumerate(zip(puzzle, size, strict=True)):
        check_sudoku_task(task_puzzle, task_size, index)
    return [
        float(check_sudoku(completion, task_puzzle, task_size))
        for completion, task_puzzle, task_size in zip(completions, puzzle, size, strict=True)
    ]


def sudoku_prompt(puzzle: str, size: int) -> str:
    rows = "\n".join(puzzle[r * size : (r + 1) * size] for r in range(size))
    box = _box_side(size)
    return (
        f"Solve this {size}x{size} Sudoku. Fill every 0 with a digit from 1 to {size} so that each row, each column "
        f"and each {box}x{box} box contains every digit exactly once.\n{rows}\n"
        f"Give the completed grid, {size} digits per row, one row per line, in <answer> </answer> tags."
    )


def generate_sudoku(count: int, size: int = 4, blanks: int | None = None, seed: int = 0) -> list[dict]:
    """``count`` Sudoku tasks with a unique solution: ``{id, prompt, puzzle, size, solution}`` (seeded).

    ``puzzle`` and ``solution`` are row-major digit strings with ``0`` for blanks. ``blanks`` defaults to
    10 for 4x4 and 45 for 9x9; cells are only removed while the solution stays unique, so fewer blanks than
    requested can result.
    """
    box = _box_side(size)
    blanks = blanks if blanks is not None else {4: 10, 9: 45}.get(size, size * size // 2)
    rng = random.Random(seed)
    tasks = []
    for index in range(count):
        solution = _random_solved_grid(size, box, rng)
        puzzle = list(solution)
        removed = 0
        for cell in rng.sample(range(size * size), size * size):
            if removed == blanks:
                break
            kept, puzzle[cell] = puzzle[cell], 0
            if _count_solutions(puzzle, size, box, limit=2) == 1:
                removed += 1
            else:
                puzzle[cell] = kept
        puzzle_text, solution_text = "".join(map(str, puzzle)), "".join(map(str, solution))
        tasks.append(
            {
                "id": f"sudoku{size}/{seed}/{index}",
                "prompt": sudoku_prompt(puzzle_text, size),
                "puzzle": puzzle_text,
                "size": size,
                "solution": solution_text,
            }
        )
    return tasks


def _random_solved_grid(size: int, box: int, rng: random.Random) -> list[int]:
    """A valid full grid: the standard shifted pattern, then digits, rows within bands and columns within
    stacks, bands and stacks shuffled (each shuffle preserves validity)."""

    def shuffled_lines() -> list[int]:
        bands = rng.sample(range(box), box)
        return [band * box + line for band in bands for line in rng.sample(range(box), box)]

    rows, columns, digits = shuffled_lines(), shuffled_lines(), rng.sample(range(1, size + 1), size)
    return [digits[(box * (r % box) + r // box + c) % size] for r in rows for c in columns]


def _count_solutions(grid: list[int], size: int, box: int, limit: int) -> int:
    """Number of completions of ``grid`` (backtracking on the most constrained cell), counting up to ``limit``."""
    grid = list(grid)
    all_digits = set(range(1, size + 1))

    def candidates(cell: int) -> set[int]:
        row, column = divmod(cell, size)
        top, left = box * (row // box), box * (column // box)
        seen = set(grid[row * size : (row + 1) * size]) | set(grid[column::size])
        seen |= {grid[(top + r) * size + left + c] for r in range(box) for c in range(box)}
        return all_digits - seen

    def search() -> int:
        empty = [cell for cell in range(size * size) if grid[cell] == 0]
        if not empty:
            return 1
        cell, options = min(((cell, candidates(cell)) for cell in empty), key=lambda item: len(item[1]))
        found = 0
        for digit in options:
            grid[cell] = digit
            found += search()
            if found >= limit:
                break
        grid[cell] = 0
        return found

    return search()
