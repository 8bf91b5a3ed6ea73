"""The hospital's Flower ClientApp (Message API): ``train`` and ``evaluate`` handlers.

Every message is hostile input until proven otherwise: a handler parses it with the schema
(common/federation/messages.py) and holds it to the site's policy (client/site_policy.py, from
the node config) before it reads any data.  The site is taken from the node config
(``data-path``, ``site``, optional ``device``) or, in simulation, from ``partition-id`` and the
run config's ``site-caches``: see :mod:`fedct.client.site_data`.  Replies carry one ArrayRecord
(train only), one MetricRecord whose keys the protocol fixes, and a ``site`` ConfigRecord with
the site's name.  With secure aggregation the coordinator sends the four stages of
client/secagg.py instead (message types ``train.secagg_*`` and ``evaluate.secagg_*``), whose
replies carry only the stage's record and the site's name; the site keeps the protocol's
state between them in ``context.state``.  A site whose policy requires secure aggregation
refuses plain train and evaluate messages.  Two mods wrap the handlers:
:mod:`fedct.client.site_errors` turns every failure into an error reply in fixed words, and,
outermost, :mod:`fedct.client.egress` checks and audits every reply on its way out.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedct.client import secagg
from fedct.client.egress import egress_guard
from fedct.client.local import evaluate_site, train_site
from fedct.client.site_data import Site, resolve_site
from fedct.client.site_errors import site_errors
from fedct.client.site_policy import SitePolicy
from fedct.common.federation.messages import (
    ARRAYS_RECORD,
    METRICS_RECORD,
    SECAGG_STAGE_CLASSES,
    SECAGG_STAGES,
    SITE_KEY,
    SITE_RECORD,
    EvaluateInstruction,
    TrainInstruction,
)

app = ClientApp(mods=[egress_guard, site_errors])


def _reply(
    message: Message, site: Site, metrics: MetricRecord, arrays: ArrayRecord | None = None
) -> Message:
    content = RecordDict(
        {METRICS_RECORD: metrics, SITE_RECORD: ConfigRecord({SITE_KEY: site.name})}
    )
    if arrays is not None:
        content[ARRAYS_RECORD] = arrays
    return Message(content=content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received global model on this site's train split."""
    instruction, arrays = TrainInstruction.from_message(message)
    policy = SitePolicy.from_node_config(context.node_config)
    policy.check_plain()
    site = resolve_site(context.node_config, context.run_config)
    new_arrays, metrics = train_site(site, instruction, arrays, policy)
    return _reply(message, site, metrics, new_arrays)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the received model on the splits the coordinator names (and, when it asks, return
    the tune split's score histograms for the federated operating point)."""
    instruction, arrays = EvaluateInstruction.from_message(message)
    policy = SitePolicy.from_node_config(context.node_config)
    policy.check_plain()
    site = resolve_site(context.node_config, context.run_config)
    return _reply(message, site, evaluate_site(site, instruction, arrays, policy))


def _secure_aggregation_stage(name: str) -> ClientAppCallable:
    def handle(message: Message, context: Context) -> Message:
        stage, arrays = SECAGG_STAGE_CLASSES[name].from_message(message)
        policy = SitePolicy.from_node_config(context.node_config)
        site = resolve_site(context.node_config, context.run_config)
        record_name, record = secagg.handle(
            stage, arrays, site, context.node_id, context.state, policy
        )
        content = RecordDict(
            {record_name: record, SITE_RECORD: ConfigRecord({SITE_KEY: site.name})}
        )
        return Message(content=content, reply_to=message)

    handle.__doc__ = f"The {name} stage of a secure aggregation (client/secagg.py)."
    return handle


for _stage in SECAGG_STAGES:
    app.train(_stage)(_secure_aggregation_stage(_stage))
    app.evaluate(_stage)(_secure_aggregation_stage(_stage))
