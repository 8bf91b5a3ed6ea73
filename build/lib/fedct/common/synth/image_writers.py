"""NIfTI volumes and 8-bit slice PNGs, written deterministically (same array, same bytes).

Volumes arrive as the generator makes them: ``(S, rows, cols)`` in HU, slice 0 the most
inferior, rows anterior to posterior, columns from the patient's right to left (LPS).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

LUNG_WINDOW = (-600.0, 1500.0)  # level, width


def write_nifti(
    path: Path,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
) -> Path:
    """Write ``hu`` as int16 HU to a ``.nii.gz`` laid out as MosMedData: axial slices last.

    ``spacing`` is (z, y, x) mm and ``origin`` the LPS (x, y, z) of voxel (0, 0) of slice 0.
    The array is stored (columns, rows, slices) with an affine to RAS+, as nibabel expects.
    gzip gets mtime 0 and no file name, so the bytes depend on the data only.
    """
    dz, dy, dx = spacing
    x0, y0, z0 = origin
    data = np.clip(np.rint(hu), -32768, 32767).astype(np.int16).transpose(2, 1, 0)
    # LPS -> RAS flips x and y: a column step goes to the patient's left (-R), a row step
    # to the back (-A).
    affine = np.array(
        [[-dx, 0, 0, -x0], [0, -dy, 0, -y0], [0, 0, dz, z0], [0, 0, 0, 1]], dtype=np.float64
    )
    image = nib.Nifti1Image(np.asfortranarray(data), affine)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("xb") as f:
        f.write(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))
    return path


def to_display(hu: np.ndarray, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """HU windowed (level, width) to uint8 0..255."""
    level, width = window
    scaled = (hu - (level - width / 2)) * (255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def write_png_slices(
    folder: Path, hu: np.ndarray, window: tuple[float, float] = LUNG_WINDOW
) -> list[Path]:
    """One lung-windowed 8-bit PNG per slice, named ``0.png``, ``1.png``, ... in slice order.

    Names are not zero-padded (as in CC-CCII), so sorting them as text puts ``10.png``
    before ``2.png``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, image in enumerate(to_display(hu, window)):
        path = folder / f"{n}.png"
        with path.open("xb") as f:
            Image.fromarray(image).save(f, format="PNG")
        paths.append(path)
    return paths
