"""``fedct app``: which app bundle (FAB) a run sends, and release signatures over it.

A FAB is identified by the sha256 of its bytes.  ``flwr run`` builds it deterministically from
a checkout (Flower sorts the files and fixes their dates), so ``fedct app hash DIR`` prints the
hash of exactly the bundle that ``flwr run DIR`` would send.  A release manager signs that hash
with an ed25519 key (``fedct app keygen``, ``fedct app sign``); the signature travels with the
run in the run-config key ``app-signature``, and a hospital that trusts the key approves every
bundle it signs (client/approvals.py).  A signature is the text
``ed25519:KEY_ID:SIGNATURE`` (SIGNATURE base64url) over ``fedct app bundle sha256 HEX``;
KEY_ID is the first 16 hex digits of the sha256 of the raw public key.  Keys are OpenSSH
files: ``NAME.key`` (private, mode 600) and ``NAME.pub`` (one ``ssh-ed25519`` line).

Nothing here imports or runs code from a bundle: its ``pyproject.toml`` is read as data.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.cli.build import build_fab_from_disk
from rich.console import Console
from rich.markup import escape

from fedct.common.trust.certs import SITE_NAME, CertsError, Material, write_all

SIGNATURE_KEY = "app-signature"
_SIGNED_PREFIX = b"fedct app bundle sha256 "
_SCHEME = "ed25519"
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)

console = Console(stderr=True, soft_wrap=True)


class BundleError(ValueError):
    """A bundle, key or signature that cannot be used: the message says why."""


@dataclass(frozen=True)
class Bundle:
    """A FAB's bytes and what it says about itself."""

    content: bytes
    sha256: str
    fab_id: str  # publisher/name
    version: str


def read_bundle(content: bytes) -> Bundle:
    """The bundle's hash, and its app id and version from its ``pyproject.toml``."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            config = tomllib.loads(archive.read("pyproject.toml").decode())
        fab_id = f"{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}"
        version = str(config["project"]["version"])
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleError(f"not a Flower app bundle ({type(exc).__name__}: {exc})") from None
    return Bundle(content, hashlib.sha256(content).hexdigest(), fab_id, version)


def bundle_of(path: Path) -> Bundle:
    """The bundle of an app directory (built as ``flwr run`` builds it) or of a ``.fab``."""
    if path.is_dir():
        try:
            return read_bundle(build_fab_from_disk(path))
        except ValueError as exc:
            raise BundleError(f"{path}: {exc}") from None
    try:
        return read_bundle(path.read_bytes())
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror or exc}") from None
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None


def key_id(public_key: Ed25519PublicKey) -> str:
    return hashlib.sha256(public_key.public_bytes(*_RAW)).hexdigest()[:16]


def parse_public_key(line: str) -> Ed25519PublicKey:
    """An ``ssh-ed25519 …`` line (as in ``NAME.pub``)."""
    try:
        key = serialization.load_ssh_public_key(line.strip().encode())
    except (ValueError, TypeError, binascii.Error) as exc:
        raise BundleError(f"not an OpenSSH public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError("not an ed25519 key (release keys are ed25519)")
    return key


def public_key_line(public_key: Ed25519PublicKey, comment: str) -> str:
    ssh = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return f"{ssh.decode()} {comment}".strip()


def read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: not an ed25519 key (release keys are ed25519)")
    return key


def sign(private_key: Ed25519PrivateKey, fab_sha256: str) -> str:
    signature = private_key.sign(_SIGNED_PREFIX + fab_sha256.encode())
    encoded = base64.urlsafe_b64encode(signature).decode().rstrip("=")
    return f"{_SCHEME}:{key_id(private_key.public_key())}:{encoded}"


def trusted_signer(
    signatures: str, fab_sha256: str, trusted: Mapping[str, Ed25519PublicKey]
) -> tuple[str | None, str]:
    """(key id of a trusted key whose signature over ``fab_sha256`` verifies, "") or
    (None, why not).  ``signatures`` is the run config's comma-separated value."""
    tokens = [token.strip() for token in signatures.split(",") if token.strip()]
    if not tokens:
        return None, "it carries no release signature"
    problems = []
    for token in tokens:
        scheme, _, rest = token.partition(":")
        signer, _, encoded = rest.partition(":")
        if scheme != _SCHEME or not signer or not encoded:
            problems.append("a signature that is not ed25519:KEY_ID:SIGNATURE")
            continue
        if signer not in trusted:
            problems.append(f"signed by key {signer}, which this site does not trust")
            continue
        try:
            signature = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            trusted[signer].verify(signature, _SIGNED_PREFIX + fab_sha256.encode())
        except (InvalidSignature, binascii.Error, ValueError):
            problems.append(f"the signature of trusted key {signer} is not one of this bundle")
            continue
        return signer, ""
    return None, "; ".join(problems)


# --- the command ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        if args.app_command == "keygen":
            return _keygen(args.out, args.name)
        bundle = bundle_of(args.app)
        if args.app_command == "hash":
            print(bundle.sha256)
            console.print(escape(f"{bundle.fab_id} {bundle.version}, {len(bundle.content)} bytes"))
            return 0
        signature = sign(read_private_key(args.key), bundle.sha256)
    except (BundleError, CertsError, OSError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    print(signature)
    console.print(
        escape(
            f"signed {bundle.fab_id} {bundle.version} (sha256 {bundle.sha256}); put "
            f'{SIGNATURE_KEY} = "{signature}" in the run config (or --run-config '
            f"'{SIGNATURE_KEY}=\"{signature}\"')"
        ),
        soft_wrap=True,
    )
    return 0


def _keygen(out: Path, name: str) -> int:
    if not SITE_NAME.fullmatch(name):
        raise BundleError(f"key name {name!r}: use letters, digits, '.', '_' and '-' (not first)")
    private_key = Ed25519PrivateKey.generate()
    private = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = public_key_line(private_key.public_key(), name) + "\n"
    write_all(
        [
            Material(out / f"{name}.key", private, True),
            Material(out / f"{name}.pub", public.encode(), False),
        ]
    )
    console.print(
        escape(f"wrote {out / name}.key (mode 600) and {name}.pub, key id ")
        + escape(key_id(private_key.public_key()))
    )
    return 0
