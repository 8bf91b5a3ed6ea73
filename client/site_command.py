"""``fedct site``: the hospital decides which app versions run on its data.

``approve`` an app bundle (a checkout, a ``.fab`` or its sha256), ``trust-key`` a release
manager's ed25519 key, ``revoke`` a bundle (any bundle, also one a trusted key signed) or a
key, set an app's version ``policy`` (a minimum version, or the newest release only), ``list``
what is approved, and run the SuperNode with the check (``supernode``, instead of
``flower-supernode``).  Changes go to the approvals file (client/approvals.py) and, each, to
the site's audit log.  docs/threat-model.md says what this protects against.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedct.client.approvals import (
    APP_ID,
    FORMAT_VERSION,
    KEY_ID,
    SHA256,
    Approvals,
    ApprovalsError,
    audit,
    now,
    parse_version,
)
from fedct.client.site_supernode import LaunchError, launch
from fedct.common.trust.app_signing import BundleError, bundle_of, key_id, parse_public_key

console = Console(stderr=True, soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    try:
        if args.site_command == "supernode":
            flower_args = (
                args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
            )
            return launch(args.approvals, flower_args)
        approvals = Approvals.load_or_empty(args.approvals)
        if args.site_command == "list":
            _print(approvals)
            return 0
        event, fields = _change(approvals, args)
        written = approvals.save(args.approvals)
        files = {"approvals": str(args.approvals), "approvals_sha256": written}
        if approvals.format_version != FORMAT_VERSION:
            upgrade = {"from_version": approvals.format_version, "to_version": FORMAT_VERSION}
            audit(args.audit_log, "approvals-upgraded", **files, **upgrade)
        audit(args.audit_log, event, **files, **fields)
    except (ApprovalsError, BundleError, LaunchError, OSError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    console.print(escape(f"{event}: {' '.join(str(v) for v in fields.values())}"))
    return 0


def _change(approvals: Approvals, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Apply the subcommand to ``approvals``: (audit event, its fields)."""
    if args.site_command == "approve":
        if args.sha256 is not None:
            if not SHA256.fullmatch(args.sha256):
                raise ApprovalsError(f"--sha256 {args.sha256!r}: not 64 lowercase hex digits")
            sha256, app = args.sha256, "?"
        else:
            bundle = bundle_of(args.app)
            sha256, app = bundle.sha256, f"{bundle.fab_id} {bundle.version}"
        approvals.bundles[sha256] = {"app": app, "approved": now(), "note": args.note}
        unrevoked = approvals.revoked.pop(sha256, None) is not None
        return "bundle-approved", {"fab_sha256": sha256, "app": app, "unrevoked": unrevoked}
    if args.site_command == "trust-key":
        try:
            line = args.public_key.read_text().strip()
        except OSError as exc:
            raise ApprovalsError(f"{args.public_key}: {exc.strerror or exc}") from None
        try:
            kid = key_id(parse_public_key(line))
        except BundleError as exc:
            raise ApprovalsError(f"{args.public_key}: {exc}") from None
        approvals.keys[kid] = {"public_key": line, "trusted": now(), "note": args.note}
        return "key-trusted", {"key_id": kid, "public_key": line}
    if args.site_command == "policy":
        return _policy(approvals, args)
    return _revoke(approvals, args.id, args.note)


def _revoke(approvals: Approvals, what: str, note: str) -> tuple[str, dict[str, Any]]:
    """A bundle's sha256 is revoked whether it was approved by hash, by signature or not at
    all; a key id must be a trusted key's."""
    if SHA256.fullmatch(what):
        if what in approvals.revoked:
            raise ApprovalsError(
                f"{what} is already revoked (since {approvals.revoked[what]['revoked']})"
            )
        approved = approvals.bundles.pop(what, None)
        app = approved["app"] if approved else "?"
        approvals.revoked[what] = {"app": app, "revoked": now(), "note": note}
        return "bundle-revoked", {"fab_sha256": what, "app": app}
    if KEY_ID.fullmatch(what) and approvals.keys.pop(what, None) is not None:
        return "key-revoked", {"key_id": what}
    raise ApprovalsError(
        f"{what!r} is neither a bundle's sha256 (64 hex digits) nor a trusted key id"
    )


def _policy(approvals: Approvals, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.clear is not None:
        app = _app_id(args.clear)
        if approvals.policies.pop(app, None) is None:
            raise ApprovalsError(f"{app} has no version policy to clear")
        return "policy-cleared", {"app": app}
    if args.min_version is not None:
        app, minimum = _app_id(args.min_version[0]), args.min_version[1]
        parse_version(minimum)
        change: dict[str, Any] = {"min_version": minimum}
    else:
        app, change = _app_id(args.newest_only), {"newest_only": True}
    policy = {**approvals.policies.get(app, {}), **change, "set": now(), "note": args.note}
    approvals.policies[app] = policy
    kept = {k: policy[k] for k in ("min_version", "newest_only") if k in policy}
    return "policy-set", {"app": app, **kept}


def _app_id(text: str) -> str:
    if not APP_ID.fullmatch(text):
        raise ApprovalsError(f"{text!r} is not an app id (publisher/name, e.g. fedct/fedct)")
    return text


def _print(approvals: Approvals) -> None:
    table = Table("kind", "id", "what", "since", "note")
    for sha256, entry in sorted(approvals.bundles.items()):
        table.add_row("bundle", sha256, entry["app"], entry["approved"], entry.get("note", ""))
    for kid, entry in sorted(approvals.keys.items()):
        name = entry["public_key"].split(" ", 2)[2:] or [""]
        table.add_row("release key", kid, name[0], entry["trusted"], entry.get("note", ""))
    for sha256, entry in sorted(approvals.revoked.items()):
        table.add_row("REVOKED", sha256, entry["app"], entry["revoked"], entry.get("note", ""))
    for app, policy in sorted(approvals.policies.items()):
        rules = [f">= {policy['min_version']}"] if "min_version" in policy else []
        rules += ["newest only"] if policy.get("newest_only") else []
        table.add_row("policy", app, ", ".join(rules), policy["set"], policy.get("note", ""))
    Console().print(table)
    if not approvals.bundles and not approvals.keys:
        console.print("nothing is approved: the SuperNode refuses every bundle")
