"""Fault injection on the deployment engine: a plaintext SuperLink on 127.0.0.1 with its
state in a database (process isolation, its SuperExec beside it) and two hospitals, each a
SuperNode with its own SuperExec and cache, running the tiny backbone (tests/deployment.py).

The tests run in order on one federation: a SuperNode killed mid-run (the card names the
site, the restarted node rejoins) while a second coordinator on the same run directory is
refused; the coordinator killed mid-round with a torn ``metrics.jsonl`` (the resume repairs
it and takes the dead coordinator's lock over); a dead ClientApp behind a live SuperNode
(the round ends by the straggler deadline, not ``round-timeout``); and the SuperLink killed
mid-round (the coordinator stops after ``superlink-grace`` instead of waiting to write
again).
Every process is stopped by its process group, even when a test fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedct.server.run_lock import LOCK_FILE, pid_alive
from tests.deploy_procs import Processes
from tests.plaintext_federation import PlaintextFederation, wait_until

SITES = ("hospital-a", "hospital-b")
RUN_SECONDS = 300  # a guard against hanging; a round here takes well under a minute
# Both sites must be connected before a round starts; one successful reply is enough.
SMALL = {"min-available-nodes": 2, "min-train-nodes": 1, "min-train-replies": 1}


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, site_caches: dict[str, Path]
) -> Iterator[PlaintextFederation]:
    processes = Processes(tmp_path_factory.mktemp("logs"))
    caches = dict(zip(SITES, (site_caches["site_a"], site_caches["site_b"]), strict=True))
    try:
        yield PlaintextFederation.launch(
            tmp_path_factory.mktemp("faults"), processes, caches, site_caches["external"]
        )
    finally:
        processes.stop_all()


def _card(run_dir: Path, server_round: int) -> dict[str, Any]:
    return json.loads((run_dir / f"round_{server_round:03d}.card.json").read_text())


def _rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").open()]


def _named(card: dict[str, Any], group: str) -> set[str]:
    entries = card["train"]["sites"][group]
    return {e if isinstance(e, str) else e["site"] for e in entries}


def test_a_supernode_killed_mid_run_is_named_and_rejoins_and_a_second_coordinator_is_refused(
    federation: PlaintextFederation,
) -> None:
    run_dir = federation.run_dir("killed-node")
    first = federation.submit("killed-node", **SMALL, **{"num-server-rounds": 3})
    federation.reached("killed-node", 1, RUN_SECONDS)
    federation.kill("supernode-hospital-b")
    federation.start("supernode-hospital-b")  # the hospital restarts it; its SuperExec stays

    resume = {"num-server-rounds": 3, "resume-from": str(run_dir)}
    second = federation.wait(federation.submit("second", **SMALL, **resume), RUN_SECONDS)
    assert second["status"] == "finished:failed", second
    assert f"is in use by Flower run {first} (pid" in second["status-details"]

    done = federation.finished(first, "killed-node", 3, RUN_SECONDS)
    assert done["status"] == "finished:completed", federation.log(first)
    assert _rounds(run_dir) == [0, 1, 2, 3]
    assert json.loads((run_dir / "run_config.json").read_text())["first_round"] == 0
    assert _named(_card(run_dir, 1), "trained") == set(SITES)
    lost = _named(_card(run_dir, 2), "failed") | _named(_card(run_dir, 2), "not_sampled")
    assert "hospital-b" in lost, _card(run_dir, 2)["train"]["sites"]
    assert _named(_card(run_dir, 3), "trained") == set(SITES)  # the restarted node rejoined


def test_a_coordinator_killed_mid_round_resumes_repairing_a_torn_metrics_line(
    federation: PlaintextFederation,
) -> None:
    run_dir = federation.run_dir("killed-coordinator")
    config = {**SMALL, "num-server-rounds": 1}
    killed = federation.submit("killed-coordinator", **config)
    federation.reached("killed-coordinator", 0, RUN_SECONDS)
    holder = json.loads((run_dir / LOCK_FILE).read_text())
    federation.kill("coordinator")  # the ServerApps' SuperExec, and with it the ServerApp
    wait_until(lambda: not pid_alive(holder["pid"]), "the ServerApp to die", 30)
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write('{"round": 1, "time": "2026-')  # it died while appending round 1's line

    federation.start("coordinator")
    run = federation.submit("killed-coordinator-resumed", **config, **{"resume-from": str(run_dir)})
    done = federation.finished(run, "killed-coordinator", 1, RUN_SECONDS)
    log = federation.log(run)
    assert done["status"] == "finished:completed", log
    assert _rounds(run_dir) == [0, 1]
    assert "its last line was cut short" in log
    assert f"taking over the lock of Flower run {killed}" in log and "no longer exists" in log
    for server_round in (0, 1):
        assert _card(run_dir, server_round)["round"] == server_round


def test_a_dead_clientapp_behind_a_live_supernode_costs_only_the_straggler_deadline(
    federation: PlaintextFederation,
) -> None:
    """With round-timeout = 900 s each phase would wait 900 s for the dead site; the run
    ends long before the test gives up on it."""
    run_dir = federation.run_dir("dead-clientapp")
    config = {**SMALL, "num-server-rounds": 2, "straggler-factor": 2.0, "round-timeout": 900.0}
    run = federation.submit("dead-clientapp", **config)
    federation.reached("dead-clientapp", 1, RUN_SECONDS)  # hospital-b trained: its name is known
    federation.kill("superexec-hospital-b")  # its SuperNode stays online
    done = federation.finished(run, "dead-clientapp", 2, RUN_SECONDS)
    assert done["status"] == "finished:completed", federation.log(run)
    assert federation.online() == len(SITES)
    failed = _card(run_dir, 2)["train"]["sites"]["failed"]
    assert {f["site"] for f in failed} == {"hospital-b"}, failed
    assert all("straggler deadline" in f["reason"] for f in failed), failed
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[2])
    assert line["failed_sites"] == ["hospital-b"]


def test_a_coordinator_that_loses_its_superlink_stops_within_the_grace_period(
    federation: PlaintextFederation,
) -> None:
    """Before, the ServerApp outlived its SuperLink and, once a SuperLink was back on the same
    database, went on writing beside the coordinator started to resume it.  (Last: the
    federation is not started again.)"""
    run_dir = federation.run_dir("lost-superlink")
    federation.submit("lost-superlink", **SMALL, **{"num-server-rounds": 1, "superlink-grace": 5.0})
    federation.reached("lost-superlink", 0, RUN_SECONDS)
    holder = json.loads((run_dir / LOCK_FILE).read_text())
    federation.kill("superlink")
    # The ServerApp gives up after the grace period, lets go of the run directory and exits.
    wait_until(lambda: not (run_dir / LOCK_FILE).exists(), "the coordinator to stop", 120)
    wait_until(lambda: not pid_alive(holder["pid"]), "the ServerApp to exit", 60)
    assert _rounds(run_dir) == [0] and not (run_dir / "round_001.safetensors").exists()
    assert json.loads((run_dir / "latest.json").read_text())["round"] == 0
