"""``fedct certs``: a private CA, TLS certificates it signs, and SuperNode key pairs.

One folder (``--out``) holds the federation's key material::

    ca.crt, ca.key                      the CA (created when a certificate is first issued)
    superlink.crt, superlink.key        the SuperLink's certificate, SANs from --superlink-san
    registry.crt, registry.key          the model registry's certificate (--registry-san)
    viewer.crt, viewer.key              ``fedct serve``'s certificate (--viewer-san)
    operators/NAME.crt, NAME.key        an operator's TLS client certificate (--operators)
    supernodes/SITE.key, SITE.pub       a hospital's SuperNode key pair (--sites)
    superexec.secret                    this host's SuperExec shared secret (--superexec-secret)

An existing CA in the folder is reused, so certificates and hospitals can be added later;
the registry's certificate is signed by the same CA, and clients verify both with ``ca.crt``.
SuperNode keys are ECDSA P-384 in OpenSSH format: ``SITE.key`` for ``flower-supernode
--auth-supernode-private-key``, ``SITE.pub`` for ``flwr supernode register``.  A hospital
can run ``fedct certs --out DIR --sites NAME`` itself and send only ``NAME.pub``.
The SuperExec secret (64 hex characters, no newline) authenticates the SuperExec to the
SuperLink or SuperNode beside it (``--superexec-auth-secret-file``); it never leaves its host.
Private keys and secrets are written with mode 600; no existing file is ever overwritten.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.markup import escape

from fedct.common.console import err, out

CA_NAME = "fedct federation CA"
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"(\*\.)?{DNS_LABEL}(\.{DNS_LABEL})*")

console = err


class CertsError(ValueError):
    """The key material cannot be written as asked: the message says why."""


@dataclass(frozen=True)
class Material:
    """One file to write: its path, its bytes, and whether it is secret (mode 600)."""

    path: Path
    data: bytes
    private: bool


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def subject_alt_names(names: list[str]) -> list[x509.GeneralName]:
    """IP addresses and DNS names (``*.`` allowed) for a subjectAltName extension."""
    if not names:
        raise CertsError("a certificate needs at least one subjectAltName")
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not DNS_NAME.fullmatch(name):
                raise CertsError(f"{name!r} is neither an IP address nor a DNS name") from None
            general.append(x509.DNSName(name))
    return general


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def create_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, certificate


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    sans: list[str],
    days: int,
    client: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS key (P-256) and certificate signed by the CA: a server's for ``sans``, or with
    ``client`` an operator's, usable only as a TLS client, named ``sans[0]``."""
    if client:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
        alt_names: list[x509.GeneralName] = [x509.DNSName(sans[0])]
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH
        alt_names = subject_alt_names(sans)
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def supernode_key_pair(site: str) -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) of a new ECDSA P-384 key, as
    ``flower-supernode`` and ``flwr supernode register`` read them."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" fedct-{site}\n".encode()


def load_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The CA already in ``out``, checked to be a matching EC key and certificate; None if
    there is none."""
    key_path, cert_path = out / "ca.key", out / "ca.crt"
    if not key_path.exists() and not cert_path.exists():
        return None
    if not (key_path.is_file() and cert_path.is_file()):
        raise CertsError(f"{out}: ca.key and ca.crt must both exist, or neither")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise CertsError(f"{out}: unreadable CA ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{key_path}: not an EC private key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise CertsError(f"{key_path} is not the key of {cert_path}")
    return key, certificate


def plan(
    out: Path,
    superlink_sans: list[str],
    registry_sans: list[str],
    sites: list[str],
    days: int,
    ca_days: int,
    superexec_secret: bool = False,
    operators: list[str] | None = None,
    viewer_sans: list[str] | None = None,
) -> list[Material]:
    """Every file to write, in memory; nothing is written here."""
    operators = operators or []
    for kind, names in (("site", sites), ("operator", operators)):
        for name in names:
            if not SITE_NAME.fullmatch(name):
                raise CertsError(
                    f"{kind} {name!r}: use letters, digits, '.', '_' and '-' (not first), "
                    "at most 63 characters"
                )
        if len(set(names)) != len(names):
            raise CertsError(f"--{kind}s names a {kind} twice")
    if days < 1 or ca_days < 1:
        raise CertsError("--days and --ca-days must be at least 1")
    materials: list[Material] = []
    certificates = {
        "superlink": superlink_sans,
        "registry": registry_sans,
        "viewer": viewer_sans or [],
    }
    if any(certificates.values()) or operators:
        ca = load_ca(out)
        if ca is None:
            ca = create_ca(ca_days)
            materials += [
                Material(out / "ca.key", _private_pem(ca[0]), True),
                Material(out / "ca.crt", _cert_pem(ca[1]), False),
            ]
        issued = [(name, sans, False) for name, sans in certificates.items() if sans]
        issued += [(f"operators/{name}", [name], True) for name in operators]
        for name, sans, client in issued:
            key, certificate = issue_certificate(*ca, sans, days, client)
            materials += [
                Material(out / f"{name}.key", _private_pem(key), True),
                Material(out / f"{name}.crt", _cert_pem(certificate), False),
            ]
    for site in sites:
        private, public = supernode_key_pair(site)
        materials += [
            Material(out / "supernodes" / f"{site}.key", private, True),
            Material(out / "supernodes" / f"{site}.pub", public, False),
        ]
    if superexec_secret:
        materials.append(Material(out / "superexec.secret", secrets.token_hex(32).encode(), True))
    return materials


def write_all(materials: list[Material]) -> None:
    """Write every file, refusing (before writing any) if one of them exists."""
    existing = [str(m.path) for m in materials if m.path.exists() or m.path.is_symlink()]
    if existing:
        raise CertsError(f"refusing to overwrite {', '.join(existing)}")
    for material in materials:
        material.path.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o600 if material.private else 0o644
        descriptor = os.open(material.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(material.data)
        os.chmod(material.path, mode)  # os.open's mode is filtered by the umask


def run(args: argparse.Namespace) -> int:
    """Write the requested material; 0 done, 2 refused (the reason is printed)."""
    superlink, registry, sites, operators, viewer = (
        _names(args.superlink_san),
        _names(args.registry_san),
        _names(args.sites),
        _names(args.operators),
        _names(args.viewer_san),
    )
    if not (superlink or registry or sites or operators or viewer or args.superexec_secret):
        console.print(
            "[red]error:[/red] give --superlink-san, --registry-san, --viewer-san, --sites, "
            "--operators or --superexec-secret"
        )
        return 2
    try:
        materials = plan(
            args.out,
            superlink,
            registry,
            sites,
            args.days,
            args.ca_days,
            args.superexec_secret,
            operators,
            viewer,
        )
        write_all(materials)
    except (CertsError, OSError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    for material in materials:
        out.print(escape(f"wrote {material.path}" + (" (mode 600)" if material.private else "")))
    return 0
