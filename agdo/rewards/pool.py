"""Scoring many completions of mixed tasks in parallel worker processes.

An RL step scores ``prompts x num_generations`` completions; each record names its reward
(``record["reward"]``, a key of :data:`agdo.rewards.REWARDS`) and carries the fields that reward reads.
:class:`RewardPool` groups the completions by reward, splits each group into one slice per worker and
scores the slices at once in ``workers`` long-lived child interpreters (``python -m
agdo.rewards._pool_worker``: started once, fed JSON lines; nothing of the trainer — CUDA context, model,
``__main__`` — is inherited or re-imported). Code rewards still run every program in its own sandboxed
child. Results come back in input order; every score is checked to be a finite number, and a reward
that raises (e.g. a malformed task) raises the same error type here, naming the reward.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import defaultdict
from typing import Sequence

from . import get_reward

_NOT_FIELDS = ("reward", "index")
_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError}


class RewardPool:
    """``score(records, completions)`` in ``workers`` child processes (0 = in this process, for debugging)."""

    def __init__(self, workers: int = 4):
        if workers < 0:
            raise ValueError(f"`workers` must be >= 0, got {workers}")
        self.workers = workers
        self._children: list[subprocess.Popen] = []

    def score(self, records: Sequence[dict], completions: Sequence[str]) -> list[float]:
        if len(records) != len(completions):
            raise ValueError(f"{len(records)} records but {len(completions)} completions")
        by_reward = defaultdict(list)
        for i, record in enumerate(records):
            if "reward" not in record:
                raise ValueError(f"record {i} has no `reward` field naming its reward function")
            get_reward(record["reward"])  # an unknown name fails here, with the list of rewards
            by_reward[record["reward"]].append(i)
        requests = []
        for name, positions in by_reward.items():
            per_slice = max(1, math.ceil(len(positions) / max(self.workers, 1)))
            for start in range(0, len(positions), per_slice):
                part = positions[start : start + per_slice]
                keys = [k for k in records[part[0]] if k not in _NOT_FIELDS]
                fields = {k: [records[i].get(k) for i in part] for k in keys}
                requests.append((part, {"reward": name, "completions": [completions[i] for i in part],
                                        "fields": fields}))
        scores = [math.nan] * len(records)
        for batch_start in range(0, len(requests), max(self.workers, 1)):
            batch = requests[batch_start : batch_start + max(self.workers, 1)]
            for (part, request), values in zip(batch, self._run(batch)):
                if len(values) != len(part):
                    raise RuntimeError(f"reward {request['reward']!r} returned {len(values)} scores for "
                                       f"{len(part)} completions")
                for i, value in zip(part, values):
                    if not math.isfinite(value):
                        raise ValueError(f"reward {request['reward']!r} gave {value} for completion {i}")
                    scores[i] = value
        return scores

    def _run(self, batch: list) -> list[list[float]]:
        """Each request of ``batch`` on its own worker, all at once."""
        if self.workers == 0:
            return [[float(s) for s in get_reward(r["reward"])(r["completions"], **r["fields"])] for _, r in batch]
        children = [self._child(k) for k in range(len(batch))]
        for child, (_, request) in zip(children, batch):
            child.stdin.write(json.dumps(request) + "\n")
            child.stdin.flush()
        replies = []
        for k, (child, (_, request)) in enumerate(zip(children, batch)):
            line = child.stdout.readline()
            if not line:
                self.close()
                raise RuntimeError(f"reward worker {k} died while scoring {request['reward']!r}")
            reply = json.loads(line)
            if "error" in reply:
                raise _ERRORS.get(reply["error"], RuntimeError)(f"reward {request['reward']!r}: {reply['message']}")
            replies.append(reply["scores"])
        return replies

    def _child(self, k: int) -> subprocess.Popen:
        while len(self._children) <= k:
            self._children.append(None)
        child = self._children[k]
        if child is None or child.poll() is not None:
            child = subprocess.Popen([sys.executable, "-m", "agdo.rewards._pool_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("a reward worker failed to start (see its stderr above)")
            self._children[k] = child
        return child

    def close(self) -> None:
        for child in self._children:
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
        for child in self._children:
            if child is not None:
                child.stdin.close()
                child.stdout.close()
        self._children = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
