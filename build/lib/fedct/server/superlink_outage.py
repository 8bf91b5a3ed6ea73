"""How long the coordinator waits for a SuperLink it lost: ``superlink-grace`` seconds.

On the deployment engine the ServerApp reaches the SuperLink through Flower's HTTP grid,
which retries a failed call forever: a ServerApp whose SuperLink was killed keeps running
and, once a SuperLink is back on the same database, goes on writing its run directory —
beside the coordinator the operator started to resume it.  Inside :func:`superlink_outage`
a call that cannot reach the SuperLink gives up after the grace period and the run stops
with :class:`SuperLinkLost` (its run lock released on the way out), so that the documented
resume is safe.  The simulation engine's in-process grid has no retries and is left as it
is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from flwr.serverapp import Grid


class SuperLinkLost(RuntimeError):
    """The SuperLink was unreachable for longer than the grace period."""


@contextmanager
def superlink_outage(grid: Grid, grace: float, run_dir: Path) -> Iterator[None]:
    """Give up on an unreachable SuperLink after ``grace`` seconds (see the module
    docstring)."""
    # Flower 1.41's HttpGrid keeps its RetryInvoker here; every Runtime API call of the grid
    # (and Flower's own heartbeat) goes through it and reads max_time at each call.
    invoker = getattr(grid, "_retry_invoker", None)
    if invoker is not None:
        invoker.max_time = grace
    try:
        yield
    except httpx.HTTPError as exc:
        raise SuperLinkLost(
            f"lost the SuperLink for more than superlink-grace = {grace:g} s ({exc}); stopped "
            f"without writing further; resume with resume-from = {run_dir}"
        ) from None
