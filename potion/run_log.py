"""A run's log: the log records this process writes while a run lasts, kept for ``run.log`` in its folder and as
an MLflow artifact.

The capture sits on the root logger beside whatever handlers the command has (Hydra's console and job file), so
it holds what the console showed from Python logging at the levels the command was set up with. It keeps the
text in memory (the last ``limit_chars`` characters), so nothing is half-written in the run folder: the file
is written once, atomically, with the run's other outputs.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

LOG_FILE = "run.log"
LIMIT_CHARS = 4_000_000  # a longer log keeps its end
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogCapture(logging.Handler):
    """Formatted log records of this process, newest last, at most ``limit_chars`` characters of them."""

    def __init__(self, limit_chars: int = LIMIT_CHARS) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter(FORMAT))
        self._lines: deque[str] = deque()
        self._size = 0
        self._limit = limit_chars
        self.dropped = 0  # records left out at the front to stay within the limit

    def emit(self, record: logging.LogRecord) -> None:
        """Keep one formatted record (a record that cannot be formatted is left out, as logging does)."""
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - logging never raises into the caller
            self.handleError(record)
            return
        self._lines.append(line)
        self._size += len(line)
        while self._size > self._limit and len(self._lines) > 1:
            self._size -= len(self._lines.popleft())
            self.dropped += 1

    def text(self) -> str:
        """The captured log (with a first line saying how many records were dropped, if any)."""
        head = f"[{self.dropped} earlier log records left out]\n" if self.dropped else ""
        return head + "".join(self._lines)


@contextmanager
def captured_log(limit_chars: int = LIMIT_CHARS) -> Iterator[LogCapture]:
    """Capture the process's log records for the duration of the block."""
    capture = LogCapture(limit_chars)
    root = logging.getLogger()
    root.addHandler(capture)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
