"""The model registry end to end over loopback with TLS: list, card, verified pull, refusals."""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from safetensors.numpy import load_file

from fedct.client import commands
from fedct.common.cli import Command
from fedct.common.registry_proto import registry_pb2, registry_pb2_grpc
from fedct.common.run.directory import RunDirectory
from fedct.server import commands as server_commands
from fedct.server import registry

TOKEN = "registry-test-token-0123456789"


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(key if issuer is None else issuer[1], hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate it signed for 127.0.0.1/localhost, and an unrelated CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, server_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("fedct test CA", ca_key, None)
    files = {
        "ca": _pem(ca),
        "other_ca": _pem(_certificate("unrelated CA", other_key, None)),
        "cert": _pem(_certificate("localhost", server_key, (ca, ca_key))),
        "key": _key_pem(server_key),
        "other_key": _key_pem(other_key),
    }
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
    return {name: folder / f"{name}.pem" for name in files}


def _write_run(path: Path, rounds: int, best: int) -> None:
    run_dir = RunDirectory(path)
    rng = np.random.default_rng(rounds)
    for server_round in range(rounds):
        # Over 1 MiB, so that a download takes more than one chunk.
        arrays = {"weight": rng.standard_normal(300_000).astype(np.float32)}
        card = {
            "created": "2025-01-01T00:00:00+00:00",
            "run_config": {"lr": 0.01},
            "federated_evaluation": {"aggregated": {"tune-auc_covid": 0.6 + 0.051 * server_round}},
            "central_evaluation": {"mosmed-auc_covid": 0.7 + 0.01 * server_round},
        }
        run_dir.save_round(server_round, arrays, card, {"loss": 1.0 / (server_round + 1)}, {})
    run_dir.update_best(best, "accuracy", 0.9)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alpha (rounds 0-2, best 1), beta (rounds 0-1, written last), and symlinks leading out."""
    root = tmp_path_factory.mktemp("runs")
    outside = tmp_path_factory.mktemp("outside")
    _write_run(root / "alpha", rounds=3, best=1)
    _write_run(root / "beta", rounds=2, best=0)
    _write_run(outside / "secret", rounds=1, best=0)
    os.utime(root / "alpha" / "latest.json", (1_000_000, 1_000_000))
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)
    secret = RunDirectory(outside / "secret")
    alpha = RunDirectory(root / "alpha")
    alpha.weights_path(9).symlink_to(secret.weights_path(0))
    alpha.card_path(9).symlink_to(secret.card_path(0))
    return root


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def serve(runs: Path, pki: dict[str, Path]) -> Iterator[Callable[..., str]]:
    """Starts a TLS registry over ``runs`` for a servicer class; all are stopped at the end."""
    servers: list[grpc.Server] = []
    tls = registry.read_tls(pki["cert"], pki["key"])

    def start(servicer: type[registry.RegistryServicer] = registry.RegistryServicer) -> str:
        root = registry.RunsRoot(runs)
        server, port = registry.create_server(servicer(root), "127.0.0.1:0", TOKEN, tls)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


@pytest.fixture(scope="module")
def address(serve: Callable[..., str]) -> str:
    return serve()


def _cli(command: Command, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def _pull(address: str, pki: dict[str, Path], token_file: Path, *rest: str) -> int:
    argv = ["--registry", address, "--token-file", str(token_file), "--ca", str(pki["ca"])]
    return _cli(commands.pull, [*argv, *rest])


def _stub(address: str, pki: dict[str, Path]) -> registry_pb2_grpc.ModelRegistryStub:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    return registry_pb2_grpc.ModelRegistryStub(grpc.secure_channel(address, credentials))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_list_shows_every_checkpoint_inside_the_root(
    address: str,
    pki: dict[str, Path],
    token_file: Path,
    runs: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _pull(address, pki, token_file, "--list") == 0
    header, *lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert header == ["model", "created", "tune AUC", "external AUC", "flags", "bytes", "sha256"]
    assert [line[0] for line in lines] == ["alpha:0", "alpha:1", "alpha:2", "beta:0", "beta:1"]
    by_ref = {line[0]: dict(zip(header, line, strict=True)) for line in lines}
    weights = RunDirectory(runs / "alpha").weights_path(1)
    assert by_ref["alpha:1"]["bytes"] == str(weights.stat().st_size)
    assert by_ref["alpha:1"]["sha256"] == _sha256(weights)
    assert by_ref["alpha:1"]["flags"] == "best" and by_ref["alpha:2"]["flags"] == "latest"
    assert by_ref["beta:0"]["flags"] == "best" and by_ref["alpha:0"]["flags"] == "–"
    assert by_ref["alpha:1"]["created"] == "2025-01-01T00:00:00+00:00"
    assert by_ref["alpha:1"]["tune AUC"] == "0.651"
    assert by_ref["alpha:1"]["external AUC"] == "mosmed 0.710"


def test_card_is_the_card_file(
    address: str,
    pki: dict[str, Path],
    token_file: Path,
    runs: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _pull(address, pki, token_file, "--model", "alpha:best", "--card") == 0
    card = RunDirectory(runs / "alpha").card_path(1)
    assert json.loads(capsys.readouterr().out) == json.loads(card.read_text())


@pytest.mark.parametrize(
    ("ref", "run", "server_round"),
    [("alpha:0", "alpha", 0), ("alpha:best", "alpha", 1), ("alpha:latest", "alpha", 2)]
    + [("latest", "beta", 1)],
)
def test_pull_writes_verified_weights_and_card(
    address: str,
    pki: dict[str, Path],
    token_file: Path,
    runs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ref: str,
    run: str,
    server_round: int,
) -> None:
    out = tmp_path / "model.safetensors"
    assert _pull(address, pki, token_file, "--model", ref, "--out", str(out)) == 0
    source = RunDirectory(runs / run)
    assert out.read_bytes() == source.weights_path(server_round).read_bytes()
    card = json.loads((tmp_path / "model.card.json").read_text())
    assert card["round"] == server_round and card["sha256"] == _sha256(out)
    assert load_file(out)["weight"].shape == (300_000,)
    assert f"pulled {run}:{server_round}" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([out.name, "model.card.json"])


def test_wrong_token_is_refused_and_nothing_written(
    address: str, pki: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-registry-token-at-all")
    wrong.chmod(0o600)
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    assert _pull(address, pki, wrong, "--model", "alpha:1", "--out", str(out)) == 1
    assert "refused the token: invalid bearer token" in capsys.readouterr().err
    assert not any(out.parent.iterdir())


@pytest.mark.parametrize(
    "call",
    [
        lambda stub: stub.ListModels(registry_pb2.ListModelsRequest()),
        lambda stub: stub.GetCard(registry_pb2.ModelRef(ref="alpha:1")),
        lambda stub: next(stub.Download(registry_pb2.ModelRef(ref="alpha:1"))),
    ],
    ids=["ListModels", "GetCard", "Download"],
)
def test_missing_token_is_refused_on_every_call(
    address: str,
    pki: dict[str, Path],
    call: Callable[[registry_pb2_grpc.ModelRegistryStub], object],
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(_stub(address, pki))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == "missing bearer token"


class _Tampering(registry.RegistryServicer):
    def chunks(self, handle: BinaryIO) -> Iterator[bytes]:
        data = bytearray(handle.read())
        data[len(data) // 2] ^= 0x01
        yield bytes(data)


class _Truncating(registry.RegistryServicer):
    def chunks(self, handle: BinaryIO) -> Iterator[bytes]:
        yield handle.read()[:-1]


@pytest.mark.parametrize(
    ("servicer", "reason"),
    [(_Tampering, "sha256 mismatch"), (_Truncating, "the download ended after")],
)
def test_tampered_stream_is_refused_and_nothing_written(
    serve: Callable[..., str],
    pki: dict[str, Path],
    token_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    servicer: type[registry.RegistryServicer],
    reason: str,
) -> None:
    out = tmp_path / "model.safetensors"
    assert _pull(serve(servicer), pki, token_file, "--model", "alpha:1", "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert reason in err and "nothing written" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("ref", "status", "message"),
    [
        ("alpha", 2, "expected RUN:ROUND"),
        ("alpha:first", 2, "not a round number"),
        ("alpha:7", 1, "no checkpoint of round 7"),
        ("nope:best", 1, "no run 'nope'"),
    ],
)
def test_bad_model_ref_is_refused(
    address: str,
    pki: dict[str, Path],
    token_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ref: str,
    status: int,
    message: str,
) -> None:
    out = tmp_path / "model.safetensors"
    assert _pull(address, pki, token_file, "--model", ref, "--out", str(out)) == status
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("ref", "code"),
    [
        ("../outside:0", grpc.StatusCode.INVALID_ARGUMENT),
        ("/etc:0", grpc.StatusCode.INVALID_ARGUMENT),
        ("alpha/../beta:0", grpc.StatusCode.INVALID_ARGUMENT),
        ("escape:0", grpc.StatusCode.PERMISSION_DENIED),
        ("alpha:9", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_nothing_outside_the_root_is_served(
    address: str, pki: dict[str, Path], ref: str, code: grpc.StatusCode
) -> None:
    stub = _stub(address, pki)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.Download(registry_pb2.ModelRef(ref=ref), metadata=auth))
    assert caught.value.code() == code


def test_untrusted_server_certificate_is_refused(
    address: str,
    pki: dict[str, Path],
    token_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--registry", address, "--token-file", str(token_file), "--ca", str(pki["other_ca"])]
    assert _cli(commands.pull, [*argv, "--list"]) == 1
    assert "is unreachable" in capsys.readouterr().err


def test_plaintext_only_on_loopback(
    runs: Path, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, port = registry.create_server(
        registry.RegistryServicer(registry.RunsRoot(runs)), "127.0.0.1:0", TOKEN
    )
    try:
        argv = ["--registry", f"127.0.0.1:{port}", "--token-file", str(token_file), "--list"]
        assert _cli(commands.pull, argv) == 0
    finally:
        server.stop(None)
    assert "alpha:0" in capsys.readouterr().out
    serve = ["serve", "--runs", str(runs), "--token-file", str(token_file)]
    assert _cli(server_commands.registry, [*serve, "--address", "0.0.0.0:0"]) == 2
    assert "give --tls-cert and --tls-key" in capsys.readouterr().err
    argv = ["--registry", "10.0.0.1:50051", "--token-file", str(token_file), "--list"]
    assert _cli(commands.pull, argv) == 2
    assert "give --ca CERT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mode", "content", "message"),
    [
        (0o644, TOKEN, "chmod 600"),
        (0o600, "short", "16 to 4096 printable ASCII"),
        (None, TOKEN, "cannot read token file"),
    ],
)
def test_bad_token_file_is_refused(
    runs: Path,
    pki: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mode: int | None,
    content: str,
    message: str,
) -> None:
    path = tmp_path / "token"
    if mode is not None:
        path.write_text(content)
        path.chmod(mode)
    argv = ["--runs", str(runs), "--address", "127.0.0.1:0", "--token-file", str(path)]
    assert _cli(server_commands.registry, ["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err
    pull_argv = ["--registry", "127.0.0.1:1", "--token-file", str(path), "--list"]
    assert _cli(commands.pull, pull_argv) == 2
    assert message in capsys.readouterr().err


def test_port_in_use_is_refused(address: str, runs: Path) -> None:
    servicer = registry.RegistryServicer(registry.RunsRoot(runs))
    with pytest.raises(registry.BadInput, match="cannot listen"):
        registry.create_server(servicer, address, TOKEN)


def test_tls_files_are_checked(
    runs: Path,
    pki: dict[str, Path],
    token_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    serve = ["serve", "--runs", str(runs), "--address", "127.0.0.1:0"]
    serve += ["--token-file", str(token_file)]
    cases = [
        (["--tls-cert", str(pki["cert"])], "must be given together"),
        (["--tls-cert", str(token_file), "--tls-key", str(pki["key"])], "not a PEM file"),
        (["--tls-cert", str(garbage), "--tls-key", str(pki["key"])], "not a PEM certificate"),
        (["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["cert"])], "not an unencrypted"),
        (["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["other_key"])], "not the private"),
    ]
    for extra, message in cases:
        assert _cli(server_commands.registry, [*serve, *extra]) == 2
        assert message in capsys.readouterr().err
    argv = ["--registry", "127.0.0.1:1", "--token-file", str(token_file), "--list"]
    assert _cli(commands.pull, [*argv, "--ca", str(garbage)]) == 2
    assert f"{garbage}: not a PEM certificate" in capsys.readouterr().err
