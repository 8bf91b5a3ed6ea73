"""The federated rounds: a Flower strategy's hooks, driven by fedct's own loop.

Flower 1.41's ``Strategy.start`` always runs rounds 1..N, so it cannot resume at round k+1.
This loop calls the same four hooks (configure/aggregate train, configure/aggregate
evaluate) with the real round numbers and adds what ``start`` lacks: a deadline for nodes to
connect, a straggler deadline for replies (server/replies.py), a minimum of successful train
replies, weights that travel in ``transport-dtype`` but are aggregated in the model's own
dtypes, a COVID-19 operating point chosen on the sites' pooled tune histograms, and a
checkpoint + model card every round that names every site's part in it (server/roster.py).
For the cross-site validation at the end of a run (server/crosssite.py) it keeps each site's
last trained weights.

The federated operating point: each round, the sites' tune-split histograms of p(COVID-19)
(list metrics of the evaluate replies) are taken out of every reply before the strategy
averages the numbers, summed, and the COVID-19 threshold is chosen on the pool
(common/metrics/pooled_operating_point.py).

With ``secure-aggregation`` each phase is one secure aggregation (server/secagg.py) over the
sites the strategy samples: the coordinator learns the example-weighted mean update, the
summed counts, the averaged metrics and the pooled histograms, never one site's values.  The
mean update is handed to the strategy as the one reply it aggregates, so FedAvg, FedProx and
FedAdam (its step and its averaged statistics) work on the sum as on plain replies; FedBN's
local BatchNorm entries are left out of the sum and keep their global values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict, UserConfig
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedct.common.federation.messages import (
    COVID_KEY,
    OTHER_KEY,
    EvaluateInstruction,
    TrainInstruction,
)
from fedct.common.federation.secure_vector import VectorSpec
from fedct.common.federation.transport import (
    Layout,
    TransportError,
    conform,
    dtypes_of,
    payload_bytes,
    to_record,
)
from fedct.common.metrics.operating_point import OperatingPoint
from fedct.common.metrics.pooled_operating_point import choose_from_histograms
from fedct.common.model.classifier import bn_state_keys
from fedct.common.run.directory import RunDirectory, round_record
from fedct.server.central_eval import CentralEvaluator
from fedct.server.global_model import GlobalModel
from fedct.server.replies import (
    POLL_SECONDS,
    Collected,
    collect,
    shortfall,
    split_replies,
    wait_for_nodes,
)
from fedct.server.roster import Roster, site_name
from fedct.server.secagg import SecureAggregator, content_bytes
from fedct.server.settings import ServerSettings
from fedct.server.strategies import WEIGHT_KEY, strategy_state

# Called after every recorded round with (round, model card, metrics line): progress lines,
# TensorBoard (server/progress.py, server/tensorboard_log.py).
RoundObserver = Callable[[int, dict[str, Any], dict[str, Any]], None]


def reply_metrics(reply: Message) -> dict[str, Any]:
    """The one MetricRecord of a successful reply, as a dict."""
    return dict(next(iter(reply.content.metric_records.values())))


@dataclass(frozen=True)
class LocalModel:
    """A site's weights from the last round it trained in, as the coordinator received them."""

    node_id: int
    round: int
    arrays: ArrayRecord


class Federation:
    """Runs rounds of ``strategy`` over ``grid`` and records each in ``run_dir``."""

    def __init__(
        self,
        grid: Grid,
        strategy: FedAvg,
        settings: ServerSettings,
        run_dir: RunDirectory,
        model: GlobalModel,
        evaluator: CentralEvaluator,
        run_config: UserConfig,
        run_key: str,
        roster: Roster | None = None,
    ) -> None:
        self.grid = grid
        self.strategy = strategy
        self.settings = settings
        self.run_dir = run_dir
        self.model = model
        self.evaluator = evaluator
        self.run_config = dict(run_config)
        self.run_key = run_key
        initial = model.arrays()
        self.dtypes = dtypes_of(initial)
        self.layout = Layout.of(initial)
        self.local_models: dict[str, LocalModel] = {}
        self.roster = roster or Roster()
        self.observers: list[RoundObserver] = []
        self.card_extras: dict[str, Any] = {}  # e.g. the Flower run id and software versions
        self.traffic = {"sent": 0, "received": 0}  # content bytes of this round's messages
        self.secure: SecureAggregator | None = None
        if settings.secure_aggregation:
            self.secure = SecureAggregator(
                lambda messages, minimum, timeout, poll: self.exchange(
                    messages,
                    minimum=len(messages) if minimum is None else minimum,
                    timeout=timeout,
                    poll=poll,
                )[0],
                self.roster,
                degree=settings.secagg_degree,
                threshold=settings.secagg_threshold,
                min_survivors=settings.min_train_replies,
                stage_timeout=settings.secagg_stage_timeout,
            )
        travelling = {name for name, _, _ in self.layout.entries}
        fedbn = settings.strategy == "fedbn"
        self.local_keys = frozenset(bn_state_keys(model.model) & travelling if fedbn else ())

    def run(self, arrays: ArrayRecord, first_round: int) -> ArrayRecord:
        """Rounds ``first_round`` .. ``num_rounds`` from ``arrays``; round 0 is the initial
        model, evaluated centrally and checkpointed.  Returns the final global arrays."""
        if first_round == 0:
            self._record(0, arrays, {}, {}, time.monotonic())
            first_round = 1
        for server_round in range(first_round, self.settings.num_rounds + 1):
            started = time.monotonic()
            self.traffic = {"sent": 0, "received": 0}
            log(INFO, "[ROUND %d/%d]", server_round, self.settings.num_rounds)
            wait_for_nodes(self.grid, self.settings.min_nodes, self.settings.node_wait_timeout)
            connected = self.roster.connected(self.grid)
            arrays, train = self._train(server_round, arrays)
            evaluation, operating_point = self._evaluate(server_round, arrays)
            train["sites"] = self.roster.round_sites(
                connected,
                train.pop("sampled"),
                [p["site"] for p in train["participants"]],
                {"train": train["failures"], "evaluate": evaluation["failures"]},
            )
            self._record(server_round, arrays, train, evaluation, started, operating_point)
        return arrays

    def exchange(
        self,
        messages: Iterable[Message],
        *,
        minimum: int | None = None,
        timeout: float | None = None,
        poll: float = POLL_SECONDS,
    ) -> tuple[Collected, int, int]:
        """Send ``messages`` with their arrays packed in the transport dtype
        (common/federation/transport.py; the layout's fingerprint is in their config), and
        collect the replies up to the straggler deadline (server/replies.py): once
        ``minimum`` (default ``min-train-replies``) replies are in, within ``timeout``
        (default ``round-timeout``), asking the SuperLink for replies every ``poll`` seconds.

        Returns the replies collected, the number of messages sent and the bytes of arrays
        sent.
        """
        messages = list(messages)
        key = self.strategy.arrayrecord_key
        # Flower's strategies may give several messages one shared content: read every
        # message's record before replacing any.
        records = [message.content.get(key) for message in messages]
        packed: dict[int, ArrayRecord] = {}
        for record in records:
            if record is not None and id(record) not in packed:
                packed[id(record)] = self.layout.pack(record, self.settings.transport_dtype)
        for message, record in zip(messages, records, strict=True):
            if record is not None:
                message.content[key] = packed[id(record)]
        sent_bytes = sum(payload_bytes(packed[id(r)]) for r in records if r is not None)
        collected = collect(
            self.grid,
            messages,
            timeout=self.settings.round_timeout if timeout is None else timeout,
            minimum=self.settings.min_train_replies if minimum is None else minimum,
            factor=self.settings.straggler_factor,
            poll=poll,
        )
        for reply in collected.replies:
            self.roster.learn_from(collected.node(reply), reply)
        self.traffic["sent"] += sum(content_bytes(message) for message in messages)
        self.traffic["received"] += sum(content_bytes(reply) for reply in collected.replies)
        return collected, len(messages), sent_bytes

    def failures(self, collected: Collected, failed: list[Message]) -> list[dict[str, Any]]:
        """Every node of an exchange that failed or sent no reply, named, with the reason."""
        return [
            *(self.roster.failure(collected.node(r), r.error.reason) for r in failed),
            *(self.roster.failure(node, why) for node, why in sorted(collected.missing.items())),
        ]

    def _train(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, Any]]:
        phase_started = time.monotonic()
        config = self.settings.train_instruction(
            self.run_key, server_round, self.layout.fingerprint
        )
        messages = list(self.strategy.configure_train(server_round, arrays, config, self.grid))
        if self.secure is not None:
            return self._train_secure(server_round, arrays, messages, phase_started)
        collected, sent, down_bytes = self.exchange(messages)
        ok, failed = split_replies(collected.replies)
        # Replies come in arrival order; float sums in a fixed order keep a seeded run
        # reproducible (one ulp of difference grows over the rounds).
        ok.sort(key=site_name)
        participants, accepted, rejected = [], [], []
        for reply in ok:
            (key, record), *_ = reply.content.array_records.items()
            try:
                unpacked = to_record(self.layout.unpack(record))
            except TransportError as exc:
                log(
                    WARNING,
                    "round %d: ignoring a reply of %s: %s",
                    server_round,
                    site_name(reply),
                    exc,
                )
                rejected.append(self.roster.failure(collected.node(reply), str(exc)))
                continue
            metrics = reply_metrics(reply)
            participants.append(
                {
                    "site": site_name(reply),
                    "node_id": reply.metadata.src_node_id,
                    "num-examples": metrics.get(WEIGHT_KEY),
                    "upload-bytes": payload_bytes(record),
                    "metrics": metrics,
                }
            )
            # Some strategies (FedMedian, FedTrimmedAvg) take the arrays out of the replies
            # they aggregate: give them their own record, keep ours for cross-site validation.
            reply.content[key] = ArrayRecord(dict(unpacked.items()))
            accepted.append(reply)
            if self.settings.cross_site:
                self.local_models[site_name(reply)] = LocalModel(
                    reply.metadata.src_node_id, server_round, unpacked
                )
        reason = shortfall(len(accepted), sent, self.settings.min_train_replies)
        aggregated: dict[str, Any] = {}
        if reason is not None:
            log(WARNING, "round %d: %s", server_round, reason)
        else:
            new_arrays, metrics = self.strategy.aggregate_train(server_round, accepted + failed)
            if new_arrays is not None:
                arrays = conform(new_arrays, self.dtypes)
            aggregated = dict(metrics or {})
        return arrays, {
            "participants": participants,
            "failures": self.failures(collected, failed) + rejected,
            "sampled": [message.metadata.dst_node_id for message in messages],
            "reply-seconds": {self.roster.name(n): t for n, t in collected.seconds.items()},
            "kept_previous_model": reason,
            "aggregated": aggregated,
            "download-bytes": down_bytes,
            "upload-bytes": sum(p["upload-bytes"] for p in participants),
            "phase-seconds": round(time.monotonic() - phase_started, 3),
        }

    def _evaluate(
        self, server_round: int, arrays: ArrayRecord
    ) -> tuple[dict[str, Any], OperatingPoint | None]:
        """Federated evaluation, and the operating point chosen on the replies' histograms."""
        phase_started = time.monotonic()
        config = self.settings.evaluate_instruction(
            self.run_key, server_round, self.layout.fingerprint
        )
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, self.grid))
        if self.secure is not None:
            return self._evaluate_secure(server_round, arrays, messages, phase_started)
        collected, _, down_bytes = self.exchange(messages)
        ok, failed = split_replies(collected.replies)
        ok.sort(key=site_name)
        operating_point = federated_operating_point(
            ok, self.settings.operating_point_rule, self.settings.operating_point_min_specificity
        )
        aggregated = self.strategy.aggregate_evaluate(server_round, ok + failed)
        evaluation = {
            "sites": [{"site": site_name(reply), "metrics": reply_metrics(reply)} for reply in ok],
            "failures": self.failures(collected, failed),
            "aggregated": dict(aggregated or {}),
            "reply-seconds": {self.roster.name(n): t for n, t in collected.seconds.items()},
            "download-bytes": down_bytes,
            "phase-seconds": round(time.monotonic() - phase_started, 3),
        }
        return evaluation, operating_point

    def _train_secure(
        self,
        server_round: int,
        arrays: ArrayRecord,
        messages: list[Message],
        phase_started: float,
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        """The train phase as one secure aggregation over the sampled nodes: the strategy
        aggregates the decoded mean update as the one reply it gets."""
        assert self.secure is not None
        instruction = TrainInstruction.from_record(
            self.settings.train_instruction(self.run_key, server_round, self.layout.fingerprint)
        )
        spec = VectorSpec.for_instruction(instruction, self.layout, self.local_keys)
        outcome = self.secure.aggregate(instruction, arrays, _destinations(messages), spec)
        reason, aggregated = outcome.reason, {}
        if outcome.result is not None:
            summed = outcome.result
            current = {name: array.numpy() for name, array in arrays.items()}
            state = {
                name: (
                    current[name].astype(np.float64) + summed.update[name]
                    if name in summed.update
                    else current[name]
                )
                for name in current
            }
            reply = Message(
                RecordDict(
                    {
                        self.strategy.arrayrecord_key: to_record(state),
                        "metrics": MetricRecord(summed.metrics),
                    }
                ),
                dst_node_id=0,
                message_type=MessageType.TRAIN,
            )
            new_arrays, metrics = self.strategy.aggregate_train(server_round, [reply])
            if new_arrays is not None:
                arrays = conform(new_arrays, self.dtypes)
            aggregated = dict(metrics or {})
            log(
                INFO,
                "round %d: secure sum of %d sites (%d recovered after dropping out), "
                "quantisation error at most %.3g per weight",
                server_round,
                len(outcome.survivors),
                len(outcome.recovered),
                outcome.quantisation_bound,
            )
        else:
            reason = f"{reason}: keeping the previous global model"
        participants = [
            {
                "site": site_name(reply),
                "node_id": reply.metadata.src_node_id,
                "num-examples": None,
                "upload-bytes": outcome.input_bytes.get(reply.metadata.src_node_id, 0),
                "metrics": {},
            }
            for reply in sorted(outcome.survivor_replies, key=site_name)
        ]
        return arrays, {
            "participants": participants,
            "failures": outcome.failures,
            "sampled": _destinations(messages),
            "kept_previous_model": reason,
            "aggregated": aggregated,
            "secure_aggregation": outcome.summary(),
            "download-bytes": outcome.stages.get("masked", {}).get("bytes-sent", 0),
            "upload-bytes": sum(p["upload-bytes"] for p in participants),
            "phase-seconds": round(time.monotonic() - phase_started, 3),
        }

    def _evaluate_secure(
        self,
        server_round: int,
        arrays: ArrayRecord,
        messages: list[Message],
        phase_started: float,
    ) -> tuple[dict[str, Any], OperatingPoint | None]:
        """Federated evaluation as one secure aggregation: the averaged metrics and the
        pooled histograms, the operating point chosen on them."""
        assert self.secure is not None
        instruction = EvaluateInstruction.from_record(
            self.settings.evaluate_instruction(self.run_key, server_round, self.layout.fingerprint)
        )
        spec = VectorSpec.for_instruction(instruction, self.layout, self.local_keys)
        outcome = self.secure.aggregate(instruction, arrays, _destinations(messages), spec)
        operating_point = None
        if outcome.result is not None and outcome.result.histograms is not None:
            covid, other = outcome.result.histograms
            operating_point = pooled_operating_point(
                covid,
                other,
                outcome.result.histogram_sites,
                self.settings.operating_point_rule,
                self.settings.operating_point_min_specificity,
            )
        evaluation = {
            "sites": [],
            "failures": outcome.failures,
            "aggregated": dict(outcome.result.metrics) if outcome.result else {},
            "secure_aggregation": outcome.summary(),
            "download-bytes": outcome.stages.get("masked", {}).get("bytes-sent", 0),
            "phase-seconds": round(time.monotonic() - phase_started, 3),
        }
        return evaluation, operating_point

    def _record(
        self,
        server_round: int,
        arrays: ArrayRecord,
        train: dict[str, Any],
        evaluation: dict[str, Any],
        started: float,
        operating_point: OperatingPoint | None = None,
    ) -> None:
        """Central evaluation, then the checkpoint, card, metrics line and pointers."""
        self.model.load_arrays(arrays)
        central_started = time.monotonic()
        central = self.evaluator()
        card, line = round_record(
            strategy=self.settings.strategy,
            model_config=asdict(self.model.cfg),
            run_config=self.run_config,
            train=train,
            train_metrics=train.get("aggregated", {}),
            federated=evaluation.get("aggregated", {}),
            central=central,
            seconds=time.monotonic() - started,
            sites={p["site"]: p["num-examples"] for p in train.get("participants", [])},
            card={
                "transport_dtype": self.settings.transport_dtype,
                "federated_evaluation": evaluation,
                "operating_point": operating_point.to_dict() if operating_point else None,
                **self.card_extras,
            },
            line={
                "failures": len(train.get("failures", [])),
                "failed_sites": sorted(
                    {f["site"] for f in train.get("sites", {}).get("failed", [])}
                ),
                "kept_previous_model": train.get("kept_previous_model"),
                "download-bytes": train.get("download-bytes", 0),
                "upload-bytes": train.get("upload-bytes", 0),
                "train-phase-seconds": train.get("phase-seconds"),
                "evaluate-download-bytes": evaluation.get("download-bytes", 0),
                "evaluate-phase-seconds": evaluation.get("phase-seconds"),
                "central-seconds": round(time.monotonic() - central_started, 3),
                "coordinator-bytes-sent": self.traffic["sent"],
                "coordinator-bytes-received": self.traffic["received"],
            },
        )
        metric = self.settings.best_metric
        self.run_dir.save_round(
            server_round,
            self.model.full_state(),
            card,
            line,
            strategy_state(self.strategy),
            best_metric=metric,
        )
        best = self.run_dir.read_json("best.json") or {}
        if best.get("round") == server_round:
            log(
                INFO,
                "round %d is the best so far by %s = %.4f",
                server_round,
                metric,
                best["value"],
            )
        log(INFO, "round %d checkpointed in %s", server_round, self.run_dir.path)
        for observe in self.observers:
            observe(server_round, card, line)


def _take_histograms(reply: Message) -> tuple[np.ndarray, np.ndarray] | None:
    """Remove the reply's histograms from its metrics and return them (None if it has none)."""
    metrics = next(iter(reply.content.metric_records.values()))
    covid, other = metrics.pop(COVID_KEY, None), metrics.pop(OTHER_KEY, None)
    if covid is None or other is None:
        return None
    return np.asarray(covid, np.int64), np.asarray(other, np.int64)


def federated_operating_point(
    replies: Iterable[Message], rule: str, min_specificity: float
) -> OperatingPoint | None:
    """The operating point chosen by ``rule`` on the summed histograms of the successful
    evaluate ``replies``, which lose their histogram metrics.  None, with a warning, when no
    reply holds histograms or the pooled tune splits lack COVID-19 or other scans."""
    pooled = [h for reply in replies if (h := _take_histograms(reply)) is not None]
    if not pooled:
        log(WARNING, "operating point not chosen: no site sent tune histograms")
        return None
    sites = sum(int(covid.sum() + other.sum()) > 0 for covid, other in pooled)
    try:
        # ValueError when the sites' bins differ.
        covid = np.sum([pair[0] for pair in pooled], axis=0, dtype=np.int64)
        other = np.sum([pair[1] for pair in pooled], axis=0, dtype=np.int64)
    except ValueError as exc:
        log(WARNING, "operating point not chosen: %s", exc)
        return None
    return pooled_operating_point(covid, other, sites, rule, min_specificity)


def pooled_operating_point(
    covid: np.ndarray, other: np.ndarray, sites: int, rule: str, min_specificity: float
) -> OperatingPoint | None:
    """The operating point chosen by ``rule`` on pooled histograms of ``sites`` sites; None,
    with a warning, when the pool lacks COVID-19 or other scans."""
    scans = int(covid.sum() + other.sum())
    chosen_on = f"pooled tune splits of {sites} site{'s' * (sites != 1)}, {scans} scans"
    try:
        return choose_from_histograms(
            covid, other, rule, min_specificity=min_specificity, chosen_on=chosen_on
        )
    except ValueError as exc:
        log(WARNING, "operating point not chosen: %s", exc)
        return None


def _destinations(messages: list[Message]) -> list[int]:
    return [message.metadata.dst_node_id for message in messages]
