"""``fedct registry serve``: a read-only gRPC service for the runs' checkpoints and model cards.

The ``ModelRegistry`` service (``common/registry_proto/registry.proto``) answers
``ListModels``, ``GetCard`` and ``Download`` from the run directories under ``--runs`` (the
layout of ``common/run/directory.py``) and never writes to them.  Every call must carry
``authorization: Bearer <token>``, compared in constant time; TLS when ``--tls-cert`` and
``--tls-key`` are given, and without them only on a loopback address unless ``--insecure``.
No file outside ``--runs`` is ever served: run names cannot hold paths, and a symlink that
leads out of the root is refused.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.markup import escape

from fedct.common.registry_proto import (
    AUTH_HEADER,
    BEARER,
    CHUNK_SIZE,
    RUN_NAME,
    BadInput,
    ModelRef,
    is_loopback,
    parse_model_ref,
    read_certificates,
    read_pem,
    read_token,
    registry_pb2,
    registry_pb2_grpc,
)
from fedct.common.run.directory import ROUND_CARD, CheckpointError, RunDirectory

log = logging.getLogger("fedct.registry")
console = Console(stderr=True, soft_wrap=True)

_SHA256 = re.compile(r"[0-9a-f]{64}")


class RegistryError(Exception):
    """A request that cannot be served; ``code`` is the gRPC status the call ends with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Model:
    """One checkpoint: its weights file and its model card's text and recorded sha256."""

    run: str
    round: int
    weights: Path
    card_json: str
    sha256: str


class RunsRoot:
    """Resolves model references to files inside one folder of run directories."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise BadInput(f"{root}: runs folder does not exist")
        self.root = root.resolve()

    def _within(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root)

    def _inside(self, path: Path) -> Path:
        if not self._within(path):
            shown = path.relative_to(self.root)
            raise RegistryError(grpc.StatusCode.PERMISSION_DENIED, f"{shown} leads outside --runs")
        return path.resolve()

    def _runs(self) -> list[str]:
        """Names of the run folders; a symlink leading out of the root is not one."""
        return sorted(
            path.name
            for path in self.root.iterdir()
            if RUN_NAME.fullmatch(path.name) and path.is_dir() and self._within(path)
        )

    def _run_dir(self, run: str) -> RunDirectory:
        path = self.root / run
        if not path.is_dir():
            raise RegistryError(grpc.StatusCode.NOT_FOUND, f"no run {run!r}")
        return RunDirectory(self._inside(path))

    def _pointer(self, run: str, run_dir: RunDirectory, name: str) -> int | None:
        """The round that ``best.json`` or ``latest.json`` names, None without the file."""
        path = run_dir.path / name
        if not path.exists():
            return None
        self._inside(path)
        try:
            return int((run_dir.read_json(name) or {})["round"])
        except (CheckpointError, KeyError, TypeError, ValueError) as exc:
            raise RegistryError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{run}/{name} names no round"
            ) from exc

    def _newest_run(self) -> str:
        """The run whose ``latest.json`` was written last."""
        written = [
            (latest.stat().st_mtime, run)
            for run in self._runs()
            if (latest := self.root / run / "latest.json").is_file() and self._within(latest)
        ]
        if not written:
            raise RegistryError(grpc.StatusCode.NOT_FOUND, "no run has a complete round yet")
        return max(written)[1]

    def _model(self, run: str, run_dir: RunDirectory, server_round: int) -> Model:
        card_path, weights = run_dir.card_path(server_round), run_dir.weights_path(server_round)
        if not card_path.is_file() or not weights.is_file():
            raise RegistryError(
                grpc.StatusCode.NOT_FOUND, f"run {run!r} has no checkpoint of round {server_round}"
            )
        card_path, weights = self._inside(card_path), self._inside(weights)
        try:
            card_json = card_path.read_text(encoding="utf-8")
            card: Any = json.loads(card_json)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{run}/{card_path.name} is unreadable"
            ) from exc
        sha256 = card.get("sha256") if isinstance(card, dict) else None
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise RegistryError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{run}/{card_path.name} records no sha256"
            )
        return Model(run, server_round, weights, card_json, sha256)

    def resolve(self, ref: ModelRef) -> Model:
        run = ref.run if ref.run is not None else self._newest_run()
        run_dir = self._run_dir(run)
        if isinstance(ref.which, int):
            return self._model(run, run_dir, ref.which)
        server_round = self._pointer(run, run_dir, f"{ref.which}.json")
        if server_round is None:
            raise RegistryError(grpc.StatusCode.NOT_FOUND, f"run {run!r} has no {ref.which} round")
        return self._model(run, run_dir, server_round)

    def models(self) -> list[registry_pb2.ModelInfo]:
        """Every readable checkpoint; what cannot be read is logged and left out."""
        infos = []
        for run in self._runs():
            try:
                run_dir = self._run_dir(run)
                best = self._pointer(run, run_dir, "best.json")
                latest = self._pointer(run, run_dir, "latest.json")
            except RegistryError as exc:
                log.warning("not listing run %s: %s", run, exc)
                continue
            found = (ROUND_CARD.fullmatch(path.name) for path in run_dir.path.iterdir())
            for server_round in sorted(int(match[1]) for match in found if match):
                try:
                    model = self._model(run, run_dir, server_round)
                except RegistryError as exc:
                    log.warning("not listing %s:%d: %s", run, server_round, exc)
                    continue
                infos.append(
                    registry_pb2.ModelInfo(
                        run=run,
                        round=server_round,
                        size=model.weights.stat().st_size,
                        sha256=model.sha256,
                        best=server_round == best,
                        latest=server_round == latest,
                    )
                )
        return infos


@contextmanager
def _aborting(context: grpc.ServicerContext) -> Iterator[None]:
    """End the call with the status of a :class:`RegistryError` or a bad model reference."""
    try:
        yield
    except RegistryError as exc:
        context.abort(exc.code, str(exc))
    except BadInput as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class RegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    """The ``ModelRegistry`` service over one :class:`RunsRoot`."""

    def __init__(self, root: RunsRoot) -> None:
        self.root = root

    def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> registry_pb2.ListModelsResponse:
        return registry_pb2.ListModelsResponse(models=self.root.models())

    def GetCard(
        self, request: registry_pb2.ModelRef, context: grpc.ServicerContext
    ) -> registry_pb2.Card:
        with _aborting(context):
            model = self.root.resolve(parse_model_ref(request.ref))
        return registry_pb2.Card(run=model.run, round=model.round, card_json=model.card_json)

    def Download(
        self, request: registry_pb2.ModelRef, context: grpc.ServicerContext
    ) -> Iterator[registry_pb2.DownloadChunk]:
        with _aborting(context):
            model = self.root.resolve(parse_model_ref(request.ref))
            try:
                handle = open(model.weights, "rb")  # noqa: SIM115 (closed below, after streaming)
            except OSError as exc:
                raise RegistryError(
                    grpc.StatusCode.INTERNAL, f"{model.run}/{model.weights.name}: {exc.strerror}"
                ) from exc
        with handle:
            size = os.fstat(handle.fileno()).st_size
            log.info(
                "download %s:%d (%d bytes) to %s", model.run, model.round, size, context.peer()
            )
            yield registry_pb2.DownloadChunk(
                metadata=registry_pb2.DownloadMetadata(
                    run=model.run,
                    round=model.round,
                    size=size,
                    sha256=model.sha256,
                    card_json=model.card_json,
                )
            )
            for data in self.chunks(handle):
                yield registry_pb2.DownloadChunk(data=data)

    def chunks(self, handle: BinaryIO) -> Iterator[bytes]:
        """The bytes sent for an open weights file, in pieces of at most ``CHUNK_SIZE``."""
        return iter(partial(handle.read, CHUNK_SIZE), b"")


class TokenInterceptor(grpc.ServerInterceptor):
    """Ends every call that lacks ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = (BEARER + token).encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata).get(AUTH_HEADER)
        if handler is None:
            return None
        if presented is not None and hmac.compare_digest(presented.encode(), self._expected):
            return handler
        reason = "missing bearer token" if presented is None else "invalid bearer token"
        log.warning("refused %s: %s", handler_call_details.method, reason)

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        # The denial must have the method's shape, or the client sees a protocol error.
        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return make(deny, request_deserializer=handler.request_deserializer)


def read_tls(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """(private key, certificate chain) in PEM, checked to belong together."""
    chain = read_certificates(cert)
    key_pem = read_pem(key)
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BadInput(f"{key}: not an unencrypted PEM private key") from exc
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    leaf = x509.load_pem_x509_certificates(chain)[0]
    if private_key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise BadInput(f"{key}: not the private key of the first certificate in {cert}")
    return key_pem, chain


def create_server(
    servicer: RegistryServicer,
    address: str,
    token: str,
    tls: tuple[bytes, bytes] | None = None,
    *,
    insecure: bool = False,
) -> tuple[grpc.Server, int]:
    """Start serving on ``address`` (port 0: a free one); returns the server and its port.

    ``tls`` is (private key, certificate chain) in PEM.  Without it, only a loopback address
    is accepted unless ``insecure``, since the token would cross the network in clear.
    """
    if tls is None and not insecure and not is_loopback(address):
        raise BadInput(
            f"address {address}: not loopback, so without TLS the token would cross the "
            "network in clear; give --tls-cert and --tls-key (or --insecure)"
        )
    server = grpc.server(
        ThreadPoolExecutor(max_workers=8),
        interceptors=[TokenInterceptor(token)],
        # Otherwise a second registry could bind the same port and take half the calls.
        options=[("grpc.so_reuseport", 0)],
    )
    registry_pb2_grpc.add_ModelRegistryServicer_to_server(servicer, server)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    except RuntimeError as exc:
        raise BadInput(f"address {address}: cannot listen ({exc})") from exc
    server.start()
    return server, port


def run(args: argparse.Namespace) -> int:
    try:
        if (args.tls_cert is None) != (args.tls_key is None):
            raise BadInput("--tls-cert and --tls-key must be given together")
        tls = read_tls(args.tls_cert, args.tls_key) if args.tls_cert else None
        token = read_token(args.token_file)
        servicer = RegistryServicer(RunsRoot(args.runs))
        server, port = create_server(servicer, args.address, token, tls, insecure=args.insecure)
    except BadInput as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    host = args.address.rpartition(":")[0]
    console.print(
        escape(f"registry serving {args.runs} on {host}:{port} ")
        + ("with TLS" if tls else "[yellow]in plaintext[/yellow]")
        + "; Ctrl-C stops it"
    )
    signal.signal(signal.SIGTERM, lambda *_: server.stop(grace=5))
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=2).wait()
    return 0
