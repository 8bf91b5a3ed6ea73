"""Which site each node is, and what every site did in a round.

A node is named by the site name its replies carry, error replies of the site's ClientApp
included (learned in this run, or read back from the last card on resume), else by the name
its SuperNode was registered under (``flwr supernode register --name``), else
``node-<id>``.  Every round's card gets a ``sites`` section: the sites that trained, those
that failed (phase, node id and reason) and those that were not sampled (connected but not
chosen, or not connected at all).  A failure's reason is kept as one line: a traceback that
Flower or Ray wrapped around a site's exception is reduced to the exception's message.
A run in which no round trained any site is a failed run (:func:`nothing_trained`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedct.common.federation.site_error import site_of_reason

MAX_REASON = 300
_WRAPPED = re.compile(r"Message: (.*?)'?>?\s*$", re.S)  # Flower's ClientAppException
_TRACEBACK_LINE = re.compile(r"^(File |Traceback|\^|~|\(pid=|ray::)")


def one_line(reason: str) -> str:
    """A failure's reason as one line of at most :data:`MAX_REASON` characters: a site's own
    one-line reason as it is; a traceback reduced to the message it ends with."""
    text = reason
    wrapped = _WRAPPED.search(text)
    if wrapped and site_of_reason(text) is None:
        text = wrapped.group(1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        messages = [line for line in lines if not _TRACEBACK_LINE.match(line)]
        lines = messages[-1:] or lines[-1:]
    line = " ".join(lines)
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"


def reported_name(reply: Message) -> str | None:
    """The site a reply names: its ``site`` record, or for an error reply made by the site's
    ClientApp the name its reason starts with (common/federation/site_error.py)."""
    if reply.has_error():
        return site_of_reason(reply.error.reason)
    record = reply.content.config_records.get("site")
    return str(record["name"]) if record else None


def site_name(reply: Message) -> str:
    """The site a successful reply came from: its ``site`` record, else its node id."""
    return reported_name(reply) or f"node-{reply.metadata.src_node_id}"


class Roster:
    """Site names of the federation's nodes, as far as they are known."""

    def __init__(self, names: dict[int, str] | None = None) -> None:
        self.names: dict[int, str] = dict(names or {})
        self.registered: dict[int, str] = {}

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Roster:
        """The names a round's card records (its participants and named failures)."""
        train = card.get("train", {})
        entries = [*train.get("participants", []), *train.get("failures", [])]
        return cls({int(e["node_id"]): str(e["site"]) for e in entries if e.get("site")})

    def learn_from(self, node_id: int, reply: Message) -> None:
        """Remember the site name a reply carries (:func:`reported_name`)."""
        site = reported_name(reply)
        if site:
            self.names[node_id] = site

    def connected(self, grid: Grid) -> list[int]:
        """The connected nodes, remembering the names they were registered under."""
        nodes = list(grid.get_nodes())
        self.registered.update({n.node_id: n.name for n in nodes if getattr(n, "name", "")})
        return [n.node_id for n in nodes]

    def name(self, node_id: int) -> str:
        return self.names.get(node_id) or self.registered.get(node_id) or f"node-{node_id}"

    def failure(self, node_id: int, reason: str) -> dict[str, Any]:
        return {"site": self.name(node_id), "node_id": node_id, "reason": one_line(reason)}

    def round_sites(
        self,
        connected: Iterable[int],
        sampled: Iterable[int],
        trained: Iterable[str],
        failures: dict[str, list[dict[str, Any]]],
    ) -> dict[str, Any]:
        """The card's ``sites``: ``trained`` (names), ``failed`` (with phase and reason) and
        ``not_sampled`` (connected but not chosen, or known from earlier rounds but not
        connected)."""
        connected, sampled = set(connected), set(sampled)
        online = {self.name(node) for node in connected}
        not_sampled = [
            {"site": self.name(node), "node_id": node, "reason": "connected, not sampled"}
            for node in sorted(connected - sampled)
        ]
        not_sampled += [
            {"site": site, "node_id": None, "reason": "not connected"}
            for site in sorted(set(self.names.values()) - online)
        ]
        failed = [
            {**entry, "phase": phase} for phase, entries in failures.items() for entry in entries
        ]
        return {"trained": sorted(trained), "failed": failed, "not_sampled": not_sampled}


def nothing_trained(lines: Sequence[dict[str, Any]], first_round: int) -> str | None:
    """Why a run whose metrics lines are ``lines`` failed when no round from ``first_round``
    on (round 0 is the initial model) trained any site; None when one did."""
    rounds = [line for line in lines if int(line.get("round", 0)) >= max(1, first_round)]
    if not rounds or any(line.get("sites") for line in rounds):
        return None
    failed = sorted({site for line in rounds for site in line.get("failed_sites", [])})
    span = f"round {rounds[0]['round']}" + (f" to {rounds[-1]['round']}" if len(rounds) > 1 else "")
    who = f"every site failed ({', '.join(failed)})" if failed else "no site replied"
    return f"no round trained: in {span} {who}; the cards' sites.failed give each reason"
