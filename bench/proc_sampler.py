"""CPU seconds, peak memory and read/write bytes of a changing set of processes, sampled
from /proc (Linux) in a background thread, for the scaling benchmark (bench/fl_scale.py).

Processes come and go during a federated run (a ClientApp process per message, Ray
workers), so every ``interval`` seconds the sampler asks ``members()`` which processes to
watch and under which role ("serverapp", "superlink", ...), and keeps, per process, its
cumulative CPU seconds (user + system), its peak resident memory (VmHWM) and its
``rchar``/``wchar`` (every read()/write() syscall: sockets, files, pipes) with the wall
time of each sample.  A process that exits keeps its last sample, so its CPU time is short
by at most one interval.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


@dataclass
class Watched:
    """What the sampler knows of one process."""

    role: str
    command: str
    times: list[float] = field(default_factory=list)  # time.time() of each sample
    cpu: list[float] = field(default_factory=list)  # cumulative CPU seconds
    read: list[int] = field(default_factory=list)  # cumulative rchar
    written: list[int] = field(default_factory=list)  # cumulative wchar
    peak_bytes: int = 0  # VmHWM


def command_line(pid: int) -> str:
    try:
        return (
            (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def session_members(sessions: dict[int, str]) -> dict[int, str]:
    """pid → role of every process whose session id is a key of ``sessions`` (session leader
    pid → role)."""
    members = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        sid = int(stat[stat.rindex(")") + 2 :].split()[3])
        if sid in sessions:
            members[int(entry.name)] = sessions[sid]
    return members


def _read(pid: int) -> tuple[float, int, int, int] | None:
    """(CPU seconds, VmHWM bytes, rchar, wchar) of ``pid``; None once it is gone."""
    base = PROC / str(pid)
    try:
        stat = (base / "stat").read_text()
        status = (base / "status").read_text()
        io = dict(line.split(": ") for line in (base / "io").read_text().splitlines())
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    hwm = next(
        (int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")),
        0,
    )
    return cpu, hwm, int(io.get("rchar", 0)), int(io.get("wchar", 0))


class ProcessSampler:
    """Samples ``members()`` (pid → role) every ``interval`` seconds while in its ``with``."""

    def __init__(self, members: Callable[[], dict[int, str]], interval: float = 0.5) -> None:
        self.members = members
        self.interval = interval
        self.watched: dict[int, Watched] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # sample() runs on the thread and on demand
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        with self._lock:
            self._sample()

    def _sample(self) -> None:
        now = time.time()
        for pid, role in self.members().items():
            figures = _read(pid)
            if figures is None:
                continue
            watched = self.watched.get(pid)
            if watched is None:
                watched = self.watched[pid] = Watched(role, command_line(pid)[:200])
            cpu, hwm, read, written = figures
            watched.times.append(now)
            watched.cpu.append(cpu)
            watched.read.append(read)
            watched.written.append(written)
            watched.peak_bytes = max(watched.peak_bytes, hwm)

    def _at(self, role: str, moment: float, series: str) -> float:
        total = 0.0
        for watched in self.watched.values():
            if watched.role != role:
                continue
            values = [
                v
                for t, v in zip(watched.times, getattr(watched, series), strict=True)
                if t <= moment
            ]
            total += values[-1] if values else 0.0
        return total

    def between(self, role: str, began: float, ended: float) -> dict[str, float]:
        """CPU seconds and read/written bytes of ``role``'s processes from ``began`` to
        ``ended`` (time.time())."""
        return {
            name: self._at(role, ended, series) - self._at(role, began, series)
            for name, series in (
                ("cpu_seconds", "cpu"),
                ("read_bytes", "read"),
                ("written_bytes", "written"),
            )
        }

    def cpu_rate(self, role: str) -> float:
        """CPU seconds per second of ``role``'s processes over the samples of each."""
        return sum(
            (w.cpu[-1] - w.cpu[0]) / (w.times[-1] - w.times[0])
            for w in self.watched.values()
            if w.role == role and len(w.times) > 1
        )

    def peak_bytes(self, role: str) -> int:
        """The largest peak resident memory of one of ``role``'s processes."""
        return max((w.peak_bytes for w in self.watched.values() if w.role == role), default=0)

    def roles(self) -> dict[str, int]:
        """role → how many processes were seen in it."""
        counts: dict[str, int] = {}
        for watched in self.watched.values():
            counts[watched.role] = counts.get(watched.role, 0) + 1
        return counts
