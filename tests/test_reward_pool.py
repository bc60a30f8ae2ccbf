"""RewardPool: mixed tasks scored in worker processes give exactly the in-process scores, in order;
errors of a reward come back as errors naming it; a bad score or record is refused."""

import pytest

from agdo.rewards import countdown_reward, exact_reward, sudoku_reward
from agdo.rewards.pool import RewardPool


def _tasks():
    records = [
        {"reward": "exact", "answer": "12", "index": 0},
        {"reward": "countdown", "numbers": [2, 3, 7], "target": 13},
        {"reward": "exact", "answer": "7"},
        {"reward": "sudoku", "puzzle": "1234341221434321", "size": 4},
        {"reward": "countdown", "numbers": [2, 3, 7], "target": 13},
        {"reward": "exact", "answer": "9"},
    ]
    completions = ["12", "<answer>2*3+7</answer>", "8", "<answer>1234341221434321</answer>", "<answer>2+3+7</answer>",
                   " 9 "]
    return records, completions


def _by_hand(records, completions):
    expected = []
    for record, completion in zip(records, completions):
        fields = {k: [v] for k, v in record.items() if k not in ("reward", "index")}
        function = {"exact": exact_reward, "countdown": countdown_reward, "sudoku": sudoku_reward}[record["reward"]]
        expected += function([completion], **fields)
    return expected


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_scores_match_each_reward_called_alone(workers):
    records, completions = _tasks()
    with RewardPool(workers) as pool:
        scores = pool.score(records, completions)
        assert scores == _by_hand(records, completions) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
        assert pool.score(records[::-1], completions[::-1]) == scores[::-1]  # workers are reused, order kept


def test_errors_name_the_reward_and_nothing_is_scored_silently():
    with RewardPool(2) as pool:
        with pytest.raises((ValueError, TypeError), match="reward .exact.: exact_reward: answer\[0\]"):
            pool.score([{"reward": "exact", "answer": None}], ["1"])  # a malformed task raises in the worker
        with pytest.raises(KeyError, match="unknown reward 'bogus'"):
            pool.score([{"reward": "bogus"}], ["1"])
        with pytest.raises(ValueError, match="no `reward` field"):
            pool.score([{"answer": "1"}], ["1"])
        with pytest.raises(ValueError, match="1 records but 2 completions"):
            pool.score([{"reward": "exact", "answer": "1"}], ["1", "2"])
        assert pool.score([{"reward": "exact", "answer": "1"}], ["1"]) == [1.0]  # still usable afterwards
    with pytest.raises(ValueError, match="workers"):
        RewardPool(-1)
