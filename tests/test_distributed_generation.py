"""Decoding split across processes (:mod:`agdo.sampling.distributed`): the shares, and `evaluate`, `run_eval`
and MDPO's over-denoising filter on 2 gloo processes giving exactly what 1 process gives."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import evaluate_tiny  # noqa: E402
from training_helpers import fresh_accelerate, launch_two_processes, launch_unavailable, one_thread  # noqa: E402,F401

from agdo.sampling import decode_across_processes, process_share  # noqa: E402

# 9 records in shares of 4 and 5, batches of 3: neither share splits into whole batches, and the batches of
# 2 processes are not those of 1.
EVAL_OVERRIDES = ["gen_length=3", "steps=3", "block_length=3", "temperature=0.5", "algs=[max_prob, random]",
                  "seeds=[0, 1]", "batch_size=3"]


@pytest.mark.parametrize("count", [0, 1, 2, 5, 9])
@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_shares_cover_every_record_once_in_order(count, processes):
    shares = [process_share(count, SimpleNamespace(num_processes=processes, process_index=p))
              for p in range(processes)]
    assert [i for share in shares for i in share] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_without_an_accelerator_the_batches_are_the_plain_loops():
    calls = []

    def decode_batch(batch, indices):
        calls.append((list(batch), list(indices)))
        return [record * 10 for record in batch]

    records = list(range(7))
    assert decode_across_processes(records, 3, decode_batch) == [r * 10 for r in records]
    assert calls == [([0, 1, 2], [0, 1, 2]), ([3, 4, 5], [3, 4, 5]), ([6], [6])]
    with pytest.raises(ValueError, match="returned 1 outputs for 3 records"):
        decode_across_processes(records, 3, lambda batch, indices: [0])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_processes_evaluate_exactly_like_one(tmp_path, monkeypatch):
    result = launch_two_processes("eval", tmp_path / "ddp", EVAL_OVERRIDES)
    if result.returncode != 0 and launch_unavailable(result):
        pytest.skip(f"could not start 2 gloo processes here:\n{result.stderr[-2000:]}")
    assert result.returncode == 0, result.stderr[-4000:]

    single = evaluate_tiny(tmp_path / "single", EVAL_OVERRIDES)
    single = json.loads(json.dumps(single))  # compared as the workers wrote theirs: through JSON
    for process in (0, 1):  # every process returns everything: completions, scores, categories, table
        assert json.loads((tmp_path / "ddp" / f"process{process}.json").read_text()) == single
    scores = [s for evaluation in single["evaluations"].values() for s in evaluation["scores"]]
    assert 0 < sum(scores) < len(scores)  # some right, some wrong: the equality is not 0 == 0
    assert len(single["evaluations"]["max_prob/0"]["completions"]) == 9
    # results.jsonl written once (by the main process), with the single process's lines.
    assert ((tmp_path / "ddp" / "results.jsonl").read_text().splitlines()
            == (tmp_path / "single" / "results.jsonl").read_text().splitlines())
    assert len((tmp_path / "single" / "results.jsonl").read_text().splitlines()) == 4


# With the block KV cache: 2 blocks of 3 positions in 3 steps each, so 2 of every block's 3 steps attend to
# the K/V kept from its first step. Static decoding: every row of a batch is on the same block at every step,
# so which rows share a batch (it differs between 1 and 2 processes) changes nothing.
CACHED_EVAL_OVERRIDES = ["gen_length=6", "steps=6", "block_length=3", "temperature=0.5", "algs=[max_prob, random]",
                         "seeds=[0, 1]", "batch_size=3", "cache=prefix"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_processes_evaluate_with_the_prefix_cache_exactly_like_one(tmp_path):
    """`evaluate`, the over-denoising filter (per-step records) and `run_eval` with ``cache=prefix``: 2 gloo
    processes give exactly what 1 process gives, and the cache is really on (the results are not
    ``cache=none``'s)."""
    result = launch_two_processes("eval", tmp_path / "ddp", CACHED_EVAL_OVERRIDES)
    if result.returncode != 0 and launch_unavailable(result):
        pytest.skip(f"could not start 2 gloo processes here:\n{result.stderr[-2000:]}")
    assert result.returncode == 0, result.stderr[-4000:]

    single = json.loads(json.dumps(evaluate_tiny(tmp_path / "single", CACHED_EVAL_OVERRIDES)))
    for process in (0, 1):
        assert json.loads((tmp_path / "ddp" / f"process{process}.json").read_text()) == single
    assert ((tmp_path / "ddp" / "results.jsonl").read_text().splitlines()
            == (tmp_path / "single" / "results.jsonl").read_text().splitlines())
    scores = [s for evaluation in single["evaluations"].values() for s in evaluation["scores"]]
    assert 0 < sum(scores) < len(scores)  # some right, some wrong: the equality is not 0 == 0
    assert len(set(single["categories"])) > 1

    uncached = evaluate_tiny(tmp_path / "uncached", [o for o in CACHED_EVAL_OVERRIDES if o != "cache=prefix"])
    assert ([e["completions"] for e in uncached["evaluations"].values()]
            != [e["completions"] for e in single["evaluations"].values()])
