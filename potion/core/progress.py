"""Progress of long work on the console: a tqdm bar on stderr where Lightning's bar does not run (importance
passes, the training-based methods' SGD loops, REM, the in-process PTN search), shown once a loop has run
:data:`DELAY_S` seconds, so a quick loop prints nothing.

``trainer.progress_bar=auto`` (the default; docs/guide.md) shows bars only where this process has stderr, a
terminal, to itself: bars of jobs sharing one console (a parallel launcher's, a PTN sweep's jobs) would garble each
other, and a file or a pipe (tests, batch logs) would fill with redraws.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

DELAY_S = 5.0  # a loop that ends sooner shows no bar
NOTE_S = 1.0  # a note (which may read a loss from the GPU) is computed at most this often

Note = Callable[[], str] | str | None

_switch: bool | None = None  # the command's trainer.progress_bar when it is true or false; None: auto
_quiet = False  # inside quiet_auto(): auto is off
_told = False  # the line saying bars are off in a shared console was printed


def _as_switch(setting: Any) -> bool | None:
    """True / False for an explicit setting; None for ``auto`` / unset."""
    return setting if isinstance(setting, bool) else None


def configure(setting: Any) -> None:
    """Set the command's switch (``trainer.progress_bar``: true, false or auto) for every loop it runs.

    With auto in a job of a launcher that runs jobs side by side, one line says that bars are off and how to turn
    them on (once per process).
    """
    global _switch, _told
    _switch = _as_switch(setting)
    if _switch is None and not _told and _terminal() and not own_console():
        _told = True
        print("progress bars are off: this job shares its console with other jobs (trainer.progress_bar=true "
              "shows them anyway)", file=sys.stderr, flush=True)


def own_console() -> bool:
    """Whether this process has the console to itself: not a Hydra multirun job, or a job of the basic launcher
    (which runs one job at a time in this process)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return True
    if not HydraConfig.initialized():
        return True
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return True
    launcher = hydra.get("launcher") or {}
    return str(launcher.get("_target_", "")).endswith(".BasicLauncher")


@contextmanager
def quiet_auto() -> Iterator[None]:
    """Within the block, ``auto`` shows no progress (jobs whose console the caller reports for, such as a PTN
    sweep's candidate jobs); an explicit ``true`` still does."""
    global _quiet
    before, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = before


def _terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def enabled(setting: Any = None) -> bool:
    """Whether to show progress: an explicit ``setting`` wins, then the command's switch, then auto."""
    for choice in (_as_switch(setting), _switch):
        if choice is not None:
            return choice
    return _terminal() and own_console() and not _quiet


class Progress:
    """A tqdm bar over the steps of one loop on stderr, shown once the loop has run ``every_s`` seconds.

    ``total`` sizes the bar and the time left; ``bound=True`` says the loop may stop earlier (a search), so the
    total and the time left are upper bounds. A ``note`` (text, or a function called at most every
    :data:`NOTE_S` seconds, e.g. to read a loss from the GPU) ends the line.
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "steps", *, bound: bool = False,
                 show: bool | None = None, every_s: float | None = None, stream: TextIO | None = None) -> None:
        self.show = enabled() if show is None else show
        delay = DELAY_S if every_s is None else every_s
        self.note_s = min(NOTE_S, delay)
        self.noted = float("-inf")
        self.bar = tqdm(total=total, desc=f"{what} (may stop early)" if bound else what, unit=f" {unit}",
                        file=stream or sys.stderr, disable=not self.show, delay=delay, dynamic_ncols=True)

    def advance(self, n: int = 1, note: Note = None) -> None:
        """``n`` more steps done; the note is refreshed when the last one is at least :data:`NOTE_S` seconds old."""
        if self.show and note is not None and time.monotonic() - self.noted >= self.note_s:
            self.noted = time.monotonic()
            self.bar.set_postfix_str(_text(note), refresh=False)
        self.bar.update(n)

    def finish(self, note: Note = None) -> None:
        """Close the bar (its last state stays on the console when it was shown), with a closing note."""
        if self.show and note is not None:
            self.bar.set_postfix_str(_text(note), refresh=False)
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.finish()


def _text(note: Note) -> str:
    return (note() if callable(note) else note) or ""


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
