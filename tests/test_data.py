"""Benchmark loaders against the shared data folder (skipped when absent) and the SFT jsonl reader."""

from __future__ import annotations

import json

import pytest

from agdo.data import BENCHMARKS, data_root, load_benchmark, read_sft_jsonl, read_task_jsonl
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
    "math_train": 7498,  # 7,500 rows; two have an empty \boxed{} (no gold answer) and are skipped
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
    with pytest.warns(UserWarning, match=r"skipped 2 math_train row\(s\) without a gold answer \(lines \[5342, 5344\]\)"):
        math_train = load_benchmark("math_train")
    spaced = [r for r in math_train if "\\boxed " in r["solution"]]  # `\boxed {17}`, `\boxed 2`, `\boxed 9`
    assert sorted(r["answer"] for r in spaced) == ["17", "2", "9"]


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


# --- bad bytes and bad rows: every error names path:line ----------------------------------------------


GOOD_SFT = b'{"prompt": "p", "response": "r"}\n'


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b'{"prompt": "p\xff", "response": "r"}', r"sft\.jsonl:2: not valid UTF-8 \(byte 0xff"),
        (b'{"prompt": "\\ud800", "response": "r"}', r"sft\.jsonl:2: lone surrogate .*field 'prompt'"),
        (b'{"prompt": "p", "response": "r", "meta": ["\\udfff"]}', r"sft\.jsonl:2: lone surrogate .*'meta'"),
        (b'{"prompt": "p", "response": "r"', r"sft\.jsonl:2: invalid JSON"),
        (b'"just a string"', r"sft\.jsonl:2: expected a JSON object, got str"),
        (b"null", r"sft\.jsonl:2: expected a JSON object, got NoneType"),
        (b'{"prompt": null, "response": "r"}', r"sft\.jsonl:2: field 'prompt' must be a string, got NoneType"),
        (b'{"prompt": ["p"], "response": "r"}', r"sft\.jsonl:2: field 'prompt' must be a string, got list"),
        (b"[" * 100_000, r"sft\.jsonl:2: invalid JSON"),
    ],
)
def test_read_sft_jsonl_bad_bytes_and_rows_name_the_line(tmp_path, bad_line, message):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(GOOD_SFT + bad_line + b"\n" + GOOD_SFT)
    with pytest.raises(ValueError, match=message):
        read_sft_jsonl(path)


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\n\t\n", b"\r\n"])
def test_read_sft_jsonl_refuses_a_file_without_examples(tmp_path, content):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"sft\.jsonl: no SFT examples \(the file is empty or holds only blank lines\)"):
        read_sft_jsonl(path)


def test_read_sft_jsonl_keeps_valid_unicode_and_a_bom(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes("\ufeff".encode() + '{"prompt": "é \\ud83d\\ude00", "response": "日本"}\r\n'.encode())
    assert read_sft_jsonl(path) == [{"prompt": "é \U0001f600", "response": "日本"}]


def test_read_sft_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_sft_jsonl(tmp_path / "nope.jsonl")


def _amc23(tmp_path, content: bytes):
    (tmp_path / "amc23").mkdir(exist_ok=True)
    (tmp_path / "amc23" / "test.jsonl").write_bytes(content)
    return tmp_path


GOOD_AMC = b'{"id": 0, "problem": "1+1?", "answer": 2}\n'


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b'{"id": 1, "problem": "\xc3(", "answer": 2}', r"test\.jsonl:2: not valid UTF-8"),
        (b'{"id": 1, "problem": "\\ud800", "answer": 2}', r"test\.jsonl:2: lone surrogate .*field 'problem'"),
        (b'{"id": 1, "problem": "q", "answer": 2,}', r"test\.jsonl:2: invalid JSON"),
        (b"[1, 2]", r"test\.jsonl:2: expected a JSON object, got list"),
        (b'{"id": 1, "answer": 2}', r"test\.jsonl:2: bad amc23 row: missing field 'problem'"),
        (b'{"id": 1, "problem": "q", "answer": null}', r"test\.jsonl:2: bad amc23 row: field 'answer' must be"),
        (b'{"id": 1, "problem": "q", "answer": ""}', r"test\.jsonl:2: bad amc23 row: field 'answer' is empty"),
        (b'{"id": 1, "problem": 5, "answer": 2}', r"test\.jsonl:2: bad amc23 row: field 'problem' must be str"),
    ],
)
def test_benchmark_bad_rows_name_the_line(tmp_path, bad_line, message):
    root = _amc23(tmp_path, GOOD_AMC + b"\n" + bad_line + b"\n")
    # Line 2 is blank, so the bad row is line 3: the message must count lines, not rows.
    with pytest.raises(ValueError, match=message.replace(":2:", ":3:")):
        load_benchmark("amc23", root=root)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_benchmark_file_is_an_error(tmp_path, content):
    with pytest.raises(ValueError, match=r"amc23[/\\]test\.jsonl: benchmark 'amc23' has no rows"):
        load_benchmark("amc23", root=_amc23(tmp_path, content))


def test_gsm8k_row_without_answer_line_names_the_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": "q", "answer": "x\n#### 3"}, {"question": "q", "answer": "no marker"}]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"test\.jsonl:2: bad gsm8k row: .*####"):
        load_benchmark("gsm8k", root=tmp_path)


def test_corrupt_gzip_is_named(tmp_path):
    (tmp_path / "humaneval").mkdir()
    (tmp_path / "humaneval" / "HumanEval.jsonl.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(ValueError, match=r"HumanEval\.jsonl\.gz: corrupt gzip file"):
        load_benchmark("humaneval", root=tmp_path)


def test_read_task_jsonl_names_the_line_and_refuses_an_empty_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2", "reward": "exact"}\n\n{"question": "q?", "reward": "math"}\n')
    assert [r["reward"] for r in read_task_jsonl(path)] == ["exact", "math"]
    for line, message in (('{"prompt": "p"}', r"tasks\.jsonl:2: expected an object with a string `reward`"),
                          ('{"reward": "exact", "answer": "2"}', r"tasks\.jsonl:2: expected a string `prompt`"),
                          ('{"reward": "exact", "prompt": 3}', r"tasks\.jsonl:2: expected a string `prompt`")):
        path.write_text('{"prompt": "p", "reward": "exact"}\n' + line + "\n")
        with pytest.raises(ValueError, match=message):
            read_task_jsonl(path)
    path.write_text("\n \n")
    with pytest.raises(ValueError, match=r"tasks\.jsonl: no task records"):
        read_task_jsonl(path)
