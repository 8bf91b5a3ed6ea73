"""SIGTERM and SIGHUP stop a ``fedct`` command as Ctrl-C does.

:func:`stop_signals` (around every ``fedct`` command, common/cli.py) makes either signal raise
:class:`Stopped`, a ``KeyboardInterrupt``, in the main thread, so the same clean-up runs as
for Ctrl-C: a command stops what it started (worker pools, Flower's processes), keeps what
it finished, says so in one line and exits with 128 + the signal's number.  Further stop
signals during that clean-up are ignored, so a second SIGTERM cannot cut it short.  A
forked child that inherited the handler dies of the signal as it would by default
(common/ingest/pool.py's workers reset it themselves).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_state: dict[str, int] = {}


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_signals() -> Iterator[None]:
    """Handle the stop signals in this process during the ``with`` block (from the main
    thread; elsewhere signals cannot be handled and the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["owner"] = os.getpid()
    _state.pop("received", None)
    previous = {signum: signal.signal(signum, _handle) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _handle(signum: int, _frame: object) -> None:
    if os.getpid() != _state.get("owner"):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    _state["received"] = signum
    raise Stopped(signum)


def stopped_by() -> str:
    """What stopped the command: ``SIGTERM``, ``SIGHUP``, or ``Ctrl-C``."""
    received = _state.get("received")
    return signal.Signals(received).name if received else "Ctrl-C"


def exit_status() -> int:
    """The exit status of a command stopped by :func:`stopped_by`: 128 + the signal."""
    return 128 + _state.get("received", signal.SIGINT)
