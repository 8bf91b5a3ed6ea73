"""What every reader hands to ``prepare``: scans that load only the slices asked for.

A reader walks an input folder and yields :class:`Scan` objects (ready to select slices
from) and :class:`Rejection` objects (inputs it could not use, each with one reason code).
Readers never raise on bad input: a bad file becomes a rejection and the walk goes on.
Every file of the folder is accounted for once: in a scan's ``files``, in a rejection's
``files``, or as :class:`Ignored` (a file that is not an input: a DICOMDIR index, the
site's labels file, a file of another format than the one read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# The fixed vocabulary of rejection reasons (documented in docs/ingestion.md).
REASONS: dict[str, str] = {
    "not-dicom": "not a DICOM file (and not another supported format)",
    "corrupt": "the file is damaged or truncated and cannot be parsed",
    "no-pixel-data": "the DICOM object has no image pixels (report, DICOMDIR, SR...)",
    "not-ct": "the series is not CT (Modality is not CT)",
    "localizer": "a localizer / scout image, not an axial series",
    "not-axial": "the slices are not axial (ImageOrientationPatient)",
    "not-selected": "another series of the same study was chosen (see the series rule)",
    "too-few-slices": "fewer slices than the configured minimum",
    "inconsistent-geometry": "slices disagree in size, orientation or spacing, or repeat positions",
    "unsupported-transfer-syntax": "compressed with a codec that no installed plugin decodes",
    "missing-label": "no label for this scan in labels.csv",
    "unknown-label": "the label is not in the label map",
    "unreadable-image": "an image file (NIfTI, PNG, JPEG) cannot be decoded",
    "unreadable": "a file that cannot be read or a folder that cannot be listed (permissions)",
    "special-file": "a FIFO, socket or device: not a file to read (never opened)",
    "broken-link": "a symbolic link whose target does not exist",
    "link-outside-input": "a symbolic link that leads outside the input folder",
    "unsupported-pixel-type": "the voxel type cannot hold CT values (complex, RGB, ...)",
    "non-finite-voxels": "NaN or infinite voxel values beyond what can be repaired",
    "out-of-range-voxels": "voxel values outside what the header allows (damaged pixel data)",
    "blank-slices": "a selected slice is constant or nearly empty (damaged or missing pixels)",
    "too-large": "a slice or volume larger than any CT scan (refused before decoding)",
    "reader-error": "the reader failed on this input in an unforeseen way (the detail names it)",
}

Intensity = Literal["hu", "display"]


@dataclass(frozen=True)
class Rejection:
    """An input that was not used: where it is (relative to the input root), why, and every
    file it consists of (relative to the input root; ``(path,)`` unless given)."""

    path: str
    reason: str
    detail: str = ""
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")
        object.__setattr__(self, "files", tuple(sorted(self.files)) or (self.path,))


@dataclass(frozen=True)
class Ignored:
    """A file that is no input at all, and what it is (e.g. "DICOMDIR index")."""

    path: str
    what: str


@dataclass
class Scan:
    """One axial scan, its metadata read, its pixels loaded on demand.

    ``load(start, stop)`` returns float32 ``(stop - start, rows, cols)`` in slice order
    (ascending position along the slice normal).  ``intensity`` says whether the values are
    Hounsfield units (DICOM, NIfTI) or already windowed display values 0..255 (PNG/JPEG).
    Identifiers (patient, study, series) are raw and must never be written out in clear:
    ``prepare`` replaces them with salted hashes.
    """

    source: str  # path of the scan (file or folder) relative to the input root
    patient_key: str
    study_key: str
    series_key: str
    n_slices: int
    spacing_mm: tuple[float, float, float]  # (z, y, x)
    thickness_mm: float | None
    manufacturer: str
    format: str  # dicom | nifti | png
    intensity: Intensity
    load: Callable[[int, int], np.ndarray]
    label: str | None = None  # a label found in the layout itself (MosMed CT-k, CC-CCII class)
    extra: dict[str, str] = field(default_factory=dict)  # e.g. {"severity": "CT-2"}
    instance_uids: tuple[str, ...] = ()  # DICOM SOPInstanceUIDs in slice order (inspect only)
    warnings: tuple[str, ...] = ()  # QA notes, e.g. "irregular-spacing", "duplicate-position"
    files: tuple[str, ...] = ()  # every input file of the scan, relative to the input root

    def rejected(self, reason: str, detail: str = "") -> Rejection:
        """This whole scan as a rejection (all its files) under ``reason``."""
        return Rejection(self.source, reason, detail, self.files)


class ScanLoadError(RuntimeError):
    """Raised by ``Scan.load`` when pixels turn out unusable; ``prepare`` makes it a rejection."""

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{path}: {reason} {detail}".strip())
        self.rejection = Rejection(path, reason, detail)


ReaderItem = Scan | Rejection | Ignored
Reader = Callable[..., Iterator[ReaderItem]]
