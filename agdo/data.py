"""Benchmark loaders (uniform records) and the SFT jsonl reader.

Every benchmark record has ``id``, ``answer`` (the gold answer as a string), ``source`` (benchmark name) and
``reward`` (the name of the reward in :mod:`agdo.rewards` that grades it). Math records carry the problem as
``question`` (and ``solution`` when the file has one); HumanEval records carry the code ``prompt`` plus the
``test`` and ``entry_point`` fields the code reward needs (``answer`` is the canonical solution).

The data directory is, in order: the ``root`` argument, ``$AGDO_DATA_DIR``, ``../shared/data`` relative to
the current directory, ``../shared/data`` relative to the repository (see ``shared/data/README.md``).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from agdo.rewards.math import gsm8k_gold, last_boxed

DATA_DIR_ENV = "AGDO_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[1]


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The benchmark data directory (see the module docstring for the search order)."""
    if root is not None:
        return Path(root)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    candidates = [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    searched = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(f"no benchmark data directory: pass root=..., set ${DATA_DIR_ENV}, or create one of {searched}")


class DataError(ValueError):
    """Bad data in a jsonl file; the message starts with ``path:line:`` (or ``path:`` for the whole file)."""


def _surrogate_path(value) -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate (e.g. from a ``"\\ud800"`` escape):
    ``field 'a'[0]`` and the character, or None. Iterative, so any depth ``json`` parsed is fine."""
    stack = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as error:
                return f"{where or 'the value'} (character {item[error.start]!r} at index {error.start})"
        elif isinstance(item, dict):
            for key, child in item.items():
                if _surrogate_path(key) is not None:
                    return f"a key of {where or 'the object'}"
                stack.append((child, f"{where}[{key!r}]" if where else f"field {key!r}"))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{index}]") for index, child in enumerate(item))
    return None


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a (possibly gzipped) jsonl file.

    Raises :class:`DataError` naming ``path:line`` for bytes that are not UTF-8, invalid JSON, a line that
    is not a JSON object, or a string holding a lone surrogate (``"\\ud800"``: valid JSON, but not text).
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(
                        f"{path}:{number}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte offset "
                        f"{error.start} of the line)"
                    ) from None
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: invalid JSON: {error}") from None
                except RecursionError:
                    raise DataError(f"{path}:{number}: invalid JSON: nested too deeply") from None
                if not isinstance(value, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
                bad = _surrogate_path(value)
                if bad is not None:
                    raise DataError(f"{path}:{number}: lone surrogate (not valid text) in {bad}")
                yield number, value
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path}: corrupt gzip file ({error})") from None


def _read_jsonl(path: Path) -> Iterator[dict]:
    """The objects of a benchmark jsonl file (see :func:`_jsonl_objects` for the errors)."""
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path} (data directory: {path.parent.parent})")
    for _, row in _jsonl_objects(path):
        yield row


def _get(row: dict, key: str, types=(str,), *, nonempty: bool = False):
    """``row[key]``, which must exist and have one of ``types`` (bool never counts as a number)."""
    if key not in row:
        raise KeyError(f"missing field {key!r}")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise TypeError(f"field {key!r} must be {expected}, got {type(value).__name__} {value!r:.60}")
    if nonempty and isinstance(value, str) and not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def _gsm8k(row: dict, index: int, split: str) -> dict:
    solution = _get(row, "answer", nonempty=True)
    return {
        "id": f"gsm8k/{split}/{index}",
        "question": _get(row, "question", nonempty=True),
        "solution": solution,
        "answer": gsm8k_gold(solution),
        "source": "gsm8k",
        "reward": "math",
    }


def _math500(row: dict, index: int) -> dict:
    return {
        "id": f"math500/{_get(row, 'unique_id', nonempty=True)}",
        "question": _get(row, "problem", nonempty=True),
        "solution": _get(row, "solution"),
        "answer": _get(row, "answer", nonempty=True),
        "subject": _get(row, "subject"),
        "level": int(_get(row, "level", (int, str))),
        "source": "math500",
        "reward": "math",
    }


def _boxed_gold(solution: str) -> str | None:
    """The last ``\\boxed{}`` of a worked solution, or None when it has none or it is empty. ``\\boxed {17}``
    and ``\\boxed 2`` (three MATH train solutions) are read as ``\\boxed{17}`` and ``\\boxed{2}``."""
    normalised = re.sub(r"\\boxed (\w+)", r"\\boxed{\1}", re.sub(r"\\boxed\s+\{", r"\\boxed{", solution))
    gold = last_boxed(normalised)
    return gold if gold is not None and gold.strip() else None


def _minerva(row: dict, index: int) -> dict:
    solution = _get(row, "solution")
    gold = _boxed_gold(solution)
    if gold is None:
        raise ValueError("field 'solution' has no (non-empty) \\boxed{} answer")
    return {
        "id": f"minerva/{_get(row, 'idx', (int, str))}",
        "question": _get(row, "problem", nonempty=True),
        "solution": solution,
        "answer": gold,
        "subject": _get(row, "type"),
        "source": "minerva",
        "reward": "math",
    }


def _math_train(row: dict, index: int) -> dict:
    """MATH train split (RL prompts, paper App. C): the gold answer is the last ``\\boxed`` of the solution."""
    solution = _get(row, "solution")
    gold = _boxed_gold(solution)
    if gold is None:
        return None  # one row (`\\boxed{}` empty) has no gold answer: skipped, with a warning naming it
    return {
        "id": f"math_train/{index}",
        "question": _get(row, "problem", nonempty=True),
        "solution": solution,
        "answer": gold,
        "subject": _get(row, "type"),
        "level": _get(row, "level"),
        "source": "math_train",
        "reward": "math",
    }


def _competition(source: str) -> Callable[[dict, int], dict]:
    def convert(row: dict, index: int) -> dict:
        answer = _get(row, "answer", (str, int, float))
        if isinstance(answer, str) and not answer.strip():
            raise ValueError("field 'answer' is empty")
        record = {
            "id": f"{source}/{_get(row, 'id', (int, str))}",
            "question": _get(row, "problem", nonempty=True),
            "answer": str(answer),
            "source": source,
            "reward": "math",
        }
        if "solution" in row:
            record["solution"] = _get(row, "solution")
        return record

    return convert


def _humaneval(row: dict, index: int) -> dict:
    return {
        "id": _get(row, "task_id", nonempty=True),
        "prompt": _get(row, "prompt", nonempty=True),
        "answer": _get(row, "canonical_solution"),
        "test": _get(row, "test", nonempty=True),
        "entry_point": _get(row, "entry_point", nonempty=True),
        "source": "humaneval",
        "reward": "code",
    }


# name -> (file relative to the data directory, row converter taking (row, index))
BENCHMARKS: dict[str, tuple[str, Callable[[dict, int], dict]]] = {
    "gsm8k": ("gsm8k/test.jsonl", lambda row, index: _gsm8k(row, index, "test")),
    "gsm8k_train": ("gsm8k/train.jsonl", lambda row, index: _gsm8k(row, index, "train")),
    "math500": ("math500/test.jsonl", _math500),
    "math_train": ("math_train/train.jsonl.gz", _math_train),
    "minerva": ("minerva_math/test.jsonl", _minerva),
    "aime24": ("aime24/test.jsonl", _competition("aime24")),
    "amc23": ("amc23/test.jsonl", _competition("amc23")),
    "humaneval": ("humaneval/HumanEval.jsonl.gz", _humaneval),
}


def load_benchmark(name: str, root: str | os.PathLike | None = None) -> list[dict]:
    """All records of benchmark ``name`` (one of :data:`BENCHMARKS`) as uniform dicts.

    Raises ``KeyError`` for an unknown name, ``FileNotFoundError`` for a missing file and
    :class:`DataError` (a ``ValueError``) naming ``path:line`` for a bad row (not UTF-8, invalid JSON, not
    an object, a lone surrogate, a missing or mistyped field), or naming the file when it has no rows.
    """
    if not isinstance(name, str) or name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    relative_path, convert = BENCHMARKS[name]
    path = data_root(root) / relative_path
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path} (data directory: {path.parent.parent})")
    records, skipped = [], []
    for index, (number, row) in enumerate(_jsonl_objects(path)):
        try:
            record = convert(row, index)
        except (KeyError, TypeError, ValueError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise DataError(f"{path}:{number}: bad {name} row: {message}") from None
        if record is None:
            skipped.append(number)
        else:
            records.append(record)
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} {name} row(s) without a gold answer (lines {skipped[:10]})")
    if not records:
        raise DataError(f"{path}: benchmark {name!r} has no rows (the file is empty or holds only blank lines)")
    return records


SFT_FIELDS = ("prompt", "response")


def read_sft_jsonl(path: str | os.PathLike) -> list[dict]:
    """SFT examples from a jsonl file of ``{"prompt": str, "response": str, ...}`` objects (blank lines skipped).

    Raises :class:`DataError` (a ``ValueError``) naming the file and line number for bytes that are not
    UTF-8, a lone surrogate in a string (``"\\ud800"``), invalid JSON, a non-object line, or a missing or
    non-string ``prompt``/``response``; and naming the file when it holds no example at all (empty or blank
    lines only). Extra fields are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file not found: {path}")
    examples = []
    for number, example in _jsonl_objects(path):
        for field in SFT_FIELDS:
            if field not in example:
                raise DataError(f"{path}:{number}: missing field {field!r}")
            if not isinstance(example[field], str):
                raise DataError(f"{path}:{number}: field {field!r} must be a string, got {type(example[field]).__name__}")
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no SFT examples (the file is empty or holds only blank lines)")
    return examples


def read_task_jsonl(path: str | os.PathLike) -> list[dict]:
    """RL task records from a jsonl file: objects with a string ``reward`` (a name in ``agdo.rewards``) and
    the fields that reward reads (e.g. ``prompt`` + ``answer`` for ``exact``, or the HumanEval fields for
    ``code``). Errors as :func:`read_sft_jsonl`, naming ``path:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    records = []
    for number, record in _jsonl_objects(path):
        if not isinstance(record.get("reward"), str):
            raise DataError(f"{path}:{number}: expected an object with a string `reward` field")
        if not isinstance(record.get("prompt", record.get("question")), str):
            raise DataError(f"{path}:{number}: expected a string `prompt` (or `question` for math)")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no task records (the file is empty or holds only blank lines)")
    return records
