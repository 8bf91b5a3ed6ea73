"""The egress guard: normal replies pass and are audited, leaking ones are blocked and
audited, and the coordinator sees a failure for the leaking site, not its data."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import instruction_message
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

import fedct.client.app as hospital
from fedct.client.egress import egress_guard
from fedct.client.site_errors import site_errors
from fedct.common.cache.store import read_manifest, scan_path
from fedct.common.federation.site_error import fixed_reason
from fedct.common.federation.transport import FLOATING, INTEGER
from fedct.common.model.classifier import ModelConfig, build_model
from fedct.server.app import main

TINY = ModelConfig(backbone="test_efficientnet")
Handler = Callable[[Message, Context], Message]


@pytest.fixture
def site_a(site_caches: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    """Node config of hospital A, with its audit log in the test's directory."""
    return {"data-path": str(site_caches["site_a"]), "site": "A", "audit-log": str(tmp_path / "a")}


def _context(node_config: dict[str, Any], run_config: dict[str, Any]) -> Context:
    return Context(
        run_id=1, node_id=10, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def _request(run_config: dict[str, Any], message_type: str, cfg: ModelConfig = TINY) -> Message:
    return instruction_message(run_config, message_type, cfg, **{"transport-dtype": "float16"})


def _honest_train_reply(request: Message) -> Message:
    """What a site sends after training: the packed model in float16 (the transport dtype),
    its metrics and its name; no training, to keep the test fast."""
    arrays = ArrayRecord()
    for key, array in request.content["arrays"].items():
        value = array.numpy()
        arrays[key] = Array(value.astype(np.float16) if value.dtype.kind == "f" else value)
    metrics = MetricRecord(
        {"num-examples": 8, "train-loss": 0.5, "train-accuracy": 0.75, "train-seconds": 1.0}
    )
    content = RecordDict(
        {"arrays": arrays, "metrics": metrics, "site": ConfigRecord({"name": "A"})}
    )
    return Message(content=content, reply_to=request)


def _pixels(site_dir: Path) -> np.ndarray:
    first = read_manifest(site_dir)[0]["scan_id"]
    return np.load(scan_path(site_dir, first))[0]


def _guarded(request: Message, context: Context, handler: Handler) -> Message:
    app = ClientApp(mods=[egress_guard, site_errors])
    app.train()(handler)
    app.evaluate()(handler)
    return app(request, context)


def _audit(node_config: dict[str, Any]) -> list[dict[str, Any]]:
    lines = Path(node_config["audit-log"]).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_an_honest_train_reply_passes_and_is_audited(
    run_config: dict[str, Any], site_a: dict[str, Any], task_identity: None
) -> None:
    request = _request(run_config, MessageType.TRAIN)
    reply = _guarded(request, _context(site_a, run_config), lambda m, c: _honest_train_reply(m))
    assert not reply.has_error()
    (line,) = _audit(site_a)
    assert line["blocked"] is False and line["reasons"] == []
    assert (line["run"], line["round"], line["message_type"]) == (1, 3, "train")
    assert set(line["records"]) == {"arrays", "metrics", "site"}
    shape = list(request.content["arrays"][FLOATING].shape)
    assert line["arrays"]["arrays"][FLOATING] == [shape, "float16"]
    assert line["metric_keys"] == {
        "metrics": ["num-examples", "train-loss", "train-accuracy", "train-seconds"]
    }
    assert line["bytes"] > 0 and line["time"].endswith("+00:00")


def test_real_handlers_pass_the_guard(
    run_config: dict[str, Any], site_a: dict[str, Any], task_identity: None
) -> None:
    context = _context(site_a, run_config)
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
        assert not hospital.app(_request(run_config, message_type), context).has_error()
    evaluated = _audit(site_a)[1]
    assert not evaluated["blocked"] and evaluated["arrays"] == {}
    assert {"tune-hist-covid", "tune-hist-other", "test-auc_covid"} <= set(
        evaluated["metric_keys"]["metrics"]
    )


@dataclass(frozen=True)
class Leak:
    pixels: np.ndarray  # a slice of a scan
    patient: str  # the cache's patient pseudonym


def _with_pixel_array(reply: Message, leak: Leak) -> None:
    reply.content["arrays"]["leak"] = Array(leak.pixels)


def _with_patient_in_site_record(reply: Message, leak: Leak) -> None:
    reply.content["site"]["patient"] = leak.patient


def _with_patient_record(reply: Message, leak: Leak) -> None:
    reply.content["debug"] = ConfigRecord({"patient": leak.patient})


def _with_patient_as_site_name(reply: Message, leak: Leak) -> None:
    reply.content["site"]["name"] = leak.patient


def _with_pixel_metric(reply: Message, leak: Leak) -> None:
    reply.content["metrics"]["leak"] = leak.pixels.ravel().astype(int).tolist()


def _with_wrong_shape(reply: Message, leak: Leak) -> None:
    value = reply.content["arrays"][FLOATING].numpy()
    reply.content["arrays"][FLOATING] = Array(np.concatenate([value, value[:7]]))


def _with_float32(reply: Message, leak: Leak) -> None:
    value = reply.content["arrays"][FLOATING].numpy()
    reply.content["arrays"][FLOATING] = Array(value.astype(np.float32))


def _without_an_array(reply: Message, leak: Leak) -> None:
    del reply.content["arrays"][INTEGER]


NOT_THE_MODEL = "arrays that are not the model's"
WRONG_ARRAY = "arrays of the wrong shape, dtype or size"
NOT_THE_SITE = "a site record with more than the site's name"
RECORDS = "records other than the protocol's"
LEAKS: dict[str, tuple[Callable[[Message, Leak], None], str]] = {
    "pixel array": (_with_pixel_array, NOT_THE_MODEL),
    "patient id in the site record": (_with_patient_in_site_record, NOT_THE_SITE),
    "patient id record": (_with_patient_record, RECORDS),
    "patient id as the site name": (_with_patient_as_site_name, "a site name that is not"),
    "pixels as a metric list": (_with_pixel_metric, "metrics the protocol does not have"),
    "wrong shape": (_with_wrong_shape, WRONG_ARRAY),
    "wrong dtype": (_with_float32, WRONG_ARRAY),
    "missing array": (_without_an_array, NOT_THE_MODEL),
}


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_a_leaking_train_reply_is_blocked_and_audited(
    leak: str,
    run_config: dict[str, Any],
    site_a: dict[str, Any],
    site_caches: dict[str, Path],
    task_identity: None,
) -> None:
    change, kind = LEAKS[leak]
    patient = read_manifest(site_caches["site_a"])[0]["patient_id"]

    def leaky(message: Message, context: Context) -> Message:
        reply = _honest_train_reply(message)
        change(reply, Leak(_pixels(site_caches["site_a"]), patient))
        return reply

    request = _request(run_config, MessageType.TRAIN)
    reply = _guarded(request, _context(site_a, run_config), leaky)
    assert reply.has_error() and reply.error.reason.startswith("site 'A': egress: ")
    assert kind in reply.error.reason and patient not in reply.error.reason
    (line,) = _audit(site_a)
    assert line["blocked"] is True and any(r.startswith(kind) for r in line["reasons"])
    assert patient not in json.dumps(line)


def test_arrays_in_an_evaluate_reply_are_blocked(
    run_config: dict[str, Any], site_a: dict[str, Any], task_identity: None
) -> None:
    request = _request(run_config, MessageType.EVALUATE)
    reply = _guarded(request, _context(site_a, run_config), lambda m, c: _honest_train_reply(m))
    assert reply.has_error() and RECORDS in reply.error.reason


def test_head_only_mode_allows_the_head_only(
    run_config: dict[str, Any], site_a: dict[str, Any], task_identity: None
) -> None:
    frozen = ModelConfig(backbone="test_efficientnet", freeze_backbone=True)
    context = _context(site_a, run_config)
    head = _request(run_config, MessageType.TRAIN, frozen)
    assert set(head.content["arrays"]) == {FLOATING}
    head_size = sum(p.numel() for p in build_model(frozen).head.parameters())
    assert head.content["arrays"][FLOATING].shape == (head_size,)
    assert not _guarded(head, context, lambda m, c: _honest_train_reply(m)).has_error()

    whole = _request(run_config, MessageType.TRAIN)
    whole.content["config"]["freeze-backbone"] = True
    reply = _guarded(whole, context, lambda m, c: _honest_train_reply(m))
    assert reply.has_error() and "arrays that are not the model's" in reply.error.reason


def test_a_raising_handler_is_audited_and_answered_in_fixed_words(
    run_config: dict[str, Any], site_a: dict[str, Any], task_identity: None
) -> None:
    def broken(message: Message, context: Context) -> Message:
        raise RuntimeError("disk full")

    context = _context(site_a, run_config)
    reply = _guarded(_request(run_config, MessageType.TRAIN), context, broken)
    assert reply.error.reason == "site 'A': " + fixed_reason("internal")
    (line,) = _audit(site_a)
    assert line["error"] == fixed_reason("internal") and "disk full" not in json.dumps(line)


def test_the_coordinator_sees_a_failure_for_the_leaking_site(
    site_caches: dict[str, Path],
    run_config: dict[str, Any],
    tmp_path: Path,
    task_identity: None,
    make_grid: Any,
) -> None:
    pixels = _pixels(site_caches["site_b"])

    def train(message: Message, context: Context) -> Message:
        reply = hospital.train(message, context)
        if context.node_config["site"] == "B":
            reply.content["arrays"]["slice"] = Array(pixels)
        return reply

    leaky = ClientApp(mods=[egress_guard, site_errors])
    leaky.train()(train)
    leaky.evaluate()(hospital.evaluate)
    nodes = [
        {"data-path": str(site_caches[s]), "site": n, "audit-log": str(tmp_path / n)}
        for s, n in (("site_a", "A"), ("site_b", "B"))
    ]
    config = {
        **run_config,
        "num-server-rounds": 1,
        "min-train-replies": 1,
        "transport-dtype": "float16",
        "cross-site": False,
    }
    grid = make_grid(nodes, config)
    grid.app = leaky
    main(grid, _context({}, config))

    card = json.loads((Path(config["run-dir"]) / "round_001.card.json").read_text())
    assert [p["site"] for p in card["train"]["participants"]] == ["A"]
    (failure,) = card["train"]["failures"]
    assert failure["reason"].startswith(
        "site 'B': egress: the guard blocked the reply (arrays that"
    )
    assert "slice" not in failure["reason"]
    assert {s["site"] for s in card["federated_evaluation"]["sites"]} == {"A", "B"}
    train_b = [line for line in _audit(nodes[1]) if line["message_type"] == "train"]
    assert train_b[0]["blocked"] and "unexpected slice" in train_b[0]["reasons"][0]
    assert not any(line["blocked"] for line in _audit(nodes[0]))
