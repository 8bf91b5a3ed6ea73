"""Site approval of app bundles: ``fedct app`` (hash, keys, signatures), the decision on a run's
bundle, ``fedct site`` and its audit lines, and the check inside Flower's own SuperNode step
(docs/threat-model.md).  The deployment engine end to end: tests/test_trust_deployment.py."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
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
from fedct.client.approvals import (
    Approvals,
    ApprovalsError,
    RecordedRun,
    audit_decision,
    decide,
)
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
    assert site("policy", "--min-version", "fedct/fedct", "0.1.0", *files) == 0
    capsys.readouterr()
    assert site("list", "--approvals", str(approvals)) == 0
    listed = capsys.readouterr().out
    assert bundle.sha256[:12] in listed and "REVOKED" in listed and ">= 0.1.0" in listed
    loaded = Approvals.load(approvals)
    assert sorted(loaded.bundles) == [bundle.sha256] and sorted(loaded.revoked) == ["ab" * 32]
    assert not loaded.keys and loaded.policies["fedct/fedct"]["min_version"] == "0.1.0"
    events = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert [e["event"] for e in events] == [
        "bundle-approved",
        "bundle-approved",
        "key-trusted",
        "bundle-revoked",
        "key-revoked",
        "policy-set",
    ]
    assert events[0]["fab_sha256"] == bundle.sha256 and events[2]["key_id"] == kid
    assert all(e["time"] and e["approvals"] == str(approvals) for e in events)
    # Each line names the file it wrote: a file edited by hand matches none.
    assert events[-1]["approvals_sha256"] == hashlib.sha256(approvals.read_bytes()).hexdigest()
    assert len({e["approvals_sha256"] for e in events}) == len(events)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["approve", "--sha256", "ABC"], "not 64 lowercase hex digits"),
        (["revoke", "0123456789abcdef"], "neither a bundle's sha256 (64 hex digits) nor a trusted"),
        (["revoke", "AB" * 32], "neither a bundle's sha256"),
        (["policy", "--min-version", "fedct/fedct", "x.y"], "'x.y' is not a version (PEP 440"),
        (["policy", "--newest-only", "../fedct"], "'../fedct' is not an app id"),
        (["policy", "--clear", "fedct/fedct"], "fedct/fedct has no version policy to clear"),
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
    decision = site_supernode.check_bundle(
        tmp_path / "none.json", tmp_path / "audit.jsonl", bundle.content, recorded(bundle)
    )
    assert not decision.approved and decision.reason == "the site's approvals cannot be read"
    assert str(tmp_path) not in decision.error_reason()  # the site's paths stay at the site
    assert "none.json" in decision.log_line(1)


def test_the_launcher_refuses_what_it_cannot_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    approvals = tmp_path / "approvals.json"
    Approvals().save(approvals)
    supernode = ("supernode", "--approvals", str(approvals), "--")
    node_config = ["--node-config", f'data-path="{tmp_path}"']
    assert site(*supernode, "--insecure") == 2
    assert "--node-config needs audit-log or data-path" in capsys.readouterr().err
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", lambda message: None)
    assert site(*supernode, *node_config) == 2
    assert "cannot guard this version" in capsys.readouterr().err


# --- the launcher reads flower-supernode's flags as Flower does --------------------------------


@pytest.fixture
def launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Callable[..., int], list[list[str]]]:
    """``fedct site supernode --approvals A -- ARGS`` with a node config; Flower's SuperNode
    itself is replaced by a recorder of its argv, so nothing starts."""
    approvals = tmp_path / "approvals.json"
    Approvals().save(approvals)
    started: list[list[str]] = []
    monkeypatch.setattr(site_supernode, "flower_supernode", lambda: started.append(sys.argv[1:]))
    # launch() wraps Flower's step in this process: put the original back afterwards.
    original = start_client_internal._pull_and_store_message
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", original)
    node_config = ["--node-config", f'data-path="{tmp_path}"']

    def supernode(*flower_args: str, approvals_path: Path = approvals) -> int:
        argv = ("supernode", "--approvals", str(approvals_path), "--", *node_config, *flower_args)
        return site(*argv)

    return supernode, started


DEPENDENCIES = "--allow-runtime-dependency-installation"


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [
        ([DEPENDENCIES], "install packages the site has not approved"),
        (["--allow-runtime-dep"], "install packages the site has not approved"),
        (["--allow-r"], "install packages the site has not approved"),
        (["--all"], "install packages the site has not approved"),
        (["--isolation", "process", "--al"], "install packages the site has not approved"),
        ([f"{DEPENDENCIES}=yes"], "ignored explicit argument 'yes'"),
        (["--allow=1"], "ignored explicit argument '1'"),
        (["--a"], "ambiguous option: --a could match"),
        (["--host", "0.0.0.0"], "--host 0.0.0.0 opens the SuperNode's Runtime API"),
        (["--host=::"], "--host :: opens the SuperNode's Runtime API"),
        (["--ho", "10.1.2.3", "--isolation=process"], "--host 10.1.2.3 opens"),
        # subprocess isolation ignores the SuperExec secret (Flower says so)
        (["--hos=0.0.0.0", "--superexec-auth-secret-file", "s"], "--host 0.0.0.0 opens"),
        (["--clientappio-api-address=0.0.0.0:9094"], "this option is no longer supported"),
    ],
)
def test_dangerous_flags_are_refused_in_any_spelling(
    launcher: tuple[Callable[..., int], list[list[str]]],
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    refusal: str,
) -> None:
    supernode, started = launcher
    assert supernode(*flags) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert refusal in line and not started


def test_every_abbreviation_of_the_dependency_flag_is_refused(
    launcher: tuple[Callable[..., int], list[list[str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every prefix argparse could expand to it, alone and as ``--prefix=value``."""
    supernode, started = launcher
    for end in range(len("--a"), len(DEPENDENCIES) + 1):
        for spelling in (DEPENDENCIES[:end], f"{DEPENDENCIES[:end]}=true"):
            assert supernode(spelling) == 2, spelling
            assert "error:" in capsys.readouterr().err
    assert not started


@pytest.mark.parametrize(
    "flags",
    [
        ["--iso", "process", "--superexec-auth=secret", "--ho=0.0.0.0"],
        ["--insecure", "--host", "localhost", "--max-retries=3"],
        ["--host=::1", "--superlink=--allow-runtime-dependency-installation"],  # a value
    ],
)
def test_safe_flags_in_any_spelling_start_flower(
    launcher: tuple[Callable[..., int], list[list[str]]], tmp_path: Path, flags: list[str]
) -> None:
    supernode, started = launcher
    assert supernode(*flags) == 0
    assert started[0][-len(flags) :] == flags  # Flower parses the same arguments again
    (line,) = (tmp_path / "fedct-audit.jsonl").read_text().splitlines()
    assert json.loads(line)["event"] == "supernode-started"


def test_the_hospital_compose_files_supernode_is_accepted(tmp_path: Path) -> None:
    """deploy/hospital/compose.yaml binds the Runtime API to the compose network, with process
    isolation and the SuperExec secret: what the launcher allows beyond loopback."""
    compose = yaml.safe_load((ROOT / "deploy" / "hospital" / "compose.yaml").read_text())
    command = compose["services"]["supernode"]["command"]
    flower_args = [re.sub(r"\$\{[^}]*\}", "x", arg) for arg in command[command.index("--") + 1 :]]
    args = site_supernode.flower_arguments(flower_args)
    assert args.host == "0.0.0.0" and site_supernode.refusal(args) is None
    exposed = [arg for arg in flower_args if arg != "--superexec-auth-secret-file"]
    exposed.remove("/app/certificates/superexec.secret")
    assert "Runtime API" in site_supernode.refusal(site_supernode.flower_arguments(exposed))


# --- only this user may change the approvals (as ssh with a key file) ------------------------


def _chmod(mode: int, *, levels_up: int = 0) -> Callable[[Path], Path]:
    def setup(approvals: Path) -> Path:
        target = approvals.parents[levels_up - 1] if levels_up else approvals
        target.chmod(mode)
        return target

    return setup


def _chown(*, levels_up: int = 0) -> Callable[[Path], Path]:
    def setup(approvals: Path) -> Path:
        target = approvals.parents[levels_up - 1] if levels_up else approvals
        os.chown(target, 4242, -1)
        return target

    return setup


def _symlink_to_group_writable(approvals: Path) -> Path:
    real = approvals.parent.parent / "elsewhere.json"
    approvals.rename(real)
    real.chmod(0o664)
    approvals.symlink_to(real)
    return real


AS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to another uid needs root (CI runs as root)"
)


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        pytest.param(_chmod(0o664), "is writable by group (mode 664)", id="group-writable file"),
        pytest.param(_chmod(0o646), "is writable by others (mode 646)", id="world-writable file"),
        pytest.param(
            _chmod(0o777, levels_up=1),
            "is writable by group and others (mode 777)",
            id="world-writable trust",
        ),
        pytest.param(
            _chmod(0o770, levels_up=1), "is writable by group (mode 770)", id="group-writable trust"
        ),
        pytest.param(
            _chmod(0o757, levels_up=2),
            "is writable by others (mode 757)",
            id="writable grandparent",
        ),
        pytest.param(
            _symlink_to_group_writable, "is writable by group (mode 664)", id="symlink to writable"
        ),
        pytest.param(_chown(), "owned by uid 4242", id="file of another uid", marks=AS_ROOT),
        pytest.param(
            _chown(levels_up=1), "owned by uid 4242", id="trust of another uid", marks=AS_ROOT
        ),
    ],
)
def test_approvals_someone_else_could_write_are_refused(
    bundle: app_signing.Bundle,
    tmp_path: Path,
    launcher: tuple[Callable[..., int], list[list[str]]],
    capsys: pytest.CaptureFixture[str],
    setup: Callable[[Path], Path],
    reason: str,
) -> None:
    approvals = tmp_path / "site" / "trust" / "approvals.json"
    Approvals(bundles={bundle.sha256: {"app": "fedct/fedct 0.1.0"}}).save(approvals)
    unsafe = setup(approvals)
    before = approvals.read_bytes()
    audit_log = tmp_path / "audit.jsonl"

    decision = site_supernode.check_bundle(approvals, audit_log, bundle.content, recorded(bundle))
    assert not decision.approved and decision.reason == "the site's approvals cannot be read"
    assert str(unsafe) in decision.detail and reason in decision.detail
    assert str(tmp_path) not in decision.error_reason()

    supernode, started = launcher
    assert supernode(approvals_path=approvals) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {approvals}: refused") and reason in line and not started
    files = ("--approvals", str(approvals), "--audit-log", str(audit_log))
    assert site("approve", "--sha256", "ab" * 32, *files) == 2
    assert reason in capsys.readouterr().err
    assert approvals.read_bytes() == before and not audit_log.exists()


def test_a_sticky_shared_folder_above_the_approvals_is_accepted(
    bundle: app_signing.Bundle, tmp_path: Path
) -> None:
    """Like /tmp: others may add files, but not replace or remove this user's."""
    approvals = tmp_path / "shared" / "approvals.json"
    Approvals(bundles={bundle.sha256: {"app": "fedct/fedct 0.1.0"}}).save(approvals)
    approvals.parent.chmod(0o1777)
    audit_log = tmp_path / "audit.jsonl"
    assert site_supernode.check_bundle(
        approvals, audit_log, bundle.content, recorded(bundle)
    ).approved


# --- a revocation wins, and old signed releases are not replayed -----------------------------


def release(bundle: app_signing.Bundle, version: str) -> app_signing.Bundle:
    """``bundle`` as if released as ``version``: another bundle, another sha256."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(bundle.content)) as source, zipfile.ZipFile(out, "w") as into:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "pyproject.toml":
                data = re.sub(rb'(?m)^version = "[^"]*"', f'version = "{version}"'.encode(), data)
            into.writestr(info, data)
    return app_signing.read_bundle(out.getvalue())


@dataclasses.dataclass
class SigningSite:
    """A site that trusts the release key, changed only with ``fedct site``."""

    approvals: Path
    audit_log: Path
    keys: Path

    def change(self, *argv: str) -> int:
        return site(*argv, "--approvals", str(self.approvals), "--audit-log", str(self.audit_log))

    def run(self, candidate: app_signing.Bundle) -> tuple[bool, str]:
        """The decision on a run of ``candidate`` signed by the release key, audited as the
        SuperNode audits it: (approved, reason)."""
        signature = signed(self.keys, "release", candidate.sha256)
        decision = site_supernode.check_bundle(
            self.approvals, self.audit_log, candidate.content, recorded(candidate, signature)
        )
        audit_decision(self.audit_log, decision, 1)
        return decision.approved, decision.reason


@pytest.fixture
def signing_site(keys: Path, tmp_path: Path) -> SigningSite:
    trusting_site = SigningSite(tmp_path / "approvals.json", tmp_path / "audit.jsonl", keys)
    assert trusting_site.change("trust-key", str(keys / "release.pub")) == 0
    return trusting_site


def test_a_revocation_wins_over_a_release_signature(
    bundle: app_signing.Bundle, signing_site: SigningSite
) -> None:
    assert signing_site.run(bundle) == (True, "")
    assert signing_site.change("revoke", bundle.sha256, "--note", "leaks through its metrics") == 0
    approved, reason = signing_site.run(bundle)
    assert not approved and reason.startswith("revoked at this site on ")
    assert (
        signing_site.change("approve", "--sha256", bundle.sha256) == 0
    )  # approved by hash as well: still
    assert signing_site.run(bundle) == (True, "")  # ... approving again is what lifts a revocation
    assert signing_site.change("revoke", bundle.sha256) == 0
    assert not signing_site.run(bundle)[0]
    unseen = release(bundle, "0.1.1")  # a bundle the site never saw can be revoked too
    assert signing_site.change("revoke", unseen.sha256) == 0
    assert not signing_site.run(unseen)[0]
    assert signing_site.change("revoke", unseen.sha256) == 2  # already revoked
    lines = signing_site.audit_log.read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert events.count("bundle-revoked") == 3 and events.count("bundle-refused") == 3


@pytest.mark.parametrize(
    ("ran", "replayed", "approved"),
    [
        ("0.2.0", "0.1.0", False),
        ("0.2.0", "0.2.0", True),  # the same release, again
        ("0.2.0", "0.3.0", True),
        ("0.10.0", "0.9.0", False),  # PEP 440, not text: 0.10 is the newer
        ("1.0.0", "1.0.0rc1", False),  # a pre-release precedes its release
        ("1.0.0", "1.0.0.post1", True),
        ("0.2", "0.2.0", True),  # equal versions
        ("0.2.0", "banana", False),  # no version: refused under a policy
    ],
)
def test_newest_only_refuses_an_older_signed_release_once_a_newer_ran(
    bundle: app_signing.Bundle,
    signing_site: SigningSite,
    ran: str,
    replayed: str,
    approved: bool,
) -> None:
    assert signing_site.change("policy", "--newest-only", "fedct/fedct") == 0
    assert signing_site.run(release(bundle, ran)) == (True, "")
    decision = signing_site.run(release(bundle, replayed))
    assert decision[0] is approved
    if not approved and replayed != "banana":
        assert decision[1] == (
            f"version {replayed} is older than {ran}, the newest release of fedct/fedct "
            "approved or run here (newest-only)"
        )


def test_newest_only_counts_hash_approvals_and_forgets_revoked_releases(
    bundle: app_signing.Bundle,
    signing_site: SigningSite,
    tmp_path: Path,
) -> None:
    old, new, newer = (release(bundle, v) for v in ("0.1.0", "0.2.0", "0.3.0"))
    fab = tmp_path / "new.fab"
    fab.write_bytes(new.content)
    assert signing_site.change("policy", "--newest-only", "fedct/fedct") == 0
    assert signing_site.change("approve", str(fab)) == 0  # reviewed, never run
    assert not signing_site.run(old)[0]
    assert signing_site.run(newer)[0]  # runs, and so becomes the newest
    assert not signing_site.run(new)[0]
    assert signing_site.change("revoke", newer.sha256) == 0
    assert signing_site.change("revoke", new.sha256) == 0
    assert signing_site.run(old) == (True, "")  # the newest left is 0.1.0
    assert signing_site.change("policy", "--clear", "fedct/fedct") == 0


def test_min_version_refuses_older_releases_even_approved_by_hash(
    bundle: app_signing.Bundle, signing_site: SigningSite
) -> None:
    assert signing_site.change("approve", "--sha256", bundle.sha256) == 0  # 0.1.0
    assert signing_site.change("policy", "--min-version", "hospital/other", "9.0") == 0
    assert signing_site.run(bundle) == (True, "")  # another app's policy
    assert signing_site.change("policy", "--min-version", "fedct/fedct", "0.2.0") == 0
    assert signing_site.run(bundle) == (
        False,
        "version 0.1.0 is older than 0.2.0, the oldest of fedct/fedct run here",
    )
    assert signing_site.run(release(bundle, "0.2.0")) == (True, "")
    assert signing_site.run(release(bundle, "0.10.0")) == (True, "")


def test_a_revocation_stops_a_run_under_way(
    bundle: app_signing.Bundle, keys: Path, tmp_path: Path, task_identity: None
) -> None:
    """The run's first message is accepted; then the site revokes the bundle: the run's next
    message is refused, before the ClientApp gets it."""
    approvals_path, audit_log = tmp_path / "approvals.json", tmp_path / "audit.jsonl"
    trusting(keys, "release").save(approvals_path)
    state = NodeStateFactory(ObjectStoreFactory()).state()
    state.set_node_id(1)
    store = ObjectStoreFactory().store()
    pull_and_store = site_supernode.guard(
        start_client_internal._pull_and_store_message, approvals_path, audit_log
    )
    signature = signed(keys, "release", bundle.sha256)
    first, second = FakeSuperLink(bundle, signature), FakeSuperLink(bundle, signature)
    assert pull_and_store(**first.calls(state, store)) == first.run.run_id
    files = ("--approvals", str(approvals_path), "--audit-log", str(audit_log))
    assert site("revoke", bundle.sha256, *files) == 0
    assert pull_and_store(**second.calls(state, store)) == second.run.run_id
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.metadata.reply_to_message_id == second.message.metadata.message_id
    assert (
        reply.error.code == ErrorCode.INVALID_FAB and "revoked at this site" in reply.error.reason
    )
    events = [json.loads(line)["event"] for line in audit_log.read_text().splitlines()]
    assert events == ["bundle-accepted", "bundle-revoked", "bundle-refused"]


# --- the approvals file's versions --------------------------------------------------------------


def test_a_version_1_file_is_read_and_upgraded_cleanly(
    bundle: app_signing.Bundle, keys: Path, tmp_path: Path
) -> None:
    """As fedct 0.1.0 wrote it: read as it is (a SuperNode cannot write its read-only copy),
    and written as version 2, with everything kept, by the next change."""
    approvals, audit_log = tmp_path / "approvals.json", tmp_path / "audit.jsonl"
    key = (keys / "release.pub").read_text().strip()
    kid = app_signing.key_id(app_signing.parse_public_key(key))
    version_1 = {
        "version": 1,
        "bundles": {bundle.sha256: {"app": "fedct/fedct 0.1.0", "approved": "t", "note": ""}},
        "keys": {kid: {"public_key": key, "trusted": "t", "note": ""}},
    }
    approvals.write_text(json.dumps(version_1))
    loaded = Approvals.load(approvals)
    assert loaded.format_version == 1 and decide(loaded, bundle.content, recorded(bundle)).approved
    files = ("--approvals", str(approvals), "--audit-log", str(audit_log))
    assert site("policy", "--newest-only", "fedct/fedct", *files) == 0
    upgraded = json.loads(approvals.read_text())
    assert upgraded["version"] == 2
    assert upgraded["bundles"] == version_1["bundles"] and upgraded["keys"] == version_1["keys"]
    assert upgraded["revoked"] == {} and upgraded["policies"]["fedct/fedct"]["newest_only"]
    lines = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert [(x["event"], x.get("from_version")) for x in lines] == [
        ("approvals-upgraded", 1),
        ("policy-set", None),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"version": 3, "bundles": {}},
            "not an approvals file of version 1 or 2 (written by a newer",
        ),
        ({"version": 1, "revoked": {}}, "unknown key 'revoked' in a version 1 file"),
        ({"version": 2, "revoked": {"abc": {}}}, "revoked entry 'abc' is malformed"),
        (
            {"version": 2, "policies": {"fedct/fedct": {"min_version": "x"}}},
            "policy of fedct/fedct",
        ),
        ({"version": 2, "policies": {"fedct/fedct": {"newest_only": "yes"}}}, "not true or false"),
    ],
)
def test_a_malformed_approvals_file_is_refused(
    tmp_path: Path, content: dict[str, Any], message: str
) -> None:
    approvals = tmp_path / "approvals.json"
    approvals.write_text(json.dumps(content))
    with pytest.raises(ApprovalsError, match=re.escape(message)):
        Approvals.load(approvals)
