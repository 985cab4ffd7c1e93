"""Termination by the user or a scheduler: SIGTERM/SIGINT become an :class:`Interrupted` exception.

A scheduler (SLURM, Kubernetes, a CI runner) ends a job with SIGTERM and reads the exit status: a run it
stopped must not look like a success. The entry scripts run their work in :func:`exit_when_interrupted`:
there the signal raises :class:`Interrupted` wherever the process is (outputs are written atomically, so
nothing is half-written), which ends the process with one ``interrupted:`` line and the shell's
convention for a signal, 128 + its number (143 for SIGTERM, 130 for Ctrl+C).

Inside a Lightning fit the signal is only recorded (:func:`deferred`); the training loop stops at the
end of the current step, after writing a checkpoint there, so a resumed run loses nothing.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The process was asked to stop (a BaseException, so ``except Exception`` blocks do not swallow it)."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signum, detail)
        self.signum = int(signum)
        self.detail = detail

    @property
    def exit_code(self) -> int:
        """128 + the signal number: what a shell reports for a process the signal ended (SIGTERM: 143)."""
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return f"{name}{': ' + self.detail if self.detail else ''}"


_pending: int | None = None
_deferring = False


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if _deferring and _pending is None:  # the first signal asks for a clean stop at the next step boundary
        _pending = signum
        return
    raise Interrupted(signum)  # outside a fit, or a second signal: stop here


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def pending() -> int | None:
    """The signal that asked a deferred section to stop, or None."""
    return _pending


@contextmanager
def deferred() -> Iterator[None]:
    """Inside: SIGTERM and SIGINT only record a stop request (see :func:`pending`); a second one stops at once.

    On leaving, a request still pending (the work finished before anyone looked) raises :class:`Interrupted`.
    """
    global _deferring, _pending
    if not _on_main_thread():  # signals reach the main thread only; nothing to defer elsewhere
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _pending, _deferring = None, True
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        _deferring = False
        for s, handler in previous.items():
            signal.signal(s, handler)
        signum, _pending = _pending, None
    if signum is not None:
        raise Interrupted(signum)


@contextmanager
def raise_on_termination() -> Iterator[None]:
    """Inside: SIGTERM raises :class:`Interrupted` (SIGINT keeps Python's KeyboardInterrupt); restored after.

    Restoring matters where one process runs several jobs (a joblib worker of a multirun): an idle worker
    that its pool stops with SIGTERM must end as the pool expects, not with an Interrupted traceback.
    """
    if not _on_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_when_interrupted(fn: Callable[[], Any], what_next: str) -> Any:
    """Run ``fn`` with SIGTERM raising :class:`Interrupted`; that ends the process with one ``interrupted:``
    line and exit status 128 + the signal's number (143 for SIGTERM)."""
    try:
        with raise_on_termination():
            return fn()
    except Interrupted as exc:
        print(f"interrupted ({exc}); {what_next}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
