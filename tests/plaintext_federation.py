"""A plaintext deployment on 127.0.0.1 whose parts can be killed and started again by name,
for the fault-injection tests (tests/test_faults_deployment.py) and bench/straggler.py: a
SuperLink with its state in a database and its SuperExec, and per site a SuperNode with its
own SuperExec and cache (processes from tests/deploy_procs.py).  Runs are submitted with
``flwr run`` and followed through the run directory's files and ``flwr ls``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedct.server.launch.simulate import free_port, write_run_config
from fedct.server.run_lock import LOCK_FILE
from tests.deploy_procs import (
    ROOT,
    Processes,
    flwr,
    host_env,
    node_statuses,
    superexec_command,
    superlink_command,
    supernode_command,
    wait_for_port,
)

CONNECTION = "fedct"  # the operator's connection, as tests/deploy_procs.py names it


def wait_until(condition: Callable[[], Any], what: str, timeout: float, poll: float = 0.5) -> Any:
    """``condition()``'s first truthy value, polled; AssertionError naming ``what`` after
    ``timeout`` seconds (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        if value := condition():
            return value
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(poll)


@dataclass
class PlaintextFederation:
    """A running deployment on 127.0.0.1: a plaintext SuperLink with its state in
    ``root/state.db`` and its SuperExec (``coordinator``), and per site a SuperNode with its
    own SuperExec and cache; every part can be killed and started again by name."""

    root: Path
    processes: Processes
    env: dict[str, str]  # the operator's: FLWR_HOME with the connection CONNECTION
    port: int
    external: Path
    caches: dict[str, Path]  # site name → cache
    runtime_ports: dict[str, int] = field(default_factory=dict)
    parts: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def launch(
        cls, root: Path, processes: Processes, caches: dict[str, Path], external: Path
    ) -> PlaintextFederation:
        """Start everything and wait until every site's SuperNode is online."""
        port = free_port()
        env = host_env(root / "coordinator" / "flwr-home")
        (root / "coordinator" / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        federation = cls(root, processes, env, port, external, caches)
        federation.start("superlink")
        federation.start("coordinator")
        for site in caches:
            federation.runtime_ports[site] = free_port()
            federation.start(f"supernode-{site}")
            federation.start(f"superexec-{site}")
        wait_until(lambda: federation.online() == len(caches), "the SuperNodes online", 90, poll=2)
        return federation

    def start(self, name: str) -> None:
        """(Re)start ``superlink``, ``coordinator`` (the ServerApps' SuperExec), or a site's
        ``supernode-SITE`` / ``superexec-SITE`` (a SuperNode on its old runtime port, so its
        SuperExec finds it again)."""
        kind, _, site = name.partition("-")
        if name == "superlink":
            command = superlink_command(self.port, self.root / "state.db", "--insecure")
        elif name == "coordinator":
            command = superexec_command(self.port, "--insecure")
        elif kind == "supernode":
            node_config = f'data-path="{self.caches[site]}" site="{site}" device="cpu"'
            command = supernode_command(
                f"127.0.0.1:{self.port}",
                self.runtime_ports[site],
                "--insecure",
                node_config=node_config,
            )
        else:
            command = superexec_command(self.runtime_ports[site], "--insecure")
        home = self.root / (site or "coordinator") / "flwr-home"
        self.parts[name] = self.processes.start(name, command, host_env(home))
        if name == "superlink":
            wait_for_port(self.port, self.parts[name])

    def kill(self, name: str) -> None:
        """SIGKILL a part (its process group)."""
        Processes.kill(self.parts.pop(name))

    def online(self) -> int:
        return node_statuses(self.env).count("online")

    def run_config(self, name: str, **keys: Any) -> Path:
        """A run-config file for a tiny run into ``root/runs/NAME`` (``keys`` override)."""
        return write_run_config(
            self.root / f"{name}.toml",
            {
                "backbone": "test_efficientnet",
                "image-size": 32,
                "batch-size": 4,
                "lr": 0.01,
                "device": "cpu",
                "external-caches": f"ext={self.external}",
                "run-dir": str(self.run_dir(name)),
                "node-wait-timeout": 120.0,
                "cross-site": False,
                **keys,
            },
        )

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def submit(self, name: str, **keys: Any) -> int:
        """Start the run ``name`` (:meth:`run_config`) with ``flwr run``; its Flower run id."""
        config = str(self.run_config(name, **keys))
        done = flwr(self.env, "run", str(ROOT), CONNECTION, "--run-config", config,
                    "--format", "json", timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return int(json.loads(done.stdout)["run-id"])

    def info(self, run_id: int) -> dict[str, Any]:
        """The run as ``flwr ls --run-id`` reports it (``status``, ``status-details``, ...)."""
        listed = flwr(self.env, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        (run,) = json.loads(listed.stdout)["runs"]
        return run

    def wait(self, run_id: int, timeout: float) -> dict[str, Any]:
        """The run once Flower has it finished (completed, failed or stopped)."""
        return wait_until(
            lambda: (info := self.info(run_id))["status"].startswith("finished") and info,
            f"run {run_id} to finish",
            timeout,
            poll=3.0,
        )

    def reached(self, name: str, server_round: int, timeout: float) -> None:
        """Wait until run ``name`` has checkpointed ``server_round``."""
        card = self.run_dir(name) / f"round_{server_round:03d}.card.json"
        wait_until(card.exists, card.name, timeout)

    def finished(self, run_id: int, name: str, rounds: int, timeout: float) -> dict[str, Any]:
        """The Flower status of run ``name`` once it has checkpointed round ``rounds`` and
        its coordinator has let go of the run directory (polling files, not ``flwr ls``)."""
        self.reached(name, rounds, timeout)
        lock = self.run_dir(name) / LOCK_FILE
        wait_until(lambda: not lock.exists(), f"{name} to end", timeout)
        return self.wait(run_id, 120)

    def log(self, run_id: int) -> str:
        shown = flwr(self.env, "log", str(run_id), CONNECTION, "--show")
        return shown.stdout + shown.stderr
