"""The lungs of every cached scan: a classical mask from Hounsfield units, its sanity check,
the optional crop to the lungs, and the mask file in the cache (this module owns its format).

The mask of a scan's selected slices, per slice:

1. the body: voxels denser than :data:`BODY_HU`, opened (the table and cables come off), the
   largest connected part, its holes filled (so the lungs are inside it);
2. the air inside the body: voxels below :data:`AIR_HU` within it;
3. the lungs: the largest connected part of that air over all selected slices (3D), and the
   second largest when it holds at least :data:`MIN_LUNG_SHARE` of the body (the lungs are
   one part where they touch in front of the heart, two otherwise; the trachea and bowel gas
   are smaller and stay out);
4. each lung closed with a disk of :data:`CLOSING_MM` and its holes filled: vessels,
   nodules, consolidation and ground glass inside a lung, and dents of its border narrower
   than the disk (lesions against the pleura), join the lung — a threshold alone would cut
   exactly the findings out.

Slice images (8-bit, already windowed) are read as the lung window they were exported with
(-1000 to 400 HU).  A scan's mask is checked (:attr:`LungMask.warnings`): the lungs' share of
the body, and lungs on both sides of the body's centre.  A scan whose mask fails is flagged
(its manifest warnings, qa.html), never dropped; ``lung-crop`` then keeps its whole slice.

``lung-crop`` crops every slice of a scan to one square around the lungs of all its selected
slices, with a margin of :data:`CROP_MARGIN` of that square on each side, before resizing:
the lungs fill more of the slice the model sees, at the same scale on every slice of the
scan.  ``lung-only`` makes every pixel farther than :data:`ONLY_MARGIN_MM` from the lungs
air, so that the model sees nothing but the lungs (and learns from nothing else).

In the cache, ``masks/<scan_id>.npy`` holds the mask of the cached slices as stored (after
the crop and the resize): uint8 of shape (S, size, ceil(size / 8)), the bits of each row
packed (``np.packbits`` along the row), read back by :func:`read_lung_mask`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from fedct.common.cache.config import LungFocus
from fedct.common.cache.normalize import LUNG_WINDOW, Normalization, resize_slices, to_cache_pixels
from fedct.common.cache.store import atomic_open

BODY_HU = -500.0  # denser than this: the body (soft tissue, bone, the table before opening)
AIR_HU = -320.0  # lighter than this inside the body: lungs and airways (ground glass is ~-700)
OPEN_MM = 3.0  # opening of the body mask: what is thinner than 2 × this comes off
CLOSING_MM = 12.0  # closing of each lung: dents narrower than 2 × this join the lung
WORK_PX = 128  # the lungs are found on slices averaged down to about this many pixels across
FALLBACK_FOV_MM = 350.0  # the field of view assumed for slices without a pixel spacing
MIN_LUNG_SHARE = 0.01  # the second-largest air part is a lung when this share of the body
# Airways: air parts of a slice under this share of its body, centred within this share of
# the body's width from its centre.
AIRWAY_SHARE = 0.01
AIRWAY_BAND = 0.1
# The check: the lungs' share of the body on the selected slices, and of each side.
SHARE_RANGE = (0.05, 0.80)
MIN_SIDE_SHARE = 0.15
CROP_MARGIN = 0.08
ONLY_MARGIN_MM = 5.0  # lung-only keeps this much around the lungs (the pleura, lesions on it)
MASK_DIR = "masks"
OUTLINE_RGB = (80, 200, 255)  # the lung outline drawn on slices: cyan, apart from the heat colours
WARNINGS = {
    "lung-mask-empty": "no lungs found in the selected slices",
    "lung-mask-small": f"the lungs are under {SHARE_RANGE[0]:.0%} of the body",
    "lung-mask-large": f"the lungs are over {SHARE_RANGE[1]:.0%} of the body",
    "lung-mask-one-side": f"under {MIN_SIDE_SHARE:.0%} of the lungs on one side of the body",
}

Box = tuple[int, int, int, int]  # rows [top, bottom) and columns [left, right)


@dataclass(frozen=True)
class LungMask:
    """The lungs of a scan's selected slices: ``mask`` (S, H, W) bool on the slices' own grid,
    the lungs' ``share`` of the body and the share of them on each side (image left, right)
    of the body's centre."""

    mask: np.ndarray
    share: float
    sides: tuple[float, float]

    @property
    def warnings(self) -> tuple[str, ...]:
        """The checks this mask fails (keys of :data:`WARNINGS`); empty when it passes."""
        if not self.mask.any():
            return ("lung-mask-empty",)
        failed = []
        if self.share < SHARE_RANGE[0]:
            failed.append("lung-mask-small")
        elif self.share > SHARE_RANGE[1]:
            failed.append("lung-mask-large")
        if min(self.sides) < MIN_SIDE_SHARE:
            failed.append("lung-mask-one-side")
        return tuple(failed)

    def crop_box(self) -> Box:
        """The square every slice is cropped to under ``lung-crop``: around the lungs of all
        slices with a margin, possibly beyond the slice (padded); for a mask that passes."""
        rows = np.flatnonzero(self.mask.any(axis=(0, 2)))
        cols = np.flatnonzero(self.mask.any(axis=(0, 1)))
        side = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
        side = math.ceil(side * (1 + 2 * CROP_MARGIN))
        top = (rows[0] + rows[-1] + 1 - side) // 2
        left = (cols[0] + cols[-1] + 1 - side) // 2
        return int(top), int(top + side), int(left), int(left + side)


def hounsfield(slices: np.ndarray, intensity: str) -> np.ndarray:
    """float32 HU of HU or display (lung-windowed 0..255) slices."""
    if intensity != "display":
        return np.asarray(slices, dtype=np.float32)
    level, width = LUNG_WINDOW
    return np.asarray(slices, dtype=np.float32) * np.float32(width / 255.0) + np.float32(
        level - width / 2
    )


def _disk(radius: float) -> np.ndarray:
    r = max(1, round(radius))
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= radius * radius + 0.5


def _body(tissue: np.ndarray, open_px: float) -> np.ndarray:
    """The filled largest part of one slice's ``tissue`` after opening."""
    opened = ndimage.binary_opening(tissue, _disk(open_px))
    labels, count = ndimage.label(opened)
    if count == 0:
        return np.zeros_like(tissue)
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return ndimage.binary_fill_holes(labels == largest)


def _closed(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` closed with a disk of ``radius`` pixels (distance transforms: the cost does not
    grow with the disk), then its holes filled; worked out on the mask's bounding box."""
    pad = math.ceil(radius) + 2
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    padded = np.pad(mask[box], pad)
    dilated = ndimage.distance_transform_edt(~padded) <= radius
    closed = ndimage.distance_transform_edt(dilated) > radius
    out = np.zeros_like(mask)
    out[box] = ndimage.binary_fill_holes(closed | padded)[pad:-pad, pad:-pad]
    return out


def _hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a bool (H, W) mask, rasterised (the mask itself when it is flat)."""
    ys, xs = np.nonzero(outline(mask))
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        vertices = corners[ConvexHull(corners).vertices] - 0.5
    except QhullError:
        return mask
    image = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(image).polygon([tuple(v) for v in vertices], fill=1)
    return np.asarray(image, dtype=bool) | mask


def _lateral_hull(lung: np.ndarray, medial_is_right: bool) -> np.ndarray:
    """One lung of a slice and the part of its convex hull that is not medial to it: what the
    hull adds on a row beyond the lung's most medial pixel of that row is the mediastinum's
    (the heart's dent), the rest is dents against the chest wall (lesions at the pleura)."""
    hull = _hull(lung)
    columns = np.arange(lung.shape[1])
    on_row = lung.any(axis=1)
    if medial_is_right:
        edge = np.where(on_row, np.where(lung, columns, -1).max(axis=1), lung.shape[1])
        medial = columns[None, :] > edge[:, None]
    else:
        edge = np.where(on_row, np.where(lung, columns, lung.shape[1]).min(axis=1), -1)
        medial = columns[None, :] < edge[:, None]
    return lung | (hull & ~medial)


def _airways(air: np.ndarray, body: np.ndarray, centre: float) -> np.ndarray:
    """The small air parts of a slice near the body's centre: trachea and main bronchi."""
    labels, count = ndimage.label(air)
    if count == 0:
        return np.zeros_like(air)
    sizes = np.bincount(labels.ravel())[1:]
    columns = np.bincount(labels.ravel(), weights=np.indices(air.shape)[1].ravel())[1:]
    width = max(1, int(body.any(axis=0).sum()))
    small = sizes < AIRWAY_SHARE * body.sum()
    central = np.abs(columns / np.maximum(sizes, 1) - centre) < AIRWAY_BAND * width
    return np.isin(labels, 1 + np.flatnonzero(small & central))


def segment_lungs(slices: np.ndarray, intensity: str, pixel_mm: float | None = None) -> LungMask:
    """The :class:`LungMask` of a scan's selected ``slices`` (S, H, W) in HU or display
    values; ``pixel_mm`` is the in-plane pixel spacing (None or NaN: the slice is taken to
    span :data:`FALLBACK_FOV_MM`)."""
    full = hounsfield(slices, intensity)
    pixel_mm = _pixel_mm(pixel_mm, full.shape)
    factor = max(1, min(full.shape[1:]) // WORK_PX)
    hu = _reduced(full, factor)
    pixel_mm *= factor
    body = np.stack([_body(s > BODY_HU, max(1.0, OPEN_MM / pixel_mm)) for s in hu])
    body_voxels = int(body.sum())
    air = body & (hu < AIR_HU)
    labels, count = ndimage.label(air)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")[:2]
    kept = [
        1 + int(i)
        for rank, i in enumerate(order)
        if sizes[i] and (rank == 0 or sizes[i] >= MIN_LUNG_SHARE * body_voxels)
    ]
    lungs = np.isin(labels, kept)
    columns = np.arange(hu.shape[2])
    centre = float((body.sum(axis=(0, 1)) * columns).sum() / max(body_voxels, 1))
    right_half = columns[None, :] >= centre
    radius = CLOSING_MM / pixel_mm
    mask = np.zeros_like(lungs)
    for k in np.flatnonzero(lungs.any(axis=(1, 2))):
        lung = lungs[k] & ~_airways(lungs[k], body[k], centre)
        for half, medial_is_right in ((~right_half, True), (right_half, False)):
            side = lung & half
            if side.any():
                mask[k] |= _lateral_hull(_closed(side, radius), medial_is_right)
    mask &= body
    return LungMask(
        _enlarged(mask, factor, full.shape[1:]), *_share_and_sides(mask, body, body_voxels)
    )


def _pixel_mm(pixel_mm: float | None, shape: tuple[int, ...]) -> float:
    """The in-plane pixel spacing, or the one of :data:`FALLBACK_FOV_MM` across the slices."""
    if pixel_mm is None or not math.isfinite(pixel_mm) or pixel_mm <= 0:
        return FALLBACK_FOV_MM / max(shape[1:])
    return pixel_mm


def _reduced(hu: np.ndarray, factor: int) -> np.ndarray:
    """``hu`` averaged over ``factor`` × ``factor`` blocks (the rows and columns left over at
    the end are dropped)."""
    if factor == 1:
        return hu
    slices, height, width = hu.shape
    rows, cols = height // factor, width // factor
    blocks = hu[:, : rows * factor, : cols * factor].reshape(slices, rows, factor, cols, factor)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def _enlarged(mask: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """A mask of :func:`_reduced` slices back on the ``shape`` (H, W) grid of the slices."""
    if factor == 1:
        return mask
    rows, cols = mask.shape[1] * factor, mask.shape[2] * factor
    out = np.zeros((len(mask), *shape), dtype=bool)
    for k, plane in enumerate(mask):
        if plane.any():
            image = Image.fromarray(plane.astype(np.float32), mode="F")
            grown = image.resize((cols, rows), Image.Resampling.BILINEAR)
            out[k, :rows, :cols] = np.asarray(grown) >= 0.5
    return out


def _share_and_sides(
    mask: np.ndarray, body: np.ndarray, body_voxels: int
) -> tuple[float, tuple[float, float]]:
    lung_voxels = int(mask.sum())
    if lung_voxels == 0 or body_voxels == 0:
        return 0.0, (0.0, 0.0)
    columns = np.arange(body.shape[2])
    centre = float((body.sum(axis=(0, 1)) * columns).sum() / body_voxels)
    per_column = mask.sum(axis=(0, 1))
    left = float(per_column[columns < centre].sum() / lung_voxels)
    return lung_voxels / body_voxels, (left, 1.0 - left)


def crop(slices: np.ndarray, box: Box | None, fill: float) -> np.ndarray:
    """``slices`` (S, H, W) cut to ``box``, padded with ``fill`` where it reaches beyond them."""
    if box is None:
        return slices
    top, bottom, left, right = box
    height, width = slices.shape[1:]
    pads = ((0, 0), (max(0, -top), max(0, bottom - height)), (max(0, -left), max(0, right - width)))
    inside = slices[:, max(0, top) : min(height, bottom), max(0, left) : min(width, right)]
    return np.pad(inside, pads, constant_values=fill) if any(sum(p) for p in pads) else inside


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool (S, H, W) mask at (S, size, size), as the slices are resized."""
    return resize_slices(mask.astype(np.float32), size) >= 0.5


def model_view(
    slices: np.ndarray,
    mask: np.ndarray,
    box: Box | None,
    intensity: str,
    pixel_mm: float | None,
    only: bool,
) -> np.ndarray:
    """``slices`` (S, H, W) as the model is given them before normalisation: with ``only``,
    air beyond :data:`ONLY_MARGIN_MM` of ``mask``; cut to ``box``."""
    fill = 0.0 if intensity == "display" else float(np.min(slices))
    if only:
        margin = ONLY_MARGIN_MM / _pixel_mm(pixel_mm, slices.shape)
        near = np.stack([ndimage.distance_transform_edt(~plane) <= margin for plane in mask])
        slices = np.where(near, slices, np.asarray(fill, dtype=slices.dtype))
    return crop(slices, box, fill)


def cache_slices(
    slices: np.ndarray,
    norm: Normalization,
    intensity: str,
    size: int,
    *,
    pixel_mm: float | None,
    focus: LungFocus,
) -> tuple[np.ndarray, np.ndarray, LungMask]:
    """A scan's selected slices as the cache stores them (uint8 (S, size, size), as ``focus``
    asks), their lung mask as stored, and the mask on the slices' own grid."""
    lungs = segment_lungs(slices, intensity, pixel_mm)
    passed = not lungs.warnings
    box = lungs.crop_box() if focus.crop and passed else None
    shown = model_view(slices, lungs.mask, box, intensity, pixel_mm, focus.only and passed)
    pixels = to_cache_pixels(shown, norm, intensity, size)
    return pixels, resize_mask(crop(lungs.mask, box, False), size), lungs


def mask_flags(warnings: str) -> tuple[str, ...]:
    """The lung-mask flags (:data:`WARNINGS` keys) among a manifest row's warnings."""
    return tuple(w for w in warnings.split(";") if w in WARNINGS)


def with_mask_flags(warnings: str, flags: Sequence[str]) -> str:
    """A manifest row's ``;``-joined warnings with its lung-mask flags replaced by ``flags``."""
    kept = [w for w in warnings.split(";") if w and w not in WARNINGS]
    return ";".join([*kept, *flags])


def mask_path(cache_dir: Path, scan_id: str) -> Path:
    return Path(cache_dir) / MASK_DIR / f"{scan_id}.npy"


def write_lung_mask(cache_dir: Path, scan_id: str, mask: np.ndarray) -> None:
    """Store the bool (S, size, size) mask of a cached scan, rows bit-packed."""
    if mask.dtype != bool or mask.ndim != 3:
        raise ValueError(f"a lung mask must be bool (S, H, W), got {mask.dtype} {mask.shape}")
    buffer = io.BytesIO()
    np.save(buffer, np.packbits(mask, axis=-1))
    with atomic_open(mask_path(cache_dir, scan_id), "wb") as handle:
        handle.write(buffer.getvalue())


def read_lung_mask(cache_dir: Path, scan_id: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The bool mask of a cached scan whose pixels have ``shape`` (S, H, W); None when the
    cache has none for it (prepared before masks were) or the file does not fit the scan."""
    path = mask_path(cache_dir, scan_id)
    try:
        packed = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    slices, height, width = shape
    if packed.dtype != np.uint8 or packed.shape != (slices, height, math.ceil(width / 8)):
        return None
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)


def has_lung_mask(cache_dir: Path, scan_id: str) -> bool:
    return mask_path(cache_dir, scan_id).is_file()


def outline(mask: np.ndarray) -> np.ndarray:
    """The border pixels of a bool (H, W) mask (inside it, touching its outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def outlined(picture: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An RGB uint8 (H, W, 3) copy of a grey (H, W) or RGB ``picture`` with the outline of
    the lung ``mask`` (H, W) drawn in :data:`OUTLINE_RGB`."""
    rgb = picture if picture.ndim == 3 else np.repeat(picture[..., None], 3, axis=2)
    rgb = np.array(rgb, dtype=np.uint8)
    rgb[outline(mask)] = OUTLINE_RGB
    return rgb
