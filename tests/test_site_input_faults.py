"""Nothing lost and nothing silent at a site (issue 23), with crafted inputs: every entry of
an input accounted for, bad voxels refused or repaired with a warning, one bad file never the
job's end, one writer per cache, splits that never move, bounded sizes and a full disk named,
and SIGTERM / SIGHUP stopping a multi-worker prepare cleanly (real processes)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import RLELossless

from fedct.client.site_data import SiteConfigError, check_site_cache
from fedct.common.cache import store
from fedct.common.cache.config import PrepareConfig
from fedct.common.cache.inspect import inspect_input
from fedct.common.cache.lock import LOCK_FILE
from fedct.common.cache.prepare import prepare
from fedct.common.cache.scan_index import ScanIndex
from fedct.common.cache.store import CacheError, read_manifest, read_settings
from fedct.common.cli import main
from fedct.common.ingest import nifti
from fedct.common.ingest.walk import walk_input
from fedct.common.synth.cohort import synthesize
from fedct.common.synth.dicom_writer import ScannerProfile
from tests.test_dicom import phantom, write_series

ROOT = Path(__file__).resolve().parents[1]
SMALL = PrepareConfig(size=16, min_slices=1, workers=1)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic DICOM hospital with labels (six studies)."""
    out = tmp_path_factory.mktemp("cohort")
    synthesize(out, "tiny", sites=1, scans_per_site=6, seed=5, progress=False)
    return next(p for p in (out / "sites").iterdir() if p.is_dir())


def _qa(cache: Path) -> dict:
    return json.loads((cache / "qa.json").read_text())


# --- silent loss -------------------------------------------------------------------------


def _walk_as_nobody(root: Path, queue: multiprocessing.Queue) -> None:
    os.setgid(65534)
    os.setuid(65534)
    walk = walk_input(root)
    queue.put(([r.reason for r in walk.rejections], [r.path for r in walk.rejections]))


def test_every_entry_under_the_input_is_accounted_for(tmp_path: Path) -> None:
    """Links inside the input are read once, links leading out or nowhere, FIFOs, unreadable
    files and folders are rejected with a reason; the QA counts add up to every entry."""
    raw, outside = tmp_path / "raw", tmp_path / "elsewhere"
    write_series(raw / "series-a", phantom(4), seed=1)
    write_series(outside / "series-b", phantom(4), seed=2)
    (raw / "through-link").symlink_to(outside / "series-b")  # leaves the input: refused
    (raw / "again").symlink_to(raw / "series-a")  # inside: read once, under its own path
    (raw / "loop").symlink_to(raw)  # a loop back to the input
    (raw / "gone").symlink_to(raw / "nothing-here")
    os.mkfifo(raw / "pipe")  # never opened: opening it would wait for a writer forever
    main_code = main(["prepare", "--input", str(raw), "--out", str(tmp_path / "cache"),
                      "--size", "16", "--min-slices", "1", "--workers", "1"])  # fmt: skip
    assert main_code == 0
    qa = _qa(tmp_path / "cache")
    assert qa["scans"] == 1
    assert qa["rejected_by_reason"] == {
        "link-outside-input": 1,
        "broken-link": 1,
        "special-file": 1,
    }
    entries = [p for p in raw.rglob("*")]  # rglob lists links and the FIFO, not through links
    assert qa["files"]["read"] == len(entries) - 1  # every entry but the series folder
    assert qa["files"]["ignored"] == 2  # the two links inside the input

    # Unreadable folders and files (as a user without the permission: root reads anything).
    shared = Path(tempfile.mkdtemp(prefix="fedct-perm-"))
    try:
        shared.chmod(0o755)
        write_series(shared / "ok", phantom(2), seed=3)
        (shared / "closed").mkdir()
        (shared / "closed" / "IM1").write_bytes(b"x")
        (shared / "secret.dcm").write_bytes(b"x")
        for path in (shared / "ok", *(shared / "ok").iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (shared / "closed").chmod(0o000)
        (shared / "secret.dcm").chmod(0o000)
        if os.geteuid() == 0:
            queue: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
            child = multiprocessing.get_context("fork").Process(
                target=_walk_as_nobody, args=(shared, queue)
            )
            child.start()
            reasons, paths = queue.get(timeout=30)
            child.join(30)
        else:
            walk = walk_input(shared)
            reasons = [r.reason for r in walk.rejections]
            paths = [r.path for r in walk.rejections]
        assert sorted(zip(paths, reasons, strict=True)) == [
            ("closed", "unreadable"),
            ("secret.dcm", "unreadable"),
        ]
    finally:
        (shared / "closed").chmod(0o755)
        shutil.rmtree(shared)


# --- bad voxels --------------------------------------------------------------------------


def _twelve_bit(folder: Path, seed: int, *, overflow: bool = False, rle: bool = False) -> Path:
    """An unsigned 12-bit series of 4 slices; ``overflow``: slice 2 stores values above 4095;
    ``rle``: RLE-compressed, with slice 2's high-byte segment damaged but still decodable."""
    _, paths = write_series(folder, phantom(4), seed=seed, scanner=ScannerProfile(signed=False))
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit = 12, 11
        if overflow and i == 2:
            pixels = ds.pixel_array.copy()
            pixels[10:20, 10:20] = 5000
            ds.PixelData = pixels.tobytes()
        if rle:
            ds.compress(RLELossless)
            if i == 2:
                fragment = bytearray(ds.PixelData)
                # the encapsulated frame: item tag + length + basic offset table item (8 bytes),
                # then the fragment: its RLE header of 64 bytes, then the high-byte segment
                start = fragment.index(b"\xfe\xff\x00\xe0", 8) + 8 + 64
                fragment[start + 1] = 0xF0  # a run's value: still decodes, now above 4095
                ds.PixelData = bytes(fragment)
        ds.save_as(path)
    return folder


def test_bad_voxels_are_rejected_or_repaired_with_a_warning(tmp_path: Path) -> None:
    dicom = tmp_path / "dicom"
    _twelve_bit(dicom / "good", 1)
    _twelve_bit(dicom / "overflow", 2, overflow=True)
    _twelve_bit(dicom / "damaged-rle", 3, rle=True)
    _, paths = write_series(dicom / "nan-slope", phantom(4), seed=4)
    ds = pydicom.dcmread(paths[2])
    ds.RescaleSlope = "NaN"
    ds.save_as(paths[2])
    result = prepare(dicom, tmp_path / "c1", SMALL, progress=False)
    reasons = {r.path.split("/")[0]: (r.reason, r.path) for r in result.rejections}
    assert len(result.rows) == 1
    assert reasons["overflow"][0] == "out-of-range-voxels"
    assert reasons["damaged-rle"][0] == "out-of-range-voxels"
    assert reasons["nan-slope"] == ("non-finite-voxels", paths[2].relative_to(dicom).as_posix())

    volumes = tmp_path / "nifti"
    volumes.mkdir()
    body = np.where(phantom(4, 32) > -500, 40.0, -1000.0).astype(np.float32).transpose(2, 1, 0)
    corners, infinite, constant = body.copy(), body.copy(), np.zeros_like(body)
    corners[:3, :3, :] = np.nan  # outside the field of view: repaired to air
    infinite[5, 5, 1] = np.inf
    for name, volume in {"corners": corners, "inf": infinite, "blank": constant}.items():
        nib.save(nib.Nifti1Image(volume, np.eye(4)), volumes / f"{name}.nii.gz")
    result = prepare(volumes, tmp_path / "c2", SMALL, progress=False)
    assert {r.path: r.reason for r in result.rejections} == {
        "inf.nii.gz": "non-finite-voxels",
        "blank.nii.gz": "blank-slices",
    }
    (row,) = result.rows
    # The phantom's lung mask is flagged too (lung-mask-…): the repair is one warning among them.
    assert "non-finite-repaired" in row["warnings"].split(";")
    assert read_manifest(tmp_path / "c2")[0]["warnings"] == row["warnings"]

    images = tmp_path / "png" / "Normal" / "p1" / "s1"
    images.mkdir(parents=True)
    for i in range(3):  # a 16-bit export of stored values, not 8-bit display values
        Image.fromarray(np.full((16, 16), 1000 + i, dtype=np.uint16)).save(images / f"{i}.png")
    result = prepare(tmp_path / "png", tmp_path / "c3", SMALL, progress=False)
    assert [r.reason for r in result.rejections] == ["out-of-range-voxels"]


# --- one bad file, never the job's end ----------------------------------------------------


def test_a_reader_failure_is_that_files_rejection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    good = np.where(phantom(4, 16) > -500, 40, -1000).astype(np.int16).transpose(2, 1, 0)
    nib.save(nib.Nifti1Image(good, np.eye(4)), raw / "good.nii.gz")
    singular = nib.Nifti1Image(good, np.eye(4))
    header = singular.header
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = [0, 0, 0, 0]
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(good, None, header), raw / "singular.nii.gz")
    nib.save(nib.Nifti1Image(good.astype(np.complex64), np.eye(4)), raw / "complex.nii.gz")
    nib.save(nib.Nifti1Image(good.astype(np.float64), np.eye(4)), raw / "float64.nii.gz")
    nib.save(nib.Nifti1Image(good, np.eye(4)), raw / "surprise.nii.gz")
    real_loader = nifti._axial_loader

    def loader(image: nib.Nifti1Image, source: str):  # an error no rule foresaw, one file
        if source == "surprise.nii.gz":
            raise ZeroDivisionError("an unforeseen header value")
        return real_loader(image, source)

    monkeypatch.setattr(nifti, "_axial_loader", loader)
    result = prepare(raw, tmp_path / "cache", SMALL, progress=False)
    assert len(result.rows) == 2  # good and float64 (an unexpected but usable type)
    assert {r.path: r.reason for r in result.rejections} == {
        "singular.nii.gz": "inconsistent-geometry",
        "complex.nii.gz": "unsupported-pixel-type",
        "surprise.nii.gz": "reader-error",
    }
    report = inspect_input(raw, dump_hu=tmp_path / "hu")
    assert len(report["scans"]) == 2 and len(report["rejected"]) == 3


# --- one writer per cache -----------------------------------------------------------------

SLOW_PREPARE = (
    "import sys, time; import fedct.common.cache.prepare as p; convert = p.cache_slices; "
    "p.cache_slices = lambda *a, **k: (time.sleep(0.3), convert(*a, **k))[1]; "
    "from fedct.common.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _slow_prepare(site: Path, cache: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", SLOW_PREPARE, "prepare", "--input", str(site)]
    command += ["--out", str(cache), "--labels", str(site / "labels.csv"), "--size", "32"]
    command += ["--min-slices", "4", *extra]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(condition, process: subprocess.Popen[str], what: str, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"waited in vain for {what}"
        time.sleep(0.05)


def test_one_writer_per_cache(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    first = _slow_prepare(site, cache, "--workers", "1")
    try:
        lock = cache / LOCK_FILE
        _wait_for(lambda: lock.exists() and str(first.pid) in lock.read_text(), first, "lock")
        second = ["prepare", "--input", str(site), "--out", str(cache), "--size", "32",
                  "--labels", str(site / "labels.csv"), "--min-slices", "4"]  # fmt: skip
        assert main(second) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"pid {first.pid}" in last and "one writer per cache" in last
        with pytest.raises(
            SiteConfigError, match=f"being written by fedct prepare .pid {first.pid}"
        ):
            check_site_cache(cache, {})
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    rows = read_manifest(cache)
    assert {r["scan_id"] for r in rows} == {p.stem for p in (cache / "scans").glob("*.npy")}
    assert set(ScanIndex(cache).records) == {r["scan_id"] for r in rows} and len(rows) == 6
    assert lock.read_text() == ""  # the holder's name goes with it
    assert check_site_cache(cache, {}) == 6


# --- splits that never move ---------------------------------------------------------------


def test_splits_never_move_and_a_scan_no_longer_labelled_leaves(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = PrepareConfig(size=16, min_slices=4, workers=1, splits=(0.34, 0.33, 0.33), seed=3)
    patients = sorted(p for p in site.iterdir() if p.is_dir())
    export = tmp_path / "first-export"  # half the patients, then the whole site
    for patient in patients[: len(patients) // 2]:
        shutil.copytree(patient, export / patient.name)
    cache = tmp_path / "cache"
    first = prepare(export, cache, cfg, labels=site / "labels.csv", progress=False)
    before = {r["scan_id"]: r["split"] for r in first.rows}
    both = prepare(site, cache, cfg, labels=site / "labels.csv", progress=False)
    after = {r["scan_id"]: r["split"] for r in both.rows}
    assert len(after) > len(before) and both.moved == 0
    assert {k: after[k] for k in before} == before
    assert len(set(after.values())) > 1

    header, *lines = (site / "labels.csv").read_text().splitlines()
    dropped = lines[0].split(",")[0]  # a patient taken out of labels.csv
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join([header, *[x for x in lines if not x.startswith(dropped)]]) + "\n")
    capsys.readouterr()
    third = prepare(site, cache, cfg, labels=labels, progress=False)
    gone = sum(line.startswith(dropped) for line in lines)
    assert third.removed == {"missing-label": gone}
    assert f"removed {gone} scan" in capsys.readouterr().err
    assert len(read_manifest(cache)) == len(after) - gone
    assert len(list((cache / "scans").glob("*.npy"))) == len(after) - gone
    assert {r["scan_id"]: r["split"] for r in third.rows}.items() <= after.items()

    with pytest.raises(CacheError, match="would move patients between splits"):
        prepare(site, cache, PrepareConfig(size=16, min_slices=4, workers=1, seed=4),
                labels=labels, progress=False)  # fmt: skip


# --- unbounded input, a full disk ---------------------------------------------------------


def test_sizes_are_bounded_before_anything_is_written_and_a_full_disk_is_named(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    base = ["prepare", "--input", str(site), "--out", str(cache), "--workers", "1",
            "--labels", str(site / "labels.csv"), "--min-slices", "4"]  # fmt: skip
    assert main([*base, "--size", "100000"]) == 2
    assert "--size 100000: must be 16 to 1024" in capsys.readouterr().err
    assert not cache.exists()
    # A first attempt that wrote settings but no scan never binds the next one.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prepare", "--input", str(empty), "--out", str(cache), "--size", "48"]) == 1
    assert read_settings(cache)["size"] == 48
    assert main([*base, "--size", "32"]) == 0
    assert read_settings(cache)["size"] == 32

    disk = tmp_path / "small-disk"
    disk.mkdir()
    out = ["--out", str(disk / "cache"), "--size", "64"]
    if _can_mount():  # a real full disk: a 24 kB tmpfs in a mount namespace of its own
        fedct = [sys.executable, "-m", "fedct.common.cli", *base[:3], *base[5:], *out]
        script = f'mount -t tmpfs -o size=24k fedct-test {disk} && exec "$@"'
        full = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *fedct],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
        code, err = full.returncode, full.stderr
    else:  # no namespaces here: the disk fills up as the first scan is written
        monkeypatch.setattr(store, "open", _full_disk_open, raising=False)
        code, err = main([*base[:3], *base[5:], *out]), capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err, err
    assert f"{disk}/cache/scans/" in last and "No space left on device" in last, last
    assert "is full" in last


def _can_mount() -> bool:
    probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /mnt"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def _full_disk_open(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
    handle = open(path, mode, *args, **kwargs)  # noqa: SIM115
    if "w" in mode and "/scans/" in str(path):
        handle.close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return handle


# --- SIGTERM and SIGHUP stop a multi-worker prepare (and the demo) --------------------------


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().split(") ")[1].split()[
                1
            ] == str(pid):
                found.add(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_stops_a_multi_worker_prepare_in_one_line(
    site: Path, tmp_path: Path, signum: int
) -> None:
    cache = tmp_path / "cache"
    process = _slow_prepare(site, cache, "--workers", "2")
    try:
        index = cache / "scan_index.jsonl"
        _wait_for(lambda: index.exists() and index.read_text().count("\n") >= 1, process, "a scan")
        workers = _children(process.pid)
        assert len(workers) >= 2
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and "Error" not in err, err  # progress bars, then one line
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted ({name}): ") and "run the same command again" in last
    time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker outlived it"
    assert not list((cache / "scans").glob(".*.tmp"))


def test_the_demo_stopped_while_preparing_says_so_in_one_line(tmp_path: Path) -> None:
    """SIGTERM while the demo prepares its caches.  The demo runs in a process of its own: a
    real signal sent to the test runner itself, a process that has loaded torch, OpenVINO,
    ONNX Runtime and gRPC over hundreds of tests, once killed it with a SIGSEGV the kernel
    raised while delivering the signal (si_code SI_KERNEL, seen in its core dump)."""
    (tmp_path / "sites" / "hospital-a").mkdir(parents=True)
    config = tmp_path / "demo.toml"
    config.write_text(
        '[synth]\nout = "x"\nprofile = "tiny"\nseed = 0\nsites = 1\n'
        f'[prepare]\nout = "{tmp_path / "cache"}"\nsize = 32\nfraction = 0.5\n'
        'normalize = "lung-window"\n[run]\n'
    )
    script = f"""
import os, signal, sys, time
from pathlib import Path
from fedct.common.cli import main
from fedct.server.launch import demo
demo.ensure_cohort = lambda synth: Path({str(tmp_path)!r})
demo.prepare = lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5)
sys.exit(main(["demo", "--config", {str(config)!r}]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 143, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("demo interrupted (SIGTERM)"), done.stderr
