"""Folders of 8-bit slice images (the CC-CCII layout ``{class}/<patient>/<scan>/<n>.png``).

Every folder that directly holds image files is one scan.  Slices are ordered by the
number in the file name (``2.png`` before ``10.png``), never lexically.  The values are
display values (already windowed by the exporter), not Hounsfield units: an image with more
than 8 bits whose values exceed 255 (a 16-bit export of stored values or HU) is refused as
``out-of-range-voxels`` rather than clipped to white.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedct.common.ingest.base import ReaderItem, Rejection, Scan, ScanLoadError
from fedct.common.ingest.voxels import MAX_SLICE_PIXELS, brief
from fedct.common.ingest.walk import walk_input

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_NUMBER = re.compile(r"\d+")


def is_slice_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def slice_number(path: Path) -> int | None:
    """The last number in the file name, or None when it has none."""
    numbers = _NUMBER.findall(path.stem)
    return int(numbers[-1]) if numbers else None


def _grey(path: Path, relative: str) -> np.ndarray:
    """One slice image as float32 display values 0..255."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_SLICE_PIXELS:
                raise ScanLoadError(relative, "too-large", f"{image.width} x {image.height}")
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                values = np.asarray(image, dtype=np.float32)
                if values.size and float(values.max()) > 255:
                    raise ScanLoadError(
                        relative,
                        "out-of-range-voxels",
                        f"a {image.mode} image with values up to {float(values.max()):g}: "
                        "slice images must hold 8-bit display values",
                    )
                return values
            return np.asarray(image.convert("L"), dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ScanLoadError(relative, "unreadable-image", brief(exc)) from exc


def _loader(root: Path, files: list[Path]):
    def load(start: int, stop: int) -> np.ndarray:
        slices = [_grey(path, path.relative_to(root).as_posix()) for path in files[start:stop]]
        if len({s.shape for s in slices}) > 1:
            raise ScanLoadError(
                str(files[start].parent.relative_to(root)),
                "inconsistent-geometry",
                "slice images differ in size",
            )
        return np.stack(slices)

    return load


def read_slice_images(
    root: Path, files: list[Path] | None = None, **_: object
) -> Iterator[ReaderItem]:
    """One scan per folder of slice images among ``files`` (default: those under ``root``);
    in the CC-CCII layout the class is the top folder."""
    root = Path(root)
    folders: dict[Path, list[Path]] = defaultdict(list)
    for path in walk_input(root).files if files is None else files:
        if is_slice_image(path):
            folders[path.parent].append(path)
    for folder in sorted(folders):
        source = folder.relative_to(root).as_posix()
        every_file = tuple(sorted(p.relative_to(root).as_posix() for p in folders[folder]))
        numbered = [(slice_number(p), p) for p in folders[folder]]
        unnumbered = [p for n, p in numbered if n is None]
        if unnumbered:
            yield Rejection(
                source, "inconsistent-geometry", "slice files without a number", every_file
            )
            continue
        numbers = [n for n, _ in numbered]
        if len(set(numbers)) != len(numbers):
            yield Rejection(
                source, "inconsistent-geometry", "two slice files share a number", every_file
            )
            continue
        files = [p for _, p in sorted(numbered)]
        parts = folder.relative_to(root).parts
        label = parts[0] if len(parts) >= 3 else None
        patient = parts[-2] if len(parts) >= 2 else parts[-1]
        yield Scan(
            source=source,
            patient_key=f"{label or ''}/{patient}",
            study_key=source,
            series_key=source,
            n_slices=len(files),
            spacing_mm=(float("nan"),) * 3,
            thickness_mm=None,
            manufacturer="",
            format="png",
            intensity="display",
            load=_loader(root, files),
            label=label,
            files=every_file,
        )
