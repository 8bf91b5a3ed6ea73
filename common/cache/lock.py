"""One writer per cache: ``fedct prepare`` holds ``CACHE/prepare.lock`` while it writes.

The lock is an exclusive ``flock`` on the file, which the system releases when the holder
ends however it ends (even killed), so a lock is never left stale on the host that held it.
While held, the file names its holder: process id, host, the command and since when.  A
second writer is refused at once, in one line naming the holder, before it writes
anything.  A site's check before a run (client/site_data.py) asks :func:`writer_of`, which
tries the lock shared for an instant, and refuses a cache that is being written.

The file is never removed (removing it would let a second writer lock a new file while the
first still holds the old one); it is emptied when its holder ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedct.common.cache.store import CacheError

LOCK_FILE = "prepare.lock"
READER_WAIT_SECONDS = 2.0


class CacheBusyError(CacheError):
    """Another process is writing this cache."""


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"{holder.get('command', 'a writer')} (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {holder.get('since', '?')})"
    )


def _read(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


@contextmanager
def cache_writer(cache_dir: Path, command: str = "fedct prepare") -> Iterator[None]:
    """Hold the cache's writer lock for the ``with`` block, or raise
    :class:`CacheBusyError` naming the process that holds it."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _take(fd, path, cache_dir)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _take(fd: int, path: Path, cache_dir: Path) -> None:
    """The exclusive lock; a reader's check holds it shared for an instant (the file is then
    empty), so that is waited for, a writer is not."""
    deadline = time.monotonic() + READER_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _read(path)
            if holder is None and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            who = _describe(holder) if holder else "another process"
            raise CacheBusyError(
                f"{cache_dir} is being written by {who}: one writer per cache; wait for it to "
                "end (or stop it), then run the same command again"
            ) from None


def writer_of(cache_dir: Path) -> str | None:
    """Who is writing ``cache_dir`` now, None when nobody is (the lock can be taken shared
    for an instant)."""
    path = Path(cache_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(path)
        return _describe(holder) if holder else "another process"
    finally:
        os.close(fd)
    return None
