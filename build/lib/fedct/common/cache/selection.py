"""Which axial slices of a scan go into the model (ai-corona's middle portion)."""

from __future__ import annotations


def middle_slices(n: int, fraction: float = 0.5) -> tuple[int, int]:
    """``(start, stop)`` of the k = max(1, round(n * fraction)) contiguous middle slices.

    Defined for every n >= 1, unlike the public ai-corona code, whose slicing is off by one
    and empty for series of five slices or fewer.
    """
    if n < 1:
        raise ValueError(f"a scan needs at least one slice, got {n}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = min(n, max(1, round(n * fraction)))
    start = (n - k) // 2
    return start, start + k
