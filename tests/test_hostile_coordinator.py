"""A hostile coordinator against the genuine, approved ClientApp (Flower's Message API, in
process): every message it crafts is refused by the schema or the site's policy, nothing is
written outside the site's folders, neither the reply nor the audit log carries a path, a
value or an exception's text, and an honest message still works afterwards."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import instruction_message, write_tiny_cache
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

import fedct.client.app as hospital
from fedct.client.dp import ledger_path
from fedct.client.egress import egress_guard
from fedct.client.site_errors import site_errors
from fedct.common.federation.messages import COVID_KEY, TrainInstruction
from fedct.common.federation.site_error import in_vocabulary
from fedct.common.federation.transport import FLOATING
from fedct.common.model.classifier import ModelConfig
from fedct.common.training.accounting import PrivacyLedger
from fedct.server.app import main

TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE
GN = ModelConfig(backbone="test_efficientnet_gn", norm="group")


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    """A hospital with its own cache, state and audit log, all under ``tmp_path/site``; its
    tune split holds 10 scans (the default min-histogram-scans) and its patients are 5."""
    root = tmp_path / "site"
    cache = write_tiny_cache(
        root / "cache",
        {"train": {0: 3, 1: 2, 2: 3}, "tune": {0: 5, 2: 5}, "test": {0: 1, 2: 1}},
        seed=7,
    )
    return {
        "data-path": str(cache),
        "site": "H",
        "state-dir": str(root / "state"),
        "audit-log": str(root / "audit.jsonl"),
    }


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[None]:
    """Fails the test if anything appears under ``tmp_path`` outside the site's folder."""
    (tmp_path / "elsewhere").mkdir()
    before = {p for p in _files(tmp_path) if not p.startswith("site")}
    yield
    after = {p for p in _files(tmp_path) if not p.startswith("site")}
    assert after == before, f"written outside the site: {sorted(after - before)}"


def _context(node: dict[str, Any], run_config: dict[str, Any]) -> Context:
    return Context(
        run_id=1, node_id=10, node_config=node, state=RecordDict(), run_config=run_config
    )


def _audit(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(node["audit-log"]).read_text().splitlines()]


def _send(
    message: Message,
    node: dict[str, Any],
    run_config: dict[str, Any],
    app: ClientApp = hospital.app,
) -> Message:
    return app(message, _context(node, run_config))


def _refused(reply: Message, node: dict[str, Any], start: str) -> str:
    """Checks a refusal: a fixed-vocabulary reason naming the site that starts with
    ``start``, with no path in it, and the same reason, alone, in the audit log."""
    assert reply.has_error(), "the hostile message was answered"
    reason = reply.error.reason
    assert in_vocabulary(reason) and reason.startswith(f"site 'H': {start}"), reason
    assert "/" not in reason and str(Path(node["data-path"]).parent) not in reason
    line = _audit(node)[-1]
    assert line["error"] == reason.removeprefix("site 'H': ")
    assert line.get("blocked") or "metric_keys" not in line  # a blocked reply's structure only
    return reason


def _honest_round_still_works(node: dict[str, Any], run_config: dict[str, Any]) -> None:
    for kind in (TRAIN, EVALUATE):
        reply = _send(instruction_message(run_config, kind), node, run_config)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""


def _with(key: str, value: Any) -> Callable[[ConfigRecord], None]:
    def change(config: ConfigRecord) -> None:
        config[key] = value

    return change


def _without(key: str) -> Callable[[ConfigRecord], None]:
    def change(config: ConfigRecord) -> None:
        del config[key]

    return change


# Messages that break the schema: the site refuses them before it reads anything.
SCHEMA_ATTACKS: dict[str, tuple[str, Callable[[ConfigRecord], None], str]] = {
    "a weights path in the config": (
        TRAIN,
        _with("pretrained-weights", "/etc/passwd"),
        "schema: unknown key 'pretrained-weights'",
    ),
    "the old JSON model config with a path": (
        EVALUATE,
        _with("model-config", json.dumps({"pretrained_weights": "/srv/x.pth"})),
        "schema: unknown key 'model-config'",
    ),
    "a run key that climbs out of the state dir": (
        TRAIN,
        _with("run-key", "../../elsewhere/owned"),
        "schema: 'run-key' is not 1 to 128",
    ),
    "a run key with a slash": (EVALUATE, _with("run-key", "a/b"), "schema: 'run-key' is not"),
    "a string where a flag is expected": (
        TRAIN,
        _with("dp", "false"),
        "schema: 'dp' must be true or false",
    ),
    "a bool where a count is expected": (
        TRAIN,
        _with("batch-size", True),
        "schema: 'batch-size' must be a whole number",
    ),
    "a NaN learning rate": (TRAIN, _with("lr", math.nan), "schema: 'lr' must be a finite number"),
    "an infinite noise multiplier": (
        TRAIN,
        _with("dp-noise-multiplier", math.inf),
        "schema: 'dp-noise-multiplier' must be a finite",
    ),
    "a negative weight decay": (
        TRAIN,
        _with("weight-decay", -1.0),
        "schema: 'weight-decay' -1 is not in [0, 10]",
    ),
    "a δ of one": (TRAIN, _with("dp-delta", 1.0), "schema: 'dp-delta' 1 is not in [0, 1)"),
    "scores of the train split": (EVALUATE, _with("splits", "train"), "schema: 'splits' is not"),
    "a split asked twice": (EVALUATE, _with("splits", "tune,tune"), "schema: 'splits' is not"),
    "a billion bins": (
        EVALUATE,
        _with("tune-histogram-bins", 10**9),
        "schema: 'tune-histogram-bins' 1000000000 is not in [1, 100000]",
    ),
    "an unknown key with odd characters": (
        TRAIN,
        _with("x\n../../etc", 1),
        "schema: unknown key (a key with other characters)",
    ),
    "no layout": (TRAIN, _without("layout"), "schema: missing key 'layout'"),
    "a layout that is not a fingerprint": (
        EVALUATE,
        _with("layout", "../weights.pth"),
        "schema: 'layout' is not 16 hexadecimal",
    ),
    "an unknown optimizer": (TRAIN, _with("optimizer", "lion"), "schema: 'optimizer' is not one"),
    "frozen BatchNorm in a GroupNorm model": (
        TRAIN,
        lambda config: config.update({"norm": "group", "freeze-bn": True}),
        "schema: keys that do not fit together: freeze_bn applies to BatchNorm",
    ),
}


@pytest.mark.parametrize("attack", sorted(SCHEMA_ATTACKS))
def test_a_message_that_breaks_the_schema_is_refused_before_anything_is_read(
    attack: str,
    site: dict[str, Any],
    run_config: dict[str, Any],
    task_identity: None,
    outside: None,
) -> None:
    kind, change, start = SCHEMA_ATTACKS[attack]
    message = instruction_message(run_config, kind)
    change(message.content["config"])
    _refused(_send(message, site, run_config), site, start)
    assert not Path(site["state-dir"]).exists()  # no state written for a refused message


def test_records_and_message_types_the_protocol_lacks_are_refused(
    site: dict[str, Any], run_config: dict[str, Any], task_identity: None, outside: None
) -> None:
    extra = instruction_message(run_config, TRAIN)
    extra.content["probe"] = ConfigRecord({"path": "/etc/shadow"})
    _refused(_send(extra, site, run_config), site, "schema: a message holds exactly")
    as_metrics = instruction_message(run_config, EVALUATE)
    as_metrics.content["config"] = MetricRecord({"server-round": 3})
    _refused(_send(as_metrics, site, run_config), site, "schema: a message holds exactly")
    # Flower itself refuses a type the ClientApp has no handler for; no site code runs.
    queried = instruction_message(run_config, TRAIN)
    queried.metadata.__dict__["_message_type"] = "train.export"
    with pytest.raises(ValueError, match="No train function registered with name 'export'"):
        _send(queried, site, run_config)
    assert len(_audit(site)) == 2
    _honest_round_still_works(site, run_config)


# What the site's policy refuses: well-formed messages that ask too much.
POLICY_ATTACKS: dict[str, tuple[str, dict[str, Any], str]] = {
    "per-scan scores through fine histograms": (
        EVALUATE,
        {"operating-point-bins": 100_000},
        "policy: tune-histogram-bins 100000 > 64 (max-histogram-bins)",
    ),
    "histograms just past the bound": (
        EVALUATE,
        {"operating-point-bins": 65},
        "policy: tune-histogram-bins 65 > 64",
    ),
    "a batch that fills the memory": (TRAIN, {"batch-size": 4000}, "policy: batch-size 4000 > 16"),
    "scoring in huge batches": (EVALUATE, {"batch-size": 64}, "policy: batch-size 64 > 16"),
    "a huge backbone": (
        TRAIN,
        {"backbone": "vit_giant_patch14_224"},
        "policy: backbone vit_giant_patch14_224 is not among allowed-backbones",
    ),
    "slices per pass that fill the memory": (
        EVALUATE,
        {"slice-chunk": 4096},
        "policy: slice-chunk 4096 > 64 (max-slice-chunk)",
    ),
    "rounds that never end": (TRAIN, {"local-epochs": 500}, "policy: local-epochs 500 > 10"),
}


@pytest.mark.parametrize("attack", sorted(POLICY_ATTACKS))
def test_a_message_beyond_the_sites_policy_is_refused(
    attack: str,
    site: dict[str, Any],
    run_config: dict[str, Any],
    task_identity: None,
    outside: None,
) -> None:
    kind, asked, reason = POLICY_ATTACKS[attack]
    overrides = {k: v for k, v in asked.items() if k != "backbone"}
    message = instruction_message(run_config, kind, **overrides)
    if "backbone" in asked:  # a model the site would have to build to check the layout
        message.content["config"]["backbone"] = asked["backbone"]
    _refused(_send(message, site, run_config), site, reason)


def test_the_site_not_the_message_sets_the_bounds(
    site: dict[str, Any], run_config: dict[str, Any], task_identity: None
) -> None:
    """A site that allows more accepts more; one that allows less refuses the defaults."""
    generous = {**site, "max-histogram-bins": 512, "max-batch-size": 64}
    reply = _send(
        instruction_message(run_config, EVALUATE, **{"operating-point-bins": 500}),
        generous,
        run_config,
    )
    assert not reply.has_error() and len(reply.content["metrics"][COVID_KEY]) == 500
    strict = {**site, "allowed-backbones": "efficientnet_b3", "max-histogram-bins": 10}
    _refused(
        _send(instruction_message(run_config, EVALUATE), strict, run_config),
        strict,
        "policy: backbone test_efficientnet is not among allowed-backbones",
    )
    broken = {**site, "max-batch-size": "many"}
    _refused(_send(instruction_message(run_config, TRAIN), broken, run_config), broken, "site: ")


def test_histograms_over_a_small_tune_split_leave_as_zeros(
    site_caches: dict[str, Path], run_config: dict[str, Any], tmp_path: Path, task_identity: None
) -> None:
    """Site A's tune split holds 4 scans: with 50 bins one bin would show one scan's score."""
    node = {"data-path": str(site_caches["site_a"]), "site": "A", "audit-log": str(tmp_path / "a")}
    reply = _send(instruction_message(run_config, EVALUATE), node, run_config)
    metrics = reply.content["metrics"]
    assert metrics["tune-n"] == 4 and metrics[COVID_KEY] == [0] * 50
    allowed = {**node, "min-histogram-scans": 4}
    reply = _send(instruction_message(run_config, EVALUATE), allowed, run_config)
    assert sum(reply.content["metrics"][COVID_KEY]) == 2


def test_a_weights_path_reveals_nothing_about_the_sites_files(
    site: dict[str, Any], run_config: dict[str, Any], task_identity: None, tmp_path: Path
) -> None:
    """A frozen backbone is built from the site's own weights, never from a message: asking
    for a backbone no package ships weights for gives the same refusal whether or not a
    weights file exists anywhere, and no file is read."""
    (tmp_path / "elsewhere").mkdir()
    present = tmp_path / "elsewhere" / "b3.pth"
    present.write_bytes(b"secret")
    frozen = ModelConfig(backbone="test_efficientnet", freeze_backbone=True)
    replies = []
    for path in (present, tmp_path / "absent.pth"):
        message = instruction_message(run_config, TRAIN, frozen)
        message.content["config"]["pretrained-weights"] = str(path)
        replies.append(_send(message, site, run_config).error.reason)
        del message.content["config"]["pretrained-weights"]
        replies.append(_send(message, site, run_config).error.reason)
    assert replies[0] == replies[2] and replies[1] == replies[3]
    assert replies[0].endswith("schema: unknown key 'pretrained-weights'")
    assert replies[1].endswith(
        "policy: a frozen test_efficientnet needs starting weights the site holds "
        "(node-config pretrained-weights)"
    )


def test_run_keys_name_files_only_through_a_hash(
    site: dict[str, Any], run_config: dict[str, Any], task_identity: None, outside: None
) -> None:
    message = instruction_message(run_config, TRAIN, **{"strategy": "fedbn"})
    message.content["config"]["run-key"] = "..-..-etc-passwd"
    assert not _send(message, site, run_config).has_error()
    state = Path(site["state-dir"])
    (stored,) = [p.name for p in state.iterdir()]
    assert stored.startswith("fedbn-") and "passwd" not in stored and ".." not in stored
    instruction, _ = TrainInstruction.from_message(message)
    assert stored == f"fedbn-{instruction.state_name}.safetensors"


def _dp_message(run_config: dict[str, Any], **dp: Any) -> Message:
    keys = {"class-weighting": "none", "dp": True, "dp-sample-rate": 0.5, **dp}
    return instruction_message(run_config, TRAIN, GN, **keys)


def test_the_dp_budget_is_checked_at_the_sites_delta(
    site: dict[str, Any], run_config: dict[str, Any], task_identity: None, outside: None
) -> None:
    """The site trains on 8 patients (δ 0.1 / 8 by default) with a budget of ε 50 there.  A
    coordinator that sends a larger δ, which makes ε look smaller, is refused; one that sends
    none gets the site's δ; a smaller δ is used for the run's own ε, while the budget stays at
    the site's δ."""
    node = {**site, "dp-epsilon-budget": 50.0}
    loose = _dp_message(run_config, **{"dp-delta": 0.5, "dp-noise-multiplier": 1.0})
    _refused(_send(loose, node, run_config), node, "policy: dp-delta 0.5 is above the site's delta")
    assert not ledger_path(Path(site["state-dir"])).exists()

    honest = _send(_dp_message(run_config, **{"dp-noise-multiplier": 1.0}), node, run_config)
    site_delta = honest.content["metrics"]["dp-delta"]
    assert not honest.has_error() and site_delta == pytest.approx(0.1 / 8)

    strict = {**node, "dp-delta": 1e-4}
    smaller = _send(
        _dp_message(run_config, **{"dp-delta": 1e-5, "dp-noise-multiplier": 1.0}),
        strict,
        run_config,
    )
    assert smaller.content["metrics"]["dp-delta"] == 1e-5
    # A δ above the site's own (1e-4) is refused, though it is far below 1 / patients.
    _refused(
        _send(_dp_message(run_config, **{"dp-delta": 1e-3}), strict, run_config),
        strict,
        "policy: dp-delta 0.001",
    )


def test_a_sample_rate_that_would_run_forever_is_refused(
    site: dict[str, Any], run_config: dict[str, Any], task_identity: None
) -> None:
    """q = 1e-6 would make one local epoch a million DP-SGD steps over 8 patients."""
    reply = _send(_dp_message(run_config, **{"dp-sample-rate": 1e-6}), site, run_config)
    _refused(reply, site, "policy: dp-sample-rate 1e-06 asks more steps than the site has")
    assert not ledger_path(Path(site["state-dir"])).exists()


def test_an_epsilon_that_is_not_a_number_is_over_every_budget(
    site: dict[str, Any],
    run_config: dict[str, Any],
    task_identity: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for value in (math.nan, -1.0, math.inf):
        monkeypatch.setattr(PrivacyLedger, "epsilon", lambda self, delta, v=value: v)
        reply = _send(_dp_message(run_config), site, run_config)
        _refused(reply, site, "privacy: epsilon is not a finite, non-negative number")
    assert not ledger_path(Path(site["state-dir"])).exists()


def _app_with(handler: Callable[[Message, Context], Message]) -> ClientApp:
    """The genuine mods around a handler that misbehaves (a bug, or code tricked into it)."""
    app = ClientApp(mods=[egress_guard, site_errors])
    app.train()(handler)
    app.evaluate()(handler)
    return app


def _evaluated(message: Message, context: Context) -> Message:
    return hospital.evaluate(message, context)


def _changed_metrics(change: Callable[[MetricRecord], None]) -> Callable:
    def handler(message: Message, context: Context) -> Message:
        reply = hospital.evaluate(message, context)
        change(reply.content["metrics"])
        return reply

    return handler


def _set(key: str, value: Any) -> Callable[[MetricRecord], None]:
    def change(metrics: MetricRecord) -> None:
        metrics[key] = value

    return change


CONTENT_LEAKS: dict[str, tuple[Callable[[MetricRecord], None], str]] = {
    "pixels as extra scalar metrics": (
        lambda m: m.update({f"px{i}": float(i) for i in range(16)}),
        "metrics the protocol does not have",
    ),
    "a histogram one bin longer": (
        lambda m: m.__setitem__(COVID_KEY, [*m[COVID_KEY], 1]),
        "metric values outside",
    ),
    "a histogram with a negative count": (
        lambda m: m.__setitem__(COVID_KEY, [-1, *m[COVID_KEY][1:]]),
        "metric values outside",
    ),
    "an AUC that encodes a value": (_set("test-auc_covid", 123.456), "metric values outside"),
    "a fractional scan count": (_set("test-n", 2.5), "metric values outside"),
    "a list where a number belongs": (_set("test-loss", [1, 2, 3]), "metric values outside"),
    "a missing metric": (lambda m: m.__delitem__("test-loss"), "metrics the protocol needs"),
}


@pytest.mark.parametrize("leak", sorted(CONTENT_LEAKS))
def test_the_egress_guard_checks_content_not_only_shape(
    leak: str, site: dict[str, Any], run_config: dict[str, Any], task_identity: None
) -> None:
    change, kind = CONTENT_LEAKS[leak]
    app = _app_with(_changed_metrics(change))
    reply = _send(instruction_message(run_config, EVALUATE), site, run_config, app)
    reason = _refused(reply, site, "egress: the guard blocked the reply")
    assert kind in reason
    line = _audit(site)[-1]
    assert any(r.startswith(kind) for r in line["reasons"])
    assert "123.456" not in json.dumps(line) and "2.5" not in json.dumps(line)


def test_error_text_never_leaves_the_site(
    site: dict[str, Any], run_config: dict[str, Any], task_identity: None
) -> None:
    patient = "patient-train-0-0"
    cache = site["data-path"]

    def raising(message: Message, context: Context) -> Message:
        raise RuntimeError(f"{cache}/scans/x.npy: {patient} pixel 812")

    def erroring(message: Message, context: Context) -> Message:
        return Message(Error(code=0, reason=f"site 'H': site: {patient} 812"), reply_to=message)

    def other_site(message: Message, context: Context) -> Message:
        return Message(Error(code=0, reason="site 'G': site: fine"), reply_to=message)

    for handler in (raising, erroring, other_site):
        reply = _send(instruction_message(run_config, TRAIN), site, run_config, _app_with(handler))
        reason = _refused(reply, site, "internal: the site's ClientApp failed")
        assert patient not in reason and "812" not in reason
    audit = Path(site["audit-log"]).read_text()
    assert patient not in audit and "812" not in audit and cache not in audit


def test_weights_that_do_not_fit_are_refused_without_echo(
    site: dict[str, Any], run_config: dict[str, Any], task_identity: None
) -> None:
    message = instruction_message(run_config, TRAIN)
    floating = message.content["arrays"][FLOATING].numpy()
    for bad in (floating[:-1], np.full_like(floating, np.nan), floating.astype(np.complex64)):
        message.content["arrays"] = ArrayRecord({FLOATING: Array(bad)})
        reason = _refused(_send(message, site, run_config), site, "transport: ")
        assert "nan" not in reason.lower() and str(floating.size) not in reason
    _honest_round_still_works(site, run_config)


def test_a_hostile_run_fails_at_the_site_and_the_card_says_why(
    site: dict[str, Any],
    run_config: dict[str, Any],
    tmp_path: Path,
    task_identity: None,
    make_grid: Any,
) -> None:
    """The coordinator's own ServerApp, with a run config asking for 200 bins: every evaluate
    message is refused by policy, the card names the site and the fixed reason, training goes
    on, and the honest run afterwards completes."""
    config = {**run_config, "num-server-rounds": 1, "cross-site": False}
    config.update({"min-train-nodes": 1, "min-train-replies": 1, "min-available-nodes": 1})
    hostile = {**config, "operating-point-bins": 200, "run-dir": str(tmp_path / "hostile")}
    main(make_grid([site], hostile), _context({}, hostile))
    card = json.loads((tmp_path / "hostile" / "round_001.card.json").read_text())
    assert [p["site"] for p in card["train"]["participants"]] == ["H"]
    (failure,) = card["federated_evaluation"]["failures"]
    assert failure["site"] == "H"
    assert (
        failure["reason"] == "site 'H': policy: tune-histogram-bins 200 > 64 (max-histogram-bins)"
    )
    assert card["operating_point"] is None

    main(make_grid([site], config), _context({}, config))
    honest = json.loads((Path(config["run-dir"]) / "round_001.card.json").read_text())
    assert honest["federated_evaluation"]["failures"] == []
    assert honest["operating_point"] is not None
