"""NIfTI volumes (the MosMedData layout ``studies/CT-k/study_NNNN.nii.gz``) as scans.

Volumes are read lazily through nibabel's array proxy: only the selected slices of the
slice axis are read.  Whatever the file's orientation, slices come out axial, in ascending
position from inferior to superior, with rows running anterior → posterior and columns
right → left, as a DICOM series shows them, so the slice order convention is the same for
every format.

A volume is refused, alone, when its header cannot describe a CT scan: not 3-D, an
orientation matrix that is singular or not finite (no axial direction can be told), a voxel
type that cannot hold CT values (complex, RGB, ...), or slices larger than
:data:`~fedct.common.ingest.voxels.MAX_SLICE_PIXELS`.  Any other failure on one file is that
file's rejection (``reader-error``), never the end of the walk.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from fedct.common.ingest.base import ReaderItem, Rejection, Scan, ScanLoadError
from fedct.common.ingest.voxels import MAX_SLICE_PIXELS, brief, check_dtype
from fedct.common.ingest.walk import walk_input

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SEVERITY_FOLDER = re.compile(r"CT-[0-4]", re.IGNORECASE)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _study_name(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _geometry_problem(image: nib.Nifti1Image) -> tuple[str, str] | None:
    """(reason, detail) when the header cannot describe an axial CT volume, else None."""
    if len(image.shape) != 3:
        return "inconsistent-geometry", f"expected 3-D, got {image.shape}"
    rotation = np.asarray(image.affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(rotation).all() or abs(np.linalg.det(rotation)) < 1e-9:
        return (
            "inconsistent-geometry",
            "the orientation matrix (sform/qform) is singular or not finite: no axial direction",
        )
    dtype_problem = check_dtype(image.get_data_dtype())
    if dtype_problem:
        return "unsupported-pixel-type", dtype_problem
    if sorted(image.shape)[1] * sorted(image.shape)[2] > MAX_SLICE_PIXELS:
        return "too-large", f"volume {image.shape}: slices larger than any CT scan"
    return None


def _axial_loader(image: nib.Nifti1Image, source: str):
    """A ``load(start, stop)`` reading only those axial slices, plus the slice count/spacing."""
    ornt = nib.io_orientation(image.affine)  # per array axis: (RAS axis, +1 or -1)
    axis_of = {int(ras): i for i, (ras, _) in enumerate(ornt)}
    flip_of = {int(ras): ornt[i][1] < 0 for i, (ras, _) in enumerate(ornt)}
    z_axis, y_axis, x_axis = axis_of[2], axis_of[1], axis_of[0]
    n = image.shape[z_axis]
    zooms = image.header.get_zooms()
    spacing = (float(zooms[z_axis]), float(zooms[y_axis]), float(zooms[x_axis]))

    def load(start: int, stop: int) -> np.ndarray:
        first, last = (n - stop, n - start) if flip_of[2] else (start, stop)
        slicer: list[slice] = [slice(None)] * 3
        slicer[z_axis] = slice(first, last)
        try:
            block = np.asarray(image.dataobj[tuple(slicer)], dtype=np.float32)
        except Exception as exc:  # nibabel and zlib raise many types for damaged data
            raise ScanLoadError(source, "unreadable-image", brief(exc)) from exc
        if flip_of[2]:
            block = np.flip(block, axis=z_axis)
        # to (z, y, x) then rows anterior→posterior (RAS y descending), columns right→left.
        block = np.transpose(block, (z_axis, y_axis, x_axis))
        if not flip_of[1]:
            block = block[:, ::-1, :]
        if not flip_of[0]:
            block = block[:, :, ::-1]
        return np.ascontiguousarray(block)

    return load, n, spacing


def read_nifti(root: Path, files: list[Path] | None = None, **_: object) -> Iterator[ReaderItem]:
    """Every NIfTI volume among ``files`` (default: those under ``root``); CT-k parent
    folders give label and severity."""
    root = Path(root)
    for path in [p for p in (walk_input(root).files if files is None else files) if is_nifti(p)]:
        source = path.relative_to(root).as_posix()
        try:
            image = nib.load(path)
        except Exception as exc:  # nibabel raises many types for damaged headers
            yield Rejection(source, "unreadable-image", brief(exc))
            continue
        try:
            problem = _geometry_problem(image)
            if problem is None:
                load, n, spacing = _axial_loader(image, source)
        except Exception as exc:  # a header nibabel reads but no rule here foresaw
            problem = "reader-error", brief(exc)
        if problem is not None:
            yield Rejection(source, *problem)
            continue
        folder = path.parent.name
        labelled = SEVERITY_FOLDER.fullmatch(folder) is not None
        study = _study_name(path)
        yield Scan(
            source=source,
            patient_key=study,
            study_key=source,
            series_key=source,
            n_slices=n,
            spacing_mm=spacing,
            thickness_mm=spacing[0],
            manufacturer="",
            format="nifti",
            intensity="hu",
            load=load,
            label=folder.upper() if labelled else None,
            extra={"severity": folder.upper()} if labelled else {},
            files=(source,),
        )
