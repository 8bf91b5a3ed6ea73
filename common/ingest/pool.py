"""Forked worker pools (reading DICOM headers, converting scans) that leave stopping to the
parent process.

A worker ignores Ctrl-C and SIGHUP and dies quietly of SIGTERM: the parent, told to stop,
stops the pool (``Pool.terminate`` sends SIGTERM) and keeps what the workers finished, so
no worker prints a traceback of its own.  On Linux a worker also dies with its parent, even a
parent killed by SIGKILL, instead of waiting for work forever.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import signal
import sys
from multiprocessing.pool import Pool

_PR_SET_PDEATHSIG = 1


def forked_pool(workers: int) -> Pool:
    """A pool of ``workers`` forked processes (they share the parent's memory as it was)."""
    return multiprocessing.get_context("fork").Pool(workers, initializer=_leave_signals_to_parent)


def _leave_signals_to_parent() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform == "linux":
        # Without it a worker outlives only a parent killed by SIGKILL.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
