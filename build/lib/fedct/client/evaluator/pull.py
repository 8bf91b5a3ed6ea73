"""``fedct pull``: download a checkpoint and its model card from the model registry, verified.

``--model REF --out FILE`` streams the weights into a temporary file next to FILE while
checking their size and sha256 against the model card; only a verified download is renamed
to FILE, and the card is written beside it as ``NAME.card.json`` (``model.safetensors`` →
``model.card.json``, the run directory's convention, so ``fedct evaluate`` finds it).
``--model REF --card`` prints the card; ``--list`` prints every checkpoint with what an
evaluator chooses by: run:round, when it was made, its tune AUC (the sites' pooled tune
splits) and external AUC per set (from its card), best/latest, bytes and sha256.  REF is
RUN:ROUND, RUN:best, RUN:latest or latest (the latest round of the newest run).
Exit status: 0 done; 1 the registry refused, or the data failed verification; 2 bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from fedct.common.registry_proto import (
    AUTH_HEADER,
    BEARER,
    BadInput,
    ModelRef,
    is_loopback,
    parse_model_ref,
    read_certificates,
    read_token,
    registry_pb2,
    registry_pb2_grpc,
)

console = Console(stderr=True, soft_wrap=True)


class PullError(RuntimeError):
    """What the registry sent failed verification."""


@dataclass(frozen=True)
class Pulled:
    run: str
    round: int
    size: int
    sha256: str
    seconds: float


def open_channel(registry: str, ca: bytes | None, *, insecure: bool = False) -> grpc.Channel:
    """A TLS channel trusting ``ca``; without it, plaintext to loopback (or if ``insecure``)."""
    loopback = is_loopback(registry)
    if ca is not None:
        return grpc.secure_channel(registry, grpc.ssl_channel_credentials(root_certificates=ca))
    if not loopback and not insecure:
        raise BadInput(
            f"registry {registry}: not loopback, so without TLS the token would cross the "
            "network in clear; give --ca CERT (or --insecure)"
        )
    return grpc.insecure_channel(registry)


def _auth(token: str) -> tuple[tuple[str, str]]:
    return ((AUTH_HEADER, BEARER + token),)


def card_file(out: Path) -> Path:
    """The card file beside weights written to ``out``: ``X.safetensors`` → ``X.card.json``."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".card.json")


def _card_sha256(card_json: str) -> str | None:
    try:
        card = json.loads(card_json)
    except json.JSONDecodeError:
        return None
    return card.get("sha256") if isinstance(card, dict) else None


def _receive(
    stream: Iterator[registry_pb2.DownloadChunk], meta: registry_pb2.DownloadMetadata, path: Path
) -> None:
    """Write the data chunks to ``path`` while checking them against ``meta``'s size and sha256."""
    digest, received = hashlib.sha256(), 0
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    timing = (TransferSpeedColumn(), TimeRemainingColumn())
    with (
        open(path, "wb") as handle,
        Progress(*columns, *timing, console=console, transient=True) as progress,
    ):
        task = progress.add_task(f"{meta.run}:{meta.round}", total=meta.size)
        for chunk in stream:
            if chunk.WhichOneof("kind") != "data":
                raise PullError("the registry sent metadata twice")
            received += len(chunk.data)
            if received > meta.size:
                raise PullError(f"the registry sent more than the {meta.size} bytes announced")
            digest.update(chunk.data)
            handle.write(chunk.data)
            progress.advance(task, len(chunk.data))
    if received != meta.size:
        raise PullError(f"the download ended after {received} of {meta.size} bytes")
    if digest.hexdigest() != meta.sha256:
        raise PullError(
            f"sha256 mismatch: the card records {meta.sha256}, "
            f"the data received hash to {digest.hexdigest()}"
        )


def pull(stub: registry_pb2_grpc.ModelRegistryStub, ref: ModelRef, out: Path, token: str) -> Pulled:
    """Download ``ref`` to ``out`` and its card to :func:`card_file`, or write nothing.

    Raises :class:`PullError` when the data fail verification and ``grpc.RpcError`` when
    the registry refuses.
    """
    started = time.monotonic()
    stream = stub.Download(registry_pb2.ModelRef(ref=str(ref)), metadata=_auth(token))
    card_path = card_file(out)
    parts = [path.with_name(f".{path.name}.{os.getpid()}.part") for path in (out, card_path)]
    try:
        first = next(stream, None)
        if first is None or first.WhichOneof("kind") != "metadata":
            raise PullError("the registry did not start the download with the metadata")
        meta = first.metadata
        if _card_sha256(meta.card_json) != meta.sha256:
            raise PullError(f"{meta.run}:{meta.round}: the sha256 sent differs from the card's")
        _receive(stream, meta, parts[0])
        parts[1].write_text(meta.card_json, encoding="utf-8")
        os.replace(parts[0], out)
        os.replace(parts[1], card_path)
    finally:
        stream.cancel()
        for path in parts:
            path.unlink(missing_ok=True)
    return Pulled(meta.run, meta.round, meta.size, meta.sha256, time.monotonic() - started)


LIST_COLUMNS = ("model", "created", "tune AUC", "external AUC", "flags", "bytes", "sha256")


def headline(card_json: str) -> tuple[str, str, str]:
    """(created, tune AUC, external AUC per set) of a model card, "–" where it has none."""
    try:
        card = json.loads(card_json)
    except json.JSONDecodeError:
        card = {}
    card = card if isinstance(card, dict) else {}
    pooled = (card.get("federated_evaluation") or {}).get("aggregated") or {}
    central = card.get("central_evaluation") or {}

    def fmt(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, int | float) and value == value else "–"

    external = ", ".join(
        f"{key.removesuffix('-auc_covid')} {fmt(value)}"
        for key, value in sorted(central.items())
        if key.endswith("-auc_covid")
    )
    return str(card.get("created") or "–"), fmt(pooled.get("tune-auc_covid")), external or "–"


def _print_list(stub: registry_pb2_grpc.ModelRegistryStub, token: str) -> None:
    """A header and one tab-separated line per checkpoint (:data:`LIST_COLUMNS`); the
    headline metrics come from each checkpoint's card."""
    listing = stub.ListModels(registry_pb2.ListModelsRequest(), metadata=_auth(token))
    print("\t".join(LIST_COLUMNS))
    for model in listing.models:
        ref = registry_pb2.ModelRef(ref=f"{model.run}:{model.round}")
        card = stub.GetCard(ref, metadata=_auth(token))
        flags = [name for name, on in (("best", model.best), ("latest", model.latest)) if on]
        row = [f"{model.run}:{model.round}", *headline(card.card_json)]
        print("\t".join([*row, ",".join(flags) or "–", str(model.size), model.sha256]))


def _describe(exc: grpc.RpcError, registry: str, tls: bool) -> str:
    code, details = exc.code(), exc.details()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"registry {registry} refused the token: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = "" if tls else " (a registry with TLS needs --ca CERT)"
        return f"registry {registry} is unreachable{hint}: {details}"
    return f"registry {registry}: {details} ({code.name})"


def _checked_out(args: argparse.Namespace) -> Path | None:
    """The --out file to download to; None for --list and --card."""
    if args.list:
        if args.out is not None or args.card:
            raise BadInput("--list takes neither --out nor --card")
        return None
    if args.card:
        return None
    if args.out is None:
        raise BadInput("--model needs --out FILE (download) or --card (print the card)")
    if args.out.is_dir():
        raise BadInput(f"{args.out}: is a folder; --out names the weights file")
    if not args.out.parent.is_dir():
        raise BadInput(f"{args.out.parent}: folder does not exist")
    return args.out


def run(args: argparse.Namespace) -> int:
    try:
        out = _checked_out(args)
        ref = None if args.list else parse_model_ref(args.model)
        token = read_token(args.token_file)
        ca = read_certificates(args.ca) if args.ca is not None else None
        channel = open_channel(args.registry, ca, insecure=args.insecure)
    except BadInput as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    with channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        try:
            if ref is None:
                _print_list(stub, token)
            elif out is None:
                card = stub.GetCard(registry_pb2.ModelRef(ref=str(ref)), metadata=_auth(token))
                print(card.card_json)
            else:
                done = pull(stub, ref, out, token)
                print(
                    f"pulled {done.run}:{done.round}: {done.size} bytes in {done.seconds:.1f} s, "
                    f"sha256 verified ({done.sha256}) → {out} + {card_file(out).name}"
                )
        except grpc.RpcError as exc:
            console.print(
                f"[red]error:[/red] {escape(_describe(exc, args.registry, ca is not None))}"
            )
            return 1
        except PullError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}; nothing written")
            return 1
    return 0
