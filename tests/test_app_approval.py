"""Site approval of app bundles: ``fedct app`` (hash, keys, signatures), the decision on a run's
bundle, ``fedct site`` and its audit lines, and the check inside Flower's own SuperNode step
(docs/threat-model.md).  The deployment engine end to end: tests/test_trust_deployment.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from deploy_procs import ROOT, fedct, unpack_app
from flwr.app import Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supernode import start_client_internal
from flwr.supernode.nodestate import NodeStateFactory

from fedct.client import commands as client_commands
from fedct.client import site_supernode
from fedct.client.approvals import Approvals, RecordedRun, decide
from fedct.common import commands as common_commands
from fedct.common.trust import app_signing
from fedct.common.trust.certs import supernode_key_pair


@pytest.fixture(scope="module")
def bundle() -> app_signing.Bundle:
    """fedct's own bundle, as ``flwr run .`` sends it."""
    return app_signing.bundle_of(ROOT)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    for name in ("release", "rogue"):
        assert fedct(common_commands.app, "keygen", "--out", str(folder), "--name", name) == 0
    return folder


def recorded(bundle: app_signing.Bundle, signatures: str = "", **changes: str) -> RecordedRun:
    """What an honest SuperLink says about a run of ``bundle``, with ``changes``."""
    run = RecordedRun(bundle.sha256, bundle.sha256, bundle.fab_id, bundle.version, signatures)
    return dataclasses.replace(run, **changes)


def trusting(keys: Path, *names: str) -> Approvals:
    approvals = Approvals()
    for name in names:
        line = (keys / f"{name}.pub").read_text().strip()
        kid = app_signing.key_id(app_signing.parse_public_key(line))
        approvals.keys[kid] = {"public_key": line, "trusted": "now", "note": ""}
    return approvals


def signed(keys: Path, name: str, sha256: str) -> str:
    return app_signing.sign(app_signing.read_private_key(keys / f"{name}.key"), sha256)


def tampered(content: bytes) -> bytes:
    """One byte changed, in a member's data (the archive still opens)."""
    middle = len(content) // 2
    return content[:middle] + bytes([content[middle] ^ 0x01]) + content[middle + 1 :]


# --- fedct app --------------------------------------------------------------------------------


def test_the_hash_is_of_the_bundle_flwr_run_sends(
    bundle: app_signing.Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bundle.content == build_fab_from_disk(ROOT)  # what `flwr run` calls
    assert bundle.sha256 == hashlib.sha256(bundle.content).hexdigest()
    assert (bundle.fab_id, bundle.version) == ("fedct/fedct", "0.1.0")
    # Unpacked, it bundles into the same bytes (the deployment test runs such a copy).
    app = unpack_app(bundle.content, tmp_path)
    capsys.readouterr()
    assert fedct(common_commands.app, "hash", str(app)) == 0
    assert capsys.readouterr().out.strip() == bundle.sha256


def test_keygen_and_sign_write_keys_and_a_run_config_value(
    bundle: app_signing.Bundle, keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (keys / "release.key").stat().st_mode & 0o777 == 0o600
    assert (keys / "release.pub").read_text().startswith("ssh-ed25519 ")
    fab = tmp_path / "fedct.fab"
    fab.write_bytes(bundle.content)
    capsys.readouterr()
    assert fedct(common_commands.app, "sign", str(fab), "--key", str(keys / "release.key")) == 0
    out, err = capsys.readouterr()
    signature = out.strip()
    assert f"--run-config '{app_signing.SIGNATURE_KEY}=\"{signature}\"'" in err
    approvals = trusting(keys, "release")
    assert app_signing.trusted_signer(signature, bundle.sha256, approvals.trusted_keys())[0]
    assert fedct(common_commands.app, "keygen", "--out", str(keys), "--name", "release") == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert fedct(common_commands.app, "sign", str(tmp_path / "missing"), "--key", str(fab)) == 2
    assert "missing" in capsys.readouterr().err


# --- the decision -----------------------------------------------------------------------------


def test_approved_by_sha256_or_by_a_trusted_release_signature(
    bundle: app_signing.Bundle, keys: Path
) -> None:
    by_hash = Approvals(bundles={bundle.sha256: {"app": "fedct/fedct 0.1.0"}})
    decision = decide(by_hash, bundle.content, recorded(bundle))
    assert decision.approved and decision.by == "its sha256"
    by_key = trusting(keys, "release")
    decision = decide(
        by_key, bundle.content, recorded(bundle, signed(keys, "release", bundle.sha256))
    )
    assert decision.approved and decision.by.startswith("release key ")
    assert not decide(Approvals(), bundle.content, recorded(bundle)).approved


def test_a_tampered_approved_bundle_is_refused(bundle: app_signing.Bundle, keys: Path) -> None:
    changed = tampered(bundle.content)
    sha256 = hashlib.sha256(changed).hexdigest()
    run = recorded(
        bundle, signed(keys, "release", bundle.sha256), fab_hash=sha256, served_hash=sha256
    )
    approvals = trusting(keys, "release")
    approvals.bundles[bundle.sha256] = {"app": "fedct/fedct 0.1.0"}
    decision = decide(approvals, changed, run)
    assert not decision.approved and decision.fab_sha256 == sha256
    assert "the signature of trusted key" in decision.reason  # it signs the original only
    assert "not approved at this site" in decision.error_reason()


def test_a_bundle_signed_by_an_untrusted_key_is_refused(
    bundle: app_signing.Bundle, keys: Path
) -> None:
    rogue = signed(keys, "rogue", bundle.sha256)
    decision = decide(trusting(keys, "release"), bundle.content, recorded(bundle, rogue))
    assert not decision.approved
    assert f"signed by key {rogue.split(':')[1]}, which this site does not trust" in decision.reason


@pytest.mark.parametrize(
    "signatures",
    ["", "garbage", "ed25519:0123456789abcdef", "ed25519:{kid}:AAAA", "rsa:{kid}:AAAA"],
)
def test_missing_or_malformed_signatures_are_refused(
    bundle: app_signing.Bundle, keys: Path, signatures: str
) -> None:
    approvals = trusting(keys, "release")
    (kid,) = approvals.keys
    decision = decide(approvals, bundle.content, recorded(bundle, signatures.format(kid=kid)))
    assert not decision.approved and decision.reason.startswith("not approved at this site, and ")


def test_a_signature_of_another_bundle_is_refused(bundle: app_signing.Bundle, keys: Path) -> None:
    other = signed(keys, "release", "0" * 64)
    decision = decide(trusting(keys, "release"), bundle.content, recorded(bundle, other))
    assert not decision.approved and "is not one of this bundle" in decision.reason


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("fab_hash", "f" * 64, "hash"),
        ("served_hash", "f" * 64, "served hash"),
        ("fab_id", "fedct/other", "app id"),
        ("fab_version", "0.0.9", "version"),
    ],
)
def test_a_bundle_that_disagrees_with_its_run_is_refused(
    bundle: app_signing.Bundle, field: str, value: str, named: str
) -> None:
    """flwr-clientapp loads the installed app named by the run's id, version and hash: all
    must be the checked bundle's, even when the bundle itself is approved."""
    approvals = Approvals(bundles={bundle.sha256: {"app": "fedct/fedct 0.1.0"}})
    decision = decide(approvals, bundle.content, recorded(bundle, **{field: value}))
    assert not decision.approved
    assert decision.reason == f"the run's recorded {named} disagree with the bundle's content"


def test_a_file_that_is_not_a_bundle_is_refused(bundle: app_signing.Bundle) -> None:
    content = b"not a zip"
    sha256 = hashlib.sha256(content).hexdigest()
    approvals = Approvals(bundles={sha256: {"app": "?"}})
    decision = decide(approvals, content, recorded(bundle, fab_hash=sha256, served_hash=sha256))
    assert not decision.approved and "not a Flower app bundle" in decision.reason


# --- fedct site -------------------------------------------------------------------------------


def site(*argv: str) -> int:
    return fedct(client_commands.site, *argv)


def test_approve_trust_revoke_and_list_are_audited(
    bundle: app_signing.Bundle, keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    approvals, audit_log = tmp_path / "approvals.json", tmp_path / "audit" / "fedct-audit.jsonl"
    files = ("--approvals", str(approvals), "--audit-log", str(audit_log))
    fab = tmp_path / "fedct.fab"
    fab.write_bytes(bundle.content)
    assert site("approve", str(fab), *files, "--note", "reviewed by the IG board") == 0
    assert site("approve", "--sha256", "ab" * 32, *files) == 0
    assert site("trust-key", str(keys / "release.pub"), *files) == 0
    loaded = Approvals.load(approvals)
    assert loaded.bundles[bundle.sha256]["note"] == "reviewed by the IG board"
    (kid,) = loaded.keys
    assert site("revoke", "ab" * 32, *files) == 0
    assert site("revoke", kid, *files) == 0
    capsys.readouterr()
    assert site("list", "--approvals", str(approvals)) == 0
    assert bundle.sha256[:12] in capsys.readouterr().out
    assert sorted(Approvals.load(approvals).bundles) == [bundle.sha256]
    assert not Approvals.load(approvals).keys
    events = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert [e["event"] for e in events] == [
        "bundle-approved",
        "bundle-approved",
        "key-trusted",
        "bundle-revoked",
        "key-revoked",
    ]
    assert events[0]["fab_sha256"] == bundle.sha256 and events[2]["key_id"] == kid
    assert all(e["time"] and e["approvals"] == str(approvals) for e in events)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["approve", "--sha256", "ABC"], "not 64 lowercase hex digits"),
        (["revoke", "0123456789abcdef"], "neither an approved bundle's sha256 nor a trusted key"),
        (["trust-key", "{ecdsa}"], "not an ed25519 key"),
        (["approve", "{missing}"], "missing"),
    ],
)
def test_bad_changes_are_refused_and_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    ecdsa = tmp_path / "node.pub"  # a SuperNode's key: not a release key
    ecdsa.write_bytes(supernode_key_pair("node")[1])
    argv = [a.format(ecdsa=ecdsa, missing=tmp_path / "missing") for a in argv]
    approvals, audit_log = tmp_path / "approvals.json", tmp_path / "audit.jsonl"
    assert site(*argv, "--approvals", str(approvals), "--audit-log", str(audit_log)) == 2
    assert message in capsys.readouterr().err
    assert not approvals.exists() and not audit_log.exists()


def test_a_damaged_approvals_file_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    approvals = tmp_path / "approvals.json"
    approvals.write_text("{")
    assert site("list", "--approvals", str(approvals)) == 2
    assert f"{approvals}: not JSON" in capsys.readouterr().err


# --- the check in Flower's SuperNode ----------------------------------------------------------


class FakeSuperLink:
    """What ``_pull_and_store_message`` asks the SuperLink for: one message, its run, the
    run's bundle, and the message's objects."""

    def __init__(self, bundle: app_signing.Bundle, signatures: str) -> None:
        self.message = Message(RecordDict(), dst_node_id=1, message_type="train")
        self.message.metadata.__dict__["_message_id"] = self.message.object_id
        self.objects = {oid: o.deflate() for oid, o in get_all_nested_objects(self.message).items()}
        self.run = dataclasses.replace(
            Run.create_empty(self.message.metadata.run_id),
            fab_id=bundle.fab_id,
            fab_version=bundle.version,
            fab_hash=bundle.sha256,
            override_config={app_signing.SIGNATURE_KEY: signatures},
        )
        self.fab = Fab(bundle.sha256, bundle.content, {})

    def calls(self, state: Any, store: Any) -> dict[str, Any]:
        return {
            "state": state,
            "object_store": store,
            "node_config": {},
            "receive": lambda: (self.message, get_object_tree(self.message)),
            "get_run": lambda run_id: self.run,
            "get_fab": lambda fab_hash, run_id: self.fab,
            "pull_object": lambda run_id, object_id: self.objects[object_id],
            "confirm_message_received": lambda run_id, message_id: None,
            "trusted_entities": None,
        }


@pytest.mark.parametrize("approved", [True, False])
def test_the_supernode_stores_only_approved_bundles(
    bundle: app_signing.Bundle, keys: Path, tmp_path: Path, task_identity: None, approved: bool
) -> None:
    approvals_path, audit_log = tmp_path / "approvals.json", tmp_path / "audit.jsonl"
    trusting(keys, "release").save(approvals_path)
    superlink = FakeSuperLink(
        bundle, signed(keys, "release" if approved else "rogue", bundle.sha256)
    )
    state = NodeStateFactory(ObjectStoreFactory()).state()
    state.set_node_id(1)
    store = ObjectStoreFactory().store()
    pull_and_store = site_supernode.guard(
        start_client_internal._pull_and_store_message, approvals_path, audit_log
    )
    assert pull_and_store(**superlink.calls(state, store)) == superlink.run.run_id
    (line,) = [json.loads(x) for x in audit_log.read_text().splitlines()]
    assert line["fab_sha256"] == bundle.sha256
    replies = state.get_messages_legacy(is_reply=True)
    if approved:
        assert line["event"] == "bundle-accepted"
        assert state.get_fab(bundle.sha256) is not None and not replies
        return
    assert line["event"] == "bundle-refused"
    assert state.get_fab(bundle.sha256) is None and state.get_run(superlink.run.run_id) is None
    (reply,) = replies
    assert reply.error.code == ErrorCode.INVALID_FAB
    assert reply.error.reason.startswith(f"the site refused app bundle sha256 {bundle.sha256}: ")
    assert reply.metadata.reply_to_message_id == superlink.message.metadata.message_id


def test_unreadable_approvals_refuse_every_bundle(
    bundle: app_signing.Bundle, tmp_path: Path
) -> None:
    decision = site_supernode.check_bundle(tmp_path / "none.json", bundle.content, recorded(bundle))
    assert not decision.approved and "approvals cannot be read" in decision.reason


def test_the_launcher_refuses_what_it_cannot_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    approvals = tmp_path / "approvals.json"
    Approvals().save(approvals)
    supernode = ("supernode", "--approvals", str(approvals), "--")
    node_config = ["--node-config", f'data-path="{tmp_path}"']
    assert site(*supernode, *node_config, "--allow-runtime-dependency-installation") == 2
    assert "install packages the site has not approved" in capsys.readouterr().err
    assert site(*supernode, "--insecure") == 2
    assert "--node-config needs audit-log or data-path" in capsys.readouterr().err
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", lambda message: None)
    assert site(*supernode, *node_config) == 2
    assert "cannot guard this version" in capsys.readouterr().err
