"""Faults around a run (issue 23): a damaged cache is caught before any round and named by
site and file, a run that trained no round fails, each card records the fingerprint of every
site cache the coordinator sees and a resume on a changed cache warns, ``evaluate`` checks
scans against the index, and SIGTERM stops a real ``fedct simulate`` and every process it
started."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from fedct.common.cache.scan_index import ScanIndex, fingerprint
from fedct.common.cache.store import read_manifest, write_manifest
from fedct.common.cli import main
from fedct.common.federation.site_error import fixed_reason
from fedct.server.app import main as server_main
from fedct.server.launch.preflight import PreflightError, check_before_launch
from fedct.server.launch.simulate import write_run_config
from fedct.server.roster import MAX_REASON, one_line
from fedct.server.run_lock import RunLock
from tests.test_evaluate import make_run

ROOT = Path(__file__).parents[1]


def _indexed_copy(source: Path, target: Path) -> Path:
    """A copy of a test cache whose scans the scan index records, as prepare's are."""
    shutil.copytree(source, target)
    index = ScanIndex(target)
    for row in read_manifest(target):
        index.adopt(row["scan_id"])
    return target


def _flip_a_byte(cache: Path) -> Path:
    """The same size, other pixels: only the sha256 tells."""
    scan = sorted((cache / "scans").glob("*.npy"))[0]
    blob = bytearray(scan.read_bytes())
    blob[-1] ^= 0xFF
    scan.write_bytes(bytes(blob))
    return scan


def test_a_damaged_cache_is_named_by_site_and_file_and_a_run_that_trains_nothing_fails(
    site_caches: dict[str, Path],
    run_config: dict[str, Any],
    tmp_path: Path,
    task_identity: None,
    make_grid: Any,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = _indexed_copy(site_caches["site_a"], tmp_path / "hospital-a")
    b = _indexed_copy(site_caches["site_b"], tmp_path / "hospital-b")
    damaged = _flip_a_byte(a)
    config = {**run_config, "site-caches": f"{a},{b}", "num-server-rounds": 1}
    config["cross-site"] = False
    with pytest.raises(PreflightError, match=f"site-caches: {damaged}: damaged cached scan: sha"):
        check_before_launch(config)

    # Started anyway (another launcher), each site refuses before it trains, by name.
    _flip_a_byte(b)
    nodes = [{"data-path": str(cache), "site": cache.name} for cache in (a, b)]
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    with pytest.raises(RuntimeError, match=r"no round trained: in round 1 every site failed "):
        server_main(make_grid(nodes, config), context)
    run_dir = Path(config["run-dir"])
    card = json.loads((run_dir / "round_001.card.json").read_text())
    failures = card["train"]["failures"]
    assert sorted(f["site"] for f in failures) == ["hospital-a", "hospital-b"]
    for failure in failures:
        # The coordinator reads a fixed reason; the site's own log names the damaged file.
        assert failure["reason"] == f"site '{failure['site']}': " + fixed_reason("site")
    logged = [r.getMessage() for r in caplog.records if "sha256 differs" in r.getMessage()]
    assert logged and all("data-path/scans/" in m and str(tmp_path) not in m for m in logged)
    assert card["site_caches"] == {"hospital-a": fingerprint(a), "hospital-b": fingerprint(b)}

    # evaluate scores only scans whose bytes the index names.
    model = make_run(tmp_path / "model", run_config={"image-size": 32})
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model), "--data", str(a), "--out", str(out)]) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert damaged.name in last and "sha256 differs" in last

    # Repaired, then one cache's labels change: resuming says which cache changed.
    _flip_a_byte(a), _flip_a_byte(b)
    rows = read_manifest(a)
    rows[0]["split"] = "test" if rows[0]["split"] != "test" else "train"
    write_manifest(a, rows)
    warnings = check_before_launch({**config, "resume-from": str(run_dir)})
    assert len(warnings) == 1 and "changed since round 1 of this run: hospital-a (" in warnings[0]
    assert "hospital-b" not in warnings[0]


def _flower_processes(home: Path) -> list[str]:
    """Command lines of the processes running with this Flower home in their environment:
    ``flwr run`` and what it started (the SuperLink, SuperExec, the simulation's ServerApp
    process, Ray's daemons and workers)."""
    marker = f"FLWR_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


def test_sigterm_stops_simulate_and_every_process_it_started(
    run_config: dict[str, Any], tmp_path: Path
) -> None:
    keys = ("backbone", "image-size", "batch-size", "lr", "device", "site-caches")
    overrides = {k: run_config[k] for k in keys} | {"num-server-rounds": 30}
    overrides["external-caches"] = run_config["external-caches"]
    run_dir, home = tmp_path / "run", tmp_path / "flower-home"
    overrides["run-dir"] = str(run_dir)
    config = write_run_config(tmp_path / "sim.toml", overrides)
    command = [sys.executable, "-m", "fedct.common.cli", "simulate", "--config", str(config)]
    command += ["--cpus", "2", "--flwr-home", str(home)]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    started = ("flower-superlink", "flower-superexec", "flwr-simulation", "gcs_server")
    try:
        deadline = time.monotonic() + 240
        while not all(any(p in c for c in _flower_processes(home)) for p in started):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"not all started: {_flower_processes(home)}"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGTERM): every process of the run is stopped"), err
    if (run_dir / "latest.json").exists():  # round 0 was checkpointed before the signal
        assert f"resume with --set resume-from={run_dir}" in last
    assert _flower_processes(home) == []
    assert RunLock(run_dir, "").in_use() is None  # a resume is not refused as "in use"


def test_a_failure_reason_is_kept_as_one_line() -> None:
    """Ray and Flower wrap a site's exception in a traceback that names the site's paths;
    the card keeps the exception's message."""
    wrapped = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() "
        '(pid=4242, ip=10.0.0.5)\n  File "/srv/hospital/venv/flwr/ray_actor.py", line 65, in run'
        "\n    raise ClientAppException(str(ex)) from ex\nflwr.clientapp.client_app."
        "ClientAppException: \nException ClientAppException occurred. Message: "
        "cannot reshape array of size 10 into shape (3,32,32)'>"
    )
    assert one_line(wrapped) == "cannot reshape array of size 10 into shape (3,32,32)"
    named = "site 'hospital-a': data-path/scans/s1.npy: damaged cached scan: 3 bytes"
    assert one_line(named) == named
    assert len(one_line("x" * 5000)) == MAX_REASON
