"""Patient-level, seeded train/tune/test splits that never move.

A patient's split depends only on a seeded hash of the patient's own identifier and on the
fractions: the hash is read as a number ``u`` in [0, 1) and cut at the fractions (train when
``u`` < train, tune when ``u`` < train + tune, else test).  So

- all scans of a patient share one split;
- adding patients (a new export prepared into the cache) or removing some never moves
  anyone else: a scan once in test stays in test, so no model trains on a scan it was
  earlier tested on;
- the split follows the data and the seed, not the site's salt: ``fedct prepare`` gives the
  raw patient ID (in memory, never written), so two preparations of the same data, each
  with its own salt, put every scan in the same split.

Stratification holds in expectation: within every class (any group of patients) each
patient lands in a split with the split's probability, independently of the others.  The
counts per class then vary binomially around the fractions instead of matching them exactly
as a sort-and-cut stratification (which moves patients whenever one is added) would;
``python -m bench.split_balance`` measures by how much, at the demo's site sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from fedct.common.cache.store import SPLITS

RULE = "sha256-threshold"  # cache.json records it with the seed and fractions


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` → train, tune, test fractions (they must sum to 1)."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError as exc:
        raise ValueError(f"split fractions {text!r} are not numbers") from exc
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {text!r}: need three non-negative numbers summing to 1")
    return parts  # type: ignore[return-value]


def draw(patient: str, seed: int) -> float:
    """A patient's seeded uniform number in [0, 1): the first 8 bytes of the hash of the
    seed and identifier."""
    digest = hashlib.sha256(f"{seed}\0{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(patient: str, fractions: Sequence[float], seed: int) -> str:
    """The split of ``patient`` (see the module docstring)."""
    u = draw(patient, seed)
    bound = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        bound += fraction
        if u < bound:
            return name
    return next(name for name, f in zip(SPLITS[::-1], fractions[::-1], strict=True) if f > 0)


def assign_splits(
    patient_ids: Sequence[str], fractions: tuple[float, float, float], seed: int
) -> list[str]:
    """The split of every scan, given its patient's identifier."""
    return [split_of(patient, fractions, seed) for patient in patient_ids]


def split_record(fractions: Sequence[float], seed: int) -> dict[str, object]:
    """What cache.json records of how a cache is split."""
    return {"rule": RULE, "seed": seed, "fractions": [float(f) for f in fractions]}
