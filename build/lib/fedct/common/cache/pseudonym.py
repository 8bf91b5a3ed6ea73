"""Salted pseudonyms so that nothing written by fedct carries an identifier in clear.

Each site keeps its own random salt next to its cache (``.salt``, never sent anywhere), so
the same patient gets the same pseudonym across runs at that site but the pseudonym cannot
be reversed or linked to another site's without the salt.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

SALT_FILE = ".salt"


def load_or_create_salt(cache_dir: Path) -> bytes:
    """The site's salt, created on first use with owner-only permissions."""
    path = Path(cache_dir) / SALT_FILE
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(salt.hex())
    return salt


def pseudonym(salt: bytes, kind: str, *values: str, length: int = 16) -> str:
    """A short hex pseudonym of ``values``; ``kind`` keeps patient and scan spaces apart."""
    digest = hashlib.sha256(salt + kind.encode() + b"\0" + "\0".join(values).encode())
    return kind[0] + digest.hexdigest()[:length]
