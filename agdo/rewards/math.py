"""Math reward: the completion's last ``\\boxed{...}`` checked against the gold answer with math-verify.

Timeout design. math-verify's built-in timeout uses ``signal.alarm``, which only works in the main thread
and cannot interrupt long C-level work (SymPy evaluating ``9^{9^{9^9}}`` is a single huge integer power).
So the check runs in one long-lived child process (:mod:`agdo.rewards._math_worker`) with math-verify's
timeouts disabled and an address-space limit; the parent sends one request at a time over a pipe and waits
on it with ``select`` and a wall-clock deadline. When the deadline passes, the child is killed (SIGKILL),
the check scores 0.0 and a fresh child is started for the next request. A normal check therefore costs one
pipe round trip, and only a pathological one pays for a process restart (~1 s to import SymPy again).
"""

from __future__ import annotations

import atexit
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from agdo.rewards._pipes import LineReader
from agdo.rewards.exact import check_columns, gold_text

_WORKER_SCRIPT = Path(__file__).with_name("_math_worker.py")


_BOX_OR_BRACE = re.compile(r"\\boxed\{|[{}]")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (braces balanced), or None if there is none.

    "Last" means the closed box that starts last; an unclosed box (a truncated completion) is skipped, so
    the previous complete box counts. One left-to-right pass over the braces with a stack: linear time
    even on adversarial text such as ``"\\boxed{" * 50000`` (each box scanning to the end would be
    quadratic).
    """
    if not isinstance(text, str):
        raise TypeError(f"last_boxed takes a string, got {type(text).__name__}")
    best_start, best = -1, None
    stack: list[int] = []  # for each open brace: where its box's content starts, or -1 for a plain brace
    for match in _BOX_OR_BRACE.finditer(text):
        token = match.group()
        if token == "}":
            if stack:
                content_start = stack.pop()
                if content_start > best_start:
                    best_start, best = content_start, text[content_start : match.start()]
        else:
            stack.append(match.end() if token != "{" else -1)
    return best


def gsm8k_gold(solution: str) -> str:
    """GSM8K gold answer: the text after the last ``####``, without thousands separators."""
    marker = solution.rfind("####")
    if marker == -1:
        raise ValueError(f"GSM8K solution has no '####' answer line: {solution[-80:]!r}")
    return solution[marker + len("####") :].strip().replace(",", "")


class MathVerifier:
    """Answer equivalence with math-verify in a child process, under a per-check wall-clock deadline.

    Thread-safe (checks are serialised). ``timeout`` bounds each check; ``memory_limit_mb`` is the child's
    address-space limit; ``startup_timeout`` bounds importing math-verify in a fresh child.
    """

    def __init__(self, timeout: float = 5.0, memory_limit_mb: int = 4096, startup_timeout: float = 120.0):
        self.timeout = timeout
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen | None = None
        self._replies: LineReader | None = None
        self._lock = threading.Lock()

    def equivalent(self, gold: str, answer: str) -> bool:
        """Whether ``answer`` equals ``gold`` (both bare LaTeX/plain answers, e.g. ``\\frac{1}{2}`` and ``0.5``).

        False when the check fails, crashes or exceeds ``timeout``.
        """
        request = json.dumps({"gold": _boxed(gold), "pred": _boxed(answer)}) + "\n"
        with self._lock:
            process = self._ensure_started()
            try:
                process.stdin.write(request.encode())
                process.stdin.flush()
                reply = self._replies.readline(time.monotonic() + self.timeout)
            except OSError:  # the child died (e.g. killed by the kernel): restart on the next check
                reply = None
            if reply is None:
                self._stop()
                return False
            return json.loads(reply)["equal"]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure_started(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        memory_limit = self.memory_limit_mb * 2**20 if self.memory_limit_mb else 0
        self._process = subprocess.Popen(
            [sys.executable, str(_WORKER_SCRIPT), str(memory_limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._replies = LineReader(self._process.stdout)
        if self._replies.readline(time.monotonic() + self.startup_timeout) != "ready":
            self._stop()
            raise RuntimeError(f"math-verify worker did not start within {self.startup_timeout} s (is math-verify installed?)")
        return self._process

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for pipe in (self._process.stdin, self._process.stdout):
                pipe.close()
            self._process = None


def _boxed(answer: str) -> str:
    # Wrapping in \boxed{} makes math-verify treat the whole string as one LaTeX answer.
    return "\\boxed{" + answer + "}"


_default_verifier: MathVerifier | None = None


def default_verifier() -> MathVerifier:
    """The process-wide verifier used by :func:`math_reward` (started on first use, stopped at exit)."""
    global _default_verifier
    if _default_verifier is None:
        _default_verifier = MathVerifier()
        atexit.register(_default_verifier.close)
    return _default_verifier


def math_reward(completions: list[str], answer: list[str], verifier: MathVerifier | None = None, **_) -> list[float]:
    """1.0 where the completion's last ``\\boxed{}`` matches the gold ``answer``, else 0.0 (no box: 0.0).

    Raises ``TypeError``/``ValueError`` naming ``answer[i]`` for a gold answer that is ``None``, empty or
    not text/number (before any check runs), and when the columns do not line up with ``completions``.
    """
    check_columns("math_reward", completions, answer=answer)
    golds = [gold_text("math_reward", "answer", index, gold) for index, gold in enumerate(answer)]
    verifier = verifier or default_verifier()
    rewards = []
    for completion, gold in zip(completions, golds, strict=True):
        predicted = last_boxed(completion)
        rewards.append(float(predicted is not None and verifier.equivalent(gold, predicted)))
    return rewards
