"""``fedct certs``, and the deployment engine end to end over TLS with SuperNode authentication.

On 127.0.0.1 with free ports: a SuperLink with TLS and ``--enable-supernode-auth`` (process
isolation, its SuperExec beside it), three registered hospital keys, one SuperNode and SuperExec
per hospital with its own cache, two rounds of ``flwr run`` with the tiny backbone.  A SuperNode
with an unregistered key and plaintext clients are refused.  Every host has its own Flower home
and key material made by ``fedct certs``, as it would in a deployment.  Each process starts in a
session of its own and is stopped with its process group (SIGTERM, then SIGKILL), even when a
test fails.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from deploy_procs import (
    ROOT,
    Processes,
    fedct_certs,
    flwr,
    host_env,
    node_statuses,
    register_sites,
    start_superlink,
    start_supernode,
)
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fedct.server.launch.simulate import free_port, write_run_config
from fedct.server.registry import read_tls

SITES = ("hospital-a", "hospital-b")
REGISTERED = (*SITES, "hospital-c")  # hospital-c is registered but never joins


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- fedct certs -----------------------------------------------------------------------------


def test_certs_writes_a_ca_a_superlink_certificate_and_supernode_keys(tmp_path: Path) -> None:
    sans = "127.0.0.1,localhost,coordinator.example"
    assert fedct_certs("--out", str(tmp_path), "--superlink-san", sans, "--sites", "a,b") == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    leaf.verify_directly_issued_by(ca)
    alt = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert alt.get_values_for_type(x509.DNSName) == ["localhost", "coordinator.example"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("ca.key", "superlink.key", "supernodes/a.key", "supernodes/b.key"):
        assert _mode(tmp_path / name) == 0o600, name
    assert _mode(tmp_path / "supernodes/a.pub") == 0o644
    assert not (tmp_path / "superexec.secret").exists()

    # The formats flower-supernode and `flwr supernode register` read.
    private = load_ssh_private_key((tmp_path / "supernodes/a.key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    registered = try_load_public_key(tmp_path / "supernodes/a.pub")
    assert registered == public_key_to_bytes(private.public_key())
    assert registered != try_load_public_key(tmp_path / "supernodes/b.pub")


def test_certs_reuse_the_ca_and_never_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fedct_certs("--out", str(tmp_path), "--superlink-san", "localhost") == 0
    ca_before = (tmp_path / "ca.crt").read_bytes()
    assert fedct_certs("--out", str(tmp_path), "--registry-san", "10.0.0.5,registry.example") == 0
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    ca = x509.load_pem_x509_certificate(ca_before)
    registry_cert = tmp_path / "registry.crt"
    x509.load_pem_x509_certificate(registry_cert.read_bytes()).verify_directly_issued_by(ca)
    read_tls(registry_cert, tmp_path / "registry.key")  # what `fedct registry serve` accepts

    superlink_key = (tmp_path / "superlink.key").read_bytes()
    capsys.readouterr()
    assert fedct_certs("--out", str(tmp_path), "--superlink-san", "x.example", "--sites", "c") == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "superlink.key").read_bytes() == superlink_key
    assert not (tmp_path / "supernodes").exists()  # all or nothing

    assert fedct_certs("--out", str(tmp_path), "--superexec-secret") == 0
    secret = (tmp_path / "superexec.secret").read_text()
    assert len(secret) == 64 and _mode(tmp_path / "superexec.secret") == 0o600


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sites", "../escape"], "site '../escape'"),
        (["--sites", "a,a"], "names a site twice"),
        (["--superlink-san", "not a name"], "neither an IP address nor a DNS name"),
        (["--superlink-san", "localhost", "--days", "0"], "at least 1"),
        ([], "give --superlink-san"),
    ],
)
def test_certs_reject_bad_input_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert fedct_certs("--out", str(tmp_path / "pki"), *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "pki").exists()


# --- the deployment engine over TLS ----------------------------------------------------------


@dataclass(frozen=True)
class Coordinator:
    """The running SuperLink, and how to reach it as the operator."""

    port: int
    env: dict[str, str]
    ca: Path
    superlink: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    running = Processes(tmp_path_factory.mktemp("logs"))
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per host, with the key material that host made itself."""
    root = tmp_path_factory.mktemp("hosts")
    coordinator = ["--superlink-san", "127.0.0.1,localhost", "--superexec-secret"]
    assert fedct_certs("--out", str(root / "coordinator" / "pki"), *coordinator) == 0
    for site in (*REGISTERED, "intruder"):
        args = ("--out", str(root / site / "pki"), "--sites", site, "--superexec-secret")
        assert fedct_certs(*args) == 0
    return root


@pytest.fixture(scope="module")
def coordinator(hosts: Path, processes: Processes) -> Coordinator:
    """The SuperLink (TLS, SuperNode auth, process isolation) and the ServerApp's SuperExec,
    with the hospitals' public keys registered."""
    host = hosts / "coordinator"
    pki = host / "pki"
    env = host_env(host / "flwr-home")
    port = free_port()
    (host / "flwr-home" / "config.toml").write_text(
        '[superlink]\ndefault = "fedct"\n\n'
        f'[superlink.fedct]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{pki / "ca.crt"}"\n\n'
        f'[superlink.plaintext]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    superlink = start_superlink(processes, pki, port, host / "state.db", env)
    register_sites(env, hosts, REGISTERED)
    return Coordinator(port, env, pki / "ca.crt", superlink)


def start_hospital(
    processes: Processes,
    hosts: Path,
    coordinator: Coordinator,
    site: str,
    *,
    transport: list[str],
    node_config: str = "",
) -> subprocess.Popen[bytes]:
    """A hospital's SuperNode (process isolation, its own runtime API port)."""
    return start_supernode(
        processes,
        hosts / site,
        site,
        f"127.0.0.1:{coordinator.port}",
        transport,
        node_config=node_config,
    )


def tls_with_key(hosts: Path, coordinator: Coordinator, site: str) -> list[str]:
    key = hosts / site / "pki" / "supernodes" / f"{site}.key"
    return ["--root-certificates", str(coordinator.ca), "--auth-supernode-private-key", str(key)]


def test_a_supernode_with_an_unregistered_key_is_refused(
    hosts: Path, coordinator: Coordinator, processes: Processes
) -> None:
    intruder = start_hospital(
        processes,
        hosts,
        coordinator,
        "intruder",
        transport=tls_with_key(hosts, coordinator, "intruder"),
    )
    assert intruder.wait(timeout=60) != 0
    log = processes.log(intruder)
    assert "Failed to activate SuperNode" in log and "Exit Code: 305" in log, log
    assert "No SuperNode found with the given public key" in processes.log(coordinator.superlink)
    assert node_statuses(coordinator.env) == ["registered"] * len(REGISTERED)


def test_plaintext_clients_are_refused(
    hosts: Path, coordinator: Coordinator, processes: Processes
) -> None:
    plaintext = start_hospital(
        processes,
        hosts,
        coordinator,
        "hospital-c",
        transport=["--insecure", "--max-retries", "2", "--max-wait-time", "30"],
    )
    assert plaintext.wait(timeout=90) != 0
    log = processes.log(plaintext)
    # The TLS port drops plaintext HTTP before any answer: "Server disconnected without
    # sending a response" or "Connection reset by peer", never an API error code.
    assert "Giving up reconnection" in log and "Exit Code: 305" in log, log
    assert "[code: " not in log, log

    listed = flwr(coordinator.env, "ls", "plaintext")
    assert listed.returncode != 0
    assert "Connection to the SuperLink is unavailable" in listed.stdout + listed.stderr
    assert node_statuses(coordinator.env) == ["registered"] * len(REGISTERED)


def test_two_rounds_over_tls_with_authenticated_supernodes(
    hosts: Path,
    coordinator: Coordinator,
    processes: Processes,
    site_caches: dict[str, Path],
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    for site, cache in zip(SITES, (site_caches["site_a"], site_caches["site_b"]), strict=True):
        start_hospital(
            processes,
            hosts,
            coordinator,
            site,
            transport=tls_with_key(hosts, coordinator, site),
            node_config=f'data-path="{cache}" site="{site}" device="cpu"',
        )
    deadline = time.monotonic() + 90
    while node_statuses(coordinator.env).count("online") < len(SITES):
        assert time.monotonic() < deadline, "the hospitals' SuperNodes did not come online"
        time.sleep(2)

    run_dir = tmp_path / "runs" / "tls"
    run_config = write_run_config(
        tmp_path / "run.toml",
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
            "round-timeout": 300.0,
        },
    )
    done = flwr(
        coordinator.env,
        "run",
        str(ROOT),
        "fedct",
        "--run-config",
        str(run_config),
        "--stream",
        timeout=400,
    )
    print(f"deployment run took {time.monotonic() - started:.1f} s", file=sys.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    # `flwr run` exits 0 even when the ServerApp fails: the run's status tells.
    runs = json.loads(flwr(coordinator.env, "ls", "fedct", "--format", "json").stdout)["runs"]
    assert [run["status"] for run in runs] == ["finished:completed"], done.stdout

    for server_round in range(3):
        assert (run_dir / f"round_00{server_round}.safetensors").is_file()
        assert (run_dir / f"round_00{server_round}.card.json").is_file()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert set(lines[-1]["sites"]) == set(SITES)
