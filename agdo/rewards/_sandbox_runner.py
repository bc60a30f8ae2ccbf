"""Child process of :func:`agdo.rewards.code.run_tests_in_sandbox`; runs untrusted code. Not meant to be imported.

Started with ``python -I _sandbox_runner.py PAYLOAD`` in a fresh temporary directory, in a new session, with
stdin closed and a minimal environment. Before any untrusted code runs it: reads and deletes the payload,
keeps a private copy of stdout for results and points fds 1/2 at /dev/null, applies resource limits, drops
root privileges (to ``nobody``) when it can, installs a seccomp filter against process creation, and an
audit hook that refuses process creation, ctypes, sockets and file writes outside the working directory. Then it executes the program once and each
test in turn, writing ``TOKEN ready`` and ``TOKEN INDEX pass|fail`` lines. The random token makes results
that untrusted code might write on the channel by accident or by guesswork unusable.
"""

import json
import os
import platform
import resource
import struct
import sys

NOBODY = 65534

# seccomp: process-creating syscalls per architecture (audit arch id, syscall numbers of fork, vfork, clone,
# clone3, execve, execveat; aarch64 has no fork/vfork). Denying clone also denies threads, like RLIMIT_NPROC=0.
_SECCOMP_TARGETS = {
    "x86_64": (0xC000003E, (57, 58, 56, 435, 59, 322)),
    "aarch64": (0xC00000B7, (220, 435, 221, 281)),
}
_X32_SYSCALL_BIT = 0x40000000

# Audit events that would start or signal processes, load native code or reach the network.
_DENIED_EVENTS = frozenset(
    {
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.kill", "os.killpg",
        "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    }
)  # fmt: skip
# Modules that reach those capabilities without raising the events above.
_DENIED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "ctypes", "cffi", "_xxsubinterpreters", "multiprocessing"})
# Audit events whose arguments are paths that get modified: allowed only inside the working directory.
_PATH_EVENTS = frozenset(
    {
        "os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate", "os.chmod", "os.chown",
        "os.mkdir", "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.copyfile",
        "shutil.copymode", "shutil.copystat", "shutil.move",
    }
)  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def main() -> None:
    payload_path = sys.argv[1]
    with open(payload_path) as payload_file:
        payload = json.load(payload_file)
    os.remove(payload_path)
    token, limits = payload["token"], payload["limits"]

    results = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.dont_write_bytecode = True  # -I ignores PYTHONDONTWRITEBYTECODE; nothing should be written outside cwd

    try:
        apply_limits(limits)
        if os.getuid() == 0:
            drop_root_privileges()
        forbid_new_processes()
        sandbox_dir = os.path.realpath(os.getcwd())
        sys.addaudithook(lambda event, args: police(event, args, sandbox_dir))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises instead of scoring 0
        os.write(results, f"{token} sandbox-error {error!r}\n".encode())
        return

    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(payload["program"], "solution.py", "exec"), namespace)
    except BaseException:  # noqa: BLE001 - a program that fails to load fails every test
        os.write(results, f"{token} broken\n".encode())
        return
    os.write(results, f"{token} ready\n".encode())
    for index, test in payload["tests"]:
        try:
            exec(compile(test, f"test_{index}.py", "exec"), dict(namespace))
            verdict = "pass"
        except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt raised by the code also fail
            verdict = "fail"
        os.write(results, f"{token} {index} {verdict}\n".encode())


def apply_limits(limits: dict) -> None:
    """Kernel limits that hold even if the audit hook is bypassed (NPROC is ignored for root, hence the uid drop)."""
    for name, value in (
        ("RLIMIT_CPU", limits["cpu_seconds"]),
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_FSIZE", limits["file_size_bytes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_NPROC", 0),  # no new processes (or threads) for this user beyond those already running
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))


def drop_root_privileges() -> None:
    """Become ``nobody``, unless ``nobody`` could not read the standard library (e.g. a venv under /root).

    Probed with effective ids only, which is reversible; the real drop below is not.
    """
    stdlib = os.path.dirname(os.__file__)
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    usable = os.access(stdlib, os.R_OK | os.X_OK, effective_ids=True) and os.access(".", os.W_OK, effective_ids=True)
    os.seteuid(0)
    os.setegid(0)
    if usable:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def forbid_new_processes() -> None:
    """Install a seccomp filter that fails fork/clone/exec with EPERM, so no process can be started even by
    code that gets past the audit hook, and even as root (for which the kernel ignores RLIMIT_NPROC).

    Skipped on architectures not listed in ``_SECCOMP_TARGETS``; the rlimits and the audit hook remain.
    """
    target = _SECCOMP_TARGETS.get(platform.machine())
    if target is None:
        return
    import ctypes  # imported before the audit hook that denies it to the sandboxed code

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

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    fprog = SockFprog(len(program), ctypes.addressof(filters))
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) or libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog)):
        raise OSError(ctypes.get_errno(), "seccomp filter could not be installed")


def police(event: str, args: tuple, sandbox_dir: str) -> None:
    """Audit hook: raise PermissionError for anything the sandboxed code must not do."""
    if event in _DENIED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0].split(".")[0] in _DENIED_IMPORTS:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (flags or 0) & _WRITE_FLAGS or any(char in (mode or "") for char in "wax+")
        if writes and not isinstance(path, int) and path != os.devnull:
            require_inside(path, sandbox_dir)
    elif event in _PATH_EVENTS:
        for path in args:
            if isinstance(path, (str, bytes, os.PathLike)):
                require_inside(path, sandbox_dir)


def require_inside(path, sandbox_dir: str) -> None:
    resolved = os.path.realpath(os.fsdecode(path))
    if resolved != sandbox_dir and not resolved.startswith(sandbox_dir + os.sep):
        raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {resolved}")


if __name__ == "__main__":
    main()
