"""Write synthetic CT series and scouts as valid, deterministic DICOM files.

Same arrays, specs and generator state give byte-identical files: no clock is read, and every
UID comes from the caller's generator (the frame of reference is derived from the study UID so
that all series of a study share it).  Files are never overwritten: write each series into its
own folder, or use ``naming="uid"`` when several series share one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pydicom.valuerep import format_number_as_ds

AIR_HU = -1024.0
_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
}


@dataclass(frozen=True)
class ScannerProfile:
    """How a (simulated) scanner stores its pixels and labels its files."""

    manufacturer: str = "FEDCT-SIM"
    model: str = "Phantom 64"
    kernel: str = "STANDARD"
    signed: bool = True  # PixelRepresentation 1 (int16) or 0 (uint16)
    rescale_intercept: float = -1024.0  # stored = round((HU - intercept) / slope), clipped
    rescale_slope: float = 1.0
    # When set, air (HU <= -1024) outside the scan circle is stored as this value.
    pixel_padding_value: int | None = None


@dataclass(frozen=True)
class SeriesSpec:
    """Identity, geometry and file layout of one series."""

    patient_name: str
    patient_id: str
    study_uid: str
    series_uid: str
    series_number: int = 1
    series_description: str = "CHEST"
    accession_number: str = ""
    study_date: str = "20200315"
    spacing_mm: tuple[float, float, float] = (5.0, 0.7, 0.7)  # (slice z, row y, column x)
    thickness_mm: float = 5.0
    origin_mm: tuple[float, float, float] = (-175.0, -175.0, -300.0)  # x, y, z of slice 0's voxel 0
    transfer_syntax: Literal["explicit", "implicit", "rle"] = "explicit"
    naming: Literal["dcm", "no-extension", "uid"] = "dcm"  # IM0001.dcm / IM0001 / <SOP UID>.dcm


def make_uid(rng: np.random.Generator) -> str:
    """A ``2.25.<128-bit integer>`` UID drawn from ``rng`` (reproducible, unlike uuid4)."""
    return _uid_from(rng.bytes(16))


def write_ct_series(
    out_dir: Path,
    hu: np.ndarray,
    spec: SeriesSpec,
    scanner: ScannerProfile,
    *,
    rng: np.random.Generator,
) -> list[Path]:
    """Write ``hu`` (slices, rows, cols; slice 0 lowest z) as one axial CT file per slice.

    Returns the paths in slice order; InstanceNumber runs 1..S along +z.
    """
    _check_image(hu, 3, "hu (slices, rows, cols)")
    dz = spec.spacing_mm[0]
    x0, y0, z0 = spec.origin_mm
    paths = []
    for i in range(hu.shape[0]):
        z = z0 + i * dz
        ds = _header(spec, scanner, make_uid(rng), i + 1, "AXIAL", _AXIAL, (x0, y0, z))
        ds.SpacingBetweenSlices = _ds(dz)
        ds.SliceLocation = _ds(z)
        paths.append(_save(out_dir, ds, _to_stored(hu[i], scanner), spec))
    return paths


def write_localizer(
    out_dir: Path,
    image: np.ndarray,
    spec: SeriesSpec,
    scanner: ScannerProfile,
    *,
    rng: np.random.Generator,
) -> Path:
    """Write a coronal scout ``image`` (rows run from head to feet) in HU as one CT file."""
    _check_image(image, 2, "a localizer image")
    ds = _header(spec, scanner, make_uid(rng), 1, "LOCALIZER", _CORONAL, spec.origin_mm)
    return _save(out_dir, ds, _to_stored(image, scanner), spec)


def _uid_from(random_bytes: bytes) -> str:
    return "2.25." + str(int.from_bytes(random_bytes[:16], "big"))


def _frame_of_reference_uid(study_uid: str) -> str:
    return _uid_from(hashlib.sha256(f"{study_uid}/frame-of-reference".encode()).digest())


def _check_image(values: np.ndarray, ndim: int, what: str) -> None:
    if values.ndim != ndim or 0 in values.shape:
        raise ValueError(f"{what} must be a non-empty {ndim}-D array, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contains NaN or infinite values")


def _to_stored(hu: np.ndarray, scanner: ScannerProfile) -> np.ndarray:
    """One slice's HU as the scanner's stored integers (padding written where it applies)."""
    if scanner.rescale_slope == 0:
        raise ValueError("rescale_slope must not be 0")
    dtype = np.dtype("<i2" if scanner.signed else "<u2")
    limits = np.iinfo(dtype)
    values = np.rint((hu.astype(np.float64) - scanner.rescale_intercept) / scanner.rescale_slope)
    stored = np.clip(values, limits.min, limits.max).astype(dtype)
    padding = scanner.pixel_padding_value
    if padding is not None:
        if not limits.min <= padding <= limits.max:
            raise ValueError(f"pixel_padding_value {padding} does not fit {dtype.name}")
        stored[(hu <= AIR_HU) & outside_scan_circle(hu.shape)] = padding
    return stored


def outside_scan_circle(shape: tuple[int, ...]) -> np.ndarray:
    rows, cols = shape
    r = np.arange(rows)[:, None] - (rows - 1) / 2
    c = np.arange(cols)[None, :] - (cols - 1) / 2
    return r**2 + c**2 > (min(rows, cols) / 2) ** 2


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _header(
    spec: SeriesSpec,
    scanner: ScannerProfile,
    sop_uid: str,
    instance: int,
    kind: str,
    orientation: tuple[float, ...],
    position: tuple[float, float, float],
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = _SYNTAXES[spec.transfer_syntax]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", kind]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, keyword, spec.study_date)
    for keyword in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
        setattr(ds, keyword, "120000")
    ds.AccessionNumber = spec.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = scanner.manufacturer
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = spec.series_description
    ds.ManufacturerModelName = scanner.model
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(spec.thickness_mm)
    ds.KVP = "120"
    ds.ConvolutionKernel = scanner.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.FrameOfReferenceUID = _frame_of_reference_uid(spec.study_uid)
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [_ds(spec.spacing_mm[1]), _ds(spec.spacing_mm[2])]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if scanner.signed else 0
    if scanner.pixel_padding_value is not None:
        # US or SS, following PixelRepresentation (pydicom cannot infer this ambiguous VR).
        ds.add_new(0x00280120, "SS" if scanner.signed else "US", scanner.pixel_padding_value)
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = _ds(scanner.rescale_intercept)
    ds.RescaleSlope = _ds(scanner.rescale_slope)
    ds.RescaleType = "HU"
    return ds


def _save(out_dir: Path, ds: Dataset, stored: np.ndarray, spec: SeriesSpec) -> Path:
    ds.Rows, ds.Columns = stored.shape
    if spec.transfer_syntax == "rle":
        # Pinned plugin: gdcm, when installed, would be picked first and may encode differently.
        ds.compress(RLELossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        ds.add_new(0x7FE00010, "OW", stored.tobytes())
    stem = ds.SOPInstanceUID if spec.naming == "uid" else f"IM{ds.InstanceNumber:04d}"
    path = out_dir / (stem if spec.naming == "no-extension" else f"{stem}.dcm")
    out_dir.mkdir(parents=True, exist_ok=True)
    with path.open("xb") as f:  # "x": never silently replace another series' file
        ds.save_as(f, enforce_file_format=True)
    return path
