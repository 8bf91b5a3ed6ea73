"""A site problem answered in one line: the ClientApp mod that turns the errors fedct expects
at a hospital (no or a damaged cache, settings that differ from the run's, no training scans,
a weights layout of another version, a spent privacy budget) into an error reply.

Flower would log each such exception with its traceback in the hospital's SuperExec log and
send the coordinator ``<class ...>:<'message'>``.  This mod logs one line naming the site and
the problem and replies with an error whose reason carries the site's name
(common/federation/site_error.py), so the coordinator's card names the site even when it never
succeeded.  Anything else — a bug — keeps Flower's traceback.
"""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log
from flwr.common.constant import ErrorCode

from fedct.client.dp import PrivacyBudgetExceeded
from fedct.client.local import SiteDataError
from fedct.client.site_data import SiteConfigError, declared_name
from fedct.common.cache.store import CacheError
from fedct.common.federation.site_error import site_error_reason
from fedct.common.federation.transport import TransportError
from fedct.common.training.accounting import LedgerError

EXPECTED = (
    SiteConfigError,
    CacheError,
    SiteDataError,
    TransportError,
    PrivacyBudgetExceeded,
    LedgerError,
)


def site_errors(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the rest of the ClientApp; an expected site problem becomes a one-line log entry
    and an error reply naming the site."""
    try:
        return call_next(message, context)
    except EXPECTED as exc:
        site = declared_name(context.node_config, context.run_config)
        log(ERROR, "site %s: %s", site, " ".join(str(exc).split()))
        error = Error(
            code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=site_error_reason(site, str(exc))
        )
        return Message(error, reply_to=message)
