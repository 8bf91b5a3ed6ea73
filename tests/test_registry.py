"""The model registry end to end over loopback with TLS: list, card, verified pull, refusals."""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import shutil
import threading
import time
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
from fedct.common.registry_proto import ModelRef, registry_pb2, registry_pb2_grpc
from fedct.common.run.directory import RunDirectory
from fedct.server import commands as server_commands
from fedct.server import registry

TOKEN = "registry-test-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


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
    """alpha (rounds 0-2, best 1), beta (rounds 0-1, written last), and files that are not the
    registry's own: symbolic links (out of the root and within it), hard links to files
    outside, a FIFO."""
    root = tmp_path_factory.mktemp("runs")
    outside = tmp_path_factory.mktemp("outside")
    _write_run(root / "alpha", rounds=3, best=1)
    _write_run(root / "beta", rounds=2, best=0)
    _write_run(outside / "secret", rounds=1, best=0)
    os.utime(root / "alpha" / "latest.json", (1_000_000, 1_000_000))
    secret, alpha = RunDirectory(outside / "secret"), RunDirectory(root / "alpha")
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)
    (root / "alias").symlink_to(root / "alpha", target_is_directory=True)
    alpha.weights_path(9).symlink_to(secret.weights_path(0))
    alpha.card_path(9).symlink_to(secret.card_path(0))
    os.link(secret.weights_path(0), alpha.weights_path(10))
    shutil.copy(secret.card_path(0), alpha.card_path(10))
    os.link(secret.card_path(0), alpha.card_path(11))
    shutil.copy(secret.weights_path(0), alpha.weights_path(11))
    os.mkfifo(alpha.weights_path(12))
    shutil.copy(secret.card_path(0), alpha.card_path(12))
    _write_run(root / "gamma", rounds=1, best=0)
    (root / "gamma" / "latest.json").unlink()
    (root / "gamma" / "latest.json").symlink_to(root / "beta" / "latest.json")
    _write_run(root / "delta", rounds=1, best=0)
    (root / "delta" / "best.json").unlink()
    os.link(outside / "secret" / "best.json", root / "delta" / "best.json")
    os.utime(root / "delta" / "latest.json", (1_000_000, 1_000_000))  # beta stays the newest
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
    servers: list[registry.RegistryServer] = []
    tls = registry.read_tls(pki["cert"], pki["key"])

    def start(
        servicer: type[registry.RegistryServicer] = registry.RegistryServicer,
        limits: registry.Limits | None = None,
    ) -> str:
        root = registry.RunsRoot(runs)
        server = registry.create_server(servicer(root, limits), "127.0.0.1:0", TOKEN, tls)
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.stop()


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


@pytest.mark.parametrize("ref", ["../outside:0", "/etc:0", "alpha/../beta:0"])
def test_a_reference_names_no_path(address: str, pki: dict[str, Path], ref: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        next(_stub(address, pki).Download(registry_pb2.ModelRef(ref=ref), metadata=AUTH))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("call", ["GetCard", "Download"])
@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("escape:0", "escape is a symbolic link"),  # a run folder linked out of the root
        ("alias:0", "alias is a symbolic link"),  # ... and to a run folder within it
        ("alpha:9", "alpha/round_009.card.json is a symbolic link"),
        ("alpha:10", "alpha/round_010.safetensors is a hard link (2 names)"),
        ("alpha:11", "alpha/round_011.card.json is a hard link (2 names)"),
        ("alpha:12", "alpha/round_012.safetensors is not a regular file"),  # a FIFO: no wait
        ("gamma:latest", "gamma/latest.json is a symbolic link"),
        ("delta:best", "delta/best.json is a hard link (2 names)"),
    ],
)
def test_only_regular_files_with_one_name_inside_the_root_are_served(
    address: str, pki: dict[str, Path], call: str, ref: str, reason: str
) -> None:
    """(ListModels leaves them all out: test_list_shows_every_checkpoint_inside_the_root.)"""
    method = getattr(_stub(address, pki), call)
    with pytest.raises(grpc.RpcError) as caught:
        answer = method(registry_pb2.ModelRef(ref=ref), metadata=AUTH, timeout=10)
        next(answer) if call == "Download" else answer
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == reason


def _swap_for_hard_link(weights: Path, outside: Path) -> None:
    weights.unlink()
    os.link(outside, weights)


def _swap_for_symlink(weights: Path, outside: Path) -> None:
    run = weights.parent
    run.rename(run.with_name("moved"))
    run.symlink_to(outside.parent, target_is_directory=True)
    shutil.copy(run.with_name("moved") / weights.name, outside.parent / weights.name)


@pytest.mark.parametrize(
    ("swap", "reason"),
    [
        (_swap_for_hard_link, "alpha/round_000.safetensors is a hard link (2 names)"),
        (_swap_for_symlink, "alpha is a symbolic link"),
    ],
)
def test_the_opened_file_is_checked_not_the_name(
    tmp_path: Path, swap: Callable[[Path, Path], None], reason: str
) -> None:
    """Between the reference's resolution (which checks every file) and the weights being
    opened, the weights or their run folder are swapped for a link to a file outside."""
    runs, outside = tmp_path / "runs", tmp_path / "outside" / "secret.bin"
    _write_run(runs / "alpha", rounds=1, best=0)
    outside.parent.mkdir()
    outside.write_bytes(b"patient data")

    class Swapping(registry.RunsRoot):
        def resolve(self, ref: ModelRef) -> registry.Model:
            model = super().resolve(ref)
            swap(self.root / model.run / model.weights, outside)
            return model

    server = registry.create_server(registry.RegistryServicer(Swapping(runs)), "127.0.0.1:0", TOKEN)
    try:
        stub = registry_pb2_grpc.ModelRegistryStub(
            grpc.insecure_channel(f"127.0.0.1:{server.port}")
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Download(registry_pb2.ModelRef(ref="alpha:0"), metadata=AUTH, timeout=10))
    finally:
        server.stop()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == reason


def test_stalled_downloads_block_no_one(
    tmp_path: Path, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client opens downloads of a checkpoint larger than the transport buffers and, after
    the first message, never reads again; over its own connection, as an attacker would."""
    runs, idle = tmp_path / "runs", 2.0
    arrays = {"weight": np.zeros(6 << 20, dtype=np.float32)}  # 24 MiB
    RunDirectory(runs / "big").save_round(0, arrays, {"created": "now"}, {"loss": 1.0}, {})
    limits = registry.Limits(per_client=2, total=8, idle_timeout=idle)
    servicer = registry.RegistryServicer(registry.RunsRoot(runs), limits)
    server = registry.create_server(servicer, "127.0.0.1:0", TOKEN)
    address = f"127.0.0.1:{server.port}"
    try:
        stalled = []
        for _ in range(2):
            channel = grpc.insecure_channel(address, [("grpc.use_local_subchannel_pool", 1)])
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            stalled.append(stub.Download(registry_pb2.ModelRef(ref="big:0"), metadata=AUTH))
            assert next(stalled[-1]).HasField("metadata")
        with pytest.raises(grpc.RpcError) as caught:
            next(stub.Download(registry_pb2.ModelRef(ref="big:0"), metadata=AUTH))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "has 2 downloads open, the most one client may have" in caught.value.details()

        # Meanwhile others are answered, well before the stalled downloads end.
        honest = registry_pb2_grpc.ModelRegistryStub(grpc.insecure_channel(address))
        request = registry_pb2.ListModelsRequest()
        assert honest.ListModels(request, metadata=AUTH, timeout=idle / 2).models
        card = honest.GetCard(registry_pb2.ModelRef(ref="big:0"), metadata=AUTH, timeout=idle / 2)
        assert card.round == 0

        # The stalled downloads end on their own; only then does their client read on.
        deadline = time.monotonic() + 30 * idle
        while servicer.downloads.open and time.monotonic() < deadline:
            time.sleep(0.1)
        for stream in stalled:
            with pytest.raises(grpc.RpcError) as caught:
                for _ in stream:
                    pass
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert (
                caught.value.details() == f"the client took no data for {idle:g} s; download ended"
            )
        out = tmp_path / "model.safetensors"
        argv = ["--registry", address, "--token-file", str(token_file), "--model", "big:0"]
        assert _cli(commands.pull, [*argv, "--out", str(out)]) == 0
    finally:
        server.stop()
    assert "sha256 verified" in capsys.readouterr().out


def test_calls_whose_request_never_comes_block_no_one(address: str, pki: dict[str, Path]) -> None:
    """Clients open more Download calls than a thread pool would have threads and never send
    the request (a gRPC client streaming to a unary method), with and without the token."""
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    channel = grpc.secure_channel(address, credentials, [("grpc.use_local_subchannel_pool", 1)])
    never = threading.Event()

    def nothing() -> Iterator[bytes]:
        never.wait()
        yield from ()

    download = channel.stream_stream("/fedct.registry.v1.ModelRegistry/Download")
    pending = [download(nothing(), metadata=AUTH if i % 2 else ()) for i in range(32)]
    try:
        stub = _stub(address, pki)
        assert stub.ListModels(registry_pb2.ListModelsRequest(), metadata=AUTH, timeout=10)
    finally:
        for call in pending:
            call.cancel()
        never.set()
        channel.close()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-downloads-per-client", "0", "need 1 <= per client <= in all"),
        ("--max-downloads", "2", "4 per client and 2 in all"),
        ("--idle-timeout", "0", "idle timeout 0 s: must be more than 0"),
    ],
)
def test_bad_download_limits_are_refused(
    runs: Path,
    token_file: Path,
    capsys: pytest.CaptureFixture[str],
    option: str,
    value: str,
    message: str,
) -> None:
    serve = ["serve", "--runs", str(runs), "--address", "127.0.0.1:0"]
    serve += ["--token-file", str(token_file), option, value]
    assert _cli(server_commands.registry, serve) == 2
    assert message in capsys.readouterr().err


def stack_one_more(slots: registry.DownloadSlots, client: str) -> None:
    with slots.slot(client):
        pass


def test_downloads_are_counted_per_client_address() -> None:
    slots = registry.DownloadSlots(registry.Limits(per_client=2, total=3, idle_timeout=1))
    peers = ["ipv4:10.0.0.1:5000", "ipv4:10.0.0.1:5001", "ipv6:[::1]:6000"]
    clients = [registry.client_address(peer) for peer in peers]
    assert clients == ["10.0.0.1", "10.0.0.1", "::1"]
    with slots.slot(clients[0]), slots.slot(clients[1]):
        with pytest.raises(registry.RegistryError, match="10.0.0.1 has 2 downloads open"):
            stack_one_more(slots, clients[0])
        with (
            slots.slot(clients[2]),  # another client still gets one
            pytest.raises(registry.RegistryError, match="at most 3 downloads at once"),
        ):
            stack_one_more(slots, "10.0.0.9")
    assert not slots.open


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
    server = registry.create_server(
        registry.RegistryServicer(registry.RunsRoot(runs)), "127.0.0.1:0", TOKEN
    )
    try:
        argv = ["--registry", f"127.0.0.1:{server.port}", "--token-file", str(token_file)]
        assert _cli(commands.pull, [*argv, "--list"]) == 0
    finally:
        server.stop()
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
