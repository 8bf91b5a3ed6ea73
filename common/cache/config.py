"""How a cache is prepared: the settings of ``fedct prepare``, and those of them that a run
must share with every cache it uses (and under which run-config keys)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Cache settings and the run-config keys that must agree with them for a run to use the cache.
RUN_CONFIG_KEYS = {
    "size": "image-size",
    "fraction": "slice-fraction",
    "normalize": "normalize",
    "lung_crop": "lung-crop",
    "lung_only": "lung-only",
}
# What a setting added after the first caches were written was in those caches (and in the
# model cards of their runs): a cache.json or run config without it had it so.
ABSENT_MEANS = {"lung_crop": False, "lung_only": False}


@dataclass(frozen=True)
class LungFocus:
    """What the model is given of a scan's slices (common/cache/lung_mask.py): ``crop``
    (``lung-crop``) cuts them to the square around the lungs, ``only`` (``lung-only``) makes
    every pixel beyond a margin around the lungs air.  A scan whose lung mask fails its
    check keeps its whole slices."""

    crop: bool = False
    only: bool = False


# Bounds checked before anything is written.  A cached slice larger than 1024² (twice
# ai-corona's 512², and most CT slices' own 512²) adds no information and grows the cache 4x.
SIZE_RANGE = (16, 1024)
MAX_WORKERS = 256
MAX_MIN_SLICES = 10_000


@dataclass(frozen=True)
class PrepareConfig:
    size: int = 512
    fraction: float = 0.5
    normalize: str = "ai-corona"
    min_slices: int = 10
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    format: str = "auto"
    lung_crop: bool = False  # crop each slice to the lungs (common/cache/lung_mask.py)
    lung_only: bool = False  # air beyond a margin around the lungs (the same)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def lung_focus(self) -> LungFocus:
        return LungFocus(crop=self.lung_crop, only=self.lung_only)

    def __post_init__(self) -> None:
        problems = []
        if not SIZE_RANGE[0] <= self.size <= SIZE_RANGE[1]:
            problems.append(f"--size {self.size}: must be {SIZE_RANGE[0]} to {SIZE_RANGE[1]}")
        if not 0.0 < self.fraction <= 1.0:
            problems.append(f"--fraction {self.fraction}: must be in (0, 1]")
        if not 1 <= self.min_slices <= MAX_MIN_SLICES:
            problems.append(f"--min-slices {self.min_slices}: must be 1 to {MAX_MIN_SLICES}")
        if not 1 <= self.workers <= MAX_WORKERS:
            problems.append(f"--workers {self.workers}: must be 1 to {MAX_WORKERS}")
        if self.seed < 0:
            problems.append(f"--seed {self.seed}: must not be negative")
        if problems:
            raise ValueError("; ".join(problems))

    def cache_settings(self) -> dict[str, Any]:
        """The settings that change cached pixels: a cache is only extended with equal ones."""
        return {name: getattr(self, name) for name in RUN_CONFIG_KEYS}


def differing_settings(
    cached: Mapping[str, Any], wanted: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """``{name: (cached value, wanted value)}`` of the cache settings (:data:`RUN_CONFIG_KEYS`
    names) in which a cache's recorded ``cached`` differ from ``wanted``; a setting that
    ``wanted`` lacks is not compared, one that ``cached`` lacks is :data:`ABSENT_MEANS`'s."""
    return {
        name: (cached.get(name, ABSENT_MEANS.get(name)), wanted[name])
        for name in RUN_CONFIG_KEYS
        if name in wanted and cached.get(name, ABSENT_MEANS.get(name)) != wanted[name]
    }
