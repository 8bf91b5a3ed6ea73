"""Flower's SuperNode with the site's approval check in front of every new run's app bundle.

Flower 1.41's SuperNode fetches a run's bundle (FAB) when the run's first message arrives, in
``_pull_and_store_message`` (flwr/supernode/start_client_internal.py), stores it in its state
and only then creates the task that the SuperExec launches ``flwr-clientapp`` for; that
process gets the bundle from the SuperNode's state and imports its code.  This module wraps
that step: the bundle's bytes are checked (client/approvals.py) as soon as they arrive, and a
refused bundle is never stored.  Instead, exactly as Flower does for a bundle that fails its own
``--trusted-entities`` check, an error reply (``INVALID_FAB``) takes the message's place, so
the coordinator records the site's failure and the reason; the SuperNode logs one line naming
the hash, and the site's audit log gets a line.  Why this seam holds: docs/threat-model.md.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import sys
from collections.abc import Callable
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import Error, Message
from flwr.common import log
from flwr.common.config import parse_config_args
from flwr.common.constant import ErrorCode
from flwr.supernode import start_client_internal
from flwr.supernode.cli import flower_supernode

from fedct.client.approvals import (
    Approvals,
    ApprovalsError,
    Decision,
    RecordedRun,
    audit,
    audit_decision,
    decide,
)
from fedct.client.egress import audit_log_path
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
REFUSED_FLAGS = ("--allow-runtime-dependency-installation",)


class LaunchError(ValueError):
    """The SuperNode cannot be started with the approval check: the message says why."""


class _Refused(Exception):
    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


def check_bundle(approvals_path: Path, content: bytes, run: RecordedRun) -> Decision:
    """The decision on a bundle, reading the approvals afresh; refuse whenever they cannot be
    read or the check itself fails."""
    try:
        return decide(Approvals.load(approvals_path), content, run)
    except ApprovalsError as exc:
        reason = f"the site's approvals cannot be read ({exc})"
    except Exception as exc:  # noqa: BLE001 — fail closed, whatever went wrong
        reason = f"the approval check failed ({type(exc).__name__})"
    return Decision(False, hashlib.sha256(content).hexdigest(), "?", reason=reason)


def guard(original: Callable[..., int | None], approvals_path: Path, audit_log: Path) -> Callable:
    """``original`` (Flower's ``_pull_and_store_message``) with the approval check."""

    def pull_and_store_message(**kwargs: Any) -> int | None:
        seen: dict[str, Any] = {}
        receive, get_run, get_fab = kwargs["receive"], kwargs["get_run"], kwargs["get_fab"]

        def receive_and_keep() -> Any:
            received = receive()
            seen["message"] = received[0] if received is not None else None
            return received

        def get_run_and_keep(run_id: int) -> Any:
            seen["run"] = get_run(run_id)
            return seen["run"]

        def get_checked_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            run = seen["run"]
            recorded = RecordedRun(
                fab_hash=run.fab_hash,
                served_hash=fab.hash_str,
                fab_id=run.fab_id,
                fab_version=run.fab_version,
                signatures=str(run.override_config.get(SIGNATURE_KEY, "")),
            )
            decision = check_bundle(approvals_path, fab.content, recorded)
            try:
                audit_decision(audit_log, decision, run_id)
            except OSError as exc:  # no bundle runs unaudited
                reason = f"the site's audit log cannot be written ({exc.strerror or exc})"
                decision = Decision(False, decision.fab_sha256, decision.app, reason=reason)
            log(INFO if decision.approved else ERROR, "%s", decision.log_line(run_id))
            if not decision.approved:
                raise _Refused(decision)
            return fab

        try:
            return original(
                **{
                    **kwargs,
                    "receive": receive_and_keep,
                    "get_run": get_run_and_keep,
                    "get_fab": get_checked_fab,
                }
            )
        except _Refused as refused:
            message: Message = seen["message"]
            error = Error(code=ErrorCode.INVALID_FAB, reason=refused.decision.error_reason())
            start_client_internal._insert_message(
                Message(error, reply_to=message), kwargs["state"], kwargs["object_store"]
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


def node_audit_log(flower_args: list[str]) -> Path:
    """The audit log the egress guard uses, from the SuperNode's ``--node-config``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--node-config", default="")
    known, _ = parser.parse_known_args(flower_args)
    try:
        node_config = parse_config_args([known.node_config]) if known.node_config else {}
    except Exception as exc:  # noqa: BLE001 — Flower raises several types for bad syntax
        raise LaunchError(f"--node-config cannot be read ({exc})") from None
    if not node_config.get("audit-log") and not node_config.get("data-path"):
        raise LaunchError("--node-config needs audit-log or data-path: where to audit")
    return audit_log_path(node_config, Path(str(node_config.get("data-path", ""))))


def launch(approvals_path: Path, flower_args: list[str]) -> int:
    """Run ``flower-supernode FLOWER_ARGS`` with the check, until the SuperNode exits."""
    refused = sorted(set(flower_args) & set(REFUSED_FLAGS))
    if refused:
        raise LaunchError(
            f"{refused[0]} would let a run install packages the site has not approved"
        )
    audit_log = node_audit_log(flower_args)
    approvals = Approvals.load(approvals_path)
    install(approvals_path, audit_log)
    audit(
        audit_log,
        "supernode-started",
        approvals=str(approvals_path),
        bundles=sorted(approvals.bundles),
        keys=sorted(approvals.keys),
    )
    log(
        INFO,
        "fedct: this SuperNode runs only app bundles approved in %s (%d bundles, %d release keys)",
        approvals_path,
        len(approvals.bundles),
        len(approvals.keys),
    )
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0
