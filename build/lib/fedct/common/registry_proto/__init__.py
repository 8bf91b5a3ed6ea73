"""The model registry's protocol: generated messages and stubs, and what both ends check.

``registry_pb2`` / ``registry_pb2_grpc`` are generated from ``registry.proto`` by
``generate.sh`` and checked in.  This module holds the rules that the server
(``fedct registry serve``) and the client (``fedct pull``) must agree on: the model
reference syntax, the bearer-token header and token files, PEM files and loopback addresses.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal, NamedTuple

from cryptography import x509

CHUNK_SIZE = 1 << 20
AUTH_HEADER = "authorization"
BEARER = "Bearer "
POINTERS = ("best", "latest")

# A leading letter or digit keeps ".", ".." and hidden folders out; no "/" keeps paths out.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ROUND = re.compile(r"[0-9]{1,9}")
_TOKEN = re.compile(r"[!-~]{16,4096}")
REF_SYNTAX = "RUN:ROUND, RUN:best, RUN:latest or latest"


class BadInput(ValueError):
    """A file or argument given to a registry command is unusable; the message names it."""


class ModelRef(NamedTuple):
    """A parsed model reference; ``run`` is None only for the bare ``latest``."""

    run: str | None
    which: int | Literal["best", "latest"]

    def __str__(self) -> str:
        return "latest" if self.run is None else f"{self.run}:{self.which}"


def parse_model_ref(text: str) -> ModelRef:
    """``RUN:ROUND``, ``RUN:best``, ``RUN:latest`` or ``latest`` → a :class:`ModelRef`."""
    if text == "latest":
        return ModelRef(None, "latest")
    run, sep, which = text.rpartition(":")
    if not sep or not RUN_NAME.fullmatch(run):
        raise BadInput(
            f"model reference {text!r}: expected {REF_SYNTAX}; a run name is letters, digits, "
            "'.', '_' and '-', not starting with '.'"
        )
    if which in POINTERS:
        return ModelRef(run, which)  # type: ignore[arg-type]
    if not _ROUND.fullmatch(which):
        raise BadInput(f"model reference {text!r}: {which!r} is not a round number, best or latest")
    return ModelRef(run, int(which))


def read_token(path: Path) -> str:
    """The bearer token in ``path``; refused when group or others may read the file."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except OSError as exc:
        raise BadInput(f"{path}: cannot read token file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: token file is not ASCII text") from exc
    if mode & 0o077:
        raise BadInput(
            f"{path}: token file is accessible to group or others (mode {mode & 0o777:o}); "
            f"run chmod 600 {path}"
        )
    token = text.strip()
    if not _TOKEN.fullmatch(token):
        raise BadInput(
            f"{path}: a token is 16 to 4096 printable ASCII characters without spaces "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def read_pem(path: Path) -> bytes:
    """The contents of a PEM file (certificate or key)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror})") from exc
    if b"-----BEGIN " not in data:
        raise BadInput(f"{path}: not a PEM file")
    return data


def read_certificates(path: Path) -> bytes:
    """The contents of a PEM file of one or more X.509 certificates (a chain or CA bundle)."""
    data = read_pem(path)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BadInput(f"{path}: not a PEM certificate ({exc})") from exc
    return data


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` names this machine only (localhost, 127.0.0.0/8, [::1])."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise BadInput(f"address {address!r}: expected HOST:PORT")
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
