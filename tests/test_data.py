"""Benchmark loaders against the shared data folder (skipped when absent) and the SFT jsonl reader."""

from __future__ import annotations

import json

import pytest

from agdo.data import BENCHMARKS, data_root, load_benchmark, read_sft_jsonl
from agdo.rewards import math_reward


def _shared_data_present() -> bool:
    try:
        return (data_root() / "gsm8k" / "test.jsonl").is_file()
    except FileNotFoundError:
        return False


needs_data = pytest.mark.skipif(not _shared_data_present(), reason="shared benchmark data folder not found")

# Row counts from shared/data/README.md.
EXPECTED_ROWS = {
    "gsm8k": 1319,
    "gsm8k_train": 7473,
    "math500": 500,
    "minerva": 272,
    "aime24": 30,
    "amc23": 40,
    "humaneval": 164,
}


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_row_counts_and_uniform_fields(name):
    records = load_benchmark(name)
    assert len(records) == EXPECTED_ROWS[name]
    assert len({record["id"] for record in records}) == len(records)
    for record in records:
        assert record["answer"] and isinstance(record["answer"], str)
        assert record["reward"] in {"math", "code"}
        assert record.get("question") or record.get("prompt")


def test_every_benchmark_has_an_expected_count():
    assert set(BENCHMARKS) == set(EXPECTED_ROWS)


@needs_data
def test_gold_fields():
    gsm8k = load_benchmark("gsm8k")
    assert gsm8k[0]["answer"] == "18"
    assert all("," not in record["answer"] for record in gsm8k)
    math500 = load_benchmark("math500")
    assert math500[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)" and math500[0]["level"] == 2
    humaneval = load_benchmark("humaneval")[0]
    assert humaneval["id"] == "HumanEval/0" and humaneval["entry_point"] == "has_close_elements"


@needs_data
def test_gold_answers_verify_against_themselves():
    pytest.importorskip("math_verify")
    records = load_benchmark("gsm8k")[:5] + load_benchmark("math500")[:10]
    completions = [f"The answer is \\boxed{{{record['answer']}}}." for record in records]
    assert math_reward(completions, answer=[record["answer"] for record in records]) == [1.0] * len(records)


def test_missing_file_is_named(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(FileNotFoundError, match=r"math500[/\\]test\.jsonl"):
        load_benchmark("math500", root=tmp_path)


def test_env_var_sets_the_root(tmp_path, monkeypatch):
    (tmp_path / "amc23").mkdir()
    (tmp_path / "amc23" / "test.jsonl").write_text(json.dumps({"id": 0, "problem": "1+1?", "answer": 2.0}) + "\n")
    monkeypatch.setenv("AGDO_DATA_DIR", str(tmp_path))
    assert load_benchmark("amc23") == [
        {"id": "amc23/0", "question": "1+1?", "answer": "2.0", "source": "amc23", "reward": "math"}
    ]


def test_unknown_benchmark():
    with pytest.raises(KeyError, match="available"):
        load_benchmark("mmlu", root=".")


def test_read_sft_jsonl(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "p1", "response": "r1", "tag": 1}\n\n{"prompt": "p2", "response": "r2"}\n')
    assert read_sft_jsonl(path) == [{"prompt": "p1", "response": "r1", "tag": 1}, {"prompt": "p2", "response": "r2"}]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "p"}', r"sft\.jsonl:2: missing field 'response'"),
        ('{"response": "r"}', r"sft\.jsonl:2: missing field 'prompt'"),
        ('{"prompt": "p", "response": 3}', r"sft\.jsonl:2: field 'response' must be a string"),
        ("not json", r"sft\.jsonl:2: invalid JSON"),
        ('["prompt", "response"]', r"sft\.jsonl:2: expected a JSON object"),
    ],
)
def test_read_sft_jsonl_errors_name_the_line(tmp_path, bad_line, message):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=message):
        read_sft_jsonl(path)
