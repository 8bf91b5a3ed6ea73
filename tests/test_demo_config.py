"""The demo's config sections: the cohort it reuses or refuses, and the simulation resources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedct.server.launch.demo import DemoError, ensure_cohort, resources
from fedct.server.launch.simulate import Resources, SimulateError, flwr_run_command


def test_cohort_is_written_once_and_reused_only_with_the_same_size(tmp_path: Path) -> None:
    synth = {"out": str(tmp_path / "raw"), "profile": "tiny", "sites": 1, "seed": 3}
    out = ensure_cohort({**synth, "scans-per-site": 2})
    record = json.loads((out / "cohort.json").read_text())
    assert record["scans_per_site"] == 2
    assert record["sites"]["hospital-a"]["studies"] == 2

    written = (out / "cohort.json").stat().st_mtime_ns
    assert ensure_cohort({**synth, "scans-per-site": 2}) == out
    assert (out / "cohort.json").stat().st_mtime_ns == written

    with pytest.raises(DemoError, match="cohort.json"):
        ensure_cohort({**synth, "scans-per-site": 3})
    assert json.loads((out / "cohort.json").read_text()) == record


def test_simulation_section_sets_the_ray_cpus(tmp_path: Path) -> None:
    assert resources({}) == Resources(client_cpus=1, client_gpus=0.0, cpus=None)
    chosen = resources({"simulation": {"client-cpus": 1, "cpus": 3}})
    assert chosen == Resources(client_cpus=1, client_gpus=0.0, cpus=3)
    assert chosen.sites_at_once(3) == 3
    assert Resources(client_cpus=2, cpus=3).sites_at_once(3) == 1

    command = flwr_run_command(tmp_path, tmp_path / "run.toml", 3, chosen)
    federation = command[command.index("--federation-config") + 1]
    assert "num-supernodes=3" in federation
    assert "init-args-num-cpus=3" in federation
    default = flwr_run_command(tmp_path, tmp_path / "run.toml", 3, Resources())
    assert "init-args-num-cpus" not in default[default.index("--federation-config") + 1]

    with pytest.raises(SimulateError, match="cpus"):
        Resources(client_cpus=2, cpus=1)
