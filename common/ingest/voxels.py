"""Checks of the voxels every reader decodes, before they reach a cache (docs/ingestion.md).

Each reader checks what only it can see — the DICOM reader the stored values against
BitsStored, the NIfTI reader its voxel type, the slice-image reader the bit depth — and
:func:`check_voxels` then checks every format's slices alike:

- **non-finite values**: NaN voxels in at most :data:`MAX_NAN_FRACTION` of every slice are
  repaired to air (what padding outside the field of view is everywhere else) and the scan
  carries the warning ``non-finite-repaired``; more NaN, or any infinite value, rejects the
  scan (``non-finite-voxels``);
- **values no CT can hold**: Hounsfield units outside :data:`HU_LIMITS`, display values
  outside 0..255 (``out-of-range-voxels``);
- **blank slices**: a selected slice that is constant or nearly empty — fewer than
  :data:`CONTENT_FRACTION` of its voxels differ from the slice's median by more than the
  tolerance of :data:`BLANK_TOLERANCE` — rejects the scan (``blank-slices``).  The middle
  slices of a chest CT always cut through the body; a blank one is a missing or damaged
  image (a decoder that filled it with zeros, a NaN rescale slope).
"""

from __future__ import annotations

import math

import numpy as np

from fedct.common.ingest.base import Intensity, Scan, ScanLoadError

AIR_HU = -1024.0
# The corners of a square slice outside a scanner's circular field of view: 1 - π/4 ≈ 21.5 %.
MAX_NAN_FRACTION = 0.22
HU_LIMITS = (-32768.0, 32767.0)  # what int16 storage after rescale can hold; beyond is damage
DISPLAY_LIMITS = (0.0, 255.0)
CONTENT_FRACTION = 0.005
BLANK_TOLERANCE = {"hu": 100.0, "display": 4.0}  # air noise is ±20 HU; tissue is 500+ above it
MAX_SLICE_PIXELS = 4096 * 4096  # CT slices are 512², rarely 1024² or 2048²
_SAMPLE_STRIDE = 61  # prime, so the sample does not follow image rows or columns
_SURE_CONTENT = 4 * CONTENT_FRACTION  # a sample with this much content is no blank slice


def check_voxels(
    block: np.ndarray, source: str, intensity: Intensity
) -> tuple[np.ndarray, tuple[str, ...]]:
    """``block`` (k, H, W) float, repaired where that is safe, and the warnings it earns;
    :class:`ScanLoadError` naming ``source`` when it cannot be used."""
    warnings: tuple[str, ...] = ()
    low, high = float(block.min()), float(block.max())  # NaN or ±inf when any voxel is
    if not (math.isfinite(low) and math.isfinite(high)):
        block = _repair_nan(block, np.isfinite(block), source, intensity)
        warnings += ("non-finite-repaired",)
        low, high = float(block.min()), float(block.max())
    limits = HU_LIMITS if intensity == "hu" else DISPLAY_LIMITS
    if low < limits[0] or high > limits[1]:
        unit = "HU" if intensity == "hu" else "display values"
        raise ScanLoadError(
            source,
            "out-of-range-voxels",
            f"values {low:g}..{high:g} {unit}: outside {limits[0]:g}..{limits[1]:g}",
        )
    blank = blank_slices(block, intensity)
    if blank:
        raise ScanLoadError(
            source,
            "blank-slices",
            f"{len(blank)} of {len(block)} slices read are constant or nearly empty "
            f"(the first: slice {blank[0]} of those read)",
        )
    return block, warnings


def _repair_nan(
    block: np.ndarray, finite: np.ndarray, source: str, intensity: Intensity
) -> np.ndarray:
    infinite = int(np.isinf(block).sum())
    if infinite:
        raise ScanLoadError(source, "non-finite-voxels", f"{infinite} infinite voxel values")
    nan_share = 1.0 - finite.reshape(len(block), -1).mean(axis=1)
    worst = int(np.argmax(nan_share))
    if nan_share[worst] > MAX_NAN_FRACTION:
        raise ScanLoadError(
            source,
            "non-finite-voxels",
            f"{nan_share[worst]:.0%} of slice {worst} (of those read) is NaN; at most "
            f"{MAX_NAN_FRACTION:.0%} (outside the field of view) is repaired",
        )
    repaired = np.array(block, dtype=np.float32, copy=True)
    repaired[~finite] = AIR_HU if intensity == "hu" else DISPLAY_LIMITS[0]
    return repaired


def blank_slices(block: np.ndarray, intensity: Intensity) -> list[int]:
    """Indices of the slices of ``block`` that are constant or nearly empty.  A strided
    sample of each slice tells the slices with plenty of content (all of a real scan's);
    the few others are counted voxel by voxel."""
    flat = block.reshape(len(block), -1)
    sample = flat[:, ::_SAMPLE_STRIDE]
    median = np.median(sample, axis=1, keepdims=True)
    tolerance = BLANK_TOLERANCE[intensity]
    content = (np.abs(sample - median) > tolerance).mean(axis=1)
    blank = []
    for i in np.flatnonzero(content < _SURE_CONTENT):
        if (np.abs(flat[i] - median[i]) > tolerance).mean() < CONTENT_FRACTION:
            blank.append(int(i))
    return blank


def check_dtype(dtype: np.dtype) -> str:
    """Why voxels of ``dtype`` cannot be CT values ('' when they can)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iuf" and dtype.fields is None and dtype.itemsize <= 8:
        return ""
    return f"voxel type {dtype} cannot hold CT values (integers or floats expected)"


def stored_value_problem(raw: np.ndarray, bits_stored: int, signed: bool) -> str:
    """Why the stored values ``raw`` (as read from their container, before the bits above
    BitsStored are cleared) are not values of ``bits_stored`` bits ('' when they are).

    Unsigned values must fit the stored bits.  Signed ones may come sign-extended or with
    the bits above cleared; anything else in those bits is damage (overlays stored in
    unused bits are handled by the caller).
    """
    container = raw.dtype.itemsize * 8
    if bits_stored >= container:
        return ""
    values = raw.astype(np.int64)
    if signed:
        low, high = -(1 << (bits_stored - 1)), (1 << bits_stored) - 1
    else:
        low, high = 0, (1 << bits_stored) - 1
    bad = (values < low) | (values > high)
    count = int(bad.sum())
    if not count:
        return ""
    kind = "signed" if signed else "unsigned"
    example = int(values[bad].flat[0])
    return f"{count} stored values outside BitsStored {bits_stored} ({kind}), e.g. {example}"


def brief(exc: BaseException) -> str:
    """An exception as one short line: its type and its message's first line."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


def read_checked(scan: Scan, start: int, stop: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Slices ``start:stop`` of ``scan`` through :func:`check_voxels` (the way every caller
    reads pixels for a cache or a dump)."""
    return check_voxels(scan.load(start, stop), scan.source, scan.intensity)
