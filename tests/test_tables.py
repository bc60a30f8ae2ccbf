"""`agdo table`: every paper table is well formed, its config loads, and a run's cells are the accuracies an
independent `evaluate` call gives, printed beside the paper's numbers."""

import json
from pathlib import Path

import pytest

from agdo.cli import main
from agdo.config import build_config
from agdo.eval import evaluate
from agdo.models import load_adapter
from agdo.sampling import SamplerConfig
from agdo.tables import TABLES, TableConfig, _sampler, format_paper_table

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "tables"


@pytest.mark.parametrize("name", list(TABLES))
def test_every_table_has_a_paper_number_per_cell_and_valid_decoding(name):
    table = TABLES[name]
    assert set(table.paper) == set(table.rows)
    for label, row in table.rows.items():
        assert len(table.paper[label]) == len(table.columns)
        for column in table.columns.values():
            if column["benchmark"] is not None:
                _sampler(table, row, column)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_table_configs_load(path):
    config = build_config(TableConfig, path)
    assert config.table == path.stem and config.models


def test_every_table_has_a_config():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(TABLES)


def test_table_config_rejects():
    with pytest.raises(ValueError, match="unknown `table`"):
        TableConfig(table="table99")
    with pytest.raises(ValueError, match=r"keys \['SFT'\] that no row"):
        TableConfig(table="agdo_table1", models={"SFT": "x"})
    with pytest.raises(ValueError, match="limit"):
        TableConfig(limit=0)


def test_format_shows_ours_beside_the_papers_and_dashes_where_unmeasured():
    table = TABLES["agdo_table1"]
    text = format_paper_table(table, {("Max-S", "256"): {"mean": 12.345, "std": 1.0, "seeds": 2}})
    assert "| Max-S | — (21.2) | 12.3 ± 1.0 (16.2) | — (15.2) |" in text
    assert "| Max-Prob | — (16.8) | — (13.8) | — (13.0) |" in text


def test_table_command_evaluates_each_cell_like_evaluate(tmp_path, capsys, monkeypatch):
    """A table shaped like Table 1 on one-digit additions (the real tables decode 128-1,024 tokens of
    benchmark problems per cell, minutes on a CPU) with a model that gets some right: the command's cells
    equal independent `evaluate` calls, per row's decoding rule and per column's length."""
    import sys

    from agdo import data, tables

    sys.path.insert(0, str(Path(__file__).parent))
    from train_worker import build_tiny_rl_run

    short = tables.PaperTable("short Table 1", "test", {"Max-Prob": tables.Row("model", "max_prob"),
                                                       "Max-S": tables.Row("model", "max_s")},
                              {str(n): dict(benchmark="gsm8k", gen_length=n, steps=n) for n in (3, 6)},
                              {"Max-Prob": [16.8, 13.8], "Max-S": [21.2, 16.2]}, {**tables.AGDO_DECODING, "block_length": 3})
    monkeypatch.setitem(tables.TABLES, "short", short)
    adapter, records = build_tiny_rl_run(num_problems=16, pretrain_steps=60)
    monkeypatch.setattr(data, "load_benchmark", lambda name, root=None: list(records))
    adapter.model.save_pretrained(tmp_path / "model")
    adapter.tokenizer.save_pretrained(tmp_path / "model")
    main(["table", "table=agdo_table1", f"models={{model: {tmp_path / 'missing'}}}", f"output_dir={tmp_path / 'tables'}"])
    assert "missing is not a directory (not trained yet?): paper numbers only" in capsys.readouterr().out
    main(["table", "table=short", f"models={{model: {tmp_path / 'model'}}}", "seeds=[0, 1]",
          f"output_dir={tmp_path / 'tables'}"])
    printed = capsys.readouterr().out
    assert "(21.2)" in printed and "(13.8)" in printed
    results = json.loads((tmp_path / "tables" / "short" / "results.json").read_text())
    assert {(r["row"], r["column"]) for r in results} == {(a, c) for a in ("Max-Prob", "Max-S") for c in ("3", "6")}
    assert any(r["mean"] > 0 for r in results)  # the model gets some right: equality below is not 0 == 0

    loaded = load_adapter(tmp_path / "model")
    for result in results:
        n = int(result["column"])
        sampler = SamplerConfig(gen_length=n, steps=n, block_length=3, temperature=0.1,
                                alg={"Max-Prob": "max_prob", "Max-S": "max_s"}[result["row"]], candidate_threshold=0.9)
        expected = [100 * evaluate(loaded, records, sampler, seed=seed, batch_size=8)["accuracy"] for seed in (0, 1)]
        assert result["mean"] == pytest.approx(sum(expected) / 2) and result["seeds"] == 2
        assert result["paper"] == short.paper[result["row"]][["3", "6"].index(result["column"])]
        assert f"{result['mean']:.1f}" in printed
