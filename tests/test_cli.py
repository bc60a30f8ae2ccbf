"""The command line end to end on tiny settings: quickstart (train, evaluate, plot), eval, analyze."""

import json
import re
from pathlib import Path

import pytest
import torch

from agdo import tasks
from agdo.cli import main
from agdo.data import data_root
from agdo.eval import decode_completion, encode_prompts, format_table, summarize
from agdo.training.sft_data import collate_sft, encode_example

TINY_QUICKSTART = ["task=addition", "digits=1", "train_problems=64", "test_problems=6", "seeds=[0, 1]",
                   "train_seeds=[0, 1]", "pretrain_steps=150", "posttrain_learning_rate=1e-3",
                   "posttrain_steps=3", "batch_size=8", "hidden_size=32", "num_layers=2", "rl_steps=3",
                   "rl_prompts_per_step=4", "rl_num_generations=4",
                   "rl_methods=[agdo, tracerl, diffu_grpo, coupled, wd1, mdpo]", "eval_caches=[none, prefix]",
                   "eval_block_length=1"]
RL_LABELS = ["AGDO-RL", "TraceRL", "diffu-GRPO", "coupled GRPO", "wd1", "MDPO"]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    torch.set_num_threads(1)  # tiny matmuls: extra threads only contend on a 2-core machine
    output_dir = tmp_path_factory.mktemp("quickstart")
    main(["quickstart", f"output_dir={output_dir}", *TINY_QUICKSTART])
    return output_dir


def test_quickstart_writes_table_models_and_plots(quickstart_run):
    report = (quickstart_run / "results.md").read_text()
    for label in ("base (pre-trained)", "AGDO-SFT", "SFT (random masks)", "blockwise SFT",
                  *(f"AGDO-SFT + {rl}" for rl in RL_LABELS)):
        assert f"| {label} |" in report
    rows = json.loads((quickstart_run / "results.json").read_text())
    # 10 rows x (max_prob, max_s) x (no cache, prefix cache)
    assert len(rows) == 4 * 10 and all(0 <= r["mean"] <= 100 for r in rows)
    assert {r["column"] for r in rows} == {"max_prob", "max_s", "max_prob, prefix cache", "max_s, prefix cache"}
    assert "| | max_prob | max_s | max_prob, prefix cache | max_s, prefix cache |" in report
    # Blocks of one token decoded in one step each: every step is a block's first, a full forward, so the
    # prefix cache changes nothing (with the default single block of 3 tokens in 3 steps it may).
    assert "decoding 3 tokens in 3 steps, blocks of 1)" in report
    by_cell = {(r["row"], r["column"]): r["mean"] for r in rows}
    for (row, column), mean in by_cell.items():
        if "cache" in column:
            assert mean == by_cell[row, column.split(",")[0]], (row, column)
    # Post-trained rows: 2 training seeds x 2 test sets; the base: its one pre-training x 2 test sets.
    assert all(r["seeds"] == (2 if r["row"] == "base (pre-trained)" else 4) for r in rows)
    assert "| paper's direction | agrees?" in report and "| AGDO-SFT > SFT |" in report
    for seed in (0, 1):
        for method in ("agdo", "random", "blockwise", "rl_agdo", "rl_tracerl", "rl_diffu_grpo", "rl_coupled",
                       "rl_wd1", "rl_mdpo"):
            assert (quickstart_run / f"seed{seed}" / method / "final" / "config.json").exists()
            assert (quickstart_run / f"seed{seed}" / method / "metrics.jsonl").exists()
    pngs = sorted(p.name for p in (quickstart_run / "plots").glob("*.png"))
    assert "agdo_attention_dynamics.png" in pngs and "s_distribution_base_vs_agdo.png" in pngs
    assert all((quickstart_run / "plots" / name).stat().st_size > 1000 for name in pngs)


def test_quickstart_forward_passes_are_matched(quickstart_run):
    report = (quickstart_run / "results.md").read_text()
    counts = {line.split(":")[0]: line.split(": ")[1].split()[0] for line in report.splitlines()
              if line.startswith("- ") and " training forward passes (rows)" in line}
    # Measured from the metrics logs, equal for every method and every training seed (one number, no "a/b").
    assert counts["- AGDO-SFT"] == counts["- SFT (random masks)"] == counts["- blockwise SFT"]
    # 4 trained tokens per response (2 answer digits, EOS, 1 trained pad) x 3 optimizer steps of 8 samples.
    assert int(counts["- AGDO-SFT"]) == 4 * 3 * 8
    rl = {line.split(":")[0]: line for line in report.splitlines() if "RL training forward passes" in line}
    assert set(rl) == {f"- AGDO-SFT + {label}" for label in RL_LABELS}
    per_response = {label[len("- AGDO-SFT + "):]: float(re.search(r"\(([\d.]+) per trained response\)", line).group(1))
                    for label, line in rl.items()}
    # One row per trained token for both (at most gen_length = 3: a rollout that stops early has fewer).
    assert per_response["AGDO-RL"] == per_response["TraceRL"] > 0
    # The mask-based methods get as many rows per response (the AGDO paper's §6.1 matching): one per decoded
    # token; MDPO at most one per decoding step (it skips steps whose advantage is 0).
    for label in ("diffu-GRPO", "wd1", "coupled GRPO"):  # coupled: one draw = 3 rows
        assert per_response[label] == 3 >= per_response["AGDO-RL"], (label, per_response)
    assert 0 < per_response["MDPO"] <= 3


def test_eval_and_analyze_commands(quickstart_run, tmp_path, capsys):
    try:
        data_root(None)
    except FileNotFoundError:
        pytest.skip("shared benchmark data folder not found")
    model = quickstart_run / "seed0" / "agdo" / "final"
    common = [f"model_name_or_path={model}", "gen_length=4", "steps=4", "block_length=4"]
    main(["eval", *common, "benchmarks=[gsm8k]", "limit=3", "algs=[max_prob, max_s]", "seeds=[0, 1]",
          f"output_dir={tmp_path / 'eval'}"])
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| max_prob |" in table and "| max_s |" in table and "gsm8k" in table
    lines = (tmp_path / "eval" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["n"] == 3 for line in lines)
    main(["analyze", *common, "benchmark=gsm8k", "limit=2", f"output_dir={tmp_path / 'analysis'}"])
    assert len(list((tmp_path / "analysis").glob("*.png"))) == 3
    assert "mean S at commit" in capsys.readouterr().out


def test_quickstart_block_length_must_divide_the_answer_before_any_training(tmp_path):
    # 1-digit sums: 2 answer tokens + EOS = 3 decoded tokens.
    with pytest.raises(ValueError, match="`eval_block_length` must divide the decoded length 3"):
        main(["quickstart", f"output_dir={tmp_path}", "digits=1", "train_problems=64", "test_problems=6",
              "eval_block_length=2"])
    assert not (tmp_path / "pretrain").exists()


def test_cli_rejects_unknown_fields():
    with pytest.raises(SystemExit):
        main(["sft", "no_such_field=1"])


def test_chat_template_prompts_and_responses():
    tokenizer = tasks.build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}={% endif %}" \
                              "{% endfor %}"
    prompt_ids, response_ids = encode_example(tokenizer, "12+34", "046")
    assert tokenizer.decode(prompt_ids) == "12+34=" and tokenizer.decode(response_ids[:-1]) == "046"
    assert response_ids[-1] == tokenizer.eos_token_id
    ids, mask = encode_prompts(tokenizer, ["1+2", "10+20"], "cpu")
    assert mask.tolist()[0][:2] == [False, False] and mask[1].all()  # left-padded
    assert tokenizer.decode(ids[0][mask[0]].tolist()) == "1+2="


def test_collate_and_decode():
    items = [{"index": 0, "prompt_ids": [4, 5], "response_ids": [6, 2]},
             {"index": 7, "prompt_ids": [4, 5, 6], "response_ids": [7, 8, 2]}]
    batch = collate_sft(items, pad_token_id=0, post_num=1)
    assert batch["response_start"] == 3
    assert batch["input_ids"].tolist() == [[0, 4, 5, 6, 2, 0, 0], [4, 5, 6, 7, 8, 2, 0]]
    assert batch["attention_mask"][0].tolist() == [False] + [True] * 6
    tokenizer = tasks.build_tokenizer()
    assert decode_completion(tokenizer, torch.tensor([4, 5, 2, 6]), stop_token_ids=(2, 0)) == "12"


def test_summary_and_table():
    stats = summarize([0.5, 0.7])
    assert stats["mean"] == pytest.approx(60.0) and stats["std"] == pytest.approx(14.142, abs=1e-3)
    table = format_table([{"row": "a", "column": "x", **stats}], ["x", "y"])
    assert "| a | 60.0 ± 14.1 | - |" in table


# --- argument parsing: --config anywhere, bad values exit naming the key ----------------------------


@pytest.fixture
def captured_eval(monkeypatch, tmp_path):
    """Replace the evaluation itself: the test sees the EvalConfig that `agdo eval` built."""
    import agdo.eval

    seen = []

    def fake_run_eval(config, **_):
        seen.append(config)
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        return "| table |"

    monkeypatch.setattr(agdo.eval, "run_eval", fake_run_eval)
    config_file = tmp_path / "eval.yaml"
    config_file.write_text("limit: 5\nseeds: [1, 2]\nalgs: [max_s]\n")
    return seen, config_file, f"output_dir={tmp_path / 'out'}"


@pytest.mark.parametrize("where", ["after", "before", "between", "equals"])
def test_config_is_accepted_anywhere(captured_eval, where):
    seen, path, out = captured_eval
    argv = {
        "after": ["eval", "limit=3", out, "--config", str(path)],
        "before": ["eval", "--config", str(path), "limit=3", out],
        "between": ["eval", "limit=3", "--config", str(path), out],
        "equals": ["eval", "limit=3", f"--config={path}", out],
    }[where]
    main(argv)
    (config,) = seen
    assert config.limit == 3  # the override beats the file wherever --config stands
    assert config.seeds == [1, 2] and config.algs == ["max_s"] and config.output_dir.endswith("out")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seeds=3"], r"config `seeds` must be a list"),
        (["benchmarks=gsm8k"], r"config `benchmarks` must be a list"),
        (["algs={max_prob: 1}"], r"config `algs` must be a list"),
        (["seeds=[0, x]"], r"config `seeds\[1\]` must be int"),
        (["limit=-2"], r"`limit` must be >= 1"),
        (["seeds=[]"], r"`seeds` is empty"),
        (["benchmarks=[]"], r"`benchmarks` is empty"),
        (["algs=[]"], r"`algs` is empty"),
        (["benchmarks=[gsm8k, mmlu]"], r"unknown `benchmarks` \['mmlu'\]"),
        (["no_such_field=1"], r"unknown EvalConfig field\(s\) \['no_such_field'\]"),
        (["seeds"], r"must look like key=value"),
        (["--config", "/nonexistent/eval.yaml"], r"config file not found: /nonexistent/eval\.yaml"),
    ],
)
def test_bad_eval_arguments_exit_naming_the_key(captured_eval, capsys, overrides, message):
    seen, _, out = captured_eval
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", out, *overrides])
    assert exit_info.value.code == 2 and not seen
    assert re.search(message, capsys.readouterr().err)


def test_config_twice_and_broken_yaml(captured_eval, capsys, tmp_path):
    seen, path, out = captured_eval
    with pytest.raises(SystemExit):
        main(["eval", "--config", str(path), out, "--config", str(path)])
    assert "--config given twice" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("seeds: [1, 2\n")
    with pytest.raises(SystemExit):
        main(["eval", out, "--config", str(broken)])
    assert re.search(r"broken\.yaml is not valid YAML", capsys.readouterr().err)
    assert not seen


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["limit=0"], r"AnalyzeConfig: `limit` must be >= 1"),
        (["benchmark=mmlu"], r"unknown `benchmark` 'mmlu'"),
        (["benchmark=[gsm8k]"], r"config `benchmark` must be str"),
        (["gen_length=0"], r"gen_length must be >= 1"),
    ],
)
def test_bad_analyze_arguments_exit_naming_the_key(capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", *overrides])
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("command", ["eval", "analyze"])
@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"gsm8k[/\\]test\.jsonl: benchmark 'gsm8k' has no rows"),
        ('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": }\n', r"test\.jsonl:2: invalid JSON"),
    ],
)
def test_bad_benchmark_data_fails_before_the_model_loads(tmp_path, command, content, message):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(content)
    # No model is given: the data error must come first.
    with pytest.raises(ValueError, match=message):
        main([command, f"data_dir={tmp_path}", f"output_dir={tmp_path / 'out'}"])


def test_sudoku_problems_are_digit_only_distinct_and_held_out():
    from agdo.rewards.puzzles import check_sudoku

    train = tasks.sudoku_problems(20, blanks=10, seed=1)
    test = tasks.sudoku_problems(10, blanks=10, seed=2, exclude={p["prompt"] for p in train})
    tokenizer = tasks.build_tokenizer()
    assert len({p["prompt"] for p in train + test}) == 30
    for p in train + test:
        assert len(p["prompt"]) == 17 and p["prompt"].endswith("=") and p["response"] == p["answer"]
        assert check_sudoku(f"<answer>{p['answer']}</answer>", p["prompt"][:16], 4)
        tokenizer(p["prompt"] + p["answer"])  # every character is in the vocabulary


@pytest.mark.parametrize("field,value", [("eval_caches", ["none", "full"]), ("eval_caches", []),
                                         ("eval_caches", ["none", "none"]), ("rl_methods", ["agdo", "ppo"]),
                                         ("task", "chess"), ("seeds", []), ("eval_block_length", 0)])
def test_bad_quickstart_settings_name_the_field(field, value):
    from agdo.quickstart import QuickstartConfig

    with pytest.raises(ValueError, match=f"QuickstartConfig: `{field}`"):
        QuickstartConfig(**{field: value})
