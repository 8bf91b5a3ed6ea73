"""``fedct simulate`` answers bad input in one line before it starts Flower, and exits non-zero
with the reason as its last line when the run fails; a site problem is one line in the
site's log."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import instruction_message
from flwr.app import Context, MessageType, RecordDict

from fedct.client.app import app as hospital
from fedct.common.cli import main
from fedct.common.federation.site_error import fixed_reason
from fedct.common.run.directory import RunDirectory
from fedct.server.run_lock import RunLock


def _simulate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str, toml: str | None = None
) -> tuple[int, str]:
    args = ["simulate", *argv, "--flwr-home", str(tmp_path / "flwr-home")]
    if toml is not None:
        (tmp_path / "run.toml").write_text(toml)
        args += ["--config", str(tmp_path / "run.toml")]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 or "Traceback" not in err  # a failed run shows Flower's log excerpt
    return code, err.strip().splitlines()[-1]


@pytest.fixture
def sites(site_caches: dict[str, Path], tmp_path: Path) -> list[str]:
    """Tiny-run settings on the command line: the two site caches, one external set."""
    caches = f"{site_caches['site_a']},{site_caches['site_b']}"
    return [
        *("--set", f'site-caches="{caches}"'),
        *("--set", f'external-caches="ext={site_caches["external"]}"'),
        *("--set", 'backbone="test_efficientnet"', "--set", "image-size=32"),
        *("--set", f'run-dir="{tmp_path / "run"}"'),
    ]


@pytest.mark.parametrize(
    ("toml", "argv", "message"),
    [
        ("lrr = 0.1\n", [], "run.toml: unknown run-config key 'lrr' (did you mean 'lr'?)"),
        ("", ["--set", "num-server-round=2"], "--set num-server-round=2: unknown run-config key"),
        ('lr = "abc"\n', [], "lr = 'abc' must be a number (default 0.001)"),
        ("lr = 0.1\nseed = \n", [], "run.toml: not valid TOML (Invalid value (at line 2"),
        ('strategy = "fedsgd"\n', [], "strategy must be one of"),
    ],
)
def test_a_bad_run_config_is_one_line_and_nothing_starts(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sites: list[str],
    toml: str,
    argv: list[str],
    message: str,
) -> None:
    code, last = _simulate(tmp_path, capsys, *sites, *argv, toml=toml)
    assert code == 2 and message in last, last
    assert not (tmp_path / "run").exists() and not (tmp_path / "flwr-home").exists()


def test_a_missing_or_damaged_site_cache_is_one_line_and_nothing_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], site_caches: dict[str, Path]
) -> None:
    missing = tmp_path / "nowhere"
    args = ["--set", f'site-caches="{site_caches["site_a"]},{missing}"']
    args += ["--set", f'run-dir="{tmp_path / "run"}"', "--set", "image-size=32"]
    code, last = _simulate(tmp_path, capsys, *args)
    assert code == 2 and f"site-caches: {missing}: no cache.json" in last, last

    damaged = tmp_path / "damaged"
    shutil.copytree(site_caches["site_b"], damaged)
    scan = next((damaged / "scans").glob("*.npy"))
    scan.write_bytes(scan.read_bytes()[:50])
    args[1] = f'site-caches="{site_caches["site_a"]},{damaged}"'
    code, last = _simulate(tmp_path, capsys, *args)
    assert code == 2 and f"{scan}: damaged cached scan" in last, last
    assert not (tmp_path / "run").exists() and not (tmp_path / "flwr-home").exists()


def test_resume_from_a_damaged_or_busy_run_directory_is_refused_before_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sites: list[str]
) -> None:
    run_dir = tmp_path / "run"
    RunDirectory(run_dir).save_round(0, {}, {}, {"central": {}}, {})
    weights = run_dir / "round_000.safetensors"
    weights.write_bytes(weights.read_bytes() + b"x")
    resume = ["--set", f'resume-from="{run_dir}"']
    code, last = _simulate(tmp_path, capsys, *sites, *resume)
    assert code == 2 and "resume-from:" in last and "sha256 differs from its model card" in last

    code, last = _simulate(tmp_path, capsys, *sites)
    assert code == 2 and "run-dir:" in last and "already holds a run" in last

    weights.write_bytes(weights.read_bytes()[:-1])
    with RunLock(run_dir, "77"):
        code, last = _simulate(tmp_path, capsys, *sites, *resume)
    assert code == 2 and "is in use by Flower run 77" in last
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
        "latest.json",
        "metrics.jsonl",
        "round_000.card.json",
        "round_000.safetensors",
    ]


def test_a_run_that_fails_exits_1_with_flowers_reason_as_the_last_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sites: list[str]
) -> None:
    """The ServerApp fails (too few nodes ever connect): before, ``fedct simulate`` still
    exited 0 whenever ``flwr run`` did."""
    wait = ["--set", "min-available-nodes=3", "--set", "node-wait-timeout=1.0"]
    code, last = _simulate(tmp_path, capsys, *sites, *wait, "--cpus", "2")
    assert code == 1
    assert "the run ended finished:failed: Simulation failed with exception:" in last, last
    assert "only 2 of 3 nodes connected after 1 s" in last


def test_a_site_problem_is_one_line_in_the_sites_log_and_names_the_site(
    tmp_path: Path, run_config: dict[str, Any], task_identity: None, caplog: Any
) -> None:
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"data-path": str(tmp_path / "missing"), "site": "hospital-x"},
        state=RecordDict(),
        run_config=run_config,
    )
    message = instruction_message(run_config, MessageType.TRAIN)
    with caplog.at_level(logging.DEBUG):
        reply = hospital(message, context)
    assert reply.has_error()
    # The coordinator is told the category in fixed words, the site's log has the details.
    assert reply.error.reason == "site 'hospital-x': " + fixed_reason("site")
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    (record,) = [r for r in records if "no manifest.csv" in r.getMessage()]
    assert not record.exc_info and "hospital-x" in record.getMessage()
    assert json.dumps(record.getMessage()).count("\\n") == 0
    assert not (tmp_path / "missing").exists()  # the guard never creates a site's cache
