"""Secure aggregation on Flower's deployment engine: three hospitals on 127.0.0.1, each a
SuperNode started by ``fedct site supernode`` with its own approvals (this checkout's bundle
approved by hash) and its own SuperExec (process isolation: every message runs in a new
ClientApp process, so the protocol's state lives only in the SuperNode's ``context.state``),
a plaintext SuperLink with the ServerApp's SuperExec.  Two rounds with secure aggregation
complete, every site's audit log shows each stage's reply and nothing blocked.  Every process
is stopped by its process group."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_procs import (
    BIN,
    ROOT,
    Processes,
    fedct,
    flwr,
    host_env,
    node_statuses,
    superexec_command,
    superlink_command,
    supernode_command,
    wait_for_port,
)
from plaintext_federation import wait_until
from secagg_grid import write_sites

from fedct.client import commands as client_commands
from fedct.common.federation.messages import SECAGG_STAGES
from fedct.server.launch.simulate import free_port, write_run_config

SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    running = Processes(tmp_path_factory.mktemp("logs"))
    try:
        yield running
    finally:
        running.stop_all()


def test_two_secure_rounds_complete_on_the_deployment_engine(
    tmp_path: Path, processes: Processes, site_caches: dict[str, Path]
) -> None:
    caches = write_sites(tmp_path / "caches", SITES)
    port = free_port()
    operator = host_env(tmp_path / "coordinator" / "flwr-home")
    (tmp_path / "coordinator" / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "fedct"\n\n[superlink.fedct]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    superlink = processes.start(
        "superlink", superlink_command(port, tmp_path / "state.db", "--insecure"), operator
    )
    wait_for_port(port, superlink)
    processes.start("superexec-serverapp", superexec_command(port, "--insecure"), operator)
    for site in SITES:
        host = tmp_path / site
        approvals, audit = host / "approvals.json", host / "fedct-audit.jsonl"
        files = ("--approvals", str(approvals), "--audit-log", str(audit))
        assert fedct(client_commands.site, "approve", str(ROOT), *files) == 0
        runtime = free_port()
        node_config = f'data-path="{caches[site]}" site="{site}" device="cpu" audit-log="{audit}"'
        launcher = [str(BIN / "fedct"), "site", "supernode", "--approvals", str(approvals), "--"]
        command = supernode_command(
            f"127.0.0.1:{port}", runtime, "--insecure", node_config=node_config, launcher=launcher
        )
        env = host_env(host / "flwr-home")
        processes.start(f"supernode-{site}", command, env)
        processes.start(f"superexec-{site}", superexec_command(runtime, "--insecure"), env)
    wait_until(lambda: node_statuses(operator) == ["online"] * 3, "three SuperNodes online", 120)

    run_dir = tmp_path / "runs" / "secure"
    run_config = write_run_config(
        tmp_path / "secure.toml",
        {
            "num-server-rounds": 2,
            "backbone": "test_efficientnet",
            "image-size": 32,
            "batch-size": 4,
            "lr": 0.01,
            "device": "cpu",
            "external-caches": f"ext={site_caches['external']}",
            "run-dir": str(run_dir),
            "node-wait-timeout": 120.0,
            "round-timeout": 600.0,
            "cross-site": False,
            "min-train-nodes": 3,
            "min-available-nodes": 3,
            "secure-aggregation": True,
            "secagg-stage-timeout": 300.0,
        },
    )
    done = flwr(operator, "run", str(ROOT), "fedct", "--run-config", str(run_config),
                "--format", "json", timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    card = run_dir / "round_002.card.json"
    wait_until(card.exists, "round 2 checkpointed", 900, poll=2)

    for server_round in (1, 2):
        card = json.loads((run_dir / f"round_{server_round:03d}.card.json").read_text())
        for phase in (card["train"], card["federated_evaluation"]):
            summary = phase["secure_aggregation"]
            assert (summary["survivors"], summary["failed"]) == (3, None), phase["failures"]
        assert card["train"]["sites"]["trained"] == list(SITES)
        assert card["operating_point"] is not None
    for site in SITES:
        lines = [
            json.loads(x) for x in (tmp_path / site / "fedct-audit.jsonl").read_text().splitlines()
        ]
        replies = [line for line in lines if "message_type" in line]
        kinds = {line["message_type"] for line in replies}
        assert kinds == {
            f"{phase}.{stage}" for phase in ("train", "evaluate") for stage in SECAGG_STAGES
        }
        assert not any(line.get("blocked") or line.get("error") for line in replies), site
