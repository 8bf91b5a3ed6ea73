"""Preprocessing throughput: ``fedct prepare`` against a MONAI pipeline doing the same job.

Both take the same full-profile DICOM series (512², thin slices), find the series' slices,
take the middle 50 %, clip each slice at its 99.5th percentile, rescale, resize to the target
size and write uint8 arrays; both use the same number of worker processes.  The two run in
turn, ``--repeats`` times each (fedct, MONAI, fedct, ...), on fresh output folders; prints
scans/s for each (medians) and the ratio of the medians, and writes the figures as JSON.

``--profile`` adds where ``fedct prepare``'s time goes on the same cohort: wall time by phase
and cProfile's top functions, of a one-worker run (bench/prepare_profile.py).

    python -m bench.preprocess [--series 20] [--slices 64] [--size 512] [--workers 2]
        [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.prepare_profile import cprofile_top, phase_breakdown
from fedct.common.cache.config import PrepareConfig
from fedct.common.cache.prepare import prepare
from fedct.common.cache.selection import middle_slices
from fedct.common.synth.cohort import render_scan
from fedct.common.synth.dicom_writer import ScannerProfile, SeriesSpec, make_uid, write_ct_series

RESULTS = Path(__file__).parent / "results" / "preprocess.json"


def make_cohort(root: Path, series: int, slices: int, size: int, seed: int) -> list[Path]:
    """``series`` DICOM series of ``slices`` × size² (half COVID-19, half normal)."""
    rng = np.random.default_rng(seed)
    folders = []
    spacing = (1.25, 350.0 / size, 350.0 / size)
    for i in range(series):
        kind = "covid" if i % 2 else "normal"
        hu = render_scan(kind, 2 if kind == "covid" else 0, rng, (slices, size, size), spacing)
        spec = SeriesSpec(
            patient_name=f"BENCH^{i}",
            patient_id=f"B{i:04d}",
            study_uid=make_uid(rng),
            series_uid=make_uid(rng),
            spacing_mm=spacing,
            thickness_mm=spacing[0],
        )
        folder = root / f"series_{i:03d}"
        write_ct_series(folder, hu, spec, ScannerProfile(), rng=rng)
        folders.append(folder)
    return folders


def _monai_one(job: tuple[Path, Path, int]) -> int:
    from monai.data import PydicomReader
    from monai.transforms import LoadImage, Resize, ScaleIntensityRangePercentiles

    folder, out, size = job
    volume = LoadImage(reader=PydicomReader(), image_only=True)(str(folder))  # (x, y, z)
    start, stop = middle_slices(volume.shape[-1], 0.5)
    slices = volume[..., start:stop].permute(2, 1, 0)  # slices as channels: (k, rows, cols)
    scaled = ScaleIntensityRangePercentiles(0, 99.5, 0.0, 1.0, clip=True, channel_wise=True)(slices)
    resized = Resize((size, size), mode="bilinear", anti_aliasing=True)(scaled)
    pixels = np.rint(np.clip(np.asarray(resized), 0, 1) * 255).astype(np.uint8)
    np.save(out / f"{folder.name}.npy", pixels)
    return len(pixels)


def run_monai(folders: list[Path], out: Path, size: int, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    began = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_monai_one, [(f, out, size) for f in folders])
    return time.perf_counter() - began


def run_fedct(raw: Path, cache: Path, size: int, workers: int) -> tuple[float, int]:
    cfg = PrepareConfig(size=size, workers=workers, min_slices=1)
    shutil.rmtree(cache, ignore_errors=True)
    began = time.perf_counter()
    result = prepare(raw, cache, cfg, progress=False)
    return time.perf_counter() - began, len(result.rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, in turn")
    parser.add_argument("--profile", action="store_true", help="also time fedct by phase")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if min(args.series, args.slices, args.size, args.workers, args.repeats) < 1:
        raise SystemExit("error: --series, --slices, --size, --workers and --repeats must be ≥ 1")

    fedct_s: list[float] = []
    monai_s: list[float] = []
    profile: dict | None = None
    with tempfile.TemporaryDirectory(prefix="fedct-bench-") as tmp:
        root = Path(tmp)
        began = time.perf_counter()
        folders = make_cohort(root / "raw", args.series, args.slices, args.size, args.seed)
        print(f"wrote {len(folders)} series in {time.perf_counter() - began:.1f} s")
        # Read once so that both pipelines start with the files in the page cache.
        for path in (root / "raw").rglob("*"):
            if path.is_file():
                path.read_bytes()
        for repeat in range(args.repeats):
            seconds, scans = run_fedct(root / "raw", root / "fedct", args.size, args.workers)
            fedct_s.append(seconds)
            monai_s.append(run_monai(folders, root / "monai", args.size, args.workers))
            print(
                f"  run {repeat + 1}/{args.repeats}: fedct {fedct_s[-1]:.1f} s, "
                f"MONAI {monai_s[-1]:.1f} s ({monai_s[-1] / fedct_s[-1]:.2f}×)"
            )
        mine = np.load(next((root / "fedct" / "scans").iterdir()))
        theirs = np.load(next((root / "monai").iterdir()))
        if args.profile:
            profile = phase_breakdown(root / "raw", root / "profiled", args.size)
            top = cprofile_top(root / "raw", root / "profiled", args.size)
        shutil.rmtree(root / "raw")

    fedct, monai = statistics.median(fedct_s), statistics.median(monai_s)
    result = {
        "series": args.series,
        "slices_per_series": args.slices,
        "matrix": args.size,
        "workers": args.workers,
        "repeats": args.repeats,
        "fedct_seconds": round(fedct, 3),
        "monai_seconds": round(monai, 3),
        "fedct_runs_seconds": [round(s, 3) for s in fedct_s],
        "monai_runs_seconds": [round(s, 3) for s in monai_s],
        "fedct_scans_per_s": round(scans / fedct, 3),
        "monai_scans_per_s": round(len(folders) / monai, 3),
        "ratio": round(monai / fedct, 2),
        "same_output_shape": mine.shape == theirs.shape,
        "machine": f"{platform.machine()} {multiprocessing.cpu_count()} cores",
    }
    if profile is not None:
        result["fedct_profile_one_worker"] = profile
        Console().print(phase_table(profile))
        print(top)
    print(
        f"fedct prepare: {result['fedct_scans_per_s']} scans/s ({fedct:.1f} s) | "
        f"MONAI: {result['monai_scans_per_s']} scans/s ({monai:.1f} s) | "
        f"ratio {result['ratio']}× (medians of {args.repeats} runs each, in turn)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def phase_table(profile: dict) -> Table:
    """The one-worker run's wall time by phase, with each phase's share."""
    wall = profile["wall_seconds"]
    table = Table(title=f"fedct prepare by phase: {profile['scans']} scans, one worker")
    for column in ("phase", "seconds", "share", "calls"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase, seconds in sorted(profile["seconds"].items(), key=lambda kv: -kv[1]):
        calls = profile["calls"].get(phase)
        table.add_row(phase, f"{seconds:.2f}", f"{seconds / wall:.0%}", str(calls or ""))
    table.add_row("total (wall)", f"{wall:.2f}", "100%", "")
    return table


if __name__ == "__main__":
    main()
