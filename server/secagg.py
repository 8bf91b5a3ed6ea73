"""The coordinator's side of secure aggregation (SecAgg+, Bell et al. 2020) on Flower's Message
API: one aggregation per train and per evaluate phase, in four exchanges, after which the
coordinator holds the sum of the surviving sites' inputs and nothing else of any one site.

1. **keys** to the sampled sites: each answers with two public keys (sites that do not are
   left out from here on);
2. **shares** to those that answered, each with the public keys of its neighbours (the graph
   every site computes itself, common/federation/secagg.py): each answers with its secrets'
   shares sealed for each neighbour, which the coordinator cannot open;
3. **masked input** to those that shared, with the global weights, the phase's instruction
   and the sealed shares addressed to them: each trains or scores and answers with its input
   (common/federation/secure_vector.py) masked, a uniform-looking vector of the field;
4. **unmask** to the sites whose masked input arrived (the survivors), naming the survivors
   and the sites that shared keys but sent no input (the dropped): each answers with the
   self-mask seed shares it holds for survivors and the mask-key shares it holds for the
   dropped.

The coordinator rebuilds every survivor's self-mask seed and every dropped site's mask key
from ``threshold`` shares (a rebuilt key must match the public key its site advertised),
removes the self masks and the masks the survivors shared with dropped sites, and decodes the
sum.  Fewer survivors than the threshold (or than ``min-train-replies`` in a train phase), or
too few unmask replies to remove a mask, fail the aggregation with a reason: the round keeps
the previous global model.  Each stage's exchange has the round's deadlines
(server/replies.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common import log

from fedct.common.federation.messages import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    MASKED_ARRAY,
    MASKED_RECORD,
    SECAGG_RECORD,
    EvaluateInstruction,
    SecAggKeys,
    SecAggMasked,
    SecAggShares,
    SecAggStage,
    SecAggUnmask,
    TrainInstruction,
    record_bytes,
)
from fedct.common.federation.secagg import (
    FIELD_DTYPE,
    add_into,
    combine_secret,
    dequantize,
    effective_degree,
    mask,
    neighbours,
    pairwise_seed,
    pairwise_sign,
    public_of,
    quantisation_bound,
    received_digest,
    threshold_of,
)
from fedct.common.federation.secure_vector import SecureSum, VectorSpec
from fedct.server.replies import POLL_SECONDS, Collected, split_replies
from fedct.server.roster import Roster

# Sends messages (packing their weights) and collects the replies: (messages, the successful
# replies after which the straggler deadline starts, or None to wait for all; the timeout in
# seconds, or None for round-timeout; seconds between asking for replies) -> the replies.
Exchange = Callable[[list[Message], int | None, float | None, float], Collected]
# The short stages' replies come in fractions of a second (in simulation): asking every half
# second, as for training, would add half a second to each.
SHORT_STAGE_POLL = 0.1


def content_bytes(message: Message) -> int:
    """Bytes of a message's content (common/federation/messages.py), 0 for an error."""
    if message.has_error():
        return 0
    return sum(record_bytes(record) for record in message.content.values())


@dataclass
class SecureOutcome:
    """What one secure aggregation gave: the decoded sum, or why there is none; the sites at
    each stage, every failure named, and the traffic."""

    participants: list[int]
    degree: int
    threshold: int
    result: SecureSum | None = None
    reason: str | None = None
    survivors: list[int] = field(default_factory=list)
    recovered: list[int] = field(default_factory=list)  # shared keys, sent no input
    survivor_replies: list[Message] = field(default_factory=list)  # masked inputs (names)
    failures: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_bytes: dict[int, int] = field(default_factory=dict)  # node → its masked input's bytes
    quantisation_bound: float | None = None

    def summary(self) -> dict[str, Any]:
        """The model card's ``secure_aggregation`` section."""
        return {
            "participants": len(self.participants),
            "degree": self.degree,
            "threshold": self.threshold,
            "survivors": len(self.survivors),
            "recovered_dropouts": len(self.recovered),
            "failed": self.reason,
            "quantisation_bound": self.quantisation_bound,
            "stages": self.stages,
        }


class AggregationFailed(Exception):
    """The aggregation cannot give a sum; the text says why."""


class SecureAggregator:
    """Runs secure aggregations over ``exchange``: ``degree`` and ``threshold`` are the run
    config's ``secagg-degree`` (0: every other site) and ``secagg-threshold`` (a fraction of
    the holders of a site's shares)."""

    def __init__(
        self,
        exchange: Exchange,
        roster: Roster,
        *,
        degree: int,
        threshold: float,
        min_survivors: int,
        stage_timeout: float,
    ) -> None:
        self.exchange = exchange
        self.roster = roster
        self.degree = degree
        self.threshold = threshold
        self.min_survivors = min_survivors
        self.stage_timeout = stage_timeout

    def aggregate(
        self,
        instruction: TrainInstruction | EvaluateInstruction,
        arrays: ArrayRecord,
        participants: list[int],
        spec: VectorSpec,
    ) -> SecureOutcome:
        """The sum of the participants' inputs for ``instruction`` (weights ``arrays``,
        already packed for transport), as ``spec`` lays them out."""
        phase = "train" if isinstance(instruction, TrainInstruction) else "evaluate"
        nodes = sorted(set(participants))
        degree = effective_degree(self.degree, len(nodes))
        threshold = threshold_of(self.threshold, degree + 1)
        outcome = SecureOutcome(nodes, degree, threshold)
        keys = SecAggKeys(
            phase, instruction.server_round, instruction.run_key, tuple(nodes), degree, threshold
        )
        try:
            self._run(keys, instruction, arrays, spec, outcome)
        except AggregationFailed as failed:
            outcome.reason = f"secure aggregation failed: {failed}"
            log(WARNING, "round %d %s: %s", instruction.server_round, phase, outcome.reason)
        return outcome

    def _run(
        self,
        keys: SecAggKeys,
        instruction: TrainInstruction | EvaluateInstruction,
        arrays: ArrayRecord,
        spec: VectorSpec,
        outcome: SecureOutcome,
    ) -> None:
        graph = {
            node: neighbours(node, keys.participants, keys.degree, keys.instance)
            for node in keys.participants
        }
        needed = max(keys.threshold, self.min_survivors)
        advertised = self._stage(
            "keys",
            {node: keys for node in keys.participants},
            outcome,
            lambda stage, reply: reply.content[SECAGG_RECORD],
        )
        public = {
            node: (record["encryption-key"], record["mask-key"])
            for node, record in advertised.items()
        }
        share_stages = {}
        for node in public:
            known = [other for other in graph[node] if other in public]
            if known:
                share_stages[node] = SecAggShares(
                    keys.phase,
                    keys.server_round,
                    keys.run_key,
                    tuple(known),
                    tuple(public[other][0] for other in known),
                    tuple(public[other][1] for other in known),
                )
        shared = self._stage(
            "shares",
            share_stages,
            outcome,
            lambda stage, reply: dict(
                zip(stage.nodes, reply.content[SECAGG_RECORD]["shares"], strict=True)
            ),
        )
        masked_stages = {}
        for node in shared:
            senders = [o for o in graph[node] if o in shared and node in shared[o]]
            masked_stages[node] = SecAggMasked.of(
                instruction, tuple(senders), tuple(shared[o][node] for o in senders)
            )
        sent: dict[int, Message] = {}
        inputs = self._stage(
            "masked",
            masked_stages,
            outcome,
            lambda stage, reply: reply.content[MASKED_RECORD][MASKED_ARRAY].numpy(),
            minimum=needed,
            arrays=arrays,
            valid=lambda vector: vector.dtype == FIELD_DTYPE and vector.shape == (spec.length,),
            sent=sent,
        )
        survivors = sorted(inputs)
        dropped = sorted(set(shared) - set(inputs))
        outcome.survivors, outcome.recovered = survivors, dropped
        if len(survivors) < needed:
            raise AggregationFailed(
                f"{len(survivors)} of {len(keys.participants)} sites sent their masked input, "
                f"{needed} needed"
            )
        unmask = SecAggUnmask(
            keys.phase, keys.server_round, keys.run_key, tuple(survivors), tuple(dropped)
        )
        revealed = self._stage(
            "unmask",
            {node: unmask for node in survivors},
            outcome,
            lambda stage, reply: reply.content[SECAGG_RECORD],
        )
        started = time.monotonic()
        total = np.zeros(spec.length, FIELD_DTYPE)
        for node in survivors:
            add_into(total, inputs[node])
        seeds = _shares(revealed, "seed-nodes", "seed-shares")
        for node in survivors:
            add_into(
                total, mask(self._rebuild(seeds, node, keys.threshold, "seed"), total.size), -1
            )
        masked_with = {node: masked_stages[node].nodes for node in survivors}
        secret_keys = _shares(revealed, "key-nodes", "key-shares")
        for gone in dropped:
            partners = [node for node in survivors if gone in masked_with[node]]
            if not partners:
                continue
            private = self._rebuild(secret_keys, gone, keys.threshold, "mask key")
            if public_of(private) != public[gone][1]:
                raise AggregationFailed(
                    f"the rebuilt mask key of {self.roster.name(gone)} is wrong"
                )
            for node in partners:
                received = _received(masked_stages[node], sent[node])
                seed = pairwise_seed(private, public[node][1], keys.instance, received)
                add_into(total, mask(seed, total.size), -pairwise_sign(node, gone))
        try:
            decoded = spec.decode(dequantize(total))
        except ValueError as exc:
            raise AggregationFailed(f"the sum does not decode: {exc}") from None
        weight = decoded.metrics.get("num-examples", 0.0)
        outcome.quantisation_bound = quantisation_bound(len(survivors), weight)
        outcome.result = decoded
        outcome.stages["unmask"]["sum-seconds"] = round(time.monotonic() - started, 3)

    def _rebuild(
        self, shares: dict[int, list[bytes]], node: int, threshold: int, what: str
    ) -> bytes:
        try:
            return combine_secret(shares.get(node, []), threshold)
        except ValueError as exc:
            raise AggregationFailed(
                f"cannot rebuild the {what} of {self.roster.name(node)}: {exc}"
            ) from None

    def _stage(
        self,
        name: str,
        stages: dict[int, SecAggStage],
        outcome: SecureOutcome,
        value: Callable[[Any, Message], Any],
        *,
        minimum: int = 0,
        arrays: ArrayRecord | None = None,
        valid: Callable[[Any], bool] = lambda _: True,
        sent: dict[int, Message] | None = None,
    ) -> dict[int, Any]:
        """Send each node its stage (recorded in ``sent``, weights packed as they went);
        ``value(stage, reply)`` of every node whose reply keeps the stage's rules (the others
        are failures of this stage)."""
        started = time.monotonic()
        messages = []
        for node, stage in sorted(stages.items()):
            content = RecordDict({CONFIG_RECORD: stage.to_record()})
            if arrays is not None:
                content[ARRAYS_RECORD] = arrays
            messages.append(
                Message(content=content, message_type=stage.message_type, dst_node_id=node)
            )
            if sent is not None:
                sent[node] = messages[-1]
        # The masked input (training) has the round's straggler deadline; the short stages wait
        # for every site up to secagg-stage-timeout.
        if name == "masked":
            collected = self.exchange(messages, minimum, None, POLL_SECONDS)
        else:
            collected = self.exchange(messages, None, self.stage_timeout, SHORT_STAGE_POLL)
        ok, failed = split_replies(collected.replies)
        values: dict[int, Any] = {}
        for reply in ok:
            node = collected.node(reply)
            try:
                found = value(stages[node], reply)
                broken = stages[node].reply_problems(reply) or not valid(found)
            except (KeyError, TypeError, ValueError):
                broken = True
            if broken:
                outcome.failures.append(
                    self.roster.failure(node, f"secure aggregation {name}: a reply off protocol")
                )
                continue
            values[node] = found
            if name == "masked":
                outcome.input_bytes[node] = content_bytes(reply)
                outcome.survivor_replies.append(reply)
        for reply in failed:
            reason = f"secure aggregation {name}: {reply.error.reason}"
            outcome.failures.append(self.roster.failure(collected.node(reply), reason))
        for node, why in sorted(collected.missing.items()):
            outcome.failures.append(self.roster.failure(node, f"secure aggregation {name}: {why}"))
        outcome.stages[name] = {
            "sent": len(messages),
            "replied": len(values),
            "seconds": round(time.monotonic() - started, 3),
            "bytes-sent": sum(content_bytes(m) for m in messages),
            "bytes-received": sum(content_bytes(r) for r in collected.replies),
        }
        return values


def _received(stage: SecAggStage, message: Message) -> bytes:
    """The digest of the weights and instruction a masked-input message carried."""
    assert isinstance(stage, SecAggMasked)
    arrays = message.content[ARRAYS_RECORD]
    return received_digest(
        stage.instruction.to_config(), ((name, a.data) for name, a in arrays.items())
    )


def _shares(revealed: dict[int, Any], nodes_key: str, shares_key: str) -> dict[int, list[bytes]]:
    """Owner → the shares of its secret the unmask replies hold."""
    out: dict[int, list[bytes]] = {}
    for record in revealed.values():
        for owner, share in zip(record[nodes_key], record[shares_key], strict=True):
            out.setdefault(owner, []).append(share)
    return out
