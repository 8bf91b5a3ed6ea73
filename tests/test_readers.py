"""NIfTI and slice-image readers: orientation, slice order, labels, rejections."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedct.common.ingest.base import Rejection, Scan, ScanLoadError
from fedct.common.ingest.discover import detect_format, read_input
from fedct.common.ingest.nifti import read_nifti
from fedct.common.ingest.slice_images import read_slice_images
from fedct.common.ingest.walk import walk_input

SPACING = (5.0, 0.8, 0.7)  # z, y, x


def _marked_volume() -> np.ndarray:
    """(z, row, col) volume, rows anterior→posterior and columns right→left, all asymmetric."""
    z, y, x = np.indices((6, 10, 12), dtype=np.float32)
    return 100 * z + 10 * y + x - 1000


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def _orientations(vol: np.ndarray):
    sz, sy, sx = SPACING
    nz = vol.shape[0]
    # RAS+ canonical: i → right, j → anterior, k → superior.
    yield vol[:, ::-1, ::-1].transpose(2, 1, 0), np.diag([sx, sy, sz, 1.0])
    # LPS-like storage (as DICOM converters write): i → left, j → posterior.
    yield vol.transpose(2, 1, 0), np.diag([-sx, -sy, sz, 1.0])
    # slices stored superior → inferior.
    flipped = np.diag([sx, sy, -sz, 1.0])
    flipped[2, 3] = sz * (nz - 1)
    yield vol[::-1, ::-1, ::-1].transpose(2, 1, 0), flipped
    # slice axis first in the array.
    yield (
        vol[:, ::-1, ::-1].transpose(0, 2, 1),
        np.array([[0, sx, 0, 0], [0, 0, sy, 0], [sz, 0, 0, 0], [0, 0, 0, 1.0]]),
    )


@pytest.mark.parametrize("case", range(4))
def test_nifti_slices_come_out_axial_in_one_convention(tmp_path: Path, case: int) -> None:
    vol = _marked_volume()
    array, affine = list(_orientations(vol))[case]
    _save(tmp_path / "studies" / "CT-2" / "study_0007.nii.gz", array, affine)
    (scan,) = read_nifti(tmp_path)
    assert isinstance(scan, Scan)
    assert scan.n_slices == 6 and scan.spacing_mm == pytest.approx(SPACING)
    assert scan.label == "CT-2" and scan.extra == {"severity": "CT-2"}
    np.testing.assert_array_equal(scan.load(0, 6), vol)
    np.testing.assert_array_equal(scan.load(2, 4), vol[2:4])


def test_nifti_scaling_and_unlabelled_folder(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.zeros((4, 4, 3), dtype=np.int16), np.eye(4))
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, tmp_path / "scan.nii")
    (scan,) = read_nifti(tmp_path)
    assert scan.label is None and np.all(scan.load(0, 3) == -1024.0)


def test_damaged_nifti_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (rejection,) = read_nifti(tmp_path)
    assert isinstance(rejection, Rejection) and rejection.reason == "unreadable-image"


def _write_pngs(folder: Path, count: int, names=lambda i: f"{i}.png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8), i * 10, dtype=np.uint8)).save(folder / names(i))


def test_png_slices_sort_by_number_not_name(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "NCP" / "patient7" / "scan1", 12)
    (scan,) = read_slice_images(tmp_path)
    assert scan.label == "NCP" and scan.intensity == "display" and scan.n_slices == 12
    np.testing.assert_array_equal(scan.load(0, 12)[:, 0, 0], np.arange(12) * 10)


def test_png_problems_become_rejections(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "CP" / "p1" / "s1", 3, names=lambda i: f"slice_{i}.png")
    (tmp_path / "CP" / "p1" / "s1" / "cover.png").write_bytes(b"\x89PNG broken")
    _write_pngs(tmp_path / "Normal" / "p2" / "s1", 3)
    (tmp_path / "Normal" / "p2" / "s1" / "7.png").write_bytes(b"not an image")
    first, second = read_slice_images(tmp_path)
    assert isinstance(first, Rejection) and first.reason == "inconsistent-geometry"
    with pytest.raises(ScanLoadError) as caught:
        second.load(0, second.n_slices)
    assert caught.value.rejection.reason == "unreadable-image"
    assert caught.value.rejection.path.endswith("7.png")


def test_format_detection(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "png" / "Normal" / "p" / "s", 2)
    _save(tmp_path / "nii" / "a.nii.gz", np.zeros((2, 2, 2), np.int16), np.eye(4))
    (tmp_path / "dcm").mkdir()
    (tmp_path / "dcm" / "IM0001").write_bytes(b"\0" * 200)
    assert detect_format(walk_input(tmp_path / "png").files) == "png"
    assert detect_format(walk_input(tmp_path / "nii").files) == "nifti"
    assert detect_format(walk_input(tmp_path / "dcm").files) == "dicom"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_input(tmp_path / "missing")
