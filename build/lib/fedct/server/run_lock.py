"""One writer per run directory: the coordinator's lock file ``run.lock``.

The coordinator takes the lock before it reads or writes anything in its run directory and
holds it to the end of the run.  The file names the holder: Flower run id, process id,
host, when it took the lock and its last heartbeat, which a thread renews every
:data:`HEARTBEAT_SECONDS`.  A second coordinator is refused with one line naming the holder.
A lock whose holder is gone is taken over with a warning: on the same host when its process
no longer exists (or the pid now belongs to a younger process), on another host when its
heartbeat is older than :data:`STALE_AFTER_SECONDS`.  A holder whose lock was taken over
(it was thought gone) stops before its next write (:meth:`RunLock.check`).

Deciding and writing the lock happens under an ``flock`` on ``.run.lock.guard``, so two
coordinators starting at once on one host cannot both win.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedct.common.cache.store import atomic_open

LOCK_FILE = "run.lock"
GUARD_FILE = ".run.lock.guard"
HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 120.0


class RunLockedError(RuntimeError):
    """The run directory is held by another coordinator that is alive."""


class RunLockLost(RuntimeError):
    """Another coordinator took this one's lock over: it must not write any more."""


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory (the content of ``run.lock``)."""

    run_id: str
    pid: int
    host: str
    since: str
    heartbeat: float  # seconds since the epoch
    token: str  # tells two takings of the lock apart
    process_start: str | None = None

    @classmethod
    def me(cls, run_id: str, clock: Callable[[], float]) -> Holder:
        return cls(
            run_id=run_id,
            pid=os.getpid(),
            host=socket.gethostname(),
            since=datetime.now(UTC).isoformat(timespec="seconds"),
            heartbeat=clock(),
            token=uuid.uuid4().hex,
            process_start=_process_start(os.getpid()),
        )

    def describe(self, now: float) -> str:
        return (
            f"Flower run {self.run_id} (pid {self.pid} on {self.host}, since {self.since}, "
            f"last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago)"
        )

    def gone(self, now: float, stale_after: float) -> str | None:
        """Why the holder is gone, or None while it may still be writing."""
        if self.host == socket.gethostname():
            if not pid_alive(self.pid):
                return f"its process {self.pid} no longer exists"
            start = _process_start(self.pid)
            if self.process_start and start and start != self.process_start:
                return f"pid {self.pid} now belongs to another process"
            return None
        if now - self.heartbeat > stale_after:
            return f"no heartbeat for {now - self.heartbeat:.0f} s (more than {stale_after:.0f} s)"
        return None


class RunLock:
    """The lock of one run directory, held by this process (a context manager)."""

    def __init__(
        self,
        run_dir: Path,
        run_id: str,
        *,
        interval: float = HEARTBEAT_SECONDS,
        stale_after: float = STALE_AFTER_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.run_id = run_id
        self.interval = interval
        self.stale_after = stale_after
        self.clock = clock
        self.holder: Holder | None = None
        self.took_over: str | None = None  # the warning, when a stale lock was taken over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def _guard(self) -> Iterator[None]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / GUARD_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read(self) -> Holder | None:
        """The current holder; None when the directory is not locked.  A lock file that
        cannot be read is reported as a holder on no host, which goes stale with its age."""
        try:
            text = self.path.read_text()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            return Holder(**json.loads(text))
        except (ValueError, TypeError):
            return Holder("unknown", -1, "(unreadable run.lock)", "?", mtime, "")

    def _write(self, holder: Holder) -> None:
        with atomic_open(self.path, durable=True) as handle:
            json.dump(asdict(holder), handle, indent=2)
            handle.write("\n")

    def _refusal(self, holder: Holder, now: float) -> str:
        return (
            f"{self.run_dir} is in use by {holder.describe(now)}: one coordinator per run "
            f"directory; stop that run (flwr stop {holder.run_id}) or wait for it to end, "
            "then resume"
        )

    def in_use(self) -> str | None:
        """Why this directory cannot be taken now (a live holder), None when it can."""
        current, now = self.read(), self.clock()
        if current is None or current.gone(now, self.stale_after):
            return None
        return self._refusal(current, now)

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming its holder."""
        with self._guard():
            current = self.read()
            now = self.clock()
            if current is not None:
                reason = current.gone(now, self.stale_after)
                if reason is None:
                    raise RunLockedError(self._refusal(current, now))
                self.took_over = (
                    f"{self.run_dir}: taking over the lock of {current.describe(now)}: {reason}"
                )
            self.holder = Holder.me(self.run_id, self.clock)
            self._write(self.holder)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _mine(self) -> bool:
        current = self.read()
        return (
            current is not None and self.holder is not None and current.token == self.holder.token
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._guard():
                if not self._mine():
                    return
                assert self.holder is not None
                self.holder = Holder(**{**asdict(self.holder), "heartbeat": self.clock()})
                self._write(self.holder)

    def check(self) -> None:
        """Raise :class:`RunLockLost` when the lock no longer names this process."""
        if not self._mine():
            current = self.read()
            who = current.describe(self.clock()) if current else "nobody (the lock file is gone)"
            raise RunLockLost(
                f"{self.run_dir}: this coordinator lost its lock to {who}; stopping without writing"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._guard():
            if self._mine():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
