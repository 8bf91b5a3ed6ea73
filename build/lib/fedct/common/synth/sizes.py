"""The synthetic cohort profiles (tiny, demo, full) and how big each one is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ProfileName = Literal["tiny", "demo", "full"]


@dataclass(frozen=True)
class CohortSize:
    """How big a cohort profile is.  Slice counts are scaled (and clamped) from the hospital
    profiles' real ones; the scanned length stays, so slices get thicker."""

    matrix: int
    slice_scale: float
    slice_bounds: tuple[int, int] | None
    scans_per_site: int
    mosmed_studies: int
    ccccii_patients: int  # per class


SIZES: dict[str, CohortSize] = {
    "tiny": CohortSize(64, 0.3, (12, 16), 8, 10, 2),
    "demo": CohortSize(128, 0.4, (16, 48), 40, 60, 8),
    "full": CohortSize(512, 1.0, None, 40, 50, 10),
}
