"""The lung mask of every cached scan: found on phantoms whose lungs are known, findings kept
inside, failures flagged (never dropped), stored beside the scan, and ``lung-crop``."""

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fedct.common.cache.config import PrepareConfig
from fedct.common.cache.lung_mask import (
    AIR_HU,
    crop,
    read_lung_mask,
    segment_lungs,
    with_mask_flags,
)
from fedct.common.cache.prepare import prepare
from fedct.common.cache.store import CacheError, check_run_settings, read_manifest, scan_path
from fedct.common.synth.cohort import render_phantom
from fedct.common.synth.findings import Difficulty
from fedct.common.synth.hospitals import HOSPITALS
from fedct.common.synth.phantom import Grid

SIZE = 96
PIXEL_MM = 350 / SIZE


def _phantom(kind: str, severity: int, seed: int):
    """A noisy scan of ``kind`` (12 slices of 96²) and its true lungs and lesion shares."""
    rng = np.random.default_rng(seed)
    phantom = render_phantom(
        kind, severity, rng, Grid((24, SIZE, SIZE), (5.0, PIXEL_MM, PIXEL_MM)), Difficulty()
    )
    hu = HOSPITALS[0].acquisition.scanners[0].reconstruct(phantom.hu, rng, 1.0)
    middle = slice(6, 18)
    opacity = phantom.opacity if phantom.opacity is not None else np.zeros_like(hu)
    return hu[middle], phantom.lung[middle] > 0.5, opacity[middle]


@pytest.mark.parametrize(("kind", "severity", "seed"), [("covid", 2, 1), ("normal", 0, 2)])
def test_the_mask_finds_the_lungs_of_a_phantom_and_keeps_the_findings_inside(
    kind: str, severity: int, seed: int
) -> None:
    hu, truth, opacity = _phantom(kind, severity, seed)
    lungs = segment_lungs(hu, "hu", PIXEL_MM)
    dice = 2 * (lungs.mask & truth).sum() / (lungs.mask.sum() + truth.sum())
    assert dice > 0.9
    assert lungs.warnings == ()
    assert 0.2 < lungs.share < 0.6 and min(lungs.sides) > 0.35
    if kind == "covid":
        lesions = opacity * truth
        kept = (lesions * lungs.mask).sum() / lesions.sum()
        thresholded = (lesions * (hu < AIR_HU)).sum() / lesions.sum()
        # A threshold alone cuts the findings out; the closing and the hull bring them back.
        assert kept > 0.8 and kept > thresholded + 0.1


def test_display_slices_are_read_as_the_lung_window() -> None:
    hu, truth, _ = _phantom("normal", 0, 3)
    display = np.clip((hu + 1000) / 1400 * 255, 0, 255).round()
    lungs = segment_lungs(display, "display")  # no pixel spacing: the fallback field of view
    assert 2 * (lungs.mask & truth).sum() / (lungs.mask.sum() + truth.sum()) > 0.85


def test_a_failing_mask_is_flagged() -> None:
    hu, _, _ = _phantom("normal", 0, 4)
    one_lung = hu.copy()
    one_lung[:, :, SIZE // 2 :] = np.maximum(one_lung[:, :, SIZE // 2 :], 40.0)
    assert segment_lungs(one_lung, "hu", PIXEL_MM).warnings == ("lung-mask-one-side",)
    no_lung = np.where(hu > -980, np.maximum(hu, 40.0), hu)  # only the airways stay air
    assert "lung-mask-small" in segment_lungs(no_lung, "hu", PIXEL_MM).warnings
    y, x = np.ogrid[:SIZE, :SIZE]
    disk = np.where((y - SIZE / 2) ** 2 + (x - SIZE / 2) ** 2 < (SIZE / 3) ** 2, 40.0, -1000.0)
    assert segment_lungs(np.stack([disk] * 3), "hu", PIXEL_MM).warnings == ("lung-mask-empty",)
    assert with_mask_flags("second-series;lung-mask-small", ["lung-mask-empty"]) == (
        "second-series;lung-mask-empty"
    )


def test_crop_box_is_a_square_around_the_lungs_and_crop_pads_beyond_the_slice() -> None:
    hu, _, _ = _phantom("normal", 0, 5)
    lungs = segment_lungs(hu, "hu", PIXEL_MM)
    top, bottom, left, right = lungs.crop_box()
    assert bottom - top == right - left
    rows = np.flatnonzero(lungs.mask.any(axis=(0, 2)))
    cols = np.flatnonzero(lungs.mask.any(axis=(0, 1)))
    assert top < rows[0] and rows[-1] < bottom and left < cols[0] and cols[-1] < right
    block = np.arange(2 * 4 * 4, dtype=float).reshape(2, 4, 4)
    cut = crop(block, (-1, 3, 2, 6), fill=-7.0)
    assert cut.shape == (2, 4, 4)
    assert (cut[:, 0] == -7).all() and (cut[:, :, 2:] == -7).all()
    np.testing.assert_array_equal(cut[:, 1:, :2], block[:, :3, 2:])


def _write_nifti(folder: Path, name: str, hu: np.ndarray) -> None:
    """One MosMedData-like study (x, y, z axes, HU) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-PIXEL_MM, -PIXEL_MM, 5.0, 1.0])
    volume = np.ascontiguousarray(np.transpose(hu[:, ::-1, ::-1], (2, 1, 0)))
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), folder / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two CT-0 studies: one normal, one whose lungs are filled with soft tissue."""
    root = tmp_path_factory.mktemp("mosmed") / "studies" / "CT-0"
    hu, _, _ = _phantom("normal", 0, 6)
    whole = np.concatenate([hu, hu])  # 24 slices: the middle 12 are selected
    _write_nifti(root, "study_0001", whole)
    _write_nifti(root, "study_0002", np.where(whole > -980, np.maximum(whole, 40.0), whole))
    return root.parent.parent


def test_prepare_stores_a_mask_per_scan_flags_and_keeps_the_failing_one(
    studies: Path, tmp_path: Path
) -> None:
    cfg = PrepareConfig(size=64, min_slices=4, workers=1, splits=(0.0, 0.0, 1.0))
    cache = tmp_path / "cache"
    result = prepare(studies, cache, cfg, progress=False)
    assert len(result.rows) == 2  # the failing mask is flagged, not dropped
    rows = read_manifest(cache)
    flags = sorted(row["warnings"] for row in rows)
    assert flags[0] == "" and "lung-mask" in flags[1]
    for row in rows:
        pixels = np.load(scan_path(cache, row["scan_id"]))
        mask = read_lung_mask(cache, row["scan_id"], pixels.shape)
        assert mask is not None and mask.shape == pixels.shape == (12, 64, 64)
        assert mask.any() == (row["warnings"] == "")
    assert read_lung_mask(cache, rows[0]["scan_id"], (3, 64, 64)) is None  # not this scan's
    # A rerun reuses the scans and keeps their flags; a scan without its mask (a cache
    # prepared before masks were) is prepared again.
    (cache / "masks" / f"{rows[0]['scan_id']}.npy").unlink()
    again = prepare(studies, cache, cfg, progress=False)
    assert again.reused == 1
    assert sorted(row["warnings"] for row in read_manifest(cache)) == flags
    assert read_lung_mask(cache, rows[0]["scan_id"], (12, 64, 64)) is not None


def test_lung_crop_is_a_cache_setting_the_run_must_share(studies: Path, tmp_path: Path) -> None:
    base = PrepareConfig(size=64, min_slices=4, workers=1, splits=(0.0, 0.0, 1.0))
    plain, cropped = tmp_path / "plain", tmp_path / "cropped"
    prepare(studies, plain, base, progress=False)
    prepare(studies, cropped, replace(base, lung_crop=True), progress=False)
    normal = next(r for r in read_manifest(cropped) if not r["warnings"])
    flagged = next(r for r in read_manifest(cropped) if r["warnings"])
    plain_rows = {r["warnings"]: r for r in read_manifest(plain)}
    lungs = read_lung_mask(
        cropped, normal["scan_id"], np.load(scan_path(cropped, normal["scan_id"])).shape
    )
    uncropped = read_lung_mask(
        plain,
        plain_rows[""]["scan_id"],
        np.load(scan_path(plain, plain_rows[""]["scan_id"])).shape,
    )
    assert lungs.mean() > uncropped.mean() * 1.3  # the lungs fill more of the slice
    # The flagged scan keeps its whole slice.
    np.testing.assert_array_equal(
        np.load(scan_path(cropped, flagged["scan_id"])),
        np.load(scan_path(plain, plain_rows[flagged["warnings"]]["scan_id"])),
    )
    check_run_settings(cropped, {"lung-crop": True, "image-size": 64})
    # lung-only: air (0 in the ai-corona normalisation) beyond the margin around the lungs.
    only = tmp_path / "only"
    prepare(studies, only, replace(base, lung_only=True), progress=False)
    row = next(r for r in read_manifest(only) if not r["warnings"])
    pixels = np.load(scan_path(only, row["scan_id"]))
    mask = read_lung_mask(only, row["scan_id"], pixels.shape)
    far = np.stack([ndimage.distance_transform_edt(~m) > 3 for m in mask])  # > 3 px ≈ 16 mm
    # (a lung speck too small for the stored 64² mask keeps its own margin)
    assert (pixels[far] == 0).mean() > 0.999 and pixels[mask].mean() > 20
    check_run_settings(only, {"lung-only": True, "lung-crop": False})
    with pytest.raises(CacheError, match="lung-crop = False but the cache has True"):
        check_run_settings(cropped, {"lung-crop": False})
    settings = (plain / "cache.json").read_text().replace('"lung_crop": false,', "")
    (plain / "cache.json").write_text(settings)  # a cache from before the option
    check_run_settings(plain, {"lung-crop": False})
