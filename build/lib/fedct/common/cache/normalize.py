"""Slice intensity normalisation and resizing, from HU (or display values) to cache pixels.

The cache stores each selected slice as uint8 after normalisation to [0, 1] and resizing;
the model turns a grey slice into the three channels its backbone expects, with the mean and
standard deviation of the backbone's pretrained weights (``SliceClassifier.backbone_input``),
which keeps the cache twelve times smaller than float32 RGB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

LUNG_WINDOW = (-300.0, 1400.0)  # WL, WW: HU -1000..400
CLIP_PERCENTILE = 99.5


@dataclass(frozen=True)
class Normalization:
    """``ai-corona`` (per-slice 99.5th-percentile clip, min-max), or a fixed HU window."""

    method: str
    level: float = 0.0
    width: float = 0.0

    @property
    def spec(self) -> str:
        if self.method == "window":
            return f"window:{self.level:g},{self.width:g}"
        return self.method


def parse_normalization(spec: str) -> Normalization:
    """Parse ``ai-corona``, ``lung-window`` or ``window:WL,WW``; ValueError otherwise."""
    if spec == "ai-corona":
        return Normalization("ai-corona")
    if spec == "lung-window":
        return Normalization("window", *LUNG_WINDOW)
    match = re.fullmatch(r"window:(-?[\d.]+),([\d.]+)", spec)
    if match and float(match.group(2)) > 0:
        return Normalization("window", float(match.group(1)), float(match.group(2)))
    raise ValueError(
        f"unknown normalisation {spec!r}: use ai-corona, lung-window or window:WL,WW (WW > 0)"
    )


def normalize_slices(slices: np.ndarray, norm: Normalization, intensity: str) -> np.ndarray:
    """float32 (k, H, W) in [0, 1].

    ``ai-corona`` clips each slice at its 99.5th percentile and rescales it min..max.
    A window maps [WL - WW/2, WL + WW/2] HU to [0, 1]; on display-valued inputs (8-bit
    slice images, already windowed by whoever exported them) the values are used as they are.
    """
    flat = slices.reshape(len(slices), -1).astype(np.float32, copy=False)
    if norm.method == "ai-corona":
        high = np.percentile(flat, CLIP_PERCENTILE, axis=1, keepdims=True).astype(np.float32)
        low = flat.min(axis=1, keepdims=True)
        scale = np.where(high > low, high - low, 1.0).astype(np.float32)
        out = (np.minimum(flat, high) - low) / scale
    elif intensity == "display":
        out = flat / np.float32(255.0)
    else:
        low = norm.level - norm.width / 2
        out = (flat - np.float32(low)) / np.float32(norm.width)
    return np.clip(out, 0.0, 1.0).reshape(slices.shape)


def resize_slices(slices: np.ndarray, size: int) -> np.ndarray:
    """Resize float (k, H, W) to (k, size, size), antialiased when shrinking."""
    if slices.shape[1:] == (size, size):
        return slices
    return np.stack(
        [
            np.asarray(Image.fromarray(s, mode="F").resize((size, size), Image.Resampling.BILINEAR))
            for s in slices.astype(np.float32, copy=False)
        ]
    )


def to_cache_pixels(
    slices: np.ndarray, norm: Normalization, intensity: str, size: int
) -> np.ndarray:
    """HU or display slices → uint8 (k, size, size), the form stored in the cache."""
    unit = resize_slices(normalize_slices(slices, norm, intensity), size)
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
