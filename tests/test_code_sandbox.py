"""The code reward under attack: hostile completions of a trivial task must all score 0.0, honest ones 1.0.

Each attack is a *wrong* solution of ``add(a, b)`` plus a trick that would have earned credit (or escaped) if
the harness trusted the process running it, or that returns the right answer only when an escape worked (so
any containment failure shows up as credit). The attacks run in one parallel batch per sandbox level (module
fixtures) with small timeouts; side effects are checked on the host afterwards. Controls show that the
escapes do work without the sandbox, and that the harness can fail (correct 1.0, wrong 0.0, partial).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import agdo.rewards.code as code_module
from agdo.rewards._sandbox_runner import CodecError, decode, encode
from agdo.rewards.code import (
    SandboxLimits,
    code_reward,
    humaneval_program,
    run_tests_in_sandbox,
    sandbox_level,
    split_humaneval_tests,
)

FAST = SandboxLimits(test_timeout=1.0, total_timeout=5.0, startup_timeout=3.0, memory_mb=512)
RUNNER = Path(code_module.__file__).with_name("_sandbox_runner.py")
RUNNER_NAME = b"_sandbox_runner.py"
SECRET = "agdo-secret-7f3a91"
IS_ROOT = os.getuid() == 0

PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'
TEST = """
def check(candidate):
    assert candidate(1, 2) == 3
    assert candidate(-4, 9) == 5
    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-6
"""


def fenced(source: str) -> str:
    return f"Here is my solution:\n```python\n{source.strip()}\n```\n"


def sandbox_processes() -> list[int]:
    """Pids of processes still running a sandbox runner."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and RUNNER_NAME in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def wait_for_no_sandbox_processes(timeout: float = 3.0) -> list[int]:
    give_up = time.monotonic() + timeout
    while (left := sandbox_processes()) and time.monotonic() < give_up:
        time.sleep(0.02)
    return left


# ----------------------------------------------------------------------------------------------- the arena


class Arena:
    """Things outside the sandbox that attacks go after: files, listeners, a victim process with a secret."""

    def __init__(self, root: Path):
        self.outside = root / "outside"
        self.outside.mkdir()
        self.outside.chmod(0o777)  # writable for anyone: only the sandbox may stop writes here
        self.victim_file = self.outside / "victim.txt"
        self.victim_file.write_text("keep")
        self.victim_file.chmod(0o666)
        self.answers = self.outside / "answers.json"
        self.answers.write_text(json.dumps({"1,2": 3, "-4,9": 5, "0.5,0.25": 0.75}))
        self.answers.chmod(0o644)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.tcp.setblocking(False)
        self.port = self.tcp.getsockname()[1]
        self.unix_path = str(self.outside / "unix.sock")
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.unix.listen(8)
        self.unix.setblocking(False)
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract_name = f"\0agdo-sandbox-test-{os.getpid()}"
        self.abstract.bind(self.abstract_name)
        self.abstract.listen(8)
        self.abstract.setblocking(False)
        # A victim with the sandbox's uid where possible (nobody when we are root): only isolation protects it.
        self.victim = subprocess.Popen(
            ["sleep", "600"], env={"AGDO_SECRET": SECRET}, user=65534 if IS_ROOT else None, start_new_session=True
        )

    def accepted_connections(self) -> list[str]:
        accepted = []
        for name, listener in (("tcp", self.tcp), ("unix", self.unix), ("abstract", self.abstract)):
            try:
                connection, _ = listener.accept()
                connection.close()
                accepted.append(name)
            except BlockingIOError:
                pass
        return accepted

    def close(self) -> None:
        for listener in (self.tcp, self.unix, self.abstract):
            listener.close()
        self.victim.kill()
        self.victim.wait()

    def substitute(self, source: str) -> str:
        return (
            source.replace("OUTSIDE", str(self.outside))
            .replace("VICTIM_FILE", str(self.victim_file))
            .replace("VICTIM_PID", str(self.victim.pid))
            .replace("ANSWERS", str(self.answers))
            .replace("TCP_PORT", str(self.port))
            .replace("UNIX_PATH", self.unix_path)
            .replace("ABSTRACT_NAME", repr(self.abstract_name))
            .replace("RUNNER_PATH", str(RUNNER))
            .replace("SANDBOX_ROOT", str(Path(tempfile.gettempdir())))
            .replace("SECRET", SECRET)
        )


# Each attack: a program defining add(a, b) that is wrong unless the attack worked. ``WIN`` is the right answer.
WIN = "a + b"
LOSE = "a - b"

# Pure Python that empties the closure of the runner's audit hook (its denied events and allowed root):
# the hook is only a speed bump, so the layers below it must hold without it.
DISABLE_AUDIT_HOOK = """for obj in gc.get_objects():
    if type(obj).__name__ == "function" and obj.__name__ == "hook" and obj.__closure__:
        for cell in obj.__closure__:
            try:
                if isinstance(cell.cell_contents, frozenset):
                    cell.cell_contents = frozenset()
                elif isinstance(cell.cell_contents, str):
                    cell.cell_contents = "/"
            except ValueError:
                pass
"""


def each_attempt(header: str, attempts: str, *, setup: str = "", catch: str = "OSError") -> str:
    """An attack program: after ``header`` (imports), ``add(a, b)`` runs ``setup`` and then each attempt (one
    lambda per line of ``attempts``), and is right only if at least one attempt did not raise ``catch``."""
    return f"""{header}
def add(a, b):
    wins = 0
{setup}    for attempt in (
{attempts}    ):
        try:
            attempt()
            wins += 1
        except {catch}:
            pass
    return {WIN} if wins else {LOSE}
"""

ATTACKS = {
    # --- tampering with the harness in the same interpreter
    "replace builtins.compile": f"""
import builtins
_real = builtins.compile
builtins.compile = lambda *args, **kwargs: _real("pass", "x", "exec")
def add(a, b):
    return {LOSE}
""",
    "replace builtins.exec and eval": f"""
import builtins
builtins.exec = lambda *args, **kwargs: None
builtins.eval = lambda *args, **kwargs: True
def add(a, b):
    return {LOSE}
""",
    "walk frames, clear the runner's lists, forge lines, os._exit": """
import os, sys
def add(a, b):
    frame = sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if isinstance(value, list):
                value.clear()
            if isinstance(value, dict):
                value.setdefault("passed", True)
        frame = frame.f_back
    for fd in range(3, 40):
        for line in (b'["ready"]\\n', b'{"end": 0, "passed": true}\\n', b'{"done": true}\\n', b"0 pass\\n"):
            try:
                os.write(fd, line)
            except OSError:
                pass
    os._exit(0)
""",
    "forge old-style token verdicts found by scanning memory": """
import gc, os, re
def add(a, b):
    tokens = {obj for obj in gc.get_objects() if isinstance(obj, str) and re.fullmatch("[0-9a-f]{32}", obj)}
    for fd in range(3, 40):
        for token in tokens | {"x" * 32}:
            for index in range(5):
                try:
                    os.write(fd, f"{token} {index} pass\\n".encode())
                except OSError:
                    pass
    os._exit(0)
""",
    "wrap the runner's os.write to turn failures into passes": """
import os, sys
_write = os.write
def forged(fd, data):
    data = data.replace(b"fail", b"pass").replace(b'["err"]', b'["ok",["S","pass"]]')
    data = data.replace(b'"passed":false', b'"passed":true')
    return _write(fd, data)
os.write = forged
def add(a, b):
    raise ValueError("no idea")
""",
    "patch json.dumps so every reply is forged": """
import json
json.dumps = lambda *args, **kwargs: '["ok",["B",true]]'
def add(a, b):
    raise ValueError("no idea")
""",
    "patch the runner's encoder through gc": """
import gc
def forged(value, *args, **kwargs):
    return ["B", True]
for obj in gc.get_objects():
    if type(obj).__name__ == "function" and obj.__name__ in ("encode", "decode", "serve", "_write_line"):
        try:
            obj.__code__ = forged.__code__
        except Exception:
            pass
def add(a, b):
    return None
""",
    "always-equal object": """
class Anything:
    __eq__ = lambda self, other: True
    __ne__ = lambda self, other: False
    __lt__ = __le__ = __gt__ = __ge__ = __eq__
    __sub__ = __rsub__ = __add__ = lambda self, other: 0
    __abs__ = lambda self: 0
    __bool__ = lambda self: True
    __hash__ = lambda self: 0
def add(a, b):
    return Anything()
""",
    "int subclass with a lying __eq__ and __sub__": """
class Liar(int):
    __eq__ = lambda self, other: True
    __ne__ = lambda self, other: False
    __sub__ = lambda self, other: 0
    __hash__ = int.__hash__
def add(a, b):
    return Liar(0)
""",
    "float subclass with a lying __eq__ and __sub__": """
class Liar(float):
    __eq__ = lambda self, other: True
    __sub__ = lambda self, other: 0.0
    __hash__ = float.__hash__
def add(a, b):
    return Liar(0.0)
""",
    "str and list subclasses": """
class S(str):
    __eq__ = lambda self, other: True
    __hash__ = str.__hash__
class L(list):
    __eq__ = lambda self, other: True
def add(a, b):
    return S("x") if a > 0 else L()
""",
    "containers holding lying objects": """
class Anything:
    __eq__ = lambda self, other: True
    __hash__ = lambda self: 0
def add(a, b):
    return [Anything()] if a > 0 else (Anything(),)
""",
    "returns a generator, a class, a function, Ellipsis": """
def add(a, b):
    return [(x for x in ()), int, add, ..., NotImplemented][int(a) % 5]
""",
    "print fake pass lines everywhere": f"""
import sys, os
def add(a, b):
    for text in ("pass", '["ok",["I","3"]]', '{{"end": 0, "passed": true}}', "0 pass", "ALL TESTS PASSED"):
        print(text)
        print(text, file=sys.stderr)
        sys.__stdout__.write(text + "\\n")
    return {LOSE}
""",
    "read the parent's environment through /proc": f"""
import os
def add(a, b):
    paths = ["/proc/VICTIM_PID/environ", "/proc/1/environ", "/proc/self/environ"]
    try:
        paths += [f"/proc/{{pid}}/environ" for pid in os.listdir("/proc") if pid.isdigit()]
    except OSError:
        pass
    for path in paths:
        try:
            if b"SECRET" in open(path, "rb").read():
                return {WIN}
        except OSError:
            pass
    return {LOSE}
""",
    "read the answers from a file outside": f"""
import json
def add(a, b):
    try:
        answers = json.load(open("ANSWERS"))
        return answers[f"{{a}},{{b}}"]
    except Exception:
        return {LOSE}
""",
    "scan memory for the tests' expected values": f"""
import gc, re, sys
def add(a, b):
    texts = [obj for obj in gc.get_objects() if isinstance(obj, str) and "candidate" in obj]
    frame = sys._getframe()
    while frame is not None:
        texts += [value for value in frame.f_locals.values() if isinstance(value, str)]
        frame = frame.f_back
    for text in texts:
        match = re.search(rf"candidate\\({{a}}, {{b}}\\) == ([-0-9.]+)", text)
        if match:
            return float(match.group(1))
    return {LOSE}
""",
    "delete, create and mkdir outside through dir_fd": each_attempt("import os", setup=f"""\
    try:
        fd = os.open("OUTSIDE", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return {LOSE}
""", attempts="""\
        lambda: os.unlink("victim.txt", dir_fd=fd),
        lambda: os.close(os.open("dirfd-created.txt", os.O_WRONLY | os.O_CREAT, dir_fd=fd)),
        lambda: os.mkdir("dirfd-dir", dir_fd=fd),
        lambda: os.rename("victim.txt", "renamed.txt", src_dir_fd=fd, dst_dir_fd=fd),
"""),
    "write outside by plain paths": each_attempt("import os", """\
        lambda: open("VICTIM_FILE", "a").write("x"),
        lambda: open("OUTSIDE/plain.txt", "w").write("x"),
        lambda: os.truncate("VICTIM_FILE", 0),
        lambda: os.chmod("VICTIM_FILE", 0o000),
        lambda: open("RUNNER_PATH", "a").write("# pwned"),
        lambda: open("/tmp/agdo-escaped.txt", "w").write("x"),
"""),
    "mkfifo, mknod, symlink, hard link and rename out of the directory": each_attempt("import os, stat", """\
        lambda: os.mkfifo("OUTSIDE/fifo"),
        lambda: os.mknod("OUTSIDE/node", stat.S_IFREG | 0o644),
        lambda: os.mkfifo("local-fifo"),
        lambda: os.symlink("OUTSIDE/symlinked.txt", "link") or open("link", "w").write("x"),
        lambda: os.symlink("VICTIM_FILE", "link2") or open("link2", "w").write("x"),
        lambda: os.link("VICTIM_FILE", "hardlink"),
        lambda: os.rename("VICTIM_FILE", "stolen.txt"),
        lambda: os.replace("VICTIM_FILE", "OUTSIDE/moved.txt"),
"""),
    "tamper with other sandboxes' working directories": f"""
import os
def add(a, b):
    wins = 0
    try:
        names = os.listdir("SANDBOX_ROOT")
    except OSError:
        names = []
    own = os.path.realpath(os.getcwd())
    for name in names:
        folder = os.path.join("SANDBOX_ROOT", name)
        if os.path.realpath(folder) == own:
            continue
        try:
            open(os.path.join(folder, "intruder.txt"), "w").write("x")
            wins += 1
        except OSError:
            pass
    return {WIN} if wins else {LOSE}
""",
    "connect to loopback TCP, a unix socket and an abstract socket": f"""
import socket
def add(a, b):
    wins = 0
    for family, address in ((socket.AF_INET, ("127.0.0.1", TCP_PORT)), (socket.AF_UNIX, "UNIX_PATH"),
                            (socket.AF_UNIX, ABSTRACT_NAME)):
        try:
            connection = socket.socket(family, socket.SOCK_STREAM)
            connection.settimeout(0.5)
            connection.connect(address)
            wins += 1
        except OSError:
            pass
    return {WIN} if wins else {LOSE}
""",
    "kill the victim, every process, the parent": each_attempt("import os, signal", """\
        lambda: os.kill(VICTIM_PID, signal.SIGKILL),
        lambda: os.kill(-1, signal.SIGKILL),
        lambda: os.kill(os.getppid(), signal.SIGKILL),
        lambda: os.killpg(os.getpgid(0), signal.SIGKILL),
"""),
    "defeat the audit hook, then libc through ctypes": f"""
import gc
{DISABLE_AUDIT_HOOK}import ctypes
def add(a, b):
    wins = 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unlink(b"VICTIM_FILE") == 0:
        wins += 1
    if libc.open(b"OUTSIDE/ctypes.txt", 0o101, 0o644) >= 0:
        wins += 1
    if libc.kill(VICTIM_PID, 9) == 0:
        wins += 1
    if libc.socket(2, 1, 0) >= 0:
        wins += 1
    if libc.unshare(0x10000000) == 0:
        wins += 1
    pid = libc.fork()
    if pid == 0:
        libc._exit(0)
    if pid > 0:
        wins += 1
    return {WIN} if wins else {LOSE}
""",
    "defeat the audit hook, then shell out and write": each_attempt("import gc, os, subprocess\n" + DISABLE_AUDIT_HOOK, """\
        lambda: os.system("touch OUTSIDE/shell.txt") == 0 or 1 / 0,
        lambda: subprocess.run(["touch", "OUTSIDE/subprocess.txt"], check=True),
        lambda: open("OUTSIDE/after-hook.txt", "w").write("x"),
""", catch="Exception"),
    "fork bomb, subprocess, posix_spawn, multiprocessing": f"""
import os
def add(a, b):
    wins = 0
    for attempt in (
        lambda: os.fork(),
        lambda: os.posix_spawn("/bin/true", ["true"], {{}}),
        lambda: __import__("subprocess").Popen(["true"]),
        lambda: __import__("multiprocessing").Process(target=print).start(),
    ):
        try:
            if attempt() == 0:
                os._exit(0)
            wins += 1
        except Exception:
            pass
    return {WIN} if wins else {LOSE}
""",
    "threads that keep forging replies": f"""
import os, threading, time
def spam():
    while True:
        for fd in range(3, 12):
            try:
                os.write(fd, b'["ok",["S","pass"]]\\n')
            except OSError:
                pass
        time.sleep(0.001)
def add(a, b):
    try:
        threading.Thread(target=spam, daemon=True).start()
        return {WIN}
    except Exception:
        return {LOSE}
""",
    "signal handlers forging replies, SIGTERM ignored": f"""
import os, signal
def forge(*_):
    for fd in range(3, 12):
        try:
            os.write(fd, b'["ok",["S","pass"]]\\n')
        except OSError:
            pass
signal.signal(signal.SIGALRM, forge)
signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
def add(a, b):
    return {LOSE}
""",
    "finalizers and atexit forging after the call": f"""
import atexit, os
class Bomb:
    def __del__(self):
        for fd in range(3, 12):
            try:
                os.write(fd, b'["ok",["S","pass"]]\\n{{"done": true}}\\n')
            except OSError:
                pass
atexit.register(lambda: Bomb())
def add(a, b):
    Bomb()
    return {LOSE}
""",
    "malformed replies written on every descriptor": """
import os
def add(a, b):
    garbage = [b"\\xff\\xfe\\x00garbage\\n", b"[" * 200000 + b"\\n", b'["ok",["I","' + b"9" * 5000 + b'"]]\\n',
               b'["ok",["D",[[["L",[]],["N"]]]]]\\n', b'["ok",["E",[["L",[]]]]]\\n', b'["ok"]\\n',
               b'["ok",["F","1e999999"]]\\n', b'{"ok": 1}\\n', b'["sandbox-error", "x"]\\n', b"null\\n"]
    for fd in range(3, 12):
        for line in garbage:
            try:
                os.write(fd, line)
            except OSError:
                pass
    return None
""",
    "steal the requests from the pipe": """
import os
def add(a, b):
    for fd in range(3, 8):
        try:
            os.set_blocking(fd, False)
            os.read(fd, 1 << 16)
        except OSError:
            pass
    return a * b
""",
    "huge output flood": f"""
import os, sys
def add(a, b):
    print("x" * (20 * 2**20))
    sys.stderr.write("y" * (20 * 2**20))
    for fd in range(3, 12):
        try:
            os.write(fd, b"z" * (4 * 2**20))
        except OSError:
            pass
    return {LOSE}
""",
    "huge return value": """
def add(a, b):
    return "3" * (64 * 2**20)
""",
    "fill the disk": f"""
import os
def add(a, b):
    total = 0
    chunk = b"x" * 2**20
    for index in range(64):
        for folder in (".", "/tmp", "/dev/shm", "/var/tmp", "OUTSIDE"):
            try:
                with open(f"{{folder}}/agdo-fill-{{index}}", "wb") as file:
                    file.write(chunk)
                total += len(chunk)
            except OSError:
                pass
    return {WIN} if total >= 48 * 2**20 else {LOSE}
""",
    "memory bomb": f"""
def add(a, b):
    try:
        hog = bytearray(4 * 2**30)
        return {WIN}
    except MemoryError:
        return {LOSE}
""",
    "infinite loop in the function": """
def add(a, b):
    while True:
        pass
""",
    "infinite loop at import": """
while True:
    pass
def add(a, b):
    return a + b
""",
    "sys.exit(0) at import": """
import sys
def add(a, b):
    return a + b
sys.exit(0)
""",
    "SystemExit and os._exit in the call": """
import os
def add(a, b):
    if a > 0:
        raise SystemExit(0)
    os._exit(0)
""",
    "exception during import": """
def add(a, b):
    return a + b
raise ImportError("surprise")
""",
    "unbounded recursion in C": """
import sys
sys.setrecursionlimit(10**7)
def add(a, b):
    return add(a, b)
""",
    "deep and cyclic return values": """
def add(a, b):
    if a > 0:
        cycle = []
        cycle.append(cycle)
        return cycle
    deep = []
    for _ in range(100000):
        deep = [deep]
    return deep
""",
}


def run_attacks(arena: Arena) -> dict[str, float]:
    names = list(ATTACKS)
    completions = [fenced(arena.substitute(ATTACKS[name])) for name in names]
    controls = {"correct": "    return a + b\n", "correct fenced": fenced("def add(a, b):\n    return a + b"),
                "wrong": "    return a - b\n", "partial": "    return 5 if a == -4 else a - b\n"}  # fmt: skip
    names += list(controls)
    completions += list(controls.values())
    n = len(completions)
    rewards = code_reward(
        completions, prompt=[PROMPT] * n, test=[TEST] * n, entry_point=["add"] * n, limits=FAST, max_workers=8
    )
    return dict(zip(names, rewards, strict=True))


@pytest.fixture(scope="module")
def sandbox_root(tmp_path_factory):
    """Sandbox working directories go under a fresh folder, checked empty afterwards."""
    root = tmp_path_factory.mktemp("sandboxes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(root))
        yield root
    assert list(root.iterdir()) == []
    assert wait_for_no_sandbox_processes() == []


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    arena = Arena(tmp_path_factory.mktemp("arena"))
    yield arena
    arena.close()


@pytest.fixture(scope="module")
def attack_results(arena, sandbox_root):
    started = time.monotonic()
    scores = run_attacks(arena)
    return scores, time.monotonic() - started


def test_sandbox_level_is_reported():
    level = sandbox_level()
    assert level.split()[0] in ("strong", "medium", "weak"), level
    print(level)


# Attacks that only isolation stops (not the verdict design), with the layers that must hold them.
def _writes(features: dict) -> bool:
    return bool(features["landlock"] or features["readonly_root"])


ISOLATION_ATTACKS = {
    "read the parent's environment through /proc": lambda f: f["landlock"] or f["proc"] or f["identity"] == "nobody",
    "read the answers from a file outside": lambda f: f["landlock"],
    "delete, create and mkdir outside through dir_fd": _writes,
    "write outside by plain paths": _writes,
    "mkfifo, mknod, symlink, hard link and rename out of the directory": _writes,
    "tamper with other sandboxes' working directories": _writes,
    "fill the disk": _writes,
    "connect to loopback TCP, a unix socket and an abstract socket": lambda f: f["seccomp"] or "net" in f["namespaces"],
    "kill the victim, every process, the parent": lambda f: f["seccomp"] or "pid" in f["namespaces"],
    "defeat the audit hook, then libc through ctypes": lambda f: f["seccomp"] and _writes(f),
    "defeat the audit hook, then shell out and write": lambda f: f["seccomp"] and _writes(f),
    "fork bomb, subprocess, posix_spawn, multiprocessing": lambda f: f["seccomp"],
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_hostile_completion_scores_zero(attack_results, name):
    scores, _ = attack_results
    if scores[name] != 0.0 and name in ISOLATION_ATTACKS and not ISOLATION_ATTACKS[name](code_module._sandbox_features()):
        pytest.xfail(f"this machine lacks the layers that stop this: {sandbox_level()}")
    assert scores[name] == 0.0, (name, scores[name])


def test_controls_show_the_harness_can_fail(attack_results):
    scores, elapsed = attack_results
    assert scores["correct"] == 1.0
    assert scores["correct fenced"] == 1.0
    assert scores["wrong"] == 0.0
    assert scores["partial"] == pytest.approx(1 / 3)
    assert elapsed < 40, elapsed


def _strength() -> str:
    return sandbox_level().split()[0]


def test_attacks_left_the_host_untouched(attack_results, arena):
    """What the attacks tried to do outside: nothing of it happened (at the medium level or better)."""
    if _strength() == "weak":
        pytest.skip(f"side effects are only contained from the medium level on: {sandbox_level()}")
    assert arena.victim_file.read_text() == "keep"
    assert sorted(path.name for path in arena.outside.iterdir()) == ["answers.json", "unix.sock", "victim.txt"]
    assert arena.victim.poll() is None, "the victim process was killed"
    assert arena.accepted_connections() == []
    assert RUNNER.read_text().rstrip().endswith("sandbox_main(sys.argv[1])")
    for path in ("/tmp/agdo-escaped.txt", "/tmp/agdo-fill-0", "/dev/shm/agdo-fill-0", "/var/tmp/agdo-fill-0"):
        assert not os.path.exists(path), path


def _run_unsandboxed(arena: Arena, name: str) -> object:
    """Call the attack's add(1, 2) in a plain subprocess: the escape works when nothing stops it."""
    program = arena.substitute(ATTACKS[name]) + "\nprint(add(1, 2))\n"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30, check=False)
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "name",
    [
        "read the parent's environment through /proc",
        "read the answers from a file outside",
        "connect to loopback TCP, a unix socket and an abstract socket",
    ],
)
def test_escapes_work_without_the_sandbox(attack_results, arena, name):
    """Controls: the same code earns full marks outside the sandbox, so a score of 0 above means containment."""
    assert _run_unsandboxed(arena, name) == "3"
    arena.accepted_connections()  # drain the control's connections


# ----------------------------------------------------------------------------------------------- weaker levels


VERDICT_ATTACKS = [
    "walk frames, clear the runner's lists, forge lines, os._exit",
    "always-equal object",
    "int subclass with a lying __eq__ and __sub__",
    "patch json.dumps so every reply is forged",
    "fork bomb, subprocess, posix_spawn, multiprocessing",
]
CONTAINMENT_ATTACKS = [
    "defeat the audit hook, then libc through ctypes",
    "read the parent's environment through /proc",
    "delete, create and mkdir outside through dir_fd",
    "kill the victim, every process, the parent",
]


@pytest.mark.parametrize(
    "skip, containment",
    [
        (("namespaces",), CONTAINMENT_ATTACKS + ["read the answers from a file outside"]),
        (("landlock",), CONTAINMENT_ATTACKS),  # reads then rest on file permissions: not attempted
        (("namespaces", "landlock"), []),  # weak: only seccomp and the uid stand; verdicts still hold
    ],
)
def test_weaker_levels(sandbox_root, arena, monkeypatch, skip, containment):
    """With layers left out (as on machines without them), verdicts still come from outside, so attacks on
    them score 0 at every level; escapes are still contained at the medium level (each layer alone)."""
    features = code_module._sandbox_features()
    if skip == ("namespaces",) and not features["landlock"]:
        pytest.skip("no Landlock on this machine: without namespaces the sandbox would be weak")
    if skip == ("landlock",) and not ({"mount", "pid"} <= set(features["namespaces"]) and features["readonly_root"]):
        pytest.skip("no mount/pid namespaces on this machine: without Landlock the sandbox would be weak")
    monkeypatch.setattr(code_module, "_SKIP_LAYERS", skip)
    names = VERDICT_ATTACKS + containment
    completions = [fenced(arena.substitute(ATTACKS[name])) for name in names] + ["    return a + b\n"]
    n = len(completions)
    rewards = code_reward(
        completions, prompt=[PROMPT] * n, test=[TEST] * n, entry_point=["add"] * n, limits=FAST, max_workers=8
    )
    assert rewards == [0.0] * (n - 1) + [1.0], dict(zip(names + ["correct"], rewards, strict=True))
    assert arena.victim_file.read_text() == "keep"
    assert arena.victim.poll() is None
    assert sorted(path.name for path in arena.outside.iterdir()) == ["answers.json", "unix.sock", "victim.txt"]


# ----------------------------------------------------------------------------------------------- honest code

RICH_PROMPT = '''
def helper(x):
    """Used by the tests only (from the trusted prompt)."""
    return x * x


def make(kind, n=0):
    """Return a value of the given kind."""
'''
RICH_TEST = """
import math

def check(candidate):
    assert candidate("none") is None
    assert candidate("true") is True
    assert not candidate("false")
    assert candidate("int") == 7 and type(candidate("int")) is int
    assert candidate("big") == 2 ** 200
    assert abs(candidate("float") - 0.1) < 1e-9
    assert math.isinf(candidate("inf")) and candidate("neg_zero") == 0.0
    assert candidate("str") == "héllo\\n\\u2603\\x00"
    assert candidate("bytes") == b"\\x00\\xff"
    assert candidate("list") == [1, [2.5, "x"], None]
    assert candidate("tuple") == (1, ("a",), ())
    assert candidate("dict") == {"a": [1, 2], 3: {"b": None}, (1, 2): frozenset({4})}
    assert candidate("set") == {1, "two", (3,)}
    for n in range(6):
        assert candidate("square", n) == helper(n)
    assert sorted(candidate("file")) == ["scratch", "tmp"]
    assert candidate("imports") == 120
    assert candidate("recursion") == 400
"""
RICH_SOLUTION = '''
import math, itertools, functools, collections, heapq, bisect, re, hashlib, string, fractions, datetime, os, sys
import tempfile


def make(kind, n=0):
    print("debug output is fine", kind)
    print("stderr too", file=sys.stderr)
    if kind == "none":
        return None
    if kind == "true":
        return True
    if kind == "false":
        return False
    if kind == "int":
        return 7
    if kind == "big":
        return 2 ** 200
    if kind == "float":
        return 0.1
    if kind == "inf":
        return float("inf")
    if kind == "neg_zero":
        return -0.0
    if kind == "str":
        return "héllo\\n\\u2603\\x00"
    if kind == "bytes":
        return b"\\x00\\xff"
    if kind == "list":
        return [1, [2.5, "x"], None]
    if kind == "tuple":
        return (1, ("a",), ())
    if kind == "dict":
        return {"a": [1, 2], 3: {"b": None}, (1, 2): frozenset({4})}
    if kind == "set":
        return {1, "two", (3,)}
    if kind == "square":
        return n * n
    if kind == "file":
        with open("scratch.txt", "w") as file:
            file.write("ok")
        with tempfile.NamedTemporaryFile("w", delete=False) as file:
            file.write("ok")
        return ["scratch" if open("scratch.txt").read() == "ok" else "missing", "tmp"]
    if kind == "imports":
        counts = collections.Counter("aab")
        digest = hashlib.sha256(b"x").hexdigest()
        return math.factorial(5) if counts["a"] == 2 and len(digest) == 64 and fractions.Fraction(1, 2) else 0
    if kind == "recursion":
        depth = lambda k: 0 if k == 0 else 1 + depth(k - 1)
        return depth(400)
'''


def test_honest_solutions_of_every_value_type_score_one(sandbox_root):
    wrong = RICH_SOLUTION.replace("return 2 ** 200", "return 2 ** 200 + 1").replace('return b"\\x00\\xff"', "return 0")
    # Redefining the prompt's helper does not change what the tests compute: they use the trusted prompt's.
    helper_hack = RICH_SOLUTION.replace("return n * n", "return -1") + "\n\ndef helper(x):\n    return -1\n"
    completions = [fenced(RICH_SOLUTION), fenced(wrong), fenced(helper_hack)]
    n = len(completions)
    rewards = code_reward(completions, prompt=[RICH_PROMPT] * n, test=[RICH_TEST] * n, entry_point=["make"] * n)
    tests = len(split_humaneval_tests(RICH_TEST, "make"))
    assert rewards == [1.0, (tests - 2) / tests, (tests - 1) / tests]


# A HumanEval-style check: setup lines, 4 scored asserts (one in a loop) and a free `assert True`.
ADD_CHECK = """
METADATA = {'author': 'test'}


def check(candidate):
    import math
    assert candidate(1, 2) == 3
    assert candidate(0, 0) == 0
    scale = 10
    for i in range(3):
        assert candidate(i, scale) == i + scale
    assert candidate(-1, 1) == 0
    assert True, "free point"
"""


def test_code_reward_fractions(sandbox_root):
    completions = [
        "    return a + b\n",
        "    return abs(a) + b if a != -1 else 5\n",  # fails only the last test
        "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n",
        "    return a - b\n",  # passes only candidate(0, 0)
        "    while True:\n        pass\n",
    ]
    n = len(completions)
    rewards = code_reward(completions, prompt=[PROMPT] * n, test=[ADD_CHECK] * n, entry_point=["add"] * n, limits=FAST)
    assert rewards == [1.0, 0.75, 1.0, 0.25, 0.0]


def test_per_test_scoring_survives_a_hanging_test(sandbox_root):
    program = "def f(x):\n    while x == 2:\n        pass\n    return x + 1\n"
    tests = ["assert f(1) == 2", "assert f(2) == 3", "assert f(3) == 4", "assert f(4) == 0"]
    started = time.monotonic()
    assert run_tests_in_sandbox(program, tests, FAST) == [True, False, True, False]
    assert time.monotonic() - started < FAST.test_timeout + 3


def test_tests_call_program_functions_and_keep_their_own_names(sandbox_root):
    program = "import os\ndef env():\n    return dict(os.environ)\ndef stdin_text():\n    import sys\n    return sys.stdin.read()\n"
    tests = [
        "assert 'AGDO_TEST_SECRET' not in env() and env()['HOME']",
        "assert stdin_text() == ''",
        "x = 1\nassert x == 1",  # calls nothing from the program: no free credit
    ]
    os.environ["AGDO_TEST_SECRET"] = "do-not-leak"
    try:
        assert run_tests_in_sandbox(program, tests, FAST) == [True, True, False]
    finally:
        del os.environ["AGDO_TEST_SECRET"]


def test_writes_inside_the_working_directory_are_bounded(sandbox_root):
    program = (
        "def write(megabytes):\n"
        "    with open('scratch.bin', 'wb') as file:\n"
        "        file.write(b'x' * (megabytes * 2**20))\n"
        "    return len(open('scratch.bin', 'rb').read())\n"
    )
    tests = ["assert write(1) == 2**20", "assert write(64) == 64 * 2**20"]
    assert run_tests_in_sandbox(program, tests, FAST) == [True, False]


def test_split_humaneval_tests_keeps_setup_and_drops_free_asserts():
    tests = split_humaneval_tests(ADD_CHECK, "add")
    assert len(tests) == 4
    assert all(test.rstrip().endswith("check(add)") for test in tests)
    assert "scale = 10" in tests[2] and "import math" in tests[0]


def test_humaneval_program_prefers_a_fenced_definition():
    assert humaneval_program(PROMPT, "    return a + b\n", "add") == PROMPT + "    return a + b\n"
    fenced_program = humaneval_program(PROMPT, fenced("def add(a, b):\n    return 1"), "add")
    assert fenced_program.rstrip().endswith("def add(a, b):\n    return 1")


def _humaneval_path() -> Path | None:
    roots = [os.environ.get("AGDO_DATA_DIR"), Path(__file__).resolve().parents[1] / ".." / "shared" / "data"]
    for root in roots:
        if root and (Path(root) / "humaneval" / "HumanEval.jsonl.gz").exists():
            return Path(root) / "humaneval" / "HumanEval.jsonl.gz"
    return None


@pytest.mark.skipif(_humaneval_path() is None, reason="HumanEval data not present")
def test_humaneval_canonical_solutions_score_one(sandbox_root):
    with gzip.open(_humaneval_path(), "rt") as file:
        rows = [json.loads(line) for line in file][:20]
    limits = SandboxLimits(test_timeout=5.0, total_timeout=30.0)
    n = len(rows)
    fields = {key: [row[key] for row in rows] for key in ("prompt", "test", "entry_point")}
    assert code_reward([row["canonical_solution"] for row in rows], **fields, limits=limits) == [1.0] * n
    # ... and an honest stub that returns None scores less on every task but the ones asserting falsy results.
    stubs = code_reward(["    return None\n"] * n, **fields, limits=limits)
    assert sum(stubs) < n / 4


# ----------------------------------------------------------------------------------------------- the codec


class Sub(int):
    pass


UNENCODABLE = [Sub(1), int, object(), (x for x in ()), [Sub(1)], {"a": Sub(1)}, {Sub(1)}, type("S", (str,), {})("x"),
               type("F", (float,), {})(1.0), type("L", (list,), {})(), type("D", (dict,), {})(), 1j, bytearray(b"x"),
               range(3)]  # fmt: skip


@pytest.mark.parametrize("value", UNENCODABLE)
def test_encode_accepts_only_exact_builtin_types(value):
    with pytest.raises(CodecError):
        encode(value)


def test_encode_bounds_depth_and_size():
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(CodecError):
        encode(deep)
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(CodecError):
        encode(cyclic)
    with pytest.raises(CodecError):
        encode([0] * 300_000)


def _exact_types(value) -> bool:
    kind = type(value)
    if kind in (list, tuple, set, frozenset):
        return all(_exact_types(item) for item in value)
    if kind is dict:
        return all(_exact_types(key) and _exact_types(item) for key, item in value.items())
    return kind in (type(None), bool, int, float, str, bytes)


def test_codec_round_trips_exactly():
    value = [None, True, False, 0, -(2**300), 1.5, -0.0, math.inf, "é\x00\ud800", b"\x00", (1, (2,)), {1, "a"},
             frozenset({(1, 2)}), {"k": [1], 2: None, (3,): {4: 5}}, [], (), {}]  # fmt: skip
    decoded = decode(json.loads(json.dumps(encode(value))))
    assert decoded == value and _exact_types(decoded)
    assert type(decode(encode(True))) is bool and type(decode(encode(1))) is int
    assert math.isnan(decode(encode(math.nan)))


MALFORMED = [None, 1, "N", [], ["N", 1], ["X", 1], ["B", 1], ["I", 5], ["I", "1.5"], ["I", "9" * 5000], ["I", " 1"],
             ["F", "1e99999"], ["F", 1.5], ["F", "1_0"], ["F", "infinity"], ["S", 1], ["Y", "0"], ["Y", "zz"],
             ["L", "ab"], ["L", [["X"]]], ["D", [["I", "1"]]], ["D", [[["L", []], ["N"]]]], ["E", [["L", []]]],
             ["D", [[["I", "1"], ["N"]], [["I", "1"], ["N"]]]], ["T", {"a": 1}], ["N", "extra", "more"]]  # fmt: skip


@pytest.mark.parametrize("data", MALFORMED)
def test_decode_rejects_malformed_data(data):
    with pytest.raises(CodecError):
        decode(data)


def test_decode_of_random_json_raises_only_codec_errors():
    rng = random.Random(0)
    tags = ["N", "B", "I", "F", "S", "Y", "L", "T", "D", "E", "Z", "Q"]

    def random_json(depth: int):
        choice = rng.random()
        if depth > 3 or choice < 0.3:
            return rng.choice([None, True, 0, -1, 1.5, "", "7", "nan", "ff", "x"])
        if choice < 0.8:
            return [rng.choice(tags)] + [random_json(depth + 1) for _ in range(rng.randint(0, 2))]
        return [random_json(depth + 1) for _ in range(rng.randint(0, 3))]

    for _ in range(5000):
        data = random_json(0)
        try:
            assert _exact_types(decode(data))
        except CodecError:
            pass
