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


def _read_jsonl(path: Path) -> Iterator[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path} (data directory: {path.parent.parent})")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def _gsm8k(row: dict, index: int, split: str) -> dict:
    return {
        "id": f"gsm8k/{split}/{index}",
        "question": row["question"],
        "solution": row["answer"],
        "answer": gsm8k_gold(row["answer"]),
        "source": "gsm8k",
        "reward": "math",
    }


def _math500(row: dict, index: int) -> dict:
    return {
        "id": f"math500/{row['unique_id']}",
        "question": row["problem"],
        "solution": row["solution"],
        "answer": row["answer"],
        "subject": row["subject"],
        "level": int(row["level"]),
        "source": "math500",
        "reward": "math",
    }


def _minerva(row: dict, index: int) -> dict:
    gold = last_boxed(row["solution"])
    if gold is None:
        raise ValueError(f"minerva_math row {index} has no \\boxed{{}} answer in its solution")
    return {
        "id": f"minerva/{row['idx']}",
        "question": row["problem"],
        "solution": row["solution"],
        "answer": gold,
        "subject": row["type"],
        "source": "minerva",
        "reward": "math",
    }


def _competition(source: str) -> Callable[[dict, int], dict]:
    def convert(row: dict, index: int) -> dict:
        record = {
            "id": f"{source}/{row['id']}",
            "question": row["problem"],
            "answer": str(row["answer"]),
            "source": source,
            "reward": "math",
        }
        if "solution" in row:
            record["solution"] = row["solution"]
        return record

    return convert


def _humaneval(row: dict, index: int) -> dict:
    return {
        "id": row["task_id"],
        "prompt": row["prompt"],
        "answer": row["canonical_solution"],
        "test": row["test"],
        "entry_point": row["entry_point"],
        "source": "humaneval",
        "reward": "code",
    }


# name -> (file relative to the data directory, row converter taking (row, index))
BENCHMARKS: dict[str, tuple[str, Callable[[dict, int], dict]]] = {
    "gsm8k": ("gsm8k/test.jsonl", lambda row, index: _gsm8k(row, index, "test")),
    "gsm8k_train": ("gsm8k/train.jsonl", lambda row, index: _gsm8k(row, index, "train")),
    "math500": ("math500/test.jsonl", _math500),
    "minerva": ("minerva_math/test.jsonl", _minerva),
    "aime24": ("aime24/test.jsonl", _competition("aime24")),
    "amc23": ("amc23/test.jsonl", _competition("amc23")),
    "humaneval": ("humaneval/HumanEval.jsonl.gz", _humaneval),
}


def load_benchmark(name: str, root: str | os.PathLike | None = None) -> list[dict]:
    """All records of benchmark ``name`` (one of :data:`BENCHMARKS`) as uniform dicts."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    relative_path, convert = BENCHMARKS[name]
    return [convert(row, index) for index, row in enumerate(_read_jsonl(data_root(root) / relative_path))]


SFT_FIELDS = ("prompt", "response")


def read_sft_jsonl(path: str | os.PathLike) -> list[dict]:
    """SFT examples from a jsonl file of ``{"prompt": str, "response": str, ...}`` objects (blank lines skipped).

    Raises ValueError naming the file and line number for invalid JSON, a non-object line, or a missing or
    non-string ``prompt``/``response``. Extra fields are kept.
    """
    examples = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON: {error}") from None
            if not isinstance(example, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(example).__name__}")
            for field in SFT_FIELDS:
                if field not in example:
                    raise ValueError(f"{path}:{number}: missing field {field!r}")
                if not isinstance(example[field], str):
                    raise ValueError(f"{path}:{number}: field {field!r} must be a string, got {type(example[field]).__name__}")
            examples.append(example)
    return examples
