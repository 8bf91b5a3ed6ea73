"""Processes of a deployment on 127.0.0.1, for the deployment tests: each host with its own
Flower home and key material (``fedct certs``), each process the leader of its own process
group, stopped with its group (SIGTERM, then SIGKILL) even when a test fails."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedct.common import commands
from fedct.common.cli import Command
from fedct.server.launch.simulate import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def fedct(command: Command, *argv: str) -> int:
    """``fedct COMMAND ARGV`` in this process."""
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(list(argv)))


def fedct_certs(*argv: str) -> int:
    return fedct(commands.certs, *argv)


@dataclass
class Processes:
    """Processes started for the test, each the leader of its own process group."""

    logs: Path
    started: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as handle:  # a process started again adds to its log
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


def node_statuses(env: dict[str, str]) -> list[str]:
    """The statuses of the registered SuperNodes, as the operator (connection ``fedct``) sees."""
    listed = flwr(env, "supernode", "ls", "fedct", "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return sorted(node["status"] for node in json.loads(listed.stdout)["nodes"])


def unpack_app(content: bytes, folder: Path) -> Path:
    """A bundle's files as an app directory ``folder/fedct``, which ``flwr run`` bundles into
    the same bytes again (tests/test_app_approval.py checks that)."""
    app = folder / "fedct"
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        archive.extractall(app)
    shutil.rmtree(app / ".info")
    return app


def superlink_command(port: int, database: Path, *security: str) -> list[str]:
    """flower-superlink on 127.0.0.1:``port``, its state in ``database``, process isolation
    (its ServerApps run under a SuperExec beside it); ``security``: TLS or ``--insecure``."""
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
    superlink: str,
    runtime_port: int,
    *security: str,
    node_config: str = "",
    launcher: list[str] | None = None,
) -> list[str]:
    """flower-supernode (or ``launcher`` with its arguments) at ``superlink``, process
    isolation, its own runtime API on 127.0.0.1:``runtime_port``."""
    command = [
        *(launcher or [str(BIN / "flower-supernode")]),
        "--superlink",
        superlink,
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
    """flower-superexec for the runtime API on 127.0.0.1:``runtime_port`` (a SuperLink's or
    a SuperNode's)."""
    address = ["--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    return [str(BIN / "flower-superexec"), *address, *security]


def start_superlink(
    processes: Processes, pki: Path, port: int, database: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """The SuperLink on 127.0.0.1:``port`` (TLS with ``pki``'s certificate, SuperNode
    authentication, process isolation) and the ServerApp's SuperExec beside it; returns the
    SuperLink once it listens."""
    secret = ["--superexec-auth-secret-file", str(pki / "superexec.secret")]
    tls = ["--ssl-ca-certfile", str(pki / "ca.crt"), "--ssl-certfile", str(pki / "superlink.crt")]
    tls += ["--ssl-keyfile", str(pki / "superlink.key"), "--enable-supernode-auth"]
    superlink = processes.start("superlink", superlink_command(port, database, *tls, *secret), env)
    wait_for_port(port, superlink)
    superexec = superexec_command(port, "--root-certificates", str(pki / "ca.crt"), *secret)
    processes.start("superexec-serverapp", superexec, env)
    return superlink


def register_sites(env: dict[str, str], hosts: Path, sites: Iterable[str]) -> None:
    """``flwr supernode register`` each site's public key, as the operator (``fedct``)."""
    for site in sites:
        public_key = hosts / site / "pki" / "supernodes" / f"{site}.pub"
        done = flwr(env, "supernode", "register", str(public_key), "fedct", "--name", site)
        assert done.returncode == 0 and "registered successfully" in done.stdout, done.stdout


def start_supernode(
    processes: Processes,
    host: Path,
    site: str,
    superlink: str,
    transport: list[str],
    *,
    node_config: str = "",
    launcher: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """A hospital's SuperNode at ``superlink`` (process isolation, its own runtime API port,
    the host's secret and Flower home), started by ``launcher`` (default flower-supernode)
    with flower-supernode's arguments; with a node config, its SuperExec too."""
    runtime_port = free_port()
    secret = ["--superexec-auth-secret-file", str(host / "pki" / "superexec.secret")]
    command = supernode_command(
        superlink, runtime_port, *transport, *secret, node_config=node_config, launcher=launcher
    )
    env = host_env(host / "flwr-home")
    supernode = processes.start(f"supernode-{site}", command, env)
    if node_config:
        # The SuperNode's runtime API listens on loopback only.
        superexec = superexec_command(runtime_port, "--insecure", *secret)
        processes.start(f"superexec-{site}", superexec, env)
    return supernode
