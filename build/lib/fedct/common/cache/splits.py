"""Patient-level, class-stratified, seeded train/tune/test splits.

A split depends on the data and the seed only: patients are ordered by a seeded hash of the
identifier the caller gives (``fedct prepare`` gives the raw patient ID, in memory, never
written), not by the site's salted pseudonyms, so two preparations of the same data — two
sites' copies, two fresh clones, each with its own salt — put every scan in the same split.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from fedct.common.cache.store import SPLITS


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` → train, tune, test fractions (they must sum to 1)."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError as exc:
        raise ValueError(f"split fractions {text!r} are not numbers") from exc
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {text!r}: need three non-negative numbers summing to 1")
    return parts  # type: ignore[return-value]


def assign_splits(
    patient_ids: Sequence[str],
    class_indices: Sequence[int],
    fractions: tuple[float, float, float],
    seed: int,
) -> list[str]:
    """The split of every scan; all scans of a patient share one split.

    A patient's stratum is the most severe class among their scans (COVID-19 > pneumonia or
    abnormal > normal; unlabelled = -1).  Within each stratum patients are put in the order of
    :func:`draw_order` and cut by the fractions, rounding so that the totals match the
    fractions best.
    """
    stratum: dict[str, int] = defaultdict(lambda: -1)
    for patient, cls in zip(patient_ids, class_indices, strict=True):
        stratum[patient] = max(stratum[patient], cls)
    by_stratum: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(stratum, key=lambda p: draw_order(p, seed)):
        by_stratum[stratum[patient]].append(patient)
    split_of: dict[str, str] = {}
    for patients in by_stratum.values():
        bounds = np.rint(np.cumsum(fractions) * len(patients)).astype(int)
        for rank, patient in enumerate(patients):
            split_of[patient] = SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
    return [split_of[p] for p in patient_ids]


def draw_order(patient: str, seed: int) -> bytes:
    """A patient's place in the seeded random order: the hash of the seed and identifier."""
    return hashlib.sha256(f"{seed}\0{patient}".encode()).digest()
