"""Flower's SuperNode with the site's approval check in front of every run's app bundle.

Flower 1.41's SuperNode fetches a run's bundle (FAB) when the run's first message arrives, in
``_pull_and_store_message`` (flwr/supernode/start_client_internal.py), stores it in its state
and only then creates the task that the SuperExec launches ``flwr-clientapp`` for; that
process gets the bundle from the SuperNode's state and imports its code.  This module wraps
that step: the bundle's bytes are checked (client/approvals.py) as soon as they arrive, and a
refused bundle is never stored.  Instead, exactly as Flower does for a bundle that fails its own
``--trusted-entities`` check, an error reply (``INVALID_FAB``) takes the message's place, so
the coordinator records the site's failure and the reason; the SuperNode logs one line naming
the hash, and the site's audit log gets a line.  Every later message of a run already accepted
is checked again, against the approvals as they are then, so a revocation or a new version
policy also stops a run under way.  Why this seam holds: docs/threat-model.md.

The launcher reads flower-supernode's arguments with flower-supernode's own parser (so an
abbreviation or ``--flag=value`` means here exactly what it means to Flower) and refuses the
settings that would let code or answers the site has not approved through.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import sys
from collections.abc import Callable
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import Error, Message
from flwr.common import log
from flwr.common.config import parse_config_args
from flwr.common.constant import ISOLATION_MODE_PROCESS, ErrorCode
from flwr.supernode import start_client_internal
from flwr.supernode.cli import flower_supernode

from fedct.client.approvals import (
    Approvals,
    ApprovalsError,
    Decision,
    RecordedRun,
    accepted_bundles,
    audit,
    audit_decision,
    decide,
)
from fedct.client.audit_log import audit_log_path
from fedct.common.registry_proto import is_loopback
from fedct.common.trust.app_signing import SIGNATURE_KEY

# The parameters of the wrapped Flower function this module was written against.
_WRAPPED = "_pull_and_store_message"
_PARAMETERS = (
    "state",
    "object_store",
    "node_config",
    "receive",
    "get_run",
    "get_fab",
    "pull_object",
    "confirm_message_received",
    "trusted_entities",
)
# flower-supernode's parser, and the settings (argparse dests) the launcher judges.
_FLOWER_CLI = "flwr.supernode.cli.flower_supernode"
_FLOWER_PARSER = "_parse_args_run_supernode"
_JUDGED = ("runtime_dependency_install", "host", "isolation", "superexec_auth_secret_file")


class LaunchError(ValueError):
    """The SuperNode cannot be started with the approval check: the message says why."""


class _Refused(Exception):
    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


def check_bundle(
    approvals_path: Path, audit_log: Path, content: bytes, run: RecordedRun
) -> Decision:
    """The decision on a bundle, reading the approvals (and, for a newest-only policy, the
    releases run here) afresh; refuse whenever they cannot be read or the check fails."""
    try:
        approvals = Approvals.load(approvals_path)
        accepted = accepted_bundles(audit_log) if approvals.newest_only() else []
        decision = decide(approvals, content, run, accepted)
        return dataclasses.replace(decision, approvals_sha256=approvals.sha256)
    except ApprovalsError as exc:
        reason, detail = "the site's approvals cannot be read", str(exc)
    except OSError as exc:
        reason, detail = "the site's audit log cannot be read", f"{audit_log}: {exc.strerror}"
    except Exception as exc:  # noqa: BLE001 — fail closed, whatever went wrong
        reason, detail = f"the approval check failed ({type(exc).__name__})", ""
    return Decision(False, hashlib.sha256(content).hexdigest(), "?", reason=reason, detail=detail)


def guard(original: Callable[..., int | None], approvals_path: Path, audit_log: Path) -> Callable:
    """``original`` (Flower's ``_pull_and_store_message``) with the approval check."""

    def pull_and_store_message(**kwargs: Any) -> int | None:
        seen: dict[str, Any] = {}
        state, receive = kwargs["state"], kwargs["receive"]
        get_run, get_fab = kwargs["get_run"], kwargs["get_fab"]

        def checked(run: Any, fab: Any, run_id: int, *, new_run: bool) -> None:
            recorded = RecordedRun(
                fab_hash=run.fab_hash,
                served_hash=fab.hash_str,
                fab_id=run.fab_id,
                fab_version=run.fab_version,
                signatures=str(run.override_config.get(SIGNATURE_KEY, "")),
            )
            decision = check_bundle(approvals_path, audit_log, fab.content, recorded)
            try:
                if new_run or not decision.approved:
                    audit_decision(audit_log, decision, run_id)
            except OSError as exc:  # no bundle runs unaudited
                reason = "the site's audit log cannot be written"
                detail = f"{audit_log}: {exc.strerror or exc}"
                decision = Decision(
                    False, decision.fab_sha256, decision.app, reason=reason, detail=detail
                )
            if new_run or not decision.approved:
                log(INFO if decision.approved else ERROR, "%s", decision.log_line(run_id))
            if not decision.approved:
                raise _Refused(decision)

        def receive_and_recheck() -> Any:
            received = receive()
            seen["message"] = received[0] if received is not None else None
            if received is not None:
                run_id = received[0].metadata.run_id
                run = state.get_run(run_id)
                if run is not None:  # accepted before: the approvals may have changed since
                    fab = state.get_fab(run.fab_hash)
                    if fab is None:
                        reason = "the site no longer holds the run's app bundle"
                        raise _Refused(Decision(False, run.fab_hash, "?", reason=reason))
                    checked(run, fab, run_id, new_run=False)
            return received

        def get_run_and_keep(run_id: int) -> Any:
            seen["run"] = get_run(run_id)
            return seen["run"]

        def get_checked_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            checked(seen["run"], fab, run_id, new_run=True)
            return fab

        try:
            return original(
                **{
                    **kwargs,
                    "receive": receive_and_recheck,
                    "get_run": get_run_and_keep,
                    "get_fab": get_checked_fab,
                }
            )
        except _Refused as refused:
            message: Message = seen["message"]
            error = Error(code=ErrorCode.INVALID_FAB, reason=refused.decision.error_reason())
            start_client_internal._insert_message(
                Message(error, reply_to=message), state, kwargs["object_store"]
            )
            return message.metadata.run_id

    return pull_and_store_message


def install(approvals_path: Path, audit_log: Path) -> None:
    """Put the check in front of Flower's SuperNode in this process."""
    original = getattr(start_client_internal, _WRAPPED, None)
    if original is None or tuple(inspect.signature(original).parameters) != _PARAMETERS:
        raise LaunchError(
            f"this Flower's SuperNode has no {_WRAPPED}{_PARAMETERS}: the approval check was "
            "written for Flower 1.41 and cannot guard this version"
        )
    setattr(start_client_internal, _WRAPPED, guard(original, approvals_path, audit_log))


def flower_arguments(flower_args: list[str]) -> argparse.Namespace:
    """``flower_args`` as flower-supernode reads them: with its own parser, so that every
    abbreviation and ``--flag=value`` is resolved as Flower resolves it."""
    make_parser = getattr(importlib.import_module(_FLOWER_CLI), _FLOWER_PARSER, None)
    if make_parser is None:
        raise LaunchError(
            f"this Flower has no {_FLOWER_CLI}.{_FLOWER_PARSER}: the launcher was written for "
            "Flower 1.41 and cannot read this version's flower-supernode arguments"
        )
    parser = make_parser()

    def refuse(message: str) -> None:
        raise LaunchError(f"flower-supernode's arguments: {message}")

    parser.error = refuse  # type: ignore[method-assign]
    args = parser.parse_args(flower_args)
    missing = [name for name in _JUDGED if not hasattr(args, name)]
    if missing:
        raise LaunchError(
            f"this Flower's flower-supernode has no setting {missing[0]}: the launcher was "
            "written for Flower 1.41 and cannot judge this version's arguments"
        )
    return args


def refusal(args: argparse.Namespace) -> str | None:
    """Why flower-supernode must not run with ``args`` (from :func:`flower_arguments`)."""
    if args.runtime_dependency_install:
        return (
            "--allow-runtime-dependency-installation would let a run install packages the "
            "site has not approved"
        )
    guarded = args.isolation == ISOLATION_MODE_PROCESS and args.superexec_auth_secret_file
    if not guarded and not is_loopback(f"[{args.host}]:0"):
        return (
            f"--host {args.host} opens the SuperNode's Runtime API beyond this machine without "
            "a SuperExec secret (--isolation process and --superexec-auth-secret-file): "
            "whoever reaches it could take the app's tasks and answer in the site's name"
        )
    return None


def node_audit_log(node_config_arg: str | None) -> Path:
    """The audit log the egress guard uses, from the SuperNode's ``--node-config``."""
    try:
        node_config = parse_config_args([node_config_arg]) if node_config_arg else {}
    except Exception as exc:  # noqa: BLE001 — Flower raises several types for bad syntax
        raise LaunchError(f"--node-config cannot be read ({exc})") from None
    if not node_config.get("audit-log") and not node_config.get("data-path"):
        raise LaunchError("--node-config needs audit-log or data-path: where to audit")
    return audit_log_path(node_config, Path(str(node_config.get("data-path", ""))))


def launch(approvals_path: Path, flower_args: list[str]) -> int:
    """Run ``flower-supernode FLOWER_ARGS`` with the check, until the SuperNode exits."""
    args = flower_arguments(flower_args)
    refused = refusal(args)
    if refused is not None:
        raise LaunchError(refused)
    audit_log = node_audit_log(args.node_config)
    approvals = Approvals.load(approvals_path)
    install(approvals_path, audit_log)
    audit(
        audit_log,
        "supernode-started",
        approvals=str(approvals_path),
        approvals_sha256=approvals.sha256,
        bundles=sorted(approvals.bundles),
        keys=sorted(approvals.keys),
        revoked=sorted(approvals.revoked),
        policies=approvals.policies,
    )
    log(
        INFO,
        "fedct: this SuperNode runs only app bundles approved in %s (%d bundles, %d release "
        "keys, %d revoked, %d version policies)",
        approvals_path,
        len(approvals.bundles),
        len(approvals.keys),
        len(approvals.revoked),
        len(approvals.policies),
    )
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0
