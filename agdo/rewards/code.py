"""Code reward: the fraction of unit tests a completion passes, decided outside the process that runs it.

Design (per completion: an untrusted sandbox and a trusted checker, both children of ``_sandbox_runner.py``):

* **Untrusted sandbox** (``run`` mode): the only process that executes model-written code. It loads the program
  (the task's prompt plus the completion) and then only answers *calls*: "call your global ``NAME`` with these
  arguments", answered with one line holding the encoded return value, or "error". It never receives a test, an
  expected value or a verdict, and nothing it can write is a verdict.
* **Trusted checker** (``check`` mode): never runs model-written code. It executes the task's prompt (trusted
  dataset text, for helpers such as HumanEval's ``poly``) and then each test with the entry point replaced by a
  proxy that asks the parent to make the call in the sandbox. The proxy returns the value decoded into *exact*
  builtin types (None, bool, int, float, str, bytes, list, tuple, dict, set, frozenset; ``type(x) is ...``
  checks, size- and depth-bounded), so every ``==``, ``abs(x - y) < 1e-6``, loop, ``assert not ...`` and helper
  of the test runs on genuine builtin objects: an always-equal object, an ``int`` subclass or any custom
  ``__eq__`` cannot be returned at all. A test passes when it runs to its end, made at least one call, and no
  call failed (raised, timed out, crashed, or broke the protocol).
* **Parent** (this module): relays calls, and accepts from the sandbox exactly one well-formed, size-bounded,
  strictly decoded reply per request; anything else (malformed, extra or unsolicited bytes, an over-long line,
  EOF, a missed deadline) fails that call, kills the sandbox's process group, and a fresh sandbox serves later
  calls. Nothing the sandbox sends can raise in the trainer. Each test has a wall-clock deadline, each
  completion a total one; a hung checker or sandbox is killed and replaced.

Since forging the reply channel (frame walking, wrapping ``os.write``, patching the encoder, signal handlers,
finalizers...) can only ever deliver a *value*, it is worth exactly what returning that value is worth.

Confinement of the sandbox, applied before the program runs, each layer where the machine allows it (the kernel's
layers, so they hold against native code too); ``sandbox_level()`` reports what this machine gives (logged once):
new mount, pid, network, IPC and UTS namespaces (plus a user namespace when not root); every mount read-only,
the working directory a private tmpfs of ``file_size_mb`` (the total disk quota), a fresh read-only /proc that
shows only the sandbox; ``nobody`` without groups or capabilities (the standard library and working directory
re-exposed read-only when they sit under a closed directory such as /root), or else no capabilities at all;
Landlock (reads only of the standard library and system libraries, writes only in the working directory, no
TCP, no signals or abstract sockets out of the sandbox); seccomp (no fork/clone/exec - hence no threads -, no
kill/ptrace/process_vm, no sockets, no io_uring, no mount/unshare/setns, no mknod/mkfifo, no setsid/setpgid, no
prctl, no chmod/chown/xattr, no memfd or SysV IPC); RLIMIT_CPU/AS/FSIZE/NOFILE/NPROC/CORE; stdin, stdout and
stderr on /dev/null; ``python -I -S`` (standard library only), a minimal environment, its own session, killed
as a process group. An audit hook remains as a speed bump only: pure Python can disable it.

Levels: ``strong`` = the namespaces (mount, pid, net) with private /proc and tmpfs, Landlock, seccomp, no
capabilities. ``medium`` = seccomp, no capabilities, and writes outside stopped by the kernel (Landlock or
read-only mounts). ``weak`` = anything less (then only seccomp, rlimits and the uid stand between the code and
the machine).

Guarantees and limits, honestly:

* A test never passes because the sandbox said so; at worst a completion controls the values its function
  returns for the arguments it is given, which is what is being graded. This holds at every level.
* Only exact builtin data crosses the boundary, so tests that need the candidate to return other objects
  (generators, numpy values, instances), to raise an expected exception, or to mutate its arguments in place
  fail. Threads and subprocesses are unavailable to tested code; only the standard library can be imported.
* Strong: no writes outside the tmpfs, no reads outside the standard library and system libraries, no network,
  no view of or signal to other processes (the trainer, its environment, other sandboxes). Without Landlock,
  reads are limited by file permissions only: a world-readable file (e.g. a dataset holding the solutions) is
  readable from the sandbox. Without a private tmpfs the sandbox may create no file at all.
* The prompt and the tests are trusted (they run unconfined, under rlimits, in the checker). Kernel bugs are
  out of scope: for adversarial workloads at scale, also run the trainer in a VM.
"""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agdo.rewards._pipes import LineReader, wait_for
from agdo.rewards._sandbox_runner import CodecError, decode, encode

_RUNNER_SCRIPT = Path(__file__).with_name("_sandbox_runner.py")
_NOBODY = 65534
_FENCED_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxLimits:
    test_timeout: float = 2.0  # wall seconds for loading the program, then for each test
    total_timeout: float = 10.0  # wall seconds for everything one completion runs
    startup_timeout: float = 3.0  # extra wall seconds for starting a process
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE, and the size of the working directory's tmpfs (all files together)
    open_files: int = 64  # RLIMIT_NOFILE
    reply_kb: int = 1024  # the largest reply (one encoded return value) accepted from the sandbox


# Isolation layers to leave out ("namespaces", "landlock"): only for tests of the weaker levels.
_SKIP_LAYERS: tuple[str, ...] = ()


def _child_limits(limits: SandboxLimits) -> dict:
    return {
        "cpu_seconds": int(limits.total_timeout + 2 * limits.startup_timeout) + 1,
        "memory_bytes": limits.memory_mb * 2**20,
        "file_size_bytes": limits.file_size_mb * 2**20,
        "open_files": limits.open_files,
        "disk_bytes": limits.file_size_mb * 2**20,
        "disk_inodes": 256,
        "reply_bytes": limits.reply_kb * 1024,
    }


# ----------------------------------------------------------------------------------------------- processes


class _Child:
    """A runner process speaking JSON lines: writes bounded by deadlines, reads bounded in time and size."""

    def __init__(self, mode: str, config: dict, workdir: str, max_line: int, deadline: float):
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_RUNNER_SCRIPT), mode],
            cwd=workdir,
            env={"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        os.set_blocking(self.process.stdin.fileno(), False)
        self.reader = LineReader(self.process.stdout, max_bytes=max_line)
        self.closed = False
        self.send(config, deadline)

    def send(self, message, deadline: float) -> bool:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        fd = self.process.stdin.fileno()
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not wait_for(fd, select.POLLOUT, remaining):
                return False
            try:
                data = data[os.write(fd, data) :]
            except BlockingIOError:
                continue
            except OSError:  # the child is gone (EPIPE)
                return False
        return True

    def receive(self, deadline: float):
        """The next message as parsed JSON, or None (EOF, deadline, over-long line, not JSON)."""
        line = self.reader.readline(deadline)
        if line is None:
            return None
        try:
            return json.loads(line)
        except (ValueError, RecursionError):
            return None

    def close(self, grace: float = 0.1) -> None:
        """Let the child exit on end of input for ``grace`` seconds, then SIGKILL its process group."""
        if self.closed:
            return
        self.closed = True
        pid = self.process.pid
        try:
            self.process.stdin.close()
        except OSError:
            pass
        give_up = time.monotonic() + grace
        # Poll without reaping, so the group id cannot be reused before the group is killed below.
        while time.monotonic() < give_up and os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            time.sleep(0.002)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process.stdout.close()


class _Sandbox:
    """The untrusted side: a runner process that loads the program, restarted after anything goes wrong."""

    def __init__(self, program: str, limits: SandboxLimits, workdir: str, give_up_at: float):
        self.program, self.limits, self.workdir, self.give_up_at = program, limits, workdir, give_up_at
        self.child: _Child | None = None
        self.broken = False  # the program did not load: every call fails

    def start(self) -> float | None:
        """Start a fresh sandbox and wait until the program is loaded; seconds spent, or None (broken)."""
        started = time.monotonic()
        deadline = min(started + self.limits.startup_timeout + self.limits.test_timeout, self.give_up_at)
        config = {
            "program": self.program,
            "workdir": self.workdir,
            "limits": _child_limits(self.limits),
            "skip": list(_SKIP_LAYERS),
        }
        child = _Child("run", config, self.workdir, self.limits.reply_kb * 1024, deadline)
        message = child.receive(deadline)
        if type(message) is list and len(message) == 2 and message[0] == "run" and type(message[1]) is dict:
            _note_level(message[1])  # sent before the program runs: genuine
            message = child.receive(deadline)
        if message == ["ready"] and not child.reader.pending():
            self.child = child
            return time.monotonic() - started
        if type(message) is list and message[:1] == ["sandbox-error"]:  # sent before the program runs
            _log.warning("code sandbox could not be set up: %s", str(message)[:500])
        child.close(grace=0)
        self.broken = True
        return None

    def call(self, name: str, args, kwargs, deadline: float) -> tuple[bool, object, float]:
        """(whether the call returned, its value, seconds spent starting a sandbox first)."""
        if self.broken:
            return False, None, 0.0
        spent = 0.0
        if self.child is None:
            spent = self.start()
            if spent is None:
                return False, None, 0.0
            deadline = min(deadline + spent, self.give_up_at)
        child = self.child
        # Exactly one reply per request: nothing may be waiting before the request, nor left after the reply.
        if child.reader.pending() or not child.send(["call", name, args, kwargs], deadline):
            self.stop()
            return False, None, spent
        reply = child.receive(deadline)
        if reply == ["err"] and not child.reader.pending():
            return False, None, spent
        try:
            if type(reply) is not list or len(reply) != 2 or reply[0] != "ok" or child.reader.pending():
                raise CodecError("malformed reply")
            return True, decode(reply[1]), spent
        except Exception:  # noqa: BLE001 - whatever the sandbox sends, it only fails the call
            self.stop()
            return False, None, spent

    def stop(self) -> None:
        if self.child is not None:
            self.child.close(grace=0)
            self.child = None

    def close(self) -> None:
        if self.child is not None:
            self.child.close()
            self.child = None


# ----------------------------------------------------------------------------------------------- sandbox level

_probe_lock = threading.Lock()
_probe: dict = {}


def _sandbox_features() -> dict:
    """What the sandbox setup achieves on this machine (probed once, no untrusted code). RuntimeError if the
    sandbox cannot be set up at all."""
    with _probe_lock:
        if not _probe:
            limits = SandboxLimits()
            workdir = tempfile.mkdtemp(prefix="agdo-sandbox-")
            try:
                if os.getuid() == 0:
                    os.chown(workdir, _NOBODY, _NOBODY)
                deadline = time.monotonic() + 30
                child = _Child("probe", {"workdir": workdir, "limits": _child_limits(limits)}, workdir, 1 << 16, deadline)
                try:
                    message = child.receive(deadline)
                finally:
                    child.close()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            if type(message) is list and len(message) == 2 and message[0] == "probe" and type(message[1]) is dict:
                _probe["features"] = message[1]
                level = _describe(message[1])
                (_log.info if level.startswith("strong") else _log.warning)("code sandbox level: %s", level)
            else:
                _probe["error"] = f"the code sandbox could not be set up: {str(message)[:500]}"
        if "error" in _probe:
            raise RuntimeError(_probe["error"])
        return _probe["features"]


def _describe(features: dict) -> str:
    """``strong``: namespaces (mount, pid, net) with a private /proc and tmpfs, Landlock (reads and writes
    restricted), seccomp, no capabilities. ``medium``: seccomp, no capabilities, and writes outside stopped by
    the kernel (Landlock or read-only mounts); reads then rest on file permissions. ``weak``: anything less."""
    namespaces = features.get("namespaces", [])
    no_capabilities = features.get("capabilities") == 0
    landlock = bool(features.get("landlock"))
    kernel_writes = landlock or bool(features.get("readonly_root"))
    strong = (
        {"mount", "pid", "net"} <= set(namespaces)
        and features.get("proc")
        and features.get("tmpfs")
        and landlock
        and features.get("seccomp")
        and no_capabilities
    )
    medium = features.get("seccomp") and no_capabilities and kernel_writes
    parts = [
        f"namespaces: {','.join(namespaces) or 'none'}",
        "read-only mounts" if features.get("readonly_root") else "host mounts writable",
        "private tmpfs working directory" if features.get("tmpfs") else "no private tmpfs (no file creation)",
        "private /proc" if features.get("proc") else "host /proc",
        f"identity: {features.get('identity')}",
        f"landlock ABI {features['landlock']}" if landlock else "no landlock (reads limited by file permissions only)",
        "seccomp" if features.get("seccomp") else "no seccomp",
    ]
    return f"{'strong' if strong else 'medium' if medium else 'weak'} ({'; '.join(parts)})"


_noted_levels: set = set()


def _note_level(features: dict) -> None:
    """Warn (once per kind) when a sandbox got weaker isolation than the probe (e.g. an unusual working directory)."""
    level = _describe(features)
    if level != _describe(_probe.get("features", {})) and level not in _noted_levels:
        _noted_levels.add(level)
        _log.warning("code sandbox ran at a different level than probed: %s", level)


def sandbox_level() -> str:
    """The isolation the code sandbox gets on this machine: ``strong``, ``medium`` or ``weak``, with the layers."""
    return _describe(_sandbox_features())


# ----------------------------------------------------------------------------------------------- running tests


def run_tests_in_sandbox(
    program: str,
    tests: list[str],
    limits: SandboxLimits = SandboxLimits(),
    *,
    functions: tuple[str, ...] | list[str] | None = None,
    trusted_setup: str = "",
) -> list[bool]:
    """Per-test pass/fail of ``tests`` against ``program``, the program running sandboxed.

    Each test is trusted source executed *outside* the sandbox after ``trusted_setup``; the names in
    ``functions`` (default: every name a test uses without defining it that is not a builtin) are proxies that
    call the program's function of that name in the sandbox and return its value as exact builtin data. A test
    passes when it runs without exception, calls the program at least once, and every call returns.
    """
    _sandbox_features()
    if functions is None:
        functions = _program_names(tests, trusted_setup)
    passed = [False] * len(tests)
    if not tests:
        return passed
    give_up_at = time.monotonic() + limits.total_timeout
    workdir = tempfile.mkdtemp(prefix="agdo-sandbox-")
    sandbox = _Sandbox(program, limits, workdir, give_up_at)
    try:
        if os.getuid() == 0:  # the child drops to nobody and must still own its working directory
            os.chown(workdir, _NOBODY, _NOBODY)
        pending = list(range(len(tests)))
        checker = _start_checker(trusted_setup, tests, pending, functions, limits, workdir, give_up_at)
        if sandbox.start() is None:
            checker.close(grace=0)
            return passed
        while True:
            verdicts, finished = _drive_checker(checker, sandbox, set(functions), limits, give_up_at)
            for index, verdict in verdicts.items():
                passed[index] = verdict
            pending = [index for index in pending if index not in verdicts]
            if finished or not pending or time.monotonic() >= give_up_at:
                break
            pending = pending[1:]  # the checker got stuck in (or died before) this test: it fails
            if not pending:
                break
            checker = _start_checker(trusted_setup, tests, pending, functions, limits, workdir, give_up_at)
    finally:
        sandbox.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return passed


def _start_checker(setup, tests, pending, functions, limits, workdir, give_up_at) -> _Child:
    config = {
        "setup": setup,
        "functions": list(functions),
        "tests": [[index, tests[index]] for index in pending],
        "limits": _child_limits(limits),
    }
    deadline = min(time.monotonic() + limits.startup_timeout, give_up_at)
    return _Child("check", config, workdir, 64 * limits.reply_kb * 1024, deadline)


def _drive_checker(
    checker: _Child, sandbox: _Sandbox, functions: set, limits: SandboxLimits, give_up_at: float
) -> tuple[dict[int, bool], bool]:
    """Relay the checker's calls to the sandbox until it finishes or gets stuck: (verdicts, finished)."""
    verdicts: dict[int, bool] = {}
    current, failed, returned = None, False, 0
    deadline = min(time.monotonic() + limits.startup_timeout + limits.test_timeout, give_up_at)
    try:
        while True:  # the checker is trusted, but a malformed message still only ends this checker
            message = checker.receive(deadline)
            if type(message) is not dict:
                return verdicts, False
            if "call" in message and current is not None:
                ok = False
                if not failed and type(message["call"]) is str and message["call"] in functions:  # after a failed call, a test only fails faster
                    ok, value, spent = sandbox.call(message["call"], message.get("args"), message.get("kwargs"), deadline)
                    deadline = min(deadline + spent, give_up_at)
                if ok:
                    returned += 1
                    reply = {"ok": encode(value)}
                else:
                    failed = True
                    reply = {"fail": "the call raised, timed out or broke the protocol"}
                    deadline = min(max(deadline, time.monotonic() + limits.test_timeout), give_up_at)  # to wind up
                if not checker.send(reply, deadline):
                    return verdicts, False
            elif "begin" in message and type(message["begin"]) is int:
                current, failed, returned = message["begin"], False, 0
                deadline = min(time.monotonic() + limits.test_timeout, give_up_at)
            elif "end" in message and message["end"] == current:
                verdicts[current] = message.get("passed") is True and not failed and returned > 0
                current = None
                deadline = min(time.monotonic() + limits.test_timeout, give_up_at)
            elif "ready" in message:
                if message.get("setup_error"):
                    _log.warning("code reward: the trusted setup failed: %s", message["setup_error"])
                deadline = min(time.monotonic() + limits.test_timeout, give_up_at)
            elif message.get("done") is True:
                return verdicts, True
            else:
                return verdicts, False
    except Exception:  # noqa: BLE001 - e.g. an unhashable test index: treat like a stuck checker
        _log.exception("code reward: unexpected message from the test checker")
        return verdicts, False
    finally:
        checker.close()


def _program_names(tests: list[str], setup: str) -> list[str]:
    """Names the tests use without binding them (nor the setup) that are not builtins: the program's functions."""
    used, bound = set(), set()
    for source, is_test in [(setup, False)] + [(test, True) for test in tests]:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (used if isinstance(node.ctx, ast.Load) and is_test else bound).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bound.add(node.name)
    return sorted(used - bound - set(dir(builtins)))


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
    """Fraction of a HumanEval-format task's split tests that each completion passes (sandboxed, in parallel).

    The tests run in the trusted checker after the task's ``prompt`` (trusted text: its helper functions serve
    the tests), calling ``entry_point`` in the sandbox.
    """

    def score(completion: str, task_prompt: str, task_test: str, task_entry_point: str) -> float:
        tests = split_humaneval_tests(task_test, task_entry_point)
        program = humaneval_program(task_prompt, completion, task_entry_point)
        verdicts = run_tests_in_sandbox(
            program, list(tests), limits, functions=(task_entry_point,), trusted_setup=task_prompt
        )
        return sum(verdicts) / len(tests)

    with ThreadPoolExecutor(max_workers=max_workers or os.cpu_count()) as pool:
        tasks = list(zip(completions, prompt, test, entry_point, strict=True))
        return list(pool.map(lambda task: score(*task), tasks))
