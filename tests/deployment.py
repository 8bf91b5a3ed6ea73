"""Helpers for tests (and benchmarks) that run Flower's deployment engine on 127.0.0.1: the
processes they start, each host's environment, the ``flwr`` CLI, and the commands of a
SuperLink, a SuperNode and a SuperExec (on free ports: ``server.simulate.free_port``).

Every process starts in a session of its own and is stopped with its process group (SIGTERM,
then SIGKILL) by :meth:`Processes.stop_all`, which callers run in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.run_lock import LOCK_FILE
from server.simulate import free_port, write_run_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class Processes:
    """Processes started for a test, each the leader of its own process group."""

    logs: Path
    started: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as handle:
            process = subprocess.Popen(
                command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append((process, log))
        return process

    def log(self, process: subprocess.Popen[bytes]) -> str:
        return next(log for p, log in self.started if p is process).read_text(errors="replace")

    @staticmethod
    def stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """SIGTERM the process group (the process and the app processes it spawned), then
        SIGKILL whatever is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break  # the whole group is gone
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace)
        process.wait()

    @staticmethod
    def kill(process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process group at once: a crash, not a shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process, _ in reversed(self.started):
            self.stop(process)


def host_env(home: Path) -> dict[str, str]:
    """A host's environment: its own Flower home, this venv, no network calls, one thread."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }


def flwr(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode} before listening"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"nothing listens on {port} after {timeout} s")


def wait_until(condition: Callable[[], Any], what: str, timeout: float, poll: float = 0.5) -> Any:
    """``condition()``'s first truthy value, polled; AssertionError naming ``what`` after
    ``timeout`` seconds (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        if value := condition():
            return value
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(poll)


def node_statuses(env: dict[str, str], connection: str) -> list[str]:
    listed = flwr(env, "supernode", "ls", connection, "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return sorted(node["status"] for node in json.loads(listed.stdout)["nodes"])


def superlink_command(port: int, database: Path, *security: str) -> list[str]:
    """A SuperLink on 127.0.0.1:``port`` with its state in ``database`` and process
    isolation (its ServerApps run under a SuperExec beside it)."""
    return [
        str(BIN / "flower-superlink"),
        *security,
        "--isolation",
        "process",
        "--database",
        str(database),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def supernode_command(
    superlink_port: int, runtime_port: int, *security: str, node_config: str = ""
) -> list[str]:
    """A SuperNode with process isolation and its own runtime API on ``runtime_port``."""
    command = [
        str(BIN / "flower-supernode"),
        "--superlink",
        f"127.0.0.1:{superlink_port}",
        *security,
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]
    return [*command, "--node-config", node_config] if node_config else command


def superexec_command(runtime_port: int, *security: str) -> list[str]:
    """A SuperExec that runs the apps of the runtime API on ``runtime_port`` (a SuperLink's
    or a SuperNode's)."""
    address = ["--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    return [str(BIN / "flower-superexec"), *address, *security]


def submit(env: dict[str, str], connection: str, run_config: Path) -> int:
    """``flwr run`` without streaming: the new run's id."""
    done = flwr(env, "run", str(ROOT), connection, "--run-config", str(run_config),
                "--format", "json", timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return int(json.loads(done.stdout)["run-id"])


def run_info(env: dict[str, str], connection: str, run_id: int) -> dict[str, Any]:
    """The run as ``flwr ls --run-id`` reports it (``status``, ``status-details``, ...)."""
    listed = flwr(env, "ls", connection, "--run-id", str(run_id), "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    (run,) = json.loads(listed.stdout)["runs"]
    return run


def wait_for_run(
    env: dict[str, str], connection: str, run_id: int, timeout: float
) -> dict[str, Any]:
    """The run once it has finished (completed, failed or stopped)."""
    return wait_until(
        lambda: (
            (info := run_info(env, connection, run_id))["status"].startswith("finished") and info
        ),
        f"run {run_id} to finish",
        timeout,
        poll=3.0,
    )


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

    CONNECTION = "local-deployment"

    @classmethod
    def launch(
        cls, root: Path, processes: Processes, caches: dict[str, Path], external: Path
    ) -> PlaintextFederation:
        """Start everything and wait until every site's SuperNode is online."""
        port = free_port()
        env = host_env(root / "coordinator" / "flwr-home")
        (root / "coordinator" / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{cls.CONNECTION}"\n\n[superlink.{cls.CONNECTION}]\n'
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
                self.port, self.runtime_ports[site], "--insecure", node_config=node_config
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
        return node_statuses(self.env, self.CONNECTION).count("online")

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
        """Start the run ``name`` (:meth:`run_config`); its Flower run id."""
        return submit(self.env, self.CONNECTION, self.run_config(name, **keys))

    def wait(self, run_id: int, timeout: float) -> dict[str, Any]:
        return wait_for_run(self.env, self.CONNECTION, run_id, timeout)

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
        shown = flwr(self.env, "log", str(run_id), self.CONNECTION, "--show")
        return shown.stdout + shown.stderr
