"""``fedct site``: the hospital decides which app versions run on its data.

``approve`` an app bundle (a checkout, a ``.fab`` or its sha256), ``trust-key`` a release
manager's ed25519 key, ``revoke`` either, ``list`` what is approved, and run the SuperNode with
the check (``supernode``, instead of ``flower-supernode``).  Changes go to the approvals file
(client/approvals.py) and, each, to the site's audit log.  docs/threat-model.md says what this
protects against.
"""

from __future__ import annotations

import argparse
import re

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedct.client.approvals import Approvals, ApprovalsError, audit, now
from fedct.client.site_supernode import LaunchError, launch
from fedct.common.trust.app_signing import BundleError, bundle_of, key_id, parse_public_key

SHA256 = re.compile(r"[0-9a-f]{64}")
KEY_ID = re.compile(r"[0-9a-f]{16}")

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
        approvals.save(args.approvals)
        audit(args.audit_log, event, approvals=str(args.approvals), **fields)
    except (ApprovalsError, BundleError, LaunchError, OSError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    console.print(escape(f"{event}: {' '.join(str(v) for v in fields.values())}"))
    return 0


def _change(approvals: Approvals, args: argparse.Namespace) -> tuple[str, dict[str, str]]:
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
        return "bundle-approved", {"fab_sha256": sha256, "app": app}
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
    if SHA256.fullmatch(args.id) and approvals.bundles.pop(args.id, None) is not None:
        return "bundle-revoked", {"fab_sha256": args.id}
    if KEY_ID.fullmatch(args.id) and approvals.keys.pop(args.id, None) is not None:
        return "key-revoked", {"key_id": args.id}
    raise ApprovalsError(f"{args.id!r} is neither an approved bundle's sha256 nor a trusted key id")


def _print(approvals: Approvals) -> None:
    table = Table("kind", "id", "what", "since", "note")
    for sha256, entry in sorted(approvals.bundles.items()):
        table.add_row("bundle", sha256, entry["app"], entry["approved"], entry.get("note", ""))
    for kid, entry in sorted(approvals.keys.items()):
        name = entry["public_key"].split(" ", 2)[2:] or [""]
        table.add_row("release key", kid, name[0], entry["trusted"], entry.get("note", ""))
    Console().print(table)
    if not approvals.bundles and not approvals.keys:
        console.print("nothing is approved: the SuperNode refuses every bundle")
