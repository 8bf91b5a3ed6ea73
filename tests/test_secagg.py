"""Secure aggregation (SecAgg+) over fedct's real ClientApp in process: the protocol's
arithmetic, the secure sum against the plain one, dropouts after key sharing, and a hostile
coordinator against every stage (client/secagg.py, server/secagg.py)."""

from __future__ import annotations

import math
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
from secagg_grid import LAYOUT, aggregate, global_state, make_grid, write_sites

import fedct.client.app as hospital
from fedct.client.egress import egress_guard, violations
from fedct.client.local import evaluate_site
from fedct.client.site_data import resolve_site
from fedct.client.site_errors import site_errors
from fedct.common.federation import secagg
from fedct.common.federation.messages import (
    CONFIG_RECORD,
    HISTOGRAM_KEYS,
    MASKED_ARRAY,
    MASKED_RECORD,
    SECAGG_RECORD,
    EvaluateInstruction,
    SecAggKeys,
    SecAggMasked,
    SecAggShares,
    SecAggUnmask,
)
from fedct.common.federation.secure_vector import VectorSpec
from fedct.common.federation.site_error import in_vocabulary
from fedct.server.rounds import pooled_operating_point
from fedct.server.settings import ServerSettings
from fedct.server.strategies import aggregate_metrics

SITES = ("h1", "h2", "h3", "h4")


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sites(tmp_path_factory.mktemp("secagg"), SITES)


@pytest.fixture
def evaluation(run_config: dict[str, Any]) -> tuple[EvaluateInstruction, ArrayRecord]:
    """Round 3's evaluate instruction of the tiny model, and its packed global weights."""
    settings = ServerSettings.from_run_config(run_config)
    record = settings.evaluate_instruction("k1", 3, LAYOUT.fingerprint)
    return EvaluateInstruction.from_record(record), LAYOUT.pack(global_state(), "float32")


def _plain(caches: dict[str, Path], names: list[str], evaluation: Any) -> dict[str, Any]:
    """Each named site's plain evaluate reply metrics (as it would send them)."""
    return {
        name: evaluate_site(resolve_site({"data-path": str(caches[name])}, {}), *evaluation)
        for name in names
    }


# --- the arithmetic -----------------------------------------------------------------------


def test_fixed_point_sums_are_exact_and_within_the_printed_bound() -> None:
    rng = np.random.default_rng(0)
    weights = np.array([3.0, 40.0, 7.0])
    updates = rng.normal(0, 0.05, (3, 5000))
    total = np.zeros(5000, secagg.FIELD_DTYPE)
    for weight, update in zip(weights, updates, strict=True):
        secagg.add_into(total, secagg.quantize(weight * update, rng))
    mean = secagg.dequantize(total) / weights.sum()
    exact = weights @ updates / weights.sum()
    bound = secagg.quantisation_bound(3, weights.sum())
    print(f"quantisation bound of a weighted mean of 3 sites, 50 examples: {bound:.3g}")
    assert np.max(np.abs(mean - exact)) <= bound
    # Negative sums wrap through the field and come back; stochastic rounding is unbiased.
    assert secagg.dequantize(secagg.quantize(np.array([-2.5]), rng))[0] == -2.5
    noisy = [secagg.dequantize(secagg.quantize(np.full(1, 1e-7), rng))[0] for _ in range(4000)]
    assert abs(np.mean(noisy) - 1e-7) < 2e-8


def test_the_graph_degree_and_threshold_for_3_to_100_sites() -> None:
    instance = secagg.instance_id("k", 1, "train")
    for sites, degree, threshold in ((3, 2, 2), (10, 9, 7), (30, 20, 14), (100, 20, 14)):
        nodes = list(range(1, sites + 1))
        k = secagg.effective_degree(20, sites)
        assert (k, secagg.threshold_of(0.66, k + 1)) == (degree, threshold)
        graph = {n: secagg.neighbours(n, nodes, k, instance) for n in nodes}
        assert all(len(near) == k and n not in near for n, near in graph.items())
        assert all(n in graph[m] for n in nodes for m in graph[n])  # symmetric
    # Another instance, another ring: the coordinator cannot pin a site's neighbours.
    other = secagg.neighbours(1, list(range(1, 101)), 20, secagg.instance_id("k", 2, "train"))
    assert other != secagg.neighbours(1, list(range(1, 101)), 20, instance)


def test_sealed_shares_open_only_for_their_pair_and_instance() -> None:
    a, b = secagg.KeyPair.generate(), secagg.KeyPair.generate()
    instance = secagg.instance_id("k", 1, "train")
    seed_shares = secagg.split_secret(b"s" * 32, 2, 3)
    key = secagg.shared_key(a.private, b.public, "share-encryption", instance)
    assert key == secagg.shared_key(b.private, a.public, "share-encryption", instance)
    sealed = secagg.seal_shares(key, instance, 1, 2, seed_shares[1], seed_shares[2])
    assert len(sealed) == secagg.CIPHERTEXT_BYTES
    assert secagg.open_shares(key, instance, 1, 2, sealed) == (seed_shares[1], seed_shares[2])
    other = secagg.instance_id("k", 2, "train")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for args in ((instance, 2, 1, sealed), (other, 1, 2, sealed), (instance, 1, 2, tampered)):
        with pytest.raises(ValueError):
            secagg.open_shares(key, *args)
    assert secagg.combine_secret(seed_shares[1:], 2) == b"s" * 32
    with pytest.raises(ValueError):
        secagg.combine_secret(seed_shares[:1], 2)
    with pytest.raises(ValueError):  # a low-order point gives no shared key
        secagg.shared_key(a.private, bytes(32), "pairwise-mask", instance)


# --- the protocol over the ClientApp -----------------------------------------------------


def test_the_secure_sum_equals_the_plain_sum(
    caches: dict[str, Path], run_config: dict[str, Any], evaluation: Any, task_identity: None
) -> None:
    grid = make_grid(hospital.app, caches, run_config)
    outcome = aggregate(grid, *evaluation)
    assert outcome.reason is None and outcome.survivors == [10, 11, 12, 13]
    plain = _plain(caches, list(SITES), evaluation)
    numbers = [
        RecordDict({"m": MetricRecord({k: v for k, v in m.items() if k not in HISTOGRAM_KEYS})})
        for m in plain.values()
    ]
    expected = aggregate_metrics(numbers, "num-examples")
    result = outcome.result
    assert result is not None and set(result.metrics) == set(expected)
    bound = outcome.quantisation_bound
    assert bound is not None and bound < 1e-6
    for key, value in expected.items():
        assert math.isclose(result.metrics[key], value, abs_tol=bound) or (
            math.isnan(value) and math.isnan(result.metrics[key])
        ), key
    covid = sum(np.array(m["tune-hist-covid"]) for m in plain.values())
    other = sum(np.array(m["tune-hist-other"]) for m in plain.values())
    assert result.histograms is not None and result.histogram_sites == 4
    assert np.array_equal(result.histograms[0], covid)
    assert np.array_equal(result.histograms[1], other)
    assert pooled_operating_point(*result.histograms, 4, "youden", 0.9) is not None
    # Nothing but the stages' records reached the coordinator.
    for reply in grid.replies_seen:
        assert set(reply.content) <= {SECAGG_RECORD, MASKED_RECORD, "site"}


def test_a_site_lost_after_sharing_keys_is_recovered(
    caches: dict[str, Path], run_config: dict[str, Any], evaluation: Any, task_identity: None
) -> None:
    three = {name: caches[name] for name in SITES[:3]}
    grid = make_grid(hospital.app, three, run_config)
    grid.drop_at["secagg_masked"] = {12}
    outcome = aggregate(grid, *evaluation)
    assert outcome.reason is None, outcome.reason
    assert (outcome.survivors, outcome.recovered) == ([10, 11], [12])
    plain = _plain(caches, ["h1", "h2"], evaluation)
    assert outcome.result is not None
    assert outcome.result.metrics["tune-n"] == sum(m["tune-n"] for m in plain.values())
    assert outcome.result.histogram_sites == 2
    assert [f["site"] for f in outcome.failures] == ["h3"]
    assert "secure aggregation masked" in outcome.failures[0]["reason"]


def test_fewer_survivors_than_the_threshold_fail_cleanly(
    caches: dict[str, Path], run_config: dict[str, Any], evaluation: Any, task_identity: None
) -> None:
    three = {name: caches[name] for name in SITES[:3]}
    grid = make_grid(hospital.app, three, run_config)
    grid.drop_at["secagg_masked"] = {11, 12}
    outcome = aggregate(grid, *evaluation)
    assert outcome.result is None
    assert outcome.reason == (
        "secure aggregation failed: 1 of 3 sites sent their masked input, 2 needed"
    )
    # A site dropping after its masked input, before unmasking, is no loss above the threshold.
    grid = make_grid(hospital.app, three, run_config)
    grid.drop_at["secagg_unmask"] = {12}
    outcome = aggregate(grid, *evaluation)
    assert outcome.reason is None and outcome.survivors == [10, 11, 12]


# --- a hostile coordinator against the site -----------------------------------------------


def test_different_models_for_different_sites_leave_a_sum_that_does_not_unmask(
    caches: dict[str, Path], run_config: dict[str, Any], evaluation: Any, task_identity: None
) -> None:
    """The coordinator sends site h1 another model than the others (to read h1's result off
    the sum): the pairwise masks are bound to what each site received and do not cancel."""
    three = {name: caches[name] for name in SITES[:3]}
    grid = make_grid(hospital.app, three, run_config)
    other = LAYOUT.pack(global_state(seed=5), "float32")
    push = grid.push_messages

    def inconsistent(messages: Any) -> Any:
        messages = list(messages)
        for message in messages:
            masked = message.metadata.message_type == "evaluate.secagg_masked"
            if masked and message.metadata.dst_node_id == 10:
                message.content["arrays"] = other
        return push(messages)

    grid.push_messages = inconsistent  # type: ignore[method-assign]
    outcome = aggregate(grid, *evaluation)
    assert outcome.result is None
    assert outcome.reason == (
        "secure aggregation failed: the sum does not decode: its counts are not whole "
        "non-negative numbers"
    )


def test_a_site_that_requires_secure_aggregation_refuses_plain_messages(
    caches: dict[str, Path], run_config: dict[str, Any], task_identity: None
) -> None:
    site = Site(caches["h1"], run_config, **{"require-secure-aggregation": True})
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = hospital.app(instruction_message(run_config, kind), site.context)
        assert _refusal(reply) == (
            "policy: the site answers only through secure aggregation (require-secure-aggregation)"
        )


class Site:
    """One hospital's ClientApp with its Flower context (node 10 among 10, 11, 12)."""

    def __init__(self, cache: Path, run_config: dict[str, Any], **policy: Any) -> None:
        node_config = {"data-path": str(cache), "site": "H", **policy}
        self.context = Context(
            run_id=1, node_id=10, node_config=node_config, state=RecordDict(), run_config=run_config
        )

    def send(self, stage: Any, arrays: ArrayRecord | None = None) -> Message:
        content = RecordDict({CONFIG_RECORD: stage.to_record()})
        if arrays is not None:
            content["arrays"] = arrays
        message = Message(content, dst_node_id=10, message_type=stage.message_type)
        return hospital.app(message, self.context)


def _keys(participants: tuple[int, ...] = (10, 11, 12), degree: int = 2, threshold: int = 2):
    return SecAggKeys("evaluate", 3, "k1", participants, degree, threshold)


def _refusal(reply: Message) -> str:
    assert reply.has_error() and in_vocabulary(reply.error.reason), reply
    return reply.error.reason.split(": ", 1)[1]


def _shares_for(site: Site) -> tuple[SecAggShares, list[secagg.KeyPair]]:
    """Keys advertised by the site and by two honest neighbours; the shares stage."""
    assert not site.send(_keys()).has_error()
    pairs = [secagg.KeyPair.generate() for _ in range(4)]
    stage = SecAggShares(
        "evaluate",
        3,
        "k1",
        (11, 12),
        (pairs[0].public, pairs[1].public),
        (pairs[2].public, pairs[3].public),
    )
    return stage, pairs


@pytest.mark.parametrize(
    ("policy", "stage", "reason"),
    [
        ({}, _keys((10, 11, 12, 13, 14), 2, 2), "policy: secagg-degree 2 < 4 (secagg-min-degree)"),
        (
            {"secagg-min-threshold": 0.8},
            _keys((10, 11, 12, 13, 14), 4, 3),
            "policy: secagg-threshold 3 of 5 holders < 0.8 of them (secagg-min-threshold)",
        ),
        (
            {"secagg-min-sites": 4},
            _keys(),
            "policy: secure aggregation over 3 sites < 4 (secagg-min-sites)",
        ),
        (
            {},
            _keys((11, 12, 13)),
            "privacy: secure aggregation: this site is not among the participants",
        ),
    ],
)
def test_a_weaker_aggregation_than_the_sites_policy_is_refused(
    caches: dict[str, Path],
    run_config: dict[str, Any],
    task_identity: None,
    policy: dict[str, Any],
    stage: SecAggKeys,
    reason: str,
) -> None:
    assert _refusal(Site(caches["h1"], run_config, **policy).send(stage)) == reason


def test_the_schema_refuses_stages_that_break_the_protocol(task_identity: None) -> None:
    config = _keys().to_config()
    bad = [
        {**config, "secagg-degree": 1},  # neither complete nor even
        {**config, "secagg-threshold": 1},  # not a majority of the holders
        {**config, "secagg-participants": [12, 11, 10]},  # not in order
        {**config, "secagg-participants": [10, 11]},  # two sites
        {**config, "extra": 1},
    ]
    for values in bad:
        with pytest.raises(ValueError, match="schema|secagg|extra"):
            SecAggKeys.from_record("evaluate", ConfigRecord(values))
    unmask = SecAggUnmask("evaluate", 3, "k1", (10, 11), (11,))
    with pytest.raises(ValueError, match="both survive and drop"):
        unmask.to_record()


def test_every_stage_is_checked_against_what_the_site_saw(
    caches: dict[str, Path], run_config: dict[str, Any], evaluation: Any, task_identity: None
) -> None:
    site = Site(caches["h1"], run_config)
    unmask = SecAggUnmask("evaluate", 3, "k1", (10, 11, 12), ())
    assert "a stage of an aggregation this site has not joined" in _refusal(site.send(unmask))
    stage, pairs = _shares_for(site)
    assert "a stage out of order" in _refusal(site.send(unmask))
    # Shares for a site that is not a neighbour in the graph the site computes itself.
    stranger = SecAggShares("evaluate", 3, "k1", (11, 13), stage.encryption_keys, stage.mask_keys)
    assert "not this site's neighbour" in _refusal(site.send(stranger))
    reply = site.send(stage)
    sealed = reply.content[SECAGG_RECORD]["shares"]
    assert reply.content[SECAGG_RECORD]["nodes"] == [11, 12]
    assert all(len(s) == secagg.CIPHERTEXT_BYTES for s in sealed)
    # The neighbours open their shares; the coordinator holds nothing it can open.
    instance = stage.instance
    own_public = site.context.state.config_records["secagg-evaluate"]
    key = secagg.shared_key(
        pairs[0].private,
        secagg.public_of(own_public["encryption-private"]),
        "share-encryption",
        instance,
    )
    secagg.open_shares(key, instance, 10, 11, sealed[0])
    # A masked-input stage forwarding a tampered share is refused before any training.
    instruction, packed = evaluation
    forged = SecAggMasked.of(instruction, (11,), (bytes(secagg.CIPHERTEXT_BYTES),))
    assert "sealed shares do not open" in _refusal(site.send(forged, packed))


def test_the_site_reveals_one_secret_per_neighbour_once(
    caches: dict[str, Path], run_config: dict[str, Any], evaluation: Any, task_identity: None
) -> None:
    site = Site(caches["h1"], run_config)
    stage, pairs = _shares_for(site)
    site.send(stage)
    # Honest neighbours 11 and 12 seal shares of their own secrets for site 10.
    instance = stage.instance
    own = secagg.public_of(
        site.context.state.config_records["secagg-evaluate"]["encryption-private"]
    )
    forwarded = []
    for sender, pair in ((11, pairs[0]), (12, pairs[1])):
        shares = secagg.split_secret(bytes([sender]) * 32, 2, 3)
        key = secagg.shared_key(pair.private, own, "share-encryption", instance)
        forwarded.append(secagg.seal_shares(key, instance, sender, 10, shares[0], shares[1]))
    instruction, packed = evaluation
    masked = SecAggMasked.of(instruction, (11, 12), tuple(forwarded))
    reply = site.send(masked, packed)
    vector = reply.content[MASKED_RECORD][MASKED_ARRAY].numpy()
    spec = VectorSpec.for_instruction(instruction, LAYOUT)
    assert vector.dtype == secagg.FIELD_DTYPE and vector.shape == (spec.length,)
    # The same input twice would let the coordinator subtract the masks: refused.
    assert "out of order" in _refusal(site.send(masked, packed))
    # An unmask naming the site itself as dropped, or leaving out a neighbour it masked with.
    assert "names this site as dropped" in _refusal(
        site.send(SecAggUnmask("evaluate", 3, "k1", (11, 12), (10,)))
    )
    assert "leaves out a neighbour" in _refusal(
        site.send(SecAggUnmask("evaluate", 3, "k1", (10, 11), ()))
    )
    reply = site.send(SecAggUnmask("evaluate", 3, "k1", (10, 11), (12,)))
    record = reply.content[SECAGG_RECORD]
    assert (record["seed-nodes"], record["key-nodes"]) == ([10, 11], [12])
    assert all(len(s) == secagg.SHARE_BYTES for s in record["seed-shares"] + record["key-shares"])
    # Asking again with the other story (12 survived) would give both secrets of 12: refused.
    assert "out of order" in _refusal(
        site.send(SecAggUnmask("evaluate", 3, "k1", (10, 11, 12), ()))
    )
    # A new aggregation of the same instance cannot start after the input was sent.
    assert "already sent its input" in _refusal(site.send(_keys()))
    assert "secagg-evaluate" in site.context.state.config_records
    assert "mask-private" not in site.context.state.config_records["secagg-evaluate"]


def test_the_egress_guard_holds_each_stage_to_its_reply(
    caches: dict[str, Path], run_config: dict[str, Any], evaluation: Any, task_identity: None
) -> None:
    def leaky(message: Message, context: Context) -> Message:
        reply = hospital.app(message, context)
        if not reply.has_error():
            reply.content[SECAGG_RECORD]["mask-key"] += b"\x00"  # one byte more
        return reply

    app = ClientApp(mods=[egress_guard, site_errors])
    app.evaluate("secagg_keys")(leaky)
    site = Site(caches["h1"], run_config)
    message = Message(
        RecordDict({CONFIG_RECORD: _keys().to_record()}),
        dst_node_id=10,
        message_type="evaluate.secagg_keys",
    )
    reply = app(message, site.context)
    assert reply.has_error() and "egress: the guard blocked the reply" in reply.error.reason
    # A masked vector of the wrong length is blocked too.
    stage, _ = _shares_for(Site(caches["h1"], run_config))
    vector = ArrayRecord({MASKED_ARRAY: Array(np.zeros(5, secagg.FIELD_DTYPE))})

    instruction, _ = evaluation
    masked = SecAggMasked.of(instruction, (), ())
    fake = Message(
        RecordDict({MASKED_RECORD: vector, "site": ConfigRecord({"name": "H"})}), reply_to=message
    )
    assert [v.kind for v in violations(masked, fake, "H")] == [
        "arrays of the wrong shape, dtype or size"
    ]
