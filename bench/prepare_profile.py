"""Where ``fedct prepare``'s time goes: wall time by phase, and cProfile's top functions.

Both run ``prepare`` in this process with one worker, so that every phase is seen (with more
workers the conversions overlap in worker processes).  The phases are the functions that do
each step, timed exclusively — a phase called inside another (the QA report decodes and
normalises its thumbnails) counts only for itself — so the phases and "other" sum to the
wall time.  Used by ``python -m bench.preprocess --profile``.
"""

from __future__ import annotations

import contextlib
import cProfile
import functools
import io
import pstats
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fedct.common.cache.normalize
import fedct.common.cache.prepare
import fedct.common.cache.qa
import fedct.common.ingest.dicom
from fedct.common.cache.config import PrepareConfig
from fedct.common.cache.prepare import prepare
from fedct.common.cache.scan_index import ScanRecord

# (phase, owner, attribute): the function whose calls are the phase.
PHASES = (
    ("header reads", fedct.common.ingest.dicom, "_read_header"),
    ("pixel decode", fedct.common.ingest.dicom, "_decode_hu"),
    ("HU/normalise", fedct.common.cache.normalize, "normalize_slices"),
    ("resize", fedct.common.cache.normalize, "resize_slices"),
    ("uint8 quantise", fedct.common.cache.prepare, "to_cache_pixels"),
    ("QA HU histogram", fedct.common.cache.prepare, "scan_hu_counts"),
    ("write .npy", fedct.common.cache.prepare, "write_scan"),
    ("sha256", ScanRecord, "of_blob"),
    ("QA report", fedct.common.cache.qa.QACollector, "write"),
    ("manifest", fedct.common.cache.prepare, "write_manifest"),
)


class PhaseClock:
    """Exclusive wall time per phase: time spent in a nested phase is taken off its caller."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._nested: list[float] = []

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._nested.append(0.0)
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - began
                inner = self._nested.pop()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed - inner
                self.calls[phase] = self.calls.get(phase, 0) + 1
                if self._nested:
                    self._nested[-1] += elapsed

        return timed


@contextlib.contextmanager
def _patched(clock: PhaseClock) -> Iterator[None]:
    originals = [(owner, name, owner.__dict__[name]) for _, owner, name in PHASES]
    try:
        for phase, owner, name in PHASES:
            value = owner.__dict__[name]
            if isinstance(value, classmethod):
                setattr(owner, name, classmethod(clock.wrap(phase, value.__func__)))
            else:
                setattr(owner, name, clock.wrap(phase, value))
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def phase_breakdown(raw: Path, cache: Path, size: int) -> dict[str, Any]:
    """``prepare`` of ``raw`` into a fresh ``cache`` with one worker, timed by phase."""
    shutil.rmtree(cache, ignore_errors=True)
    clock = PhaseClock()
    with _patched(clock), _one_header_thread():
        began = time.perf_counter()
        result = prepare(
            raw, cache, PrepareConfig(size=size, workers=1, min_slices=1), progress=False
        )
        wall = time.perf_counter() - began
    phases = {phase: clock.seconds.get(phase, 0.0) for phase, _, _ in PHASES}
    phases["other"] = wall - sum(phases.values())
    return {
        "scans": len(result.rows),
        "wall_seconds": wall,
        "seconds": phases,
        "calls": {phase: clock.calls.get(phase, 0) for phase, _, _ in PHASES},
    }


@contextlib.contextmanager
def _one_header_thread() -> Iterator[None]:
    """``read_dicom``'s header pool with one thread, so that the phase clock (not thread-safe)
    sees the reads one after another."""
    original = fedct.common.ingest.dicom.ThreadPoolExecutor
    fedct.common.ingest.dicom.ThreadPoolExecutor = lambda **_: original(max_workers=1)  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        fedct.common.ingest.dicom.ThreadPoolExecutor = original  # type: ignore[misc]


def cprofile_top(raw: Path, cache: Path, size: int, top: int = 20) -> str:
    """cProfile's ``top`` functions by own time of a one-worker, one-header-thread ``prepare``."""
    shutil.rmtree(cache, ignore_errors=True)
    profile = cProfile.Profile()
    with _one_header_thread():
        profile.enable()
        prepare(raw, cache, PrepareConfig(size=size, workers=1, min_slices=1), progress=False)
        profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()
