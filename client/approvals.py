"""A hospital's approved app versions, the decision on a run's app bundle, and their audit lines.

The approvals file (JSON, written only through ``fedct site``; this module is its one owner)::

    {"version": 2,
     "bundles": {"<sha256>": {"app": "fedct/fedct 0.1.0", "approved": "<UTC time>", "note": ""}},
     "keys": {"<key id>": {"public_key": "ssh-ed25519 AAAA… name", "trusted": "<UTC time>",
                           "note": ""}},
     "revoked": {"<sha256>": {"app": "fedct/fedct 0.1.0", "revoked": "<UTC time>", "note": ""}},
     "policies": {"fedct/fedct": {"min_version": "0.2.0", "newest_only": true,
                                  "set": "<UTC time>", "note": ""}}}

Version 1 (fedct 0.1.0) had only ``bundles`` and ``keys``; it is read as version 2 with no
revocations and no policies, and ``fedct site`` writes it back as version 2.

A run's bundle (FAB) may run at the site when it agrees with what the run says about it (hash,
app id, version: ``flwr-clientapp`` picks the installed app by those values), its sha256 is not
in ``revoked`` (a revocation wins over everything else), it is approved (its sha256 is in
``bundles``, or the run config's ``app-signature`` holds a signature over that sha256 by a key
in ``keys``: common/trust/app_signing.py), and its version satisfies the app's policy: not
older than ``min_version``, and with ``newest_only`` not older than the newest release of that
app that the site approved by hash or has run (the ``bundle-accepted`` lines of its audit log),
so that an old signed release cannot be replayed.  The decision reads only bytes: nothing from
the bundle is imported.

Anyone who can write the approvals approves code, so they are read only as ssh reads a key
file: the file and every folder above it must be owned by this user or root and writable by
no one else (a folder with the sticky bit, such as /tmp, excepted).

Every decision and every change of the approvals is one line in the site's audit log, the
egress guard's file (client/egress.py), with an ``event`` field; a change's line carries the
sha256 of the file it wrote, and a decision's the sha256 of the file it read, so an auditor
can tell an approvals file that ``fedct site`` did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from packaging.version import InvalidVersion, Version

from fedct.client.audit_log import append_line
from fedct.common.trust.app_signing import (
    BundleError,
    key_id,
    parse_public_key,
    read_bundle,
    trusted_signer,
)

FORMAT_VERSION = 2
_SECTIONS = {1: ("bundles", "keys"), 2: ("bundles", "keys", "revoked", "policies")}
SHA256 = re.compile(r"[0-9a-f]{64}")
KEY_ID = re.compile(r"[0-9a-f]{16}")
APP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class ApprovalsError(ValueError):
    """The approvals file cannot be read or changed as asked: the message says why."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def parse_version(text: str) -> Version:
    """A PEP 440 version (``0.10.0`` is newer than ``0.9.0``, ``1.0rc1`` older than ``1.0``)."""
    try:
        return Version(text)
    except InvalidVersion:
        raise ApprovalsError(f"{text!r} is not a version (PEP 440, e.g. 0.2.0)") from None


# --- only this user may change what is approved ----------------------------------------------


def _unsafe(status: os.stat_result, folder: bool) -> str | None:
    """Why a file or folder with ``status`` could be changed by someone else, or None."""
    me = os.geteuid()
    if status.st_uid not in (0, me):
        return f"owned by uid {status.st_uid}, not by this user (uid {me}) or root"
    writable = [who for who, bit in (("group", 0o020), ("others", 0o002)) if status.st_mode & bit]
    if writable and not (folder and status.st_mode & stat.S_ISVTX):
        return f"writable by {' and '.join(writable)} (mode {stat.S_IMODE(status.st_mode):o})"
    return None


def _check_folders(path: Path, shown: Path) -> None:
    """Every folder from ``path`` (resolved) up to ``/`` is this user's or root's alone."""
    for folder in (path, *path.parents):
        try:
            reason = _unsafe(os.stat(folder), folder=True)
        except OSError as exc:
            raise ApprovalsError(f"{shown}: its folder {folder}: {exc.strerror}") from None
        if reason is not None:
            raise ApprovalsError(
                f"{shown}: refused, as ssh refuses such a key file: its folder {folder} is "
                f"{reason}, so someone else could replace the approvals"
            )


def read_protected(path: Path) -> bytes:
    """The bytes of the approvals file ``path``, if no one but this user or root can have
    written them: the opened file is checked, then each folder above it."""
    try:
        real = path.resolve(strict=True)
        handle = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ApprovalsError(f"{path}: {exc.strerror or exc}") from None
    try:
        opened = os.fstat(handle)
        if not stat.S_ISREG(opened.st_mode):
            raise ApprovalsError(f"{path}: not a regular file")
        reason = _unsafe(opened, folder=False)
        if reason is not None:
            target = "it" if real == path.absolute() else f"its target {real}"
            raise ApprovalsError(
                f"{path}: refused, as ssh refuses such a key file: {target} is {reason}, so "
                "someone else could approve code"
            )
        _check_folders(real.parent, path)
        with os.fdopen(os.dup(handle), "rb") as source:
            return source.read()
    finally:
        os.close(handle)


# --- the file ---------------------------------------------------------------------------------


def _entries(path: Path, data: dict[str, Any], section: str, name: re.Pattern[str]) -> dict:
    entries = data.get(section, {})
    if not isinstance(entries, dict):
        raise ApprovalsError(f"{path}: {section} is not a table")
    for key, entry in entries.items():
        if not name.fullmatch(key) or not isinstance(entry, dict):
            raise ApprovalsError(f"{path}: {section} entry {key!r} is malformed")
    return dict(entries)


@dataclass
class Approvals:
    """The approved bundle hashes, trusted release keys, revoked bundle hashes and version
    policies of one site; ``sha256`` and ``format_version`` are those of the file read."""

    bundles: dict[str, dict[str, str]] = field(default_factory=dict)
    keys: dict[str, dict[str, str]] = field(default_factory=dict)
    revoked: dict[str, dict[str, str]] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    sha256: str = ""
    format_version: int = FORMAT_VERSION

    @classmethod
    def load(cls, path: Path) -> Approvals:
        content = read_protected(path)
        try:
            data = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApprovalsError(f"{path}: not JSON ({exc})") from None
        version = data.get("version") if isinstance(data, dict) else None
        if version not in _SECTIONS:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise ApprovalsError(
                f"{path}: not an approvals file of version {' or '.join(map(str, _SECTIONS))}"
                + (" (written by a newer fedct)" if newer else "")
            )
        unknown = sorted(set(data) - {"version", *_SECTIONS[version]})
        if unknown:
            raise ApprovalsError(f"{path}: unknown key {unknown[0]!r} in a version {version} file")
        approvals = cls(
            bundles=_entries(path, data, "bundles", SHA256),
            keys=_entries(path, data, "keys", KEY_ID),
            revoked=_entries(path, data, "revoked", SHA256),
            policies=_entries(path, data, "policies", APP_ID),
            sha256=hashlib.sha256(content).hexdigest(),
            format_version=version,
        )
        for kid, entry in approvals.keys.items():
            try:
                if key_id(parse_public_key(entry["public_key"])) != kid:
                    raise ApprovalsError(f"{path}: key {kid} is listed under another key's id")
            except (BundleError, KeyError, TypeError) as exc:
                raise ApprovalsError(f"{path}: key {kid}: {exc}") from None
        for app, policy in approvals.policies.items():
            try:
                if "min_version" in policy:
                    parse_version(policy["min_version"])
            except (ApprovalsError, TypeError) as exc:
                raise ApprovalsError(f"{path}: policy of {app}: {exc}") from None
            if not isinstance(policy.get("newest_only", False), bool):
                raise ApprovalsError(f"{path}: policy of {app}: newest_only is not true or false")
        return approvals

    @classmethod
    def load_or_empty(cls, path: Path) -> Approvals:
        return cls.load(path) if path.exists() or path.is_symlink() else cls()

    def save(self, path: Path) -> str:
        """Replace ``path`` atomically, so that a SuperNode never reads half a file, in a
        folder no one else may change; returns the sha256 of what was written."""
        data = {
            "version": FORMAT_VERSION,
            "bundles": self.bundles,
            "keys": self.keys,
            "revoked": self.revoked,
            "policies": self.policies,
        }
        content = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        _check_folders(path.parent.resolve(), path)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(content)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return hashlib.sha256(content).hexdigest()

    def trusted_keys(self) -> dict[str, Ed25519PublicKey]:
        return {kid: parse_public_key(entry["public_key"]) for kid, entry in self.keys.items()}

    def newest_only(self) -> bool:
        """Whether any app's policy needs the releases the site has run."""
        return any(policy.get("newest_only") for policy in self.policies.values())

    def version_refusal(
        self, fab_id: str, version: str, accepted: Iterable[tuple[str, str]]
    ) -> str | None:
        """Why the app's policy refuses ``version``, or None.  ``accepted``: (sha256, app) of
        the bundles the site has run, from :func:`accepted_bundles`."""
        policy = self.policies.get(fab_id)
        if policy is None:
            return None
        try:
            given = parse_version(version)
        except ApprovalsError:
            return f"its version {version!r} is not a PEP 440 version, and {fab_id} has a policy"
        minimum = policy.get("min_version")
        if minimum is not None and given < parse_version(minimum):
            return f"version {version} is older than {minimum}, the oldest of {fab_id} run here"
        if policy.get("newest_only"):
            known = [entry["app"] for entry in self.bundles.values()]
            known += [app for sha256, app in accepted if sha256 not in self.revoked]
            newest = max(_versions(fab_id, known), default=None)
            if newest is not None and given < newest:
                return (
                    f"version {version} is older than {newest}, the newest release of {fab_id} "
                    "approved or run here (newest-only)"
                )
        return None


def _versions(fab_id: str, apps: Iterable[str]) -> Iterable[Version]:
    """The versions of ``fab_id`` among ``"publisher/name version"`` strings."""
    for app in apps:
        name, _, version = app.rpartition(" ")
        if name == fab_id:
            try:
                yield Version(version)
            except InvalidVersion:
                continue


# --- the decision -----------------------------------------------------------------------------


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
    """Whether a run's bundle may run here; ``by`` says on what grounds, ``reason`` why not
    (told to the coordinator), ``detail`` what only the site sees (paths of its files)."""

    approved: bool
    fab_sha256: str
    app: str
    by: str = ""
    reason: str = ""
    detail: str = ""
    approvals_sha256: str = ""

    def log_line(self, run_id: int) -> str:
        """The one line of the SuperNode's log."""
        bundle = f"app bundle sha256 {self.fab_sha256} ({self.app}) of run {run_id}"
        if self.approved:
            return f"fedct: {bundle} is approved by {self.by}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"fedct: REFUSED {bundle}: {self.reason}{detail}"

    def error_reason(self) -> str:
        """What the coordinator is told."""
        return f"the site refused app bundle sha256 {self.fab_sha256}: {self.reason}"


def decide(
    approvals: Approvals,
    content: bytes,
    run: RecordedRun,
    accepted: Iterable[tuple[str, str]] = (),
) -> Decision:
    """May this bundle run at the site, for this run?  ``accepted``: the bundles the site
    has run (:func:`accepted_bundles`), which a newest-only policy needs."""
    try:
        bundle = read_bundle(content)
    except BundleError as exc:
        return Decision(False, hashlib.sha256(content).hexdigest(), "?", reason=str(exc))
    app = f"{bundle.fab_id} {bundle.version}"

    def refused(reason: str) -> Decision:
        return Decision(False, bundle.sha256, app, reason=reason)

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
        what = ", ".join(disagree)
        return refused(f"the run's recorded {what} disagree with the bundle's content")
    revocation = approvals.revoked.get(bundle.sha256)
    if revocation is not None:
        return refused(f"revoked at this site on {revocation.get('revoked', '?')}")
    if bundle.sha256 in approvals.bundles:
        by = "its sha256"
    else:
        signer, why = trusted_signer(run.signatures, bundle.sha256, approvals.trusted_keys())
        if signer is None:
            return refused(f"not approved at this site, and {why}")
        by = f"release key {signer}"
    policy = approvals.version_refusal(bundle.fab_id, bundle.version, accepted)
    if policy is not None:
        return refused(policy)
    return Decision(True, bundle.sha256, app, by=by)


def audit(audit_log: Path, event: str, **fields: Any) -> None:
    """One audit line: ``time``, ``event`` and ``fields``."""
    append_line(audit_log, {"time": now(), "event": event, **fields})


def audit_decision(audit_log: Path, decision: Decision, run_id: int) -> None:
    fields: dict[str, Any] = {"run": run_id, "fab_sha256": decision.fab_sha256, "app": decision.app}
    fields["approvals_sha256"] = decision.approvals_sha256
    if decision.approved:
        audit(audit_log, "bundle-accepted", **fields, by=decision.by)
    else:
        audit(audit_log, "bundle-refused", **fields, reason=decision.reason, detail=decision.detail)


def accepted_bundles(audit_log: Path) -> list[tuple[str, str]]:
    """(sha256, app) of every bundle the site's audit log says it accepted; none without a
    log.  A line that cannot be read is skipped: it names no release."""
    try:
        text = audit_log.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    accepted = []
    for line in text.splitlines():
        if '"bundle-accepted"' not in line:
            continue
        try:
            entry: Mapping[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("event") == "bundle-accepted":
            accepted.append((str(entry.get("fab_sha256")), str(entry.get("app"))))
    return accepted
