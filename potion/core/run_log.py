"""A run's log: what the console showed while the run lasted, kept for ``run.log`` in its folder and as an MLflow
artifact.

Two sources go into one text, in order: the log records of the process (a handler on the root logger, beside the
command's own, e.g. Hydra's console and job file) and what is written to ``sys.stdout`` / ``sys.stderr`` (the
streams are wrapped while the run lasts and still write through). A progress bar that redraws a line with
carriage returns is kept as its last state. The text stays in memory (the last ``limit_chars`` characters), so
nothing is half-written in the run folder: the file is written once, atomically, with the run's other outputs.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

LOG_FILE = "run.log"
LIMIT_CHARS = 4_000_000  # a longer log keeps its end
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunLog:
    """The console of this process while a run lasts, newest last, at most ``limit_chars`` characters of it."""

    def __init__(self, limit_chars: int = LIMIT_CHARS) -> None:
        self._lines: deque[str] = deque()
        self._size = 0
        self._limit = limit_chars
        self._lock = threading.Lock()
        self.dropped = 0  # lines left out at the front to stay within the limit
        self.handler = _RecordHandler(self)
        self._restore: list[tuple[str, _Tee]] = []
        self._fallback: logging.Handler | None = None

    def add(self, line: str) -> None:
        """Keep one line (without its newline)."""
        with self._lock:
            self._lines.append(line + "\n")
            self._size += len(line) + 1
            while self._size > self._limit and len(self._lines) > 1:
                self._size -= len(self._lines.popleft())
                self.dropped += 1

    def text(self) -> str:
        """The captured console (with a first line saying how many lines were dropped, if any)."""
        for _, tee in self._restore:
            tee.flush_partial()
        with self._lock:
            head = f"[{self.dropped} earlier lines left out]\n" if self.dropped else ""
            return head + "".join(self._lines)

    def attach(self) -> None:
        """Start capturing: the root logger's records and the standard streams' writes."""
        root = logging.getLogger()
        if not root.hasHandlers():  # logging's last resort would print warnings; with a handler here it would not
            self._fallback = logging.StreamHandler(sys.stderr)
            self._fallback.setLevel(logging.WARNING)
            root.addHandler(self._fallback)
        root.addHandler(self.handler)
        for name in ("stdout", "stderr"):
            tee = _Tee(getattr(sys, name), self)
            setattr(sys, name, tee)
            self._restore.append((name, tee))

    def detach(self) -> None:
        """Stop capturing; the streams are unwrapped where nothing wrapped them again since."""
        root = logging.getLogger()
        root.removeHandler(self.handler)
        if self._fallback is not None:
            root.removeHandler(self._fallback)
            self._fallback = None
        for name, tee in reversed(self._restore):
            tee.flush_partial()
            tee.closed_capture = True  # still writes through if something kept a reference to it
            if getattr(sys, name) is tee:
                setattr(sys, name, tee.original)
        self._restore.clear()


class _RecordHandler(logging.Handler):
    def __init__(self, log: RunLog) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter(FORMAT))
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - logging never raises into the caller
            self.handleError(record)
            return
        for line in text.splitlines() or [""]:
            self._log.add(line)


class _Tee:
    """A text stream that writes through to ``original`` and keeps whole lines in a :class:`RunLog`."""

    def __init__(self, original: TextIO, log: RunLog) -> None:
        self.original = original
        self._log = log
        self._partial = ""
        self.closed_capture = False

    def write(self, text: str) -> int:
        written = self.original.write(text)
        if not self.closed_capture and isinstance(text, str):
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                self._log.add(line.rsplit("\r", 1)[-1])
            if len(self._partial) > 65536:  # a bar redrawn for hours: keep its last state only
                self._partial = self._partial.rsplit("\r", 1)[-1][-65536:]
        return written

    def flush_partial(self) -> None:
        """Keep an unfinished last line (its last redraw)."""
        last = self._partial.rsplit("\r", 1)[-1]
        self._partial = ""
        if last.strip():
            self._log.add(last)

    def flush(self) -> None:
        self.original.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the original stream's
        return getattr(self.original, name)


@contextmanager
def captured_log(limit_chars: int = LIMIT_CHARS) -> Iterator[RunLog]:
    """Capture the process's console (log records and standard streams) for the duration of the block."""
    log = RunLog(limit_chars)
    log.attach()
    try:
        yield log
    finally:
        log.detach()
