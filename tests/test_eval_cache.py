"""The block KV cache (``SamplerConfig.cache``) as a setting of every command that decodes for evaluation or
data: `agdo table` (``TableConfig``) and MDPO's over-denoising filter (``OverdenoisingConfig``) take ``cache``
and ``cache_lookahead`` (default ``none``, exact), reject bad values naming the field, and decode with them.
(``EvalConfig`` and ``RLConfig``: tests/test_block_cache.py; RL steps and 2-process evaluation with the cache:
tests/test_rl.py, tests/test_distributed_generation.py.)"""

import json
import sys
from pathlib import Path

import pytest

from agdo import data, tables
from agdo.config import build_config
from agdo.eval import evaluate
from agdo.sampling import SamplerConfig
from agdo.training import mdpo

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import build_tiny_rl_run  # noqa: E402


def test_table_and_filter_configs_take_the_cache_and_reject_bad_values():
    default = tables.TableConfig()
    assert (default.cache, default.cache_lookahead) == ("none", None)
    config = build_config(tables.TableConfig, None, ["table=mdpo_table2", "cache=prefix", "cache_lookahead=4"])
    assert (config.cache, config.cache_lookahead) == ("prefix", 4)
    table = tables.TABLES["mdpo_table2"]
    row, column = next(iter(table.rows.values())), next(iter(table.columns.values()))
    sampler = tables._sampler(table, row, column, cache="prefix", cache_lookahead=4)
    assert (sampler.cache, sampler.cache_lookahead) == ("prefix", 4)
    with pytest.raises(ValueError, match=r"TableConfig \(row .*\): SamplerConfig: cache must be one of .* got 'full'"):
        tables.TableConfig(cache="full")
    with pytest.raises(ValueError, match="TableConfig .*cache_lookahead must be None"):
        tables.TableConfig(cache="dual", cache_lookahead=2)

    filter_config = mdpo.OverdenoisingConfig(train_file="x.jsonl")
    assert (filter_config.cache, filter_config.sampler_config().cache) == ("none", "none")
    sampler = mdpo.OverdenoisingConfig(train_file="x.jsonl", cache="prefix", cache_lookahead=2).sampler_config()
    assert (sampler.cache, sampler.cache_lookahead, sampler.return_predictions) == ("prefix", 2, True)
    assert mdpo.OverdenoisingConfig(train_file="x.jsonl", cache="dual").sampler_config().cache == "dual"
    with pytest.raises(ValueError, match="OverdenoisingConfig: SamplerConfig: cache must be one of .* got 'full'"):
        mdpo.OverdenoisingConfig(train_file="x.jsonl", cache="full")
    with pytest.raises(ValueError, match="OverdenoisingConfig: .*cache_lookahead must be None"):
        mdpo.OverdenoisingConfig(train_file="x.jsonl", cache_lookahead=2)


# 2 blocks of 3 positions in 3 steps each: 2 of every block's 3 steps run against the kept K/V.
CACHED = dict(gen_length=6, steps=6, block_length=3)


def test_table_cells_decode_with_the_cache(tmp_path, monkeypatch):
    """Every cell of a run with ``cache=prefix`` is decoded with it: each cell equals an independent
    `evaluate` with the cached sampler, and the evaluations run got the cache setting."""
    adapter, records = build_tiny_rl_run(num_problems=9, pretrain_steps=60)
    short = tables.PaperTable("short", "test", {"Max-Prob": tables.Row("model", "max_prob"),
                                                "Max-S": tables.Row("model", "max_s")},
                              {"6": dict(benchmark="gsm8k", gen_length=6, steps=6)},
                              {"Max-Prob": [1.0], "Max-S": [2.0]}, {**tables.AGDO_DECODING, "block_length": 3})
    monkeypatch.setitem(tables.TABLES, "short", short)
    monkeypatch.setattr(data, "load_benchmark", lambda name, root=None: list(records))
    import agdo.eval

    seen = []

    def recording_evaluate(adapter, records, sampler_config, **kwargs):
        seen.append(sampler_config)
        return evaluate(adapter, records, sampler_config, **kwargs)

    monkeypatch.setattr(agdo.eval, "evaluate", recording_evaluate)
    config = tables.TableConfig(table="short", seeds=[0], cache="prefix", output_dir=str(tmp_path))
    tables.run_table(config, adapters={"model": adapter})
    assert [(s.alg, s.cache, s.cache_lookahead) for s in seen] == [("max_prob", "prefix", None),
                                                                    ("max_s", "prefix", None)]
    results = json.loads((tmp_path / "short" / "results.json").read_text())
    for result, alg in zip(results, ("max_prob", "max_s"), strict=True):
        sampler = SamplerConfig(**CACHED, temperature=0.1, alg=alg, candidate_threshold=0.9, cache="prefix")
        assert result["mean"] == pytest.approx(100 * evaluate(adapter, records, sampler, seed=0, batch_size=8)["accuracy"])


def test_overdenoising_filter_decodes_with_the_cache(tmp_path, monkeypatch):
    """``filter_overdenoising`` with ``cache=prefix``: the trajectories are classified with the cached sampler
    (per-step predictions included), and the file holds exactly the over-denoising prompts of that run."""
    adapter, records = build_tiny_rl_run(num_problems=9, pretrain_steps=60)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    seen, categories = [], []
    classify = mdpo.classify_trajectories

    def recording_classify(adapter, records, sampler, **kwargs):
        seen.append(sampler)
        categories.extend(classify(adapter, records, sampler, **kwargs))
        return list(categories)

    monkeypatch.setattr(mdpo, "classify_trajectories", recording_classify)
    config = mdpo.OverdenoisingConfig(train_file=str(prompts), output_file=str(tmp_path / "od.jsonl"),
                                      temperature=1.0, reward_workers=0, cache="prefix", **CACHED)
    counts = mdpo.filter_overdenoising(config, adapter=adapter)
    assert [(s.cache, s.return_predictions, s.block_length) for s in seen] == [("prefix", True, 3)]
    assert counts == {name: categories.count(name) for name in mdpo.CATEGORIES} and sum(counts.values()) == 9
    kept = [json.loads(line) for line in (tmp_path / "od.jsonl").read_text().splitlines()]
    assert kept == [r for r, c in zip(records, categories, strict=True) if c == "over_denoising"]
