"""Tiny unlabelled studies for the diagnose and viewer tests: DICOM series, zips, a NIfTI file."""

from __future__ import annotations

import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from fedct.common.synth.dicom_writer import (
    ScannerProfile,
    SeriesSpec,
    make_uid,
    write_ct_series,
    write_localizer,
)

PATIENT_NAME = "Doe^Unlabelled"  # must never leave the diagnose output folder


def chest(rng: np.random.Generator, slices: int, size: int, opacity: float) -> np.ndarray:
    """HU (slices, size, size): air, a soft-tissue body, two lungs with ``opacity`` × 600 HU
    of ground glass in them, noise."""
    y, x = np.mgrid[:size, :size] / size - 0.5
    body = (x / 0.42) ** 2 + (y / 0.33) ** 2 < 1
    lungs = ((np.abs(x) - 0.18) / 0.13) ** 2 + (y / 0.22) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0)
    hu = np.where(lungs, -850.0 + 600.0 * opacity, hu)
    volume = np.repeat(hu[None], slices, axis=0)
    return (volume + rng.normal(0, 20, volume.shape)).astype(np.float32)


def write_study(
    folder: Path,
    rng: np.random.Generator,
    *,
    slices: int = 12,
    size: int = 32,
    opacity: float = 0.0,
    localizer: bool = False,
) -> str:
    """One DICOM study (an axial series, and a localizer when asked); its StudyInstanceUID."""
    study = make_uid(rng)
    spec = SeriesSpec(
        patient_name=PATIENT_NAME,
        patient_id=f"PID-{study[-6:]}",
        study_uid=study,
        series_uid=make_uid(rng),
        spacing_mm=(5.0, 10.0, 10.0),
    )
    write_ct_series(
        folder / "axial", chest(rng, slices, size, opacity), spec, ScannerProfile(), rng=rng
    )
    if localizer:
        scout = SeriesSpec(
            patient_name=PATIENT_NAME,
            patient_id=spec.patient_id,
            study_uid=study,
            series_uid=make_uid(rng),
            series_number=99,
        )
        write_localizer(
            folder / "scout", chest(rng, 1, size, 0.0)[0], scout, ScannerProfile(), rng=rng
        )
    return study


def write_one_slice_nifti(path: Path) -> Path:
    """A NIfTI volume of a single axial slice: too few slices to diagnose."""
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = chest(np.random.default_rng(5), 1, 32, 0.0).transpose(2, 1, 0).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.diag([10.0, 10.0, 5.0, 1.0])), path)
    return path


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(folder).as_posix())
    return archive
