"""Collect a phase's replies, with a straggler deadline.

Flower's ``Grid.send_and_receive`` waits for every reply up to its timeout.  A site whose
SuperNode is online but whose ClientApp never answers (a dead SuperExec, a hung GPU) then
holds every phase for the full ``round-timeout``.  :func:`collect` pushes the messages
itself and pulls replies until all are in, or ``timeout`` seconds have passed, or — once
``minimum`` successful replies are in — ``factor`` × their median reply time has passed
since the messages went out (``straggler-factor``; 0 waits for the timeout).  It also
says which node every reply belongs to and which nodes sent none, which a reply made by
the SuperLink for a lost node does not tell (its source is the SuperLink).

Before a phase, :func:`wait_for_nodes` waits for the nodes a round needs, with a deadline
(Flower's node sampling waits forever), and :func:`split_replies` / :func:`shortfall` keep a
round from replacing the global model with the average of one site's weights when most sites
failed (Flower's FedAvg averages whatever replies arrive).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

POLL_SECONDS = 0.5


@dataclass
class Collected:
    """The replies of one exchange and what became of every message."""

    replies: list[Message] = field(default_factory=list)
    node_of: dict[str, int] = field(default_factory=dict)  # message id → destination node
    seconds: dict[int, float] = field(default_factory=dict)  # node → its reply's time
    missing: dict[int, str] = field(default_factory=dict)  # node → why it has no reply

    def node(self, reply: Message) -> int:
        """The node a reply answers for (its destination, not the reply's source)."""
        return self.node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def collect(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    minimum: int,
    factor: float,
    poll: float = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Collected:
    """Push ``messages`` and pull their replies until the deadline (see the module
    docstring).  Nodes without a reply are in ``missing`` with the deadline that ended."""
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    if len(ids) != len(messages):  # a grid that leaves out what it did not store
        taken = set(ids)
        ids = [m.metadata.message_id if m.metadata.message_id in taken else "" for m in messages]
    out = Collected()
    pending: dict[str, int] = {}
    for message_id, message in zip(ids, messages, strict=True):
        if message_id:
            pending[message_id] = out.node_of[message_id] = message.metadata.dst_node_id
        else:
            out.missing[message.metadata.dst_node_id] = "the SuperLink did not take its message"
    started = clock()
    ends, why = started + timeout, f"no reply within round-timeout ({timeout:g} s)"
    good: list[float] = []
    while pending:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            out.replies.append(reply)
            out.seconds[node] = round(clock() - started, 3)
            if not reply.has_error():
                good.append(out.seconds[node])
        now = clock()
        if pending and factor > 0 and len(good) >= min(minimum, len(ids)):
            median = statistics.median(good)
            if started + factor * median < ends:
                ends = started + factor * median
                why = (
                    f"no reply within the straggler deadline ({factor:g} × the median reply "
                    f"time {median:.1f} s = {factor * median:.1f} s)"
                )
        if not pending or now >= ends:
            break
        sleep(min(poll, ends - now))
    out.missing.update({node: why for node in pending.values()})
    return out


class NodeWaitTimeout(RuntimeError):
    """Too few nodes connected before the deadline."""


def wait_for_nodes(
    grid: Grid,
    minimum: int,
    timeout: float,
    *,
    poll_interval: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """The connected node ids once at least ``minimum`` are connected.

    Raises :class:`NodeWaitTimeout` naming how many connected when ``timeout`` seconds pass.
    """
    deadline = clock() + timeout
    last_reported = -1
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if clock() >= deadline:
            raise NodeWaitTimeout(
                f"only {len(nodes)} of {minimum} nodes connected after {timeout:.0f} s "
                "(raise node-wait-timeout, or check that every site's SuperNode is running "
                "and can reach the SuperLink)"
            )
        if len(nodes) != last_reported:
            log(INFO, "waiting for nodes: %d of %d connected", len(nodes), minimum)
            last_reported = len(nodes)
        sleep(poll_interval)


def split_replies(replies: Iterable[Message]) -> tuple[list[Message], list[Message]]:
    """(replies with content, replies carrying an error)."""
    ok: list[Message] = []
    failed: list[Message] = []
    for reply in replies:
        (failed if reply.has_error() else ok).append(reply)
    return ok, failed


def shortfall(successful: int, expected: int, minimum: int) -> str | None:
    """Why a round must keep the previous global model, or None when it may aggregate."""
    if successful >= minimum:
        return None
    return (
        f"only {successful} of {expected} train replies succeeded, "
        f"min-train-replies is {minimum}: keeping the previous global model"
    )
