"""Reading lines from a child process's pipe under a wall-clock deadline (poll-based: any fd number works)."""

from __future__ import annotations

import math
import os
import select
import time


class LineReader:
    """Buffered line reader over a pipe whose every read is bounded by a monotonic ``deadline``.

    With ``max_bytes``, a line longer than that (or that many bytes without a newline) is never returned: the
    reader gives None and sets ``overflowed``, so a hostile writer cannot make the reader buffer without bound.
    """

    def __init__(self, stream, max_bytes: int | None = None):
        self._fd = stream.fileno()
        self._buffer = b""
        self._max_bytes = max_bytes
        self.overflowed = False

    def readline(self, deadline: float) -> str | None:
        """The next line without its newline, or None at EOF, once ``deadline`` (``time.monotonic``) passes, or
        (with ``max_bytes``) on an over-long line."""
        while b"\n" not in self._buffer:
            if self._max_bytes is not None and len(self._buffer) > self._max_bytes:
                self.overflowed = True
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not wait_for(self._fd, select.POLLIN, remaining):
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        if self._max_bytes is not None and len(line) > self._max_bytes:
            self.overflowed = True
            return None
        return line.decode(errors="replace")

    def pending(self) -> bool:
        """Whether anything is waiting to be read: buffered bytes, bytes in the pipe, or end of file."""
        return bool(self._buffer) or wait_for(self._fd, select.POLLIN, 0)


def wait_for(fd: int, events: int, timeout: float) -> bool:
    """Whether ``fd`` becomes ready for ``events`` (or hangs up / errs) within ``timeout`` seconds."""
    if timeout < 0:
        return False
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(math.ceil(timeout * 1000)))
