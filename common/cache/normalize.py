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
# clip_levels: a strided sample of each slice gives a value below its percentile...
_SAMPLE_STRIDE = 61  # prime, so the sample does not follow image rows or columns
_SAMPLE_FRACTION = 0.98  # ...this far up the sample: about 4× the values above the 99.5th
_MIN_FAST = 4096  # smaller slices go to np.percentile directly


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
    # Each step writes into the array the first one made: the same float32 operations as
    # without ``out=``, one pass and no allocation less each.
    if norm.method == "ai-corona":
        low = flat.min(axis=1, keepdims=True)
        high = clip_levels(flat, low)
        scale = np.where(high > low, high - low, 1.0).astype(np.float32)
        out = np.minimum(flat, high)
        np.subtract(out, low, out=out)
        np.divide(out, scale, out=out)
    elif intensity == "display":
        out = flat / np.float32(255.0)
    else:
        low = norm.level - norm.width / 2
        out = flat - np.float32(low)
        np.divide(out, np.float32(norm.width), out=out)
    return np.clip(out, 0.0, 1.0, out=out).reshape(slices.shape)


def clip_levels(flat: np.ndarray, low: np.ndarray) -> np.ndarray:
    """``np.percentile(flat, CLIP_PERCENTILE, axis=1, keepdims=True)`` of float32 rows, bit
    for bit, from the few values at the top of each row instead of a partition of all of it.

    ``low`` is each row's minimum (NaN where the row has a NaN).  numpy's linear method
    interpolates the sorted row's values at positions ``k`` and ``k + 1``; both are among the
    values ≥ ``t`` for any ``t`` with at most ``k`` values below it, so a threshold from a
    strided sample, checked, leaves a small part of the row to partition.  Rows where the
    check fails (and NaN rows, short rows) are left to numpy.
    """
    n = flat.shape[1]
    q = CLIP_PERCENTILE / 100
    index = (n - 1) * q
    k = int(np.floor(index))
    if n < _MIN_FAST or k + 1 >= n or bool(np.isnan(low).any()):
        return np.percentile(flat, CLIP_PERCENTILE, axis=1, keepdims=True).astype(np.float32)
    gamma = float(index - k)
    sample = flat[:, ::_SAMPLE_STRIDE]
    rank = int(sample.shape[1] * _SAMPLE_FRACTION)
    thresholds = np.partition(sample, rank, axis=1)[:, rank]
    out = np.empty((len(flat), 1), np.float32)
    for i, (row, t) in enumerate(zip(flat, thresholds, strict=True)):
        top = row[row >= t]
        below = n - len(top)
        if below > k:
            out[i] = np.percentile(row, CLIP_PERCENTILE)
            continue
        a, b = np.partition(top, (k - below, k + 1 - below))[[k - below, k + 1 - below]]
        out[i] = _lerp(a, b, gamma)
    return out


def _lerp(a: np.float32, b: np.float32, gamma: float) -> np.float32:
    """numpy's quantile interpolation between neighbours ``a`` ≤ ``b`` (numpy's ``_lerp``)."""
    diff = b - a
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


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
    # ``unit`` is this function's own array (resize_slices returns its input when no resize
    # is needed), so it is worked on in place.
    np.clip(unit, 0.0, 1.0, out=unit)
    np.multiply(unit, 255.0, out=unit)
    return np.rint(unit, out=unit).astype(np.uint8)
