"""``fedct registry serve``: a read-only gRPC service for the runs' checkpoints and model cards.

The ``ModelRegistry`` service (``common/registry_proto/registry.proto``) answers
``ListModels``, ``GetCard`` and ``Download`` from the run directories under ``--runs`` (the
layout of ``common/run/directory.py``) and never writes to them.  Every call must carry
``authorization: Bearer <token>``, compared in constant time; TLS when ``--tls-cert`` and
``--tls-key`` are given, and without them only on a loopback address unless ``--insecure``.

It serves only its own files.  Run names cannot hold paths, and every file is opened one
folder at a time from the runs folder without following a symbolic link (``O_NOFOLLOW`` on
each step, relative to the folder above), so what is opened lies inside ``--runs`` whatever
the names point to; then the open file itself is checked (``fstat`` on the descriptor): a
regular file with exactly one name, so neither a symbolic nor a hard link to a file elsewhere
is served.

A download that the client stops reading must not hold anything others need.  The server is
asynchronous (``grpc.aio``), so a stalled call holds no thread; a client may have at most
``per_client`` downloads open at once and the registry at most ``total``; and a download
whose client takes no data for ``idle_timeout`` seconds is ended (``DEADLINE_EXCEEDED``).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hmac
import json
import logging
import os
import re
import signal
import stat
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
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
from fedct.common.run.directory import ROUND_CARD, RunDirectory

log = logging.getLogger("fedct.registry")
console = Console(stderr=True, soft_wrap=True)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted in a run folder must not wait for a writer.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class RegistryError(Exception):
    """A request that cannot be served; ``code`` is the gRPC status the call ends with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """How many downloads may be open at once, per client address and in all, and how long a
    download may wait for its client to take data."""

    per_client: int = 4
    total: int = 64
    idle_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.per_client < 1 or self.total < self.per_client:
            raise BadInput(
                f"download limits: {self.per_client} per client and {self.total} in all; "
                "need 1 <= per client <= in all"
            )
        if not self.idle_timeout > 0:
            raise BadInput(f"idle timeout {self.idle_timeout:g} s: must be more than 0")


@dataclass(frozen=True)
class Model:
    """One checkpoint: its weights file's name and size, its model card's text and sha256."""

    run: str
    round: int
    weights: str
    size: int
    card_json: str
    sha256: str


def _open_at(folder: int, name: str, flags: int, shown: str) -> int:
    """``name`` in the open folder ``folder``, never through a symbolic link."""
    try:
        return os.open(name, flags, dir_fd=folder)
    except FileNotFoundError:
        raise RegistryError(grpc.StatusCode.NOT_FOUND, f"{shown} does not exist") from None
    except OSError as exc:
        try:
            linked = stat.S_ISLNK(os.lstat(name, dir_fd=folder).st_mode)
        except OSError:
            linked = False
        reason = "is a symbolic link" if linked else f"cannot be opened ({exc.strerror})"
        if exc.errno == errno.ENOTDIR and not linked:
            reason = "is not a folder"
        raise RegistryError(grpc.StatusCode.PERMISSION_DENIED, f"{shown} {reason}") from None


class RunsRoot:
    """The files of one folder of run directories, opened so that only its own are served."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise BadInput(f"{root}: runs folder does not exist")
        self.root = root.resolve()

    @contextmanager
    def _run_folder(self, run: str) -> Iterator[int]:
        """The run's folder, open: a real folder directly inside the root."""
        root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            folder = _open_at(root, run, _DIRECTORY, run)
        except RegistryError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            raise RegistryError(grpc.StatusCode.NOT_FOUND, f"no run {run!r}") from None
        finally:
            os.close(root)
        try:
            yield folder
        finally:
            os.close(folder)

    def open(self, run: str, name: str) -> BinaryIO:
        """The file ``name`` of run ``run``, if the opened file is a regular file with no
        other name; else :class:`RegistryError`."""
        shown = f"{run}/{name}"
        with self._run_folder(run) as folder:
            handle = _open_at(folder, name, _FILE, shown)
        try:
            opened = os.fstat(handle)
            if not stat.S_ISREG(opened.st_mode):
                raise RegistryError(
                    grpc.StatusCode.PERMISSION_DENIED, f"{shown} is not a regular file"
                )
            if opened.st_nlink != 1:
                raise RegistryError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{shown} is a hard link ({opened.st_nlink} names)",
                )
        except BaseException:
            os.close(handle)
            raise
        return os.fdopen(handle, "rb")

    def _runs(self) -> list[str]:
        """Names of the run folders: real folders, not symbolic links."""
        with os.scandir(self.root) as entries:
            return sorted(
                entry.name
                for entry in entries
                if RUN_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
            )

    def _rounds(self, run: str) -> list[int]:
        with self._run_folder(run) as folder:
            found = (ROUND_CARD.fullmatch(name) for name in os.listdir(folder))
            return sorted(int(match[1]) for match in found if match)

    def _pointer(self, run: str, name: str) -> int | None:
        """The round that ``best.json`` or ``latest.json`` names, None without the file."""
        try:
            with self.open(run, name) as handle:
                return int(json.loads(handle.read())["round"])
        except RegistryError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RegistryError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{run}/{name} names no round"
            ) from exc

    def _newest_run(self) -> str:
        """The run whose ``latest.json`` was written last."""
        written = []
        for run in self._runs():
            try:
                with self.open(run, "latest.json") as handle:
                    written.append((os.fstat(handle.fileno()).st_mtime, run))
            except RegistryError:
                continue
        if not written:
            raise RegistryError(grpc.StatusCode.NOT_FOUND, "no run has a complete round yet")
        return max(written)[1]

    def _model(self, run: str, server_round: int) -> Model:
        names = RunDirectory(Path(run))  # the run directory's file names, nothing opened
        card_name = names.card_path(server_round).name
        weights = names.weights_path(server_round).name
        try:
            with self.open(run, card_name) as handle:
                card_json = handle.read().decode("utf-8")
            with self.open(run, weights) as handle:
                size = os.fstat(handle.fileno()).st_size
        except RegistryError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            raise RegistryError(
                grpc.StatusCode.NOT_FOUND, f"run {run!r} has no checkpoint of round {server_round}"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{run}/{card_name} is unreadable"
            ) from exc
        try:
            card: Any = json.loads(card_json)
        except json.JSONDecodeError:
            card = None
        sha256 = card.get("sha256") if isinstance(card, dict) else None
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise RegistryError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{run}/{card_name} records no sha256"
            )
        return Model(run, server_round, weights, size, card_json, sha256)

    def resolve(self, ref: ModelRef) -> Model:
        run = ref.run if ref.run is not None else self._newest_run()
        with self._run_folder(run):
            pass  # "no run", before "no checkpoint"
        if isinstance(ref.which, int):
            return self._model(run, ref.which)
        server_round = self._pointer(run, f"{ref.which}.json")
        if server_round is None:
            raise RegistryError(grpc.StatusCode.NOT_FOUND, f"run {run!r} has no {ref.which} round")
        return self._model(run, server_round)

    def models(self) -> list[registry_pb2.ModelInfo]:
        """Every checkpoint that can be served; what cannot is logged and left out."""
        infos = []
        for run in self._runs():
            try:
                best = self._pointer(run, "best.json")
                latest = self._pointer(run, "latest.json")
                rounds = self._rounds(run)
            except RegistryError as exc:
                log.warning("not listing run %s: %s", run, exc)
                continue
            for server_round in rounds:
                try:
                    model = self._model(run, server_round)
                except RegistryError as exc:
                    log.warning("not listing %s:%d: %s", run, server_round, exc)
                    continue
                infos.append(
                    registry_pb2.ModelInfo(
                        run=run,
                        round=server_round,
                        size=model.size,
                        sha256=model.sha256,
                        best=server_round == best,
                        latest=server_round == latest,
                    )
                )
        return infos


def client_address(peer: str) -> str:
    """The client's address in a gRPC peer string (``ipv4:10.1.2.3:5555`` → ``10.1.2.3``,
    ``ipv6:[::1]:5555`` → ``::1``): downloads are counted per address, whatever the port."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].removeprefix("[").removesuffix("]")
    return kind


class DownloadSlots:
    """The downloads in progress, counted per client address (used on the server's event
    loop only, so it needs no lock)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open: Counter[str] = Counter()

    @contextmanager
    def slot(self, client: str) -> Iterator[None]:
        """Held while one download of ``client`` runs; RESOURCE_EXHAUSTED over a limit."""
        if self.open[client] >= self.limits.per_client:
            raise RegistryError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{client} has {self.open[client]} downloads open, the most one client may "
                "have; finish one first",
            )
        if self.open.total() >= self.limits.total:
            raise RegistryError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the registry serves at most {self.limits.total} downloads at once; try again",
            )
        self.open[client] += 1
        try:
            yield
        finally:
            self.open[client] -= 1
            if not self.open[client]:
                del self.open[client]


async def _served(context: grpc.aio.ServicerContext, answer: Callable[[], Awaitable[Any]]) -> Any:
    """``answer()``, or the call ended with the status of a :class:`RegistryError` or of a
    bad model reference."""
    try:
        return await answer()
    except RegistryError as exc:
        log.warning("refused a call of %s: %s", client_address(context.peer()), exc)
        await context.abort(exc.code, str(exc))
    except BadInput as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class RegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    """The ``ModelRegistry`` service over one :class:`RunsRoot`."""

    def __init__(self, root: RunsRoot, limits: Limits | None = None) -> None:
        self.root = root
        self.downloads = DownloadSlots(limits or Limits())

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListModelsResponse:
        return registry_pb2.ListModelsResponse(models=self.root.models())

    async def GetCard(
        self, request: registry_pb2.ModelRef, context: grpc.aio.ServicerContext
    ) -> registry_pb2.Card:
        async def card() -> registry_pb2.Card:
            model = self.root.resolve(parse_model_ref(request.ref))
            return registry_pb2.Card(run=model.run, round=model.round, card_json=model.card_json)

        return await _served(context, card)

    async def Download(
        self, request: registry_pb2.ModelRef, context: grpc.aio.ServicerContext
    ) -> None:
        await _served(context, partial(self._download, request, context))

    async def _download(
        self, request: registry_pb2.ModelRef, context: grpc.aio.ServicerContext
    ) -> None:
        model = self.root.resolve(parse_model_ref(request.ref))
        client = client_address(context.peer())
        with self.downloads.slot(client), self.root.open(model.run, model.weights) as handle:
            size = os.fstat(handle.fileno()).st_size
            log.info("download %s:%d (%d bytes) to %s", model.run, model.round, size, client)
            metadata = registry_pb2.DownloadMetadata(
                run=model.run,
                round=model.round,
                size=size,
                sha256=model.sha256,
                card_json=model.card_json,
            )
            await self._send(context, registry_pb2.DownloadChunk(metadata=metadata))
            for data in self.chunks(handle):
                await self._send(context, registry_pb2.DownloadChunk(data=data))

    async def _send(
        self, context: grpc.aio.ServicerContext, chunk: registry_pb2.DownloadChunk
    ) -> None:
        """Write one message; a client that takes none of it within the idle timeout ends
        the download."""
        timeout = self.downloads.limits.idle_timeout
        try:
            await asyncio.wait_for(context.write(chunk), timeout)
        except TimeoutError:
            raise RegistryError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the client took no data for {timeout:g} s; download ended",
            ) from None

    def chunks(self, handle: BinaryIO) -> Iterator[bytes]:
        """The bytes sent for an open weights file, in pieces of at most ``CHUNK_SIZE``."""
        return iter(partial(handle.read, CHUNK_SIZE), b"")


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call that lacks ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = (BEARER + token).encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER)
        if handler is None:
            return None
        if presented is not None and hmac.compare_digest(presented.encode(), self._expected):
            return handler
        reason = "missing bearer token" if presented is None else "invalid bearer token"
        log.warning("refused %s: %s", handler_call_details.method, reason)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

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


class RegistryServer:
    """A started registry, serving on its own event loop in a thread of its own, so that the
    command and the tests that start it stay synchronous."""

    def __init__(
        self,
        servicer: RegistryServicer,
        address: str,
        token: str,
        tls: tuple[bytes, bytes] | None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fedct-registry", daemon=True
        )
        self._thread.start()
        self._stopped = False
        try:
            start = self._start(servicer, address, token, tls)
            self._server, self.port = asyncio.run_coroutine_threadsafe(start, self._loop).result()
        except BaseException:
            self._end_loop()
            raise

    async def _start(
        self,
        servicer: RegistryServicer,
        address: str,
        token: str,
        tls: tuple[bytes, bytes] | None,
    ) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
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
        await server.start()
        return server, port

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def stop(self, grace: float | None = None) -> None:
        """Stop serving, letting calls in progress finish for ``grace`` seconds; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result()
        self._end_loop()

    def wait(self) -> None:
        """Block until :meth:`stop` has run (in a signal handler, say)."""
        self._thread.join()


def create_server(
    servicer: RegistryServicer,
    address: str,
    token: str,
    tls: tuple[bytes, bytes] | None = None,
    *,
    insecure: bool = False,
) -> RegistryServer:
    """Start serving on ``address`` (port 0: a free one, then ``.port`` says which).

    ``tls`` is (private key, certificate chain) in PEM.  Without it, only a loopback address
    is accepted unless ``insecure``, since the token would cross the network in clear.
    """
    if tls is None and not insecure and not is_loopback(address):
        raise BadInput(
            f"address {address}: not loopback, so without TLS the token would cross the "
            "network in clear; give --tls-cert and --tls-key (or --insecure)"
        )
    return RegistryServer(servicer, address, token, tls)


def run(args: argparse.Namespace) -> int:
    try:
        if (args.tls_cert is None) != (args.tls_key is None):
            raise BadInput("--tls-cert and --tls-key must be given together")
        tls = read_tls(args.tls_cert, args.tls_key) if args.tls_cert else None
        token = read_token(args.token_file)
        limits = Limits(
            **{
                name: value
                for name, value in (
                    ("per_client", args.max_downloads_per_client),
                    ("total", args.max_downloads),
                    ("idle_timeout", args.idle_timeout),
                )
                if value is not None
            }
        )
        servicer = RegistryServicer(RunsRoot(args.runs), limits)
        server = create_server(servicer, args.address, token, tls, insecure=args.insecure)
    except BadInput as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    host = args.address.rpartition(":")[0]
    console.print(
        escape(f"registry serving {args.runs} on {host}:{server.port} ")
        + ("with TLS" if tls else "[yellow]in plaintext[/yellow]")
        + escape(
            f"; at most {limits.per_client} downloads per client and {limits.total} in all, "
            f"each ended after {limits.idle_timeout:g} s without progress; Ctrl-C stops it"
        )
    )
    signal.signal(signal.SIGTERM, lambda *_: server.stop(grace=5))
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop(grace=2)
    return 0
