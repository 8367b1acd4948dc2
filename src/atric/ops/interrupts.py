"""SIGTERM and Ctrl-C as KeyboardInterrupt, never in the middle of a database call.

DVC, schedulers and ``docker stop`` end a stage or a tuning worker with SIGTERM; the run must
still be closed (KILLED in MLflow, the trial FAIL and queued again in Optuna). Raising the
interrupt wherever the main thread happens to be breaks that close when it lands inside a
SQLAlchemy call: SQLAlchemy then drops the connection without closing its cursor, SQLite keeps
the connection's write lock while that cursor lives (in the interrupt's traceback), and every
later write of the process (ending the run KILLED) waits out the busy timeout and fails. So
the handler defers an interrupt that arrives inside a database call, or inside a function
marked :func:`uninterruptible` (a request half-written to the tracking process would garble
the next one): the signal is sent again shortly, until it finds the main thread outside.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import CodeType, FrameType
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFER_SECONDS = 0.05  # how soon a deferred signal is sent again
DATABASE_PACKAGE = "sqlalchemy"  # MLflow's SQL store and Optuna's RDB storage both go through it
_UNINTERRUPTIBLE: set[CodeType] = set()


def uninterruptible(function: F) -> F:
    """Mark ``function``: an interrupt arriving while it runs waits until it returns."""
    _UNINTERRUPTIBLE.add(function.__code__)
    return function


def in_protected_call(frame: FrameType | None) -> bool:
    """Whether a frame of SQLAlchemy or of an :func:`uninterruptible` function is on the stack."""
    while frame is not None:
        if frame.f_code in _UNINTERRUPTIBLE:
            return True
        module = frame.f_globals.get("__name__", "")
        if module == DATABASE_PACKAGE or module.startswith(DATABASE_PACKAGE + "."):
            return True
        frame = frame.f_back
    return False


def _resend(signum: int) -> None:
    timer = threading.Timer(DEFER_SECONDS, os.kill, (os.getpid(), signum))
    timer.daemon = True  # an exiting process does not wait for it
    timer.start()


def _handler(signum: int, frame: FrameType | None) -> None:
    if in_protected_call(frame):
        _resend(signum)
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGINT raise KeyboardInterrupt outside protected calls.

    SIGINT is taken over only from Python's default handler (a caller's own handler stays);
    outside the main thread, where handlers cannot be set, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if signum == signal.SIGINT and current is not signal.default_int_handler:
            continue
        previous[signum] = signal.signal(signum, _handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
