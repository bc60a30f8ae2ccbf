"""Child processes of :func:`agdo.rewards.code.run_tests_in_sandbox`, and the value codec they share with it.

Run as ``python -I -S _sandbox_runner.py MODE`` with one JSON configuration line on stdin. Modes:

``run``
    The **untrusted** side. Confines itself (see :func:`confine`), then executes the program and serves calls:
    for each request line ``["call", NAME, ARGS, KWARGS]`` it calls the program's global ``NAME`` and answers
    one line, ``["ok", VALUE]`` or ``["err"]``. It never sees a test, an expected value or a verdict; whatever
    it answers is only ever a value, which the trusted side compares (a forged or extra line is therefore worth
    nothing more than returning that value, and the parent rejects anything that is not exactly one well-formed
    answer per request).
``probe``
    The same confinement, then a report of what could be applied (no untrusted code runs): the sandbox level.
``check``
    The **trusted** side: never runs model-written code. Executes the trusted setup (the task's prompt) and
    each test source with every program function replaced by a proxy that asks the parent to call it in the
    sandbox, and reports one verdict per test. Values come back decoded into exact builtin types, so every
    comparison, ``abs(...)``, loop and helper of the test runs on genuine ``int``/``str``/``list``... objects.

``encode``/``decode`` below are imported by ``code.py`` (this file is otherwise not meant to be imported).
"""

import json
import os
import re
import resource
import struct
import sys

NOBODY = 65534

# ------------------------------------------------------------------------------------------------ value codec
# A value is a JSON array [TAG] or [TAG, PAYLOAD]; only exact builtin types (no subclasses) are encodable and
# decoding only ever builds exact builtin objects, so no user-defined __eq__/__hash__/__sub__ can reach a check.

MAX_DEPTH = 64
MAX_ITEMS = 200_000
_INT = re.compile(r"-?[0-9]{1,4300}")
_FLOAT = re.compile(r"-?(?:inf|nan|[0-9]+(?:\.[0-9]*)?(?:e[-+]?[0-9]{1,4})?)")
_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_SEQUENCES = {"L": list, "T": tuple, "E": set, "Z": frozenset}
_SEQUENCE_TAGS = {list: "L", tuple: "T", set: "E", frozenset: "Z"}


class CodecError(ValueError):
    pass


def encode(value, _depth=0, _budget=None):
    """The tagged JSON form of ``value``; CodecError for anything else than exact builtin data types."""
    budget = [MAX_ITEMS] if _budget is None else _budget
    budget[0] -= 1
    if budget[0] < 0 or _depth > MAX_DEPTH:
        raise CodecError("value too large or too deep")
    kind = type(value)
    if value is None:
        return ["N"]
    if kind is bool:
        return ["B", value]
    if kind is int:
        return ["I", int.__repr__(value)]
    if kind is float:
        return ["F", float.__repr__(value)]
    if kind is str:
        return ["S", value]
    if kind is bytes:
        return ["Y", value.hex()]
    if kind in _SEQUENCE_TAGS:
        return [_SEQUENCE_TAGS[kind], [encode(item, _depth + 1, budget) for item in value]]
    if kind is dict:
        return ["D", [[encode(key, _depth + 1, budget), encode(item, _depth + 1, budget)] for key, item in value.items()]]
    raise CodecError(f"type {kind.__name__} cannot cross the sandbox boundary")


def decode(data, _depth=0, _budget=None):
    """The value an ``encode`` form stands for, built from exact builtin types; CodecError if malformed."""
    budget = [MAX_ITEMS] if _budget is None else _budget
    budget[0] -= 1
    if budget[0] < 0 or _depth > MAX_DEPTH:
        raise CodecError("value too large or too deep")
    if type(data) is not list or not 1 <= len(data) <= 2 or type(data[0]) is not str:
        raise CodecError("malformed value")
    tag = data[0]
    if len(data) == 1:
        if tag == "N":
            return None
        raise CodecError("malformed value")
    payload = data[1]
    kind = type(payload)
    if tag == "B" and kind is bool:
        return payload
    if tag == "I" and kind is str and _INT.fullmatch(payload):
        return int(payload)
    if tag == "F" and kind is str and len(payload) <= 40 and _FLOAT.fullmatch(payload):
        return float(payload)
    if tag == "S" and kind is str:
        return payload
    if tag == "Y" and kind is str and _HEX.fullmatch(payload):
        return bytes.fromhex(payload)
    try:
        if tag in _SEQUENCES and kind is list:
            return _SEQUENCES[tag]([decode(item, _depth + 1, budget) for item in payload])
        if tag == "D" and kind is list:
            result = {}
            for entry in payload:
                if type(entry) is not list or len(entry) != 2:
                    raise CodecError("malformed dict entry")
                key = decode(entry[0], _depth + 1, budget)
                if key in result:
                    raise CodecError("duplicate dict key")
                result[key] = decode(entry[1], _depth + 1, budget)
            return result
    except TypeError:  # an unhashable set element or dict key
        raise CodecError("unhashable element") from None
    raise CodecError("malformed value")


# ------------------------------------------------------------------------------------------------ plumbing


def _write_line(fd: int, message) -> None:
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


class _Lines:
    """Blocking line reader over a raw fd (the runner's side of a pipe)."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def readline(self):
        while b"\n" not in self.buffer:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def _private_channel() -> tuple[int, int]:
    """Keep the pipes to the parent on private fds; fds 0, 1, 2 become /dev/null (prints go nowhere)."""
    fd_in, fd_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return fd_in, fd_out


def apply_limits(limits: dict, nproc: bool = True) -> None:
    """Kernel limits (RLIMIT_NPROC is ignored for root, hence the uid drop and the seccomp filter)."""
    values = [
        ("RLIMIT_CPU", limits["cpu_seconds"]),
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_FSIZE", limits["file_size_bytes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_CORE", 0),
    ]
    if nproc:
        values.append(("RLIMIT_NPROC", 0))
    for name, value in values:
        resource.setrlimit(getattr(resource, name), (value, value))


# ------------------------------------------------------------------------------------------------ confinement
# Linux constants (uapi headers).
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 4096, 8192, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 24, 38, 22
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYS_MOUNT_SETATTR, SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 442, 444, 445, 446
SYS_OPEN_TREE, SYS_MOVE_MOUNT, OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, MOVE_MOUNT_F_EMPTY_PATH = 428, 429, 1, 0o2000000, 4
LANDLOCK_READ = 1 | 4 | 8  # EXECUTE, READ_FILE, READ_DIR
LANDLOCK_FILE_RIGHTS = 1 | 2 | 4 | (1 << 14) | (1 << 15)  # EXECUTE, WRITE_FILE, READ_FILE, TRUNCATE, IOCTL_DEV

# seccomp: syscalls failed with EPERM, per architecture (audit arch id, numbers). Process creation (fork, vfork,
# clone - threads included -, clone3, execve, execveat), signalling and inspecting other processes, sockets,
# io_uring (which would bypass this filter), namespaces and mounts, device/FIFO nodes, keyrings, bpf, perf,
# userfaultfd, personality, file handles, memfd, SysV IPC, leaving the process group, prctl, chmod/chown/xattr.
_SECCOMP_TARGETS = {
    "x86_64": (
        0xC000003E,
        (57, 58, 56, 435, 59, 322, 62, 200, 234, 129, 297, 434, 424, 438, 101, 310, 311, 312, 41, 53, 42, 49,
         425, 426, 427, 272, 308, 165, 166, 155, 161, 428, 429, 430, 431, 432, 433, 442, 133, 259, 250, 248, 249,
         321, 298, 323, 135, 303, 304, 319, 29, 64, 68, 112, 109, 157, 90, 91, 268, 452, 92, 93, 94, 260, 188,
         189, 190, 197, 198, 199),
    ),
    "aarch64": (
        0xC00000B7,
        (220, 435, 221, 281, 129, 130, 131, 138, 240, 434, 424, 438, 117, 270, 271, 272, 198, 199, 200, 203,
         425, 426, 427, 97, 268, 40, 39, 41, 51, 428, 429, 430, 431, 432, 433, 442, 33, 219, 217, 218, 280, 241,
         282, 92, 264, 265, 279, 194, 190, 186, 157, 154, 167, 52, 53, 452, 54, 55, 5, 6, 7, 14, 15, 16),
    ),
}  # fmt: skip
_X32_SYSCALL_BIT = 0x40000000

# Audit events refused by the (bypassable, defence-in-depth only) audit hook.
_DENIED_EVENTS = frozenset(
    {
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.kill", "os.killpg",
        "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.__new__",
    }
)  # fmt: skip
_DENIED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "ctypes", "cffi", "_xxsubinterpreters", "multiprocessing"})


def confine(config: dict) -> dict:
    """Apply every isolation layer this machine allows to the current process; the features obtained.

    Order: namespaces (user where needed, mount, pid, net, ipc, uts; the pid namespace needs a fork, after which
    the original process only waits), resource limits, the file system view (everything read-only and private,
    a size-limited tmpfs as the working directory, a fresh /proc, the standard library made reachable for
    ``nobody``), a Landlock ruleset (reads only of the standard library and system libraries, writes only in
    the working directory, no TCP, no signals or abstract sockets out of the domain), the privilege drop
    (``nobody`` without groups or capabilities; or no capabilities at all), no_new_privs, Landlock, seccomp.
    Every layer but the limits and seccomp is optional: what is missing shows in the returned features.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    workdir, limits = config["workdir"], config["limits"]
    real_root = os.geteuid() == 0
    skip = set(config.get("skip", ()))  # layers the (trusted) parent asks to leave out: tests of weaker levels
    namespaces = [] if "namespaces" in skip else enter_namespaces(libc, real_root)
    features = {"host_uid": os.getuid(), "namespaces": namespaces}
    namespaces = set(features["namespaces"])
    apply_limits(limits)
    os.umask(0o022)
    features.update(isolate_filesystem(libc, namespaces, real_root, workdir, limits))
    os.chdir(workdir)
    read_paths = _read_paths()
    ruleset, abi = (-1, 0) if "landlock" in skip else landlock_ruleset(libc, workdir, read_paths, features["tmpfs"])
    features["identity"] = drop_privileges(libc, real_root, "user" in namespaces, read_paths, workdir)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "no_new_privs could not be set")
    features["landlock"] = 0
    if ruleset >= 0:
        if libc.syscall(SYS_LANDLOCK_RESTRICT, ruleset, 0) == 0:
            features["landlock"] = abi
        os.close(ruleset)
    features["capabilities"] = _effective_capabilities(libc)
    features["seccomp"] = install_seccomp(libc)
    features["audit_hook"] = True
    _install_audit_hook(workdir)
    return features


def enter_namespaces(libc, real_root: bool) -> list:
    """unshare() into new namespaces (and fork into the pid namespace); the names of those entered."""
    import ctypes

    base = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    attempts = ([base] if real_root else []) + [base | CLONE_NEWUSER, CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC]
    uid, gid = os.getuid(), os.getgid()
    for flags in attempts:
        if libc.unshare(flags) == 0:
            break
    else:
        return []
    if flags & CLONE_NEWUSER:
        # Map only ourselves (as root of the namespace, whose capabilities are dropped later).
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as file:
                    file.write(text)
        except OSError:
            pass  # unmapped ids: files are still accessed with the host's ids
    names = [name for bit, name in ((CLONE_NEWUSER, "user"), (CLONE_NEWNS, "mount"), (CLONE_NEWPID, "pid"),
             (CLONE_NEWNET, "net"), (CLONE_NEWIPC, "ipc"), (CLONE_NEWUTS, "uts")) if flags & bit]  # fmt: skip
    if flags & CLONE_NEWPID:
        child = os.fork()
        if child:  # the original process: outside the pid namespace, runs nothing, waits and exits likewise
            os.closerange(0, 1 << 16)
            _, status = os.waitpid(child, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        if libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0):  # die with the waiting parent (SIGKILL)
            raise OSError(ctypes.get_errno(), "PR_SET_PDEATHSIG failed")
    return names


def _mount(libc, source, target, fstype, flags, options=None) -> bool:
    def text(value):
        return None if value is None else os.fsencode(value)

    return libc.mount(text(source), text(target), text(fstype), flags, text(options)) == 0


def isolate_filesystem(libc, namespaces: set, real_root: bool, workdir: str, limits: dict) -> dict:
    """In a private mount namespace: all mounts read-only, a size-limited tmpfs over ``workdir``, /proc of the
    pid namespace, and (when we will become ``nobody``) the standard library re-exposed past unreadable parents."""
    import ctypes

    result = {"readonly_root": False, "tmpfs": False, "proc": False, "exposed": []}
    if "mount" not in namespaces:
        return result
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", MOUNT_ATTR_RDONLY, 0, MS_PRIVATE, 0))
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, attr, 32) == 0:
        result["readonly_root"] = True
    elif not _mount(libc, None, "/", None, MS_REC | MS_PRIVATE):
        return result  # mounts would propagate to the host: make none
    owner = f",uid={NOBODY},gid={NOBODY}" if real_root and "user" not in namespaces else ""
    size = f"size={limits['disk_bytes']},nr_inodes={limits['disk_inodes']},mode=0700{owner}"
    result["tmpfs"] = _mount(libc, "tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, size)
    if result["tmpfs"] and real_root and "user" not in namespaces:
        try:
            result["exposed"] = _expose_to_nobody(libc, [os.path.dirname(os.__file__), _dynload_dir(), workdir])
        except OSError:
            pass  # then nobody cannot import the standard library: drop_privileges keeps uid 0 without capabilities
    if "pid" in namespaces:
        result["proc"] = _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    return result


def _dynload_dir() -> str:
    import _json  # an extension module of lib-dynload in most builds (built in elsewhere: then the stdlib)

    return os.path.dirname(getattr(_json, "__file__", None) or os.__file__)


def _expose_to_nobody(libc, paths: list) -> list:
    """Make ``paths`` reachable for ``nobody``: over each closed ancestor (e.g. /root, mode 700) mount a tmpfs that
    holds only the way to them, and mount them back there (open_tree + move_mount, Linux 5.2+)."""
    import ctypes

    paths = sorted({os.path.realpath(path) for path in paths})
    blocked: dict[str, list] = {}
    for path in paths:
        if any(path.startswith(other + os.sep) for other in paths):
            continue  # inside another path that gets exposed
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                blocked.setdefault(ancestor, []).append(path)
                break
    exposed = []
    for closed, inner in blocked.items():
        trees = []
        for path in inner:
            flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
            tree = libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(path), flags)
            if tree < 0:
                raise OSError(ctypes.get_errno(), f"open_tree({path}) failed")
            trees.append((tree, path))
        if not _mount(libc, "tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,nr_inodes=128,mode=0755"):
            raise OSError(ctypes.get_errno(), f"could not mask {closed}")
        for tree, path in trees:
            os.makedirs(path, mode=0o755, exist_ok=True)
            if libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(path), MOVE_MOUNT_F_EMPTY_PATH):
                raise OSError(ctypes.get_errno(), f"could not mount {path} back")
            os.close(tree)
            exposed.append(path)
        _mount(libc, None, closed, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return exposed


def _read_paths() -> list:
    """What the sandboxed code may read: the standard library, system libraries, a few device and /etc files."""
    candidates = [os.path.dirname(os.__file__), _dynload_dir(), "/usr", "/lib", "/lib64", "/lib32",
                  "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom", "/dev/random", "/dev/zero"]  # fmt: skip
    return [path for path in dict.fromkeys(candidates) if os.path.exists(path)]


def landlock_ruleset(libc, workdir: str, read_paths: list, may_create: bool) -> tuple[int, int]:
    """A Landlock ruleset fd (and the ABI) allowing everything in ``workdir`` (but creating files there only when
    it is a size-limited tmpfs: ``may_create``), reads of ``read_paths`` and /dev/null, and nothing else of the
    file system, no TCP, and (ABI 6+) no signals or abstract unix sockets out of the domain; (-1, 0) when Landlock
    is unavailable. Applied later, after no_new_privs."""
    import ctypes

    abi = libc.syscall(SYS_LANDLOCK_CREATE, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return -1, 0
    handled = (1 << 13) - 1
    if abi >= 2:
        handled |= 1 << 13  # REFER
    if abi >= 3:
        handled |= 1 << 14  # TRUNCATE
    if abi >= 5:
        handled |= 1 << 15  # IOCTL_DEV
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
    scoped = 3 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = struct.pack("QQQ", handled, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    buffer = ctypes.create_string_buffer(attr, len(attr))
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE, buffer, len(attr), 0)
    if ruleset < 0:
        return -1, 0
    making = sum(1 << bit for bit in (6, 7, 8, 9, 10, 11, 12))  # MAKE_CHAR ... MAKE_SYM
    rules = [(workdir, handled if may_create else handled & ~making)] + [(path, LANDLOCK_READ) for path in read_paths]
    rules.append((os.devnull, 2 | 4 | (1 << 14)))  # WRITE_FILE | READ_FILE | TRUNCATE
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not os.path.isdir(path):
                access &= LANDLOCK_FILE_RIGHTS
            rule = ctypes.create_string_buffer(struct.pack("=Qi", access & handled, fd), 12)
            if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0):  # LANDLOCK_RULE_PATH_BENEATH
                raise OSError(ctypes.get_errno(), f"landlock rule for {path} failed")
        finally:
            os.close(fd)
    return ruleset, abi


def drop_privileges(libc, real_root: bool, in_user_namespace: bool, read_paths: list, workdir: str) -> str:
    """Become ``nobody`` (real root, when ``nobody`` can then read the standard library and the working
    directory), else drop every capability; a description of the identity obtained."""
    if real_root and not in_user_namespace:
        needed = [os.path.dirname(os.__file__), _dynload_dir()]
        os.setegid(NOBODY)
        os.seteuid(NOBODY)
        usable = all(os.access(path, os.R_OK | os.X_OK, effective_ids=True) for path in needed) and os.access(
            workdir, os.W_OK | os.X_OK, effective_ids=True
        )
        os.seteuid(0)
        os.setegid(0)
        if usable:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)  # all uids leave 0: the kernel clears every capability
            return "nobody"
    _drop_capabilities(libc)
    if in_user_namespace:
        return f"uid {os.getuid()} of a user namespace (host uid unchanged), no capabilities"
    return f"uid {os.getuid()}, no capabilities"


def _drop_capabilities(libc) -> None:
    import ctypes

    for capability in range(64):
        libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)  # fails (ignored) past the last capability
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0), 8)  # _LINUX_CAPABILITY_VERSION_3
    data = ctypes.create_string_buffer(bytes(24), 24)  # two {effective, permitted, inheritable}, all zero
    if libc.capset(header, data):
        raise OSError(ctypes.get_errno(), "capabilities could not be dropped")


def _effective_capabilities(libc) -> int:
    import ctypes

    header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0), 8)
    data = ctypes.create_string_buffer(24)
    if libc.capget(header, data):
        return -1
    low, high = struct.unpack_from("III", data.raw, 0), struct.unpack_from("III", data.raw, 12)
    return low[0] | low[1] | (high[0] | high[1]) << 32  # effective | permitted


def install_seccomp(libc) -> bool:
    """A seccomp filter failing the syscalls of ``_SECCOMP_TARGETS`` with EPERM (kernel-enforced: it holds for
    native code too). False on architectures without a table; an error if the kernel refuses it."""
    import ctypes

    target = _SECCOMP_TARGETS.get(os.uname().machine)
    if target is None:
        return False
    arch, denied_syscalls = target
    # Classic BPF over struct seccomp_data {int nr; u32 arch; ...}: instructions are (code, jt, jf, k).
    load_word, jump_eq, jump_ge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    program = [(load_word, 0, 0, 4), (jump_eq, 1, 0, arch), (ret, 0, 0, deny), (load_word, 0, 0, 0)]
    program.append((jump_ge, 0, 1, _X32_SYSCALL_BIT))  # x32 ABI numbers alias the ones below
    program.append((ret, 0, 0, deny))
    for syscall in denied_syscalls:
        program += [(jump_eq, 0, 1, syscall), (ret, 0, 0, deny)]
    program.append((ret, 0, 0, allow))
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *instruction) for instruction in program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program), ctypes.addressof(filters))
    if libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0):  # SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "seccomp filter could not be installed")
    return True


def _install_audit_hook(workdir: str) -> None:
    """A speed bump only (pure Python can defeat audit hooks): the kernel layers above are the boundary."""
    denied_events, denied_imports, inside = _DENIED_EVENTS, _DENIED_IMPORTS, workdir + os.sep
    realpath, fsdecode = os.path.realpath, os.fsdecode
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def hook(event, args):
        if event in denied_events:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in denied_imports:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if (
            event == "open"
            and not isinstance(args[0], int)
            and args[0] != os.devnull
            and ((args[2] or 0) & write_flags or any(char in (args[1] or "") for char in "wax+"))
            and not (realpath(fsdecode(args[0])) + os.sep).startswith(inside)
        ):
            raise PermissionError("sandbox: writing outside the working directory is not allowed")

    sys.addaudithook(hook)


# ------------------------------------------------------------------------------------------------ modes


def sandbox_main(mode: str) -> None:
    fd_in, fd_out = _private_channel()
    requests = _Lines(fd_in)
    config = json.loads(requests.readline())
    sys.dont_write_bytecode = True
    try:
        features = confine(config)
    except Exception as error:  # noqa: BLE001 - before any untrusted code: reported, the parent decides
        _write_line(fd_out, ["sandbox-error", repr(error)[:500]])
        return
    _write_line(fd_out, [mode, features])  # still before any untrusted code: genuine
    if mode == "probe":
        return
    serve(config["program"], requests, fd_out, config["limits"]["reply_bytes"])


def serve(program: str, requests: "_Lines", fd_out: int, reply_bytes: int) -> None:
    """Untrusted from here on: load the program, then answer one line per call request."""
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(program, "solution.py", "exec"), namespace)  # noqa: S102 - the sandboxed program
    except BaseException:  # noqa: BLE001 - a program that fails to load fails every test
        _write_line(fd_out, ["broken"])
        return
    _write_line(fd_out, ["ready"])
    while (line := requests.readline()) is not None:
        try:
            _, name, args, kwargs = json.loads(line)
            value = namespace[name](*decode(args), **decode(kwargs))
            reply = json.dumps(["ok", encode(value)], separators=(",", ":"))
            if len(reply) >= reply_bytes:
                raise CodecError("reply too large")
        except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt raised by the code too
            reply = '["err"]'
        data = (reply + "\n").encode()
        while data:
            data = data[os.write(fd_out, data) :]


class CandidateFailed(BaseException):
    """A call into the sandbox raised, timed out or died (a BaseException, so ``except Exception`` in a test
    cannot turn it into a pass; the checker and the parent record the failure regardless)."""


def checker_main() -> None:
    """Trusted: run each test with proxies for the program's functions; one verdict per test."""
    fd_in, fd_out = _private_channel()
    replies = _Lines(fd_in)
    config = json.loads(replies.readline())
    sys.dont_write_bytecode = True
    apply_limits(config["limits"], nproc=False)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # not ptrace-able/readable by same-uid processes
    except Exception:  # noqa: BLE001, S110 - defence in depth only
        pass
    state = {"failed": False, "calls": 0}

    def proxy_for(name):
        def proxy(*args, **kwargs):
            state["calls"] += 1
            try:
                request = {"call": name, "args": encode(list(args)), "kwargs": encode(dict(kwargs))}
            except CodecError:
                state["failed"] = True
                raise CandidateFailed("arguments that cannot be sent to the sandbox") from None
            _write_line(fd_out, request)
            line = replies.readline()
            reply = json.loads(line) if line is not None else {}
            if "ok" not in reply:
                state["failed"] = True
                raise CandidateFailed(reply.get("fail", "no reply"))
            return decode(reply["ok"])

        proxy.__name__ = proxy.__qualname__ = name
        return proxy

    base = {"__name__": "checker", "__builtins__": __builtins__}
    setup_error = None
    try:
        exec(compile(config["setup"], "setup.py", "exec"), base)  # noqa: S102 - trusted dataset text
    except BaseException as error:  # noqa: BLE001 - reported; tests needing the setup then fail
        setup_error = repr(error)[:500]
    for name in config["functions"]:
        base[name] = proxy_for(name)
    _write_line(fd_out, {"ready": True, "setup_error": setup_error})
    for index, source in config["tests"]:
        _write_line(fd_out, {"begin": index})
        state["failed"], state["calls"] = False, 0
        try:
            exec(compile(source, f"test_{index}.py", "exec"), dict(base))  # noqa: S102 - trusted test
            passed = True
        except BaseException:  # noqa: BLE001 - any exception (SystemExit included) fails the test
            passed = False
        _write_line(fd_out, {"end": index, "passed": passed and not state["failed"] and state["calls"] > 0})
    _write_line(fd_out, {"done": True})


if __name__ == "__main__":
    if sys.argv[1] == "check":
        checker_main()
    else:
        sandbox_main(sys.argv[1])
