"""A secure aggregation over fedct's real ClientApp in process, for the secure-aggregation
tests: tiny site caches with enough tune scans for histograms, a grid whose sites can drop
out at a chosen stage, and the coordinator's aggregator driven over it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from conftest import TINY, FakeGrid, write_tiny_cache
from flwr.app import ArrayRecord, Message

from fedct.common.federation.messages import EvaluateInstruction, TrainInstruction
from fedct.common.federation.secure_vector import VectorSpec
from fedct.common.federation.transport import Layout
from fedct.common.model.classifier import build_model, travelling_state
from fedct.server.replies import collect
from fedct.server.roster import Roster
from fedct.server.secagg import SecureAggregator, SecureOutcome

COUNTS = {"train": {0: 2, 1: 2, 2: 2}, "tune": {0: 5, 2: 5}, "test": {0: 2, 2: 2}}


def write_sites(root: Path, names: Iterable[str]) -> dict[str, Path]:
    """One tiny cache per site name (seeded by position)."""
    return {
        name: write_tiny_cache(root / name, COUNTS, seed=10 + i) for i, name in enumerate(names)
    }


def global_state(seed: int = 0) -> dict[str, Any]:
    """The tiny model's travelling state, initialised from ``seed``."""
    torch.manual_seed(seed)
    return {k: v.numpy() for k, v in travelling_state(build_model(TINY), TINY).items()}


LAYOUT = Layout.of(global_state())


class DroppingGrid(FakeGrid):
    """A FakeGrid whose nodes in ``drop_at[stage]`` stop answering from that stage on (their
    ClientApp dies: the SuperNode stays connected); ``drop_at[(message type, round)]`` only
    from that message of that round on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop_at: dict[Any, set[int]] = {}
        self.replies_seen: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            kind = message.metadata.message_type
            server_round = message.content["config"].get("server-round")
            self.silent |= self.drop_at.get(kind.partition(".")[2], set())
            self.silent |= self.drop_at.get((kind, server_round), set())
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        self.replies_seen += replies
        return replies


def make_grid(app: Any, caches: dict[str, Path], run_config: dict[str, Any]) -> DroppingGrid:
    nodes = [{"data-path": str(path), "site": name} for name, path in caches.items()]
    return DroppingGrid(app, nodes, run_config)


def aggregator(grid: FakeGrid, *, degree: int = 0, threshold: float = 0.66) -> SecureAggregator:
    """The coordinator's aggregator over ``grid``, with 1-second deadlines (the grid answers
    as a message is pushed: a live site is never late); it learns the sites' names from their
    replies, as the round loop does."""
    roster = Roster()

    def exchange(
        messages: list[Message], minimum: int | None, timeout: float | None, poll: float
    ) -> Any:
        wanted = len(messages) if minimum is None else minimum
        collected = collect(grid, messages, timeout=1, minimum=wanted, factor=2, poll=0.01)
        for reply in collected.replies:
            roster.learn_from(collected.node(reply), reply)
        return collected

    return SecureAggregator(
        exchange, roster, degree=degree, threshold=threshold, min_survivors=2, stage_timeout=1
    )


def aggregate(
    grid: FakeGrid,
    instruction: TrainInstruction | EvaluateInstruction,
    packed: ArrayRecord,
    **options: Any,
) -> SecureOutcome:
    spec = VectorSpec.for_instruction(instruction, LAYOUT)
    nodes = list(grid.get_node_ids())
    return aggregator(grid, **options).aggregate(instruction, packed, nodes, spec)
