"""Only site-approved app versions run, and only the operator starts runs, on the deployment
engine (docs/threat-model.md).

On 127.0.0.1 with free ports, every host with its own Flower home and key material: the
SuperLink (TLS, SuperNode authentication, process isolation) behind deploy/'s nginx proxy,
the ServerApp's SuperExec beside it, and the operator's forwarder that adds the operator's
client certificate.  Two hospitals connect through the proxy's Fleet port: ``hospital-a`` runs
``fedct site supernode`` and trusts only the release manager's key; ``hospital-u`` runs plain
``flower-supernode`` (the "before").

A bundle identical to fedct's but whose ClientApp drops the egress guard, returns a slice of
pixels as metrics and writes a marker file into its host's Flower home when imported is
submitted with ``flwr run``, signed by a key nobody trusts: at hospital-a none of its code runs
and the model card records the site's refusal, while at hospital-u it runs and the pixels
arrive (as numbers, which even the egress guard lets through: docs/privacy-egress.md).  Then
the release-signed fedct runs and completes at both; revoked at hospital-a with ``fedct site
revoke``, the same signed bundle is refused there at the next run.  ``fedct site supernode``
started with hospital-a's key and an abbreviated dependency flag, or with a trust folder its
group may write, exits with one line and never joins.  Clients without the operator's
certificate cannot use the Control API.  Every process is stopped by its process group.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from deploy_procs import (
    BIN,
    ROOT,
    Processes,
    fedct,
    fedct_certs,
    flwr,
    host_env,
    node_statuses,
    register_sites,
    start_superlink,
    start_supernode,
    supernode_command,
    unpack_app,
    wait_for_port,
)

from fedct.client import commands as client_commands
from fedct.common import commands as common_commands
from fedct.common.cache.store import read_manifest, scan_path
from fedct.common.trust import app_signing
from fedct.server.launch.simulate import free_port, write_run_config

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
GUARDED, UNGUARDED = "hospital-a", "hospital-u"
MARKER = "evil-clientapp-imported"

EVIL_CLIENTAPP = f'''"""fedct's ClientApp without the egress guard, leaking pixels as metrics."""

import os
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedct.client.local import evaluate_site, train_site
from fedct.client.site_data import resolve_site
from fedct.common.federation.messages import EvaluateInstruction, TrainInstruction
from fedct.common.cache.store import read_manifest, scan_path

Path(os.environ["FLWR_HOME"], "{MARKER}").write_text("imported")

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    site = resolve_site(context.node_config, context.run_config)
    arrays, metrics = train_site(site, *TrainInstruction.from_message(message))
    scan = read_manifest(site.cache_dir)[0]["scan_id"]
    for i, value in enumerate(np.load(scan_path(site.cache_dir, scan))[0, 0, :16]):
        metrics[f"pixel-{{i}}"] = float(value)
    content = RecordDict(
        {{"metrics": metrics, "arrays": arrays, "site": ConfigRecord({{"name": site.name}})}}
    )
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    site = resolve_site(context.node_config, context.run_config)
    metrics = evaluate_site(site, *EvaluateInstruction.from_message(message))
    content = RecordDict({{"metrics": metrics, "site": ConfigRecord({{"name": site.name}})}})
    return Message(content=content, reply_to=message)
'''


def render(template: Path, **values: str) -> str:
    """``template`` with ``${NAME}`` replaced, as the nginx image's envsubst does."""
    return re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], template.read_text())


@dataclass(frozen=True)
class Federation:
    """The running deployment, and how each party reaches it."""

    hosts: Path
    env: dict[str, str]  # the operator's Flower home: connections fedct, fleet-port, control-port
    fleet_port: int
    control_port: int
    nginx_log: Path

    @property
    def ca(self) -> Path:
        return self.hosts / "coordinator" / "pki" / "ca.crt"

    def runs(self) -> list[dict[str, Any]]:
        listed = flwr(self.env, "ls", "fedct", "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        return json.loads(listed.stdout)["runs"]


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    running = Processes(tmp_path_factory.mktemp("logs"))
    try:
        yield running
    finally:
        running.stop_all()


def _nginx(processes: Processes, folder: Path, *configs: str) -> subprocess.Popen[bytes]:
    """One nginx serving the http-context ``configs``, in the foreground, logs in ``folder``."""
    folder.mkdir()
    log = folder / "error.log"
    (folder / "nginx.conf").write_text(
        f"worker_processes 1;\nerror_log {log} info;\npid {folder / 'nginx.pid'};\n"
        "events {}\nhttp {\naccess_log off;\n" + "\n".join(configs) + "\n}\n"
    )
    command = [NGINX, "-p", str(folder), "-e", str(log), "-c", "nginx.conf", "-g", "daemon off;"]
    return processes.start(folder.name, command, host_env(folder / "home"))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, processes: Processes) -> Federation:
    """The coordinator behind deploy/'s proxy, the operator's forwarder, and the hospitals'
    keys registered by the operator through both."""
    assert Path(NGINX).is_file(), "no nginx: `apt-get install nginx` (.ci/run does)"
    hosts = tmp_path_factory.mktemp("hosts")
    pki = hosts / "coordinator" / "pki"
    coordinator_certs = ["--superlink-san", "127.0.0.1,localhost", "--registry-san", "localhost"]
    assert fedct_certs("--out", str(pki), *coordinator_certs, "--operators", "operator") == 0
    assert fedct_certs("--out", str(pki), "--superexec-secret") == 0
    for site in (GUARDED, UNGUARDED):
        args = ("--out", str(hosts / site / "pki"), "--sites", site, "--superexec-secret")
        assert fedct_certs(*args) == 0
    operator = hosts / "operator"
    operator.mkdir()
    for name in ("operator.crt", "operator.key"):
        shutil.copy(pki / "operators" / name, operator / name)
    shutil.copy(pki / "ca.crt", operator / "ca.crt")

    env = host_env(hosts / "coordinator" / "flwr-home")
    superlink_port, fleet, control, forwarder = (free_port() for _ in range(4))
    start_superlink(processes, pki, superlink_port, hosts / "coordinator" / "state.db", env)
    proxy = _nginx(
        processes,
        hosts / "proxy",
        render(
            ROOT / "deploy" / "coordinator" / "nginx" / "superlink-proxy.conf.template",
            FLEET_LISTEN=f"127.0.0.1:{fleet}",
            CONTROL_LISTEN=f"127.0.0.1:{control}",
            SUPERLINK=f"127.0.0.1:{superlink_port}",
            SUPERLINK_NAME="localhost",
            CERTS=str(pki),
        ),
    )
    forwarding = _nginx(
        processes,
        hosts / "forwarder",
        render(
            ROOT / "deploy" / "operator" / "operator-forwarder.conf.template",
            OPERATOR_LISTEN=f"127.0.0.1:{forwarder}",
            COORDINATOR=f"127.0.0.1:{control}",
            COORDINATOR_NAME="localhost",
            CERTS=str(operator),
        ),
    )
    for port, nginx in ((fleet, proxy), (control, proxy), (forwarder, forwarding)):
        wait_for_port(port, nginx)
    (hosts / "coordinator" / "flwr-home" / "config.toml").write_text(
        '[superlink]\ndefault = "fedct"\n\n'
        # The operator, through its forwarder (plaintext on loopback, mTLS onwards) ...
        f'[superlink.fedct]\naddress = "127.0.0.1:{forwarder}"\ninsecure = true\n\n'
        # ... and anyone else who has the CA: the hospitals' port, the operator's without a
        # certificate.
        f'[superlink.fleet-port]\naddress = "127.0.0.1:{fleet}"\n'
        f'root-certificates = "{pki / "ca.crt"}"\n\n'
        f'[superlink.control-port]\naddress = "127.0.0.1:{control}"\n'
        f'root-certificates = "{pki / "ca.crt"}"\n'
    )
    register_sites(env, hosts, (GUARDED, UNGUARDED))
    return Federation(hosts, env, fleet, control, hosts / "proxy" / "error.log")


@pytest.fixture(scope="module")
def release_keys(federation: Federation) -> Path:
    """The release manager's key pair and a rogue one, made with ``fedct app keygen``."""
    keys = federation.hosts / "release"
    for name in ("release", "rogue"):
        assert fedct(common_commands.app, "keygen", "--out", str(keys), "--name", name) == 0
    return keys


@pytest.fixture(scope="module")
def hospitals(
    federation: Federation,
    processes: Processes,
    release_keys: Path,
    site_caches: dict[str, Path],
) -> dict[str, Path]:
    """Both hospitals online through the proxy's Fleet port; hospital-a trusts the release key
    and nothing else.  Returns each hospital's host folder."""
    guarded = federation.hosts / GUARDED
    approvals, audit_log = guarded / "approvals.json", guarded / "audit" / "fedct-audit.jsonl"
    trust = ("trust-key", str(release_keys / "release.pub"), "--note", "release manager")
    files = ("--approvals", str(approvals), "--audit-log", str(audit_log))
    assert fedct(client_commands.site, *trust, *files) == 0
    for site, cache in ((GUARDED, site_caches["site_a"]), (UNGUARDED, site_caches["site_b"])):
        host = federation.hosts / site
        node_config = f'data-path="{cache}" site="{site}" device="cpu"'
        launcher = None
        if site == GUARDED:
            node_config += f' audit-log="{audit_log}"'
            launcher = [
                str(BIN / "fedct"),
                "site",
                "supernode",
                "--approvals",
                str(approvals),
                "--",
            ]
        start_supernode(
            processes,
            host,
            site,
            f"127.0.0.1:{federation.fleet_port}",
            [
                "--root-certificates",
                str(federation.ca),
                "--auth-supernode-private-key",
                str(host / "pki" / "supernodes" / f"{site}.key"),
            ],
            node_config=node_config,
            launcher=launcher,
        )
    deadline = time.monotonic() + 90
    while node_statuses(federation.env) != ["online", "online"]:
        assert time.monotonic() < deadline, "the hospitals' SuperNodes did not come online"
        time.sleep(2)
    return {site: federation.hosts / site for site in (GUARDED, UNGUARDED)}


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fedct's app as ``flwr run`` bundles this checkout, and the same app whose clientapp
    component is the ClientApp above, shipped in the bundle.  (fedct's own components are
    imported from the fedct installed at the site; a bundle's author names any module.)"""
    fedct_app = unpack_app(app_signing.bundle_of(ROOT).content, tmp_path_factory.mktemp("real"))
    evil = tmp_path_factory.mktemp("evil") / "fedct"
    shutil.copytree(fedct_app, evil)
    (evil / "evil_clientapp.py").write_text(EVIL_CLIENTAPP)
    pyproject = evil / "pyproject.toml"
    text = pyproject.read_text()
    component = 'clientapp = "fedct.client.app:app"'
    assert component in text
    pyproject.write_text(text.replace(component, 'clientapp = "evil_clientapp:app"'))
    return {"fedct": fedct_app, "evil": evil}


def run_app(federation: Federation, app: Path, run_dir: Path, signer: Path) -> dict[str, Any]:
    """``flwr run APP`` as the operator, one round, the bundle signed with ``signer``; the
    round's model card."""
    signature = app_signing.sign(
        app_signing.read_private_key(signer), app_signing.bundle_of(app).sha256
    )
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    run_config = write_run_config(
        run_dir.parent / f"{run_dir.name}.toml",
        {
            "num-server-rounds": 1,
            "backbone": "test_efficientnet",
            "image-size": 32,
            "batch-size": 4,
            "lr": 0.01,
            "device": "cpu",
            "external-caches": "",
            "run-dir": str(run_dir),
            "node-wait-timeout": 120.0,
            "round-timeout": 300.0,
            "min-train-replies": 1,
            "cross-site": False,
            app_signing.SIGNATURE_KEY: signature,
        },
    )
    done = flwr(
        federation.env,
        "run",
        str(app),
        "fedct",
        "--run-config",
        str(run_config),
        "--stream",
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert federation.runs()[-1]["status"] == "finished:completed", done.stdout
    return json.loads((run_dir / "round_001.card.json").read_text())


def audit_lines(host: Path) -> list[dict[str, Any]]:
    path = host / "audit" / "fedct-audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- only the coordinator starts runs --------------------------------------------------------


def test_without_the_operator_certificate_no_run_starts(
    federation: Federation, hospitals: dict[str, Path], apps: dict[str, Path]
) -> None:
    """Hospitals' SuperNodes are online through the proxy (the fixture), yet a client with the
    federation's CA but no operator certificate can neither start a run nor register a key."""
    public_key = hospitals[GUARDED] / "pki" / "supernodes" / f"{GUARDED}.pub"
    for connection, refusal in (("fleet-port", "403 Forbidden"), ("control-port", "400 Bad")):
        started = flwr(federation.env, "run", str(apps["fedct"]), connection, timeout=120)
        assert started.returncode != 0 and refusal in started.stdout + started.stderr
        registered = flwr(federation.env, "supernode", "register", str(public_key), connection)
        assert registered.returncode != 0 and refusal in registered.stdout + registered.stderr
    assert federation.runs() == []
    assert "client sent no required SSL certificate" in federation.nginx_log.read_text()


def test_operator_certificates_are_for_tls_clients_only(tmp_path: Path) -> None:
    assert fedct_certs("--out", str(tmp_path), "--operators", "alice,bob.ops") == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    for name in ("alice", "bob.ops"):
        cert = x509.load_pem_x509_certificate((tmp_path / "operators" / f"{name}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert cert.subject.rfc4514_string() == f"CN={name}"
        assert (tmp_path / "operators" / f"{name}.key").stat().st_mode & 0o777 == 0o600


def _post(port: int, path: str, ca: Path, cert: tuple[Path, Path] | None = None) -> int:
    """The status of a raw POST of ``path`` (sent exactly as written) to the proxy."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    try:
        connection.request("POST", path, body=b"")
        return connection.getresponse().status
    finally:
        connection.close()


def test_a_server_certificate_is_not_an_operator_certificate(
    federation: Federation, hospitals: dict[str, Path]
) -> None:
    pki = federation.hosts / "coordinator" / "pki"
    registry = (pki / "registry.crt", pki / "registry.key")
    assert _post(federation.control_port, "/v1/control/list-runs", federation.ca, registry) == 400
    assert "unsuitable certificate purpose" in federation.nginx_log.read_text()
    # The operator's own certificate does reach the SuperLink (which wants a protobuf body).
    operator = federation.hosts / "operator"
    operator_cert = (operator / "operator.crt", operator / "operator.key")
    assert (
        _post(federation.control_port, "/v1/control/list-runs", federation.ca, operator_cert) == 415
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",
        "/v1/runtime/acquire-task",
        "/v1/fleet/../control/start-run",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet/get-run/../../control/start-run",
        "/v1/fleet/get-run?x=/../../control/start-run",
        "/docs",
    ],
)
def test_the_fleet_port_passes_only_fleet_api_methods(
    federation: Federation, hospitals: dict[str, Path], path: str
) -> None:
    assert _post(federation.fleet_port, path, federation.ca) == 403
    assert _post(federation.fleet_port, "/v1/fleet/get-run", federation.ca) == 415  # reached


# --- the hospital decides what code touches its data -----------------------------------------


def test_an_unapproved_app_never_runs_at_an_approving_site(
    federation: Federation,
    hospitals: dict[str, Path],
    release_keys: Path,
    apps: dict[str, Path],
    processes: Processes,
    site_caches: dict[str, Path],
    tmp_path: Path,
) -> None:
    evil_sha256 = app_signing.bundle_of(apps["evil"]).sha256
    card = run_app(federation, apps["evil"], tmp_path / "evil", release_keys / "rogue.key")

    # Before: a site without the check imports the bundle's code, and its pixels arrive.
    assert (hospitals[UNGUARDED] / "flwr-home" / MARKER).is_file()
    (participant,) = card["train"]["participants"]
    cache = site_caches["site_b"]
    pixels = np.load(scan_path(cache, read_manifest(cache)[0]["scan_id"]))[0, 0, :16]
    leaked = [participant["metrics"][f"pixel-{i}"] for i in range(16)]
    assert participant["site"] == UNGUARDED and leaked == pixels.tolist()

    # After: at hospital-a none of its code ran, and the coordinator recorded why.
    assert not (hospitals[GUARDED] / "flwr-home" / MARKER).exists()
    assert not list((hospitals[GUARDED] / "flwr-home").glob(f"apps/*{evil_sha256[:8]}*"))
    failures = card["train"]["failures"] + card["federated_evaluation"]["failures"]
    refusals = [failure["reason"] for failure in failures]
    assert len(refusals) == 2, card
    for reason in refusals:
        assert f"the site refused app bundle sha256 {evil_sha256}" in reason
        assert "which this site does not trust" in reason
    assert [s["site"] for s in card["federated_evaluation"]["sites"]] == [UNGUARDED]

    log = (processes.logs / f"supernode-{GUARDED}.log").read_text()
    assert log.count(f"fedct: REFUSED app bundle sha256 {evil_sha256} (fedct/fedct 0.1.0)") == 2
    lines = audit_lines(hospitals[GUARDED])
    refused = [line for line in lines if line.get("event") == "bundle-refused"]
    assert [line["fab_sha256"] for line in refused] == [evil_sha256, evil_sha256]
    assert not [line for line in lines if "message_type" in line]  # no reply left via the app


def test_the_release_signed_app_runs_and_completes(
    federation: Federation,
    hospitals: dict[str, Path],
    release_keys: Path,
    apps: dict[str, Path],
    tmp_path: Path,
) -> None:
    card = run_app(federation, apps["fedct"], tmp_path / "fedct", release_keys / "release.key")
    assert sorted(p["site"] for p in card["train"]["participants"]) == [GUARDED, UNGUARDED]
    assert card["train"]["failures"] == []
    lines = audit_lines(hospitals[GUARDED])
    accepted = [line for line in lines if line.get("event") == "bundle-accepted"]
    assert [line["fab_sha256"] for line in accepted] == [
        app_signing.bundle_of(apps["fedct"]).sha256
    ]
    assert accepted[0]["by"].startswith("release key ")
    assert {line["message_type"] for line in lines if "message_type" in line} == {
        "train",
        "evaluate",
    }
    assert not (hospitals[GUARDED] / "flwr-home" / MARKER).exists()


# --- a revocation wins over a signature; the launcher refuses before joining -----------------


def test_a_revoked_release_never_runs_again(
    federation: Federation,
    hospitals: dict[str, Path],
    release_keys: Path,
    apps: dict[str, Path],
    processes: Processes,
    tmp_path: Path,
) -> None:
    """The release-signed fedct that completed above, revoked at hospital-a with
    ``fedct site revoke``: the next run of the same signed bundle is refused there."""
    sha256 = app_signing.bundle_of(apps["fedct"]).sha256
    guarded = hospitals[GUARDED]
    files = ("--approvals", str(guarded / "approvals.json"))
    files += ("--audit-log", str(guarded / "audit" / "fedct-audit.jsonl"))
    revoke = ("revoke", sha256, "--note", "withdrawn by the IG board")
    assert fedct(client_commands.site, *revoke, *files) == 0
    card = run_app(federation, apps["fedct"], tmp_path / "revoked", release_keys / "release.key")
    assert [p["site"] for p in card["train"]["participants"]] == [UNGUARDED]
    failures = card["train"]["failures"] + card["federated_evaluation"]["failures"]
    assert len(failures) == 2, card
    for failure in failures:
        assert (
            f"the site refused app bundle sha256 {sha256}: revoked at this site on "
            in (failure["reason"])
        )
        assert str(federation.hosts) not in failure["reason"]
    log = (processes.logs / f"supernode-{GUARDED}.log").read_text()
    assert log.count(f"fedct: REFUSED app bundle sha256 {sha256}") == 2
    events = [line["event"] for line in audit_lines(guarded) if "event" in line]
    assert events[-3:] == ["bundle-revoked", "bundle-refused", "bundle-refused"]


def test_the_launcher_refuses_before_joining(
    federation: Federation, hospitals: dict[str, Path], processes: Processes
) -> None:
    """hospital-a's own key and approvals, started again by ``fedct site supernode``: with
    Flower's dependency flag abbreviated, and with a trust folder its group may write.  Each
    exits at once with one line; nothing joins."""
    guarded = hospitals[GUARDED]
    shared = guarded / "shared-trust"
    shared.mkdir()
    shutil.copy(guarded / "approvals.json", shared / "approvals.json")
    shared.chmod(0o775)
    node_config = f'data-path="{guarded}" audit-log="{guarded / "refusals.jsonl"}"'
    cases = {
        "abbreviated": (guarded / "approvals.json", ["--allow-r"]),
        "group-writable": (shared / "approvals.json", []),
    }
    started = {}
    for name, (approvals, flags) in cases.items():
        launcher = [str(BIN / "fedct"), "site", "supernode", "--approvals", str(approvals), "--"]
        command = supernode_command(
            f"127.0.0.1:{federation.fleet_port}",
            free_port(),
            "--root-certificates",
            str(federation.ca),
            "--auth-supernode-private-key",
            str(guarded / "pki" / "supernodes" / f"{GUARDED}.key"),
            *flags,
            node_config=node_config,
            launcher=launcher,
        )
        started[name] = processes.start(f"refused-{name}", command, host_env(guarded / name))
    for process in started.values():
        assert process.wait(timeout=120) == 2
    (abbreviated,) = processes.log(started["abbreviated"]).splitlines()
    assert "--allow-runtime-dependency-installation would let a run install" in abbreviated
    (writable,) = processes.log(started["group-writable"]).splitlines()
    assert f"its folder {shared} is writable by group (mode 775)" in writable
    assert not (guarded / "refusals.jsonl").exists()
    assert node_statuses(federation.env) == ["online", "online"]
