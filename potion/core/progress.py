"""Progress of long work on the console: a rate-limited line on stderr where Lightning's bar does not run.

Importance passes, the SGD loops of the training-based methods (retrain, EU-k, fine-tune, SCRUB, Bad
Teacher, repair), REM and the in-process PTN search report through :class:`Progress`: at most one line
every :data:`INTERVAL_S` seconds with done/total, rate and time left, then one closing line, so a loop
that finishes within the interval prints nothing. Lightning's own progress bar shows training.

One switch, ``trainer.progress_bar`` (every command has a ``trainer`` group): ``true`` / ``false``, or
``auto`` (the default): on when stderr is a terminal, off inside a Hydra multirun or sweep job (many jobs
share one console there; a sweep prints one line per round instead) and when stderr is a file or a pipe
(tests, batch logs). The entry scripts hand the command's value to :func:`configure`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

INTERVAL_S = 5.0  # at most one progress line per this many seconds (per loop)

T = TypeVar("T")
Note = Callable[[], str] | str | None

_switch: bool | None = None  # the command's trainer.progress_bar when it is true or false; None: auto


def _as_switch(setting: Any) -> bool | None:
    """True / False for an explicit setting; None for ``auto`` / unset."""
    return setting if isinstance(setting, bool) else None


def configure(setting: Any) -> None:
    """Set the command's switch (``trainer.progress_bar``: true, false or auto) for every loop it runs."""
    global _switch
    _switch = _as_switch(setting)


def in_multirun_job() -> bool:
    """Whether this code runs as a job of a Hydra multirun (a grid, a sweep's candidate or final job)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return False
    if not HydraConfig.initialized():
        return False
    return HydraConfig.get().mode == RunMode.MULTIRUN


def enabled(setting: Any = None) -> bool:
    """Whether to show progress: an explicit ``setting`` wins, then the command's switch, then auto.

    Auto: stderr is a terminal and this is not a multirun job.
    """
    for choice in (_as_switch(setting), _switch):
        if choice is not None:
            return choice
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and not in_multirun_job()


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``: short enough for a progress line."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Counts the steps of one loop and prints a line to stderr at most every ``every_s`` seconds.

    ``total`` sizes the done/total part and the time left; ``bound=True`` says the loop may stop earlier
    (a search), so the total and the time left are upper bounds. A ``note`` (text, or a function called only
    when a line is printed, e.g. to read a loss from the GPU) ends the line.
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "steps", *, bound: bool = False,
                 show: bool | None = None, every_s: float | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.total, self.unit, self.bound = what, total, unit, bound
        self.show = enabled() if show is None else show
        self.every_s = INTERVAL_S if every_s is None else every_s
        self.stream, self.clock = stream, clock
        self.done = 0
        self.lines = 0
        self.start = self.last = clock()

    def advance(self, n: int = 1, note: Note = None) -> None:
        """``n`` more steps done; print a line if the last one is at least ``every_s`` seconds old."""
        self.done += n
        if self.show and self.clock() - self.last >= self.every_s:
            self._print(self._line(note))

    def finish(self, note: Note = None) -> None:
        """The closing line (steps, time taken, rate), printed only after at least one progress line."""
        if self.show and self.lines:
            elapsed = self.clock() - self.start
            self._print(f"{self.what}: {self.done} {self.unit} done in {duration(elapsed)} "
                        f"({self._rate(elapsed)}){_text(note)}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.finish()

    def _rate(self, elapsed: float) -> str:
        per_s = self.done / elapsed if elapsed > 0 else float("inf")
        if per_s >= 1 or per_s == 0:
            return f"{per_s:.3g} {self.unit}/s"
        return f"{elapsed / self.done:.3g} s each"

    def _line(self, note: Note) -> str:
        elapsed = self.clock() - self.start
        if self.total:
            of = f"of at most {self.total}" if self.bound else f"of {self.total}"
            left = (self.total - self.done) * elapsed / self.done if self.done else float("nan")
            eta = f", {'at most ' if self.bound else ''}{duration(left)} left"
            head = f"{self.done} {of} {self.unit} ({100 * self.done / self.total:.0f} %)"
        else:
            head, eta = f"{self.done} {self.unit}", ""
        return f"{self.what}: {head}, {self._rate(elapsed)}{eta}{_text(note)}"

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)
        self.lines += 1
        self.last = self.clock()


def _text(note: Note) -> str:
    text = note() if callable(note) else note
    return f"; {text}" if text else ""


def track(items: Iterable[T], what: str, total: int | None = None, unit: str = "steps", **kwargs: Any
          ) -> Iterator[T]:
    """``items`` one by one, counted by a :class:`Progress` (closed when the iteration ends)."""
    bar = Progress(what, total, unit, **kwargs)
    for item in items:
        yield item
        bar.advance()
    bar.finish()


@contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise these loggers to ``level`` for the block (chatter such as a launcher's per-job lines)."""
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, old in zip(loggers, before, strict=True):
            lg.setLevel(old)
