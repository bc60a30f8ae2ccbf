"""Reading lines from a child process's pipe under a wall-clock deadline."""

from __future__ import annotations

import os
import select
import time


class LineReader:
    """Buffered line reader over a pipe whose every read is bounded by a monotonic ``deadline``."""

    def __init__(self, stream):
        self._fd = stream.fileno()
        self._buffer = b""

    def readline(self, deadline: float) -> str | None:
        """The next line without its newline, or None at EOF or once ``deadline`` (``time.monotonic``) passes."""
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._fd], [], [], remaining)[0]:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace")
