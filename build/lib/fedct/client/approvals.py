"""A hospital's approved app versions, the decision on a run's app bundle, and their audit lines.

The approvals file (JSON, written only through ``fedct site``; this module is its one owner)::

    {"version": 1,
     "bundles": {"<sha256>": {"app": "fedct/fedct 0.1.0", "approved": "<UTC time>", "note": ""}},
     "keys": {"<key id>": {"public_key": "ssh-ed25519 AAAA… name", "trusted": "<UTC time>",
                           "note": ""}}}

A run's bundle (FAB) may run at the site when its sha256 is in ``bundles``, or when the run
config's ``app-signature`` holds a signature over that sha256 by a key in ``keys``
(common/trust/app_signing.py).  Before either, the bundle must agree with what the run says about it
(hash, app id, version): ``flwr-clientapp`` picks the installed app by those values.  The
decision reads only bytes: nothing from the bundle is imported.

Every decision and every change of the approvals is one line in the site's audit log, the
egress guard's file (client/egress.py), with an ``event`` field.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedct.client.egress import append_line
from fedct.common.trust.app_signing import (
    BundleError,
    key_id,
    parse_public_key,
    read_bundle,
    trusted_signer,
)

FORMAT_VERSION = 1


class ApprovalsError(ValueError):
    """The approvals file cannot be read or changed as asked: the message says why."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Approvals:
    """The approved bundle hashes and the trusted release keys of one site."""

    bundles: dict[str, dict[str, str]] = field(default_factory=dict)
    keys: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Approvals:
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ApprovalsError(f"{path}: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApprovalsError(f"{path}: not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ApprovalsError(f"{path}: not a version {FORMAT_VERSION} approvals file")
        approvals = cls(dict(data.get("bundles", {})), dict(data.get("keys", {})))
        for kid, entry in approvals.keys.items():
            try:
                if key_id(parse_public_key(entry["public_key"])) != kid:
                    raise ApprovalsError(f"{path}: key {kid} is listed under another key's id")
            except (BundleError, KeyError, TypeError) as exc:
                raise ApprovalsError(f"{path}: key {kid}: {exc}") from None
        return approvals

    @classmethod
    def load_or_empty(cls, path: Path) -> Approvals:
        return cls.load(path) if path.exists() else cls()

    def save(self, path: Path) -> None:
        """Replace ``path`` atomically, so that a SuperNode never reads half a file."""
        data = {"version": FORMAT_VERSION, "bundles": self.bundles, "keys": self.keys}
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(data, out, indent=2, sort_keys=True)
                out.write("\n")
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def trusted_keys(self) -> dict[str, Ed25519PublicKey]:
        return {kid: parse_public_key(entry["public_key"]) for kid, entry in self.keys.items()}


@dataclass(frozen=True)
class RecordedRun:
    """What the SuperLink says about a run's bundle, which the bundle's content must match."""

    fab_hash: str  # the run's
    served_hash: str  # the hash the SuperLink sent with the bundle
    fab_id: str
    fab_version: str
    signatures: str  # the run config's app-signature


@dataclass(frozen=True)
class Decision:
    """Whether a run's bundle may run here; ``by`` says on what grounds, ``reason`` why not."""

    approved: bool
    fab_sha256: str
    app: str
    by: str = ""
    reason: str = ""

    def log_line(self, run_id: int) -> str:
        """The one line of the SuperNode's log."""
        bundle = f"app bundle sha256 {self.fab_sha256} ({self.app}) of run {run_id}"
        if self.approved:
            return f"fedct: {bundle} is approved by {self.by}"
        return f"fedct: REFUSED {bundle}: {self.reason}"

    def error_reason(self) -> str:
        """What the coordinator is told."""
        return f"the site refused app bundle sha256 {self.fab_sha256}: {self.reason}"


def decide(approvals: Approvals, content: bytes, run: RecordedRun) -> Decision:
    """May this bundle run at the site, for this run?"""
    try:
        bundle = read_bundle(content)
    except BundleError as exc:
        return Decision(False, hashlib.sha256(content).hexdigest(), "?", reason=str(exc))
    app = f"{bundle.fab_id} {bundle.version}"
    disagree = [
        what
        for what, recorded, actual in (
            ("hash", run.fab_hash, bundle.sha256),
            ("served hash", run.served_hash, bundle.sha256),
            ("app id", run.fab_id, bundle.fab_id),
            ("version", run.fab_version, bundle.version),
        )
        if recorded != actual
    ]
    if disagree:
        reason = f"the run's recorded {', '.join(disagree)} disagree with the bundle's content"
        return Decision(False, bundle.sha256, app, reason=reason)
    if bundle.sha256 in approvals.bundles:
        return Decision(True, bundle.sha256, app, by="its sha256")
    signer, why = trusted_signer(run.signatures, bundle.sha256, approvals.trusted_keys())
    if signer is not None:
        return Decision(True, bundle.sha256, app, by=f"release key {signer}")
    return Decision(False, bundle.sha256, app, reason=f"not approved at this site, and {why}")


def audit(audit_log: Path, event: str, **fields: Any) -> None:
    """One audit line: ``time``, ``event`` and ``fields``."""
    append_line(audit_log, {"time": now(), "event": event, **fields})


def audit_decision(audit_log: Path, decision: Decision, run_id: int) -> None:
    fields: dict[str, Any] = {"run": run_id, "fab_sha256": decision.fab_sha256, "app": decision.app}
    if decision.approved:
        audit(audit_log, "bundle-accepted", **fields, by=decision.by)
    else:
        audit(audit_log, "bundle-refused", **fields, reason=decision.reason)
