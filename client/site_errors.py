"""A site's failure answered in fixed words: the ClientApp mod that turns every exception of a
handler into an error reply from the vocabulary of common/federation/site_error.py.

The coordinator may be hostile, so no exception text, path or value of the site's leaves in an
error reply (Flower would send ``<class ...>:<'message'>``).  A refusal (schema, policy,
privacy) carries its own fixed reason, which the coordinator may see; any other failure is
known only by its category: a broken cache or configuration (``site``), weights that do not
fit (``transport``), or anything else (``internal``).  The site's log gets one line with the
whole message, and a traceback for the unexpected ones (bugs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log
from flwr.common.constant import ErrorCode

from fedct.client.local import SiteDataError
from fedct.client.site_data import SiteConfigError, declared_name
from fedct.common.cache.store import CacheError
from fedct.common.federation.site_error import SiteRefusal, fixed_reason, site_error_reason
from fedct.common.federation.transport import TransportError
from fedct.common.training.accounting import LedgerError
from fedct.common.training.privacy import PrivacyError

# Expected failures whose details stay at the site: the category the coordinator is told.
CATEGORY_OF: dict[type[Exception], str] = {
    SiteConfigError: "site",
    CacheError: "site",
    SiteDataError: "site",
    TransportError: "transport",
    LedgerError: "privacy",
    PrivacyError: "privacy",
}


def reason_for(exc: Exception) -> str:
    """What the coordinator may read of ``exc``: ``CATEGORY: fixed text``."""
    if isinstance(exc, SiteRefusal):
        return exc.reason
    for kind, category in CATEGORY_OF.items():
        if isinstance(exc, kind):
            return fixed_reason(category)
    return fixed_reason("internal")


# The reasons of the error replies made by :func:`error_reply` while the egress guard handles
# one message: an error reply with any other reason (made by hand, or passed on) is not sent.
_ISSUED: ContextVar[list[str] | None] = ContextVar("fedct_issued_errors", default=None)


@contextmanager
def issued_errors() -> Iterator[list[str]]:
    """The reasons :func:`error_reply` makes inside this block."""
    issued: list[str] = []
    token = _ISSUED.set(issued)
    try:
        yield issued
    finally:
        _ISSUED.reset(token)


def error_reply(message: Message, site: str, reason: str) -> Message:
    """The error reply of ``site`` to ``message`` with ``reason`` (``CATEGORY: text`` of the
    vocabulary)."""
    reason = site_error_reason(site, reason)
    if (issued := _ISSUED.get()) is not None:
        issued.append(reason)
    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
    return Message(error, reply_to=message)


def site_errors(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the rest of the ClientApp; any exception becomes a one-line log entry (with its
    traceback when unexpected) and an error reply in fixed words naming the site."""
    try:
        return call_next(message, context)
    except Exception as exc:  # noqa: BLE001 — no exception text may leave the site
        site = declared_name(context.node_config, context.run_config)
        if isinstance(exc, SiteRefusal):
            log(ERROR, "site %s refused the message: %s", site, exc.reason)
        else:
            expected = isinstance(exc, tuple(CATEGORY_OF))
            text = " ".join(str(exc).split()) or type(exc).__name__
            log(ERROR, "site %s: %s", site, text, exc_info=not expected)
        return error_reply(message, site, reason_for(exc))
