"""Code reward: the fraction of unit tests a completion passes, run in a sandboxed child process.

Sandbox design (untrusted code never runs in the caller's process):

* One child per completion runs the program once and then its tests one by one, reporting a verdict per
  test over a pipe (``_sandbox_runner.py``). One process per completion keeps the common case cheap; to keep
  one bad test from hiding the others, the parent gives every test its own wall-clock deadline. When a test
  hangs or kills the child (``os._exit``, a signal, a resource limit), that test fails, the whole process
  group is killed, and a fresh child continues with the remaining tests. A program that fails to load fails
  all tests at once. ``total_timeout`` caps the time spent on one completion; tests not reached fail.
* The child is ``python -I`` (no environment-driven imports, no user site) started in a new session (its
  own process group), stdin closed, a minimal environment (no secrets inherited), and a fresh temporary
  directory as cwd, removed afterwards. After every run the whole process group is SIGKILLed.
* Inside the child, before untrusted code: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0
  and RLIMIT_NPROC=0; a seccomp filter (x86_64/aarch64) failing fork/vfork/clone/clone3/execve(at) with
  EPERM, the fork-bomb guard that also holds for root, for whom the kernel ignores RLIMIT_NPROC; a drop to
  ``nobody`` when running as root and ``nobody`` can read the standard library (not for a Python under
  /root); and an audit hook refusing process creation, ctypes, sockets and writes outside the working
  directory. If this setup fails the child reports it and the parent raises instead of scoring 0.

Limits: not a security boundary against a determined attacker. Writes outside the temporary directory are
stopped only by the audit hook unless the uid drop happened, and audit hooks can be bypassed by clever
pure-Python tricks; reads are not restricted, and there are no network namespaces (sockets are refused by
the hook only). Threads are unavailable to tested code. For hostile workloads, run the trainer inside a
container or add namespaces/Landlock around this.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agdo.rewards._pipes import LineReader

_RUNNER_SCRIPT = Path(__file__).with_name("_sandbox_runner.py")
_NOBODY = 65534
_FENCED_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class SandboxLimits:
    test_timeout: float = 2.0  # wall seconds for loading the program, then for each test
    total_timeout: float = 10.0  # wall seconds for everything one completion runs
    startup_timeout: float = 3.0  # extra wall seconds for the interpreter to start
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE


def run_tests_in_sandbox(program: str, tests: list[str], limits: SandboxLimits = SandboxLimits()) -> list[bool]:
    """Run ``program`` and then each test source in its namespace, in a sandbox; per-test pass/fail.

    A test passes when executing it raises nothing (any exception, ``SystemExit`` included, is a failure).
    """
    passed = [False] * len(tests)
    pending = list(range(len(tests)))
    give_up_at = time.monotonic() + limits.total_timeout
    while pending and time.monotonic() < give_up_at:
        loaded, verdicts = _run_child(program, [(index, tests[index]) for index in pending], limits, give_up_at)
        if not loaded:
            break
        for index, verdict in verdicts.items():
            passed[index] = verdict
        # The first test without a verdict hung or took the child down: it fails, the rest get a fresh child.
        pending = [index for index in pending if index not in verdicts][1:]
    return passed


def _run_child(
    program: str, indexed_tests: list[tuple[int, str]], limits: SandboxLimits, give_up_at: float
) -> tuple[bool, dict[int, bool]]:
    """One sandboxed child over ``indexed_tests``: (whether the program loaded, verdicts received in time)."""
    token = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="agdo-sandbox-")
    try:
        payload = {
            "token": token,
            "program": program,
            "tests": indexed_tests,
            "limits": {
                "cpu_seconds": int(limits.total_timeout + limits.startup_timeout) + 1,
                "memory_bytes": limits.memory_mb * 2**20,
                "file_size_bytes": limits.file_size_mb * 2**20,
                "open_files": limits.open_files,
            },
        }
        payload_path = os.path.join(workdir, "payload.json")
        with open(payload_path, "w") as payload_file:
            json.dump(payload, payload_file)
        if os.getuid() == 0:  # the child drops to nobody and must still own its working directory
            os.chown(workdir, _NOBODY, _NOBODY)
        child = subprocess.Popen(
            [sys.executable, "-I", str(_RUNNER_SCRIPT), payload_path],
            cwd=workdir,
            env={"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        try:
            return _collect_verdicts(LineReader(child.stdout), token, len(indexed_tests), limits, give_up_at)
        finally:
            # Kill the group before reaping the leader, so its pid (= the group id) cannot have been reused.
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
            child.stdout.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _collect_verdicts(
    results: LineReader, token: str, expected: int, limits: SandboxLimits, give_up_at: float
) -> tuple[bool, dict[int, bool]]:
    deadline = min(time.monotonic() + limits.startup_timeout + limits.test_timeout, give_up_at)
    loaded, verdicts = False, {}
    while len(verdicts) < expected:
        line = results.readline(deadline)
        if line is None:  # deadline passed or the child is gone
            break
        mark, _, message = line.partition(" ")
        if mark != token:
            continue
        if message == "broken":
            break
        if message.startswith("sandbox-error"):
            raise RuntimeError(f"the code sandbox could not be set up: {message}")
        if message == "ready":
            loaded = True
        else:
            index, verdict = message.split()
            verdicts[int(index)] = verdict == "pass"
        deadline = min(time.monotonic() + limits.test_timeout, give_up_at)
    return loaded, verdicts


# ----------------------------------------------------------------------------------------------- HumanEval


def humaneval_program(prompt: str, completion: str, entry_point: str) -> str:
    """The program to test: ``prompt + completion``, or, when the completion holds a fenced code block that
    defines ``entry_point``, the prompt followed by that block (a later ``def`` replaces the prompt's stub)."""
    for block in _FENCED_BLOCK.findall(completion):
        if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", block):
            return prompt + "\n\n" + block
    return prompt + completion


@functools.lru_cache(maxsize=1024)
def split_humaneval_tests(test: str, entry_point: str) -> tuple[str, ...]:
    """One standalone test source per top-level statement of ``check`` that asserts something about ``candidate``.

    Each test keeps the module-level preamble of ``test`` and the non-asserting setup statements of
    ``check`` that precede it (``import random``, ``rng = ...``), and ends with ``check(entry_point)``.
    Asserts that never mention ``candidate`` (HumanEval's ``assert True``) are dropped: they would give
    free credit.
    """
    module = ast.parse(test)
    checks = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "check"]
    if len(checks) != 1:
        raise ValueError("HumanEval test source must define exactly one check(candidate) function")
    check = checks[0]
    preamble = [node for node in module.body if node is not check]
    candidate = check.args.args[0].arg
    setup, tests = [], []
    for statement in check.body:
        nodes = list(ast.walk(statement))
        if not any(isinstance(node, ast.Assert) for node in nodes):
            setup.append(statement)
        elif any(isinstance(node, ast.Name) and node.id == candidate for node in nodes):
            single = copy.copy(check)
            single.body = [*setup, statement]
            source = ast.unparse(ast.Module(body=[*preamble, single], type_ignores=[]))
            tests.append(f"{source}\n\ncheck({entry_point})\n")
    if not tests:
        raise ValueError("HumanEval check(candidate) contains no assertion about the candidate")
    return tuple(tests)


def code_reward(
    completions: list[str],
    prompt: list[str],
    test: list[str],
    entry_point: list[str],
    limits: SandboxLimits = SandboxLimits(),
    max_workers: int | None = None,
    **_,
) -> list[float]:
    """Fraction of a HumanEval-format task's split tests that each completion passes (sandboxed, in parallel)."""

    def score(completion: str, task_prompt: str, task_test: str, task_entry_point: str) -> float:
        tests = split_humaneval_tests(task_test, task_entry_point)
        program = humaneval_program(task_prompt, completion, task_entry_point)
        return sum(run_tests_in_sandbox(program, list(tests), limits)) / len(tests)

    with ThreadPoolExecutor(max_workers=max_workers or os.cpu_count()) as pool:
        tasks = list(zip(completions, prompt, test, entry_point, strict=True))
        return list(pool.map(lambda task: score(*task), tasks))

