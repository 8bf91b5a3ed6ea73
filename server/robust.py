"""Guards Flower 1.41 does not provide: waiting for nodes with a deadline, and a minimum
number of successful train replies per round.

Flower's node sampling waits forever for ``min_available_nodes``, and its FedAvg averages
whatever replies arrive, even a single one.  A federation of hospitals needs a clear error
when sites do not show up, and a round that does not replace the global model with the
average of one site's weights when most sites failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid


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
