"""The hospital's Flower ClientApp (Message API): ``train`` and ``evaluate`` handlers.

The site is taken from the node config (``data-path``, ``site``, optional ``device``) or, in
simulation, from ``partition-id`` and the run config's ``site-caches``: see
:mod:`fedct.client.site_data`.  Replies carry one ArrayRecord (train only), one MetricRecord whose
keys are the same at every site, and a ``site`` ConfigRecord with the site's name.  Every
reply passes the egress guard of :mod:`fedct.client.egress` on its way out; a site problem is an
error reply naming the site (:mod:`fedct.client.site_errors`).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedct.client.egress import egress_guard
from fedct.client.local import evaluate_site, train_site
from fedct.client.site_data import Site, resolve_site
from fedct.client.site_errors import site_errors

app = ClientApp(mods=[site_errors, egress_guard])


def _reply(
    message: Message, site: Site, metrics: MetricRecord, arrays: ArrayRecord | None = None
) -> Message:
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"name": site.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received global model on this site's train split."""
    site = resolve_site(context.node_config, context.run_config)
    arrays, metrics = train_site(site, message.content["arrays"], message.content["config"])
    return _reply(message, site, metrics, arrays)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the received model on the splits the coordinator names (and, when it asks, return
    the tune split's score histograms for the federated operating point)."""
    site = resolve_site(context.node_config, context.run_config)
    metrics = evaluate_site(site, message.content["arrays"], message.content["config"])
    return _reply(message, site, metrics)
