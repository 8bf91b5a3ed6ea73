"""Pick the reader for an input folder: DICOM, NIfTI or slice images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from common.ingest.base import ReaderItem
from common.ingest.dicom import read_dicom
from common.ingest.nifti import is_nifti, read_nifti
from common.ingest.slice_images import is_slice_image, read_slice_images

FORMATS = ("auto", "dicom", "nifti", "png")


def detect_format(root: Path) -> str:
    """``nifti`` or ``png`` when the folder holds such files, otherwise ``dicom``."""
    counts = {"nifti": 0, "png": 0, "other": 0}
    for path in Path(root).rglob("*"):
        if path.is_file():
            kind = "nifti" if is_nifti(path) else "png" if is_slice_image(path) else "other"
            counts[kind] += 1
    best = max(("nifti", "png"), key=lambda k: counts[k])
    return best if counts[best] > counts["other"] else "dicom"


def read_input(root: Path, fmt: str = "auto", *, progress: bool = False) -> Iterator[ReaderItem]:
    """Scans and rejections of ``root`` read in format ``fmt`` (``auto`` detects it)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder does not exist")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "nifti":
        return read_nifti(root)
    if fmt == "png":
        return read_slice_images(root)
    return read_dicom(root, progress=progress)
