"""Simulated hospitals: what makes each site's data different (non-IID on purpose).

A :class:`HospitalProfile` fixes a site's label set and prevalence, slice geometry,
scanners (pixel storage, noise, reconstruction kernel), transfer syntax, file organisation
and how often studies carry a localizer, a second series or a second visit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

# The writer's own scan circle, so that padding lands exactly on the air drawn here.
from fedct.common.synth.dicom_writer import AIR_HU, ScannerProfile, outside_scan_circle
from fedct.common.synth.findings import Kind

# Each site label and the finding class the generator draws for it.
LABEL_KINDS: dict[str, Kind] = {"Normal": "normal", "NCA": "nca", "CP": "cp", "COVID-19": "covid"}


@dataclass(frozen=True)
class Scanner:
    """A CT scanner: how it stores pixels, its field of view, noise and kernel.

    ``noise_hu`` is the standard deviation of the white noise added before the kernel;
    ``sharpness`` < 0 blends towards a 3-tap blur (soft tissue kernel), > 0 is an unsharp
    mask (lung / bone kernel).  Values are clamped at -1024 HU, which is also the value of
    the pixels outside the reconstruction circle.
    """

    storage: ScannerProfile
    fov_mm: tuple[float, float]  # reconstruction diameter, drawn per scan
    noise_hu: float
    sharpness: float

    def reconstruct(
        self, hu: np.ndarray, rng: np.random.Generator, noise_scale: float = 1.0
    ) -> np.ndarray:
        """This scanner's image of a noiseless phantom ``(S, rows, cols)`` in HU."""
        image = rng.standard_normal(hu.shape, dtype=np.float32)
        image *= np.float32(self.noise_hu * noise_scale)
        image += hu
        if self.sharpness:
            blurred = ndimage.correlate1d(image, [0.25, 0.5, 0.25], axis=1, mode="nearest")
            ndimage.correlate1d(blurred, [0.25, 0.5, 0.25], axis=2, mode="nearest", output=blurred)
            # image + s * (image - blurred): s < 0 blends towards the blur, s > 0 sharpens.
            blurred -= image
            blurred *= np.float32(-self.sharpness)
            image += blurred
        np.maximum(image, np.float32(AIR_HU), out=image)  # scanners clamp at -1024 HU
        np.copyto(image, np.float32(AIR_HU), where=outside_scan_circle(hu.shape[1:]))
        return image


@dataclass(frozen=True)
class Acquisition:
    """How a site scans: slice geometry (as in the ``full`` cohort profile) and scanners."""

    thickness_mm: tuple[float, ...]
    interval_mm: tuple[float, ...] | None  # slice spacing; None: equal to the thickness
    coverage_mm: tuple[float, float]  # scanned length
    slices: tuple[int, int]
    scanners: tuple[Scanner, ...]


@dataclass(frozen=True)
class HospitalProfile:
    """One kind of site: labels, acquisition, file format and organisation."""

    name: str
    summary: str
    labels: tuple[tuple[str, float], ...]  # site label and its prevalence
    covid_severity: tuple[float, float, float, float]  # odds of CT-1..CT-4 among COVID-19
    acquisition: Acquisition
    transfer_syntax: Literal["explicit", "implicit", "rle"]
    layout: Literal["nested", "flat"]  # patient/study/series folders or one dump folder
    naming: Literal["dcm", "no-extension", "uid"]
    localizer_rate: float
    second_series: Literal["kernel", "thick", "thin"]
    second_series_rate: float
    repeat_rate: float  # share of studies that are a patient's second visit
    second_kernel: tuple[str, float] = ("LUNG", 0.8)  # kernel name and sharpness


# Odds of extent 1-4 for CP and NCA scans.
OTHER_SEVERITY = (0.35, 0.35, 0.2, 0.1)

MDH_LIKE = HospitalProfile(
    name="mdh-like",
    summary="Normal/NCA/COVID-19, 8-10 mm, 21-46 slices, explicit VR, patient/study/series",
    labels=(("Normal", 0.34), ("NCA", 0.30), ("COVID-19", 0.36)),
    covid_severity=(0.55, 0.3, 0.12, 0.03),
    acquisition=Acquisition(
        thickness_mm=(8.0, 10.0),
        interval_mm=None,
        coverage_mm=(230.0, 380.0),
        slices=(21, 46),
        scanners=(
            Scanner(ScannerProfile(model="Phantom 16", kernel="B31f"), (340, 400), 16.0, -0.5),
            Scanner(
                ScannerProfile(model="Phantom 64", kernel="B60f", signed=False),
                (320, 380),
                24.0,
                0.5,
            ),
        ),
    ),
    transfer_syntax="explicit",
    layout="nested",
    naming="dcm",
    localizer_rate=0.6,
    second_series="kernel",
    second_series_rate=0.35,
    repeat_rate=0.15,
    second_kernel=("B70f", 0.9),
)

CCCCII_LIKE = HospitalProfile(
    name="ccccii-like",
    summary="Normal/CP/COVID-19, 1-2 mm slices every 2.5-5 mm, implicit VR, one flat folder",
    labels=(("Normal", 0.30), ("CP", 0.34), ("COVID-19", 0.36)),
    covid_severity=(0.5, 0.3, 0.15, 0.05),
    acquisition=Acquisition(
        thickness_mm=(1.0, 1.25, 1.5, 2.0),
        interval_mm=(2.5, 3.0, 4.0, 5.0),
        coverage_mm=(270.0, 340.0),
        slices=(60, 120),
        scanners=(
            Scanner(
                ScannerProfile(model="Phantom 128", kernel="LUNG", rescale_slope=0.5),
                (330, 380),
                28.0,
                0.4,
            ),
            Scanner(ScannerProfile(model="Phantom 64", kernel="STANDARD"), (350, 420), 20.0, 0.0),
        ),
    ),
    transfer_syntax="implicit",
    layout="flat",
    naming="uid",
    localizer_rate=0.3,
    second_series="thick",
    second_series_rate=0.4,
    repeat_rate=0.2,
)

COVID_WARD = HospitalProfile(
    name="covid-ward",
    summary="mostly COVID-19, severe cases, 5 mm, RLE lossless, files without extension",
    labels=(("Normal", 0.12), ("CP", 0.08), ("COVID-19", 0.80)),
    covid_severity=(0.25, 0.35, 0.28, 0.12),
    acquisition=Acquisition(
        thickness_mm=(5.0,),
        interval_mm=None,
        coverage_mm=(280.0, 340.0),
        slices=(50, 70),
        scanners=(
            Scanner(
                ScannerProfile(model="Phantom 32", kernel="SOFT", pixel_padding_value=-2000),
                (360, 440),
                14.0,
                -0.8,
            ),
            Scanner(
                ScannerProfile(model="Phantom 64", kernel="B45f", signed=False),
                (330, 380),
                22.0,
                0.2,
            ),
        ),
    ),
    transfer_syntax="rle",
    layout="nested",
    naming="no-extension",
    localizer_rate=0.8,
    second_series="thin",
    second_series_rate=0.3,
    repeat_rate=0.25,
)

HOSPITALS: tuple[HospitalProfile, ...] = (MDH_LIKE, CCCCII_LIKE, COVID_WARD)

# The external sets: MosMedData-like NIfTI (slice geometry assumed: 8 mm, 30-45 slices) and
# CC-CCII-like slice images, acquired like the CC-CCII-like hospital.
MOSMED_ACQUISITION = Acquisition(
    thickness_mm=(8.0,),
    interval_mm=None,
    coverage_mm=(250.0, 350.0),
    slices=(30, 45),
    scanners=(Scanner(ScannerProfile(model="Phantom 64", kernel="FC07"), (340, 400), 18.0, -0.3),),
)
CCCCII_ACQUISITION = CCCCII_LIKE.acquisition
