"""Damaged caches and bad site input: ``fedct prepare`` verifies what it reuses and resumes
after Ctrl-C; a damaged manifest or scan, and conflicting labels, are answered in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedct.common.cache.config import PrepareConfig
from fedct.common.cache.prepare import prepare
from fedct.common.cache.scan_index import INDEX_FILE, ScanIndex, verify_cache
from fedct.common.cache.store import CacheError, read_manifest, scan_path
from fedct.common.cli import main
from fedct.common.ingest.labels import LabelsError, LabelTable
from fedct.common.synth.cohort import synthesize
from tests.test_evaluate import make_run

ROOT = Path(__file__).resolve().parents[1]
TINY = PrepareConfig(size=32, min_slices=4, workers=1)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synthesize(out, "tiny", sites=1, scans_per_site=12, seed=11, progress=False)
    return next(p for p in (out / "sites").iterdir() if p.is_dir())


def _prepare(site: Path, cache: Path, cfg: PrepareConfig = TINY):
    return prepare(site, cache, cfg, labels=site / "labels.csv", progress=False)


def _scan_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "scans").glob("*.npy"))}


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_prepare_prepares_damaged_scans_again_and_says_so(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    first = _prepare(site, cache)
    whole = _scan_bytes(cache)
    half, empty, flipped = sorted((cache / "scans").glob("*.npy"))[:3]
    half.write_bytes(whole[half.name][: len(whole[half.name]) // 2])
    empty.write_bytes(b"")
    blob = bytearray(whole[flipped.name])
    blob[-1] ^= 0xFF  # same size, other pixels: only the checksum sees it
    flipped.write_bytes(bytes(blob))
    capsys.readouterr()

    again = _prepare(site, cache)
    assert "3 cached scans are damaged" in capsys.readouterr().err
    assert (again.regenerated, again.reused) == (3, len(first.rows) - 3)
    assert _scan_bytes(cache) == whole
    assert [r["scan_id"] for r in again.rows] == [r["scan_id"] for r in first.rows]

    # A cache written before scans were recorded: truncation is still recognised.
    (cache / INDEX_FILE).unlink()
    half.write_bytes(whole[half.name][:100])
    legacy = _prepare(site, cache)
    assert (legacy.regenerated, legacy.reused) == (1, len(first.rows) - 1)
    assert _scan_bytes(cache) == whole
    assert set(ScanIndex(cache).records) == {r["scan_id"] for r in first.rows}


def test_ctrl_c_stops_prepare_in_one_line_and_the_rerun_resumes(site: Path, tmp_path: Path) -> None:
    """A real Ctrl-C (SIGINT to the whole process group, workers included) while two workers
    convert scans slowed down to 0.4 s each."""
    cache = tmp_path / "cache"
    # A shell without job control starts background jobs with SIGINT ignored, which Python
    # then leaves ignored: the child restores what a terminal gives it.
    slow = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "import sys, time; import fedct.common.cache.prepare as p; convert = p.cache_slices; "
        "p.cache_slices = lambda *a, **k: (time.sleep(0.4), convert(*a, **k))[1]; "
        "from fedct.common.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", slow, "prepare", "--input", str(site), "--out", str(cache)]
    command += ["--labels", str(site / "labels.csv"), "--size", "32", "--min-slices", "4"]
    process = subprocess.Popen(
        [*command, "--workers", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        index = cache / INDEX_FILE
        while not (index.exists() and len(index.read_text().splitlines()) >= 2):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no scan was converted"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Error" not in err, err
    assert _last_line(err).startswith("interrupted (Ctrl-C): ")
    assert "run the same command again" in err
    assert not (cache / "manifest.csv").exists()
    assert not list((cache / "scans").glob(".*.tmp"))
    finished = set(ScanIndex(cache).records)

    resumed = _prepare(site, cache)
    assert resumed.reused >= len(finished) >= 2
    fresh = _prepare(site, tmp_path / "fresh")  # another salt, so other scan ids
    assert sorted(_scan_bytes(cache).values()) == sorted(_scan_bytes(tmp_path / "fresh").values())
    assert len(resumed.rows) == len(fresh.rows) == len(read_manifest(cache))


def test_conflicting_labels_are_an_error_listing_the_ids(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, first, second, *rest = (site / "labels.csv").read_text().splitlines()
    column = header.split(",").index("label")
    other = first.split(",")
    other[column] = "COVID-19" if other[column] != "COVID-19" else "Normal"
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join([header, first, second, first, ",".join(other), *rest]) + "\n")
    key = header.split(",")[1]  # study_uid, more specific than patient_id
    with pytest.raises(
        LabelsError, match=rf"1 ids have conflicting labels: {key} .*line 2.*line 5"
    ):
        LabelTable.load(labels)

    cache = tmp_path / "cache"
    argv = ["prepare", "--input", str(site), "--out", str(cache), "--labels", str(labels)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "labels.csv" in _last_line(err) and first.split(",")[1] in err
    assert "Traceback" not in err and not cache.exists()


def test_a_patient_with_studies_of_two_labels_is_no_conflict(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,study_uid,label\nP1,S1,Normal\nP1,S2,COVID-19\nP2,,CP\n")
    table = LabelTable.load(labels)

    def scan(patient: str, study: str) -> SimpleNamespace:
        return SimpleNamespace(series_key="x", study_key=study, source="x", patient_key=patient)

    assert [table.label_of(scan("P1", s)) for s in ("S1", "S2")] == ["Normal", "COVID-19"]
    assert table.label_of(scan("P1", "S3")) is None  # the patient alone does not say which
    assert table.label_of(scan("P2", "S9")) == "CP"


@pytest.fixture
def prepared(site: Path, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    _prepare(site, cache)
    return cache


def _evaluate(cache: Path, tmp_path: Path) -> int:
    model = make_run(tmp_path / "run", run_config={"image-size": 32})
    out = tmp_path / "eval"
    return main(["evaluate", "--model", str(model), "--data", str(cache), "--out", str(out)])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("random bytes", "not a CSV manifest (byte"),
        ("cut mid-file", "damaged or cut (3 rows where fedct prepare wrote 12"),
        ("zero-byte scan", "damaged cached scan: 0 bytes where"),
        ("half a scan", "damaged cached scan:"),
    ],
)
def test_a_damaged_cache_is_answered_in_one_line_and_nothing_is_written(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, message: str
) -> None:
    manifest = prepared / "manifest.csv"
    scan = sorted((prepared / "scans").glob("*.npy"))[0]
    if damage == "random bytes":
        manifest.write_bytes(np.random.default_rng(0).bytes(4000))
    elif damage == "cut mid-file":
        lines = manifest.read_text().splitlines(keepends=True)
        manifest.write_text("".join(lines[:4]))
    elif damage == "zero-byte scan":
        scan.write_bytes(b"")
    else:
        scan.write_bytes(scan.read_bytes()[: scan.stat().st_size // 2])
    with pytest.raises(CacheError, match=message.replace("(", r"\(")):
        verify_cache(prepared)
    capsys.readouterr()
    assert _evaluate(prepared, tmp_path) == 2
    err = capsys.readouterr().err
    assert message in _last_line(err) and "Traceback" not in err
    named = manifest if "scan" not in damage else scan_path(prepared, scan.stem)
    assert str(named) in " ".join(err.split())
    assert not (tmp_path / "eval").exists()
