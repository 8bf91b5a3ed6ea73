"""Generate a synthetic cohort: DICOM hospitals, a MosMedData-like and a CC-CCII-like set.

``fedct synth --out DIR`` writes, from one seed and byte for byte reproducibly::

    DIR/sites/<site>/...            DICOM studies of each simulated hospital
    DIR/sites/<site>/labels.csv     patient_id,study_uid,label (the site's own labels)
    DIR/external/mosmed/studies/CT-k/study_NNNN.nii.gz
    DIR/external/ccccii/{NCP,CP,Normal}/<patient>/<scan>/<n>.png
    DIR/cohort.json                 profile, seed and counts (no identifiers)

Sites cycle through the hospital profiles of :mod:`fedct.common.synth.hospitals`; a fourth site
is an MDH-like site again, with other patients.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import multiprocessing
import os
import queue
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedct.common.synth.dicom_writer import SeriesSpec, make_uid, write_ct_series, write_localizer
from fedct.common.synth.findings import Difficulty, Kind, draw_lesions
from fedct.common.synth.hospitals import (
    CCCCII_ACQUISITION,
    CCCCII_LIKE,
    HOSPITALS,
    LABEL_KINDS,
    MOSMED_ACQUISITION,
    OTHER_SEVERITY,
    Acquisition,
    HospitalProfile,
    Scanner,
)
from fedct.common.synth.image_writers import write_nifti, write_png_slices
from fedct.common.synth.phantom import Grid, Phantom, build_phantom, sample_anatomy
from fedct.common.synth.sizes import SIZES, CohortSize, ProfileName

MOSMED_FOLDERS = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
MOSMED_SHARES = (254, 684, 125, 45, 2)  # studies per folder in MosMedData COVID19_1110
CCCCII_CLASSES: tuple[tuple[str, Kind], ...] = (
    ("NCP", "covid"),
    ("CP", "cp"),
    ("Normal", "normal"),
)

# Seed-sequence namespaces, so that sites and external sets never share a stream.
_SITE, _MOSMED, _CCCCII = 0, 1, 2

_LAST = ("DOE", "ROE", "POE", "NGUYEN", "GARCIA", "MUELLER", "ROSSI", "SATO", "KARIMI", "SILVA")
_FIRST = ("JANE", "JOHN", "ALEX", "SARA", "ALI", "MARIA", "WEI", "OLGA", "AMIR", "LENA", "OMAR")


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`synthesize` wrote."""

    out: Path
    profile: str
    seed: int
    sites: dict[str, dict[str, int]]  # site -> label -> studies
    external: dict[str, dict[str, int]]  # set -> folder/class -> studies
    files: int
    bytes: int
    seconds: float

    def line(self) -> str:
        """One line for the terminal: counts, files, size on disk, time."""
        parts = []
        for site, counts in self.sites.items():
            parts.append(f"{site} " + "/".join(f"{n} {label}" for label, n in counts.items()))
        for name, counts in self.external.items():
            parts.append(f"{name} {sum(counts.values())}")
        return (
            f"synthesized {'; '.join(parts)} -> {self.files} files, "
            f"{self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s at {self.out}"
        )


def render_scan(
    kind: Kind,
    severity: int,
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    difficulty: Difficulty | None = None,
    *,
    scanner: Scanner | None = None,
) -> np.ndarray:
    """One scan as float32 HU ``(S, rows, cols)``, slice 0 the most inferior; writes nothing.

    ``severity`` is 0 for ``normal`` and 1-4 otherwise (see :func:`draw_lesions`).  Without
    a ``scanner`` the image is that of the first MDH-like scanner.
    """
    difficulty = difficulty or Difficulty()
    phantom = render_phantom(kind, severity, rng, Grid(shape, spacing), difficulty)
    scanner = scanner or HOSPITALS[0].acquisition.scanners[0]
    return scanner.reconstruct(phantom.hu, rng, difficulty.noise_scale)


def render_phantom(
    kind: Kind, severity: int, rng: np.random.Generator, grid: Grid, difficulty: Difficulty
) -> Phantom:
    """The noiseless phantom of one scan: anatomy, then the findings of its class."""
    anatomy = sample_anatomy(rng, grid)
    lesions = draw_lesions(kind, severity, rng, anatomy, grid, difficulty)
    return build_phantom(anatomy, grid, rng, lesions)


def synthesize(
    out: Path,
    profile: ProfileName,
    sites: int = 3,
    scans_per_site: int | None = None,
    seed: int = 0,
    external: bool = True,
    progress: bool = True,
    *,
    mosmed_studies: int | None = None,
    difficulty: Difficulty | None = None,
    workers: int | None = None,
) -> CohortSummary:
    """Write a whole cohort under ``out`` (which must be empty or absent).  ``scans_per_site``
    and ``mosmed_studies`` override the profile's numbers; the sites and external sets are
    written by ``workers`` processes at once (default: one per CPU core)."""
    if profile not in SIZES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(SIZES)}")
    if sites < 1:
        raise ValueError(f"--sites must be at least 1, got {sites}")
    if scans_per_site is not None and scans_per_site < 1:
        raise ValueError(f"--scans-per-site must be at least 1, got {scans_per_site}")
    if mosmed_studies is not None and mosmed_studies < 1:
        raise ValueError(f"--mosmed-studies must be at least 1, got {mosmed_studies}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; synthesize into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    size = SIZES[profile]
    difficulty = difficulty or Difficulty()
    n_scans = scans_per_site or size.scans_per_site
    n_mosmed = mosmed_studies or size.mosmed_studies
    site_counts: dict[str, dict[str, int]] = {}
    site_meta: dict[str, dict[str, object]] = {}
    ext_counts: dict[str, dict[str, int]] = {}
    columns = (
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    parts: list[_Part] = []
    for i in range(sites):
        hospital = HOSPITALS[i % len(HOSPITALS)]
        writer = _SiteWriter(out / "sites" / site_name(i), hospital, size, difficulty)
        parts.append(
            _Part(
                f"{site_name(i)} ({hospital.name})",
                n_scans,
                functools.partial(writer.write, seed, i, n_scans),
            )
        )
    if external:
        counts = _apportion(MOSMED_SHARES, n_mosmed)
        mosmed = functools.partial(
            _write_mosmed, out / "external" / "mosmed", size, seed, counts, difficulty
        )
        parts.append(_Part("external/mosmed", sum(counts), mosmed))
        plan = _plan_ccccii(seed, size)
        ccccii = functools.partial(
            _write_ccccii, out / "external" / "ccccii", size, seed, plan, difficulty
        )
        parts.append(_Part("external/ccccii", len(plan), ccccii))
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        results = _write_parts(parts, bar, workers)
    for i, result in enumerate(results[:sites]):
        site_counts[site_name(i)] = result.labels
        site_meta[site_name(i)] = {
            "profile": HOSPITALS[i % len(HOSPITALS)].name,
            **dataclasses.asdict(result),
        }
    if external:
        ext_counts["mosmed"], ext_counts["ccccii"] = results[sites:]
    record = {
        "generator": "fedct synth",
        "profile": profile,
        "seed": seed,
        "matrix": size.matrix,
        "scans_per_site": n_scans,
        "mosmed_studies": n_mosmed if external else 0,
        "difficulty": dataclasses.asdict(difficulty),
        "sites": site_meta,
        "external": ext_counts,
    }
    (out / "cohort.json").write_text(json.dumps(record, indent=2) + "\n")
    files = [p for p in out.rglob("*") if p.is_file()]
    return CohortSummary(
        out=out,
        profile=profile,
        seed=seed,
        sites=site_counts,
        external=ext_counts,
        files=len(files),
        bytes=sum(p.stat().st_size for p in files),
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class _Part:
    """One independently seeded part of a cohort (a site, an external set): its progress
    label, its scan count, and the call that writes it given a per-scan callback."""

    label: str
    scans: int
    write: Callable[[Callable[[], None]], object]


# Set in the parent before forking the workers, so the parts' writers need no pickling.
_PARTS: list[_Part] = []
_DONE: Any = None  # a queue of part indices, one per scan written


def _write_part(index: int) -> object:
    return _PARTS[index].write(lambda: _DONE.put(index))


def _write_parts(parts: list[_Part], bar: Progress, workers: int) -> list[object]:
    """Each part's result, in order.  Every part draws from its own seeded generators, so
    ``workers`` processes write the same bytes as one."""
    global _PARTS, _DONE
    tasks = [bar.add_task(part.label, total=part.scans) for part in parts]
    if workers <= 1 or len(parts) <= 1:
        pairs = zip(tasks, parts, strict=True)
        return [part.write(lambda t=t: bar.advance(t)) for t, part in pairs]
    context = multiprocessing.get_context("fork")
    _PARTS, _DONE = parts, context.Queue()
    try:
        ignore_sigint = (signal.SIGINT, signal.SIG_IGN)
        with context.Pool(min(workers, len(parts)), signal.signal, ignore_sigint) as pool:
            pending = pool.map_async(_write_part, range(len(parts)), chunksize=1)
            while not pending.ready():
                try:
                    bar.advance(tasks[_DONE.get(timeout=0.2)])
                except queue.Empty:
                    continue
            results = pending.get()
        for task, part in zip(tasks, parts, strict=True):
            bar.update(task, completed=part.scans)  # ticks still in the queue's pipe
        return results
    finally:
        _PARTS, _DONE = [], None


def site_name(index: int) -> str:
    """``hospital-a``, ``hospital-b``, ... and ``hospital-27`` onwards."""
    return f"hospital-{chr(ord('a') + index)}" if index < 26 else f"hospital-{index + 1}"


def _apportion(weights: tuple[float, ...], total: int) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainders), at least 1 each
    while ``total`` allows."""
    w = np.asarray(weights, float) / sum(weights)
    floor = max(0, min(1, total // len(w)))
    counts = np.maximum(np.floor(w * total).astype(int), floor)
    while counts.sum() > total:
        counts[np.argmax(counts)] -= 1
    remainders = w * total - counts
    for i in np.argsort(-remainders, kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return [int(c) for c in counts]


def _draw_grid(
    rng: np.random.Generator, acq: Acquisition, size: CohortSize
) -> tuple[Grid, Scanner]:
    """A scan's grid (scaled to the cohort profile) and the scanner that made it."""
    scanner = acq.scanners[int(rng.integers(len(acq.scanners)))]
    thickness = float(rng.choice(acq.thickness_mm))
    interval = float(rng.choice(acq.interval_mm)) if acq.interval_mm else thickness
    n = int(np.clip(round(rng.uniform(*acq.coverage_mm) / interval), *acq.slices))
    n_out = n
    if size.slice_bounds is not None:
        n_out = int(np.clip(round(n * size.slice_scale), *size.slice_bounds))
    stretch = n / n_out
    pixel = round(rng.uniform(*scanner.fov_mm) / size.matrix, 4)
    shape = (n_out, size.matrix, size.matrix)
    grid = Grid(shape, (round(interval * stretch, 3), pixel, pixel), round(thickness * stretch, 3))
    return grid, scanner


def _finer(grid: Grid, k: int) -> Grid:
    """``grid`` with k times as many, k times thinner slices over the same length."""
    s, r, c = grid.shape
    dz, dy, dx = grid.spacing
    return Grid((s * k, r, c), (dz / k, dy, dx), grid.slab / k)


def _thicken(image: np.ndarray, k: int) -> np.ndarray:
    """Average groups of ``k`` adjacent slices (a thicker reconstruction)."""
    n = image.shape[0] // k
    return image[: n * k].reshape(n, k, *image.shape[1:]).mean(axis=1)


def _origin(grid: Grid, table_z: float) -> tuple[float, float, float]:
    """LPS position of voxel (0, 0) of slice 0 for a grid centred at (0, 0, table_z)."""
    s, r, c = grid.shape
    dz, dy, dx = grid.spacing
    return (-(c - 1) / 2 * dx, -(r - 1) / 2 * dy, table_z - (s - 1) / 2 * dz)


def _severity(rng: np.random.Generator, kind: Kind, covid_odds: tuple[float, ...]) -> int:
    if kind == "normal":
        return 0
    odds = np.asarray(covid_odds if kind == "covid" else OTHER_SEVERITY, float)
    return int(rng.choice(4, p=odds / odds.sum())) + 1


@dataclass(frozen=True)
class _SiteResult:
    patients: int
    studies: int
    series: int
    files: int
    labels: dict[str, int]  # studies per site label


@dataclass(frozen=True)
class _Series:
    description: str
    grid: Grid
    origin: tuple[float, float, float]
    image: np.ndarray
    scanner: Scanner


class _SiteWriter:
    """Writes one simulated hospital: studies, labels.csv."""

    def __init__(
        self, root: Path, hospital: HospitalProfile, size: CohortSize, difficulty: Difficulty
    ) -> None:
        self.root = root
        self.hospital = hospital
        self.size = size
        self.difficulty = difficulty

    def write(
        self, seed: int, index: int, n_scans: int, advance: Callable[[], None]
    ) -> _SiteResult:
        rng = np.random.default_rng([seed, _SITE, index])
        labels = [label for label, _ in self.hospital.labels]
        counts = _apportion(tuple(p for _, p in self.hospital.labels), n_scans)
        patients = _plan_patients(rng, labels, counts, self.hospital.repeat_rate)
        numbers = rng.choice(900_000, size=len(patients), replace=False) + 100_000
        rows = []
        n_series = n_files = 0
        for p, (number, visits) in enumerate(zip(numbers, patients, strict=True)):
            patient_id = f"PID{number}"
            name = f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}^{chr(ord('A') + rng.integers(26))}"
            first_day = date(2020, 2, 15) + timedelta(days=int(rng.integers(0, 100)))
            for s, label in enumerate(visits):
                study_rng = np.random.default_rng([seed, _SITE, index, p, s])
                day = first_day + timedelta(days=int(s * study_rng.integers(3, 22)))
                identity = {
                    "patient_name": name,
                    "patient_id": patient_id,
                    "accession_number": f"ACC{study_rng.integers(10**7, 10**8)}",
                    "study_date": day.strftime("%Y%m%d"),
                }
                study_uid, series, files = self._study(study_rng, label, identity)
                rows.append((patient_id, study_uid, label))
                n_series += series
                n_files += files
                advance()
        with (self.root / "labels.csv").open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["patient_id", "study_uid", "label"])
            writer.writerows(sorted(rows))
        found = Counter(label for _, _, label in rows)
        return _SiteResult(
            patients=len(patients),
            studies=len(rows),
            series=n_series,
            files=n_files,
            labels={label: found[label] for label in labels},
        )

    def _study(
        self, rng: np.random.Generator, label: str, identity: dict[str, str]
    ) -> tuple[str, int, int]:
        """Render and write one study; returns its UID, series and file counts."""
        hospital = self.hospital
        kind = LABEL_KINDS[label]
        severity = _severity(rng, kind, hospital.covid_severity)
        grid, scanner = _draw_grid(rng, hospital.acquisition, self.size)
        second = rng.random() < hospital.second_series_rate
        localizer = rng.random() < hospital.localizer_rate
        thin = second and hospital.second_series == "thin"
        rendered = _finer(grid, 2) if thin else grid
        phantom = render_phantom(kind, severity, rng, rendered, self.difficulty)
        table_z = float(rng.uniform(-300, -120))
        series = self._series(rng, phantom, grid, scanner, second, table_z)
        study = {
            **identity,
            "study_uid": make_uid(rng),
            "transfer_syntax": hospital.transfer_syntax,
            "naming": hospital.naming,
        }
        study_dir = self.root / identity["patient_id"]
        study_dir /= f"{identity['study_date']}_{identity['accession_number']}"
        n_files = 0
        if localizer:
            scout, spec = _scout(phantom, table_z, study, make_uid(rng))
            folder = self._folder(study_dir, 1, spec.series_description)
            write_localizer(folder, scout, spec, scanner.storage, rng=rng)
            n_files += 1
        for number, s in enumerate(series, start=2):
            spec = SeriesSpec(
                **study,
                series_uid=make_uid(rng),
                series_number=number,
                series_description=s.description,
                spacing_mm=s.grid.spacing,
                thickness_mm=s.grid.slab,
                origin_mm=s.origin,
            )
            folder = self._folder(study_dir, number, s.description)
            n_files += len(write_ct_series(folder, s.image, spec, s.scanner.storage, rng=rng))
        return study["study_uid"], len(series) + int(localizer), n_files

    def _series(
        self,
        rng: np.random.Generator,
        phantom: Phantom,
        grid: Grid,
        scanner: Scanner,
        second: bool,
        table_z: float,
    ) -> list[_Series]:
        """The study's axial series: the main one and, when ``second``, the site's extra one.

        A ``thin`` site renders the phantom at half the slice spacing; its main series is
        then the average of slice pairs.
        """
        kind = self.hospital.second_series if second else None
        image = scanner.reconstruct(phantom.hu, rng, self.difficulty.noise_scale)
        origin = _origin(grid, table_z)
        main = _thicken(image, 2) if kind == "thin" else image
        series = [_Series(f"CHEST {grid.slab:.3g}", grid, origin, main, scanner)]
        if kind == "thin":
            thin = phantom.grid
            series.append(
                _Series(f"CHEST {thin.slab:.3g}", thin, _origin(thin, table_z), image, scanner)
            )
        elif kind == "thick":
            dz = grid.spacing[0]
            thick = Grid((grid.shape[0] // 2, *grid.shape[1:]), (2 * dz, *grid.spacing[1:]), 2 * dz)
            shifted = (origin[0], origin[1], origin[2] + dz / 2)  # centre of the first pair
            thickened = _thicken(image, 2)
            series.append(
                _Series(f"CHEST {thick.slab:.3g} MPR", thick, shifted, thickened, scanner)
            )
        elif kind == "kernel":
            name, sharpness = self.hospital.second_kernel
            storage = dataclasses.replace(scanner.storage, kernel=name)
            alt = dataclasses.replace(scanner, storage=storage, sharpness=sharpness)
            sharp = alt.reconstruct(phantom.hu, rng, self.difficulty.noise_scale)
            series.append(_Series(f"LUNG {grid.slab:.3g}", grid, origin, sharp, alt))
        return series

    def _folder(self, study_dir: Path, number: int, description: str) -> Path:
        if self.hospital.layout == "flat":
            return self.root / "DICOM"
        return study_dir / f"{number:03d}_{description.replace(' ', '_')}"


def _plan_patients(
    rng: np.random.Generator, labels: list[str], counts: list[int], repeat_rate: float
) -> list[list[str]]:
    """Group studies into patients: ``repeat_rate`` of studies are a second visit of a
    patient with the same label.  Returns each patient's labels, in a shuffled order."""
    singles = {label: n for label, n in zip(labels, counts, strict=True)}
    patients: list[list[str]] = []
    for _ in range(round(repeat_rate * sum(counts))):
        can_pair = [label for label in labels if singles[label] >= 2]
        if not can_pair:
            break
        label = can_pair[int(rng.integers(len(can_pair)))]
        singles[label] -= 2
        patients.append([label, label])
    patients += [[label] for label in labels for _ in range(singles[label])]
    order = rng.permutation(len(patients))
    return [patients[i] for i in order]


def _scout(
    phantom: Phantom, table_z: float, study: dict[str, str], series_uid: str
) -> tuple[np.ndarray, SeriesSpec]:
    """A coronal scout: the phantom averaged front to back, head at the top, square pixels."""
    grid = phantom.grid
    dz, _, dx = grid.spacing
    repeat = max(1, round(dz / dx))
    image = np.repeat(phantom.hu.mean(axis=1)[::-1], repeat, axis=0)
    x0, _, z0 = _origin(grid, table_z)
    top = z0 + (grid.shape[0] - 1) * dz
    spec = SeriesSpec(
        **study,
        series_uid=series_uid,
        series_number=1,
        series_description="SCOUT",
        spacing_mm=(dz, round(dz / repeat, 4), dx),
        thickness_mm=1.0,
        origin_mm=(x0, 0.0, top),
    )
    return image, spec


def _write_mosmed(
    root: Path,
    size: CohortSize,
    seed: int,
    counts: list[int],
    difficulty: Difficulty,
    advance: Callable[[], None],
) -> dict[str, int]:
    """``studies/CT-k/study_NNNN.nii.gz``, numbered continuously across the folders."""
    number = 0
    for severity, (folder, count) in enumerate(zip(MOSMED_FOLDERS, counts, strict=True)):
        for _ in range(count):
            number += 1
            rng = np.random.default_rng([seed, _MOSMED, number])
            grid, scanner = _draw_grid(rng, MOSMED_ACQUISITION, size)
            kind: Kind = "covid" if severity else "normal"
            phantom = render_phantom(kind, severity, rng, grid, difficulty)
            image = scanner.reconstruct(phantom.hu, rng, difficulty.noise_scale)
            path = root / "studies" / folder / f"study_{number:04d}.nii.gz"
            write_nifti(path, image, grid.spacing, _origin(grid, 0.0))
            advance()
    return dict(zip(MOSMED_FOLDERS, counts, strict=True))


def _plan_ccccii(seed: int, size: CohortSize) -> list[tuple[str, int, int]]:
    """(class folder, patient number, scan number) of every scan; a quarter of the
    patients have two scans."""
    n_patients = size.ccccii_patients * len(CCCCII_CLASSES)
    rng = np.random.default_rng([seed, _CCCCII])
    patients = rng.choice(9000, size=n_patients, replace=False) + 1000
    scan_ids = iter(rng.choice(9000, size=2 * n_patients, replace=False) + 1000)
    plan = []
    for p, patient in enumerate(patients):
        folder = CCCCII_CLASSES[p % len(CCCCII_CLASSES)][0]
        for _ in range(1 + int(rng.random() < 0.25)):
            plan.append((folder, int(patient), int(next(scan_ids))))
    return plan


def _write_ccccii(
    root: Path,
    size: CohortSize,
    seed: int,
    plan: list[tuple[str, int, int]],
    difficulty: Difficulty,
    advance: Callable[[], None],
) -> dict[str, int]:
    """``{NCP,CP,Normal}/<patient>/<scan>/<n>.png`` for each planned scan."""
    kinds = dict(CCCCII_CLASSES)
    for folder, patient, scan in plan:
        rng = np.random.default_rng([seed, _CCCCII, patient, scan])
        kind = kinds[folder]
        severity = _severity(rng, kind, CCCCII_LIKE.covid_severity)
        grid, scanner = _draw_grid(rng, CCCCII_ACQUISITION, size)
        phantom = render_phantom(kind, severity, rng, grid, difficulty)
        image = scanner.reconstruct(phantom.hu, rng, difficulty.noise_scale)
        write_png_slices(root / folder / str(patient) / str(scan), image)
        advance()
    found = Counter(folder for folder, _, _ in plan)
    return {folder: found[folder] for folder, _ in CCCCII_CLASSES}


def run(args: argparse.Namespace) -> int:
    """Run ``fedct synth``; prints one summary line."""
    try:
        summary = synthesize(
            args.out,
            args.profile,
            sites=args.sites,
            scans_per_site=args.scans_per_site,
            mosmed_studies=args.mosmed_studies,
            seed=args.seed,
            external=not args.no_external,
            progress=True,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"fedct synth: {exc}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0
