"""Patient-level, class-stratified, seeded train/tune/test splits."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from common.cache import SPLITS


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
    abnormal > normal; unlabelled = -1).  Within each stratum patients are shuffled with the
    seed and cut by the fractions, rounding so that the totals match the fractions best.
    """
    stratum: dict[str, int] = defaultdict(lambda: -1)
    for patient, cls in zip(patient_ids, class_indices, strict=True):
        stratum[patient] = max(stratum[patient], cls)
    by_stratum: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(stratum):
        by_stratum[stratum[patient]].append(patient)
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for cls in sorted(by_stratum):
        patients = by_stratum[cls]
        order = rng.permutation(len(patients))
        bounds = np.rint(np.cumsum(fractions) * len(patients)).astype(int)
        for rank, idx in enumerate(order):
            split_of[patients[idx]] = SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
    return [split_of[p] for p in patient_ids]
