"""Cross-site validation at the end of a run, as in NVIDIA FLARE: a sites × models matrix of
COVID-19 AUC and accuracy on each site's test split, written as ``cross_site.json``.

Models are the final global model and each site's own model (its weights from the last round
it trained in, kept by :class:`fedct.server.rounds.Federation`).  The global model goes to every
connected site; a site's own model goes back to that site only, and with
``cross-site-local-models`` to every other site as well (which shows one hospital's model to
the others).  Everything travels as Flower evaluate messages: only metrics leave the sites.
Pairs that were not evaluated, or whose site failed, are ``null`` (format: server/report.py).
Each cell also records its number of test scans and the site's patient-level bootstrap 95 %
CI of the AUC; the global model is the one of the last round, recorded as ``global_round``.
"""

from __future__ import annotations

import math
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log

from fedct.server.replies import split_replies
from fedct.server.report import CROSS_SITE, CROSS_SITE_METRICS
from fedct.server.rounds import Federation, reply_metrics, site_name

GLOBAL = "global"
SPLIT = "test"


def plan_batches(jobs: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """(node id, model) jobs packed into batches that send each node at most one model, so
    that a reply is matched to its model by the node it came from and the sites work in
    parallel."""
    batches: list[list[tuple[int, str]]] = []
    for job in jobs:
        batch = next((b for b in batches if all(node != job[0] for node, _ in b)), None)
        if batch is None:
            batches.append([job])
        else:
            batch.append(job)
    return batches


def cross_site_jobs(
    nodes: list[int], owners: dict[str, int], all_pairs: bool
) -> list[tuple[int, str]]:
    """The global model to every node in ``nodes``, each site's model (``owners``: site →
    node) to its own node, and with ``all_pairs`` to every other node too; only to nodes in
    ``nodes`` (connected)."""
    jobs = [(node, GLOBAL) for node in nodes]
    for site, owner in sorted(owners.items()):
        jobs += [(node, site) for node in nodes if node == owner or all_pairs]
    return jobs


def matrix(
    cells: dict[tuple[str, str], dict[str, Any]],
    local_sites: list[str],
    global_round: int | None = None,
) -> dict[str, Any]:
    """The ``cross_site.json`` content from ``cells`` ((data site, model) → test metrics)."""
    models = [GLOBAL, *sorted(local_sites)]
    sites = sorted({site for site, _ in cells} | set(local_sites))

    def grid(key: str) -> list[list[Any]]:
        return [[cells.get((s, m), {}).get(f"{SPLIT}-{key}") for m in models] for s in sites]

    low, high = grid("auc_covid_low"), grid("auc_covid_high")
    return {
        "sites": sites,
        "models": models,
        "global_round": global_round,
        **{metric: grid(metric) for metric in CROSS_SITE_METRICS},
        "n": grid("n"),
        "auc_covid_ci": [
            [[lo, hi] if _finite(lo) and _finite(hi) else None for lo, hi in zip(*row, strict=True)]
            for row in zip(low, high, strict=True)
        ],
    }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _message(
    federation: Federation, arrays: ArrayRecord, config: ConfigRecord, node: int
) -> Message:
    content = RecordDict(
        {
            federation.strategy.arrayrecord_key: arrays,
            federation.strategy.configrecord_key: config,
        }
    )
    return Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node)


def cross_site_validation(federation: Federation, global_arrays: ArrayRecord) -> None:
    """Evaluate the final models across the connected sites and write ``cross_site.json``
    into the run directory (nothing when no site answered)."""
    settings = federation.settings
    local = federation.local_models
    models = {GLOBAL: global_arrays, **{site: m.arrays for site, m in local.items()}}
    global_config, local_config = (
        settings.cross_site_instruction(
            federation.run_key, federation.layout.fingerprint, global_model=is_global
        )
        for is_global in (True, False)
    )
    for site, own in sorted(local.items()):
        if own.round < settings.num_rounds:
            log(INFO, "cross-site: %s's own model is from round %d, its last", site, own.round)
    jobs = cross_site_jobs(
        list(federation.grid.get_node_ids()),
        {site: m.node_id for site, m in local.items()},
        settings.cross_site_local_models,
    )
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for batch in plan_batches(jobs):
        model_of = dict(batch)
        messages = [
            _message(federation, models[m], global_config if m == GLOBAL else local_config, node)
            for node, m in batch
        ]
        collected, _, _ = federation.exchange(messages)
        ok, failed = split_replies(collected.replies)
        for failure in federation.failures(collected, failed):
            node = failure["node_id"]
            log(
                WARNING,
                "cross-site: %s on model %s: %s",
                failure["site"],
                model_of[node],
                failure["reason"],
            )
        for reply in ok:
            cells[site_name(reply), model_of[collected.node(reply)]] = reply_metrics(reply)
    if not cells:
        log(WARNING, "cross-site validation: no site answered; %s not written", CROSS_SITE)
        return
    federation.run_dir.write_json(CROSS_SITE, matrix(cells, list(local), settings.num_rounds))
    log(INFO, "cross-site validation: %d evaluations written to %s", len(cells), CROSS_SITE)
